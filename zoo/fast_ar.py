"""FAST.AR-style autoregressive shower model: layer after layer along the shower axis.

For a REGULAR readout (n_layers L, n_alpha A, n_r R) the shower's likelihood factorises over layers,

    p(shower | c) = prod_l p(layer_l | layers_<l, c),

and within a layer the voxels are independent given that context: each voxel has its own
zero-inflated mixture, predicted by a small conv net from the layers before it.

Model space. u = E_voxel / E_inc (transform spec ``[{"kind": "divide_by_incident"}]``). Exact zeros
are common (8 % of the voxels are hit at 1 GeV, 91 % at 256 GeV), so each voxel is

    u = 0                       with probability pi_0 = sigmoid(zero_logit),
    log u ~ sum_k w_k N(mu_k, sigma_k)   otherwise (K Gaussians in log space, i.e. log-normals in u).

The loss is the negative log-likelihood in that space (log u for the non-zero voxels, so the
constant Jacobian term sum log u of the data is left out), summed over voxels, averaged over showers.

Context (causal). The distribution of layer l is a function of
  * a window of the ``context_layers`` = k layers before it, l-k .. l-1 (zeros before layer 0), as k
    image channels of shape (A, R), each voxel fed as f(u) = log(1 + u / feature_eps) / log(1 + 1 /
    feature_eps) (0 for an empty voxel, 1 at u = 1), plus one channel with the radial coordinate;
  * a conditioning vector: the encoded conditions, a learned embedding of the layer index, and the
    fraction of E_inc deposited in all layers before l (a running sum: the memory beyond the window).
The window goes through a 2-D conv net over (alpha, r) shared by all layers (padding is circular in
alpha, zeros in r); the conditioning vector scales and shifts the first conv's channels (FiLM); a 1x1
conv head gives the 1 + 3K numbers per voxel. We chose a per-layer 2-D net on a causal window over a
3-D causal conv because sampling then runs the very same function once per layer, and causality holds
by construction (layer l's window never contains layer l). There is no batch norm anywhere: it would
mix showers (and layers, in training) and break the causal structure.

Training uses teacher forcing: all L windows of the true shower in one batched pass.

Sampling (``generate``) is an unrolled Python loop over the L layers (it unrolls in the ONNX graph)
and a pure function of (noise, conditions). The noise is (N, L · 2 · A · R) standard normals, read as
(N, L, 2, A, R), layer-major, so that layer l consumes only the noise block of layer l:
  * channel 0 → u = Phi(n) (the normal CDF): one uniform chooses "zero" (u < pi_0) and otherwise the
    component, by comparing (u − pi_0) / (1 − pi_0) with the cumulative weights (tensor comparisons, no
    argmax or Gumbels);
  * channel 1 → the value: log u = mu_k + sigma_k n, clipped at ``max_log_fraction`` (a voxel cannot hold
    more than E_inc).
The result times E_inc (recovered from the conditions) is MeV, never negative.

Variants: ``fast_ar`` (readout 'g4-pbwo4', 45 × 16 × 9, small widths for a CPU) and ``fast_ar_24``
(FAST.AR's 24 × 24 × 24 grid; see the variant for its edges).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from showers.readout import Readout
from showers.transforms import ConditionSpec
from zoo._registry import register_model
from zoo.base import ModelConfig, ShowerModel

__all__ = ["FastAR", "FastARConfig"]

# log(E / 1 GeV) / log(1024): the AR model sees energies over three decades, which a linear
# encoding would squash near 0 at low energies.
LOG_ENERGY_CONDITIONS = ConditionSpec(energy_encoding="log", energy_range_mev=(1e3, 1.024e6))
# Transforms that keep zeros at zero and positive values positive: what the zero-inflated mixture needs.
_SCALING_TRANSFORMS = {"divide_by_incident", "divide_by_constant"}
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class FastARConfig(ModelConfig):
    """Config of :class:`FastAR`.

    context_layers: k, how many previous layers the conv net sees.
    width: channels of the conv net; n_conv: number of 3x3 convs (>= 1).
    n_components: K, Gaussians per voxel in log(E / E_inc).
    layer_embedding_dim: size of the learned layer-index embedding; cond_hidden: width of the MLP
        that turns (conditions, layer embedding, energy so far) into the FiLM scale and shift.
    feature_eps: scale of the context features f(u) = log(1 + u / eps) / log(1 + 1 / eps).
    min_scale: smallest sigma of a component, in log space (keeps the density bounded).
    max_log_fraction: samples of log(E / E_inc) are clipped here (0: a voxel holds at most E_inc).
    zero_fraction: voxels with E / E_inc <= this count as empty (0: exact zeros only).
    learning_rate, batch_size: read by the likelihood trainer.
    """

    readout: dict | str = "g4-pbwo4"
    conditions: dict = field(default_factory=LOG_ENERGY_CONDITIONS.to_dict)
    transform: list = field(default_factory=lambda: [{"kind": "divide_by_incident"}])
    context_layers: int = 3
    width: int = 32
    n_conv: int = 3
    n_components: int = 4
    layer_embedding_dim: int = 8
    cond_hidden: int = 32
    feature_eps: float = 1e-5
    min_scale: float = 1e-2
    max_log_fraction: float = 0.0
    zero_fraction: float = 0.0
    learning_rate: float = 1e-3
    batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("context_layers", "width", "n_conv", "n_components", "layer_embedding_dim", "cond_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (self.feature_eps > 0 and self.min_scale > 0 and self.zero_fraction >= 0):
            raise ValueError("feature_eps and min_scale must be > 0 and zero_fraction >= 0")
        kinds = [t.get("kind") for t in self.transform]
        if not set(kinds) <= _SCALING_TRANSFORMS:
            raise ValueError(f"fast_ar models E >= 0 with exact zeros, so its transform may only rescale "
                             f"({sorted(_SCALING_TRANSFORMS)}), got {kinds}")


def _pad_alpha_r(x: torch.Tensor) -> torch.Tensor:
    """(B, C, A, R) → (B, C, A + 2, R + 2): circular in alpha (the angle wraps), zeros in r."""
    x = torch.cat([x[:, :, -1:], x, x[:, :, :1]], dim=2)
    return F.pad(x, (1, 1))


class FastAR(ShowerModel):
    """Layer-autoregressive model with zero-inflated log-normal mixtures per voxel (module docstring)."""

    family = "fast_ar"
    kind = "likelihood"
    config_class = FastARConfig

    def __init__(self, config: FastARConfig, variant: str = ""):
        super().__init__(config, variant)
        if not self.readout.is_regular:
            raise ValueError(f"fast_ar needs a regular readout; {self.readout.name!r} has differing layers")
        self.grid = self.readout.shape  # (L, A, R)
        n_layers, n_alpha, n_r = self.grid
        c, k, w = config, config.context_layers, config.width
        self.n_params = 1 + 3 * c.n_components  # zero logit, K weight logits, K means, K raw scales

        self.layer_embedding = nn.Embedding(n_layers, c.layer_embedding_dim)
        self.film = nn.Sequential(
            nn.Linear(self.n_cond + c.layer_embedding_dim + 1, c.cond_hidden), nn.SiLU(),
            nn.Linear(c.cond_hidden, 2 * w),
        )
        self.convs = nn.ModuleList(
            [nn.Conv2d(k + 1, w, 3)] + [nn.Conv2d(w, w, 3) for _ in range(c.n_conv - 1)]  # padded by hand
        )
        self.head = nn.Conv2d(w, self.n_params, 1)
        # The radial position matters (core vs halo) and zero padding alone barely tells it: give it
        # as an input channel (alpha is symmetric, so no alpha channel).
        r_coord = torch.linspace(0.0, 1.0, n_r).expand(1, 1, n_alpha, n_r).clone()
        self.register_buffer("r_coord", r_coord, persistent=False)
        self._init_head()

    def _init_head(self) -> None:
        # Start near a sensible marginal: means spread over log(E/E_inc) from 1e-5 to 0.1, sigma ~ 1.
        K = self.config.n_components
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
            self.head.bias[1 + K:1 + 2 * K] = torch.linspace(-11.5, -2.3, K)
            self.head.bias[1 + 2 * K:] = math.log(math.e - 1.0)  # softplus(.) = 1

    @property
    def noise_dim(self) -> int:
        return 2 * self.n_voxels

    # -- pieces shared by training and sampling ----------------------------------------------------
    def _feature(self, u: torch.Tensor) -> torch.Tensor:
        """Context feature of fractions u >= 0, in [0, ~1]: 0 for empty voxels, log-like above eps."""
        eps = self.config.feature_eps
        return torch.log1p(u / eps) / math.log1p(1.0 / eps)

    def _net(self, window: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """window (B, k, A, R) features of the previous layers, h (B, n_cond + emb + 1) → (B, P, A, R)."""
        x = torch.cat([window, self.r_coord.expand(window.shape[0], -1, -1, -1)], dim=1)
        scale, shift = self.film(h).chunk(2, dim=1)
        x = self.convs[0](_pad_alpha_r(x)) * (1.0 + scale[:, :, None, None]) + shift[:, :, None, None]
        x = F.silu(x)
        for conv in self.convs[1:]:
            x = F.silu(conv(_pad_alpha_r(x)))
        return self.head(x)

    def _split(self, params: torch.Tensor):
        """(..., P, A, R) → zero_logit (..., A, R), weight logits, means, sigmas (..., K, A, R)."""
        K = self.config.n_components
        zero_logit = params[..., 0, :, :]
        w_logit = params[..., 1:1 + K, :, :]
        mu = params[..., 1 + K:1 + 2 * K, :, :]
        sigma = F.softplus(params[..., 1 + 2 * K:, :, :]) + self.config.min_scale
        return zero_logit, w_logit, mu, sigma

    # -- training (teacher forcing) -----------------------------------------------------------------
    def distribution_params(self, showers: torch.Tensor, energy: torch.Tensor,
                            conditions: torch.Tensor) -> torch.Tensor:
        """Predicted parameters of every layer given the true previous layers.

        showers (N, n_voxels) MeV, energy (N,) MeV, conditions (N, n_cond) → (N, L, P, A, R), P = 1 + 3K;
        entry l depends on layers < l only.
        """
        n = showers.shape[0]
        L, A, R = self.grid
        k = self.config.context_layers
        u = self.preprocess(showers, energy).reshape(n, L, A, R).clamp_min(0.0)
        feats = torch.cat([u.new_zeros(n, k, A, R), self._feature(u)], dim=1)  # (N, k + L, A, R)
        windows = torch.stack([feats[:, l:l + k] for l in range(L)], dim=1)  # layer l sees l-k .. l-1
        per_layer = u.sum(dim=(2, 3))  # (N, L)
        # exclusive running sum (not cumsum − x, which would leak layer l through rounding)
        before = torch.cat([per_layer.new_zeros(n, 1), per_layer[:, :-1].cumsum(1)], dim=1)
        h = torch.cat([conditions[:, None, :].expand(n, L, -1),
                       self.layer_embedding.weight[None].expand(n, L, -1),
                       before[..., None]], dim=2)
        params = self._net(windows.reshape(n * L, k, A, R), h.reshape(n * L, -1))
        return params.reshape(n, L, self.n_params, A, R)

    def layer_nll(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative log-likelihood per shower and layer, summed over the layer's voxels, (N, L) each:
        (the zero / non-zero Bernoulli part, the log-energy mixture part of the non-zero voxels)."""
        showers, energy = batch["showers"], batch["energy"]
        params = self.distribution_params(showers, energy, batch["conditions"])
        n = showers.shape[0]
        u = self.preprocess(showers, energy).reshape(n, *self.grid)
        zero_logit, w_logit, mu, sigma = self._split(params)
        empty = u <= self.config.zero_fraction
        y = torch.log(torch.where(empty, torch.ones_like(u), u))  # dummy 0 for empty voxels: no nan gradients
        log_comp = -0.5 * ((y[:, :, None] - mu) / sigma).square() - sigma.log() - _HALF_LOG_2PI
        log_mix = torch.logsumexp(F.log_softmax(w_logit, dim=2) + log_comp, dim=2)
        # -log pi_0 = softplus(-z) for empty voxels, -log(1 - pi_0) = softplus(z) for hit ones
        nll_zero = torch.where(empty, F.softplus(-zero_logit), F.softplus(zero_logit))
        nll_energy = torch.where(empty, torch.zeros_like(log_mix), -log_mix)
        return nll_zero.sum(dim=(2, 3)), nll_energy.sum(dim=(2, 3))

    def losses(self, batch: dict) -> dict:
        """{"loss": NLL summed over voxels, mean over showers; "nll_zero", "nll_energy": its two parts}."""
        nll_zero, nll_energy = self.layer_nll(batch)
        nll_zero, nll_energy = nll_zero.sum(1).mean(), nll_energy.sum(1).mean()
        return {"loss": nll_zero + nll_energy, "nll_zero": nll_zero, "nll_energy": nll_energy}

    # -- sampling --------------------------------------------------------------------------------
    def _sample_layer(self, params: torch.Tensor, n_choice: torch.Tensor, n_value: torch.Tensor) -> torch.Tensor:
        """params (N, P, A, R), two normal noises (N, A, R) → fractions u >= 0 (N, A, R), deterministic."""
        zero_logit, w_logit, mu, sigma = self._split(params)
        uniform = 0.5 * (1.0 + torch.erf(n_choice * (1.0 / math.sqrt(2.0))))  # Phi(n); erf exports everywhere
        p_zero = torch.sigmoid(zero_logit)
        # Where the uniform falls inside the non-zero part, rescaled to [0, 1]: picks the component.
        v = (uniform - p_zero) / (1.0 - p_zero).clamp_min(1e-12)
        cum_w = torch.softmax(w_logit, dim=1).cumsum(dim=1)  # (N, K, A, R)
        passed = (v[:, None] >= cum_w[:, :-1]).to(params.dtype)  # boundaries below v: 1 … 1 0 … 0
        ones = torch.ones_like(passed[:, :1])
        onehot = torch.cat([ones, passed], dim=1) - torch.cat([passed, torch.zeros_like(ones)], dim=1)
        log_u = (onehot * mu).sum(1) + (onehot * sigma).sum(1) * n_value
        log_u = torch.clamp(log_u, max=self.config.max_log_fraction)
        return torch.where(uniform < p_zero, torch.zeros_like(log_u), torch.exp(log_u))

    def generate(self, noise: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """noise (N, 2 · n_voxels) standard normal, layer-major (N, L, 2, A, R); conditions (N, n_cond)
        → voxel energies (N, n_voxels) in MeV. Layer l uses only noise[:, l]."""
        n = noise.shape[0]
        L, A, R = self.grid
        k = self.config.context_layers
        noise = noise.reshape(n, L, 2, A, R)
        feats = [torch.zeros_like(noise[:, 0, 0])] * k  # the zero layers before the front
        before = torch.zeros_like(noise[:, 0, 0, 0, 0])  # (N,) fraction deposited so far
        layers = []
        for l in range(L):  # unrolled: L is a Python int
            emb = self.layer_embedding.weight[l][None].expand(n, -1)
            h = torch.cat([conditions, emb, before[:, None]], dim=1)
            params = self._net(torch.stack(feats[-k:], dim=1), h)
            u_l = self._sample_layer(params, noise[:, l, 0], noise[:, l, 1])
            layers.append(u_l)
            feats.append(self._feature(u_l))
            before = before + u_l.sum(dim=(1, 2))
        u = torch.stack(layers, dim=1).reshape(n, -1)
        return self.postprocess(u, self.energy_from_conditions(conditions))


# -- variants -------------------------------------------------------------------------------------
def _create(variant: str, defaults: dict, overrides: dict) -> FastAR:
    known = {f.name for f in dataclasses.fields(FastARConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"{variant}: unknown config fields {sorted(unknown)}; known: {sorted(known)}")
    return FastAR(FastARConfig(**{**defaults, **overrides}), variant=variant)


@register_model
def fast_ar(**overrides) -> FastAR:
    """The Geant4 PbWO4 reference readout 'g4-pbwo4' (45 × 16 × 9 = 6480 voxels), small enough for a CPU."""
    return _create("fast_ar", dict(readout="g4-pbwo4", width=32, n_conv=3, n_components=4), overrides)


def fast_ar_24_readout() -> Readout:
    """FAST.AR's 24 × 24 × 24 grid, given PbWO4 dimensions (X0 = 8.903 mm, Moliere radius 21.9 mm):
    24 layers of 1 X0 (24 X0 deep: an EM shower up to ~1 TeV peaks by ~12 X0 and is >95 % contained),
    24 alpha bins, 24 radial bins of 2 mm out to 48 mm (~2.2 Moliere radii, ~95 % of the energy)."""
    return Readout.regular("fast-ar-24", 24, 24, np.linspace(0.0, 48.0, 25), 8.903, material="PbWO4")


@register_model
def fast_ar_24(**overrides) -> FastAR:
    """FAST.AR's 24 × 24 × 24 grid (13824 voxels, :func:`fast_ar_24_readout`), energy only (log-encoded)."""
    return _create("fast_ar_24", dict(readout=fast_ar_24_readout().to_dict(), width=32, n_conv=3, n_components=4),
                   overrides)
