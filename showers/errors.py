"""The one error type of the data layer: every problem with input data names its source."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ShowerDataError"]


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
