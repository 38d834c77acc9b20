"""Data campaigns: simulate a detector's regions, one CaloChallenge HDF5 file per region.

Regions are spread over Ray tasks (a local Ray by default, a cluster by address). A campaign can
be killed and started again: files are written to a temporary name and renamed when complete, so a
file that exists is whole, and regions whose file exists with the same settings are skipped.
"""

from __future__ import annotations

import fnmatch
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from showers import __version__
from showers.atomic import remove_stale
from showers.detector import Region
from showers.errors import ShowerDataError
from showers.formats import CaloChallengeWriter, file_attrs
from showers.progress import progress as progress_display

__all__ = ["CampaignSpec", "list_regions", "region_path", "simulate_region", "run_campaign", "FASTCALOGAN_ENERGIES_MEV"]

#: FastCaloGAN's and CaloChallenge dataset 1's energy points: 256 MeV × 2^k up to 4 TeV
FASTCALOGAN_ENERGIES_MEV = tuple(float(256 * 2**k) for k in range(15))


@dataclass(frozen=True)
class CampaignSpec:
    """What to simulate in each region.

    energies_mev: discrete incident energies (MeV), ``n_per_energy`` showers each; or, with
    ``log_uniform=True``, (low, high) of a log-uniform spectrum and ``n_per_energy`` showers in all.
    """

    energies_mev: tuple[float, ...] = (1024.0, 4096.0, 16384.0, 65536.0)
    n_per_energy: int = 1000
    seed: int = 1234
    log_uniform: bool = False

    def __post_init__(self) -> None:
        e = tuple(float(x) for x in self.energies_mev)
        if not e or any(not np.isfinite(x) or x <= 0 for x in e):
            raise ValueError(f"incident energies must be positive MeV, got {e}")
        if self.log_uniform and len(e) != 2:
            raise ValueError("a log-uniform spectrum needs exactly (low, high)")
        if self.n_per_energy < 1:
            raise ValueError("n_per_energy must be >= 1")
        object.__setattr__(self, "energies_mev", e)

    @property
    def n_showers(self) -> int:
        return self.n_per_energy if self.log_uniform else self.n_per_energy * len(self.energies_mev)

    def attrs(self) -> dict:
        return {"seed": self.seed, "energies_mev": list(self.energies_mev), "n_per_energy": self.n_per_energy,
                "spectrum": "log-uniform" if self.log_uniform else "discrete", "n_showers": self.n_showers}


def region_path(out_dir, region: Region) -> Path:
    return Path(out_dir) / f"{region.name}.h5"


#: showers are simulated and written in blocks of this many, each with its own random stream
BLOCK = 500


def _region_rng(seed: int, region: Region, block: int) -> np.random.Generator:
    # keyed by the region's name, not its position, so a subset of regions reproduces the same
    # files, and by the block, so that any block can be (re)made alone
    return np.random.default_rng([seed, zlib.crc32(f"{region.detector}/{region.name}".encode()), block])


def _is_done(path: Path, region: Region, spec: CampaignSpec) -> bool:
    """True if ``path`` holds this region simulated with ``spec``; an error if it holds another."""
    if not path.exists():
        return False
    try:
        attrs = file_attrs(path)
    except ShowerDataError:
        raise ShowerDataError(path, "exists but is not a readable HDF5 file: delete it or use --overwrite")
    mine = {"region": region.name, **spec.attrs()}
    diff = {k: (attrs.get(k), v) for k, v in mine.items() if _norm(attrs.get(k)) != _norm(v)}
    if diff:
        raise ShowerDataError(path, f"exists with other settings {diff} (file, requested): "
                                    "choose another output folder or use --overwrite")
    return True


def _norm(v):
    if isinstance(v, (list, tuple, np.ndarray)):
        return [float(x) for x in v]
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v


def simulate_region(region: Region, out_dir, spec: CampaignSpec, overwrite: bool = False) -> dict:
    """Simulate one region into ``out_dir/<region>.h5`` (atomically). Returns a summary dict."""

    path = region_path(out_dir, region)
    if not overwrite and _is_done(path, region, spec):
        return {"region": region.name, "path": str(path), "skipped": True, "n": spec.n_showers, "seconds": 0.0}
    t0 = time.perf_counter()
    sim = region.simulator()
    if spec.log_uniform:
        lo, hi = np.log(spec.energies_mev)
        energies = np.exp(_region_rng(spec.seed, region, -1).uniform(lo, hi, spec.n_per_energy))
    else:
        energies = np.repeat(spec.energies_mev, spec.n_per_energy)
    attrs = {"generator": "calozoo.showers.simulator", "calozoo_version": __version__, **region.describe(),
             "angle_deg": region.angle_deg, "readout": region.readout, **spec.attrs(), **sim.describe()}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with CaloChallengeWriter(path, region.readout.n_voxels, attrs) as writer:
        for block, lo in enumerate(range(0, len(energies), BLOCK)):
            e = energies[lo:lo + BLOCK]
            writer.append(e, sim.simulate(e, angle_deg=region.angle_deg, rng=_region_rng(spec.seed, region, block)))
    return {"region": region.name, "path": str(path), "skipped": False, "n": len(energies),
            "seconds": time.perf_counter() - t0}


def run_campaign(regions: list[Region], out_dir, spec: CampaignSpec, address: str | None = None,
                 use_ray: bool = True, overwrite: bool = False, progress: bool = True,
                 num_cpus: int | None = None) -> list[dict]:
    """Simulate ``regions`` into ``out_dir``, one Ray task per region, with its progress
    (``showers.progress``: a bar on a terminal, plain lines in a log).

    address: a Ray cluster address ("auto", "ray://host:10001"); None starts a local Ray.
    use_ray: False runs the regions one after the other in this process (debugging, tiny jobs).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale(out_dir, "*.h5.*")  # the temporary files of a campaign killed here before
    todo, results = [], []
    for region in regions:  # check existing files before starting any worker: fail fast
        if not overwrite and _is_done(region_path(out_dir, region), region, spec):
            results.append({"region": region.name, "path": str(region_path(out_dir, region)), "skipped": True,
                            "n": spec.n_showers, "seconds": 0.0})
        else:
            todo.append(region)
    started = None
    if todo and use_ray:  # joined (or started) before the bar: a missing cluster is one line, not a bar and a line
        from showers.localray import init_ray

        started = init_ray(address, num_cpus=num_cpus, log_to_driver=False, configure_logging=False)
    with progress_display(len(regions), "simulating regions", "region", initial=len(results),
                          disable=not progress) as bar:
        if started is not None:
            results += _run_ray(todo, out_dir, spec, overwrite, bar, shutdown=started)
        else:
            for region in todo:
                results.append(simulate_region(region, out_dir, spec, overwrite))
                bar.update(1)
    return sorted(results, key=lambda r: r["region"])


def _run_ray(regions, out_dir, spec, overwrite, bar, shutdown: bool):
    import ray

    try:
        task = ray.remote(num_cpus=1, max_retries=2)(simulate_region)
        pending = {task.remote(r, str(out_dir.resolve()), spec, overwrite): r for r in regions}
        results = []
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                region = pending.pop(ref)
                try:
                    results.append(ray.get(ref))
                except Exception as exc:  # name the region; the other regions go on
                    results.append({"region": region.name, "error": f"{type(exc).__name__}: {exc}"})
                bar.update(1)
        return results
    finally:
        if shutdown:
            ray.shutdown()


def list_regions(data_dir, patterns=None) -> list[str]:
    """The regions of a campaign folder (its ``*.h5`` files), optionally filtered by globs."""
    names = sorted(p.stem for p in Path(data_dir).glob("*.h5"))
    if not names:
        raise FileNotFoundError(f"{data_dir}: no <region>.h5 files")
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
        if not names:
            raise ValueError(f"no region of {data_dir} matches {list(patterns)}")
    return names
