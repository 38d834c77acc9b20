"""The single-model trainer: one outer loop for every model, one *step* per kind of training.

- ``likelihood`` models (VAE, AR, flows): one optimiser step on ``losses(batch)["loss"]``;
- ``adversarial`` models (the GAN): ``n_critic`` critic steps on ``critic_loss`` (each on a fresh
  batch) then one generator step on ``generator_loss``, two Adam optimisers.

The outer loop samples batches, checkpoints every ``checkpoint_every`` iterations (the model's
config, the transform spec, both optimisers, the iteration and every RNG state: a killed run resumes
exactly where it stopped), validates at each checkpoint with FastCaloGAN's criterion on a held-out
set, keeps at most ``keep_checkpoints`` files, shows a progress bar, and can follow FastCaloGAN's
incremental schedule (start at the energy closest to 32 GeV, add one energy point every
``incremental_every`` iterations in the order 32, 64, 16, 128, 8, 256, ... GeV).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from trainers.checkpoint import CheckpointManager, load_checkpoint
from trainers.data import ShowerData, energy_points
from trainers.metrics import etot_chi2
from zoo.base import ShowerModel

__all__ = ["TrainConfig", "TrainResult", "checkpoint_state", "incremental_order", "train", "validate"]


@dataclass
class TrainConfig:
    """How to train (the model's own hyper-parameters live in its config)."""

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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _hp(model: ShowerModel, name: str, default):
    return getattr(model.config, name, default)


class _LikelihoodStep:
    def __init__(self, model):
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=_hp(model, "learning_rate", 1e-3))

    def __call__(self, next_batch, autocast) -> dict:
        with autocast():
            out = self.model.losses(next_batch())
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        self.opt.step()
        return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}

    def state(self) -> dict:
        return {"opt": self.opt.state_dict()}

    def load(self, state: dict) -> None:
        self.opt.load_state_dict(state["opt"])


class _AdversarialStep:
    def __init__(self, model):
        self.model = model
        lr, b1, b2 = _hp(model, "learning_rate", 1e-4), _hp(model, "beta1", 0.5), _hp(model, "beta2", 0.999)
        self.n_critic = int(_hp(model, "n_critic", 5))
        self.opt_c = torch.optim.Adam(model.critic_parameters(), lr=lr, betas=(b1, b2))
        self.opt_g = torch.optim.Adam(model.generator_parameters(), lr=lr, betas=(b1, b2))

    def __call__(self, next_batch, autocast) -> dict:
        for _ in range(self.n_critic):
            with autocast():
                c = self.model.critic_loss(next_batch())
            self.opt_c.zero_grad(set_to_none=True)
            c["loss"].backward()
            self.opt_c.step()
        with autocast():
            g = self.model.generator_loss(next_batch())
        self.opt_g.zero_grad(set_to_none=True)
        g["loss"].backward()
        self.opt_g.step()
        out = {f"critic_{k}": float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in c.items()}
        out.update({f"generator_{k}": float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in g.items()})
        return out

    def state(self) -> dict:
        return {"opt_c": self.opt_c.state_dict(), "opt_g": self.opt_g.state_dict()}

    def load(self, state: dict) -> None:
        self.opt_c.load_state_dict(state["opt_c"])
        self.opt_g.load_state_dict(state["opt_g"])


_STEPS = {"likelihood": _LikelihoodStep, "adversarial": _AdversarialStep}


class _Batches:
    """Random batches of the training showers (on the device), from the active energy points."""

    def __init__(self, model, data: ShowerData, batch_size: int, device, generator: torch.Generator):
        self.batch_size, self.gen = batch_size, generator
        self.showers = torch.as_tensor(data.showers, dtype=torch.float32, device=device)
        self.energy = torch.as_tensor(data.energy, dtype=torch.float32, device=device)
        geometry = None if data.geometry is None else list(data.geometry)
        self.conditions = model.encode_conditions(data.energy, data.angle, geometry, ignore_unused=True).to(device)
        self.energy_np = data.energy
        self.active = torch.arange(len(data), device=device)

    def restrict(self, energies) -> None:
        mask = np.isin(self.energy_np, np.asarray(list(energies)))
        self.active = torch.as_tensor(np.flatnonzero(mask), device=self.showers.device)

    def __call__(self) -> dict:
        pick = torch.randint(len(self.active), (self.batch_size,), generator=self.gen)
        idx = self.active[pick.to(self.active.device)]
        return {"showers": self.showers[idx], "energy": self.energy[idx], "conditions": self.conditions[idx]}


def _rng_state(gen: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "batches": gen.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["batches"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def validate(model: ShowerModel, val: ShowerData, n_max: int = 20000, seed: int = 12345) -> tuple[dict, np.ndarray]:
    """Generate showers at the validation set's conditions and compare (FastCaloGAN's χ² sum)."""
    idx = np.arange(min(len(val), n_max))
    gen = torch.Generator(device=model.device).manual_seed(seed)
    geometry = None if val.geometry is None else list(val.geometry[idx])
    angle = None if val.angle is None else val.angle[idx]
    fake = model.sample(val.energy[idx], angle, geometry, generator=gen, ignore_unused=True).float().cpu().numpy()
    return etot_chi2(fake, val.energy[idx], val.showers[idx], val.energy[idx]), fake


def train(model: ShowerModel, train_data: ShowerData, val_data: ShowerData, cfg: TrainConfig, out_dir,
          resume: bool = True, log: Callable[[dict, int], None] | None = None) -> TrainResult:
    """Train ``model`` on ``train_data``, validating on ``val_data``, checkpoints in ``out_dir``.

    resume: continue from the latest checkpoint in ``out_dir`` if there is one (same seed, same
    batches, same noise: the losses after resuming equal those of an uninterrupted run).
    log: called as ``log(metrics, iteration)`` at each checkpoint (the registry's MLflow logger).
    """
    t0 = time.perf_counter()
    if model.kind not in _STEPS:
        raise ValueError(f"model kind {model.kind!r} has no training loop; known: {', '.join(_STEPS)}")
    if train_data.readout.n_voxels != model.n_voxels:
        raise ValueError(f"data have {train_data.readout.n_voxels} voxels per shower ({train_data.readout.name}), "
                         f"model {model.variant} expects {model.n_voxels}")
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.fit_data(train_data.energy, train_data.showers)  # a resumed run reloads the same from its checkpoint
    model.to(device).train()
    step = _STEPS[model.kind](model)
    gen = torch.Generator().manual_seed(cfg.seed)
    batches = _Batches(model, train_data, int(_hp(model, "batch_size", 128)), device, gen)
    ckpts = CheckpointManager(Path(out_dir) / "checkpoints", keep=cfg.keep_checkpoints)
    start, history = 0, []

    latest = ckpts.latest() if resume else None
    if latest is not None:
        state = load_checkpoint(latest, map_location=device)
        if state["variant"] != model.variant:
            raise ValueError(f"{latest} holds a {state['variant']} model, not {model.variant}")
        model.load_state_dict(state["model"])
        step.load(state["optimiser"])
        _set_rng_state(state["rng"], gen)
        start, history = int(state["iteration"]), list(state.get("history", []))

    data_info = {"train": train_data.describe(), "validation": val_data.describe()}
    schedule = incremental_order(energy_points(train_data.energy)) if cfg.incremental_every else None

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.iterations, initial=start, desc=model.variant, unit="it", disable=not cfg.progress)
    last_metric = None
    losses = {}
    for it in range(start, cfg.iterations):
        if schedule is not None:
            n_active = min(1 + it // cfg.incremental_every, len(schedule))
            if it == start or it % cfg.incremental_every == 0:
                batches.restrict(schedule[:n_active])
        losses = step(batches, autocast)
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(f"{model.variant}: non-finite loss at iteration {it + 1}: {losses}")
        done = it + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
            model.eval()
            metrics, _ = validate(model, val_data, cfg.n_val_max)
            model.train()
            record = {"iteration": done, **losses, **{k: v for k, v in metrics.items() if k != "per_energy"}}
            history.append(record)
            state = checkpoint_state(model, model.state_dict(), step.state(), done, _rng_state(gen), record,
                                     history, cfg, data_info)
            ckpts.save(state, done, record)
            last_metric = metrics["chi2_sum"]
            if log is not None:
                log(record, done)
        bar.update(1)
        if done % 10 == 0 or done == cfg.iterations:
            shown = {k: f"{v:.3g}" for k, v in list(losses.items())[:3]}
            if last_metric is not None:
                shown["chi2"] = f"{last_metric:.3g}"
            bar.set_postfix(shown, refresh=False)
    bar.close()
    return TrainResult(max(cfg.iterations, start), ckpts.best(), ckpts.files(), history, time.perf_counter() - t0)


def checkpoint_state(model: ShowerModel, model_state: dict, optimiser: dict, iteration: int, rng: dict, record: dict,
                     history: list, cfg: TrainConfig, data_info: dict) -> dict:
    """A checkpoint: everything to rebuild the model alone and to resume its training exactly."""
    return {"family": model.family, "variant": model.variant, "config": model.config.to_dict(),
            "model": model_state, "optimiser": optimiser, "iteration": int(iteration), "rng": rng,
            "metrics": {k: float(v) for k, v in record.items()}, "history": history,
            "train_config": _jsonable(asdict(cfg)), "data": data_info}


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in d.items()}
