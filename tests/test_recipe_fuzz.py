"""Recipe validation fuzzed with hypothesis: generated ``--set`` overrides and recipe files end in a valid recipe
or one one-line CompressError (exit 2), never a traceback.

Only validation runs (``load_recipe`` + ``runner.preflight``; ``main`` with ``run_recipe`` replaced by preflight),
never the pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import math
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.errors import CompressError
from compress.recipe import __main__ as cli
from compress.recipe.config import SECTIONS, TOP_LEVEL, Recipe, load_recipe, parse_override
from compress.recipe.runner import RecipeRun, preflight

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

KNOWN_KEYS = [*TOP_LEVEL, *(f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in dataclasses.fields(cls))]
ODD_CHARS = "=[]{}\"'\\\n\t #.,:/\x00\u00e9\u2603"

# --- TOML-ish value texts ---------------------------------------------------------------------------------------

_ints = st.one_of(st.integers(-10, 10_000), st.integers(), st.sampled_from([2**63, -(2**63) - 1, 10**400]))
_int_texts = st.one_of(_ints.map(str), st.just("1" + "0" * 5000))  # a TOML int over Python's 4300-digit limit
_float_texts = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "+inf", "-nan", "1e400", "-1e400", "1e-400", "0.0", "-0.0", "0.5", "1.0"]),
)
_bool_texts = st.sampled_from(["true", "false", "True", "FALSE"])
_word_texts = st.one_of(
    st.sampled_from(["none", "None", "null", "NULL", "", " ", "cpu", "cuda", "cuda:0", "tpv", "jvp", "int8", "plan",
                     "synthetic", "imagenet", "fashion-mnist", "random", "float8", "float", "small_resnet",
                     "1979-05-27", "1979-05-27T07:32:00Z", "07:32:00", "/nonexistent/w.pt", "x" * 300 + ".pt"]),
    st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(ODD_CHARS), max_size=20),
)
_string_texts = _word_texts.map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                                .replace("\x00", "\\u0000").replace("\t", "\\t") + '"')
_scalar_texts = st.one_of(_int_texts, _float_texts, _bool_texts, _string_texts, _word_texts)
_value_texts = st.recursive(
    _scalar_texts,
    lambda inner: st.one_of(st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
                            st.dictionaries(st.sampled_from(["a", "b", "bits"]), inner, max_size=2).map(
                                lambda d: "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}")),
    max_leaves=6,
) | st.sampled_from(["[" * 3000 + "]" * 3000, "[1,\n2]", "1 # comment", "1\nx = 2", "[[4, 8]]", "[]", "{}"])

_unknown_keys = st.one_of(
    st.sampled_from(["modle.arch", "prune.target", "quantize.bit", "foo", "name", "source", ".x", "x.", "prune..steps",
                     "prune.steps.x", "model.arch.x", "description.x", "seed.x", "quantize", "prune", " prune.steps "]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz_. ", min_size=1, max_size=15),
)
_keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.sampled_from(KNOWN_KEYS), _unknown_keys)
_overrides = st.lists(st.tuples(_keys, _value_texts).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=4)
_raw_overrides = st.lists(st.text(max_size=30), max_size=3)


def _one_line_error(err: CompressError) -> None:
    text = str(err)
    assert text and "\n" not in text and "\r" not in text, repr(text)
    assert err.exit_code == 2


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    return (base / f"out{i}" for i in itertools.count())


def _validate(name: str | Path, overrides: list[str], out: Path) -> Recipe | None:
    """load_recipe + preflight: a Recipe (valid) or None (a one-line CompressError); anything else fails."""
    try:
        recipe = load_recipe(name, overrides)
        preflight(recipe, out, overwrite=False)
    except CompressError as err:
        _one_line_error(err)
        return None
    assert isinstance(recipe, Recipe)
    _check_sane(recipe)
    return recipe


def _check_sane(recipe: Recipe) -> None:
    """A recipe that passed validation holds no NaN/inf float (it would make every threshold comparison lie)."""
    for section in dataclasses.asdict(recipe).values():
        for value in section.values() if isinstance(section, dict) else [section]:
            if isinstance(value, float):
                assert math.isfinite(value), recipe


@FUZZ
@given(text=st.text(max_size=60) | st.tuples(_keys, _value_texts).map(lambda kv: f"{kv[0]}={kv[1]}"))
def test_parse_override_arbitrary_text(text):
    try:
        keys, _ = parse_override(text)
    except CompressError as err:
        _one_line_error(err)
    else:
        assert isinstance(keys, list) and all(isinstance(k, str) for k in keys)


@FUZZ
@given(overrides=_overrides)
def test_set_overrides_validate_or_one_line_error(overrides, outs):
    _validate("fmnist_jbr", [*overrides], next(outs))
    _validate("fmnist_jbr", ["data.source=synthetic", "model.weights=random", *overrides], next(outs))


@FUZZ
@given(overrides=st.one_of(_overrides, _raw_overrides))
def test_main_exits_0_or_2_with_one_line(overrides, outs):
    """``main`` with the pipeline replaced by preflight: exit 0, or exit 2 with a single ``error:`` line."""

    def fake_run(recipe, out, overwrite=False, progress=True, log=print):
        preflight(recipe, out, overwrite)
        return RecipeRun(recipe=recipe, out=out, passed=True, failures=[], report={})

    argv = ["fmnist_jbr", "--out", str(next(outs)), "--no-progress", "--data", "synthetic", "--weights", "random"]
    for item in overrides:
        argv += ["--set", item]
    stdout, stderr = io.StringIO(), io.StringIO()
    with mock.patch.object(cli, "run_recipe", fake_run), contextlib.redirect_stdout(stdout), \
            contextlib.redirect_stderr(stderr):
        code = cli.main(argv)
    assert code in (0, 1, 2)
    if code == 2:
        lines = stderr.getvalue().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), stderr.getvalue()
    else:
        assert stderr.getvalue() == ""


# --- generated recipe files -------------------------------------------------------------------------------------

_field_keys = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in SECTIONS.items()}
_section_names = st.one_of(st.sampled_from(list(SECTIONS)), st.sampled_from(["modle", "extra", "prune.sub", "seed"]))


@st.composite
def _recipe_texts(draw) -> str:
    lines = [f"{k} = {draw(_value_texts)}" for k in draw(st.lists(st.sampled_from([*TOP_LEVEL, "name", "bogus"]),
                                                                    max_size=3, unique=True))]
    for section in draw(st.lists(_section_names, max_size=5)):
        header = f"[[{section}]]" if draw(st.booleans()) and section == "extra" else f"[{section}]"
        lines.append(header)
        known = _field_keys.get(section, ["x"])
        for key in draw(st.lists(st.sampled_from([*known, "typo", "x y"]), max_size=4, unique=True)):
            key = f'"{key}"' if " " in key else key
            lines.append(f"{key} = {draw(_value_texts)}")
    return "\n".join(lines) + "\n"


_recipe_bytes = st.one_of(
    _recipe_texts().map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.binary(max_size=60),  # invalid UTF-8, NUL bytes, garbage
    st.sampled_from([b"", b"\xef\xbb\xbfseed = 1\n", b"seed = 1\nseed = 2\n", b"[model]\n[model]\n",
                     b"description = \"\xff\xfe\"\n", b"[prune\n", b"model = 3\n", b"[quantize]\ncandidates = []\n"]),
)


@FUZZ
@given(content=_recipe_bytes, overrides=st.lists(st.sampled_from(["data.source=synthetic", "model.weights=random"]),
                                                 max_size=2))
def test_recipe_files_validate_or_one_line_error(content, overrides, tmp_path_factory, outs):
    path = tmp_path_factory.mktemp("recipe") / "fuzzed.toml"
    path.write_bytes(content)
    _validate(path, overrides, next(outs))


def test_shipped_recipes_still_validate(tmp_path):
    for name in ("fmnist_jbr", "mobilenet_v2_jbr", "resnet50_jbr"):
        recipe = load_recipe(name, ["data.source=synthetic", "model.weights=random"])
        preflight(recipe, tmp_path / name, overwrite=False)


# Hypothesis found these: tracebacks out of load_recipe/preflight, or NaN/inf/odd values that passed validation
# (the NUL weights path was already a one-line error, kept as a guard); each is now one CompressError line, exit 2.
REGRESSIONS = [
    ["prune.ignored_layers=" + "[" * 3000 + "]" * 3000],  # RecursionError in tomllib
    ["seed=1" + "0" * 5000],  # ValueError: int over Python's 4300-digit limit
    ["quantize.avg_bits=none", "quantize.bytes=1" + "0" * 400],  # OverflowError: int too large to convert to float
    ["quantize.avg_bits=nan"], ["check.parity_rtol=inf"], ["check.max_latency_ms=-inf"],  # NaN/inf passed validation
    ["model.weights=" + "x" * 300 + ".pt"], ["model.arch=" + "x" * 300],  # OSError: file name too long (preflight)
    ["data.dir=" + "x" * 300], ["data.source=imagenet", "data.dir=/" + "x/" * 3000],
    ['model.weights="w\\u0000.pt"'], ["seed=" + "9" * 30],  # NUL in a path; a seed torch.manual_seed rejects
    ["prune.steps=3\nfoo = 4"],  # parsed as steps=3 (the rest ignored); now the string "3\nfoo = 4", a type error
]


@pytest.mark.parametrize("overrides", REGRESSIONS, ids=range(len(REGRESSIONS)))
def test_regressions_are_one_line_errors(overrides, tmp_path):
    with pytest.raises(CompressError) as info:
        preflight(load_recipe("fmnist_jbr", ["data.source=synthetic", *overrides]), tmp_path / "out", overwrite=False)
    _one_line_error(info.value)


def test_recipe_file_not_utf8_is_one_line_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('description = "caf\u00e9"\n'.encode("latin-1"))  # UnicodeDecodeError in tomllib.load
    with pytest.raises(CompressError, match="not UTF-8") as info:
        load_recipe(path)
    _one_line_error(info.value)
