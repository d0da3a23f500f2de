"""Unreadable images in an image folder: found by decoding every file once before any work, then skipped.

Each file is opened and decoded (JPEGs in draft mode, at 1/8 scale: every byte is still read, so a truncated file
fails, at a fraction of the full decode's cost) on a thread pool. A split with more than ``MAX_UNREADABLE`` of its
files unreadable stops the run with one line; fewer are dropped from the dataset and listed.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import CompressError

MAX_UNREADABLE = 0.01  # the fraction of a split that may be skipped


@dataclass(frozen=True)
class Unreadable:
    path: str
    reason: str


def unreadable_reason(path: str) -> str | None:
    """Why ``path`` cannot be decoded as an image (None when it can)."""
    from PIL import Image  # torchvision's image backend

    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))
            image.load()
        return None
    except Exception as err:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ValueError, DecompressionBombError...
        text = str(err).strip().splitlines()[0][:120] if str(err).strip() else ""
        return f"{type(err).__name__}: {text}" if text else type(err).__name__


@functools.lru_cache(maxsize=8)
def scan(paths: tuple[str, ...], workers: int = 4) -> tuple[Unreadable, ...]:
    """The files of ``paths`` that cannot be decoded, in order (cached: a split is scanned once per process)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(unreadable_reason, paths, chunksize=64))
    return tuple(Unreadable(p, r) for p, r in zip(paths, reasons) if r is not None)


def check_unreadable(folder: Path, paths: tuple[str, ...], bad: tuple[Unreadable, ...]) -> None:
    """A one-line error when more than MAX_UNREADABLE of a split's files cannot be read."""
    if paths and len(bad) > MAX_UNREADABLE * len(paths):
        first = bad[0]
        raise CompressError(f"{len(bad)} of {len(paths)} images in {folder} cannot be read ({100 * len(bad) / len(paths):.1f}% "
                            f"> {100 * MAX_UNREADABLE:.0f}%; e.g. {first.path}: {first.reason})",
                            "replace or remove the broken files (up to 1% are skipped and listed in report.md)")
