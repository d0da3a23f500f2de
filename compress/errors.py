"""The one error type users see.

Every mistake a user can make (unknown model, missing data folder, corrupt or unsafe checkpoint, wrong input
shape, output that already exists) raises :class:`CompressError` with a single line that names the problem and
the fix. The CLI prints that line and exits with code 2.
"""

from __future__ import annotations


class CompressError(Exception):
    """A user error: ``str(err)`` is one line naming the problem and how to fix it."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        message = problem.rstrip(". ") + (f"; fix: {fix}" if fix else "")
        super().__init__(" ".join(message.split()))
        self.problem = problem
        self.fix = fix
