"""A normal (non-editable) install works on its own: every subpackage and the shipped recipes are in it.

The project is copied to a temporary folder (the build writes build/ and *.egg-info next to its sources), installed
with ``pip install --no-deps --no-build-isolation --target``, then used from a child Python that cannot see the
source tree: ``-S`` skips site, so the editable install's .pth finder is never installed, PYTHONPATH holds only the
install folder and the venv's site-packages (for torch and friends), and the working folder is outside the repo.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = ("compress", "criteria", "exporters")
SOURCE_DIRS = (*PACKAGE_ROOTS, "recipes")
SHIPPED = {"fmnist_jbr", "resnet50_jbr", "mobilenet_v2_jbr"}

CHECK = """
import json
import compress, criteria, exporters
from compress.recipe.config import RECIPES_DIR, list_recipes, load_recipe
recipe = load_recipe("fmnist_jbr")
print(json.dumps({"files": [compress.__file__, criteria.__file__, exporters.__file__], "recipes_dir": str(RECIPES_DIR),
                  "names": sorted(list_recipes()), "recipe": [recipe.name, recipe.source, recipe.prune.criterion]}))
"""


def _source_modules() -> list[Path]:
    """Every .py file under the source package roots, relative to the repo."""
    return sorted(path.relative_to(ROOT) for top in PACKAGE_ROOTS for path in (ROOT / top).rglob("*.py")
                  if "__pycache__" not in path.parts)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="the offline build needs setuptools in the venv (pip install -e '.[test]')")
    base = tmp_path_factory.mktemp("packaging")
    src, target = base / "src", base / "target"
    src.mkdir()
    for path in ROOT.iterdir():
        if path.is_file():
            shutil.copy2(path, src / path.name)  # pyproject.toml, README.md, ...
    for name in SOURCE_DIRS:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--quiet", "--target", str(target), str(src)]
    done = subprocess.run(cmd, cwd=base, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    return target


def _run(target: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -S ARGS`` with only the install folder and the venv's site-packages importable, outside the repo."""
    site_dirs = {*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *sorted(site_dirs)])
    return subprocess.run([sys.executable, "-S", *args], cwd=target.parent, env=env, capture_output=True, text=True,
                          timeout=300)


def test_wheel_has_every_subpackage_and_the_recipes(installed):
    modules = _source_modules()
    assert {Path("compress/recipe/__init__.py"), Path("compress/bench/__init__.py")} <= set(modules)
    missing = [str(p) for p in modules if not (installed / p).is_file()]
    assert not missing, f"modules missing from the install (is their folder a package?): {missing}"
    shipped = {p.stem for p in (ROOT / "recipes").glob("*.toml")}
    assert SHIPPED <= shipped
    assert {p.stem for p in (installed / "compress" / "recipes").glob("*.toml")} == shipped


def test_installed_copy_reads_its_own_recipes(installed):
    done = _run(installed, "-c", CHECK)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for file in out["files"]:
        assert Path(file).resolve().is_relative_to(installed.resolve()), f"{file} is not the installed copy"
    assert Path(out["recipes_dir"]) == (installed / "compress" / "recipes").resolve()
    assert SHIPPED <= set(out["names"])
    name, source, criterion = out["recipe"]
    assert name == "fmnist_jbr" and criterion
    assert Path(source).resolve().is_relative_to(installed.resolve())


def test_recipe_list_from_the_install(installed):
    done = _run(installed, "-m", "compress.recipe", "--list")
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    assert SHIPPED <= listed
