"""Banks: K same-family models for K regions trained in lockstep on one device.

A plain training loop of one FastCaloGAN-size model is bound by kernel launches, not arithmetic. A
bank stacks the weights of K models along a leading axis and runs every layer of all K as one
batched matrix product (``torch.baddbmm``); the losses are summed over the models, which keeps each
model's gradients its own, and :class:`BankAdam` (Adam, elementwise, with a step count per model) is
K independent Adams. A bank is only a way of computing: each model keeps its own data stream, its
own validation metric, its own checkpoints (in the single-model trainer's format, so that any of
them rebuilds its model alone, or resumes under ``trainers.loop.train``) and its own best epoch.

Regions whose voxel counts differ share a bank by padding to the bank's largest N: padded voxels of
the real showers are zero, the generator's or decoder's padded outputs are multiplied by a mask
(always zero), the critic sees masked inputs (so padded voxels add nothing to the gradient-penalty
norm), and the VAE's reconstruction loss is masked. Padded hidden units (the critic is N-N-N wide)
have zero weights in and out and stay exactly zero, as do their gradients.

Random numbers: ``rng="per_model"`` draws each model's batches and noise from its own generators,
in the single-model trainer's order, so a bank reproduces training the models one by one (the test
checks the parameters after a few steps); ``rng="bank"`` draws all K models' batches and noise in
one call each on the device, which is what a GPU wants (each model's stream is still its own data).

Families: ``fastcalogan`` (:class:`GANBank`) and ``par04_vae`` (:class:`VAEBank`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainers.data import ShowerData
from zoo.base import ShowerModel

__all__ = ["BANKS", "Bank", "BankAdam", "GANBank", "VAEBank", "make_bank"]

_HIDDEN_ACT = {
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2),
    "silu": F.silu,
    "elu": F.elu,
    "tanh": torch.tanh,
}


@dataclass
class _Layer:
    """One linear layer of the bank: stacked weight (K, in_max, out_max) and bias (K, 1, out_max)."""

    weight: torch.Tensor
    bias: torch.Tensor


@dataclass
class _Slot:
    """Where one tensor of the single models (state-dict key ``name``) sits in a stacked tensor: for
    a linear weight (stored transposed, (K, in_max, out_max)) model i's rows and columns; for a bias
    (K, 1, out_max) its columns; for a per-model vector (K, 1, F) or a count (K,) neither.
    ``get``/``put`` work on the stacked tensor and on anything of its shape (its gradient, Adam's
    moments)."""

    name: str
    tensor: torch.Tensor
    rows: list[torch.Tensor] | None = None
    cols: list[torch.Tensor] | None = None

    def get(self, t: torch.Tensor, i: int) -> torch.Tensor:
        if self.rows is not None:
            return t[i][self.rows[i][:, None], self.cols[i][None, :]].T
        if self.cols is not None:
            return t[i, 0, self.cols[i]]
        return t[i, 0] if t.ndim == 3 else t[i]

    def put(self, t: torch.Tensor, i: int, value: torch.Tensor) -> None:
        value = value.to(t.device, t.dtype)
        if self.rows is not None:
            t[i][self.rows[i][:, None], self.cols[i][None, :]] = value.T
        elif self.cols is not None:
            t[i, 0, self.cols[i]] = value
        elif t.ndim == 3:
            t[i, 0] = value
        else:
            t[i] = value


class BankAdam:
    """Adam (torch.optim.Adam's update, no weight decay) over stacked parameters whose first axis is
    the model, with one step count per model: K independent Adams in a few fused ops."""

    def __init__(self, params: list[torch.Tensor], k: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.step_count = torch.zeros(k, dtype=torch.float64)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.betas
        self.step_count += 1
        device = self.params[0].device
        # the bias corrections in float64, as torch.optim.Adam computes them (Python floats)
        step_size = (self.lr / (1 - b1 ** self.step_count)).to(device, torch.float32)
        bc2_sqrt = ((1 - b2 ** self.step_count) ** 0.5).to(device, torch.float32)
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            if p.grad is None:
                continue
            shape = (-1,) + (1,) * (p.ndim - 1)
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt.view(shape)).add_(self.eps)
            p.addcdiv_(m * -step_size.view(shape), denom)


class Bank:
    """What the two families' banks share: stacking, padding, data streams, unstacking."""

    family = ""

    def __init__(self, models: list[ShowerModel], data: list[ShowerData], device="cpu", rng: str = "per_model",
                 seeds: list[int] | None = None):
        if not models or len(models) != len(data):
            raise ValueError(f"a bank needs one data set per model, got {len(models)} models and {len(data)} data sets")
        fams = {m.family for m in models}
        if fams != {self.family}:
            raise ValueError(f"{type(self).__name__} banks {self.family} models, got {sorted(fams)}")
        if rng not in ("per_model", "bank"):
            raise ValueError(f"rng must be 'per_model' or 'bank', got {rng!r}")
        self._check_same(models)
        self.models = models  # the single models: templates for unstacking (kept on the CPU)
        self.k = len(models)
        self.device = torch.device(device)
        self.rng = rng
        self.n_vox = [m.n_voxels for m in models]
        self.n_max = max(self.n_vox)
        self.n_cond = models[0].n_cond
        self.mask = torch.zeros(self.k, 1, self.n_max, device=self.device)
        for i, n in enumerate(self.n_vox):
            self.mask[i, 0, :n] = 1
        self.batch_size = int(getattr(models[0].config, "batch_size", 128))
        seeds = list(seeds) if seeds is not None else list(range(self.k))
        self.batch_gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.noise_gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.bank_gen = torch.Generator(device=self.device).manual_seed(int(seeds[0]))
        self._load_data(data)
        self.slots: dict[str, _Slot] = {}  # every stacked tensor, by the single models' state-dict key
        # name -> (BankAdam, the single model's parameter names in its optimiser's order, lr, betas)
        self.optimisers: dict[str, tuple] = {}

    # -- configuration --------------------------------------------------------------------------
    SAME: tuple[str, ...] = ()

    def _check_same(self, models) -> None:
        c0 = models[0].config
        for m in models[1:]:
            diff = [f for f in self.SAME if getattr(m.config, f) != getattr(c0, f)]
            if diff or m.n_cond != models[0].n_cond or m.config.conditions != c0.conditions:
                raise ValueError(f"models in one bank must share {', '.join(diff) or 'their conditions'}")

    # -- data -----------------------------------------------------------------------------------
    def _load_data(self, data: list[ShowerData]) -> None:
        """All models' training showers in model space, padded to n_max, in one flat tensor."""
        xs, conds, self.offsets, self.lengths = [], [], [], []
        start = 0
        for m, d in zip(self.models, data):
            if d.readout.n_voxels != m.n_voxels:
                raise ValueError(f"{d.source}: {d.readout.n_voxels} voxels, its model expects {m.n_voxels}")
            x = m.preprocess(torch.as_tensor(d.showers, dtype=torch.float32),
                             torch.as_tensor(d.energy, dtype=torch.float32))
            xs.append(F.pad(self._clip(x), (0, self.n_max - m.n_voxels)))
            geometry = None if d.geometry is None else list(d.geometry)
            conds.append(m.encode_conditions(d.energy, d.angle, geometry, ignore_unused=True).cpu())
            self.offsets.append(start)
            self.lengths.append(len(d))
            start += len(d)
        self.x = torch.cat(xs).to(self.device)
        self.cond = torch.cat(conds).to(self.device)
        self.energy_np = [np.asarray(d.energy) for d in data]
        self.active = [torch.arange(n) + o for n, o in zip(self.lengths, self.offsets)]
        self._active_table()

    def _clip(self, x):
        return x

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

    def draw_indices(self) -> torch.Tensor:
        """(K, B) rows of the flat data, each model from its own active set."""
        b = self.batch_size
        if self.rng == "per_model":
            rows = [a[torch.randint(len(a), (b,), generator=g)] for a, g in zip(self.active, self.batch_gens)]
            return torch.stack(rows).to(self.device)
        u = torch.rand(self.k, b, generator=self.bank_gen, device=self.device)
        pick = (u * self.n_active[:, None]).long().clamp_max_(self.table.shape[1] - 1)
        return torch.gather(self.table, 1, pick)

    def randn(self, *shape) -> torch.Tensor:
        """(K, *shape) standard normal: each model's own generator, or one bank draw."""
        if self.rng == "per_model":
            return torch.stack([torch.randn(*shape, generator=g) for g in self.noise_gens]).to(self.device)
        return torch.randn(self.k, *shape, generator=self.bank_gen, device=self.device)

    def rand(self, *shape) -> torch.Tensor:
        if self.rng == "per_model":
            return torch.stack([torch.rand(*shape, generator=g) for g in self.noise_gens]).to(self.device)
        return torch.rand(self.k, *shape, generator=self.bank_gen, device=self.device)

    # -- stacking -------------------------------------------------------------------------------
    def _stack(self, key: str, rows: list, cols: list, in_max: int, out_max: int) -> _Layer:
        w = torch.zeros(self.k, in_max, out_max)
        b = torch.zeros(self.k, 1, out_max)
        for i, m in enumerate(self.models):
            sd = m.state_dict()
            w[i][rows[i][:, None], cols[i][None, :]] = sd[f"{key}.weight"].T.float()
            b[i, 0, cols[i]] = sd[f"{key}.bias"].float()
        layer = _Layer(nn.Parameter(w.to(self.device)), nn.Parameter(b.to(self.device)))
        self.slots[f"{key}.weight"] = _Slot(f"{key}.weight", layer.weight, rows, cols)
        self.slots[f"{key}.bias"] = _Slot(f"{key}.bias", layer.bias, None, cols)
        return layer

    def _optimiser(self, label: str, names: list[str], lr: float, betas=(0.9, 0.999)) -> BankAdam:
        """A BankAdam over the slots ``names``, in the single model's optimiser order."""
        opt = BankAdam([self.slots[n].tensor for n in names], self.k, lr, betas)
        self.optimisers[label] = (opt, names, lr, tuple(betas))
        return opt

    @staticmethod
    def _linear(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(layer.bias, x, layer.weight)

    def model_state(self, i: int) -> dict:
        """Model ``i``'s state dict in its own (single-model) layout."""
        sd = dict(self.models[i].state_dict())
        for name, slot in self.slots.items():
            sd[name] = slot.get(slot.tensor.detach(), i).cpu().clone()
        return sd

    def load_model_state(self, i: int, sd: dict) -> None:
        with torch.no_grad():
            for name, slot in self.slots.items():
                slot.put(slot.tensor, i, sd[name])

    def unstacked(self, i: int) -> ShowerModel:
        """Model ``i`` as a single model (CPU), with the bank's current weights."""
        m = self.models[i]
        m.load_state_dict(self.model_state(i))
        return m

    def grad_of(self, i: int, name: str) -> torch.Tensor:
        """Model i's gradient of its parameter ``name`` (the single model's name and layout)."""
        slot = self.slots[name]
        return slot.get(slot.tensor.grad, i)

    # -- optimiser state in the single-model trainer's layout --------------------------------------
    def optimiser_state(self, i: int) -> dict:
        """Model i's optimisers as torch.optim.Adam state dicts (what trainers.loop saves)."""
        out = {}
        for label, (opt, names, lr, betas) in self.optimisers.items():
            state = {j: {"step": torch.tensor(float(opt.step_count[i])),
                         "exp_avg": self.slots[n].get(opt.exp_avg[j], i).cpu().clone(),
                         "exp_avg_sq": self.slots[n].get(opt.exp_avg_sq[j], i).cpu().clone()}
                     for j, n in enumerate(names)}
            group = {"lr": lr, "betas": betas, "eps": opt.eps, "weight_decay": 0, "amsgrad": False,
                     "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                     "fused": None, "decoupled_weight_decay": False, "params": list(range(len(names)))}
            out[label] = {"state": state, "param_groups": [group]}
        return out

    def load_optimiser_state(self, i: int, state: dict) -> None:
        with torch.no_grad():
            for label, (opt, names, _, _) in self.optimisers.items():
                saved = state[label]["state"]
                for j, n in enumerate(names):
                    st = saved.get(j) or saved.get(str(j))
                    if st is None:
                        continue
                    self.slots[n].put(opt.exp_avg[j], i, st["exp_avg"])
                    self.slots[n].put(opt.exp_avg_sq[j], i, st["exp_avg_sq"])
                    opt.step_count[i] = float(st["step"])

    def rng_state(self, i: int) -> dict:
        if self.rng == "per_model":
            return {"torch": self.noise_gens[i].get_state(), "batches": self.batch_gens[i].get_state()}
        return {"bank": self.bank_gen.get_state()}

    def set_rng_state(self, i: int, state: dict) -> None:
        if self.rng == "per_model" and "torch" in state:
            self.noise_gens[i].set_state(state["torch"])
            self.batch_gens[i].set_state(state["batches"])
        elif self.rng == "bank" and "bank" in state:
            self.bank_gen.set_state(state["bank"])

    # -- the per-family part -----------------------------------------------------------------------
    def step(self, autocast) -> dict[str, torch.Tensor]:
        """One training iteration of all K models; returns per-model losses, each (K,)."""
        raise NotImplementedError


def _hidden(model, n: int) -> tuple[int, ...]:
    w = model.config.critic_widths
    return (n, n, n) if w is None else tuple(w)


def _ar(n: int) -> torch.Tensor:
    return torch.arange(n)


class GANBank(Bank):
    """FastCaloGAN's WGAN-GP for K regions (see the module docstring)."""

    family = "fastcalogan"
    SAME = ("latent_dim", "generator_widths", "activation", "output", "learning_rate", "beta1", "beta2",
            "batch_size", "n_critic", "gp_lambda", "transform")

    def __init__(self, models, data, device="cpu", rng="per_model", seeds=None):
        super().__init__(models, data, device, rng, seeds)
        cfg = models[0].config
        if cfg.activation not in _HIDDEN_ACT or cfg.output not in ("relu", "none"):
            raise ValueError("a GAN bank needs a hidden activation with f(0) = 0 and output relu or none")
        depth = {len(_hidden(m, m.n_voxels)) for m in models}
        if len(depth) != 1:
            raise ValueError("models in one bank must have critics of the same depth")
        self.latent, self.c = cfg.latent_dim, self.n_cond
        self.act = _HIDDEN_ACT[cfg.activation]
        self.out_relu = cfg.output == "relu"
        self.n_critic, self.gp_lambda = cfg.n_critic, cfg.gp_lambda
        # generator: (latent + C) -> widths -> N_k (padded to n_max)
        g_widths = [cfg.latent_dim + self.c, *cfg.generator_widths]
        self.g_layers = []
        for j, (a, b) in enumerate(zip(g_widths[:-1], g_widths[1:])):
            self.g_layers.append(self._stack(f"generator.layers.{j}", [_ar(a)] * self.k, [_ar(b)] * self.k, a, b))
        last = len(g_widths) - 1
        self.g_layers.append(self._stack(f"generator.layers.{last}", [_ar(g_widths[-1])] * self.k,
                                         [_ar(n) for n in self.n_vox], g_widths[-1], self.n_max))
        # critic: (C + N_k) -> hidden_k... -> 1, the conditions first so that voxels pad at the end
        per_model = [[self.c + n, *_hidden(m, n), 1] for m, n in zip(models, self.n_vox)]
        maxes = [max(w[j] for w in per_model) for j in range(len(per_model[0]))]
        self.d_layers = []
        for j in range(len(maxes) - 1):
            rows = [_ar(w[j]) for w in per_model]
            cols = [_ar(w[j + 1]) for w in per_model]
            self.d_layers.append(self._stack(f"critic.layers.{j}", rows, cols, maxes[j], maxes[j + 1]))
        # the single trainer's two Adams, over critic_parameters() and generator_parameters()
        m0, betas = models[0], (cfg.beta1, cfg.beta2)
        self.opt_c = self._optimiser("opt_c", [f"critic.{n}" for n, _ in m0.critic.named_parameters()],
                                     cfg.learning_rate, betas)
        self.opt_g = self._optimiser("opt_g", [f"generator.{n}" for n, _ in m0.generator.named_parameters()],
                                     cfg.learning_rate, betas)

    def generator(self, noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(K, B, latent), (K, B, C) -> model space (K, B, n_max), padded voxels 0."""
        h = torch.cat([noise, cond], dim=2)
        for lay in self.g_layers[:-1]:
            h = self.act(self._linear(lay, h))
        out = self._linear(self.g_layers[-1], h)
        if self.out_relu:
            out = F.relu(out)
        return out * self.mask

    def critic(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(K, B, n_max), (K, B, C) -> scores (K, B); padded voxels never reach it."""
        h = torch.cat([cond, x * self.mask], dim=2)
        for lay in self.d_layers[:-1]:
            h = self.act(self._linear(lay, h))
        return self._linear(self.d_layers[-1], h).squeeze(2)

    def step(self, autocast) -> dict[str, torch.Tensor]:
        b = self.batch_size
        for _ in range(self.n_critic):
            idx = self.draw_indices()
            real, cond = self.x[idx], self.cond[idx]
            with autocast():
                with torch.no_grad():
                    fake = self.generator(self.randn(b, self.latent), cond)
                d_real = self.critic(real, cond).mean(1)
                d_fake = self.critic(fake, cond).mean(1)
                eps = self.rand(b)[..., None]
                xh = (eps * real + (1 - eps) * fake).requires_grad_(True)
                (grad,) = torch.autograd.grad(self.critic(xh, cond).sum(), xh, create_graph=True)
                gp = ((grad.float().norm(2, dim=2) - 1) ** 2).mean(1)
                loss_c = d_fake - d_real + self.gp_lambda * gp
            self.opt_c.zero_grad()
            loss_c.sum().backward()
            self.opt_c.step()
        idx = self.draw_indices()
        cond = self.cond[idx]
        with autocast():
            d_gen = self.critic(self.generator(self.randn(b, self.latent), cond), cond).mean(1)
        self.opt_g.zero_grad()
        (-d_gen).sum().backward()
        self.opt_g.step()
        # the single-model trainer's names, so that a region's history reads the same either way
        return {"critic_loss": loss_c.detach(), "critic_wasserstein": (d_real - d_fake).detach(),
                "critic_gp": gp.detach(), "critic_d_real": d_real.detach(), "critic_d_fake": d_fake.detach(),
                "generator_loss": -d_gen.detach(), "generator_d_fake": d_gen.detach()}


class VAEBank(Bank):
    """Par04's conditional VAE for K regions (see the module docstring); batch norm per model."""

    family = "par04_vae"
    SAME = ("latent_dim", "encoder_widths", "activation", "leaky_slope", "batch_norm", "kl_weight",
            "learning_rate", "batch_size", "transform")

    def __init__(self, models, data, device="cpu", rng="per_model", seeds=None):
        super().__init__(models, data, device, rng, seeds)
        cfg = models[0].config
        self.cfg = cfg
        widths = list(cfg.encoder_widths)
        self.latent = cfg.latent_dim
        if cfg.activation == "leaky_relu":
            slope = cfg.leaky_slope
            self.act = lambda x: F.leaky_relu(x, slope)
        else:
            self.act = _HIDDEN_ACT[cfg.activation]
        m0 = models[0]
        enc_lin = [name for name, mod in m0.encoder.named_children() if isinstance(mod, nn.Linear)]
        enc_bn = [name for name, mod in m0.encoder.named_children() if isinstance(mod, nn.BatchNorm1d)]
        dec_lin = [name for name, mod in m0.decoder.named_children() if isinstance(mod, nn.Linear)]
        dec_bn = [name for name, mod in m0.decoder.named_children() if isinstance(mod, nn.BatchNorm1d)]
        c = self.n_cond
        # encoder input: the model's [x (N_k), cond (C)] sits in the bank's [x (n_max), cond (C)]
        rows0 = [torch.cat([_ar(n), self.n_max + _ar(c)]) for n in self.n_vox]
        enc_w = [self.n_max + c, *widths]
        self.enc = []
        for j, name in enumerate(enc_lin):
            rows = rows0 if j == 0 else [_ar(enc_w[j])] * self.k
            self.enc.append(self._stack(f"encoder.{name}", rows, [_ar(enc_w[j + 1])] * self.k, enc_w[j], enc_w[j + 1]))
        self.mu = self._stack("to_mu", [_ar(widths[-1])] * self.k, [_ar(self.latent)] * self.k, widths[-1], self.latent)
        self.logvar = self._stack("to_logvar", [_ar(widths[-1])] * self.k, [_ar(self.latent)] * self.k,
                                  widths[-1], self.latent)
        dec_w = [self.latent + c, *widths[::-1]]
        self.dec = [self._stack(f"decoder.{name}", [_ar(dec_w[j])] * self.k, [_ar(dec_w[j + 1])] * self.k,
                                dec_w[j], dec_w[j + 1]) for j, name in enumerate(dec_lin)]
        self.out = self._stack("to_voxels", [_ar(dec_w[-1])] * self.k, [_ar(n) for n in self.n_vox], dec_w[-1],
                               self.n_max)
        # batch norm: affine parameters and running statistics per model, (K, 1, F), and the counts (K,)
        self.bn = []
        sds = [m.state_dict() for m in models]
        for prefix, names in (("encoder", enc_bn), ("decoder", dec_bn)):
            for name in names:
                key, module = f"{prefix}.{name}", getattr(m0, prefix)._modules[name]
                entry = {"momentum": module.momentum, "eps": module.eps}
                for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                    t = torch.stack([sd[f"{key}.{p}"] for sd in sds])
                    if p != "num_batches_tracked":
                        t = t[:, None, :].float().to(self.device)
                    entry[p] = nn.Parameter(t) if p in ("weight", "bias") else t
                    self.slots[f"{key}.{p}"] = _Slot(f"{key}.{p}", entry[p])
                self.bn.append(entry)
        self.enc_bn = self.bn[: len(enc_bn)]
        self.dec_bn = self.bn[len(enc_bn):]
        # the single trainer's Adam over model.parameters(), in their order
        self.opt = self._optimiser("opt", [n for n, _ in m0.named_parameters()], cfg.learning_rate)

    def _clip(self, x):
        return x.clamp(0.0, 1.0)

    def _bn(self, e: dict, h: torch.Tensor) -> torch.Tensor:
        """Batch norm per model over its batch (K, B, F), updating its running statistics."""
        mean = h.mean(1, keepdim=True)
        var = h.var(1, keepdim=True, unbiased=False)
        with torch.no_grad():
            n = h.shape[1]
            mom = e["momentum"]
            e["running_mean"].mul_(1 - mom).add_(mom * mean.detach())
            e["running_var"].mul_(1 - mom).add_(mom * var.detach() * n / max(n - 1, 1))
            e["num_batches_tracked"] += 1
        return (h - mean) / torch.sqrt(var + e["eps"]) * e["weight"] + e["bias"]

    def _mlp(self, layers, bns, h):
        for j, lay in enumerate(layers):
            h = self.act(self._linear(lay, h))
            if self.cfg.batch_norm:
                h = self._bn(bns[j], h)
        return h

    def losses(self, autocast) -> dict[str, torch.Tensor]:
        """Each model's loss on a fresh batch, (K,): ``loss``, ``reconstruction``, ``kl``."""
        idx = self.draw_indices()
        x, cond = self.x[idx], self.cond[idx]
        with autocast():
            h = self._mlp(self.enc, self.enc_bn, torch.cat([x, cond], dim=2))
            mu, logvar = self._linear(self.mu, h), self._linear(self.logvar, h)
            z = mu + torch.exp(0.5 * logvar) * self.randn(x.shape[1], self.latent)
            logits = self._linear(self.out, self._mlp(self.dec, self.dec_bn, torch.cat([z, cond], dim=2)))
            bce = F.binary_cross_entropy_with_logits(logits.float(), x, reduction="none")
            reconstruction = (bce * self.mask).sum(2)
            kl = -0.5 * (1.0 + logvar - mu.square() - logvar.exp()).float().sum(2)
            loss = (reconstruction + self.cfg.kl_weight * kl).mean(1)
        return {"loss": loss, "reconstruction": reconstruction.mean(1), "kl": kl.mean(1)}

    def step(self, autocast) -> dict[str, torch.Tensor]:
        out = self.losses(autocast)
        self.opt.zero_grad()
        out["loss"].sum().backward()  # the sum keeps each model's gradients its own
        self.opt.step()
        return {k: v.detach() for k, v in out.items()}


BANKS = {GANBank.family: GANBank, VAEBank.family: VAEBank}


def make_bank(models: list[ShowerModel], data: list[ShowerData], device="cpu", rng: str = "per_model",
              seeds=None) -> Bank:
    fam = models[0].family
    if fam not in BANKS:
        raise ValueError(f"no bank for family {fam!r}; banks exist for {', '.join(sorted(BANKS))}")
    return BANKS[fam](models, data, device, rng, seeds)


def train_bank(models: list[ShowerModel], train_data: list[ShowerData], val_data: list[ShowerData], cfg, run_dirs,
               *, rng: str = "per_model", seeds: list[int] | None = None, resume: bool = True,
               log=None, names: list[str] | None = None) -> list:
    """Train K models as one bank; each keeps its own checkpoints in ``run_dirs[i]/checkpoints``.

    The checkpoints are the single-model trainer's (``trainers.loop``): any of them rebuilds its
    model alone, and with ``rng="per_model"`` it resumes exactly under either trainer. Each model
    resumes from its own latest checkpoint; the bank starts at the earliest of them (a model that was
    checkpointed further, by a crash in the middle of a save round, waits: the others catch up first,
    as a bank of their own, and then all go on together).

    log: called as ``log(i, record, iteration)`` after each of model i's checkpoints.
    Returns one ``trainers.loop.TrainResult`` per model.
    """
    import time
    from pathlib import Path

    from tqdm.auto import tqdm

    from trainers.checkpoint import CheckpointManager, load_checkpoint
    from trainers.data import energy_points
    from trainers.loop import (
        TrainResult,
        _device,
        checkpoint_state,
        incremental_order,
        validate,
    )

    t0 = time.perf_counter()
    k = len(models)
    names = names or [f"model{i}" for i in range(k)]
    device = _device(cfg.device)
    seeds = list(seeds) if seeds is not None else [cfg.seed] * k
    for m, data in zip(models, train_data):
        m.fit_data(data.energy, data.showers)  # what a model keeps of its data (trainers.loop does the same)
    bank = make_bank([m.cpu() for m in models], train_data, device, rng, seeds)
    managers = [CheckpointManager(Path(d) / "checkpoints", keep=cfg.keep_checkpoints) for d in run_dirs]
    iters = [0] * k
    histories: list[list] = [[] for _ in range(k)]
    for i, mgr in enumerate(managers):
        latest = mgr.latest() if resume else None
        if latest is None:
            continue
        state = load_checkpoint(latest)
        if state["family"] != models[i].family:
            raise ValueError(f"{latest} holds a {state['family']} model, not {models[i].family}")
        bank.load_model_state(i, state["model"])
        bank.load_optimiser_state(i, state["optimiser"])
        bank.set_rng_state(i, state["rng"])
        iters[i], histories[i] = int(state["iteration"]), list(state.get("history", []))
    top = min(max(iters), cfg.iterations)
    behind = [i for i in range(k) if iters[i] < top]
    if resume and behind and len(behind) < k:
        # A crash in the middle of a save round leaves some models one checkpoint ahead: bring the
        # others up to them first (a bank of just those), then go on together.
        import dataclasses

        def sub_log(j, record, iteration):
            if log is not None:
                log(behind[j], record, iteration)

        train_bank([models[i] for i in behind], [train_data[i] for i in behind], [val_data[i] for i in behind],
                   dataclasses.replace(cfg, iterations=top), [run_dirs[i] for i in behind], rng=rng,
                   seeds=[seeds[i] for i in behind], resume=True, log=sub_log, names=[names[i] for i in behind])
        return train_bank(models, train_data, val_data, cfg, run_dirs, rng=rng, seeds=seeds, resume=True, log=log,
                          names=names)
    start = min(iters)
    data_info = [{"train": t.describe(), "validation": v.describe()} for t, v in zip(train_data, val_data)]
    schedules = ([incremental_order(energy_points(t.energy)) for t in train_data]
                 if cfg.incremental_every else None)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == "cuda")

    bar = tqdm(total=cfg.iterations, initial=start, desc=f"bank of {k} {models[0].family}", unit="it",
               disable=not cfg.progress)
    for step_i in range(start, cfg.iterations):
        if schedules is not None and (step_i == start or step_i % cfg.incremental_every == 0):
            bank.restrict([s[: min(1 + step_i // cfg.incremental_every, len(s))] for s in schedules])
        losses = bank.step(autocast)
        done = step_i + 1
        if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
            values = {name: v.float().cpu().numpy() for name, v in losses.items()}
            bad = [names[i] for i in range(k) if not all(math.isfinite(float(v[i])) for v in values.values())]
            if bad:
                raise FloatingPointError(f"non-finite loss at iteration {done} for {', '.join(bad)}")
            for i in range(k):
                model = bank.unstacked(i)
                model.eval()
                metrics, _ = validate(model, val_data[i], cfg.n_val_max)
                model.train()
                record = {"iteration": done, **{n: float(v[i]) for n, v in values.items()},
                          **{n: v for n, v in metrics.items() if n != "per_energy"}}
                histories[i].append(record)
                state = checkpoint_state(model, bank.model_state(i), bank.optimiser_state(i), done,
                                         bank.rng_state(i), record, histories[i], cfg, data_info[i])
                managers[i].save(state, done, record)
                if log is not None:
                    log(i, record, done)
            bar.set_postfix({"regions": k, **{n: f"{float(v.mean()):.3g}" for n, v in list(values.items())[:2]}},
                            refresh=False)
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    return [TrainResult(max(cfg.iterations, it), mgr.best(), mgr.files(), hist, seconds)
            for it, mgr, hist in zip(iters, managers, histories)]
