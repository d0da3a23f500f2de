"""The candidates a layer can take in a bit plan: b-bit integers (1..8), ``FLOAT`` (kept in float) and ``FLOAT8``.

This is the one definition of the candidate vocabulary; plans, backends, exporters and latency tables import it.
"""

from __future__ import annotations

from typing import Any, Union

from compress.errors import CompressError

FLOAT = 16  # "not quantized": the layer stays in float (counted as 16-bit storage)
FLOAT8 = "float8"  # float8 e4m3 weights and dynamic activations (CUDA, sm >= 8.9); 8-bit storage
Choice = Union[int, str]  # a candidate: bits 1..8, FLOAT or FLOAT8

_FLOAT_NAMES = ("float", "fp16", "16")


def parse_candidate(value: Any) -> Choice:
    """``value`` as a candidate: an int 1..8 or 16 (FLOAT), ``"float8"``, ``"float"``/``"fp16"``/``"16"`` (FLOAT),
    or a digit string "1".."8"; anything else raises a one-line CompressError."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == FLOAT8:
            return FLOAT8
        if text in _FLOAT_NAMES:
            return FLOAT
        if text.isdigit() and 1 <= int(text) <= 8:
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool) and (1 <= value <= 8 or value == FLOAT):
        return int(value)
    raise CompressError(f"{value!r} is not a quantization candidate",
                        f"use bits 1..8, {FLOAT} (or 'float') to keep a layer in float, or {FLOAT8!r}")


def storage_bits(choice: Choice) -> int:
    """Bits stored per weight: b for int b, 8 for FLOAT8, 16 for FLOAT."""
    return 8 if choice == FLOAT8 else int(choice)


def order(choice: Choice) -> tuple[int, int]:
    """Sort key: fewest bits first, float8 right after int8, FLOAT last."""
    return (8, 1) if choice == FLOAT8 else (int(choice), 0)
