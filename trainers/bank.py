"""Banks: K models of one family trained in lockstep, built from the family's own ``nn.Module``.

A bank stacks the parameters and buffers of K instances of a zoo model along a leading axis
(``torch.func.stack_module_state``) and evaluates the family's own losses for all K at once with
``torch.func.vmap`` over ``torch.func.functional_call``, PyTorch's model-ensembling recipe: every
layer of the K models runs as one batched operation, the losses are summed over the models (which
keeps each model's gradients its own), and one ``torch.optim.Adam`` over the stacked tensors is K
independent Adams, Adam being elementwise. Nothing here knows a family: a model trains as a bank by
being a ``ShowerModel`` whose losses are pure functions of (weights, buffers, batch), its random
numbers coming in the batch (``ShowerModel.training_noise``); see ``zoo.base`` for what that rules
out.

A single model is a bank of one (``trainers.loop``), and a bank of one stacks nothing: it trains the
model's own parameters with a ``torch.optim.Adam`` over them and calls the model's methods directly
(vmap over one model would run every layer as a batched product of one, slower kernels than the
plain ones, for nothing). Its batches and outputs keep the bank's leading axis (of length 1, as
views), so the steps, the loop, the checkpoints' layout and the random streams are those of any K,
and it trains bit for bit as a loop written by hand over the same batches and noise.

Which models share a bank (:func:`bank_key`): one family, one config but for the readout, and the
same shape of every parameter and buffer (so the same voxel count and grid). Regions of different
voxel counts go to different banks instead of being padded: padding would make every family mask
its padded voxels (its losses, its critic's inputs, its normalisations), and the 300 regions of the
``atlas-like`` detector have only 7 voxel counts (92 to 693 voxels), so grouping costs 7 banks.

Random numbers: ``rng="per_model"`` draws model i's batches and noise from its own generators
(seeded ``seeds[i]``) in the order a bank of one does, so a bank of K reproduces K trainings one by
one (to the rounding of batched products); ``rng="bank"`` draws all K models' at once from one
generator on the device, which is what a GPU wants (each model still samples its own data).

Optimiser state: ``torch.optim.Adam`` keeps one step count per tensor, so the models of a bank share
theirs. Per-model counts are not needed: a bank's models always share their iteration (the loop
brings models that a crash left behind up to the others first). Per-model learning rates are not
needed either: a bank's models share their config.
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from trainers.data import ShowerData
from zoo.base import LR_SCHEDULES, ShowerModel

__all__ = ["Bank", "bank_groups", "bank_key"]


def lr_factor(schedule: str, progress: float) -> float:
    """The factor on a model's ``learning_rate`` at a fraction ``progress`` of the run under its
    ``lr_schedule`` (``zoo.base.LR_SCHEDULES``): a function of the iteration alone, so a resumed run
    takes the same steps as an uninterrupted one."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    if schedule == "constant":
        return 1.0
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


def bank_key(model: ShowerModel) -> tuple:
    """Models with equal keys can share a bank (module docstring)."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "readout"}
    shapes = tuple((name, tuple(t.shape), t.dtype) for name, t in
                   [*model.named_parameters(), *model.named_buffers()])
    return model.family, repr(sorted(config.items())), shapes


def bank_groups(models: list[ShowerModel]) -> list[list[int]]:
    """Indices of ``models`` grouped by :func:`bank_key`, in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(models):
        groups.setdefault(bank_key(m), []).append(i)
    return list(groups.values())


class _Method(nn.Module):
    """``forward`` calls one method of the wrapped model, so that ``functional_call`` can call it."""

    def __init__(self, model: ShowerModel, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, batch: dict) -> dict:
        return getattr(self.model, self.method)(batch)


class _Adam:
    """One ``torch.optim.Adam`` over stacked tensors, read and written per model in the layout of a
    single model's Adam (``state_dict``), which is what a checkpoint holds."""

    def __init__(self, bank: Bank, names: list[str], lr: float, betas=(0.9, 0.999)):
        self.bank, self.names, self.base_lr = bank, names, lr
        fused = True if bank.device.type == "cuda" else None
        self.opt = torch.optim.Adam([bank.params[n] for n in names], lr=lr, betas=betas, fused=fused)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def scale_lr(self, factor: float) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.base_lr * factor

    def step(self) -> None:
        self.opt.step()

    def state(self, i: int) -> dict:
        sd = self.opt.state_dict()
        state = {j: {k: (self.bank._row(v, i) if k != "step" else v).detach().cpu().clone() for k, v in st.items()}
                 for j, st in sd["state"].items()}
        return {"state": state, "param_groups": copy.deepcopy(sd["param_groups"])}

    def load(self, states: list[dict]) -> None:
        """Every model's saved state (single-model layout), stacked into this optimiser."""
        sd = self.opt.state_dict()
        stacked = {}
        for j in range(len(self.names)):
            per = [s["state"].get(j, s["state"].get(str(j))) for s in states]
            if all(p is None for p in per):
                continue
            if any(p is None for p in per) or len({float(p["step"]) for p in per}) != 1:
                raise ValueError("the models of a bank must resume from the same optimiser step "
                                 f"({[None if p is None else float(p['step']) for p in per]})")
            stacked[j] = {"step": per[0]["step"].clone(),
                          **{k: torch.stack([p[k] for p in per]) if self.bank.stacked else per[0][k].clone()
                             for k in per[0] if k != "step"}}
        sd["state"] = stacked
        self.opt.load_state_dict(sd)


class Bank:
    """K models of one family (one :func:`bank_key`) and their training data, stacked on ``device``.

    models: the K models (their weights are the bank's starting point; :meth:`unstacked` writes the
    bank's weights back into them). data: each model's training showers. seeds: each model's random
    streams (``rng="per_model"``) or the bank's (its first, ``rng="bank"``).
    """

    def __init__(self, models: list[ShowerModel], data: list[ShowerData], device="cpu", rng: str = "per_model",
                 seeds: list[int] | None = None):
        if not models or len(models) != len(data):
            raise ValueError(f"a bank needs one data set per model, got {len(models)} models and {len(data)} data sets")
        if len({bank_key(m) for m in models}) != 1:
            raise ValueError("the models of a bank must share family, config (but for the readout) and shapes; "
                             "group them with trainers.bank.bank_groups")
        if rng not in ("per_model", "bank"):
            raise ValueError(f"rng must be 'per_model' or 'bank', got {rng!r}")
        if models[0].kind not in _STEPS:
            raise ValueError(f"model kind {models[0].kind!r} has no training step; known: {', '.join(_STEPS)}")
        self.device = torch.device(device)
        self.models = [m.to(self.device).train() for m in models]
        self.k, self.rng = len(models), rng
        self.batch_size = int(getattr(models[0].config, "batch_size", 128))
        # params, buffers: the bank's tensors by name, model i's at [i] when stacked; a bank of one's
        # are its model's own (module docstring)
        self.stacked = self.k > 1
        self._calls = {}
        if self.stacked:
            params, buffers = stack_module_state(self.models)
            self.params = {n: p.detach().requires_grad_() for n, p in params.items()}
            self.buffers = {n: b.detach() for n, b in buffers.items()}
            # the functional template: its own tensors live on the meta device and are never used
            template = copy.deepcopy(models[0]).to("meta")
            for method in ("losses", "critic_loss", "generator_loss"):
                wrapped = _Method(template, method)
                self._calls[method] = vmap(self._functional(wrapped), randomness="error")
        else:
            self.params = dict(self.models[0].named_parameters())
            self.buffers = dict(self.models[0].named_buffers())
        seeds = list(seeds) if seeds is not None else list(range(self.k))
        self.batch_gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.noise_gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.bank_gen = torch.Generator(device=self.device).manual_seed(int(seeds[0]))
        self._load_data(data)
        self.step_fn = _STEPS[models[0].kind](self)

    def _functional(self, wrapped: _Method) -> Callable:
        def call(params: dict, buffers: dict, batch: dict) -> dict:
            tensors = {f"model.{n}": t for n, t in params.items()}
            tensors.update({f"model.{n}": t for n, t in buffers.items()})
            return functional_call(wrapped, tensors, (batch,))

        return call

    def _row(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """Model ``i``'s part of one of the bank's tensors (a bank of one's tensor is its model's)."""
        return t[i] if self.stacked else t

    def _stack(self, ts: list[torch.Tensor]) -> torch.Tensor:
        """The models' tensors along a leading axis (a view for a bank of one, never a copy)."""
        return torch.stack(ts) if self.stacked else ts[0].unsqueeze(0)

    # -- data -----------------------------------------------------------------------------------
    def _load_data(self, data: list[ShowerData]) -> None:
        """All models' training showers in one flat tensor on the device, with each model's rows."""
        showers, energy, conditions, self.offsets, self.energy_np = [], [], [], [], []
        start = 0
        for m, d in zip(self.models, data):
            if d.readout.n_voxels != m.n_voxels:
                raise ValueError(f"{d.source}: {d.readout.n_voxels} voxels per shower ({d.readout.name}), "
                                 f"its model {m.variant} expects {m.n_voxels}")
            geometry = None if d.geometry is None else list(d.geometry)
            conditions.append(m.encode_conditions(d.energy, d.angle, geometry, ignore_unused=True).cpu())
            showers.append(torch.as_tensor(np.asarray(d.showers), dtype=torch.float32))
            energy.append(torch.as_tensor(np.asarray(d.energy), dtype=torch.float32))
            self.offsets.append(start)
            self.energy_np.append(np.asarray(d.energy))
            start += len(d)
        self.showers = torch.cat(showers).to(self.device)
        self.energy = torch.cat(energy).to(self.device)
        self.conditions = torch.cat(conditions).to(self.device)
        self.active = [torch.arange(len(e)) + o for e, o in zip(self.energy_np, self.offsets)]
        self._active_table()

    def _active_table(self) -> None:
        longest = max(len(a) for a in self.active)
        table = torch.zeros(self.k, longest, dtype=torch.long)
        for i, a in enumerate(self.active):
            table[i, : len(a)] = a
        self.table = table.to(self.device)
        self.n_active = torch.tensor([len(a) for a in self.active], device=self.device, dtype=torch.float32)

    def restrict(self, energies_per_model: list) -> None:
        """Sample only these incident energies (FastCaloGAN's incremental schedule), per model."""
        self.active = []
        for i, e in enumerate(energies_per_model):
            idx = np.flatnonzero(np.isin(self.energy_np[i], np.asarray(list(e))))
            self.active.append(torch.as_tensor(idx, dtype=torch.long) + self.offsets[i])
        self._active_table()

    def _indices(self) -> torch.Tensor:
        """(K, B) rows of the flat data, each model from its own active set."""
        b = self.batch_size
        if self.rng == "per_model":
            rows = [a[torch.randint(len(a), (b,), generator=g)] for a, g in zip(self.active, self.batch_gens)]
            return self._stack(rows).to(self.device)
        u = torch.rand(self.k, b, generator=self.bank_gen, device=self.device)
        pick = (u * self.n_active[:, None]).long().clamp_max_(self.table.shape[1] - 1)
        return torch.gather(self.table, 1, pick)

    def batch(self, step: str) -> dict[str, torch.Tensor]:
        """A fresh batch for every model, (K, B, ...), with the noise ``step``'s loss reads."""
        idx = self._indices()
        out = {"showers": self.showers[idx], "energy": self.energy[idx], "conditions": self.conditions[idx]}
        model = self.models[0]
        if self.rng == "per_model":
            per = [model.draw_training_noise(step, self.batch_size, g, device="cpu") for g in self.noise_gens]
            out.update({n: self._stack([p[n] for p in per]).to(self.device) for n in per[0]})
        else:
            for name, (shape, kind) in model.training_noise(step, self.batch_size).items():
                draw = torch.randn if kind == "normal" else torch.rand
                out[name] = draw(self.k, *shape, generator=self.bank_gen, device=self.device)
        return out

    # -- computing --------------------------------------------------------------------------------
    def evaluate(self, method: str, batch: dict) -> dict[str, torch.Tensor]:
        """``models[i].method(batch[i])`` for every model at once: a dict of (K,) tensors."""
        if self.stacked:
            return self._calls[method](self.params, self.buffers, batch)
        out = getattr(self.models[0], method)({n: t[0] for n, t in batch.items()})
        return {n: t.unsqueeze(0) for n, t in out.items()}

    def anneal(self, progress: float) -> None:
        """Set the learning rates for a fraction ``progress`` of the run (the models' ``lr_schedule``)."""
        factor = lr_factor(_hp(self.models[0], "lr_schedule", "constant"), progress)
        for opt in self.step_fn.optimisers.values():
            opt.scale_lr(factor)

    def step(self, autocast) -> dict[str, torch.Tensor]:
        """One training iteration of all K models; returns each model's losses, (K,) tensors."""
        return self.step_fn(autocast)

    # -- one model at a time ------------------------------------------------------------------------
    def model_state(self, i: int) -> dict:
        """Model ``i``'s state dict in its own (single-model) layout, on the CPU."""
        keys = self.models[i].state_dict().keys()
        tensors = {**self.params, **self.buffers}
        return {k: self._row(tensors[k], i).detach().cpu().clone() for k in keys}

    def unstacked(self, i: int) -> ShowerModel:
        """Model ``i`` with the bank's current weights (the model passed in, updated in place; a bank
        of one trains it in place)."""
        m = self.models[i]
        if self.stacked:
            m.load_state_dict(self.model_state(i))
        return m

    def optimiser_state(self, i: int) -> dict:
        """Model i's optimisers as single-model ``torch.optim.Adam`` state dicts, by label."""
        return {label: opt.state(i) for label, opt in self.step_fn.optimisers.items()}

    def rng_state(self, i: int) -> dict:
        if self.rng == "per_model":
            return {"noise": self.noise_gens[i].get_state(), "batches": self.batch_gens[i].get_state()}
        return {"bank": self.bank_gen.get_state()}

    def load(self, states: list[dict]) -> None:
        """Resume every model from its checkpoint dict (``trainers.loop.checkpoint_state``): weights,
        buffers, optimisers and random streams."""
        with torch.no_grad():
            for i, state in enumerate(states):
                for name, value in state["model"].items():
                    target = self.params.get(name, self.buffers.get(name))
                    if target is None:
                        raise ValueError(f"checkpoint of model {i} has {name!r}, which the model does not")
                    self._row(target, i).copy_(value.to(target.device, target.dtype))
        for label, opt in self.step_fn.optimisers.items():
            opt.load([s["optimiser"][label] for s in states])
        for i, state in enumerate(states):
            rng = state["rng"]
            if self.rng == "per_model" and "noise" in rng:
                self.noise_gens[i].set_state(rng["noise"])
                self.batch_gens[i].set_state(rng["batches"])
            elif self.rng == "bank" and "bank" in rng:
                self.bank_gen.set_state(rng["bank"].to(self.bank_gen.get_state().device))

    def reset_optimisers(self) -> None:
        """Fresh optimisers (Reptile starts each visit of a task with a new Adam)."""
        self.step_fn = _STEPS[self.models[0].kind](self)

    def load_model_state(self, i: int, sd: dict) -> None:
        """Put weights and buffers (a single model's state dict) into model ``i``'s slice."""
        with torch.no_grad():
            for name, value in sd.items():
                target = self.params.get(name, self.buffers.get(name))
                if target is not None:
                    self._row(target, i).copy_(value.to(target.device, target.dtype))


def _hp(model: ShowerModel, name: str, default):
    return getattr(model.config, name, default)


def _descend(bank: Bank, opt: _Adam, step: str, method: str, autocast) -> dict[str, torch.Tensor]:
    """One optimiser step of every model on ``method``'s loss for a fresh batch of ``step``; returns
    the losses, detached, (K,) each."""
    batch = bank.batch(step)
    with autocast():
        out = bank.evaluate(method, batch)
    opt.zero_grad()
    out["loss"].sum().backward()  # the sum keeps each model's gradients its own
    opt.step()
    return {k: v.detach() for k, v in out.items()}


class _LikelihoodStep:
    """One Adam step on ``losses(batch)["loss"]`` (VAE, AR, flows)."""

    def __init__(self, bank: Bank):
        self.bank = bank
        m = bank.models[0]
        self.opt = _Adam(bank, [n for n, _ in m.named_parameters()], _hp(m, "learning_rate", 1e-3))
        self.optimisers = {"opt": self.opt}

    def __call__(self, autocast) -> dict[str, torch.Tensor]:
        return _descend(self.bank, self.opt, "loss", "losses", autocast)


class _AdversarialStep:
    """``n_critic`` critic steps on ``critic_loss`` (each on a fresh batch), then one generator step
    on ``generator_loss``, with two Adams (WGAN-GP)."""

    def __init__(self, bank: Bank):
        self.bank = bank
        m = bank.models[0]
        lr, betas = _hp(m, "learning_rate", 1e-4), (_hp(m, "beta1", 0.5), _hp(m, "beta2", 0.999))
        self.n_critic = int(_hp(m, "n_critic", 5))
        names = {id(p): n for n, p in m.named_parameters()}
        self.opt_c = _Adam(bank, [names[id(p)] for p in m.critic_parameters()], lr, betas)
        self.opt_g = _Adam(bank, [names[id(p)] for p in m.generator_parameters()], lr, betas)
        self.optimisers = {"opt_c": self.opt_c, "opt_g": self.opt_g}

    def __call__(self, autocast) -> dict[str, torch.Tensor]:
        for _ in range(self.n_critic):
            c = _descend(self.bank, self.opt_c, "critic", "critic_loss", autocast)
        g = _descend(self.bank, self.opt_g, "generator", "generator_loss", autocast)
        return {**{f"critic_{k}": v for k, v in c.items()}, **{f"generator_{k}": v for k, v in g.items()}}


_STEPS = {"likelihood": _LikelihoodStep, "adversarial": _AdversarialStep}
