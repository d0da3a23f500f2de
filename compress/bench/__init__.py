"""Benchmarks: ``python -m compress.bench {criteria,pruning,quant,deploy} [options]``.

Each writes ``<name>.json`` (every number and the settings), ``<name>.md`` (the table for BENCHMARKS.md) and,
where it plots, ``<name>.png`` into ``--out`` (default ``runs/bench``). Speed and accuracy goals live here, never
in unit tests.
"""
