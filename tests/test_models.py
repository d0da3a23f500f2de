"""Model resolution by name, object and weights source; one-line errors for each user mistake."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from compress import CompressError, resolve
from compress.evaluate import predict
from compress.models import identify, spec_of, torchvision_weights


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "small_resnet"])
def test_resolve_by_name_builds_a_working_model(name):
    model = resolve(name, kwargs={"num_classes": 10})
    spec = spec_of(model)
    assert spec.arch == name and spec.weights == "random"
    with torch.no_grad():
        assert predict(model.eval(), torch.zeros(1, *spec.input_shape)).shape == (1, 10)


def test_unknown_model_suggests_close_names():
    with pytest.raises(CompressError, match="did you mean resnet50"):
        resolve("resnet-50")


def test_identify_finds_torchvision_architecture():
    spec = identify(torchvision.models.mobilenet_v2(num_classes=5))
    assert spec.arch == "mobilenet_v2" and spec.kwargs == {"num_classes": 5}
    assert identify(torchvision.models.resnet34()).arch == "resnet34"  # same class as resnet18, other depth


def test_module_object_is_accepted_as_is():
    module = torchvision.models.resnet18()
    assert resolve(module) is module and spec_of(module).arch == "resnet18"
    with pytest.raises(CompressError, match="weights were given for a model object"):
        resolve(module, weights="IMAGENET1K_V1")


def test_torchvision_weights_enum_names():
    assert torchvision_weights("resnet50", "IMAGENET1K_V2").name == "IMAGENET1K_V2"
    assert torchvision_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V1").name == "IMAGENET1K_V1"
    assert torchvision_weights("resnet50", "DEFAULT").name == "IMAGENET1K_V2"
    with pytest.raises(CompressError, match="use one of DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"):
        torchvision_weights("resnet50", "IMAGENET9K")


def test_offline_download_gives_a_one_line_fix(monkeypatch):
    def offline(self, progress=True, check_hash=False):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(CompressError, match="--weights PATH") as err:
        resolve("resnet18", weights="IMAGENET1K_V1")
    assert "\n" not in str(err.value)


def test_wrong_input_shape_is_a_user_error():
    model = resolve("small_resnet").eval()
    with pytest.raises(CompressError, match=r"expects \(1, 28, 28\)"):
        predict(model, torch.zeros(2, 3, 28, 28))
