"""Training data: showers from CaloChallenge files, split into training and validation sets."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from showers.errors import ShowerDataError
from showers.formats import check_memory, file_attrs, file_readout, iter_calochallenge, open_h5
from showers.readout import Readout, get_readout

__all__ = ["DataSplit", "ShowerData", "load_showers", "read_energies", "split_validation", "energy_points"]


@dataclass
class ShowerData:
    """Showers in memory: ``showers`` (N, n_voxels) float32 MeV, ``energy`` (N,) MeV, optional
    ``angle`` (N,) degrees and ``geometry`` (N,) names, the ``readout`` and where they came from."""

    showers: np.ndarray
    energy: np.ndarray
    readout: Readout
    source: str = ""
    angle: np.ndarray | None = None
    geometry: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.energy)

    def subset(self, idx) -> ShowerData:
        return replace(self, showers=self.showers[idx], energy=self.energy[idx],
                       angle=None if self.angle is None else self.angle[idx],
                       geometry=None if self.geometry is None else self.geometry[idx])

    def describe(self) -> dict:
        """Provenance and ranges (what the registry records as the model's trained range)."""
        d = {"source": self.source, "n_showers": int(len(self)), "readout": self.readout.name,
             "energy_min_mev": float(self.energy.min()), "energy_max_mev": float(self.energy.max())}
        if self.discrete:
            d["energy_points_mev"] = [float(e) for e in energy_points(self.energy)]
        if self.angle is not None:
            d["angle_min_deg"], d["angle_max_deg"] = float(self.angle.min()), float(self.angle.max())
        if self.geometry is not None:
            d["geometries"] = sorted({str(g) for g in self.geometry})
        return d

    @property
    def discrete(self) -> bool:
        """True if the incident energies are a few discrete points (as in FastCaloGAN or this
        project's campaigns), False for a continuous spectrum."""
        return _discrete(self.energy)


def energy_points(energy: np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(energy, dtype=np.float64))


def load_showers(path, readout=None, max_showers: int | None = None) -> ShowerData:
    """Load a CaloChallenge file, or every ``*.h5`` of a folder with the same readout.

    The readout comes from ``readout`` (name, XML, Readout), else from the file's attributes.
    Angles are read from a per-shower dataset ``angles`` if present, else from the file attribute
    ``angle_deg``.
    """
    path = Path(path)
    files = sorted(path.glob("*.h5")) if path.is_dir() else [path]
    if not files:
        raise ShowerDataError(path, "no *.h5 files in this folder")
    ro = get_readout(readout) if readout is not None else file_readout(files[0])
    if ro is None:
        raise ShowerDataError(files[0], "the file records no readout: give one (--readout)")
    if max_showers is not None and (isinstance(max_showers, bool) or not isinstance(max_showers, int)
                                    or max_showers < 1):
        raise ValueError(f"max_showers must be a whole number >= 1 or None, got {max_showers!r}")
    total = 0
    for f in files:  # what the files claim, before anything is read: N = 0, or more than memory holds
        with open_h5(f) as h5:
            n = int(h5["showers"].shape[0]) if "showers" in h5 and h5["showers"].ndim == 2 else None
        if n == 0:
            raise ShowerDataError(f, "no showers (N = 0): nothing to train on", "showers")
        total += n or 0
    check_memory(min(total, max_showers or total), ro.n_voxels, path if len(files) > 1 else files[0])
    es, xs, angles = [], [], []
    for f in files:
        attrs = file_attrs(f)
        for e, x in iter_calochallenge(f, readout=ro):
            es.append(np.asarray(e, dtype=np.float64))
            xs.append(np.asarray(x, dtype=np.float32))
            angles.append(np.full(len(e), float(attrs.get("angle_deg", 90.0))))
            if max_showers and sum(map(len, es)) >= max_showers:
                break
        if max_showers and sum(map(len, es)) >= max_showers:
            break
    energy = np.concatenate(es)[:max_showers]
    return ShowerData(np.concatenate(xs)[:max_showers], energy, ro, ",".join(str(f) for f in files),
                      angle=np.concatenate(angles)[:max_showers])


#: at most this many validation showers per energy point (and in all: ``TrainConfig.n_val_max``)
MAX_VAL_PER_ENERGY = 10_000_000


@dataclass(frozen=True)
class DataSplit:
    """How a data set is split into training and validation showers (``split_validation``).

    val_fraction: held out per energy point (a continuous spectrum: of all showers), in [0, 1).
    min_per_energy: at least this many held out per energy point, but never more than half of a
        point's showers (a small file still trains on every energy).
    strict: refuse, rather than cap at half a point's showers, a ``min_per_energy`` that the data
        cannot hold out (the CLI sets it when --min-val-per-energy is given: a value asked for is
        not silently changed); :meth:`check` applies it to a file before any training starts.
    """

    val_fraction: float = 0.2
    min_per_energy: int = 100
    strict: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if isinstance(self.min_per_energy, bool) or not isinstance(self.min_per_energy, int) \
                or not 0 <= self.min_per_energy <= MAX_VAL_PER_ENERGY:
            raise ValueError(f"min_per_energy (--min-val-per-energy) must be a whole number >= 0 and at most "
                             f"{MAX_VAL_PER_ENERGY:,}, got {self.min_per_energy!r}")

    def __call__(self, data: ShowerData, seed: int = 0) -> tuple[ShowerData, ShowerData]:
        """(training, validation) showers of ``data``."""
        self.check(data.energy, data.source)
        return split_validation(data, self.val_fraction, self.min_per_energy, seed=seed)

    def check(self, energy, source) -> None:
        """With ``strict``, refuse (ValueError naming ``source``) a ``min_per_energy`` above what an
        energy point of ``energy`` can hold out (half its showers)."""
        energy = np.asarray(energy, dtype=np.float64).reshape(-1)
        if not self.strict or not _discrete(energy):
            return
        points, counts = np.unique(energy, return_counts=True)
        i = int(np.argmin(counts))
        if self.min_per_energy > counts[i] // 2:
            raise ValueError(f"--min-val-per-energy {self.min_per_energy} is more than {source} can hold out: "
                             f"{counts[i]} showers at {points[i] / 1000:g} GeV, of which at most {counts[i] // 2} "
                             f"(half) are held out so that the rest trains; give at most {counts[i] // 2}")


def read_energies(path) -> np.ndarray:
    """The incident energies (MeV) of a CaloChallenge file, or of every ``*.h5`` of a folder, without
    reading the showers."""
    path = Path(path)
    out = []
    for f in (sorted(path.glob("*.h5")) if path.is_dir() else [path]):
        with open_h5(f) as h5:
            if "incident_energies" in h5:
                ds = h5["incident_energies"]
                check_memory(ds.shape[0], 1, f, itemsize=8, what="incident energies")
                out.append(np.asarray(ds[()], dtype=np.float64).reshape(-1))
    return np.concatenate(out) if out else np.zeros(0)


def _discrete(energy: np.ndarray) -> bool:
    return len(np.unique(energy)) <= max(30, len(energy) // 50)


def split_validation(data: ShowerData, fraction: float = 0.2, min_per_energy: int = 0,
                     seed: int = 0) -> tuple[ShowerData, ShowerData]:
    """Hold out a validation set, stratified by incident energy for discrete energies.

    Each energy point keeps max(fraction × n, min_per_energy) showers out of training, at most
    n // 2 of its n (so that ``min_per_energy``, sized for big campaigns, never starves a small file); a continuous spectrum holds out ``fraction`` at random. The two sets are disjoint.
    """
    rng = np.random.default_rng(seed)
    val = []
    if data.discrete:
        for e in energy_points(data.energy):
            idx = np.flatnonzero(data.energy == e)
            k = min(max(int(round(fraction * len(idx))), min_per_energy), len(idx) // 2)
            val.append(rng.choice(idx, size=k, replace=False))
        val = np.sort(np.concatenate(val))
    else:
        val = np.sort(rng.choice(len(data), size=int(round(fraction * len(data))), replace=False))
    mask = np.zeros(len(data), dtype=bool)
    mask[val] = True
    return data.subset(np.flatnonzero(~mask)), data.subset(np.flatnonzero(mask))
