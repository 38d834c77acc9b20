"""The fleet: one model per detector region, spread over Ray Train workers, trained as banks.

``run_fleet`` starts Ray Train workers (one GPU per worker on a cluster, CPU workers locally; a
``DataParallelTrainer``, without the torch process group that ``TorchTrainer`` would set up: the
workers never exchange tensors). Each worker takes a share of the regions balanced by cost (voxels
× iterations, longest first onto the least loaded worker) and trains them as banks of at most
``bank_size`` models (``trainers.bank``), sorted by voxel count so that a bank pads little. Every
region keeps its own folder ``OUT/<region>/`` on the run's shared storage (held by the worker that
trains it: ``showers.lock``) with at most ``keep_checkpoints`` checkpoint files, its own validation
metric and best epoch, and, through the ``tracker`` it is handed (calozoo's: an MLflow run per region,
a child of the fleet's run), its own record; the fleet itself imports no tracking library.

Fault tolerance: with ``FailureConfig(max_failures)``, a worker that dies is replaced, Ray Train
restarts the worker group, and every region resumes from its own latest checkpoint: nothing is
retrained from scratch. Each start and end of a region is appended to ``OUT/<region>/fleet.log``
(iteration it started from, worker rank; best epoch), which is how the tests see that a region resumed
rather than restarted. Regions whose log ends with their end are skipped; one whose worker died
between its last checkpoint and that line goes through the loop again, which trains nothing and ends
it (its log line, its tracked run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from showers.campaign import list_regions
from showers.errors import ShowerDataError
from showers.formats import file_readout, open_h5
from showers.localray import init_ray, local_gpus_missing, require_resources
from showers.lock import writer_lock
from showers.progress import progress
from trainers.data import DataSplit, ShowerData, load_showers, read_energies
from trainers.loop import TrainConfig, read_progress, train_models
from trainers.reptile import load_compatible
from zoo import create_model_for
from zoo.base import ShowerModel
from zoo.checkpoint import CheckpointManager, load_checkpoint

__all__ = ["FleetConfig", "FleetProgress", "FleetTracker", "assign_regions", "check_config", "list_regions",
           "run_fleet", "train_share"]


#: at most this many workers (and CPUs per worker, and worker failures recovered from), and models per bank
MAX_WORKERS = 4096
MAX_BANK_SIZE = 4096


@dataclass(frozen=True)
class FleetConfig:
    """What a fleet trains, and where.

    model: a zoo variant (``fastcalogan``, ``par04_vae_pbwo4``, ...), rebuilt per region with the
        region's readout. data_dir: a campaign folder, one CaloChallenge file ``<region>.h5`` per
        region. out_dir: the fleet's folder on storage every worker can reach.
    train: how each region trains (its ``seed`` also seeds the models and the data split).
    split: each region's training/validation split. overrides: model config fields.
    bank_size: at most this many regions per bank (a worker trains its banks one after another).
    rng: "bank" (one generator per bank, on the device: fast) or "per_model".
    init_checkpoint: a meta-initialisation (``trainers.reptile``) every region starts from.
    """

    model: str
    data_dir: str
    out_dir: str
    regions: tuple[str, ...]
    train: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False))
    split: DataSplit = field(default_factory=DataSplit)
    overrides: dict = field(default_factory=dict)
    bank_size: int = 64
    rng: str = "bank"
    init_checkpoint: str | None = None

    def __post_init__(self) -> None:
        # a config that went through JSON or asdict (fleet.json, the Ray workers) has dicts here
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", TrainConfig(**self.train))
        if isinstance(self.split, dict):
            object.__setattr__(self, "split", DataSplit(**self.split))
        object.__setattr__(self, "regions", tuple(self.regions))
        if not self.regions:
            raise ValueError("a fleet needs at least one region")
        if isinstance(self.bank_size, bool) or not isinstance(self.bank_size, int) \
                or not 1 <= self.bank_size <= MAX_BANK_SIZE:
            raise ValueError(f"bank_size must be a whole number from 1 to {MAX_BANK_SIZE}, got {self.bank_size!r}")
        if self.rng not in ("bank", "per_model"):
            raise ValueError(f"rng must be 'bank' or 'per_model', got {self.rng!r}")


class FleetTracker(Protocol):
    """How a fleet records its regions without importing a tracking library (calozoo hands it an
    MLflow one). It is pickled to the Ray workers, so it holds only what pickles (a URI, a run id)."""

    def start_region(self, region: str, model: ShowerModel, run_dir: Path, train: ShowerData,
                     val: ShowerData) -> Callable[[dict, int], None]:
        """Called on the worker before the region trains; returns ``log(record, iteration)``."""

    def finish_region(self, region: str, run_dir: Path, val: ShowerData) -> None:
        """Called on the worker after the region has trained."""


def _n_voxels(path: Path) -> int:
    with open_h5(path) as f:
        if "showers" not in f:
            raise ShowerDataError(path, "no 'showers' dataset: not a CaloChallenge file")
        return int(f["showers"].shape[1])


#: on a CPU, a bank's batch of showers (K × batch × voxels × 4 bytes) is kept within this: beyond the
#: caches, the stacked tensors make every elementwise pass memory-bound (``benchmarks/bench_banks.py``:
#: the Par04 VAE at 6480 voxels, batch 100, 1.02× the plain loop at K = 10, 26 MB, and 0.59× at K = 30)
CPU_BANK_BYTES = 32 * 2**20


def cpu_bank_size(bank_size: int, batch_size: int, n_voxels: int) -> int:
    """The bank size to use on a CPU: ``bank_size``, capped so the batch stays within CPU_BANK_BYTES."""
    return max(1, min(bank_size, CPU_BANK_BYTES // max(1, 4 * batch_size * n_voxels)))


def check_config(cfg: FleetConfig) -> None:
    """Refuse a fleet that cannot train, before any Ray worker starts: unreadable region files (named),
    a validation split a region cannot hold (``DataSplit.strict``), training options and model
    overrides that make no sense (by building the first region's model)."""
    for n in cfg.regions:
        path = Path(cfg.data_dir) / f"{n}.h5"
        _n_voxels(path)
        if cfg.split.strict:
            cfg.split.check(read_energies(path), path)
    first = Path(cfg.data_dir) / f"{cfg.regions[0]}.h5"
    readout = file_readout(first)
    if readout is None:
        raise ShowerDataError(first, "the file records no readout (a campaign of `calozoo simulate` does)")
    create_model_for(cfg.model, readout, **cfg.overrides)


def assign_regions(costs: dict[str, float], n_workers: int) -> list[list[str]]:
    """Longest-processing-time-first: each region, costliest first, goes to the least loaded worker."""
    shares: list[list[str]] = [[] for _ in range(n_workers)]
    load = [0.0] * n_workers
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        w = min(range(n_workers), key=lambda i: (load[i], i))
        shares[w].append(name)
        load[w] += costs[name]
    return [sorted(s) for s in shares]


def _region_log(run_dir: Path, text: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "fleet.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")


def _ended(run_dir: Path, iterations: int) -> dict | None:
    """The best checkpoint entry of the region in ``run_dir`` if it has trained to ``iterations`` and
    ended (its log's last line says so), else None."""
    log = run_dir / "fleet.log"
    lines = log.read_text().splitlines() if log.exists() else []
    if not lines or lines[-1].split()[1:3] != ["done", f"iteration={iterations}"]:
        return None
    return CheckpointManager(run_dir / "checkpoints").best()


def train_share(cfg: FleetConfig, regions: list[str], device: str = "cpu", rank: int = 0, report=None,
                tracker: FleetTracker | None = None) -> dict:
    """Train ``regions`` (one worker's share) as banks; returns {region: best checkpoint entry}.

    Regions are trained in banks of at most ``bank_size`` models that share a shape (``trainers.bank``:
    the same voxel count), one bank after another.
    """
    tcfg = dataclasses.replace(cfg.train, device=str(device))
    out = Path(cfg.out_dir)
    results = {}
    init = load_checkpoint(cfg.init_checkpoint)["model"] if cfg.init_checkpoint else None
    # banks of one voxel count: regions sorted by it, then cut into banks
    voxels = {n: _n_voxels(Path(cfg.data_dir) / f"{n}.h5") for n in regions}
    batch = 0  # on a GPU, banks of cfg.bank_size
    if torch.device(device).type == "cpu" and regions:
        first = create_model_for(cfg.model, file_readout(Path(cfg.data_dir) / f"{regions[0]}.h5"), **cfg.overrides)
        batch = int(getattr(first.config, "batch_size", 128))
    groups: list[list[str]] = []
    for n in sorted(regions, key=lambda n: (voxels[n], n)):
        size = cpu_bank_size(cfg.bank_size, batch, voxels[n]) if batch else cfg.bank_size
        if groups and len(groups[-1]) < size and voxels[groups[-1][0]] == voxels[n]:
            groups[-1].append(n)
        else:
            groups.append([n])
    for group in groups:
        # a region is finished once its log says so: one whose last checkpoint was written but whose
        # worker died before the end of its run (the log line, the tracker's ending) goes through the
        # loop again, which trains nothing and ends it
        names = []
        for n in group:
            best = _ended(out / n, tcfg.iterations)
            if best is not None:
                results[n] = best
            else:
                names.append(n)
        if not names:
            continue
        dirs = [out / n for n in names]
        with contextlib.ExitStack() as held:  # one writer per region folder (showers.lock), until its end
            for d in dirs:
                held.enter_context(writer_lock(d, "region folder"))
            _train_bank(cfg, tcfg, names, dirs, init, rank, results, tracker)
    if report is not None:
        report({"regions_done": len(results), "rank": rank})
    return results


def _train_bank(cfg: FleetConfig, tcfg: TrainConfig, names: list[str], dirs: list[Path], init, rank: int,
                results: dict, tracker: FleetTracker | None) -> None:
    """Train one bank of regions (their folders locked), logging each region's start and end and
    putting each region's best checkpoint entry into ``results``."""
    # the iteration each region starts from, from its checkpoint index (no checkpoint is read)
    starts = [max((e["iteration"] for e in CheckpointManager(d / "checkpoints").entries), default=0)
              for d in dirs]
    models, trains, vals = [], [], []
    for n in names:
        data = load_showers(Path(cfg.data_dir) / f"{n}.h5")
        tr, va = cfg.split(data, seed=tcfg.seed)
        torch.manual_seed(tcfg.seed)
        model = create_model_for(cfg.model, data.readout, **cfg.overrides)
        if init is not None:
            load_compatible(model, init)
        models.append(model)
        trains.append(tr)
        vals.append(va)
    for n, d, s in zip(names, dirs, starts):
        _region_log(d, f"start iteration={s} rank={rank} bank={len(names)} pid={os.getpid()}")
    logs = ([tracker.start_region(n, m, d, tr, va) for n, m, d, tr, va in zip(names, models, dirs, trains, vals)]
            if tracker is not None else None)

    def log(i, record, iteration, logs=logs):
        if logs is not None:
            logs[i](record, iteration)

    train_models(models, trains, vals, tcfg, dirs, rng=cfg.rng, seeds=[tcfg.seed] * len(names), log=log,
                 names=names)
    for n, d, va in zip(names, dirs, vals):
        best = CheckpointManager(d / "checkpoints").best()
        results[n] = best
        if tracker is not None:
            tracker.finish_region(n, d, va)
        _region_log(d, f"done iteration={tcfg.iterations} best={best['iteration']} "
                       f"chi2_sum={best['metrics']['chi2_sum']:.4g}")  # the last word: see _ended


class FleetProgress:
    """The progress of a fleet running on Ray Train workers, in the driver: the iterations every region
    has reached, from the ``progress.json`` its training writes every two seconds to the shared
    storage (``showers.progress``: a bar on a terminal, plain lines in a log)."""

    def __init__(self, fleet_dir, regions: list[str], iterations: int, every: float = 1.0):
        import threading

        self.dirs = [Path(fleet_dir) / r for r in regions]
        self.total, self.every = iterations * len(regions), every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="calozoo-fleet-progress", daemon=True)

    def _done(self) -> int:
        return sum(read_progress(d) for d in self.dirs)

    def _run(self) -> None:
        with progress(self.total, "fleet: iterations of all regions", "it", initial=self._done()) as bar:
            while not self.stop.wait(self.every):
                bar.update(self._done() - bar.n)  # the regions' progress.json, every second
            bar.update(self._done() - bar.n)

    def __enter__(self) -> FleetProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self.stop.set()
        self.thread.join(timeout=10)
        return False


def _worker_loop(config: dict) -> None:
    """Ray Train's per-worker function: this worker's share of the regions, as banks."""
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    cfg = FleetConfig(**config["fleet"])
    share = config["shares"][rank]
    pid_dir = Path(cfg.out_dir) / "_workers"
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    (pid_dir / f"rank{rank}.node").write_text(ray.get_runtime_context().get_node_id())
    if torch.cuda.is_available() and config.get("use_gpu"):
        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
    # as many torch threads as CPUs this worker holds: more would oversubscribe the node's cores
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    # ray.train.report is collective (every worker must call it as often as the others), and workers
    # finish their banks at different times: report once, at the end; per-region progress goes to
    # the tracker and to the regions' folders.
    train_share(cfg, share, device, rank, report=lambda m: ray.train.report({**m, "finished": 1}),
                tracker=config.get("tracker"))


def run_fleet(cfg: FleetConfig, num_workers: int = 2, use_gpu: bool = False, address: str | None = None,
              max_failures: int = 3, threads_per_worker: int = 1, tracker: FleetTracker | None = None, *,
              gpus_per_worker: float = 1.0) -> dict:
    """Train ``cfg.regions`` on ``num_workers`` Ray Train workers (a ``DataParallelTrainer``: see below).

    Each worker holds ``threads_per_worker`` CPUs (its torch threads) and, with ``use_gpu``,
    ``gpus_per_worker`` GPUs (a fraction shares a GPU between workers).
    tracker: records each region (on the workers), e.g. calozoo's MLflow tracker; None: no tracking.
    Returns {"shares", "seconds", "status", "regions": {region: best entry}}, also written to
    ``OUT/summary.json``. The fleet folder is held with ``showers.lock.writer_lock`` (one fleet per
    folder), and each region's folder by the worker that trains it.

    The workers never exchange tensors (each trains its own regions and reports once), so they are
    started without a torch process group: Ray Train's ``TorchTrainer`` would set one up (gloo on
    CPUs), whose rendezvous store listens on every interface, beyond the loopback that a local Ray
    keeps to (``showers.localray``). ``DataParallelTrainer`` is the same launcher without it.
    """
    t0 = time.perf_counter()
    for name, value in (("num_workers", num_workers), ("threads_per_worker", threads_per_worker),
                        ("max_failures", max_failures)):
        low = 0 if name == "max_failures" else 1
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_WORKERS:
            raise ValueError(f"{name} must be a whole number from {low} to {MAX_WORKERS}, got {value!r}")
    if use_gpu and (isinstance(gpus_per_worker, bool) or not isinstance(gpus_per_worker, (int, float))
                    or not 0 < gpus_per_worker <= 64):
        raise ValueError(f"gpus_per_worker must be > 0 and at most 64, got {gpus_per_worker!r}")
    check_config(cfg)
    out = Path(cfg.out_dir).resolve()
    cfg = dataclasses.replace(cfg, out_dir=str(out), data_dir=str(Path(cfg.data_dir).resolve()))
    with writer_lock(out, "fleet folder"):
        return _run_fleet(cfg, out, t0, num_workers, use_gpu, address, max_failures, threads_per_worker, tracker,
                          float(gpus_per_worker))


def _run_fleet(cfg: FleetConfig, out: Path, t0: float, num_workers: int, use_gpu: bool, address: str | None,
               max_failures: int, threads_per_worker: int, tracker: FleetTracker | None, gpus_per_worker: float) -> dict:
    costs = {n: _n_voxels(Path(cfg.data_dir) / f"{n}.h5") * cfg.train.iterations for n in cfg.regions}
    shares = assign_regions(costs, num_workers)
    (out / "fleet.json").write_text(json.dumps({"config": asdict(cfg), "shares": shares}, indent=1))

    what = (f"a fleet of {num_workers} worker{'s' if num_workers != 1 else ''}"
            + (f" with {gpus_per_worker:g} GPU each (--device cuda --gpus {gpus_per_worker:g})" if use_gpu else ""))
    if use_gpu and local_gpus_missing(address):  # before Ray starts: nothing to wait for
        raise ValueError(f"{what} on this machine, which has no GPU that torch can use (give --address of a cluster "
                         "with GPUs, or --device cpu)")
    # a cluster at address or RAY_ADDRESS (set inside a Ray job), else a local Ray on loopback only
    init_ray(address, num_cpus=max(num_workers * threads_per_worker, os.cpu_count() or 1), log_to_driver=False)
    per_worker = {"CPU": float(threads_per_worker), **({"GPU": gpus_per_worker} if use_gpu else {})}
    require_resources({k: v * num_workers for k, v in per_worker.items()}, what, address)
    trainer = DataParallelTrainer(
        _worker_loop,
        train_loop_config={"fleet": asdict(cfg), "shares": shares, "use_gpu": use_gpu, "threads": threads_per_worker,
                           "tracker": tracker},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(name=f"fleet-{cfg.model}", storage_path=str(out / "_ray"),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    status = "FAILED"
    try:
        trainer.fit()
        status = "FINISHED"
    finally:
        regions = {n: CheckpointManager(out / n / "checkpoints").best() for n in cfg.regions}
        summary = {"shares": shares, "seconds": time.perf_counter() - t0, "status": status, "regions": regions}
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary
