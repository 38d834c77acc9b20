"""Bounded checkpoints: at most ``keep`` files per model, the best by the validation metric plus the
latest. FastCaloGAN kept every checkpoint of 300 GANs and broke a 2-million-file storage limit.

A checkpoint is a plain dict of tensors and JSON-like values (``torch.load(weights_only=True)``
reads it): the model's family, variant and config (so it rebuilds its model alone), its state,
the optimisers', the iteration, the RNG states and the validation metrics. Files are written to a
temporary name and renamed, and the index (``checkpoints.json``) is rewritten the same way, so a
crash at any moment leaves a consistent folder.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

__all__ = ["CheckpointManager", "load_checkpoint"]


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path, map_location="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True`` (no pickled code is ever executed)."""
    return torch.load(path, map_location=map_location, weights_only=True)


class CheckpointManager:
    """Keep the ``keep - 1`` best checkpoints by ``metric`` (smaller is better) and the latest."""

    def __init__(self, directory, keep: int = 5, metric: str = "chi2_sum"):
        if keep < 2:
            raise ValueError("keep at least 2 checkpoints (the best and the latest)")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.keep, self.metric = keep, metric
        self.index_path = self.dir / "checkpoints.json"
        self.entries: list[dict] = json.loads(self.index_path.read_text()) if self.index_path.exists() else []

    def save(self, state: dict, iteration: int, metrics: dict) -> Path:
        path = self.dir / f"ckpt-{iteration:09d}.pt"
        _atomic_write_bytes(path, lambda p: torch.save(state, p))
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
        text = json.dumps(self.entries, indent=1)
        _atomic_write_bytes(self.index_path, lambda p: p.write_text(text))

    def latest(self) -> Path | None:
        return self.dir / max(self.entries, key=lambda e: e["iteration"])["file"] if self.entries else None

    def best(self) -> dict | None:
        """The index entry (iteration, file, metrics) of the best checkpoint kept."""
        ranked = self._ranked()
        return ranked[0] if ranked else None

    def files(self) -> list[Path]:
        return [self.dir / e["file"] for e in self.entries]
