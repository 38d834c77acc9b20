"""Reptile meta-learning (Nichol, Achiam & Schulman 2018), as MetaHEP used it for calorimeter showers.

Meta-training looks for an initialisation from which a few hundred steps fit any task (a detector
region, a geometry, a material): repeatedly pick a task, train a copy of the model on it for
``inner_steps`` with the ordinary training step (a bank of one, ``trainers.bank``; a fresh Adam each visit), and move
the meta-parameters a fraction ``epsilon`` of the way towards the result,
θ ← θ + ε (θ_task − θ), with ε annealed linearly from ``meta_lr`` to 0. Buffers (batch-norm statistics)
are interpolated the same way.

Then :func:`steps_to_target` adapts (or trains from scratch) on a task left out of meta-training and
counts the steps until the validation loss reaches a target, which is how the meta-initialisation is
judged (``benchmarks/meta_adaptation.py``). A meta-adapted fleet starts every region from the
meta-initialisation (``calozoo fleet --init``, :func:`load_compatible`) and trains it as usual.

Reptile needs a single loss to descend: it is for likelihood models (the VAE, the AR model).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
import torch

from showers.calibrate import core_bins
from showers.observables import longitudinal_profile
from showers.progress import track
from trainers.bank import Bank
from trainers.data import ShowerData
from zoo.base import ShowerModel

__all__ = ["ReptileConfig", "load_compatible", "meta_train", "profile_difference", "steps_to_target",
           "validation_loss"]


@dataclass
class ReptileConfig:
    meta_iterations: int = 300
    inner_steps: int = 16
    meta_lr: float = 1.0  # ε at the start, annealed linearly to 0
    anneal: bool = True
    seed: int = 0
    progress: bool = True


def _check(model: ShowerModel) -> None:
    if model.kind != "likelihood":
        raise ValueError(f"Reptile trains likelihood models (VAE, AR); {model.variant} is {model.kind}")


def meta_train(model: ShowerModel, tasks: dict[str, ShowerData], cfg: ReptileConfig, device="cpu") -> list[dict]:
    """Meta-train ``model`` in place over ``tasks`` (name → training showers); returns a history of
    (meta-iteration, task, inner loss)."""
    _check(model)
    device = torch.device(device)
    model.to(device).train()
    rng = np.random.default_rng(cfg.seed)
    names = sorted(tasks)
    # one bank of one per task (its data on the device, its batch stream), loaded with θ at each visit
    banks = {n: Bank([model], [tasks[n]], device, seeds=[cfg.seed + i]) for i, n in enumerate(names)}
    history = []
    for it in track(range(cfg.meta_iterations), desc="reptile", disable=not cfg.progress):
        name = names[rng.integers(len(names))]
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        bank = banks[name]
        bank.load_model_state(0, before)
        bank.reset_optimisers()
        for _ in range(cfg.inner_steps):
            out = bank.step(contextlib.nullcontext)
        eps = cfg.meta_lr * (1 - it / cfg.meta_iterations) if cfg.anneal else cfg.meta_lr
        after = bank.model_state(0)
        with torch.no_grad():
            new = {k: (before[k] + eps * (after[k].to(before[k].device) - before[k]))
                   if before[k].is_floating_point() else after[k] for k in before}
        model.load_state_dict(new)
        history.append({"meta_iteration": it + 1, "task": name, "loss": float(out["loss"][0]), "epsilon": eps})
    return history


@torch.no_grad()
def validation_loss(model: ShowerModel, val: ShowerData, seed: int = 1234, n_max: int = 2000) -> float:
    """The model's mean loss on (up to ``n_max``) validation showers, in eval mode, with fixed noise."""
    was = model.training
    model.eval()
    state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        idx = np.arange(min(len(val), n_max))
        geometry = None if val.geometry is None else list(val.geometry[idx])
        cond = model.encode_conditions(val.energy[idx], None if val.angle is None else val.angle[idx], geometry,
                                       ignore_unused=True)
        batch = {"showers": torch.as_tensor(val.showers[idx], device=model.device),
                 "energy": torch.as_tensor(val.energy[idx], dtype=torch.float32, device=model.device),
                 "conditions": cond,
                 **model.draw_training_noise("loss", len(idx), torch.Generator(model.device).manual_seed(seed))}
        return float(model.losses(batch)["loss"])
    finally:
        torch.set_rng_state(state)
        model.train(was)


@torch.no_grad()
def profile_difference(model: ShowerModel, val: ShowerData, fraction: float = 0.9, n_max: int = 2000) -> float:
    """The largest relative difference, over the layers holding ``fraction`` of the energy, between the
    mean longitudinal profile of the model's showers and of ``val``'s, worst over the incident energies
    (a physics figure that tells materials apart, where the VAE's loss is dominated by empty voxels)."""
    idx = np.arange(min(len(val), n_max))
    gen = torch.Generator(device=model.device).manual_seed(4321)
    fake = model.sample(val.energy[idx], None if val.angle is None else val.angle[idx], generator=gen,
                        ignore_unused=True).float().cpu().numpy()
    worst = 0.0
    for e in np.unique(val.energy[idx]):
        sel = val.energy[idx] == e
        ref = longitudinal_profile(val.showers[idx][sel], val.readout)
        got = longitudinal_profile(fake[sel], val.readout)
        core = core_bins(ref, fraction)
        worst = max(worst, float(np.max(np.abs(got[core] - ref[core]) / ref[core])))
    return worst


def steps_to_target(model: ShowerModel, train: ShowerData, val: ShowerData, target: float, max_steps: int,
                    eval_every: int = 25, seed: int = 0, metric=None) -> dict:
    """Train ``model`` on ``train`` until ``metric(model, val)`` (default: the validation loss) is
    ≤ ``target`` (or ``max_steps``).

    Returns {"steps": steps taken, None if the target was not reached; "seconds"; "curve": [(step,
    validation loss)]}.
    """
    _check(model)
    model.fit_data(train.energy, train.showers)  # the new task's statistics, if the model keeps any
    model.train()
    bank = Bank([model], [train], model.device, seeds=[seed])
    metric = metric or validation_loss
    curve = [(0, metric(model, val))]
    t0 = time.perf_counter()
    reached = 0 if curve[0][1] <= target else None
    s = 0
    while reached is None and s < max_steps:
        for _ in range(eval_every):
            bank.step(contextlib.nullcontext)
        s += eval_every
        curve.append((s, metric(bank.unstacked(0), val)))
        if curve[-1][1] <= target:
            reached = s
    return {"steps": reached, "seconds": time.perf_counter() - t0, "curve": curve}


def load_compatible(model: ShowerModel, state: dict) -> tuple[list[str], list[str]]:
    """Load every tensor of ``state`` whose name and shape match ``model``'s (a meta-initialisation
    learnt on one readout transfers its voxel-independent layers to another); returns (loaded, skipped)."""
    own = model.state_dict()
    take = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict({**own, **take})
    return sorted(take), sorted(set(own) - set(take))
