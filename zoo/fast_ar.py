"""FAST.AR-style autoregressive shower model: layer after layer along the shower axis.

For a REGULAR readout (n_layers L, n_alpha A, n_r R) the shower's likelihood factorises over layers,

    p(shower | c) = prod_l p(layer_l | layers_<l, c),

and within a layer the voxels are independent given that context: each voxel has its own
zero-inflated mixture, predicted by a small conv net from the layers before it.

Model space. u = E_voxel / E_inc (transform spec ``[{"kind": "divide_by_incident"}]``). Exact zeros
are common (8 % of the voxels are hit at 1 GeV, 91 % at 256 GeV), so each voxel has 1 + K outcomes with
probabilities p = softmax(logits): "empty" (u = 0) with p_0, else component k with p_k, where

    log u ~ N(mu_k, sigma_k)     (K Gaussians in log space, i.e. log-normals in u).

The loss is the negative log-likelihood in that space (log u for the non-zero voxels, so the
constant Jacobian term sum log u of the data is left out), summed over voxels, averaged over showers;
``losses`` also reports its two parts, -log P(empty or hit) and -log p(log u | hit).

Context (causal). The distribution of layer l is a function of
  * a window of the ``context_layers`` = k layers before it, l-k .. l-1 (zeros before layer 0), as k
    image channels of shape (A, R), each voxel fed as f(u) = log(1 + u / feature_eps) / log(1 + 1 /
    feature_eps) (0 for an empty voxel, 1 at u = 1);
  * the encoded conditions and a learned embedding of the layer index, through a small MLP that scales
    and shifts the first conv's channels (FiLM), plus a learned bias per (channel, radial bin);
  * the fraction of E_inc deposited in all layers before l (a running sum: the memory beyond the
    window), as a bias along a learned direction of the first conv's channels.
The window goes through a 2-D conv net over (alpha, r) shared by all layers (circular in alpha, zero
padded in r); a 1x1 conv head gives the 1 + 3K numbers per voxel. We chose a per-layer 2-D net on a
causal window over a 3-D causal conv because sampling then runs the very same function once per layer,
and causality holds by construction (layer l's window never contains layer l). There is no batch norm
anywhere: it would mix showers (and layers, in training) and break the causal structure.

Training uses teacher forcing: all L windows of the true shower in one batched pass.

Sampling (``generate``) is an unrolled Python loop over the L layers (it unrolls in the ONNX graph)
and a pure function of (noise, conditions). The noise is (N, L · 2 · A · R) standard normals, read as
(N, L, 2, A, R), layer-major, so that layer l consumes only the noise block of layer l:
  * channel 0 → a uniform Phi(n) (the normal CDF, via erf), compared with the cumulative outcome
    probabilities: below p_0 the voxel is empty, otherwise the number of boundaries passed is the
    component (tensor comparisons: no argmax, no Gumbels, no data-dependent control flow);
  * channel 1 → the value: log u = mu_k + sigma_k n, clipped at ``max_log_fraction`` (a voxel cannot hold
    more than E_inc).
The result times E_inc (recovered from the conditions) is MeV, never negative. Everything that does not
depend on earlier layers (FiLM for all layers, the uniforms) is computed once before the loop, which
keeps the unrolled graph small (about 50 ONNX nodes per layer): the onnxscript optimiser's time grows
with the node count and dominates the export.

Variants: ``fast_ar`` (readout 'g4-pbwo4', 45 × 16 × 9, small widths for a CPU) and ``fast_ar_24``
(FAST.AR's 24 × 24 × 24 grid; see :func:`fast_ar_24_readout` for its edges).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from showers.readout import Readout
from zoo._registry import register_model
from zoo.base import LOG_ENERGY_CONDITIONS, ModelConfig, SearchSpace, ShowerModel, build_variant, log1p, normal_cdf

__all__ = ["FastAR", "FastARConfig"]

# log(E / 1 GeV) / log(1024): the AR model sees energies over three decades, which a linear
# encoding would squash near 0 at low energies.
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
        that turns (conditions, layer embedding) into the FiLM scale and shift.
    feature_eps: scale of the context features f(u) = log(1 + u / eps) / log(1 + 1 / eps).
    min_scale: smallest sigma of a component, in log space (keeps the density bounded).
    max_log_fraction: samples of log(E / E_inc) are clipped here (0: a voxel holds at most E_inc).
    zero_fraction: in training, voxels with E / E_inc <= this count as empty (0: exact zeros only;
        the sampler does not re-apply it to the log-normal values it draws).
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


@dataclass
class FastARSearch(SearchSpace):
    """FAST.AR's sweep: the mixture size and the context (how many layers, how deep a net)."""

    n_components: tuple[int, ...] = (2, 4, 8)
    context_layers: tuple[int, ...] = (2, 3, 5)
    n_conv: tuple[int, ...] = (2, 3)
    width: tuple[int, ...] = (16, 32)
    learning_rate: tuple[float, ...] = ()


class FastAR(ShowerModel):
    """Layer-autoregressive model with zero-inflated log-normal mixtures per voxel (module docstring)."""

    family = "fast_ar"
    search_space = FastARSearch
    kind = "likelihood"
    config_class = FastARConfig

    def __init__(self, config: FastARConfig, variant: str = ""):
        super().__init__(config, variant)
        if not self.readout.is_regular:
            raise ValueError(f"fast_ar needs a regular readout; {self.readout.name!r} has differing layers")
        self.grid = self.readout.shape  # (L, A, R)
        n_layers, n_alpha, n_r = self.grid
        c, k, w = config, config.context_layers, config.width
        self.n_params = 1 + 3 * c.n_components  # 1 + K outcome logits (empty, components), K means, K raw scales

        self.layer_embedding = nn.Embedding(n_layers, c.layer_embedding_dim)
        self.film = nn.Sequential(
            nn.Linear(self.n_cond + c.layer_embedding_dim, c.cond_hidden), nn.SiLU(),
            nn.Linear(c.cond_hidden, 2 * w),
        )
        # Radial position matters (core vs halo) and zero padding alone barely tells it; alpha is
        # symmetric. So: a learned bias per (channel, r bin) after the first conv.
        self.r_bias = nn.Parameter(torch.zeros(1, w, 1, n_r))
        # The energy deposited before the layer enters as a bias along a learned direction.
        self.before_weight = nn.Parameter(torch.zeros(1, w, 1, 1))
        # Convs are 'valid' in alpha (the input is padded circularly once, by n_conv rows: the same as
        # circular padding before every conv, in fewer ops) and zero-padded in r.
        self.convs = nn.ModuleList(
            [nn.Conv2d(k, w, 3, padding=(0, 1))] + [nn.Conv2d(w, w, 3, padding=(0, 1)) for _ in range(c.n_conv - 1)]
        )
        self.head = nn.Conv2d(w, self.n_params, 1)
        wrap = torch.arange(-c.n_conv, n_alpha + c.n_conv) % n_alpha  # alpha index of each padded row
        self.register_buffer("alpha_wrap", wrap, persistent=False)
        self._init_head()

    def _init_head(self) -> None:
        # Start near a sensible marginal: means spread over E/E_inc from 1e-6 to 1e-2 (most voxels of a
        # shower hold a tiny fraction), sigma ~ 1, all outcomes equally likely.
        K = self.config.n_components
        with torch.no_grad():
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
            self.head.bias[1 + K:1 + 2 * K] = torch.linspace(math.log(1e-6), math.log(1e-2), K)
            self.head.bias[1 + 2 * K:] = math.log(math.e - 1.0)  # softplus(.) = 1

    @property
    def noise_dim(self) -> int:
        return 2 * self.n_voxels

    # -- pieces shared by training and sampling ----------------------------------------------------
    def _feature(self, u: torch.Tensor) -> torch.Tensor:
        """Context feature of fractions u (..., A, R) >= 0, in [0, ~1], padded circularly in alpha:
        (..., A + 2 n_conv, R). 0 for empty voxels, log-like above feature_eps."""
        eps = self.config.feature_eps
        # zoo.base.log1p: torch.log1p exports as Log(1 + x), 100 % off for u / eps below 1e-8
        f = log1p(u * (1.0 / eps)) * (1.0 / math.log1p(1.0 / eps))
        return f.index_select(-2, self.alpha_wrap)

    def _film(self, conditions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """conditions (N, n_cond) → FiLM factor (N, L, W, 1, 1) and shift incl. the r bias (N, L, W, 1, R)."""
        n, n_layers = conditions.shape[0], self.grid[0]
        h = torch.cat([conditions[:, None, :].expand(n, n_layers, -1),
                       self.layer_embedding.weight[None].expand(n, -1, -1)], dim=2)
        scale, shift = self.film(h).chunk(2, dim=2)
        return (1.0 + scale)[..., None, None], shift[..., None, None] + self.r_bias[None]

    def _net(self, window, factor, shift, before) -> torch.Tensor:
        """One layer's parameters from its context, for a batch B of (shower, layer) pairs.

        window (B, k, A + 2 n_conv, R): padded features of the k previous layers; factor (B, W, 1, 1),
        shift (B, W, 1, R): FiLM; before (B, 1, 1, 1): fraction of E_inc in earlier layers → (B, P, A, R).
        """
        # the (W, 1, R)-sized terms are summed first: one full-size add instead of two
        x = self.convs[0](window) * factor + (shift + before * self.before_weight)
        x = F.silu(x)
        for conv in self.convs[1:]:
            x = F.silu(conv(x))
        return self.head(x)

    def _split(self, params: torch.Tensor):
        """(..., P, A, R) → outcome logits (..., 1 + K, A, R) [empty, component 1..K], means, sigmas (..., K, A, R)."""
        K = self.config.n_components
        logits, mu, raw_scale = params.split([1 + K, K, K], dim=-3)
        return logits, mu, F.softplus(raw_scale) + self.config.min_scale

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
        feats = self._feature(u)  # (N, L, A', R)
        feats = torch.cat([feats.new_zeros(n, k, *feats.shape[2:]), feats], dim=1)  # zero layers before the front
        windows = feats.unfold(1, k, 1)[:, :L].permute(0, 1, 4, 2, 3)  # (N, L, k, A', R): layer l sees l-k .. l-1
        per_layer = u.sum(dim=(2, 3))  # (N, L)
        # exclusive running sum (not cumsum − x, which would leak layer l through rounding)
        before = torch.cat([per_layer.new_zeros(n, 1), per_layer[:, :-1].cumsum(1)], dim=1)
        factor, shift = self._film(conditions)
        params = self._net(windows.reshape(n * L, k, *feats.shape[2:]), factor.flatten(0, 1), shift.flatten(0, 1),
                           before.reshape(n * L, 1, 1, 1))
        return params.reshape(n, L, self.n_params, A, R)

    def layer_nll(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative log-likelihood per shower and layer, summed over the layer's voxels, (N, L) each, in two
        parts: -log P(empty or not), and -log p(log u | not empty) for the hit voxels."""
        showers, energy = batch["showers"], batch["energy"]
        params = self.distribution_params(showers, energy, batch["conditions"])
        n = showers.shape[0]
        u = self.preprocess(showers, energy).reshape(n, *self.grid)
        logits, mu, sigma = self._split(params)
        log_p = F.log_softmax(logits, dim=2)  # (N, L, 1 + K, A, R)
        log_p_hit = torch.logsumexp(log_p[:, :, 1:], dim=2)
        empty = u <= self.config.zero_fraction
        y = torch.log(torch.where(empty, torch.ones_like(u), u))  # dummy 0 for empty voxels: no nan gradients
        log_comp = -0.5 * ((y[:, :, None] - mu) / sigma).square() - sigma.log() - _HALF_LOG_2PI
        log_density = torch.logsumexp(log_p[:, :, 1:] + log_comp, dim=2) - log_p_hit
        nll_zero = -torch.where(empty, log_p[:, :, 0], log_p_hit)
        nll_energy = torch.where(empty, torch.zeros_like(log_density), -log_density)
        return nll_zero.sum(dim=(2, 3)), nll_energy.sum(dim=(2, 3))

    def losses(self, batch: dict) -> dict:
        """{"loss": NLL summed over voxels, mean over showers; "nll_zero", "nll_energy": its two parts}."""
        nll_zero, nll_energy = self.layer_nll(batch)
        nll_zero, nll_energy = nll_zero.sum(1).mean(), nll_energy.sum(1).mean()
        return {"loss": nll_zero + nll_energy, "nll_zero": nll_zero, "nll_energy": nll_energy}

    # -- sampling --------------------------------------------------------------------------------
    def _sample_layer(self, params: torch.Tensor, uniform: torch.Tensor, n_value: torch.Tensor) -> torch.Tensor:
        """params (N, P, A, R), a uniform and a normal (N, 1, A, R) → fractions u >= 0 (N, 1, A, R).

        The outcomes (empty, component 1, …, K) partition [0, 1) by their cumulative probabilities c_0 < c_1
        < … < c_K = 1: the voxel is empty if uniform < c_0, else its component is the number of c_1 … c_{K-1}
        at or below the uniform (tensor comparisons: no argmax, no data-dependent control flow).
        """
        K = self.config.n_components
        logits, mu, raw_scale = params.split([1 + K, K, K], dim=1)
        # Unnormalised cumulative probabilities compared with uniform × their total: the softmax's
        # division is folded into the comparison (a softmax over a non-last axis also costs ONNX
        # Runtime two transposes per layer), and the max is subtracted as a softmax does.
        cum = torch.exp(logits - logits.amax(dim=1, keepdim=True)).cumsum(dim=1)  # (N, 1 + K, A, R)
        threshold = uniform * cum[:, -1:]
        empty = threshold < cum[:, :1]
        component = (threshold >= cum[:, 1:-1]).sum(dim=1, keepdim=True)  # (N, 1, A, R), int64 in [0, K)
        # sigma of the chosen component only (softplus is elementwise: the same value as _split's)
        sigma = F.softplus(raw_scale.gather(1, component)) + self.config.min_scale
        log_u = mu.gather(1, component) + sigma * n_value
        log_u = torch.clamp(log_u, max=self.config.max_log_fraction)
        return torch.where(empty, torch.zeros_like(log_u), torch.exp(log_u))

    def generate(self, noise: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """noise (N, 2 · n_voxels) standard normal, layer-major (N, L, 2, A, R); conditions (N, n_cond)
        → voxel energies (N, n_voxels) in MeV. Layer l uses only noise[:, l]."""
        n = noise.shape[0]
        L, A, R = self.grid
        noise = noise.reshape(n, L, 2, A, R)
        uniform = normal_cdf(noise[:, :, :1])
        n_value = noise[:, :, 1:]
        factor, shift = self._film(conditions)  # everything that does not depend on earlier layers, at once
        # the k zero layers before the front, already padded
        window = self._feature(torch.zeros_like(uniform[:, 0])).expand(-1, self.config.context_layers, -1, -1)
        before = torch.zeros_like(uniform[:, 0, :, :1, :1])  # (N, 1, 1, 1) fraction deposited so far
        layers = []
        for l in range(L):  # unrolled: L is a Python int
            params = self._net(window, factor[:, l], shift[:, l], before)
            u_l = self._sample_layer(params, uniform[:, l], n_value[:, l])  # (N, 1, A, R)
            layers.append(u_l)
            window = torch.cat([window[:, 1:], self._feature(u_l)], dim=1)
            before = before + u_l.sum(dim=(2, 3), keepdim=True)
        u = torch.cat(layers, dim=1).reshape(n, -1)
        return self.postprocess(u, self.energy_from_conditions(conditions))


# -- variants -------------------------------------------------------------------------------------
def _create(variant: str, defaults: dict, overrides: dict) -> FastAR:
    return build_variant(FastAR, variant, defaults, overrides)


@register_model
def fast_ar(**overrides) -> FastAR:
    """The Geant4 PbWO4 reference readout 'g4-pbwo4' (45 × 16 × 9 = 6480 voxels), small enough for a CPU."""
    return _create("fast_ar", dict(readout="g4-pbwo4", width=32, n_conv=3, n_components=4), overrides)


def fast_ar_24_readout() -> Readout:
    """FAST.AR's 24 × 24 × 24 grid; calozoo's choice of mm edges, for PbWO4 (X0 = 8.903 mm, Moliere
    radius 21.9 mm): 24 layers of 1 X0 (24 X0 deep; t95 ~ t_max + 0.08 Z + 9.6 X0 puts ~95 % longitudinal
    containment at ~100 GeV, a little less above), 24 alpha bins, and 24 radial bins of 2 mm out to 48 mm
    (~2.2 Moliere radii: over 95 % of the energy, with the core resolved at 2 mm ~ 0.1 R_M)."""
    return Readout.regular("fast-ar-24", 24, 24, np.linspace(0.0, 48.0, 25), 8.903, material="PbWO4")


@register_model
def fast_ar_24(**overrides) -> FastAR:
    """FAST.AR's 24 × 24 × 24 grid (13824 voxels, :func:`fast_ar_24_readout`), energy only (log-encoded)."""
    return _create("fast_ar_24", dict(readout=fast_ar_24_readout().to_dict(), width=32, n_conv=3, n_components=4),
                   overrides)
