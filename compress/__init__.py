"""TPV compression toolkit: label-free pruning and bit allocation, checked in ONNX.

Library API (one verb per stage)::

    from compress import save, load, resolve
    model = resolve("small_resnet", weights="train")
    save(model, "model.pt"); model = load("model.pt")
"""

from . import data
from .checkpoint import load, save
from .errors import CompressError
from .evaluate import accuracy, agreement
from .models import ModelSpec, resolve

__all__ = ["CompressError", "ModelSpec", "accuracy", "agreement", "data", "load", "resolve", "save"]
__version__ = "0.1.0"
