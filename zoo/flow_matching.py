"""Conditional flow matching after CaloDREAM's split: an energy model and a shape model.

A shower is written as its energy per (active) layer and, within each layer, the share of the layer's
energy in each voxel:

- **energy model**: the response E_tot / E_inc and the layers' shares of E_tot, s_l = E_l / E_tot,
  through y = (log(E_tot / E_inc + ``layer_floor``), log(s_l + ``layer_floor``)) standardised per
  dimension (mean and spread from ``fit_data``, kept in buffers), given the encoded incident energy.
  The response is one dimension of its own because its spread (about 1 % in PbWO4) is far narrower
  than any layer's: as a sum of independently drawn layer energies it would come out too wide;
- **shape model**: the voxel shares u_i = E_i / E_layer(i), through z_i = log(u_i + ``voxel_floor``)
  standardised per voxel, given the standardised layer energies y and the incident energy.

Each is a velocity field v(x_t, t, context) (an MLP; t enters with sine and cosine features) trained by
conditional flow matching on the straight path from a standard normal x_0 to the data x_1 (Lipman et al.
2023, "rectified flow"): x_t = (1 - t) x_0 + t x_1, loss |v - (x_1 - x_0)|², averaged over the
dimensions of each model and summed over the two. The two share one optimiser and one loss, so the
family trains through the same loop, banks, fleets and sweeps as every other (``trainers/``): its losses
read x_0 and t from the batch (``training_noise``).

Generation integrates both ODEs from t = 0 to 1 with ``n_steps`` fixed steps (``solver``: ``euler`` or
``midpoint``, two velocity evaluations per step), the energy model first, then the shape model given the
sampled layer energies: noise = (x_0 of the layer energies, x_0 of the voxels), so the exported graph
holds every step and is a pure function of (noise, conditions). Voxel shares below zero after the
inverse transform are set to zero and each layer's shares renormalised to one, so a shower's layer
energies are exactly the energy model's.

Why the integrator and the loss are written here rather than taken from ``torchdiffeq`` or Meta's
``flow_matching``: the exported graph must unroll a fixed number of steps of plain tensor ops (ONNX has
no ODE solver, and those libraries' solvers step in Python with adaptive or data-dependent control
flow that tracing does not keep), and the loss has to run under ``torch.func.vmap`` for the banks; the
straight-path loss is three lines, the fixed-step solver five.

Variants: ``flow_matching`` (atlas-like photons at 0.20 < |eta| < 0.25, 368 voxels, for fleets: a fleet
gives each region its own readout) and ``flow_matching_pbwo4`` (the Geant4 PbWO4 readout, 45 × 16 × 9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from zoo._registry import register_model
from zoo.base import LOG_ENERGY_CONDITIONS, ModelConfig, SearchSpace, ShowerModel, atlas_region, build_variant

__all__ = ["FlowMatching", "FlowMatchingConfig", "FlowMatchingSearch"]

SOLVERS = ("euler", "midpoint")


@dataclass
class FlowMatchingConfig(ModelConfig):
    """Config of :class:`FlowMatching` (module docstring).

    energy_widths, shape_widths: hidden widths of the two velocity MLPs.
    time_features: sine/cosine pairs of t fed to both (plus t itself).
    n_steps, solver: the fixed-step integration of generation (``euler`` or ``midpoint``). Six midpoint
        steps (12 velocity evaluations): from one trained checkpoint, 12 gave the same held-out
        classifier AUC and E_tot/E_inc at half the speed, and Euler with 6 or 4 a little worse
        (``benchmarks/fm_steps.py``; the straight-path field is close to straight).
    layer_floor, voxel_floor: the offsets of the two log transforms (fractions of E_inc and of a layer).
    learning_rate, batch_size: read by the likelihood trainer.
    """

    readout: dict | str = "g4-pbwo4"
    conditions: dict = field(default_factory=LOG_ENERGY_CONDITIONS.to_dict)
    energy_widths: tuple[int, ...] = (128, 128, 128)
    shape_widths: tuple[int, ...] = (512, 512, 512)
    time_features: int = 4
    n_steps: int = 6
    solver: str = "midpoint"
    layer_floor: float = 1e-5
    voxel_floor: float = 1e-5
    learning_rate: float = 1e-3
    batch_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        self.energy_widths = tuple(int(w) for w in self.energy_widths)
        self.shape_widths = tuple(int(w) for w in self.shape_widths)
        if not self.energy_widths or not self.shape_widths or min(self.energy_widths + self.shape_widths) < 1:
            raise ValueError(f"energy_widths and shape_widths must be positive, got {self.energy_widths}, "
                             f"{self.shape_widths}")
        if self.n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {self.n_steps}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.time_features < 0:
            raise ValueError(f"time_features must be >= 0, got {self.time_features}")
        if not (self.layer_floor > 0 and self.voxel_floor > 0):
            raise ValueError(f"layer_floor and voxel_floor must be > 0, got {self.layer_floor}, {self.voxel_floor}")


@dataclass
class FlowMatchingSearch(SearchSpace):
    learning_rate: tuple[float, ...] = (2e-4, 5e-4, 1e-3)
    shape_widths: tuple[tuple[int, ...], ...] = ((256, 256, 256), (512, 512, 512))
    n_steps: tuple[int, ...] = (8, 12, 24)


class _Velocity(nn.Module):
    """v(x_t, t, context): an MLP of SiLUs over (x_t, context, t and its sine/cosine features)."""

    def __init__(self, n_x: int, n_context: int, widths: tuple[int, ...], time_features: int):
        super().__init__()
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(time_features, dtype=torch.float32))
        dims = [n_x + n_context + 1 + 2 * time_features, *widths]
        layers: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        layers.append(nn.Linear(dims[-1], n_x))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        tf = t * self.frequencies  # (B, time_features)
        return self.net(torch.cat([x, context, t, torch.sin(tf), torch.cos(tf)], dim=1))


class FlowMatching(ShowerModel):
    """Layer energies and voxel shares by conditional flow matching (module docstring)."""

    family = "flow_matching"
    kind = "likelihood"
    config_class = FlowMatchingConfig
    search_space = FlowMatchingSearch

    def __init__(self, config: FlowMatchingConfig, variant: str = ""):
        super().__init__(config, variant)
        active = self.readout.active_layers
        self.n_layers = len(active)
        layer_of = self.readout.voxel_layer
        onehot = np.zeros((self.n_voxels, self.n_layers), dtype=np.float32)
        onehot[np.arange(self.n_voxels), [active.index(int(l)) for l in layer_of]] = 1.0
        # voxel → layer sums (x @ M) and layer → voxel broadcasts (y @ M.T), as matrix products: no
        # scatter or gather, so the same ops run under vmap, in ONNX and on any device
        self.register_buffer("layer_matrix", torch.from_numpy(onehot))
        self.n_energy = self.n_layers + 1  # the response, then the layers' shares of E_tot
        self.register_buffer("energy_mean", torch.zeros(self.n_energy))
        self.register_buffer("energy_std", torch.ones(self.n_energy))
        self.register_buffer("shape_mean", torch.zeros(self.n_voxels))
        self.register_buffer("shape_std", torch.ones(self.n_voxels))
        self.energy_net = _Velocity(self.n_energy, self.n_cond, config.energy_widths, config.time_features)
        self.shape_net = _Velocity(self.n_voxels, self.n_energy + self.n_cond, config.shape_widths,
                                   config.time_features)

    @property
    def noise_dim(self) -> int:
        """x_0 of the energy model (1 + n_layers), then of the shape model (n_voxels)."""
        return self.n_energy + self.n_voxels

    # -- the representation ------------------------------------------------------------------------
    def _log_parts(self, showers: torch.Tensor, energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log response and layer shares (B, 1 + n_layers), log voxel shares (B, n_voxels)), not standardised."""
        cfg = self.config
        layers = (showers @ self.layer_matrix).clamp_min(0.0)  # (B, n_layers) MeV
        total = layers.sum(1, keepdim=True)
        response = total / energy.reshape(-1, 1)
        layer_share = layers / total.clamp_min(1e-12)
        share = showers / (layers @ self.layer_matrix.T).clamp_min(1e-12)
        y = torch.log(torch.cat([response, layer_share], dim=1) + cfg.layer_floor)
        return y, torch.log(share.clamp_min(0.0) + cfg.voxel_floor)

    def fit_data(self, energy_mev: np.ndarray, showers_mev: np.ndarray) -> None:
        """The per-layer and per-voxel mean and spread of the two log transforms (in buffers)."""
        with torch.no_grad():
            x = torch.as_tensor(np.asarray(showers_mev), dtype=torch.float32, device=self.layer_matrix.device)
            e = torch.as_tensor(np.asarray(energy_mev, dtype=np.float64), dtype=torch.float32, device=x.device)
            y, z = self._log_parts(x, e)
            for buf, values in ((self.energy_mean, y.mean(0)), (self.energy_std, y.std(0).clamp_min(1e-3)),
                                (self.shape_mean, z.mean(0)), (self.shape_std, z.std(0).clamp_min(1e-3))):
                buf.copy_(values)

    def _standardised(self, showers: torch.Tensor, energy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, z = self._log_parts(showers, energy)
        return (y - self.energy_mean) / self.energy_std, (z - self.shape_mean) / self.shape_std

    # -- the interface ---------------------------------------------------------------------------
    def training_noise(self, step: str, batch_size: int) -> dict:
        """x_0 and t of each model's flow-matching path."""
        return {"x0_energy": ((batch_size, self.n_energy), "normal"), "t_energy": ((batch_size, 1), "uniform"),
                "x0_shape": ((batch_size, self.n_voxels), "normal"), "t_shape": ((batch_size, 1), "uniform")}

    def losses(self, batch: dict) -> dict:
        """{"loss", "energy", "shape"}: the two flow-matching losses (mean squared velocity error per
        dimension, batch means) and their sum."""
        cond = batch["conditions"]
        y1, z1 = self._standardised(batch["showers"], batch["energy"])
        losses = {}
        for name, net, x1, context in (("energy", self.energy_net, y1, cond),
                                       ("shape", self.shape_net, z1, torch.cat([y1, cond], dim=1))):
            x0, t = batch[f"x0_{name}"], batch[f"t_{name}"]
            xt = (1.0 - t) * x0 + t * x1
            losses[name] = (net(xt, t, context) - (x1 - x0)).square().mean()
        return {"loss": losses["energy"] + losses["shape"], **losses}

    def _integrate(self, net: _Velocity, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x at t = 1 from x at t = 0 in ``n_steps`` fixed steps (unrolled: the exported graph holds them)."""
        n = self.config.n_steps
        h = 1.0 / n
        ones = torch.ones_like(x[:, :1])
        for k in range(n):
            t = ones * (k * h)
            v = net(x, t, context)
            if self.config.solver == "midpoint":
                v = net(x + 0.5 * h * v, t + 0.5 * h, context)
            x = x + h * v
        return x

    def generate(self, noise: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """noise (N, 1 + n_layers + n_voxels) ~ N(0, 1), conditions (N, n_cond) → voxel energies (N, n_voxels) MeV."""
        cfg = self.config
        energy = self.energy_from_conditions(conditions).reshape(-1, 1)
        y = self._integrate(self.energy_net, noise[:, :self.n_energy], conditions)
        z = self._integrate(self.shape_net, noise[:, self.n_energy:], torch.cat([y, conditions], dim=1))
        e = (torch.exp(y * self.energy_std + self.energy_mean) - cfg.layer_floor).clamp_min(0.0)
        layer_share = e[:, 1:] / e[:, 1:].sum(1, keepdim=True).clamp_min(1e-12)
        layers = layer_share * (e[:, :1] * energy)  # MeV per layer: their sum is the drawn response × E_inc
        share = (torch.exp(z * self.shape_std + self.shape_mean) - cfg.voxel_floor).clamp_min(0.0)
        share = share / (share @ self.layer_matrix @ self.layer_matrix.T).clamp_min(1e-12)
        return share * (layers @ self.layer_matrix.T)


# -- variants -------------------------------------------------------------------------------------
def _create(variant: str, defaults: dict, overrides: dict) -> FlowMatching:
    return build_variant(FlowMatching, variant, defaults, overrides)


@register_model
def flow_matching(**overrides) -> FlowMatching:
    """Flow matching for one detector region (by default the atlas-like photons at 0.20 < |eta| < 0.25,
    368 voxels; a fleet gives each region its own readout), energy only, log-encoded."""
    defaults = {} if "readout" in overrides else {"readout": atlas_region("photon_eta_020_025").readout.to_dict()}
    return _create("flow_matching", defaults, overrides)


@register_model
def flow_matching_pbwo4(**overrides) -> FlowMatching:
    """Flow matching on the Geant4 PbWO4 reference readout 'g4-pbwo4' (45 × 16 × 9), energy only, log-encoded."""
    return _create("flow_matching_pbwo4", {"readout": "g4-pbwo4"}, overrides)
