"""The training loop: one outer loop for every model and every number of models.

:func:`train_models` trains K ≥ 1 models as banks (``trainers.bank``: K > 1 models stacked, their
losses under ``vmap``, a bank of one's called directly; one step per kind of training, ``likelihood``
or ``adversarial``); :func:`train` is a bank of one. The outer loop samples batches, checkpoints every
``checkpoint_every`` iterations (the model's config, the transform spec, both optimisers, the
iteration and every RNG state: a killed run resumes exactly where it stopped), validates at each
checkpoint with FastCaloGAN's criterion on a held-out set, keeps at most ``keep_checkpoints`` files,
shows its progress (a bar on a terminal, plain lines in a log: ``showers.progress``), and can follow
FastCaloGAN's incremental schedule (start at the energy closest to 32 GeV, add one energy point every
``incremental_every`` iterations in the order 32, 64, 16, 128, 8, 256, ... GeV).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from showers.atomic import remove_stale, tmp_path
from showers.lock import writer_lock
from showers.progress import progress
from trainers.bank import Bank, bank_groups
from trainers.data import ShowerData, energy_points
from validate.metrics import checkpoint_metrics
from zoo.base import ShowerModel
from zoo.checkpoint import CheckpointManager, load_checkpoint

__all__ = ["PROGRESS_FILE", "TrainConfig", "TrainResult", "available_cpus", "checkpoint_state", "incremental_order",
           "read_progress", "resolve_device", "set_threads", "train", "train_models", "validate"]

#: ``RUN_DIR/progress.json``: the iteration a model's training has reached (``_Heartbeat``)
PROGRESS_FILE = "progress.json"


#: the largest values of TrainConfig's whole-number fields: a typo of a few zeros is refused at once,
#: not found out after hours (10^8 iterations are years of a CPU)
LIMITS = {"iterations": 100_000_000, "checkpoint_every": 100_000_000, "n_val_max": 10_000_000,
          "keep_checkpoints": 1000}


@dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's own hyper-parameters live in its config); refused, with the field
    and what is allowed, when a value makes no sense."""

    iterations: int = 2000
    checkpoint_every: int = 500
    keep_checkpoints: int = 5
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when present, else CPU
    bf16: bool = False  # bf16 autocast on CUDA
    incremental_every: int | None = None  # FastCaloGAN: add an energy point every M iterations
    n_val_max: int = 20000  # validation showers generated per checkpoint, at most
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form, logged with the run

    def __post_init__(self) -> None:
        for name in ("iterations", "checkpoint_every", "n_val_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
            if value > LIMITS[name]:
                raise ValueError(f"{name} must be at most {LIMITS[name]:,}, got {value:,}")
        if isinstance(self.keep_checkpoints, bool) or not isinstance(self.keep_checkpoints, int) \
                or not 2 <= self.keep_checkpoints <= LIMITS["keep_checkpoints"]:
            raise ValueError(f"keep_checkpoints must be from 2 (the best and the latest) to "
                             f"{LIMITS['keep_checkpoints']}, got {self.keep_checkpoints!r}")
        if self.incremental_every is not None and (isinstance(self.incremental_every, bool)
                                                   or not isinstance(self.incremental_every, int)
                                                   or not 1 <= self.incremental_every <= LIMITS["iterations"]):
            raise ValueError(f"incremental_every must be a whole number from 1 to {LIMITS['iterations']:,} or "
                             f"None, got {self.incremental_every!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be a whole number from 0 to {2**32 - 1}, got {self.seed!r}")
        resolve_device(self.device)  # refuses an unknown device, or CUDA where there is none


@dataclass
class TrainResult:
    iteration: int
    best: dict | None
    checkpoints: list[Path]
    history: list[dict]
    seconds: float


def incremental_order(points_mev) -> list[float]:
    """FastCaloGAN's order of energy points: closest to 32 GeV first, then alternately the next
    higher and the next lower point (32, 64, 16, 128, 8, 256, ... GeV)."""
    pts = sorted(float(p) for p in points_mev)
    i = int(np.argmin([abs(math.log(p / 32768.0)) for p in pts]))
    order, up, down = [pts[i]], i + 1, i - 1
    while up < len(pts) or down >= 0:
        if up < len(pts):
            order.append(pts[up])
            up += 1
        if down >= 0:
            order.append(pts[down])
            down -= 1
    return order


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, which a container or ``taskset`` limits)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(n: int | None = None) -> int:
    """Give torch ``n`` threads (default: as many as the CPUs this process may use, never more: on a
    loaded machine extra threads only wait for each other). Returns the number set."""
    cpus = available_cpus()
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"threads must be a whole number >= 1, got {n!r}")
    n = cpus if n is None else min(n, cpus)
    torch.set_num_threads(n)
    return n


def resolve_device(name: str) -> torch.device:
    """"auto" (CUDA when present, else the CPU), "cpu", "cuda", "cuda:1", ...; refuses what is not here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: this machine has no CUDA device (torch {torch.__version__}); "
                             "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device


@torch.no_grad()
def validate(model: ShowerModel, val: ShowerData, n_max: int = 20000, seed: int = 12345) -> tuple[dict, np.ndarray]:
    """Generate showers at the validation set's conditions and compare them with the validation showers
    (``validate.metrics.checkpoint_metrics``: FastCaloGAN's χ² of E_tot, the per-layer energies, centres
    and widths, and the criterion the checkpoints are ranked by)."""
    idx = np.arange(min(len(val), n_max))
    gen = torch.Generator(device=model.device).manual_seed(seed)
    geometry = None if val.geometry is None else list(val.geometry[idx])
    angle = None if val.angle is None else val.angle[idx]
    fake = model.sample(val.energy[idx], angle, geometry, generator=gen, ignore_unused=True).float().cpu().numpy()
    return checkpoint_metrics(fake, val.energy[idx], val.showers[idx], val.energy[idx], val.readout), fake


def train(model: ShowerModel, train_data: ShowerData, val_data: ShowerData, cfg: TrainConfig, out_dir,
          resume: bool = True, log: Callable[[dict, int], None] | None = None) -> TrainResult:
    """Train one model: :func:`train_models` with a bank of one (random streams seeded ``cfg.seed``).

    resume: continue from the latest checkpoint in ``out_dir`` if there is one (same batches, same
    noise: the losses after resuming equal those of an uninterrupted run).
    log: called as ``log(record, iteration)`` at each checkpoint (e.g. calozoo's MLflow logger).
    """
    each = None if log is None else (lambda i, record, iteration: log(record, iteration))
    return train_models([model], [train_data], [val_data], cfg, [out_dir], seeds=[cfg.seed], resume=resume,
                        log=each, names=[model.variant])[0]


def train_models(models: list[ShowerModel], train_data: list[ShowerData], val_data: list[ShowerData],
                 cfg: TrainConfig, run_dirs, *, rng: str = "per_model", seeds: list[int] | None = None,
                 resume: bool = True, log: Callable[[int, dict, int], None] | None = None,
                 names: list[str] | None = None) -> list[TrainResult]:
    """Train K ≥ 1 models, model i on ``train_data[i]`` into ``run_dirs[i]/checkpoints``.

    Models that can share a bank (``trainers.bank.bank_key``) train as one, the others as banks of
    their own, one after another. Each model keeps its own checkpoints in the single-model format
    (any of them rebuilds its model alone, and resumes under a bank of any size), its own validation
    metric and best epoch. Each resumes from its own latest checkpoint; a bank starts at the earliest
    of them (models that a crash in the middle of a save round left one checkpoint ahead wait: the
    others catch up first, as a bank of their own, and then all go on together).

    rng, seeds: ``trainers.bank.Bank``'s (default seeds: ``cfg.seed`` for every model).
    log: called as ``log(i, record, iteration)`` after each of model i's checkpoints.
    Returns one :class:`TrainResult` per model; the models hold the final weights. Each run folder is
    held with ``showers.lock.writer_lock`` throughout: a folder another process writes into is refused
    (:class:`~showers.lock.FolderBusyError`).
    """
    k = len(models)
    if not (k == len(train_data) == len(val_data) == len(run_dirs)):
        raise ValueError(f"one training set, validation set and folder per model: got {k} models, "
                         f"{len(train_data)}, {len(val_data)} and {len(run_dirs)}")
    for m, d in zip(models, train_data):
        if d.readout.n_voxels != m.n_voxels:
            raise ValueError(f"data have {d.readout.n_voxels} voxels per shower ({d.readout.name}), "
                             f"model {m.variant} expects {m.n_voxels}")
    names = list(names) if names is not None else [f"model{i}" for i in range(k)]
    seeds = list(seeds) if seeds is not None else [cfg.seed] * k
    with contextlib.ExitStack() as held:  # one writer per run folder, for the whole training (showers.lock)
        for d in run_dirs:
            held.enter_context(writer_lock(d))
        return _train_models(models, train_data, val_data, cfg, run_dirs, rng, seeds, resume, log, names)


def _train_models(models, train_data, val_data, cfg: TrainConfig, run_dirs, rng: str, seeds: list[int], resume: bool,
                  log, names: list[str]) -> list[TrainResult]:
    """:func:`train_models` once its run folders are locked."""
    k = len(models)
    groups = bank_groups(models)
    if len(groups) > 1:
        results: list = [None] * k
        for g in groups:
            sub_log = None if log is None else (lambda j, record, iteration, g=g: log(g[j], record, iteration))
            done = train_models([models[i] for i in g], [train_data[i] for i in g], [val_data[i] for i in g], cfg,
                                [run_dirs[i] for i in g], rng=rng, seeds=[seeds[i] for i in g], resume=resume,
                                log=sub_log, names=[names[i] for i in g])
            for i, r in zip(g, done):
                results[i] = r
        return results

    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    managers = [CheckpointManager(Path(d) / "checkpoints", keep=cfg.keep_checkpoints) for d in run_dirs]
    states: list[dict | None] = [None] * k
    for i, mgr in enumerate(managers):
        latest = mgr.latest() if resume else None
        if latest is not None:
            states[i] = load_checkpoint(latest, map_location="cpu")
            if states[i]["variant"] != models[i].variant:
                raise ValueError(f"{latest} holds a {states[i]['variant']} model, not {models[i].variant}")
    iters = [0 if s is None else int(s["iteration"]) for s in states]
    top = min(max(iters), cfg.iterations)
    behind = [i for i in range(k) if iters[i] < top]
    if behind and len(behind) < k:
        sub_log = None if log is None else (lambda j, record, iteration: log(behind[j], record, iteration))
        train_models([models[i] for i in behind], [train_data[i] for i in behind], [val_data[i] for i in behind],
                     dataclasses.replace(cfg, iterations=top), [run_dirs[i] for i in behind], rng=rng,
                     seeds=[seeds[i] for i in behind], resume=True, log=sub_log, names=[names[i] for i in behind])
        return train_models(models, train_data, val_data, cfg, run_dirs, rng=rng, seeds=seeds, resume=True, log=log,
                            names=names)

    for m, d in zip(models, train_data):
        m.fit_data(d.energy, d.showers)  # what a model keeps of its data (a resumed one reloads it below)
    bank = Bank(models, train_data, device, rng, seeds)
    start = iters[0]
    histories = [[] if s is None else list(s.get("history", [])) for s in states]
    if start > 0:
        bank.load(states)
    data_info = [{"train": t.describe(), "validation": v.describe()} for t, v in zip(train_data, val_data)]
    schedules = [incremental_order(energy_points(t.energy)) for t in train_data] if cfg.incremental_every else None

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")

    desc = names[0] if k == 1 else f"bank of {k} {models[0].variant}"
    bar = progress(cfg.iterations, desc, "it", initial=start, disable=not cfg.progress)
    shown: dict = {}
    beat = _Heartbeat([Path(d) for d in run_dirs], cfg.iterations)
    for it in range(start, cfg.iterations):
        if schedules is not None and (it == start or it % cfg.incremental_every == 0):
            bank.restrict([s[: min(1 + it // cfg.incremental_every, len(s))] for s in schedules])
        bank.anneal(it / cfg.iterations)
        losses = bank.step(autocast)
        done = it + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
            values = {name: v.float().cpu().numpy() for name, v in losses.items()}
            bad = [names[i] for i in range(k) if not all(math.isfinite(float(v[i])) for v in values.values())]
            if bad:
                raise FloatingPointError(f"non-finite loss at iteration {done} for {', '.join(bad)}: "
                                         f"{ {n: v.tolist() for n, v in values.items()} }")
            chi2 = []
            for i in range(k):
                model = bank.unstacked(i)
                model.eval()
                model.calibrate()  # generation-side tables some families fit to their own showers
                if bank.stacked:  # kept by the bank too: the models passed in end with them
                    bank.load_model_state(i, dict(model.named_buffers()))
                metrics, _ = validate(model, val_data[i], cfg.n_val_max)
                model.train()
                record = {"iteration": done, **{n: float(v[i]) for n, v in values.items()},
                          **{n: v for n, v in metrics.items() if n != "per_energy"}}
                histories[i].append(record)
                weights = {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
                state = checkpoint_state(model, weights, bank.optimiser_state(i), done, bank.rng_state(i),
                                         record, histories[i], cfg, data_info[i])
                managers[i].save(state, done, record)
                chi2.append(metrics["chi2_sum"])
                if log is not None:
                    log(i, record, done)
            shown["chi2"] = f"{float(np.mean(chi2)):.3g}"
        bar.update(1)
        beat(done)
        if done % 10 == 0 or done == cfg.iterations:
            shown.update({n: f"{float(v.float().mean()):.3g}" for n, v in list(losses.items())[:3]})
            bar.set_postfix(shown, refresh=False)
    bar.close()
    for i in range(k):
        bank.unstacked(i)
    seconds = time.perf_counter() - t0
    return [TrainResult(max(cfg.iterations, it), mgr.best(), mgr.files(), hist, seconds)
            for it, mgr, hist in zip(iters, managers, histories)]


class _Heartbeat:
    """``RUN_DIR/progress.json`` ({"iteration", "iterations", "time"}) of every model, written at most
    every ``every`` seconds and at the end: what a fleet's progress bar reads from its workers' shared
    storage between checkpoints (written whole, then renamed)."""

    def __init__(self, run_dirs: list[Path], iterations: int, every: float = 2.0):
        self.paths = [d / PROGRESS_FILE for d in run_dirs]
        for d in run_dirs:  # what a killed run's last write left
            remove_stale(d, PROGRESS_FILE)
        self.iterations, self.every, self.last = iterations, every, 0.0

    def __call__(self, done: int) -> None:
        now = time.time()
        if now - self.last < self.every and done < self.iterations:
            return
        self.last = now
        text = json.dumps({"iteration": done, "iterations": self.iterations, "time": now})
        for path in self.paths:
            tmp = tmp_path(path, unique=False)
            try:
                tmp.write_text(text)
                os.replace(tmp, path)
            except OSError:  # progress is a courtesy: never stop training for it
                pass


def read_progress(run_dir) -> int:
    """The last iteration ``RUN_DIR/progress.json`` reports (0 when it is not there yet)."""
    try:
        return int(json.loads((Path(run_dir) / PROGRESS_FILE).read_text())["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def checkpoint_state(model: ShowerModel, model_state: dict, optimiser: dict, iteration: int, rng: dict, record: dict,
                     history: list, cfg: TrainConfig, data_info: dict) -> dict:
    """A checkpoint: everything to rebuild the model alone and to resume its training exactly."""
    return {"family": model.family, "variant": model.variant, "config": model.config.to_dict(),
            "model": model_state, "optimiser": optimiser, "iteration": int(iteration), "rng": rng,
            "metrics": {k: float(v) for k, v in record.items()}, "history": history,
            "train_config": _jsonable(asdict(cfg)), "data": data_info}


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in d.items()}
