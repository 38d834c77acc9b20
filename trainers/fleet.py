"""The fleet: one model per detector region, spread over Ray Train workers, trained as banks.

``run_fleet`` starts a Ray Train ``TorchTrainer`` (one GPU per worker on a cluster, CPU workers
locally). Each worker takes a share of the regions balanced by cost (voxels × iterations, longest
first onto the least loaded worker) and trains them as banks of at most ``bank_size`` models
(``trainers.bank``), sorted by voxel count so that a bank pads little. Every region keeps its own
folder ``OUT/<region>/`` on the run's shared storage
with at most ``keep_checkpoints`` checkpoint files, its own validation metric and best epoch, and its
own MLflow run, a child of the fleet's run.

Fault tolerance: with ``FailureConfig(max_failures)``, a worker that dies is replaced, Ray Train
restarts the worker group, and every region resumes from its own latest checkpoint (regions that are
finished are skipped): nothing is retrained from scratch. Each start of a region is appended to
``OUT/<region>/fleet.log`` (iteration it started from, worker rank), which is how the tests see that a
region resumed rather than restarted.
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["FleetConfig", "assign_regions", "list_regions", "run_fleet", "train_share"]


@dataclass
class FleetConfig:
    """What a fleet trains, and where.

    model: a zoo variant (``fastcalogan``, ``par04_vae_pbwo4``, ...), rebuilt per region with the
        region's readout. data_dir: a campaign folder, one CaloChallenge file ``<region>.h5`` per
        region. out_dir: the fleet's folder on storage every worker can reach.
    train: ``trainers.loop.TrainConfig`` fields. overrides: model config fields.
    bank_size: at most this many regions per bank (a worker trains its banks one after another).
    rng: "bank" (one generator per bank, on the device: fast) or "per_model".
    """

    model: str
    data_dir: str
    out_dir: str
    regions: list[str]
    train: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)
    bank_size: int = 64
    rng: str = "bank"
    val_fraction: float = 0.2
    min_val_per_energy: int = 100
    seed: int = 0
    campaign: str = "fleet"
    tracking: bool = True
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    plots: bool = True
    init_checkpoint: str | None = None  # a meta-initialisation (trainers.reptile): a meta-adapted fleet


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


def _n_voxels(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["showers"].shape[1])


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


def train_share(cfg: FleetConfig, regions: list[str], device: str = "cpu", rank: int = 0, report=None) -> dict:
    """Train ``regions`` (one worker's share) as banks; returns {region: best checkpoint entry}."""
    import torch

    from trainers.bank import train_bank
    from trainers.checkpoint import CheckpointManager, load_checkpoint
    from trainers.data import load_showers, split_validation
    from trainers.loop import TrainConfig
    from trainers.reptile import load_compatible
    from zoo import create_model

    tcfg = TrainConfig(**{**cfg.train, "device": str(device)})
    out = Path(cfg.out_dir)
    results = {}
    init = load_checkpoint(cfg.init_checkpoint)["model"] if cfg.init_checkpoint else None
    # banks of similar voxel counts: a bank computes every model at its largest N
    regions = sorted(regions, key=lambda n: (_n_voxels(Path(cfg.data_dir) / f"{n}.h5"), n))
    for b0 in range(0, len(regions), cfg.bank_size):
        names = regions[b0:b0 + cfg.bank_size]
        dirs = [out / n for n in names]
        # the iteration each region starts from, from its checkpoint index (no checkpoint is read)
        starts = [max((e["iteration"] for e in CheckpointManager(d / "checkpoints").entries), default=0)
                  for d in dirs]
        if min(starts) >= tcfg.iterations:
            for n, d in zip(names, dirs):
                results[n] = CheckpointManager(d / "checkpoints").best()
            continue
        models, trains, vals = [], [], []
        for n in names:
            data = load_showers(Path(cfg.data_dir) / f"{n}.h5")
            tr, va = split_validation(data, cfg.val_fraction, cfg.min_val_per_energy, seed=cfg.seed)
            torch.manual_seed(cfg.seed)
            model = create_model(cfg.model, **{**cfg.overrides, "readout": data.readout.to_dict()})
            if init is not None:
                load_compatible(model, init)
            models.append(model)
            trains.append(tr)
            vals.append(va)
        for n, d, s in zip(names, dirs, starts):
            _region_log(d, f"start iteration={s} rank={rank} pid={os.getpid()}")
        runs = _tracked_runs(cfg, models, names, dirs, trains, vals) if cfg.tracking else None

        def log(i, record, iteration, runs=runs):
            if runs is not None:
                runs[i].log_metrics(record, iteration)

        train_bank(models, trains, vals, tcfg, dirs, rng=cfg.rng, seeds=[cfg.seed] * len(names), log=log,
                   names=names)
        for i, (n, d) in enumerate(zip(names, dirs)):
            best = CheckpointManager(d / "checkpoints").best()
            results[n] = best
            _region_log(d, f"done iteration={tcfg.iterations} best={best['iteration']} "
                           f"chi2_sum={best['metrics']['chi2_sum']:.4g}")
            if runs is not None:
                _finish_run(runs[i], d, vals[i], cfg.plots)
    if report is not None:
        report({"regions_done": len(results), "rank": rank})
    return results


def _tracked_runs(cfg, models, names, dirs, trains, vals):
    from registry.tracking import TrackedRun
    from registry.training import model_params, run_name

    runs = []
    for m, n, d, tr, va in zip(models, names, dirs, trains, vals):
        params = {**model_params(m), "train": cfg.train, "fleet": {"bank_size": cfg.bank_size, "rng": cfg.rng},
                  "data": {"source": tr.source, "n_train": len(tr), "n_validation": len(va)}}
        tags = {"calozoo.family": m.family, "calozoo.variant": m.variant, "calozoo.region": n,
                "calozoo.campaign": cfg.campaign, "calozoo.run_dir": str(Path(d).resolve())}
        runs.append(TrackedRun(run_name(m, n), cfg.campaign, d, params=params, tags=tags,
                               parent_run_id=cfg.parent_run_id, uri=cfg.tracking_uri))
    return runs


def _finish_run(run, run_dir, val, plots: bool) -> None:
    from registry.training import best_tags, validation_plot

    run.set_tags(best_tags(run_dir))
    run.log_artifact(Path(run_dir) / "checkpoints", "checkpoints")
    if plots:
        png = validation_plot(run_dir, val, title=f"{run.name} ({run.experiment})")
        if png is not None:
            run.log_artifact(png, "plots")
    run.finish("FINISHED")


def _worker_loop(config: dict) -> None:
    """Ray Train's per-worker function: this worker's share of the regions, as banks."""
    import ray
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    cfg = FleetConfig(**config["fleet"])
    share = config["shares"][rank]
    pid_dir = Path(cfg.out_dir) / "_workers"
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    (pid_dir / f"rank{rank}.node").write_text(ray.get_runtime_context().get_node_id())
    if torch.cuda.is_available() and config.get("use_gpu"):
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(int(config.get("threads", 1)))
    # ray.train.report is collective (every worker must call it as often as the others), and workers
    # finish their banks at different times: report once, at the end; per-region progress goes to
    # MLflow and to the regions' folders.
    train_share(cfg, share, device, rank, report=lambda m: ray.train.report({**m, "finished": 1}))


def run_fleet(cfg: FleetConfig, num_workers: int = 2, use_gpu: bool = False, address: str | None = None,
              max_failures: int = 3, threads_per_worker: int = 1) -> dict:
    """Train ``cfg.regions`` on a Ray Train ``TorchTrainer`` of ``num_workers`` workers.

    Returns {"shares", "seconds", "regions": {region: best entry}}; the fleet's MLflow run (when
    tracking) is the parent of every region's run.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainers.checkpoint import CheckpointManager

    t0 = time.perf_counter()
    out = Path(cfg.out_dir).resolve()
    cfg.out_dir = str(out)
    cfg.data_dir = str(Path(cfg.data_dir).resolve())
    out.mkdir(parents=True, exist_ok=True)
    iterations = int(cfg.train.get("iterations", 2000))
    costs = {n: _n_voxels(Path(cfg.data_dir) / f"{n}.h5") * iterations for n in cfg.regions}
    shares = assign_regions(costs, num_workers)
    parent = None
    if cfg.tracking:
        from registry.tracking import TrackedRun

        parent = TrackedRun(f"fleet/{cfg.model}", cfg.campaign, out / "_fleet", uri=cfg.tracking_uri,
                            params={"model": cfg.model, "n_regions": len(cfg.regions), "workers": num_workers,
                                    "train": cfg.train, "overrides": cfg.overrides, "bank_size": cfg.bank_size},
                            tags={"calozoo.fleet": "true", "calozoo.campaign": cfg.campaign})
        cfg.parent_run_id = parent.run_id
    (out / "fleet.json").write_text(json.dumps({"config": asdict(cfg), "shares": shares}, indent=1))

    address = address or os.environ.get("RAY_ADDRESS")  # set inside a Ray job
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": max(num_workers * threads_per_worker, os.cpu_count() or 1)}))
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"fleet": asdict(cfg), "shares": shares, "use_gpu": use_gpu, "threads": threads_per_worker},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=None if use_gpu else {"CPU": threads_per_worker}),
        run_config=RunConfig(name=f"fleet-{cfg.model}", storage_path=str(out / "_ray"),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    status = "FAILED"
    try:
        trainer.fit()
        status = "FINISHED"
    finally:
        regions = {}
        for n in cfg.regions:
            best = CheckpointManager(out / n / "checkpoints").best()
            regions[n] = best
        summary = {"shares": shares, "seconds": time.perf_counter() - t0, "regions": regions}
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if parent is not None:
            done = [b for b in regions.values() if b]
            parent.log_metrics({"regions_done": len(done), "seconds": summary["seconds"],
                                "mean_best_chi2_sum": (sum(b["metrics"]["chi2_sum"] for b in done) / len(done))
                                if done else float("nan")}, iterations)
            parent.log_artifact(out / "summary.json")
            parent.finish(status)
    return summary
