"""``python -m compress.bench NAME [--out DIR] [options]``: run one benchmark and write its JSON, Markdown and PNG."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from ..errors import CompressError

BENCHMARKS = {"criteria": "criteria_speed", "pruning": "pruning", "quant": "quant", "deploy": "deploy",
              "coverage": "coverage", "scale": "scale", "removal": "removal",
              "allocation": "allocation"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compress.bench")
    sub = parser.add_subparsers(dest="name", required=True)
    modules = {}
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(f"compress.bench.{module_name}")
        p = sub.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--out", type=Path, default=Path("runs/bench"))
        module.add_arguments(p)
        modules[name] = module
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        modules[args.name].run(args, args.out)
    except CompressError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"{args.name}: done in {time.perf_counter() - start:.0f} s; results in {args.out}/{args.name}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
