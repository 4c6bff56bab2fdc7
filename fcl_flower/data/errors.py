"""The one error type of the data layer: a problem with a file or folder, naming it."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A dataset file or folder is missing, unreadable or inconsistent.

    ``str(err)`` is ``"<path>: <problem>"`` so that every message names the file.

    Attributes:
        path: the file or folder at fault.
        problem: what is wrong with it, in words.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = str(problem)
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self):  # keep it picklable (Ray / multiprocessing ship exceptions)
        return (type(self), (self.path, self.problem))
