"""``python -m compress.recipe NAME [--data DIR] [--weights W] [--out DIR] [--device D] [--set k=v ...]``.

Runs a recipe end to end and ends with PASS (exit 0) or FAIL (exit 1) against its thresholds; user errors print
one line and exit 2 before any work; ``--list`` prints the shipped recipes.

``torchrun --nproc_per_node=N -m compress.recipe NAME ...`` runs it data-parallel (gloo on the CPU, NCCL with
``--device cuda``): rank 0 prints and writes the outputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ..distributed import init_from_env, is_main
from ..errors import CompressError
from .config import list_recipes, load_recipe
from .runner import run_recipe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress.recipe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help="a recipe name (see --list) or a path to a .toml file")
    p.add_argument("--list", action="store_true", help="list the shipped recipes and exit")
    p.add_argument("--data", help="fashion-mnist | synthetic | an ImageNet-layout folder (DIR/train, DIR/val)")
    p.add_argument("--weights", help="random | train | torchvision enum (IMAGENET1K_V2, DEFAULT) | file path")
    p.add_argument("--out", type=Path, help="output folder (default: runs/NAME)")
    p.add_argument("--device", help="cpu | cuda")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set prune.target_macs=0.3 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _values(args: argparse.Namespace) -> dict[str, str]:
    """The recipe values the named options set (before --set, which wins)."""
    values = {}
    if args.data in ("synthetic", "fashion-mnist"):
        values["data.source"] = args.data
    elif args.data is not None and (Path(args.data) / "t10k-labels-idx1-ubyte.gz").is_file():
        values.update({"data.source": "fashion-mnist", "data.dir": args.data})
    elif args.data is not None:
        values.update({"data.source": "imagenet", "data.dir": args.data})
    if args.weights:
        values["model.weights"] = args.weights
    if args.device:
        values["device"] = args.device
    return values


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list:
            for name, description in list_recipes().items():
                print(f"{name:20s} {description}")
            return 0
        if not args.name:
            raise CompressError("no recipe given", "pass a recipe name (python -m compress.recipe --list) or a .toml path")
        recipe = load_recipe(args.name, args.overrides, _values(args))
        out = args.out or Path("runs") / recipe.name
        init_from_env(recipe.device)
        quiet = not is_main()
        run = run_recipe(recipe, out, overwrite=args.overwrite, progress=not (args.no_progress or quiet),
                         log=(lambda _line: None) if quiet else print)
    except CompressError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted: nothing was written to the output folder", file=sys.stderr)
        return 130
    if not quiet:
        print(f"{'PASS' if run.passed else 'FAIL'}: {recipe.name} -> {run.out}/report.md")
        for failure in run.failures:
            print(f"  - {failure}")
    return 0 if run.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
