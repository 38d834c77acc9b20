"""Bounded checkpoints: at most ``keep`` files per model, the best by the validation metric plus the
latest. FastCaloGAN kept every checkpoint of 300 GANs and broke a 2-million-file storage limit.

A checkpoint is a plain dict of tensors and JSON-like values (``torch.load(weights_only=True)``
reads it): the model's family, variant and config (so it rebuilds its model alone), its state,
the optimisers', the iteration, the RNG states and the validation metrics. Files are written to a
temporary name and renamed, and the index (``checkpoints.json``) is rewritten the same way, so a
crash at any moment leaves a consistent folder. Both are written only by the holder of the run
folder's writer lock (``showers.lock``): a second writer is refused, not mixed in.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import torch

from showers.atomic import GuardedFile, remove_stale, tmp_path
from showers.errors import WriteError
from showers.lock import FolderBusyError, writer_lock

__all__ = ["CheckpointError", "CheckpointManager", "load_checkpoint"]

log = logging.getLogger("calozoo.zoo")

#: what every checkpoint holds (``trainers.loop.checkpoint_state``)
REQUIRED = ("family", "variant", "config", "model", "iteration")
_CKPT = re.compile(r"^ckpt-(\d{9})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint or checkpoint index that cannot be used; the message names the file."""


def _atomic_write_bytes(path: Path, write) -> None:
    """``write(file)`` into a temporary file, renamed onto ``path`` once whole and on disk; a write the
    operating system refuses (a full disk, ...) raises :class:`~showers.errors.WriteError` naming
    ``path`` and the cause (``torch.save`` alone says "unexpected pos"), and the temporary file is
    removed."""
    tmp = tmp_path(path, unique=False)
    what = "writing it; the files already there are untouched"
    try:
        try:
            guard = GuardedFile(open(tmp, "wb", buffering=0))
        except OSError as exc:
            raise WriteError(path, exc, what) from None
        try:
            write(guard)
        finally:
            guard.sync()
            guard.close()
        if guard.error is not None:
            raise WriteError(path, guard.error, what)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0][:200] if text else "") or type(exc).__name__


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True`` (no pickled code is ever executed).

    A missing, empty, truncated or foreign file (not a calozoo checkpoint) raises
    :class:`CheckpointError` naming it and the problem, never torch's traceback."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist" if not path.exists() else
                              f"{path}: not a checkpoint file (a folder?)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    with path.open("rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):  # torch's zip format, or its legacy pickle
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (it starts with {head!r})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ... on bad files
        text = _first_line(exc).split(". ")[0]
        what = ("truncated or corrupt checkpoint (an interrupted copy or write?)"
                if any(k in text for k in ("central directory", "EOF", "truncated", "zip archive", "failed finding"))
                else "not a readable checkpoint")
        raise CheckpointError(f"{path}: {what}: {text}") from None
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED):
        have = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a calozoo checkpoint (needs {', '.join(REQUIRED)}; it holds {have})")
    return state


class CheckpointManager:
    """Keep the ``keep - 1`` best checkpoints by ``metric`` (smaller is better) and the latest.

    metric: by default ``"criterion"``, ``validate.metrics.CRITERION`` (zoo may not import validate):
    the sum of the χ²/ndf of E_tot, the layer energies, centres and widths, which sees the network even
    where E_tot does not come from it. An index written with another metric keeps the values it
    was written with.

    The best checkpoint (:meth:`best`) is the latest of those the metric cannot tell from the smallest:
    within the statistical error of a difference of two values, √2 × the smallest one's
    ``{metric}_error`` when its metrics have one (``validate.metrics``), else only on a tie. Once a model
    is as good as the validation set can tell, the smallest value is the luckiest draw of the noise, and
    a later checkpoint that the metric cannot tell from it has trained longer (with a cosine schedule, at a
    smaller learning rate): the classifier tells such later checkpoints from Geant4 less well."""

    def __init__(self, directory, keep: int = 5, metric: str = "criterion"):
        if keep < 2:
            raise ValueError("keep at least 2 checkpoints (the best and the latest)")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep, self.metric = keep, metric
        self.index_path = self.dir / "checkpoints.json"
        remove_stale(self.dir)  # what a killed save left (its process gone)
        self.entries: list[dict] = self._read_index()

    def _read_index(self) -> list[dict]:
        """The index; rebuilt from the ``ckpt-*.pt`` files when it is missing (never a silent restart
        from 0 that would overwrite them); a garbled one is refused, naming it."""
        if not self.index_path.exists():
            files = sorted(p for p in self.dir.glob("ckpt-*.pt") if _CKPT.match(p.name))
            if not files:
                return []
            entries = self._rebuild(files)
            log.warning("%s was missing: rebuilt it from %d checkpoint file(s)", self.index_path, len(entries))
            self.entries = entries
            try:
                self._write_index()
            except FolderBusyError:  # a live writer holds the folder: the index is its to write
                pass
            return entries
        try:
            entries = json.loads(self.index_path.read_text())
            if not isinstance(entries, list) or not all(
                    isinstance(e, dict) and isinstance(e.get("iteration"), int) and isinstance(e.get("file"), str)
                    and "value" in e for e in entries):
                raise ValueError("expected a list of {iteration, file, metrics, value}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.index_path}: not a checkpoint index ({_first_line(exc)}); delete it to "
                                  "rebuild it from the ckpt-*.pt files beside it") from None
        for e in entries:
            if not _CKPT.match(e["file"]):
                raise CheckpointError(f"{self.index_path}: entry {e['file']!r} is not a checkpoint file name "
                                      "(ckpt-NNNNNNNNN.pt); delete the index to rebuild it")
        return entries

    def _rebuild(self, files: list[Path]) -> list[dict]:
        entries = []
        for path in files:
            state = load_checkpoint(path)  # a truncated one is refused, naming it
            metrics = {k: float(v) for k, v in dict(state.get("metrics", {})).items() if isinstance(v, (int, float))}
            value = metrics.get(self.metric)
            entries.append({"iteration": int(state["iteration"]), "file": path.name, "metrics": metrics,
                            "value": None if value is None or not math.isfinite(value) else float(value)})
        return sorted(entries, key=lambda e: e["iteration"])

    def save(self, state: dict, iteration: int, metrics: dict) -> Path:
        """Write a checkpoint and the index, holding the run folder's writer lock (``showers.lock``:
        a process that does not hold it already takes it for the save, or is refused)."""
        path = self.dir / f"ckpt-{iteration:09d}.pt"
        with writer_lock(self.dir.parent):
            _atomic_write_bytes(path, lambda f: torch.save(state, f))
            value = metrics.get(self.metric)
            entry = {"iteration": int(iteration), "file": path.name,
                     "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                     "value": None if value is None or not math.isfinite(value) else float(value)}
            self.entries = [e for e in self.entries if e["iteration"] != iteration] + [entry]
            self._prune()
            self._write_index()
        return path

    def _ranked(self) -> list[dict]:
        # on a tie the later checkpoint ranks first: it has trained longer for the same metric (a
        # model whose total energy is drawn from a fixed table, par04_vae's response_quantiles, has
        # the same χ² of E_tot at every checkpoint)
        return sorted((e for e in self.entries if e["value"] is not None), key=lambda e: (e["value"], -e["iteration"]))

    def _prune(self) -> None:
        latest = max(self.entries, key=lambda e: e["iteration"])
        keep = {latest["file"]} | {e["file"] for e in self._ranked()[: self.keep - 1]}
        for e in self.entries:
            if e["file"] not in keep:
                (self.dir / e["file"]).unlink(missing_ok=True)
        self.entries = sorted((e for e in self.entries if e["file"] in keep), key=lambda e: e["iteration"])

    def _write_index(self) -> None:
        """Only the holder of the run folder's writer lock writes the index."""
        text = json.dumps(self.entries, indent=1)
        with writer_lock(self.dir.parent):
            _atomic_write_bytes(self.index_path, lambda f: f.write(text.encode()))

    def latest(self) -> Path | None:
        return self.dir / max(self.entries, key=lambda e: e["iteration"])["file"] if self.entries else None

    def best(self) -> dict | None:
        """The index entry (iteration, file, metrics) of the best checkpoint kept: the latest whose value
        the smallest one's statistical error cannot tell from it (class docstring)."""
        ranked = self._ranked()
        if not ranked:
            return None
        top = ranked[0]
        error = top["metrics"].get(f"{self.metric}_error")
        tolerance = math.sqrt(2.0) * error if isinstance(error, (int, float)) and math.isfinite(error) else 0.0
        return max((e for e in ranked if e["value"] <= top["value"] + tolerance), key=lambda e: e["iteration"])

    def files(self) -> list[Path]:
        return [self.dir / e["file"] for e in self.entries]
