"""FastCaloGAN: ATLAS's conditional WGAN-GP, one small GAN per detector region.

After ATLAS, "AtlFast3: the next generation of fast simulation in ATLAS", Comput Softw Big Sci 6, 7
(2022), and ATL-SOFT-PUB-2020-006 ("Fast simulation of the ATLAS calorimeter system with Generative
Adversarial Networks"). Each (particle, |eta| slice) region gets its own pair of plain MLPs:

- generator  G 50-50-100-200-N: latent noise (50) with the encoded conditions appended, hidden
  widths 50, 100, 200 (ReLU), N outputs = the region's voxels;
- critic     D N-N-N-N-1: the voxels with the conditions prepended, three hidden layers as wide as
  the input (ReLU), one unbounded score (a Wasserstein critic, no sigmoid);
- trained as a WGAN-GP (Gulrajani et al. 2017): Adam(1e-4, beta1 0.5, beta2 0.999), batch 128,
  5 critic steps per generator step, gradient penalty lambda 10.

Model space. Voxel energies are divided by the incident energy (``divide_by_incident``; FastCaloGAN
normalises to the particle's true momentum, which for these massless or ultra-relativistic particles
is the same), so a voxel holds the fraction of E_inc it sees. The condition is log-scaled energy
(ConditionSpec ``energy_encoding="log"`` over 256 MeV–4.19 TeV, dataset 1's 256 MeV × 2^k points),
which maps the 15 energy points to equally spaced values in [0, 1].

Output activation: ReLU on E/E_inc (``output="relu"``, the default). Why ReLU and not a sigmoid:

- showers are sparse: many voxels are exactly empty. ReLU reaches an exact 0 with a finite
  pre-activation; a sigmoid only approaches 0 as its input goes to minus infinity, so the generator
  would have to push weights without bound to leave a voxel empty, and never quite does;
- voxel fractions are small (a 368-voxel region averages ~3e-3 of E_inc per voxel): the sigmoid's
  bound of 1 never binds and its flat tail near 0 is where the gradients would vanish;
``output="sigmoid"`` (each voxel in (0, 1) of E_inc) and ``output="none"`` (for a transform whose model
space is not non-negative, e.g. a log) are available; ``generate`` clamps at 0 MeV in any case.

The critic takes ``[conditions | voxels]``; its gradient penalty is taken with ``torch.func.grad``
so that K critics train stacked under ``vmap`` (``trainers.bank``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from showers.campaign import FASTCALOGAN_ENERGIES_MEV
from showers.transforms import ConditionSpec
from zoo._registry import register_model
from zoo.base import ModelConfig, SearchSpace, ShowerModel, atlas_region, build_variant, sigmoid

__all__ = ["FastCaloGAN", "FastCaloGANConfig", "MLP", "for_region",
           "fastcalogan", "fastcalogan_pion", "fastcalogan_pbwo4"]

#: the range of dataset 1's energy points, 256 MeV × 2^k, k = 0..14
ENERGY_RANGE_MEV = (FASTCALOGAN_ENERGIES_MEV[0], FASTCALOGAN_ENERGIES_MEV[-1])

_ACTIVATIONS = {
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.2),
    "silu": F.silu,
    "sigmoid": sigmoid,  # zoo.base.sigmoid: ONNX Runtime's Sigmoid is 100 % off below -17
    "none": lambda x: x,
}


def _fastcalogan_conditions() -> dict:
    return ConditionSpec(energy_encoding="log", energy_range_mev=ENERGY_RANGE_MEV).to_dict()


@dataclass
class FastCaloGANConfig(ModelConfig):
    """FastCaloGAN's hyper-parameters (defaults: the ATLAS paper's).

    latent_dim: noise dimension (the generator's input, before the conditions are appended).
    generator_widths: hidden widths of G; G is latent -> widths... -> n_voxels.
    critic_widths: hidden widths of D; None means three layers as wide as the voxels (N, N, N).
        ``()`` makes D a single linear map (used by the tests).
    activation: hidden-layer activation of both networks (relu, leaky_relu, silu).
    output: G's final activation in model space (relu, sigmoid or none; see the module docstring).
    learning_rate, beta1, beta2: Adam, the same for G and D (read by the adversarial trainer).
    batch_size: showers per step; n_critic: critic steps per generator step (the trainer reads both).
    gp_lambda: weight of the gradient penalty in the critic loss.
    """

    readout: dict | str = "calochallenge-1-photons"
    conditions: dict = field(default_factory=_fastcalogan_conditions)
    transform: list = field(default_factory=lambda: [{"kind": "divide_by_incident"}])
    latent_dim: int = 50
    generator_widths: tuple[int, ...] = (50, 100, 200)
    critic_widths: tuple[int, ...] | None = None
    activation: str = "relu"
    output: str = "relu"
    learning_rate: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    batch_size: int = 128
    n_critic: int = 5
    gp_lambda: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        # JSON turns tuples into lists; keep tuples so that configs compare equal after a round trip
        self.generator_widths = tuple(int(w) for w in self.generator_widths)
        if self.critic_widths is not None:
            self.critic_widths = tuple(int(w) for w in self.critic_widths)
        for name in ("activation", "output"):
            if getattr(self, name) not in _ACTIVATIONS:
                raise ValueError(f"{name} must be one of {sorted(_ACTIVATIONS)}, got {getattr(self, name)!r}")
        if self.latent_dim < 1 or self.n_critic < 1 or self.batch_size < 1:
            raise ValueError("latent_dim, n_critic and batch_size must be >= 1")
        if not self.gp_lambda >= 0:
            raise ValueError(f"gp_lambda must be >= 0, got {self.gp_lambda}")


@dataclass
class FastCaloGANSearch(SearchSpace):
    """FastCaloGAN's sweep: ATLAS tuned the learning rate, the batch, the critic steps, the gradient
    penalty and the widths by grid search (chi2/ndf 16 -> 11)."""

    learning_rate: tuple[float, ...] = (5e-5, 1e-4, 2e-4)
    batch_size: tuple[int, ...] = (64, 128, 256)
    n_critic: tuple[int, ...] = (3, 5)
    gp_lambda: tuple[float, ...] = (5.0, 10.0)
    generator_widths: tuple[tuple[int, ...], ...] = ((50, 100, 200), (100, 200, 400))
    latent_dim: tuple[int, ...] = (50, 100)


class MLP(nn.Module):
    """A plain stack of ``nn.Linear``: activation after every layer but the last, ``output`` after it.

    Shapes: (B, widths[0]) -> (B, widths[-1]).
    """

    def __init__(self, widths: Sequence[int], activation: str = "relu", output: str = "none"):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.activation, self.output = activation, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = _ACTIVATIONS[self.activation]
        for layer in self.layers[:-1]:
            x = act(layer(x))
        return _ACTIVATIONS[self.output](self.layers[-1](x))


class FastCaloGAN(ShowerModel):
    """FastCaloGAN's conditional WGAN-GP for one readout (see the module docstring).

    ``generator``: MLP (latent_dim + n_cond) -> generator_widths -> n_voxels, output in model space
    (E_voxel / E_inc). ``critic``: MLP (n_cond + n_voxels) -> critic_widths -> 1.
    """

    family: ClassVar[str] = "fastcalogan"
    kind: ClassVar[str] = "adversarial"
    config_class: ClassVar[type] = FastCaloGANConfig
    search_space: ClassVar[type] = FastCaloGANSearch

    def __init__(self, config: FastCaloGANConfig, variant: str = ""):
        super().__init__(config, variant)
        n = self.n_voxels
        critic_widths = (n, n, n) if config.critic_widths is None else config.critic_widths
        self.generator = MLP((config.latent_dim + self.n_cond, *config.generator_widths, n),
                             config.activation, config.output)
        self.critic = MLP((self.n_cond + n, *critic_widths, 1), config.activation, "none")

    @property
    def noise_dim(self) -> int:
        return self.config.latent_dim

    # -- the two networks --------------------------------------------------------------------------
    def generator_forward(self, noise: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """G: noise (B, latent_dim), conditions (B, n_cond) -> model space (B, n_voxels), E/E_inc."""
        return self.generator(torch.cat([noise, conditions], dim=1))

    def critic_forward(self, x: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """D: model-space showers (B, n_voxels), conditions (B, n_cond) -> scores (B,), unbounded."""
        return self.critic(torch.cat([conditions, x], dim=1)).squeeze(1)

    def gradient_penalty(self, real: torch.Tensor, fake: torch.Tensor, conditions: torch.Tensor,
                         mix: torch.Tensor) -> torch.Tensor:
        """Gulrajani et al.'s penalty: mean over the batch of (||dD/dx||_2 - 1)^2 at x = mix real + (1-mix) fake.

        real, fake: model-space showers (B, n_voxels); conditions (B, n_cond); mix (B,) uniform in
        [0, 1]. The gradient is taken with respect to the voxels only: the conditions are given, not
        generated, so the critic need not be 1-Lipschitz in them. ``torch.func.grad`` (not
        ``torch.autograd.grad``) so that it nests under vmap; back-propagating the penalty through it
        gives the second-order gradient in the critic's weights.
        """
        x = mix.reshape(-1, 1) * real + (1 - mix.reshape(-1, 1)) * fake
        grad = torch.func.grad(lambda v: self.critic_forward(v, conditions).sum())(x)
        return ((grad.norm(2, dim=1) - 1) ** 2).mean()

    # -- the adversarial interface -----------------------------------------------------------------
    def training_noise(self, step: str, batch_size: int) -> dict:
        """``latent`` (B, latent_dim) normal for G; the critic step also ``gp_mix`` (B,) uniform."""
        noise = {"latent": ((batch_size, self.config.latent_dim), "normal")}
        if step == "critic":
            noise["gp_mix"] = ((batch_size,), "uniform")
        return noise

    def critic_loss(self, batch: dict) -> dict:
        """WGAN-GP critic loss: E[D(fake)] - E[D(real)] + gp_lambda * penalty.

        batch: ``showers`` (B, n_voxels) MeV, ``energy`` (B,) MeV, ``conditions`` (B, n_cond), ``latent``
        and ``gp_mix`` (``training_noise``). The fakes are made without a graph, so this loss reaches
        the critic's parameters only. Returns ``loss`` and, detached for logging, ``wasserstein``
        (E[D(real)] - E[D(fake)], the critic's estimate of the Wasserstein-1 distance), ``gp``,
        ``d_real``, ``d_fake``.
        """
        cond = batch["conditions"]
        real = self.preprocess(batch["showers"], batch["energy"]).to(cond.dtype)
        with torch.no_grad():  # the critic step must not build (or pay for) G's graph
            fake = self.generator_forward(batch["latent"], cond)
        d_real = self.critic_forward(real, cond).mean()
        d_fake = self.critic_forward(fake, cond).mean()
        gp = self.gradient_penalty(real, fake, cond, batch["gp_mix"])
        loss = d_fake - d_real + self.config.gp_lambda * gp
        return {"loss": loss, "wasserstein": (d_real - d_fake).detach(), "gp": gp.detach(),
                "d_real": d_real.detach(), "d_fake": d_fake.detach()}

    def generator_loss(self, batch: dict) -> dict:
        """WGAN generator loss: -E[D(G(z, c))] for the batch's conditions and ``latent`` z.

        Back-propagating also fills the critic's gradients; the trainer zeroes them before its next
        critic step.
        """
        cond = batch["conditions"]
        d_fake = self.critic_forward(self.generator_forward(batch["latent"], cond), cond).mean()
        return {"loss": -d_fake, "d_fake": d_fake.detach()}

    def critic_parameters(self):
        return self.critic.parameters()

    def generator_parameters(self):
        return self.generator.parameters()

    # -- inference ---------------------------------------------------------------------------------
    def generate(self, noise: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """noise (N, latent_dim), encoded conditions (N, n_cond) -> voxel energies (N, n_voxels) in MeV, >= 0.

        G's output times E_inc, which is decoded from the conditions in torch ops (so the exported
        graph needs nothing but its two inputs).
        """
        x = self.generator_forward(noise, conditions)
        return self.postprocess(x, self.energy_from_conditions(conditions))


# -- variants ------------------------------------------------------------------------------------------
def _create(variant: str, defaults: dict, overrides: dict) -> FastCaloGAN:
    return build_variant(FastCaloGAN, variant, defaults, overrides)


def for_region(region, **overrides) -> FastCaloGAN:
    """A FastCaloGAN for any detector region (``showers.detector.Region``): N from its readout.

    The variant name stays ``fastcalogan``: ``create_model("fastcalogan", **config)`` rebuilds it.
    """
    return _create("fastcalogan", {"readout": region.readout}, overrides)


@register_model
def fastcalogan(**overrides) -> FastCaloGAN:
    """FastCaloGAN for atlas-like photons at 0.20 < |eta| < 0.25 (CaloChallenge dataset 1 photons), 368 voxels."""
    if "readout" in overrides:  # don't build the detector for nothing
        return _create("fastcalogan", {}, overrides)
    return for_region(atlas_region("photon_eta_020_025"), **overrides)


@register_model
def fastcalogan_pion(**overrides) -> FastCaloGAN:
    """FastCaloGAN for atlas-like pions at 0.20 < |eta| < 0.25 (dataset 1 pions' binning), 533 voxels."""
    defaults = {} if "readout" in overrides else {"readout": atlas_region("pion_eta_020_025").readout}
    return _create("fastcalogan_pion", defaults, overrides)


@register_model
def fastcalogan_pbwo4(**overrides) -> FastCaloGAN:
    """FastCaloGAN on the Geant4 PbWO4 reference readout (g4-pbwo4: 45 x 16 x 9 = 6480 voxels).

    The critic is capped at (1024, 512, 256): FastCaloGAN's D N-N-N would be 3 x 6480^2 ~ 126M
    weights, too big to train on a CPU and far more than a fully-connected critic on one region needs.
    """
    return _create("fastcalogan_pbwo4", {"readout": "g4-pbwo4", "critic_widths": (1024, 512, 256)}, overrides)
