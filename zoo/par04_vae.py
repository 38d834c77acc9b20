"""The Par04 conditional VAE (Geant4 extended example Par04 and its ML training code).

The model of Par04's ``training/core/model.py``, in PyTorch:

- preprocessing: voxel energy / incident energy (transform spec ``[{"kind": "divide_by_incident"}]``),
  so every voxel is a number in [0, 1];
- conditions: incident energy / 1024 GeV (linear), angle / 90°, geometry one-hot (``ConditionSpec``);
- encoder: (x (n_voxels), conditions) → dense 100 → 50 → 20 → 14 (activation, then batch norm) →
  mu, log-variance (latent_dim = 10);
- decoder: (z, conditions) → dense 14 → 20 → 50 → 100 (mirrored) → n_voxels with a sigmoid, i.e. the
  fraction of the incident energy in each voxel;
- loss: binary cross-entropy summed over voxels (Keras' mean BCE × ORIGINAL_DIM in Par04) +
  ``kl_weight`` × KL(q(z | x, c) ‖ N(0, 1)), averaged over the batch.

Inference (``generate``) is the decoder alone: z ~ N(0, 1) of size latent_dim is the noise, and the
sigmoid output times the incident energy (recovered from the encoded conditions) gives MeV.

Voxel fluctuations (``spot_energy_mev`` = ε > 0; calozoo's addition, off in Par04's variants). The
decoder's output μ is a voxel's *mean* energy given z: every voxel is hit and fluctuates only through
z, whereas a Geant4 voxel is empty or holds a few discrete deposits (at 1 GeV in PbWO4, 92 % of the
voxels are empty). With ε set, each voxel is drawn around μ like the built-in simulator's spots: a
compound Poisson sum of exponential deposits of mean ε, so P(hit) = 1 - exp(-μ/ε), and given a hit
a log-normal with that compound's conditional mean μ/P(hit) and variance (its cv² = P (2ε/μ + 1) - 1:
1 for a rarely hit voxel, 2ε/μ for a busy one), so the mean stays μ; the voxels are then scaled
together so that the shower keeps its total, the decoder's or the response table's (alone, the
spots would add a spread of √(2ε/E) to E_tot/E_inc: 4.5 % at 1 GeV, where Geant4's is 1.3 %). Two
more standard normals per voxel are appended to the noise (noise_dim = latent_dim + 2 n_voxels: the
hit draw through the normal CDF, then the log-normal's), which keeps the exported graph a pure function of (noise,
conditions). ε = 1 MeV is the value that reproduces the fraction of non-empty voxels of the Geant4
PbWO4 file (what it adds to the model's quality: docs/benchmarks.md).

Total energy (``response_quantiles`` = K > 0; calozoo's addition, off in Par04's variants). The sum
of thousands of sigmoids is a poor model of E_grid/E_inc, whose spread in PbWO4 is about 1 %. With K
set, the model keeps the training data's quantile function of E_grid/E_inc (K levels) at each point
of a fixed grid of energies (powers of 2 from 1/4 GeV to 2 TeV; a training shower counts at the
nearest point in log E; points without data are interpolated, and held constant beyond the data),
fitted by ``fit_data`` before training and kept in buffers; a shower's total is drawn from it by the
inverse CDF (one more noise column, interpolated linearly in log2 E between grid points) and the
decoder's voxels, fluctuated or not, are scaled to it. The decoder then models the shape alone, as
CaloFlow's separate energy model does for the layer energies.

Departures from the Keras original, on purpose: PyTorch's default (Kaiming-uniform) initialisation
instead of Keras ``RandomNormal(stddev=0.05)``; the BCE is computed from the decoder's logits
(``binary_cross_entropy_with_logits``), which equals BCE of the sigmoid output without the
clipping of log(0) that Keras applies.

Variants: ``par04_vae`` (Par04's grid, energy + angle + geometry), ``par04_vae_ds2`` (CaloChallenge
dataset 2 readout, energy only) and ``par04_vae_pbwo4`` (the Geant4 PbWO4 reference file, energy only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from showers.transforms import ConditionSpec
from zoo._registry import register_model
from zoo.base import (LOG_ENERGY_CONDITIONS, ModelConfig, SearchSpace, ShowerModel, atlas_region, build_variant, log1p,
                      normal_cdf, one_minus_exp_neg, sigmoid)

__all__ = ["Par04VAE", "Par04VAEConfig"]

# Par04's conditions: E / 1024 GeV, angle / 90 degrees, one-hot over its two calorimeter geometries.
PAR04_CONDITIONS = ConditionSpec(energy_encoding="linear", energy_scale_mev=1.024e6, use_angle=True,
                                 angle_max_deg=90.0, geometries=("SiW", "SciPb"))
# Energy only (normal incidence, one geometry), same linear scale as Par04.
ENERGY_ONLY_CONDITIONS = ConditionSpec(energy_encoding="linear", energy_scale_mev=1.024e6)

#: energies of the response table (module docstring): powers of 2 from 1/4 GeV to 2 TeV, in MeV
RESPONSE_GRID_MEV = 1e3 * 2.0 ** np.arange(-2, 12)

_ACTIVATIONS = ("leaky_relu", "relu", "elu", "silu", "tanh")


@dataclass
class Par04VAEConfig(ModelConfig):
    """Config of :class:`Par04VAE` (defaults: Par04's own hyper-parameters).

    latent_dim: size of z, which is also the model's noise_dim.
    encoder_widths: hidden widths of the encoder; the decoder uses them reversed.
    activation: hidden activation, one of leaky_relu, relu, elu, silu, tanh.
    leaky_slope: negative slope of leaky_relu (0.2: TensorFlow's ``tf.nn.leaky_relu``, which Keras'
        ``activation="leaky_relu"`` resolves to).
    batch_norm: batch norm after each hidden activation, as in Par04.
    kl_weight: weight of the KL term against the summed BCE.
    spot_energy_mev: ε of the voxel fluctuations drawn at inference (module docstring); 0: none, the
        decoder's mean as in Par04. Training is the same either way.
    response_quantiles: K, levels of the quantile table of E_grid/E_inc that sets each shower's total
        (module docstring); 0: the decoder's own total, as in Par04.
    learning_rate, batch_size: read by the likelihood trainer (Par04: Adam, 1e-3, 100 per replica).
    """

    readout: dict | str = "par04"
    conditions: dict = field(default_factory=PAR04_CONDITIONS.to_dict)
    transform: list = field(default_factory=lambda: [{"kind": "divide_by_incident"}])
    latent_dim: int = 10
    encoder_widths: tuple[int, ...] = (100, 50, 20, 14)
    activation: str = "leaky_relu"
    leaky_slope: float = 0.2
    batch_norm: bool = True
    kl_weight: float = 1.0
    spot_energy_mev: float = 0.0
    response_quantiles: int = 0
    learning_rate: float = 1e-3
    batch_size: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        # a config read back from JSON has a list here
        self.encoder_widths = tuple(int(w) for w in self.encoder_widths)
        if self.latent_dim < 1 or not self.encoder_widths or min(self.encoder_widths) < 1:
            raise ValueError(f"latent_dim and encoder_widths must be positive, got {self.latent_dim}, "
                             f"{self.encoder_widths}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if self.response_quantiles < 0 or self.response_quantiles == 1:
            raise ValueError(f"response_quantiles must be 0 (off) or >= 2, got {self.response_quantiles}")
        spec = ConditionSpec.from_dict(self.conditions)
        if self.response_quantiles and (spec.use_angle or spec.geometries):
            raise ValueError("response_quantiles keeps one table per incident energy: it needs energy-only "
                             "conditions (no angle or geometry), as in par04_vae_pbwo4")
        if not self.spot_energy_mev >= 0:
            raise ValueError(f"spot_energy_mev must be >= 0, got {self.spot_energy_mev}")


@dataclass
class Par04VAESearch(SearchSpace):
    """Par04's sweep (it used Optuna over these): latent size, KL weight, learning rate, widths."""

    latent_dim: tuple[int, ...] = (10, 20)
    kl_weight: tuple[float, ...] = (0.5, 1.0, 2.0)
    learning_rate: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    encoder_widths: tuple[tuple[int, ...], ...] = ((100, 50, 20, 14), (200, 100, 50, 20))


def _activation(cfg: Par04VAEConfig) -> nn.Module:
    if cfg.activation == "leaky_relu":
        return nn.LeakyReLU(cfg.leaky_slope)
    return {"relu": nn.ReLU, "elu": nn.ELU, "silu": nn.SiLU, "tanh": nn.Tanh}[cfg.activation]()


def _mlp(widths: list[int], cfg: Par04VAEConfig) -> nn.Sequential:
    """Dense → activation → (batch norm) for each consecutive pair of widths (Par04's block order)."""
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths, widths[1:]):
        layers += [nn.Linear(w_in, w_out), _activation(cfg)]
        if cfg.batch_norm:
            layers.append(nn.BatchNorm1d(w_out))
    return nn.Sequential(*layers)


class Par04VAE(ShowerModel):
    """Par04's conditional VAE; see the module docstring. Voxel space: E_voxel / E_inc in [0, 1]."""

    family = "par04_vae"
    kind = "likelihood"
    config_class = Par04VAEConfig
    search_space = Par04VAESearch

    def __init__(self, config: Par04VAEConfig, variant: str = ""):
        super().__init__(config, variant)
        widths = list(config.encoder_widths)
        self.encoder = _mlp([self.n_voxels + self.n_cond] + widths, config)
        self.to_mu = nn.Linear(widths[-1], config.latent_dim)
        self.to_logvar = nn.Linear(widths[-1], config.latent_dim)
        rev = widths[::-1]
        self.decoder = _mlp([config.latent_dim + self.n_cond] + rev, config)
        self.to_voxels = nn.Linear(rev[-1], self.n_voxels)  # logits; the sigmoid is applied outside
        if config.response_quantiles:
            self.register_buffer("response_table", torch.zeros(len(RESPONSE_GRID_MEV), config.response_quantiles))
            self.register_buffer("response_fitted", torch.zeros((), dtype=torch.bool))

    @property
    def noise_dim(self) -> int:
        """z, then one normal for the total (with ``response_quantiles``), then two per voxel (with
        ``spot_energy_mev``)."""
        cfg = self.config
        return cfg.latent_dim + (1 if cfg.response_quantiles else 0) + (2 * self.n_voxels if cfg.spot_energy_mev > 0 else 0)

    def fit_data(self, energy_mev: np.ndarray, showers_mev: np.ndarray) -> None:
        """With ``response_quantiles``: the quantile table of E_grid/E_inc per grid energy (docstring)."""
        k = self.config.response_quantiles
        if not k:
            return
        energy = np.asarray(energy_mev, dtype=np.float64).ravel()
        response = np.asarray(showers_mev, dtype=np.float64).sum(1) / energy
        point = np.clip(np.rint(np.log2(energy / RESPONSE_GRID_MEV[0])), 0, len(RESPONSE_GRID_MEV) - 1).astype(int)
        levels = np.linspace(0.0, 1.0, k)
        fitted = [g for g in range(len(RESPONSE_GRID_MEV)) if np.count_nonzero(point == g) >= 10]
        if not fitted:
            raise ValueError("fit_data: no energy point has 10 training showers for the response table")
        q = np.stack([np.quantile(response[point == g], levels) for g in fitted])  # (n_fitted, K)
        grid = np.arange(len(RESPONSE_GRID_MEV))
        table = np.stack([np.interp(grid, fitted, q[:, j]) for j in range(k)], axis=1)
        self.response_table.copy_(torch.as_tensor(table, dtype=torch.float32))
        self.response_fitted.fill_(True)

    def _response(self, energy: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """E_grid/E_inc (N,) for incident energies (N,) MeV from one normal each (N,), by the inverse of
        the quantile table, linear in log2 E between grid points and between quantile levels."""
        table = self.response_table
        g, k = table.shape
        x = (torch.log2(energy.reshape(-1) / RESPONSE_GRID_MEV[0])).clamp(0.0, g - 1.0)
        i0 = torch.floor(x).clamp(max=g - 2)
        w = (x - i0).unsqueeze(1)
        i0 = i0.long()
        q = (1.0 - w) * table[i0] + w * table[i0 + 1]  # (N, K)
        t = normal_cdf(noise) * (k - 1)
        k0 = torch.floor(t).clamp(0, k - 2)
        f = (t - k0).unsqueeze(1)
        k0 = k0.long().unsqueeze(1)
        return ((1.0 - f) * q.gather(1, k0) + f * q.gather(1, k0 + 1)).squeeze(1)

    # -- the two halves ------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, conditions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, n_voxels) in model space (fractions of E_inc), conditions (B, n_cond) →
        mu, logvar, each (B, latent_dim)."""
        h = self.encoder(torch.cat([x, conditions], dim=1))
        return self.to_mu(h), self.to_logvar(h)

    def decode_logits(self, z: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """z (B, latent_dim), conditions (B, n_cond) → logits (B, n_voxels); sigmoid = fraction of E_inc."""
        return self.to_voxels(self.decoder(torch.cat([z, conditions], dim=1)))

    # -- the interface ---------------------------------------------------------------------------
    def generate(self, noise: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """noise (N, noise_dim) ~ N(0, 1), conditions (N, n_cond) → voxel energies (N, n_voxels) in MeV."""
        cfg = self.config
        latent = cfg.latent_dim
        # zoo.base.sigmoid, not torch.sigmoid: a trained decoder gives most voxels logits of -15 to
        # -30, where ONNX Runtime's Sigmoid is off by 100 % or returns 0 (zoo.base)
        fractions = sigmoid(self.decode_logits(noise[:, :latent], conditions))
        energy = self.energy_from_conditions(conditions)
        mean = self.postprocess(fractions, energy)
        total = mean.sum(1, keepdim=True)
        if cfg.response_quantiles:
            # a model never fitted to data (fit_data not run) keeps the decoder's total (a tensor
            # select, not a Python branch: the exported graph cannot branch on a buffer)
            drawn = (self._response(energy, noise[:, latent]) * energy.reshape(-1)).unsqueeze(1)
            total = torch.where(self.response_fitted, drawn, total)
            latent += 1
        if not (cfg.spot_energy_mev > 0 or cfg.response_quantiles):
            return mean
        out = self._fluctuate(mean, noise[:, latent:]) if cfg.spot_energy_mev > 0 else mean
        # the shower keeps its total (the decoder's, or the response table's): only the voxels
        # fluctuate, as the simulator's spots share a shower's deposit; no voxel above E_inc
        out = out * (total / out.sum(1, keepdim=True).clamp_min(1e-6))
        return torch.minimum(out, energy.reshape(-1, 1))

    def _fluctuate(self, mean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Voxel energies drawn around their means (N, n_voxels) MeV with noise (N, 2 n_voxels)
        (module docstring), before the shower is scaled to its total."""
        n = self.n_voxels
        lam = mean / self.config.spot_energy_mev  # expected deposits per voxel
        p_hit = one_minus_exp_neg(lam)  # 1 - exp(-lam) without the cancellation at small lam
        hit = normal_cdf(noise[:, :n]) < p_hit
        p = p_hit.clamp_min(1e-12)
        cv2 = (p * (2.0 / lam.clamp_min(1e-12) + 1.0) - 1.0).clamp_min(0.0)
        s2 = log1p(cv2)  # torch.log1p exports as Log(1 + x) (zoo.base)
        value = mean / p * torch.exp(torch.sqrt(s2) * noise[:, n:] - 0.5 * s2)
        return torch.where(hit, value, torch.zeros_like(value))

    def training_noise(self, step: str, batch_size: int) -> dict:
        """The reparameterisation noise: ``latent`` (B, latent_dim) standard normal."""
        return {"latent": ((batch_size, self.config.latent_dim), "normal")}

    def losses(self, batch: dict) -> dict:
        """{"loss", "reconstruction", "kl"}: per-shower sums over voxels / latent dims, batch means.

        batch: ``showers``, ``energy``, ``conditions`` and ``latent`` (B, latent_dim) ~ N(0, 1).
        """
        # Fractions of the incident energy; a voxel above E_inc (never, physically) would leave the
        # domain of the BCE, hence the clamp.
        x = self.preprocess(batch["showers"], batch["energy"]).clamp(0.0, 1.0)
        cond = batch["conditions"]
        mu, logvar = self.encode(x, cond)
        z = mu + torch.exp(0.5 * logvar) * batch["latent"]
        logits = self.decode_logits(z, cond)
        # Keras' mean BCE over voxels × ORIGINAL_DIM = the sum over voxels; BCE from logits l is
        # softplus(l) - x l (what binary_cross_entropy_with_logits computes), written out because
        # vmap has no batching rule for that op and decomposes it into five passes over the voxels
        reconstruction = (F.softplus(logits) - x * logits).sum(1)
        kl = -0.5 * (1.0 + logvar - mu.square() - logvar.exp()).sum(1)
        loss = reconstruction + self.config.kl_weight * kl
        return {"loss": loss.mean(), "reconstruction": reconstruction.mean(), "kl": kl.mean()}


# -- variants -------------------------------------------------------------------------------------
def _create(variant: str, defaults: dict, overrides: dict) -> Par04VAE:
    return build_variant(Par04VAE, variant, defaults, overrides)


@register_model
def par04_vae(**overrides) -> Par04VAE:
    """Par04 as published: its 18 r × 50 phi × 45 z grid (40500 voxels), E + angle + geometry (SiW, SciPb)."""
    return _create("par04_vae", dict(readout="par04", conditions=PAR04_CONDITIONS.to_dict()), overrides)


@register_model
def par04_vae_ds2(**overrides) -> Par04VAE:
    """CaloChallenge dataset 2 readout (45 × 16 × 9 = 6480 voxels), energy only.

    Dataset 2 has normal incidence and one geometry, so an angle or geometry column would be constant;
    the energy keeps Par04's linear E / 1024 GeV (dataset 2 spans 1 GeV to 1 TeV).
    """
    return _create("par04_vae_ds2", dict(readout="calochallenge-2", conditions=ENERGY_ONLY_CONDITIONS.to_dict()),
                   overrides)


@register_model
def par04_vae_pbwo4(**overrides) -> Par04VAE:
    """The Geant4 PbWO4 reference readout 'g4-pbwo4' (45 × 16 × 9), energy only, log-encoded, with voxel
    fluctuations of ε = 1 MeV and the total from a 101-level response table (see above), and a KL weight
    of 0.01: at Par04's 1 the posterior collapses on this data (KL → 0 nats: a mean-shower decoder whose
    showers differ only by the fluctuations); at 0.01 the latent carries the shower-to-shower shapes."""
    return _create("par04_vae_pbwo4", dict(readout="g4-pbwo4", conditions=LOG_ENERGY_CONDITIONS.to_dict(),
                                           spot_energy_mev=1.0, response_quantiles=101, kl_weight=0.01), overrides)


@register_model
def par04_vae_region(**overrides) -> Par04VAE:
    """One VAE per detector region, for fleets (``calozoo fleet``, the demo): ``par04_vae_pbwo4``'s energy-only,
    log-encoded conditions, voxel fluctuations and response table on a region's readout (by default the
    atlas-like photons at 0.20 < |eta| < 0.25, 368 voxels; a fleet gives each region its own)."""
    defaults = dict(conditions=LOG_ENERGY_CONDITIONS.to_dict(), spot_energy_mev=1.0, response_quantiles=101)
    if "readout" not in overrides:
        defaults["readout"] = atlas_region("photon_eta_020_025").readout.to_dict()
    return _create("par04_vae_region", defaults, overrides)
