"""Conditional flow matching after CaloDREAM's split: an energy model and a shape model.

A shower is written as its energy per (active) layer and, within each layer, the share of the layer's
energy in each voxel:

- **energy model**: the response E_tot / E_inc and the layers' shares of E_tot, s_l = E_l / E_tot,
  through y = (log(E_tot / E_inc + ``layer_floor``), log(s_l + ``layer_floor``)) standardised per
  dimension (mean and spread from ``fit_data``, kept in buffers), given the encoded incident energy.
  The response is one dimension of its own because its spread (about 1 % in PbWO4) is far narrower
  than any layer's: as a sum of independently drawn layer energies it would come out too wide;
- **shower summaries** (``shower_summaries``): the energy model also draws the shower's transverse
  centre (x, y) over all layers and its width; the shape model is told them, and generation moves every
  layer by the same small shift so that the shower's centre is the drawn one (``recentre``). In Geant4 a
  shower's layers share its centre (a layer's centre is correlated with the next one's), which a shape
  model that draws each layer's voxels given only the layer energies misses: Geant4's own showers with
  each layer's shape taken from another shower of the same energy are easily told from Geant4 by the
  high-level classifier;
- **layer moments** (``layer_moments``): the energy model also draws every layer's centre (x, y) and
  width, jointly with the layer energies (what a layer's neighbours hold of it is in their joint
  distribution), and generation moves and widens or narrows each layer of the shape model's shower
  to them (``recentre``, ``rewiden``). The shape model is not told them: it draws the voxels and their
  fluctuations, the energy model the shape's moments (told them as inputs too, the shape model trains
  worse: 3 × n_layers more inputs for the same data);
- **shape model**: the voxel shares u_i = E_i / E_layer(i), through z_i = log(u_i + ``voxel_floor``)
  standardised per voxel, given the standardised layer energies and summaries y and the incident
  energy. An empty voxel is below log(``voxel_floor``) and a hit above it; in training empty voxels
  are spread uniformly over [log(floor) - 1, log(floor)] (dequantisation), since a velocity field
  smears a point mass to both sides, which would turn empty voxels into tiny hits.

``shape_model`` "layers" (default): one velocity field for the voxels of every layer, padded to the
widest layer and told which layer it is (one-hot), that layer's energy and its neighbours' and y (but
the layers' moments): its weights see every layer of every shower (45 samples a shower in the PbWO4
readout), which a small training set needs. "voxels": one MLP over all voxels at once (7 M parameters
for 6480 voxels, each shower one sample; checkpoints that predate ``shape_model`` load as this). With
``symmetric_alpha`` (the PbWO4 variant: a beam along the axis of a cylindrical readout) each training
shower is turned by a random whole number of alpha bins and mirrored half the time, the same shower for
such a detector.

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

**Marginal calibration** (``calibration``, ``zoo.calibration``): the generated voxels are last mapped
onto the training data's distribution of each radial ring of each layer (which voxels hold energy at
all, and how much) and their small deposits onto its spectrum, whose discrete lines (the K-shell
binding energies of W and Pb, 511 keV) a velocity field cannot draw; the maps keep every layer's
energy and the order of its voxels, and are refitted to the model's own showers at every checkpoint
(``calibrate``), so the exported graph holds them as tables.

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
from zoo.calibration import MarginalCalibration
from zoo.base import LOG_ENERGY_CONDITIONS, LR_SCHEDULES, ModelConfig, SearchSpace, ShowerModel, atlas_region, build_variant

__all__ = ["FlowMatching", "FlowMatchingConfig", "FlowMatchingSearch"]

SOLVERS = ("euler", "midpoint")
SHAPE_MODELS = ("layers", "voxels")
#: generation keeps each voxel's log share below the largest seen in training near its energy plus this
SHAPE_MAX_MARGIN = 0.5


@dataclass
class FlowMatchingConfig(ModelConfig):
    """Config of :class:`FlowMatching` (module docstring).

    energy_widths, shape_widths: hidden widths of the two velocity MLPs.
    shape_model: "layers" (one velocity field shared by all layers) or "voxels" (one over all voxels).
    symmetric_alpha: train on showers turned and mirrored in alpha (a beam along the readout's axis).
    shower_summaries: the energy model also draws the shower's transverse centre (x, y) and its width over
        all layers, and the shape model is told them: what holds a shower's layers together in Geant4.
    recentre: (with shower_summaries) every layer of a generated shower is tilted by a small linear
        weight in x and y so that its centre is the one the energy model drew: the layer's own with
        layer_moments, else the shower's, the same shift for all layers (``FlowMatching._recentred``).
    layer_moments: (with shower_summaries) the energy model also draws every layer's centre (x, y) and
        width (not told to the shape model); generation moves each layer to its drawn centre (with
        ``recentre``) and widens or narrows it to its drawn width (with ``rewiden``;
        ``FlowMatching._matched``).
    time_features: sine/cosine pairs of t fed to both (plus t itself).
    n_steps, solver: the fixed-step integration of the shape model in generation (``euler`` or
        ``midpoint``, two velocity evaluations a step); energy_n_steps, energy_solver: the energy model's
        (0 and "": the shape model's). Six Euler steps for the shapes, six midpoint for the energies:
        the shapes' cruder steps are what the classifier finds closest to Geant4, while the energy model
        (a small MLP, cheap to integrate) needs the midpoint rule to keep E_tot/E_inc right at energies
        it did not see (``benchmarks/fm_steps.py`` measures both on a checkpoint).
    layer_floor, voxel_floor: the offsets of the two log transforms (fractions of E_inc and of a layer).
    hit_quantile: generated voxels below this quantile of the training data's non-zero voxel energies
        are set to zero (0: none), their energy given to the rest of their layer; with ``calibration``
        (the default) the calibration's per-ring thresholds do this instead.
    energy_knots: the standardisation's mean and spread of every dimension are piecewise linear in
        log E_inc between this many knots (1: one mean and spread for all energies).
    dequantise_layers: empty layers' shares of E_tot are spread below log(layer_floor) in training, as
        empty voxels are (``_log_parts``), so that the energy model draws empty layers as empty.
    calibration: generated voxel energies are mapped onto the training data's distributions per
        radial ring of each layer and, for small deposits, onto its spectrum with its discrete lines,
        at each knot (``zoo.calibration``), refitted to the model's own showers at every checkpoint.
    learning_rate, lr_schedule, batch_size: read by the likelihood trainer (``lr_schedule``: one of
        ``zoo.base.LR_SCHEDULES``; "cosine" anneals to zero over the run's iterations).
    """

    readout: dict | str = "g4-pbwo4"
    conditions: dict = field(default_factory=LOG_ENERGY_CONDITIONS.to_dict)
    energy_widths: tuple[int, ...] = (256, 256, 256)
    shape_model: str = "layers"
    symmetric_alpha: bool = False
    shape_widths: tuple[int, ...] = (256, 256, 256)
    shower_summaries: bool = True
    recentre: bool = True
    layer_moments: bool = True
    rewiden: bool = True
    time_features: int = 4
    n_steps: int = 6
    solver: str = "euler"
    energy_n_steps: int = 6
    energy_solver: str = "midpoint"
    layer_floor: float = 1e-5
    voxel_floor: float = 1e-5
    energy_knots: int = 9
    hit_quantile: float = 0.0
    calibration: bool = True
    dequantise_layers: bool = False
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"
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
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.shape_model not in SHAPE_MODELS:
            raise ValueError(f"shape_model must be one of {SHAPE_MODELS}, got {self.shape_model!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.energy_n_steps < 0 or self.energy_solver not in ("", *SOLVERS):
            raise ValueError(f"energy_n_steps must be >= 0 and energy_solver one of {SOLVERS} (0 and '': the "
                             f"shape model's), got {self.energy_n_steps}, {self.energy_solver!r}")
        if not 0.0 <= self.hit_quantile < 1.0:
            raise ValueError(f"hit_quantile must be in [0, 1), got {self.hit_quantile}")
        if self.energy_knots < 1:
            raise ValueError(f"energy_knots must be >= 1, got {self.energy_knots}")
        if self.time_features < 0:
            raise ValueError(f"time_features must be >= 0, got {self.time_features}")
        if self.recentre and not self.shower_summaries:
            raise ValueError("recentre needs shower_summaries (the centre it moves showers to)")
        if self.layer_moments and not self.shower_summaries:
            raise ValueError("layer_moments needs shower_summaries (the layers' moments follow the shower's)")
        if not (self.layer_floor > 0 and self.voxel_floor > 0):
            raise ValueError(f"layer_floor and voxel_floor must be > 0, got {self.layer_floor}, {self.voxel_floor}")

    @classmethod
    def from_saved(cls, saved: dict) -> FlowMatchingConfig:
        """Checkpoints written before ``shape_model``, ``lr_schedule`` and ``energy_solver`` existed: the
        all-voxel MLP, trained at a constant learning rate, both models integrated alike. One trained
        with ``layer_rings`` (per-layer radial profiles drawn by the energy model, an option removed) is
        refused."""
        if saved.get("layer_rings"):
            raise ValueError("this checkpoint was trained with layer_rings, an option removed from flow_matching; "
                             "retrain it without")
        return super().from_saved({"shape_model": "voxels", "lr_schedule": "constant", "energy_knots": 1,
                                   "calibration": False, "dequantise_layers": False,
                                   "hit_quantile": 0.0, "energy_n_steps": 0, "energy_solver": "",
                                   "shower_summaries": False, "recentre": False, "layer_moments": False,
                                   **saved})


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
        # voxel → layer sums (x @ M) and layer → voxel broadcasts (y @ M.T), as matrix products, and the
        # layer form's voxel ↔ slot moves as gathers with fixed indices: no scatter, so the same ops run
        # under vmap, in ONNX and on any device
        self.register_buffer("layer_matrix", torch.from_numpy(onehot))
        # the response, the layers' shares of E_tot, then the shower's centre (x, y) and width (summaries),
        # then every layer's centre x, y and width (layer_moments): n_layers each
        self.n_summaries = (3 if config.shower_summaries else 0) + (3 * self.n_layers if config.layer_moments else 0)
        self.n_energy = self.n_layers + 1 + self.n_summaries
        # what the shape model is told of y: all but the layers' moments, which generation matches instead
        # (as inputs they add 3 × n_layers dimensions, with which the shape model trains worse)
        self.n_told = self.n_layers + 1 + (3 if config.shower_summaries else 0)
        r, alpha = self.readout.voxel_centres
        transverse = np.isin(layer_of, self._transverse_layers()).astype(np.float64)
        vx, vy = r * np.cos(alpha), r * np.sin(alpha)  # mm, as validate's centres and widths
        coords = np.stack([transverse, transverse * vx, transverse * vy, transverse * (vx**2 + vy**2)], axis=1)
        self.register_buffer("summary_coords", torch.as_tensor(coords, dtype=torch.float32), persistent=False)
        k = config.energy_knots  # the standardisation's tables: one row per knot in log(E_inc / GeV)
        self.register_buffer("knots", torch.arange(k, dtype=torch.float32))
        self.register_buffer("energy_mean", torch.zeros(k, self.n_energy))
        self.register_buffer("energy_std", torch.ones(k, self.n_energy))
        self.register_buffer("shape_mean", torch.zeros(k, self.n_voxels))
        self.register_buffer("shape_std", torch.ones(k, self.n_voxels))
        self.register_buffer("shape_max", torch.zeros(k, self.n_voxels))  # log(share + floor) <= log(1 + floor)
        self.register_buffer("hit_threshold", torch.zeros(()))  # MeV
        self.energy_net = _Velocity(self.n_energy, self.n_cond, config.energy_widths, config.time_features)
        self.calib = MarginalCalibration(self.readout, k) if config.calibration else None
        self._raw = False  # True while calibrate() samples the model's own, uncalibrated showers
        if config.symmetric_alpha:  # the voxel index and the layer's alpha-bin count of each voxel
            n_alpha = np.array([self.readout.layers[int(l)].n_alpha for l in layer_of])
            start = np.concatenate([[0], np.cumsum([layer.n_voxels for layer in self.readout.layers])])[layer_of]
            n_r = np.array([self.readout.layers[int(l)].n_r for l in layer_of])
            for name, values in (("voxel_alpha", self.readout.voxel_alpha), ("voxel_n_alpha", n_alpha),
                                 ("voxel_start", start), ("voxel_n_r", n_r), ("voxel_r", self.readout.voxel_r)):
                self.register_buffer(name, torch.as_tensor(np.asarray(values), dtype=torch.int64), persistent=False)
        if config.shape_model == "voxels":
            self.shape_net = _Velocity(self.n_voxels, self.n_told + self.n_cond, config.shape_widths,
                                       config.time_features)
            return
        # "layers": one velocity field for every layer's voxels (padded to the widest layer), told which
        # layer it is (one-hot) and that layer's energy and its neighbours'. Voxels ↔ slots (layer, j) by
        # index_select with fixed indices (a Gather in ONNX); padded slots read an appended zero column.
        layer_index = np.array([active.index(int(l)) for l in layer_of])
        counts = np.bincount(layer_index, minlength=self.n_layers)
        self.n_slots = int(counts.max())
        slot = np.zeros(self.n_voxels, dtype=np.int64)
        for l in range(self.n_layers):
            members = np.flatnonzero(layer_index == l)
            slot[members] = l * self.n_slots + np.arange(len(members))
        slot_index = np.full(self.n_layers * self.n_slots, self.n_voxels, dtype=np.int64)
        slot_index[slot] = np.arange(self.n_voxels)
        self.register_buffer("voxel_slot", torch.from_numpy(slot), persistent=False)
        self.register_buffer("slot_index", torch.from_numpy(slot_index), persistent=False)
        self.register_buffer("layer_onehot", torch.eye(self.n_layers), persistent=False)
        # y (but the layers' moments), conditions, layer, its and neighbours' y, log E
        n_context = self.n_told + self.n_cond + self.n_layers + 4
        self.shape_net = _Velocity(self.n_slots, n_context, config.shape_widths, config.time_features)

    def _transverse_layers(self) -> list[int]:
        """The readout's layers with more than one alpha bin (a transverse centre and width)."""
        return [i for i, layer in enumerate(self.readout.layers) if layer.n_voxels and layer.n_alpha > 1]

    @property
    def noise_dim(self) -> int:
        """x_0 of the energy model (n_energy), then of the shape model (n_voxels)."""
        return self.n_energy + self.n_voxels

    # -- the representation ------------------------------------------------------------------------
    def _log_parts(self, showers: torch.Tensor, energy: torch.Tensor, dequantise: torch.Tensor | None = None,
                   dequantise_layers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log response and layer shares (B, 1 + n_layers), log voxel shares (B, n_voxels)), not standardised.

        An empty voxel is log(voxel_floor) and a voxel with energy above it, so that generation reads
        "empty" as "below log(voxel_floor)". With ``dequantise`` (uniforms (B, n_voxels)), empty voxels
        spread over [log(voxel_floor) - 1, log(voxel_floor)] instead of sitting on one value, which a
        velocity field cannot reproduce exactly (it would smear it to both sides: tiny spurious hits).
        ``dequantise_layers`` (uniforms (B, n_layers)) does the same for empty layers' shares of E_tot
        below log(layer_floor) (the deep layers of a low-energy shower are often empty: smeared, they
        would all come out with a little energy)."""
        cfg = self.config
        layers = (showers @ self.layer_matrix).clamp_min(0.0)  # (B, n_layers) MeV
        total = layers.sum(1, keepdim=True)
        response = total / energy.reshape(-1, 1)
        layer_share = layers / total.clamp_min(1e-12)
        share = (showers / (layers @ self.layer_matrix.T).clamp_min(1e-12)).clamp_min(0.0)
        if dequantise_layers is None:
            y = torch.log(torch.cat([response, layer_share], dim=1) + cfg.layer_floor)
        else:
            empty_layer = cfg.layer_floor * torch.exp(-dequantise_layers)
            y = torch.log(torch.cat([response + cfg.layer_floor,
                                     torch.where(layer_share > 0, layer_share + cfg.layer_floor, empty_layer)], dim=1))
        if self.n_summaries:
            y = torch.cat([y, self._summaries(showers)], dim=1)
        if dequantise is None:
            return y, torch.log(share + cfg.voxel_floor)
        empty = cfg.voxel_floor * torch.exp(-dequantise)
        return y, torch.log(torch.where(share > 0, share + cfg.voxel_floor, empty))

    def _summaries(self, showers: torch.Tensor) -> torch.Tensor:
        """(B, 3): the shower's energy-weighted centre x, y (mm) over the layers binned in alpha and
        log(its width in mm + 1), the width being the energy-weighted rms distance from that centre;
        with ``layer_moments`` then each layer's centre x (n_layers), y (n_layers) and log(width + 1).
        In Geant4 the layers' centres and widths move together (drawn independently, each layer's shape
        taken from another shower of the same energy and layer energy, Geant4's own showers are easily
        told from Geant4): drawn by the energy model, they hold the layers together."""
        s = showers @ self.summary_coords  # (B, 4): Σ E, Σ E x, Σ E y, Σ E r²
        total = s[:, :1].clamp_min(1e-12)
        centre = s[:, 1:3] / total
        width = (s[:, 3:] / total - centre.square().sum(1, keepdim=True)).clamp_min(0.0).sqrt()
        summaries = torch.cat([centre, torch.log(width + 1.0)], dim=1)
        if not self.config.layer_moments:
            return summaries
        m = self.layer_matrix
        layer = showers @ (self.summary_coords[:, :, None] * m[:, None, :]).reshape(self.n_voxels, -1)
        layer = layer.reshape(-1, 4, self.n_layers)  # (B, 4, n_layers): Σ E, Σ E x, Σ E y, Σ E r² per layer
        total = layer[:, :1].clamp_min(1e-12)
        centre = layer[:, 1:3] / total  # (B, 2, n_layers); 0 for an empty layer
        width = (layer[:, 3:] / total - centre.square().sum(1, keepdim=True)).clamp_min(0.0).sqrt()
        return torch.cat([summaries, centre[:, 0], centre[:, 1], torch.log(width[:, 0] + 1.0)], dim=1)

    def _knot_weights(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, energy_knots): the weights of the tables' rows at each shower's energy (linear
        interpolation in log E_inc between the knots, the end rows beyond them)."""
        if self.config.energy_knots == 1:
            return torch.ones_like(cond[:, :1])
        spacing = self.knots[1] - self.knots[0]
        log_e = torch.minimum(torch.maximum(self._log_energy_gev(cond), self.knots[:1]), self.knots[-1:])
        return torch.relu(1.0 - torch.abs(log_e - self.knots) / spacing)

    def fit_data(self, energy_mev: np.ndarray, showers_mev: np.ndarray) -> None:
        """The mean and spread of the two log transforms per dimension as functions of log E_inc (in
        buffers): piecewise linear between ``energy_knots`` knots spread evenly over the data's range,
        fitted by least squares with a small penalty on the differences between neighbouring knots (so a
        knot without data, such as a left-out energy, takes the mean of its neighbours: never zero, never
        outside their range)."""
        k = self.config.energy_knots
        with torch.no_grad():
            dev = self.layer_matrix.device
            x = torch.as_tensor(np.asarray(showers_mev), dtype=torch.float32, device=dev)
            energy = np.asarray(energy_mev, dtype=np.float64).ravel()
            e = torch.as_tensor(energy, dtype=torch.float32, device=dev)
            u = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)).to(dev)
            u_layers = torch.rand(len(x), self.n_layers, generator=torch.Generator().manual_seed(1)).to(dev) \
                if self.config.dequantise_layers else None
            y, z = self._log_parts(x, e, u, u_layers)
            log_e = np.log(energy / 1000.0)
            lo, hi = float(log_e.min()), float(log_e.max())
            if k > 1 and hi - lo < 1e-6:
                hi = lo + 1.0  # one energy: every knot gets the same rows
            self.knots.copy_(torch.linspace(lo, hi, k) if k > 1 else torch.tensor([lo]))
            w = self._knot_weights(self.encode_conditions(energy)).double()  # (N, K)
            d = torch.diff(torch.eye(k, dtype=torch.float64, device=dev), dim=0)  # first differences (k-1, k)
            penalty = 1e-3 * len(energy) / k * (d.T @ d)
            gram = w.T @ w + penalty + 1e-9 * torch.eye(k, dtype=torch.float64, device=dev)

            def fit(values):
                return torch.linalg.solve(gram, w.T @ values.double())

            for mean_buf, std_buf, values in ((self.energy_mean, self.energy_std, y), (self.shape_mean, self.shape_std, z)):
                mean = fit(values)
                var = fit((values.double() - w @ mean).square())
                mean_buf.copy_(mean.float())
                std_buf.copy_(var.clamp_min(1e-6).sqrt().clamp_min(1e-2).float())
            hits = x[x > 0].cpu().numpy()
            if self.config.hit_quantile > 0 and len(hits):
                self.hit_threshold.fill_(float(np.quantile(hits, self.config.hit_quantile)))
            # the largest log share of each voxel among the showers nearest each knot (a knot without
            # showers: the larger of its nearest neighbours'), plus a margin: generation never goes above
            nearest = w.argmax(1)
            rows = [z[nearest == j].max(0).values if bool((nearest == j).any()) else None for j in range(k)]
            filled = [j for j in range(k) if rows[j] is not None]
            for j in range(k):
                if rows[j] is None:
                    below, above = [i for i in filled if i < j], [i for i in filled if i > j]
                    near = ([below[-1]] if below else []) + ([above[0]] if above else [])
                    rows[j] = torch.stack([rows[i] for i in near]).max(0).values
            self.shape_max.copy_((torch.stack(rows) + SHAPE_MAX_MARGIN).clamp_max(math.log(1.0 + self.config.voxel_floor)))
            if self.calib is not None:
                self.calib.fit_reference(nearest.cpu().numpy(), energy, np.asarray(showers_mev),
                                         np.exp(self.knots.cpu().numpy()) * 1000.0)

    @torch.no_grad()
    def calibrate(self) -> None:
        """Refit the marginal calibration (``zoo.calibration``) to this model's own showers at the
        energies ``fit_data`` chose (the same noise every time)."""
        if self.calib is None:
            return
        energy = self.calib.sample_energy.reshape(-1).cpu().numpy()
        self._raw = True
        try:
            raw = self.sample(energy, generator=torch.Generator(device=self.device).manual_seed(20251123))
        finally:
            self._raw = False
        self.calib.fit_model(raw.double().cpu().numpy())

    def _tables(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(mean, spread) of y and of z at each shower's energy: four (B, dim) tensors."""
        w = self._knot_weights(cond)
        return w @ self.energy_mean, w @ self.energy_std, w @ self.shape_mean, w @ self.shape_std

    def _shape_bound(self, cond: torch.Tensor) -> torch.Tensor:
        """(B, n_voxels): the largest log(share + floor) generation may give each voxel (``fit_data``)."""
        return self._knot_weights(cond) @ self.shape_max

    def _standardised(self, showers: torch.Tensor, energy: torch.Tensor, cond: torch.Tensor,
                      dequantise: torch.Tensor | None = None,
                      dequantise_layers: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        y, z = self._log_parts(showers, energy, dequantise, dequantise_layers)
        y_mean, y_std, z_mean, z_std = self._tables(cond)
        return (y - y_mean) / y_std, (z - z_mean) / z_std

    def _rotated(self, showers: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Each shower turned by a whole number of alpha bins and, for half of them, mirrored (u (B, 2)
        uniforms): the same shower for a detector symmetric about its axis, so the shape model learns from
        2 × n_alpha copies of each (``symmetric_alpha``)."""
        n_alpha = self.voxel_n_alpha.unsqueeze(0)
        turn = torch.floor(u[:, :1] * n_alpha).long()
        alpha = torch.where(u[:, 1:] < 0.5, n_alpha - 1 - self.voxel_alpha, self.voxel_alpha.unsqueeze(0).expand_as(turn))
        source = self.voxel_start + ((alpha + turn) % n_alpha) * self.voxel_n_r + self.voxel_r
        return showers.gather(1, source)

    # -- the shape model's two forms -----------------------------------------------------------------
    def _to_slots(self, z: torch.Tensor) -> torch.Tensor:
        """(B, n_voxels) → (B·n_layers, n_slots), padded slots 0."""
        padded = torch.cat([z, torch.zeros_like(z[:, :1])], dim=1).index_select(1, self.slot_index)
        return padded.reshape(-1, self.n_slots)

    def _from_slots(self, x: torch.Tensor) -> torch.Tensor:
        """(B·n_layers, n_slots) → (B, n_voxels)."""
        return x.reshape(-1, self.n_layers * self.n_slots).index_select(1, self.voxel_slot)

    def _shape_context(self, y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Per layer row (B·n_layers, ...): y but the layers' moments (``n_told``) and the conditions,
        the layer (one-hot), its standardised share of E_tot and its neighbours' (0 past the ends), and
        its log energy in GeV / 10."""
        b, n = y.shape[0], self.n_layers
        own = y[:, 1:1 + n]
        zero = torch.zeros_like(own[:, :1])
        before, after = torch.cat([zero, own[:, :-1]], dim=1), torch.cat([own[:, 1:], zero], dim=1)
        y_mean, y_std, _, _ = self._tables(cond)
        log_e = y * y_std + y_mean  # log(response + floor), log(share + floor)
        log_layer = (log_e[:, 1:1 + n] + log_e[:, :1] + self._log_energy_gev(cond)) / 10.0
        per_layer = torch.stack([own, before, after, log_layer], dim=2)  # (B, n_layers, 4)
        told = y[:, :self.n_told]
        shared = torch.cat([told, cond], dim=1).unsqueeze(1).expand(b, n, told.shape[1] + cond.shape[1])
        onehot = self.layer_onehot.unsqueeze(0).expand(b, n, n)
        return torch.cat([shared, onehot, per_layer], dim=2).reshape(b * n, -1)

    def _log_energy_gev(self, cond: torch.Tensor) -> torch.Tensor:
        """log(E_inc / GeV) (B, 1) from the encoded conditions."""
        return torch.log(self.energy_from_conditions(cond).reshape(-1, 1) / 1000.0)

    def _shape_velocity(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """v of the shape model on (B, n_voxels) standardised log shares (context from _shape_inputs)."""
        if self.config.shape_model == "voxels":
            return self.shape_net(x, t, context)
        rows = self._to_slots(x)
        t_rows = t.repeat_interleave(self.n_layers, dim=0)
        return self._from_slots(self.shape_net(rows, t_rows, context))

    def _shape_inputs(self, y: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The shape model's context: (B, ...) for "voxels", (B·n_layers, ...) for "layers"."""
        if self.config.shape_model == "voxels":
            return torch.cat([y[:, :self.n_told], cond], dim=1)
        return self._shape_context(y, cond)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints from before ``energy_knots`` hold one mean and spread per dimension: one knot; from
        before ``shape_max`` and ``hit_threshold``, no bound on the voxels but share <= 1 and no threshold."""
        for name in ("energy_mean", "energy_std", "shape_mean", "shape_std"):
            if state_dict.get(prefix + name) is not None and state_dict[prefix + name].dim() == 1:
                state_dict[prefix + name] = state_dict[prefix + name].unsqueeze(0)
        state_dict.setdefault(prefix + "knots", torch.zeros(1))
        state_dict.setdefault(prefix + "hit_threshold", torch.zeros(()))  # and no threshold
        if prefix + "shape_max" not in state_dict:  # and no bound on the voxels (only share <= 1)
            state_dict[prefix + "shape_max"] = torch.zeros_like(state_dict[prefix + "shape_mean"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the interface ---------------------------------------------------------------------------
    def training_noise(self, step: str, batch_size: int) -> dict:
        """x_0 and t of each model's flow-matching path."""
        return {"x0_energy": ((batch_size, self.n_energy), "normal"), "t_energy": ((batch_size, 1), "uniform"),
                "x0_shape": ((batch_size, self.n_voxels), "normal"), "t_shape": ((batch_size, 1), "uniform"),
                "dequantise": ((batch_size, self.n_voxels), "uniform"), "symmetry": ((batch_size, 2), "uniform"),
                **({"dequantise_layers": ((batch_size, self.n_layers), "uniform")}
                   if self.config.dequantise_layers else {})}

    def losses(self, batch: dict) -> dict:
        """{"loss", "energy", "shape"}: the two flow-matching losses (mean squared velocity error per
        dimension, batch means) and their sum."""
        cond = batch["conditions"]
        showers = self._rotated(batch["showers"], batch["symmetry"]) if self.config.symmetric_alpha else batch["showers"]
        y1, z1 = self._standardised(showers, batch["energy"], cond, batch["dequantise"], batch.get("dequantise_layers"))
        losses = {}
        for name, velocity, x1, context in (("energy", self.energy_net, y1, cond),
                                            ("shape", self._shape_velocity, z1, self._shape_inputs(y1, cond))):
            x0, t = batch[f"x0_{name}"], batch[f"t_{name}"]
            xt = (1.0 - t) * x0 + t * x1
            losses[name] = (velocity(xt, t, context) - (x1 - x0)).square().mean()
        return {"loss": losses["energy"] + losses["shape"], **losses}

    def _integrate(self, net, x: torch.Tensor, context: torch.Tensor, n: int, solver: str) -> torch.Tensor:
        """x at t = 1 from x at t = 0 in ``n`` fixed steps (unrolled: the exported graph holds them)."""
        h = 1.0 / n
        ones = torch.ones_like(x[:, :1])
        for k in range(n):
            t = ones * (k * h)
            v = net(x, t, context)
            if solver == "midpoint":
                v = net(x + 0.5 * h * v, t + 0.5 * h, context)
            x = x + h * v
        return x

    def generate(self, noise: torch.Tensor, conditions: torch.Tensor, threshold: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """noise (N, n_energy + n_voxels) ~ N(0, 1), conditions (N, n_cond) → voxel energies (N, n_voxels) MeV;
        ``threshold``: the hit threshold in MeV (default the fitted ``hit_threshold``; :meth:`threshold_edges`)."""
        y = self._layer_energies(noise, conditions)
        z = self._integrate(self._shape_velocity, noise[:, self.n_energy:], self._shape_inputs(y, conditions),
                            self.config.n_steps, self.config.solver)
        return self._to_voxels(y, z, conditions, self.hit_threshold if threshold is None else threshold)

    def threshold_edges(self, noise: torch.Tensor, conditions: torch.Tensor, rel: float) -> torch.Tensor | None:
        """(N, n_voxels) bool: the voxels that the hit threshold keeps when lowered by the fraction ``rel`` and
        zeroes when raised by it (their value before it lies within ``rel`` of it), and those of a layer
        whose keep-everything rule turns on such a voxel; None without a threshold."""
        if not float(self.hit_threshold) > 0:
            return None
        low = self.generate(noise, conditions, self.hit_threshold * (1.0 - rel))
        high = self.generate(noise, conditions, self.hit_threshold * (1.0 + rel))
        return (low > 0) != (high > 0)

    def _layer_energies(self, noise: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """The energy model's standardised y (B, n_energy) from its part of the noise."""
        cfg = self.config
        return self._integrate(self.energy_net, noise[:, :self.n_energy], conditions,
                               cfg.energy_n_steps or cfg.n_steps, cfg.energy_solver or cfg.solver)

    def _to_voxels(self, y: torch.Tensor, z: torch.Tensor, conditions: torch.Tensor,
                   threshold: torch.Tensor) -> torch.Tensor:
        """The inverse of the representation: standardised y (B, n_energy) and z (B, n_voxels) → MeV, hits
        below ``threshold`` MeV zeroed."""
        cfg = self.config
        energy = self.energy_from_conditions(conditions).reshape(-1, 1)
        y_mean, y_std, z_mean, z_std = self._tables(conditions)
        n = self.n_layers + 1  # the response and the layer shares (the summaries only steer the shapes)
        e = (torch.exp(y[:, :n] * y_std[:, :n] + y_mean[:, :n]) - cfg.layer_floor).clamp_min(0.0)
        layer_share = e[:, 1:] / e[:, 1:].sum(1, keepdim=True).clamp_min(1e-12)
        layers = layer_share * (e[:, :1] * energy)  # MeV per layer: their sum is the drawn response × E_inc
        # a velocity field's rare far outliers, exponentiated, would put a layer's energy in one voxel
        log_share = torch.minimum(z * z_std + z_mean, self._shape_bound(conditions))
        share = (torch.exp(log_share) - cfg.voxel_floor).clamp_min(0.0)
        share = share / (share @ self.layer_matrix @ self.layer_matrix.T).clamp_min(1e-12)
        voxels = share * (layers @ self.layer_matrix.T)
        # before the threshold: they move energy between hits but make none smaller than it
        if cfg.layer_moments and (cfg.recentre or cfg.rewiden):
            voxels = self._matched(voxels, y, conditions)
        elif cfg.recentre:
            voxels = self._recentred(voxels, y, conditions)
        # hits below the smallest the training data has (``hit_quantile``) are what the smeared floor
        # leaves: empty; the layer's other voxels take their energy, so the layer energies stay as drawn
        # (a layer with no voxel above the threshold keeps its voxels)
        kept = (voxels > threshold).to(voxels.dtype)
        kept = torch.maximum(kept, ((kept @ self.layer_matrix) == 0).to(voxels.dtype) @ self.layer_matrix.T)  # not a whole layer
        voxels = voxels * kept
        voxels = voxels * ((layers / (voxels @ self.layer_matrix).clamp_min(1e-12)) @ self.layer_matrix.T)
        if self.calib is not None and self.calib.is_fitted and not self._raw:
            voxels = self.calib(voxels, self._knot_weights(conditions) @ torch.arange(cfg.energy_knots, dtype=voxels.dtype, device=voxels.device))
        return voxels

    def _recentred(self, voxels: torch.Tensor, y: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """Voxels (B, n_voxels) MeV with every layer's centre moved by the same (dx, dy): the drawn
        shower centre (the summaries in y) minus the shower's own (``_shifted``). The shape model draws
        each layer's centre with the right spread but learns their common part slowly (the shift is a
        small bias on many noisy voxels): this puts it in, as Geant4 has it (the layers' centres correlate
        by about 0.45 from layer to layer)."""
        n = self.n_layers
        y_mean, y_std, _, _ = self._tables(conditions)
        target = y[:, 1 + n:3 + n] * y_std[:, 1 + n:3 + n] + y_mean[:, 1 + n:3 + n]  # (B, 2) mm
        e = voxels * self.summary_coords[:, 0]
        shower = (e @ self.summary_coords[:, 1:3]) / e.sum(1, keepdim=True).clamp_min(1e-12)
        shift = target - shower
        return self._shifted(voxels, by=(shift[:, :1], shift[:, 1:]))

    def _matched(self, voxels: torch.Tensor, y: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """Voxels (B, n_voxels) MeV with each layer moved to the centre the energy model drew for it
        (``_shifted``), widened or narrowed to its drawn width: weighted by 1 + c (ρ² - <ρ²>), ρ the
        distance from the layer's centre, which keeps its energy and centre (for a layer symmetric about
        it) and moves <ρ²> by c var(ρ²), solved for c; weights kept within [1/4, 4] as there. The
        widening moves an asymmetric layer's centre, the shift its width a little: both twice, then
        the shift once more."""
        n, m = self.n_layers, self.layer_matrix
        y_mean, y_std, _, _ = self._tables(conditions)
        drawn = (y * y_std + y_mean)[:, 4 + n:].reshape(-1, 3, n)  # (B, 3, n_layers): x, y (mm), log(width + 1)
        target = (torch.exp(drawn[:, 2]) - 1.0).clamp_min(0.0).square()  # <ρ²> mm²
        vx, vy = self.summary_coords[:, 1], self.summary_coords[:, 2]

        def shift(voxels):
            return self._shifted(voxels, to=(drawn[:, 0], drawn[:, 1])) if self.config.recentre else voxels

        if not self.config.rewiden:
            return shift(voxels)
        for _ in range(2):  # each step disturbs the other a little: twice, and the centres once more
            voxels = shift(voxels)
            e, total, cx, cy = self._layer_centres(voxels)
            rho2 = (vx - cx @ m.T).square() + (vy - cy @ m.T).square()
            mean = (e * rho2) @ m / total
            var = (e * (rho2 - mean @ m.T).square()) @ m / total
            good = (var > 1e-2 * mean.square()) & (mean > 1e-2)  # layers with a spread (not one hit)
            c = good.to(voxels.dtype) * (target - mean) / torch.where(good, var, torch.ones_like(var))
            out = voxels * (1.0 + (c @ m.T) * (rho2 - mean @ m.T)).clamp(0.25, 4.0)
            voxels = self._layers_kept(out, voxels)
        return shift(voxels)

    def _layers_kept(self, out: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
        """``out`` (B, n_voxels) with each layer scaled back to its energy in ``voxels``."""
        m = self.layer_matrix
        return out * (((voxels @ m) / (out @ m).clamp_min(1e-12)) @ m.T)

    def _layer_centres(self, voxels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The voxels of the layers binned in alpha (B, n_voxels), each layer's energy (B, n_layers,
        at least 1e-12) and its centre x, y in mm (B, n_layers each; 0 for an empty layer)."""
        m, c = self.layer_matrix, self.summary_coords
        e = voxels * c[:, 0]
        total = (e @ m).clamp_min(1e-12)
        return e, total, (e * c[:, 1]) @ m / total, (e * c[:, 2]) @ m / total

    def _shifted(self, voxels: torch.Tensor, by: tuple | None = None, to: tuple | None = None) -> torch.Tensor:
        """Voxels (B, n_voxels) MeV with each layer's centre moved ``by`` (dx, dy) mm ((B, n_layers), or
        (B, 1) for all layers alike) or ``to`` (x, y) mm (B, n_layers) each. Each layer's voxels are weighted by 1 + a (x - x_l) + b (y - y_l)
        about its centre (x_l, y_l): its energy stays, its centre moves by its energy-weighted covariance
        times (a, b), which is solved for (dx, dy); weights are kept within [1/4, 4] (the layer then
        scaled back to its energy) and empty voxels stay empty."""
        m, vx, vy = self.layer_matrix, self.summary_coords[:, 1], self.summary_coords[:, 2]
        e, total, cx, cy = self._layer_centres(voxels)
        dx, dy = (to[0] - cx, to[1] - cy) if to is not None else by
        u, v = vx - cx @ m.T, vy - cy @ m.T  # (B, n_voxels) from the layer's centre: covariances in two
        sxx, sxy, syy = (e * u * u) @ m / total, (e * u * v) @ m / total, (e * v * v) @ m / total  # passes
        det = sxx * syy - sxy * sxy
        # layers spread in both directions by 0.5 mm or more (not one hit, nor hits on a line, where the
        # solve is ill-posed)
        good = (det > 1e-2 * sxx * syy) & (sxx > 0.25) & (syy > 0.25)
        inv = good.to(voxels.dtype) / torch.where(good, det, torch.ones_like(det))
        a = (syy * dx - sxy * dy) * inv
        b = (sxx * dy - sxy * dx) * inv
        # the weight's spread over the layer kept at most 1 (a shift of at most about the layer's own rms
        # width at once): steeper tilts would be cut by the range below anyway, and their float32 rounding
        # (a u, u up to 40 mm) differs between runtimes by more than the ONNX gate's 1e-4
        spread = (a * a * sxx + 2.0 * a * b * sxy + b * b * syy).clamp_min(0.0).sqrt()
        steep = 1.0 / spread.clamp_min(1.0)
        a, b = a * steep, b * steep
        weight = 1.0 + (a @ m.T) * u + (b @ m.T) * v
        # weights kept within [1/4, 4]: never near zero, where torch and ONNX Runtime would round a voxel
        # differently relative to itself, nor a few voxels of an ill-conditioned layer (two hits) blown up;
        # where one is cut, the layer is put back to its energy and part of the shift is left undone
        out = voxels * weight.clamp(0.25, 4.0)
        return self._layers_kept(out, voxels)


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
    return _create("flow_matching_pbwo4", {"readout": "g4-pbwo4", "symmetric_alpha": True}, overrides)
