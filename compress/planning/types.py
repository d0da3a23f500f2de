"""The records of a bit plan: the :class:`Budget` it must fit and the per-layer :class:`LayerBits` of a :class:`BitPlan`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..backends.candidates import FLOAT, FLOAT8, Choice
from ..errors import CompressError


@dataclass(frozen=True)
class Budget:
    """One limit on the quantized weights: average bits per weight, total bytes, or bit-operations (BOPs).

    ``avg_bits`` averages over the weights the plan may choose for (layers fixed in float, e.g. ones torchao
    cannot quantize, are excluded and reported); bytes count packed weights plus one scale per block
    (``scale_bytes`` each) and, for asymmetric quantizers, one zero point per block (as the config stores it) over all
    Conv2d/Linear weights; BOPs = Σ_l MACs_l · b_l · ``activation_bits``;
    ``latency`` (ms) = Σ_l t_l(b_l) from a per-layer onnxruntime table of the int8 QDQ file
    (:mod:`compress.layer_latency`, ``batch_size`` inputs, ``threads`` threads).
    """

    avg_bits: float | None = None
    bytes: float | None = None
    bops: float | None = None
    latency: float | None = None  # ms of the int8 QDQ file, from a per-layer table (compress.layer_latency)
    activation_bits: int = 8
    scale_bytes: int = 2
    batch_size: int = 1  # latency: batch size and onnxruntime threads of the measurement
    threads: int = 2

    def __post_init__(self) -> None:
        given = [k for k in ("avg_bits", "bytes", "bops", "latency") if getattr(self, k) is not None]
        if len(given) != 1:
            raise CompressError(f"a Budget needs exactly one of avg_bits=, bytes=, bops=, latency=, got {given or 'none'}",
                                "e.g. Budget(avg_bits=5)")
        if getattr(self, given[0]) <= 0:
            raise CompressError(f"Budget({given[0]}={getattr(self, given[0])}) must be positive", "e.g. Budget(avg_bits=5)")

    @property
    def kind(self) -> str:
        return next(k for k in ("avg_bits", "bytes", "bops", "latency") if getattr(self, k) is not None)


@dataclass(frozen=True)
class LayerBits:
    name: str
    bits: int  # FLOAT (16) = kept in float; 8 for float8
    numel: int
    macs: int
    predicted_tpv: float
    size_bytes: float
    options: dict[Choice, float] = field(default_factory=dict)  # candidate -> predicted TPV
    note: str = ""  # why the layer is fixed in float (no candidate possible, or asked)
    float8: bool = False  # the choice is FLOAT8 (bits == 8)
    excluded: dict[Choice, str] = field(default_factory=dict)  # candidates this layer cannot take, and why

    @property
    def choice(self) -> Choice:
        return FLOAT8 if self.float8 else self.bits


@dataclass(frozen=True)
class BitPlan:
    """Per-layer bits with predicted TPV and size; ``kept_float`` names layers left unquantized and why."""

    layers: dict[str, LayerBits]
    allocator: str
    budget: Budget
    group_size: int | None
    mapping: str
    predictor: str
    latency_table: Any = None  # the LatencyTable of a latency budget
    device: str = "cpu"  # where the quantized model runs (decides which candidates each layer can take)
    capability: tuple[int, int] | None = None  # CUDA compute capability the plan was made for

    @property
    def predicted_latency_ms(self) -> float | None:
        """Σ_l t_l(b_l) from the latency table (int8 QDQ file), when the plan was made under a latency budget."""
        return None if self.latency_table is None else self.latency_table.total(self.bits)

    @property
    def bits(self) -> dict[str, int]:
        return {n: l.bits for n, l in self.layers.items()}

    @property
    def choices(self) -> dict[str, Choice]:
        """Per-layer choice: bits, FLOAT or FLOAT8."""
        return {n: l.choice for n, l in self.layers.items()}

    @property
    def constrained(self) -> dict[str, dict[Choice, str]]:
        """Layers that could not take some candidates on the target device, with each candidate's reason."""
        return {n: dict(l.excluded) for n, l in self.layers.items() if l.excluded}

    @property
    def predicted_tpv(self) -> float:
        return sum(l.predicted_tpv for l in self.layers.values())

    @property
    def size_bytes(self) -> float:
        return sum(l.size_bytes for l in self.layers.values())

    @property
    def avg_bits(self) -> float:
        """Average bits per weight over the layers the plan chose for (not those fixed in float)."""
        free = [l for l in self.layers.values() if not l.note] or list(self.layers.values())
        return sum(l.bits * l.numel for l in free) / sum(l.numel for l in free)

    @property
    def avg_bits_all(self) -> float:
        """Average bits per weight over every Conv2d/Linear weight, float layers counted at 16."""
        return sum(l.bits * l.numel for l in self.layers.values()) / sum(l.numel for l in self.layers.values())

    @property
    def bops(self) -> float:
        return sum(l.macs * l.bits * self.budget.activation_bits for l in self.layers.values())

    @property
    def kept_float(self) -> dict[str, str]:
        return {n: l.note or "the allocation kept it in float" for n, l in self.layers.items() if l.bits == FLOAT}

    def to_dict(self) -> dict[str, Any]:
        return {"allocator": self.allocator, "budget": asdict(self.budget), "group_size": self.group_size,
                "mapping": self.mapping, "predictor": self.predictor, "predicted_tpv": self.predicted_tpv,
                "predicted_latency_ms": self.predicted_latency_ms, "device": self.device,
                "capability": list(self.capability) if self.capability else None,
                "size_bytes": self.size_bytes, "avg_bits": self.avg_bits, "avg_bits_all": self.avg_bits_all,
                "layers": {n: {"bits": l.bits, "float8": l.float8, "numel": l.numel, "macs": l.macs,
                               "predicted_tpv": l.predicted_tpv, "size_bytes": l.size_bytes, "note": l.note,
                               "excluded": {str(c): r for c, r in l.excluded.items()}}
                           for n, l in self.layers.items()}}

    def summary(self) -> str:
        float8 = [n for n, l in self.layers.items() if l.float8]
        return (f"{self.allocator} plan: avg {self.avg_bits:.2f} bits, {self.size_bytes / 1024:.1f} KiB, predicted TPV "
                f"{self.predicted_tpv:.4g}; float: {', '.join(self.kept_float) or 'none'}"
                + (f"; float8: {', '.join(float8)}" if float8 else ""))
