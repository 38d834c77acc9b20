"""The one narrow interface every calozoo model implements.

What the trainers, the exporter and the registry rely on, and nothing more:

- ``kind``: ``"likelihood"`` (trained by minimising ``losses(batch)["loss"]``: VAE, AR, flows) or
  ``"adversarial"`` (``critic_loss(batch)`` and ``generator_loss(batch)`` over
  ``critic_parameters()`` and ``generator_parameters()``: the GAN);
- ``training_noise(step, batch_size)``: the random numbers a loss needs, which the trainer draws and
  passes in the batch. A loss is a pure function of (weights, buffers, batch), which is what lets
  ``trainers.bank`` stack K instances of the model with ``torch.func.vmap`` and give each model its
  own random stream;
- ``noise_dim`` and ``generate(noise, conditions)``: the *inference graph*, (noise (N, noise_dim),
  encoded conditions (N, n_cond)) → voxel energies in MeV (N, n_voxels), inverse preprocessing
  included, pure torch ops so that it exports to ONNX complete on its own;
- ``sample(energy_mev, angle_deg, geometry)``: draws the noise and calls ``generate``;
- ``config``: a typed dataclass (``asdict`` is JSON-able) holding the readout, the condition spec and
  the transform spec, so that a checkpoint or an exported model rebuilds the model alone.

A batch is a dict of tensors: ``showers`` (B, n_voxels) MeV, ``energy`` (B,) MeV and
``conditions`` (B, n_cond), the encoded conditions, plus one tensor per entry of ``training_noise``.

What a loss may not do, so that it runs under ``vmap``: draw random numbers itself (they come in the
batch), call ``torch.autograd.grad`` (use ``torch.func.grad``/``vjp``, which nest), branch in Python
on a tensor's value, or create tensors from ``self.device`` (under the bank the module's own
parameters live on the meta device; derive new tensors from the inputs).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from showers.readout import Readout, get_readout
from showers.transforms import ConditionSpec, build_transform, encode_conditions

__all__ = ["LOG_ENERGY_CONDITIONS", "LR_SCHEDULES", "NOISE_KINDS", "ConfigError", "ModelConfig", "SearchSpace", "ShowerModel",
           "atlas_region", "build_variant", "family_class", "log1p", "model_from_checkpoint", "normal_cdf",
           "one_minus_exp_neg", "sigmoid"]

#: learning-rate schedules a family's config may name in ``lr_schedule`` (the trainer reads it beside
#: ``learning_rate``; ``trainers.bank.lr_factor``): constant, or cosine annealing to zero over the run
LR_SCHEDULES = ("constant", "cosine")

#: how a training noise tensor is drawn: standard normal, or uniform on [0, 1)
NOISE_KINDS = ("normal", "uniform")
#: energy-only conditions, log-encoded over 1 GeV .. 1 TeV (the variants for one readout and one particle).
#: On the Geant4 PbWO4 file (1-256 GeV), Par04's E / 1024 GeV squeezes 1, 2, 4 GeV into [0.001, 0.004],
#: which a decoder barely tells apart; the log encoding spreads the energy points evenly over [0, 0.8].
LOG_ENERGY_CONDITIONS = ConditionSpec(energy_encoding="log", energy_range_mev=(1e3, 1.024e6))


def atlas_region(name: str):
    """The ``atlas-like`` detector's region ``name`` (``showers.detector.Region``): the default readout of
    the per-region variants. The detector builds its 300 readouts on first use, so it is imported here,
    when a variant needs it, not with the zoo."""
    from showers.detector import get_detector

    return get_detector("atlas-like").region(name)


@dataclass
class ModelConfig:
    """Fields every family's config has; a family's config subclasses this and adds its own.

    readout: the readout (a built-in name, a Readout or its dict; stored as the dict).
    conditions: the ConditionSpec (or its dict; stored as the dict).
    transform: the preprocessing spec (``showers.transforms``), applied to voxel energies in MeV.
    """

    readout: dict | str = "g4-pbwo4"
    conditions: dict = field(default_factory=lambda: ConditionSpec().to_dict())
    transform: list = field(default_factory=lambda: [{"kind": "divide_by_incident"}])

    def __post_init__(self) -> None:
        if not isinstance(self.readout, dict):
            self.readout = get_readout(self.readout).to_dict()
        if isinstance(self.conditions, ConditionSpec):
            self.conditions = self.conditions.to_dict()
        if isinstance(self.transform, dict):
            self.transform = [self.transform]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_saved(cls, saved: dict) -> ModelConfig:
        """The config a checkpoint holds; fields it lacks take what they meant when it was written
        (a family overrides this when a new field's default differs from that), unknown ones are dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


@dataclass
class SearchSpace:
    """A family's hyper-parameter search space for sweeps (``tune/``): each field is named after a
    field of the family's config and holds its candidate values (a grid takes their product; a
    random or ASHA search samples them). An empty tuple leaves the field at its default."""

    def candidates(self) -> dict[str, list]:
        return {f.name: list(getattr(self, f.name)) for f in dataclasses.fields(self) if getattr(self, f.name)}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.candidates().values())

    @classmethod
    def restricted(cls, only: bool = False, **values) -> SearchSpace:
        """This space with some fields' candidates replaced (unknown fields are refused); with
        ``only``, the other fields are left out of the search."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{cls.__name__}: no field {sorted(unknown)}; fields: {sorted(known)}")
        rest = {k: () for k in known - set(values)} if only else {}
        return cls(**rest, **{k: tuple(v) for k, v in values.items()})


_FAMILIES: dict[str, type] = {}


class ShowerModel(nn.Module):
    """Base class of calozoo models (see the module docstring for the interface)."""

    family: ClassVar[str] = ""
    kind: ClassVar[str] = "likelihood"
    config_class: ClassVar[type] = ModelConfig
    search_space: ClassVar[type] = SearchSpace

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.family:
            if cls.family in _FAMILIES and _FAMILIES[cls.family] is not cls:
                raise ValueError(f"model family {cls.family!r} is defined twice")
            _FAMILIES[cls.family] = cls

    def __init__(self, config: ModelConfig, variant: str = ""):
        super().__init__()
        self.config = config
        self.variant = variant or self.family
        self.readout = Readout.from_dict(config.readout)
        self.condition_spec = ConditionSpec.from_dict(config.conditions)
        self.transform = build_transform(config.transform)
        self.n_voxels = self.readout.n_voxels
        self.n_cond = self.condition_spec.n_cond

    # -- conditions and preprocessing ----------------------------------------------------------
    def encode_conditions(self, energy_mev, angle_deg=None, geometry=None, ignore_unused: bool = False) -> torch.Tensor:
        """(N,) MeV (+ angle, geometry) → encoded conditions (N, n_cond) float32 on the model's device.

        ignore_unused: drop an angle or geometry the model is not conditioned on (data sets record
        the angle even where it is fixed) instead of refusing it.
        """
        if ignore_unused:
            angle_deg = angle_deg if self.condition_spec.use_angle else None
            geometry = geometry if self.condition_spec.geometries else None
        energy = np.asarray(energy_mev.detach().cpu() if torch.is_tensor(energy_mev) else energy_mev,
                            dtype=np.float64).ravel()
        if torch.is_tensor(angle_deg):
            angle_deg = angle_deg.detach().cpu().numpy()
        cond = encode_conditions(energy, angle_deg, geometry, spec=self.condition_spec)
        return torch.as_tensor(np.asarray(cond), dtype=torch.float32, device=self.device)

    def energy_from_conditions(self, conditions: torch.Tensor) -> torch.Tensor:
        """Incident energy in MeV (N,) from encoded conditions, in torch ops (exportable)."""
        spec = self.condition_spec
        c = conditions[:, 0]
        if spec.energy_encoding == "linear":
            return c * spec.energy_scale_mev
        lo, hi = spec.energy_range_mev
        return torch.exp(c * (math.log(hi) - math.log(lo)) + math.log(lo))

    def preprocess(self, showers_mev: torch.Tensor, energy_mev: torch.Tensor) -> torch.Tensor:
        return self.transform.forward(showers_mev, energy_mev)

    def postprocess(self, x: torch.Tensor, energy_mev: torch.Tensor) -> torch.Tensor:
        """Model space → MeV per voxel, never negative."""
        return torch.clamp(self.transform.inverse(x, energy_mev), min=0.0)

    def fit_data(self, energy_mev: np.ndarray, showers_mev: np.ndarray) -> None:
        """Statistics of the training data that the model keeps in buffers (so they travel with its
        checkpoints and its exported graph), computed once before training; (N,) MeV, (N, n_voxels)
        MeV. Most models keep none."""

    def calibrate(self) -> None:
        """Refit what the model's generation keeps of its own showers against the statistics of
        ``fit_data`` (a family that calibrates its output, e.g. ``zoo.calibration``); called before each
        checkpoint's validation. Most models keep none."""

    # -- the interface ---------------------------------------------------------------------------
    @property
    def noise_dim(self) -> int:
        raise NotImplementedError

    def generate(self, noise: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """The inference graph: (noise (N, noise_dim), conditions (N, n_cond)) → MeV (N, n_voxels)."""
        raise NotImplementedError

    def threshold_edges(self, noise: torch.Tensor, conditions: torch.Tensor, rel: float) -> torch.Tensor | None:
        """(N, n_voxels) bool: the voxels that a fixed threshold of the graph keeps or zeroes depending on a
        value within the fraction ``rel`` of it (two correct runtimes may round such a value to either side;
        the ONNX parity gate, ``zoo.export.onnx_parity``, leaves them out and counts them). None: the graph
        has no such threshold."""
        return None

    def training_noise(self, step: str, batch_size: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """The random numbers the loss of ``step`` reads from its batch: {name: (shape, kind)}, kind in
        NOISE_KINDS. step: "loss" (likelihood models), "critic" or "generator" (adversarial models)."""
        return {}

    def draw_training_noise(self, step: str, batch_size: int, generator: torch.Generator | None = None,
                            device=None) -> dict[str, torch.Tensor]:
        """The tensors of ``training_noise``, drawn from ``generator`` (on ``device``, default the model's)."""
        device = self.device if device is None else device
        out = {}
        for name, (shape, kind) in self.training_noise(step, batch_size).items():
            draw = torch.randn if kind == "normal" else torch.rand
            out[name] = draw(*shape, generator=generator, device=device)
        return out

    def losses(self, batch: dict) -> dict:
        """Likelihood models: {"loss": scalar to minimise, ...components for logging}."""
        raise NotImplementedError

    def critic_loss(self, batch: dict) -> dict:
        """Adversarial models: {"loss": the critic's loss, ...}."""
        raise NotImplementedError

    def generator_loss(self, batch: dict) -> dict:
        """Adversarial models: {"loss": the generator's loss, ...}."""
        raise NotImplementedError

    def critic_parameters(self):
        raise NotImplementedError

    def generator_parameters(self):
        raise NotImplementedError

    # -- conveniences built on the interface -------------------------------------------------------
    @property
    def device(self) -> torch.device:
        try:
            return next(self.parameters()).device
        except StopIteration:
            return torch.device("cpu")

    def draw_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.noise_dim, generator=generator, device=self.device)

    @torch.no_grad()
    def sample(self, energy_mev, angle_deg=None, geometry=None, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None, ignore_unused: bool = False) -> torch.Tensor:
        """Showers (N, n_voxels) in MeV for the given conditions."""
        was = self.training
        self.eval()
        try:
            cond = self.encode_conditions(energy_mev, angle_deg, geometry, ignore_unused=ignore_unused)
            if noise is None:
                noise = self.draw_noise(cond.shape[0], generator)
            return self.generate(noise, cond)
        finally:
            self.train(was)

    def inference_module(self) -> nn.Module:
        """A module whose forward(noise, conditions) is the inference graph, in eval mode."""
        return _InferenceGraph(self).eval()

    def describe(self) -> dict:
        """What travels with the model (checkpoint, ONNX metadata, MLflow tags)."""
        return {"family": self.family, "variant": self.variant, "kind": self.kind, "config": self.config.to_dict(),
                "noise_dim": self.noise_dim, "n_voxels": self.n_voxels, "n_cond": self.n_cond}


class _InferenceGraph(nn.Module):
    def __init__(self, model: ShowerModel):
        super().__init__()
        self.model = model

    def forward(self, noise: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        return self.model.generate(noise, conditions)


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x), the standard normal CDF, through erf (which every ONNX runtime has): how the models turn
    their standard-normal noise into uniforms inside an exportable graph."""
    return 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))


# -- elementwise functions that ONNX Runtime computes as accurately as torch ----------------------------
# An inference graph is only as exact as the runtime's kernels. Measured on ONNX Runtime 1.32's CPU
# provider against float64 (tests/test_onnx_gate.py keeps the check): its ``Sigmoid`` is off by
# 2e-4 relative at -10, +95 % at -16.9, and returns 0 below about -17 (torch: 1e-7 everywhere), and a
# trained decoder feeds it such logits for most voxels of a shower; torch's ``log1p`` and ``expm1``
# export as Log(1 + x) and Exp(x) - 1, off by 1e-5 at 1e-3 and by 100 % at 1e-9. ``Exp``, ``Log``,
# ``Softplus``, ``Erf``, ``Div`` and ``Where`` are within 2e-7 relative over the whole float32 range.
# So the graphs use the three functions below, written in those ops: each equals torch's own to float
# rounding (a few 1e-8 relative), so training and the losses do not change, and ONNX Runtime gives the
# same values to float rounding.


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """1 / (1 + exp(-x)) as exp(x) / (1 + exp(x)) for x < 0: the exponential is never of a positive
    number, so the result keeps its relative precision down to exp(x)'s (float32's smallest normal,
    x ≈ -87) where ONNX Runtime's Sigmoid loses it below x ≈ -8. Gradients are sigmoid's (at 0 too)."""
    neg = x < 0
    e = torch.exp(torch.where(neg, x, -x))
    return torch.where(neg, e, torch.ones_like(e)) / (1.0 + e)


def log1p(x: torch.Tensor) -> torch.Tensor:
    """log(1 + x) to a few float32 ulps for small |x| (Goldberg's correction: log(u) · x / (u - 1)
    with u = 1 + x rounded, and x itself where u rounds to 1), in Log, Div and Where."""
    u = 1.0 + x
    d = u - 1.0
    exact = d == 0  # |x| below half an ulp of 1: log1p(x) = x to float precision
    return torch.where(exact, x, torch.log(u) * (x / torch.where(exact, torch.ones_like(d), d)))


def one_minus_exp_neg(x: torch.Tensor) -> torch.Tensor:
    """1 - exp(-x) for x >= 0 (the probability of at least one event of a Poisson of mean x) to
    float32 precision: below 0.25 its Taylor series to x^7 (truncation < 2e-9 relative), where
    1 - exp(-x) would lose up to all its digits to the cancellation; above, 1 - exp(-x) itself
    (the cancellation costs less than 3e-7 relative there)."""
    s = x * (1 - x / 2 * (1 - x / 3 * (1 - x / 4 * (1 - x / 5 * (1 - x / 6 * (1 - x / 7))))))
    return torch.where(x < 0.25, s, 1.0 - torch.exp(-x))


def build_variant(cls: type, variant: str, defaults: dict, overrides: dict) -> ShowerModel:
    """What every variant function does: its defaults, updated by the caller's overrides (unknown
    config fields are refused, naming the known ones), into ``cls``'s config and model."""
    fields = {f.name: f for f in dataclasses.fields(cls.config_class)}
    unknown = set(overrides) - set(fields)
    if unknown:
        raise ConfigError(f"{variant}: unknown config fields {sorted(unknown)}; known: {sorted(fields)}")
    checked = {}
    for key, value in overrides.items():
        f = fields[key]
        ref = defaults.get(key, f.default if f.default is not dataclasses.MISSING else None)
        checked[key] = _checked_value(variant, key, value, ref)
    return cls(cls.config_class(**{**defaults, **checked}), variant=variant)


class ConfigError(ValueError, TypeError):
    """A model config override that does not fit the config: an unknown field or a value of the wrong
    kind (the message names the field, the value and what is allowed)."""


#: the largest value of a whole-number config field, by name, else INT_MAX (widths, latent and
#: embedding sizes, layer counts, knots): a typo of a few zeros (``--set n_steps=100000000``) is
#: refused when the model is built, before any worker, trial or training starts, rather than found
#: hanging in the first validation
INT_LIMITS = {"batch_size": 65_536, "n_steps": 1000, "energy_n_steps": 1000, "n_critic": 100,
              "response_quantiles": 100_000}
INT_MAX = 16_384
#: the whole-number fields for which 0 is a value (0 quantiles: no response table; 0 energy steps: the
#: shape model's); others start at 1
ZERO_ALLOWED = frozenset({"response_quantiles", "energy_n_steps"})
#: at most this many entries in a list of widths (layers)
MAX_LAYERS = 64


def _checked_int(value, key: str, bad) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise bad("a whole number")
    low, high = (0 if key in ZERO_ALLOWED else 1), INT_LIMITS.get(key, INT_MAX)
    if not low <= value <= high:
        raise bad(f"a whole number from {low} to {high:,}")
    return int(value)


def _checked_value(variant: str, key: str, value, ref):
    """``value`` for the field ``key`` whose default is ``ref``: numbers stay numbers (whole numbers
    within INT_LIMITS), flags flags, tuples tuples (a list becomes one); anything else of another kind
    is refused."""
    def bad(kind):
        return ConfigError(f"{variant}: config field {key} must be {kind}, got {value!r}")

    if ref is None or isinstance(ref, (dict, str)):
        if isinstance(ref, str) and isinstance(value, (bool, int, float, list, tuple)):
            raise bad("a name")
        return value
    if isinstance(ref, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(ref, int):
        return _checked_int(value, key, bad)
    if isinstance(ref, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(value)):
            raise bad("a finite number")
        return float(value)
    if isinstance(ref, (tuple, list)):
        if not isinstance(value, (tuple, list)):
            raise bad("a list, e.g. [64,64]")
        if ref and all(isinstance(r, int) and not isinstance(r, bool) for r in ref):  # widths
            if not 1 <= len(value) <= MAX_LAYERS:
                raise bad(f"a list of 1 to {MAX_LAYERS} whole numbers")
            value = [_checked_int(v, key, lambda kind: bad(f"a list whose entries are each {kind}")) for v in value]
        return tuple(value) if isinstance(ref, tuple) else list(value)
    return value


def family_class(family: str) -> type:
    from zoo._registry import _import_families

    _import_families()
    try:
        return _FAMILIES[family]
    except KeyError:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(sorted(_FAMILIES))}") from None


def model_from_checkpoint(state: dict) -> ShowerModel:
    """Rebuild a model from a checkpoint dict (``family``, ``variant``, ``config``, ``model``)."""
    cls = family_class(state["family"])
    config = cls.config_class.from_saved(state["config"])
    model = cls(config, variant=state.get("variant", ""))
    model.load_state_dict(state["model"])
    return model
