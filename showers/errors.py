"""The one error type of the data layer: every problem with input data names its source."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ShowerDataError", "WriteError"]


class ShowerDataError(ValueError):
    """Bad shower data: a missing dataset, a wrong shape, non-finite or negative energies, ...

    The message always names the file (or other source), the dataset where there is one, and the
    problem, so that a user running over hundreds of files knows which one to look at.
    """

    def __init__(self, source, problem: str, dataset: str | None = None):
        self.source = str(source) if not isinstance(source, Path) else str(source)
        self.dataset = dataset
        self.problem = problem
        where = self.source if dataset is None else f"{self.source} [{dataset}]"
        super().__init__(f"{where}: {problem}")


class WriteError(OSError):
    """A file that could not be written: a full disk, a quota, an I/O error. The message is one line
    naming the file, the operating system's reason and what was done about it."""

    def __init__(self, path, cause: BaseException, what: str = ""):
        errno_ = getattr(cause, "errno", None)
        lines = str(cause).strip().splitlines()
        reason = getattr(cause, "strerror", None) or (lines[0] if lines else type(cause).__name__)
        super().__init__(errno_, reason)
        self.filename = str(path)
        self.message = f"{path}: cannot write ({reason}" + (f", errno {errno_}" if errno_ else "") + ")" + \
            (f" while {what}" if what else "")

    def __str__(self) -> str:
        return self.message
