"""The float ONNX graph: example batch, ``torch.onnx.export(dynamo=True)`` with a dynamic batch dimension,
``compress.*`` metadata, and an atomic save (one file below 2 GiB, else external data beside it)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import onnx
import onnx_ir as ir
import torch
from torch import nn

from compress.adapters import adapter_for
from compress.adapters.spec import spec_of
from compress.atomic import atomic_path, refuse_existing
from compress.batches import Inputs, call, call_arguments, concat_rows, describe, is_named, map_tensors, rows
from compress.errors import CompressError
from compress.version import __version__

MIN_OPSET = 21
SINGLE_FILE_LIMIT_BYTES = 2**31 - 2**26  # protobuf's 2 GiB limit, less room for the graph itself
METADATA_PREFIX = "compress."


def example_batch(example_inputs: Any) -> Inputs:
    """One CPU example batch of at least 2 samples (batch 1 would be specialised, not dynamic): a float32 tensor
    (batch, C, ...), or named tensors (floating ones in float32, token ids and masks as they are)."""
    if isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 1:
        example_inputs = example_inputs[0]
    named = is_named(example_inputs) and example_inputs and all(isinstance(v, torch.Tensor) and v.dim() >= 1
                                                                 for v in example_inputs.values())
    if not named and (not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2):
        raise CompressError("export_onnx needs one example input tensor of shape (batch, C, ...) or a dict of named "
                            "input tensors", "pass e.g. torch.zeros(1, 3, 224, 224) or a tokenizer's output")
    x = map_tensors(example_inputs, lambda t: t.detach().cpu().float() if t.is_floating_point() else t.detach().cpu())
    return concat_rows([x, x]) if rows(x) < 2 else x


def _ordered(x: Inputs, names: tuple[str, ...]) -> Inputs:
    """Named inputs in the order of the adapter's input names (then any others): the order of the graph's inputs."""
    if not is_named(x):
        return x
    return {**{n: x[n] for n in names if n in x}, **{n: v for n, v in x.items() if n not in names}}


def export_graph(model: nn.Module, example: Inputs, opset: int) -> ir.Model:
    """torch.onnx dynamo export with the input and output names and dynamic axes of the model's adapter (image
    classifiers: ``input`` -> ``logits``, dynamic batch; transformers: named inputs, dynamic batch and sequence),
    inside the adapter's :meth:`~compress.adapters.ModelAdapter.exporting` context."""
    adapter = adapter_for(model)
    spec = adapter.input_spec(model)
    example = _ordered(example, spec.names)
    names = list(example) if is_named(example) else list(spec.names)
    with adapter.exporting(model):
        try:
            with torch.no_grad():
                call(model, example)
        except RuntimeError as err:
            raise CompressError(f"the model rejects the example input of shape {describe(example)}: "
                                f"{str(err).splitlines()[0][:160]}",
                                "pass an example input of the shape the model was built for") from err
        try:
            axes = [{axis: torch.export.Dim.DYNAMIC for axis in spec.dynamic_axes.get(name, {})} for name in names]
            args, kwargs = call_arguments(example)
            dynamic = dict(zip(names, axes)) if kwargs else tuple(axes)
            program = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                                        input_names=names, output_names=list(spec.outputs), dynamic_shapes=dynamic,
                                        optimize=True, verbose=False)
        except Exception as err:  # torch.export / onnx translation raise many types
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            raise CompressError(f"torch.onnx.export (dynamo) failed on {type(model).__name__}: {type(err).__name__}: {first}",
                                "make the model traceable by torch.export (no data-dependent Python control flow)") from err
    if program is None:
        raise CompressError("torch.onnx.export returned no program", "upgrade torch to >= 2.11")
    return program.model


def source_arch(model: nn.Module) -> str:
    """The architecture name recorded in the model's spec, else its class name."""
    spec = spec_of(model)
    return spec.arch if spec is not None else type(model).__name__


def metadata_props(model: nn.Module, example: Inputs, weights: str, activations: str,
                   bits: Mapping[str, int], extra: Mapping[str, Any] | None) -> dict[str, str]:
    """The file's metadata_props: ``extra`` (non-strings as JSON) plus ``compress.*`` (version, source arch, input
    shape, weight and activation formats, bits per layer)."""
    props = {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
             for k, v in (extra or {}).items()}
    props.update({
        f"{METADATA_PREFIX}version": __version__,
        f"{METADATA_PREFIX}source_arch": source_arch(model),
        f"{METADATA_PREFIX}input_shape": json.dumps({k: list(v.shape[1:]) for k, v in example.items()}
                                                    if is_named(example) else list(example.shape[1:])),
        f"{METADATA_PREFIX}weights": weights,
        f"{METADATA_PREFIX}activations": activations,
        f"{METADATA_PREFIX}weight_bits": json.dumps(dict(bits), sort_keys=True),
    })
    return props


def save(model: ir.Model | onnx.ModelProto, path: Path, overwrite: bool,
         single_file_limit: int = SINGLE_FILE_LIMIT_BYTES) -> tuple[int, Path | None]:
    """Write atomically: one file when the weights are below ``single_file_limit`` bytes, else the ONNX file plus
    ``<name>.data`` beside it. Returns (bytes written, the external data file or None)."""
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weight_bytes < single_file_limit:
        with atomic_path(path, overwrite) as tmp:
            ir.save(model, tmp, format="protobuf")
            onnx.checker.check_model(str(tmp))
        return path.stat().st_size, None
    data_path = path.with_name(path.name + ".data")
    refuse_existing(path, overwrite)
    with atomic_path(data_path, overwrite) as tmp_data, atomic_path(path, overwrite) as tmp_model:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as staging:
            staged = Path(staging) / path.name
            ir.save(model, staged, format="protobuf", external_data=data_path.name)
            onnx.checker.check_model(str(staged))
            os.replace(Path(staging) / data_path.name, tmp_data)
            os.replace(staged, tmp_model)
    return path.stat().st_size + data_path.stat().st_size, data_path
