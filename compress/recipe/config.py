"""A recipe: one TOML file naming model, weights, data, criterion, target, recovery, bit budget, export and checks.

``load_recipe(name_or_path, overrides)`` reads ``recipes/NAME.toml`` (or a path), applies ``--set key=value``
overrides (dotted keys, values parsed as TOML, bare words as strings) and returns a frozen :class:`Recipe`.
Unknown sections or keys, wrong types and impossible values are user errors naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..backends.candidates import Choice, parse_candidate
from criteria.normalize import NORMALIZERS

from ..errors import CompressError
from ..plan import ALLOCATORS, PREDICTORS


def _recipes_dir() -> Path:
    """The shipped recipes: ``compress/recipes/`` in an installed wheel (the top-level recipes/ folder, shipped as
    package data, see pyproject.toml), else the source checkout's top-level ``recipes/`` (editable install, or the
    checkout on sys.path)."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "recipes"
    return installed if installed.is_dir() else package.parent / "recipes"


RECIPES_DIR = _recipes_dir()


@dataclass(frozen=True)
class ModelSection:
    arch: str = "small_resnet"  # torchvision name, small_resnet, vit_fmnist, a compress checkpoint or an HF folder
    weights: str = "random"  # random | train | torchvision enum (IMAGENET1K_V2, DEFAULT) | file path
    image_size: int | None = None  # input resolution (default: the architecture's)
    train_epochs: int | None = None  # epochs when weights = "train" (default: TrainConfig's; part of the cache key)


@dataclass(frozen=True)
class DataSection:
    source: str = "fashion-mnist"  # fashion-mnist | imagenet (an ImageNet-layout folder) | synthetic
    dir: str | None = None  # folder for imagenet (else $IMAGENET_DIR) or fashion-mnist (else the Debian package)
    calibration_samples: int = 1024  # label-free inputs for pruning scores and the TPV traces
    recalibration_samples: int = 2048  # inputs for BatchNorm recalibration
    eval_samples: int | None = None  # evaluate on the first N held-out samples (None: all)
    synthetic_samples: int = 256  # size of the synthetic set (timing only)
    batch_size: int = 64
    eval_batch_size: int = 256
    workers: int = 0  # DataLoader workers for image folders
    check_images: bool = True  # image folders: decode every file first, skip and list unreadable ones (<= 1%)


@dataclass(frozen=True)
class PruneSection:
    enabled: bool = True
    criterion: str = "jbr-centred@bn"  # compress.prune's default
    target_macs: float | None = 0.5
    target_params: float | None = None
    target_latency: float | None = None  # fraction of the dense onnxruntime CPU latency at batch 1 (check.threads)
    latency_activations: str = "fp32"  # target_latency times the pruned model as fp32, or as the int8 QDQ file
    steps: int | None = None  # None: compress.prune's default for the criterion (compress.prune.default_steps)
    round_to: int | None = None
    ignored_layers: list[str] = field(default_factory=list)
    max_layer_ratio: float = 0.9
    recalibrate: bool = False  # re-estimate BN statistics on the calibration inputs between pruning steps
    normalizer: str | None = None  # per-group rescaling of the scores (criteria.NORMALIZERS); None: the criterion's
    mean_replacement: bool = False  # fold removed channels' mean inputs into the next layers' biases
    heads: bool = True  # Hugging Face transformers: also remove whole attention heads
    hidden: float = 0.0  # Hugging Face transformers: share of the hidden size to remove (0: keep it)

    def __post_init__(self) -> None:
        if not 0.0 <= self.hidden < 1.0:
            raise CompressError(f"prune.hidden={self.hidden} is not a share of the hidden size in [0, 1)",
                                "e.g. --set prune.hidden=0.25")
        if self.normalizer is not None and self.normalizer not in NORMALIZERS:
            raise CompressError(f"prune.normalizer={self.normalizer!r} is not one of {', '.join(NORMALIZERS)}",
                                "e.g. --set prune.normalizer=mean")


@dataclass(frozen=True)
class RecoverSection:
    bn_recalibration: bool = True
    distill_steps: int = 0  # KL distillation from the dense model (0: none)
    distill_lr: float = 1e-3
    distill_batch_size: int = 128
    temperature: float = 2.0


@dataclass(frozen=True)
class QuantizeSection:
    enabled: bool = True
    allocator: str = "tpv"  # tpv | hawq | uniform | random
    predictor: str = "jvp"  # how TPV_l(b) is predicted: jvp | noise (faster) | error (compress.plan_bits)
    avg_bits: float | None = 5.0
    bytes: float | None = None
    bops: float | None = None
    latency: float | None = None  # ms of the int8 QDQ file at batch 1, from a per-layer table measured here
    candidates: list[int | str] = field(default_factory=lambda: [4, 8, 16])  # bits 1..8, 16 or "float", "float8"
    group_size: int | None = None
    calibration_samples: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", parse_candidates(self.candidates))


def parse_candidates(values: Sequence[Any]) -> list[Choice]:
    """``quantize.candidates`` as plan candidates (compress.backends.candidates.parse_candidate: "float" -> 16,
    "float8" stays); an empty list or a value that is no candidate is a one-line CompressError naming the key."""
    if not values:
        raise CompressError("quantize.candidates is empty", "e.g. --set quantize.candidates=[4,8,16]")
    out = []
    for i, value in enumerate(values):
        try:
            out.append(parse_candidate(value))
        except CompressError as err:
            raise CompressError(f"quantize.candidates[{i}]: {err.problem}", err.fix) from None
    return out


@dataclass(frozen=True)
class ExportSection:
    opset: int = 21
    int8_activations: bool = False  # also write model_int8.onnx: static int8 QDQ (activations and weights)
    qdq_weights: str = "int8"  # model_int8.onnx weights: int8 everywhere (fast in onnxruntime CPU) or "plan"


@dataclass(frozen=True)
class CheckSection:
    parity_rtol: float = 1e-4  # ONNX vs the PyTorch model it came from (relative max-abs)
    min_agreement: float = 0.99  # top-1 agreement of the ONNX file with its source model
    max_top1_drop: float | None = None  # points of top-1 the final model may lose against dense (labelled data)
    min_dense_agreement: float | None = None  # agreement of the final model with the dense model
    max_latency_ms: float | None = None  # onnxruntime CPU latency at batch 1 of the final model
    samples: int | None = None  # inputs for the onnxruntime check (None: the evaluation set)
    latency_runs: int = 20
    threads: int = 2
    openvino: bool = False  # also time every ONNX file in OpenVINO (CPU, float32; the openvino extra)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    seed: int = 0
    device: str = "cpu"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    prune: PruneSection = field(default_factory=PruneSection)
    recover: RecoverSection = field(default_factory=RecoverSection)
    quantize: QuantizeSection = field(default_factory=QuantizeSection)
    export: ExportSection = field(default_factory=ExportSection)
    check: CheckSection = field(default_factory=CheckSection)
    source: str = ""  # the TOML file it came from

    @property
    def timing_only(self) -> bool:
        """Synthetic data or random weights: the run measures time, its accuracies mean nothing."""
        return self.data.source == "synthetic" or self.model.weights == "random"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelSection, "data": DataSection, "prune": PruneSection, "recover": RecoverSection,
            "quantize": QuantizeSection, "export": ExportSection, "check": CheckSection}
TOP_LEVEL = {"description": str, "seed": int, "device": str}


def list_recipes() -> dict[str, str]:
    """Shipped recipe names and their one-line descriptions."""
    out = {}
    for path in sorted(RECIPES_DIR.glob("*.toml")):
        with open(path, "rb") as f:
            out[path.stem] = str(tomllib.load(f).get("description", "")).strip().splitlines()[0] if path.stat().st_size else ""
    return out


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def recipe_path(name: str | os.PathLike) -> Path:
    """``recipes/NAME.toml`` for a shipped name, else ``name`` itself when it is a TOML file."""
    text = str(name)
    if text.endswith(".toml") or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise CompressError(f"recipe file {path} does not exist", "pass a recipe name from --list or an existing .toml file")
        return path
    path = RECIPES_DIR / f"{text}.toml"
    if not path.is_file():
        names = list(list_recipes())
        raise CompressError(f"unknown recipe {text!r}", f"{_suggest(text, names)}use one of {', '.join(names)} or a path to a .toml file")
    return path


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"prune.target_macs=0.3"`` -> (["prune", "target_macs"], 0.3); bare words are strings, none unsets."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise CompressError(f"--set {item!r} is not key=value", "e.g. --set prune.target_macs=0.3")
    if raw.strip().lower() in ("none", "null"):
        return key.strip().split("."), None  # unset an optional value, e.g. quantize.avg_bits=none
    try:
        doc = tomllib.loads(f"v = {raw.strip()}")
        value = doc["v"] if len(doc) == 1 else raw.strip()  # "1\nx = 2" is a word, not the number 1
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    except (ValueError, RecursionError) as err:  # an int over Python's 4300-digit limit, arrays nested too deep
        raise CompressError(f"--set {key.strip()}: the value is not usable ({_reason(err)})",
                            f"e.g. --set {key.strip()}=0.3, or quote a string") from None
    return key.strip().split("."), value


def _reason(err: BaseException) -> str:
    """``err`` as a short one-line reason."""
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return _clip(" ".join(str(err).split()), 120)


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in "..." when cut."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_type(value: Any, annotation: Any, where: str) -> Any:
    """``value`` converted to the field's type (int -> float allowed), else a CompressError naming ``where``."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in options:
        return None
    for option in options:
        origin = typing.get_origin(option)
        if origin is list and isinstance(value, list):
            (item_type,) = typing.get_args(option)
            return [_check_type(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range, e.g. 10**400
                number = math.inf
            if not math.isfinite(number):
                raise CompressError(f"{where} = {_short(value)} is not a finite number",
                                    f"set {where} to a finite number in the recipe or with --set")
            return number
        if option in (int, str, bool) and type(value) is option:
            return value
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise CompressError(f"{where} = {_short(value)} must be {wanted}", f"set {where} to a {wanted} in the recipe or with --set")


def _short(value: Any) -> str:
    """``repr(value)``, cut to a readable length (a 4000-digit int or a long string stays one short line)."""
    try:
        text = repr(value)
    except ValueError:  # int repr over the 4300-digit limit
        return f"<int of about {value.bit_length() * 0.30103:.0f} digits>"
    return _clip(text, 80)


def _section(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise CompressError(f"[{where}] must be a table", f"write it as a [{where}] section")
    hints = typing.get_type_hints(cls)
    unknown = [k for k in table if k not in hints]
    if unknown:
        raise CompressError(f"unknown key {where}.{unknown[0]}", f"{_suggest(unknown[0], list(hints))}known keys: {', '.join(hints)}")
    return cls(**{k: _check_type(v, hints[k], f"{where}.{k}") for k, v in table.items()})


def _check_path(value: str | None, key: str) -> None:
    """A value that may name a file: no NUL character and a name the OS can look up (not too long, not blocked)."""
    if value is None:
        return
    if "\x00" in value:
        raise CompressError(f"{key} holds a NUL character", f"set {key} to a plain name or path")
    try:
        Path(value).exists()  # missing files are fine here (preflight names them); a name too long is not
    except OSError as err:
        raise CompressError(f"{key} = {_short(value)} is not a usable path: {err.strerror or err}",
                            f"set {key} to a shorter or accessible path") from None


def _validate(recipe: Recipe) -> None:
    def fraction(value: float | None, key: str) -> None:
        if value is not None and not 0.0 < value <= 1.0:
            raise CompressError(f"{key} = {value} is not a fraction in (0, 1]", f"e.g. --set {key}=0.5")

    p, q, d, c = recipe.prune, recipe.quantize, recipe.data, recipe.check
    if not -(2**63) < recipe.seed < 2**63 - 1:  # torch.manual_seed takes 64-bit seeds (and stages use seed + 1)
        raise CompressError(f"seed = {_short(recipe.seed)} is out of range", "use a seed such as 0 or 1234")
    for key, value in (("model.arch", recipe.model.arch), ("model.weights", recipe.model.weights), ("data.dir", d.dir)):
        _check_path(value, key)
    if recipe.device not in ("cpu", "cuda") and not recipe.device.startswith("cuda:"):
        raise CompressError(f"device = {recipe.device!r} is unknown", "use cpu or cuda")
    if recipe.export.qdq_weights not in ("int8", "plan"):
        raise CompressError(f"export.qdq_weights = {recipe.export.qdq_weights!r} is unknown",
                            "use int8 (fast on CPU) or plan (the bit plan's 4/8 bits)")
    for key, value, known in (("allocator", q.allocator, ALLOCATORS), ("predictor", q.predictor, PREDICTORS)):
        if value not in known:
            raise CompressError(f"quantize.{key} = {value!r} is unknown", f"{_suggest(value, list(known))}use {', '.join(known)}")
    if d.source not in ("fashion-mnist", "imagenet", "synthetic"):
        raise CompressError(f"data.source = {d.source!r} is unknown", "use fashion-mnist, imagenet or synthetic")
    if p.enabled and sum(v is not None for v in (p.target_macs, p.target_params, p.target_latency)) != 1:
        raise CompressError("the prune section needs exactly one of target_macs, target_params, target_latency",
                            "e.g. --set prune.target_macs=0.5 (and drop the others)")
    fraction(p.target_macs, "prune.target_macs")
    fraction(p.target_params, "prune.target_params")
    fraction(p.target_latency, "prune.target_latency")
    if p.latency_activations not in ("fp32", "int8"):
        raise CompressError(f"prune.latency_activations = {p.latency_activations!r} is unknown", "use fp32 or int8")
    fraction(c.min_agreement, "check.min_agreement")
    fraction(c.min_dense_agreement, "check.min_dense_agreement")
    if q.enabled and sum(v is not None for v in (q.avg_bits, q.bytes, q.bops, q.latency)) != 1:
        raise CompressError("the quantize section needs exactly one of avg_bits, bytes, bops, latency",
                            "e.g. --set quantize.avg_bits=5 (and drop the others)")
    positive = {"data.calibration_samples": d.calibration_samples, "data.recalibration_samples": d.recalibration_samples,
                "data.batch_size": d.batch_size, "data.eval_batch_size": d.eval_batch_size, "prune.steps": p.steps,
                "data.synthetic_samples": d.synthetic_samples, "quantize.calibration_samples": q.calibration_samples,
                "check.latency_runs": c.latency_runs, "check.threads": c.threads}
    for key, value in positive.items():
        if value is not None and value < 1:  # None: the default (prune.steps: the criterion's)
            raise CompressError(f"{key} = {value} must be >= 1", f"e.g. --set {key}=64")
    for key, value in {"data.eval_samples": d.eval_samples, "check.samples": c.samples}.items():
        if value is not None and value < 1:
            raise CompressError(f"{key} = {value} must be >= 1", f"drop it or --set {key}=1000")
    if recipe.recover.distill_steps < 0:
        raise CompressError(f"recover.distill_steps = {recipe.recover.distill_steps} is negative", "use 0 for no distillation")


def load_recipe(name: str | os.PathLike, overrides: Sequence[str] = (), values: Mapping[str, Any] | None = None) -> Recipe:
    """Read a recipe by name or path, then apply ``values`` (dotted key -> value) and ``--set`` ``overrides``."""
    path = recipe_path(name)
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise CompressError(f"recipe {path} is not valid TOML: {err}", "fix the file (see recipes/fmnist_jbr.toml)") from err
    except UnicodeDecodeError as err:
        raise CompressError(f"recipe {path} is not UTF-8 text ({_reason(err)})", "save it as UTF-8") from err
    except (ValueError, RecursionError) as err:  # an int over Python's 4300-digit limit, arrays nested too deep
        raise CompressError(f"recipe {path} holds an unusable value ({_reason(err)})",
                            "fix the file (see recipes/fmnist_jbr.toml)") from err
    except OSError as err:
        raise CompressError(f"cannot read recipe {path}: {err.strerror or err}", "pass a readable .toml file") from err
    changes = [(key.split("."), value) for key, value in (values or {}).items()]
    changes += [parse_override(item) for item in overrides]
    for keys, value in changes:
        node = table
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise CompressError(f"cannot set {'.'.join(keys)}: {k} is not a section", "use section.key=value")
        node[keys[-1]] = value
    unknown = [k for k in table if k not in SECTIONS and k not in TOP_LEVEL]
    if unknown:
        raise CompressError(f"unknown recipe key {unknown[0]!r} in {path}",
                            f"{_suggest(unknown[0], [*SECTIONS, *TOP_LEVEL])}known: {', '.join([*TOP_LEVEL, *SECTIONS])}")
    top = {k: _check_type(table[k], t, k) for k, t in TOP_LEVEL.items() if k in table}
    sections = {k: _section(cls, table.get(k, {}), k) for k, cls in SECTIONS.items()}
    recipe = Recipe(name=path.stem, source=str(path), **top, **sections)
    _validate(recipe)
    return recipe
