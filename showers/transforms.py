"""Invertible, serialisable preprocessing of showers, and the encoding of model conditions.

A transform is described by a *spec*, a JSON-able list of small dicts, e.g.::

    [{"kind": "divide_by_incident"}, {"kind": "log", "eps": 1e-6}]

that is stored with a model and rebuilt with :func:`build_transform`. Every transform has
``forward(showers, incident_energies=None)``, ``inverse(x, incident_energies=None)`` and ``spec``
(``build_transform(t.spec)`` rebuilds ``t``). Kinds:

- ``divide_by_incident``: voxel energy / incident energy (FastCaloGAN, Par04);
- ``divide_by_constant`` (``constant``): voxel energy / a fixed scale;
- ``log`` (``eps``): log(x + eps);
- ``logit`` (``alpha``): CaloFlow's logit(alpha + (1 − 2 alpha) x), for x in [0, 1];

applied in the order listed. Inputs may be numpy arrays or torch tensors; the output is of the same
kind (and dtype and device). Shapes: showers (N, n_voxels) or any (N, ...), incident energies (N,) or
(N, 1) in the showers' units, usually MeV.

Conditions (incident energy, angle, geometry) are encoded by :func:`encode_conditions` under a
:class:`ConditionSpec`, which is stored with the model the same way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np
from scipy import special

__all__ = [
    "Chain",
    "ConditionSpec",
    "DivideByConstant",
    "DivideByIncident",
    "Log",
    "Logit",
    "Transform",
    "build_transform",
    "decode_energy",
    "encode_conditions",
    "list_transform_kinds",
]


# -- numpy / torch ----------------------------------------------------------------------------------
def _is_torch(x) -> bool:
    # Checked by module name so that numpy-only users never import torch.
    return type(x).__module__.split(".")[0] == "torch"


def _log(x):
    return x.log() if _is_torch(x) else np.log(x)


def _exp(x):
    return x.exp() if _is_torch(x) else np.exp(x)


def _logit(x):
    return x.logit() if _is_torch(x) else special.logit(x)


def _sigmoid(x):
    if not _is_torch(x):
        return special.expit(x)
    # exp(x) / (1 + exp(x)) for x < 0, not x.sigmoid(): the exported graph would use ONNX Runtime's
    # Sigmoid, 100 % off below x = -17 (zoo.base.sigmoid, the same formula, has the measurements)
    import torch

    neg = x < 0
    e = torch.exp(torch.where(neg, x, -x))
    return torch.where(neg, e, torch.ones_like(e)) / (1.0 + e)


def _per_shower(e, like):
    """Incident energies as a column broadcastable against ``like`` (N, ...), same array kind."""
    if e is None:
        raise ValueError("this transform needs the incident energies")
    tracing = False
    if _is_torch(like):
        import torch

        tracing = torch.jit.is_tracing()  # an ONNX export: the shapes are the graph's, checked by its inputs
        e = e.to(like) if torch.is_tensor(e) else torch.as_tensor(e, dtype=like.dtype, device=like.device)
    else:
        e = np.asarray(e, dtype=like.dtype if np.issubdtype(like.dtype, np.floating) else np.float64)
    e = e.reshape(-1)
    if not tracing and e.shape[0] != like.shape[0]:
        raise ValueError(f"{e.shape[0]} incident energies for {like.shape[0]} showers")
    return e.reshape((-1,) + (1,) * (like.ndim - 1))


def _float(x):
    """Numpy input as a float array (integers become float64); tensors pass through."""
    if _is_torch(x):
        return x
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


# -- the transforms ---------------------------------------------------------------------------------
class Transform:
    """An invertible map of showers; subclasses are frozen dataclasses whose fields are the spec."""

    kind: ClassVar[str]

    def forward(self, showers, incident_energies=None):
        """Showers (N, ...) → model space, same array kind."""
        raise NotImplementedError

    def inverse(self, x, incident_energies=None):
        """Model space (N, ...) → showers, same array kind."""
        raise NotImplementedError

    @property
    def spec(self) -> list[dict[str, Any]]:
        """The JSON-able list of dicts that :func:`build_transform` turns back into this transform."""
        return [{"kind": self.kind, **dataclasses.asdict(self)}]


@dataclass(frozen=True)
class DivideByIncident(Transform):
    """x = E_voxel / E_inc, per shower."""

    kind: ClassVar[str] = "divide_by_incident"

    def forward(self, showers, incident_energies=None):
        showers = _float(showers)
        return showers / _per_shower(incident_energies, showers)

    def inverse(self, x, incident_energies=None):
        x = _float(x)
        return x * _per_shower(incident_energies, x)


@dataclass(frozen=True)
class DivideByConstant(Transform):
    """x = E_voxel / constant."""

    constant: float
    kind: ClassVar[str] = "divide_by_constant"

    def __post_init__(self):
        if not (math.isfinite(self.constant) and self.constant != 0):
            raise ValueError(f"divide_by_constant needs a finite non-zero constant, got {self.constant}")

    def forward(self, showers, incident_energies=None):
        return _float(showers) / self.constant

    def inverse(self, x, incident_energies=None):
        return _float(x) * self.constant


@dataclass(frozen=True)
class Log(Transform):
    """x = log(E + eps); eps > 0 keeps empty voxels finite (they map to log(eps))."""

    eps: float = 1e-6
    kind: ClassVar[str] = "log"

    def __post_init__(self):
        if not self.eps > 0:
            raise ValueError(f"log needs eps > 0, got {self.eps}")

    def forward(self, showers, incident_energies=None):
        return _log(_float(showers) + self.eps)

    def inverse(self, x, incident_energies=None):
        # Not clipped at 0: that would break invertibility; a model that produces values below
        # log(eps) gets small negative energies back and must clip them itself.
        return _exp(_float(x)) - self.eps


@dataclass(frozen=True)
class Logit(Transform):
    """CaloFlow's x = logit(alpha + (1 − 2 alpha) u) for u in [0, 1]; alpha keeps 0 and 1 finite.

    u outside [0, 1] (e.g. energies not yet divided by the incident energy) gives nan.
    """

    alpha: float = 1e-6
    kind: ClassVar[str] = "logit"

    def __post_init__(self):
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"logit needs 0 < alpha < 0.5, got {self.alpha}")

    def forward(self, showers, incident_energies=None):
        return _logit(self.alpha + (1 - 2 * self.alpha) * _float(showers))

    def inverse(self, x, incident_energies=None):
        return (_sigmoid(_float(x)) - self.alpha) / (1 - 2 * self.alpha)


@dataclass(frozen=True)
class Chain(Transform):
    """Several transforms applied in order (forward) and undone in reverse order (inverse)."""

    steps: tuple[Transform, ...] = ()

    def forward(self, showers, incident_energies=None):
        x = _float(showers)
        for step in self.steps:
            x = step.forward(x, incident_energies)
        return x

    def inverse(self, x, incident_energies=None):
        x = _float(x)
        for step in reversed(self.steps):
            x = step.inverse(x, incident_energies)
        return x

    @property
    def spec(self) -> list[dict[str, Any]]:
        return [d for step in self.steps for d in step.spec]


_KINDS: dict[str, type[Transform]] = {
    cls.kind: cls for cls in (DivideByIncident, DivideByConstant, Log, Logit)
}


def list_transform_kinds() -> list[str]:
    """The kinds a spec may name."""
    return sorted(_KINDS)


def build_transform(spec) -> Transform:
    """A :class:`Transform` from a spec: a list of ``{"kind": ..., **params}`` dicts, or one dict.

    An empty list is the identity. Unknown kinds and unknown or bad parameters raise ValueError.
    """
    if isinstance(spec, dict):
        spec = [spec]
    if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
        raise ValueError(f"a transform spec is a list of dicts, got {type(spec).__name__}")
    steps = []
    for i, item in enumerate(spec):
        if not isinstance(item, dict) or "kind" not in item:
            raise ValueError(f"transform spec item {i} must be a dict with a 'kind', got {item!r}")
        params = {k: v for k, v in item.items() if k != "kind"}
        cls = _KINDS.get(item["kind"])
        if cls is None:
            raise ValueError(f"unknown transform kind {item['kind']!r}; known: {', '.join(list_transform_kinds())}")
        allowed = {f.name for f in dataclasses.fields(cls)}
        if set(params) - allowed:
            raise ValueError(f"transform {cls.kind!r} takes {sorted(allowed) or 'no parameters'}, "
                             f"got {sorted(params)}")
        try:
            steps.append(cls(**params))
        except TypeError as exc:  # a missing required parameter
            raise ValueError(f"transform {cls.kind!r}: {exc}") from exc
    return steps[0] if len(steps) == 1 else Chain(tuple(steps))


# -- conditions -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConditionSpec:
    """How a model's conditions are encoded; the columns are, in order:

    - energy: ``energy_encoding="linear"``: E / ``energy_scale_mev`` (default 1024 GeV, Par04's
      maximum energy); ``"log"``: (ln E − ln E_min) / (ln E_max − ln E_min) over
      ``energy_range_mev`` = (E_min, E_max), which maps that range onto [0, 1] (energies outside it
      extrapolate beyond [0, 1], they are not clipped);
    - angle, if ``use_angle``: angle / ``angle_max_deg`` (Par04: 90 degrees);
    - one column per name in ``geometries``: a one-hot encoding of the geometry (none if empty).
    """

    energy_encoding: str = "linear"
    energy_scale_mev: float = 1024e3
    energy_range_mev: tuple[float, float] = (1e3, 1024e3)
    use_angle: bool = False
    angle_max_deg: float = 90.0
    geometries: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "energy_range_mev", tuple(float(e) for e in self.energy_range_mev))
        object.__setattr__(self, "geometries", tuple(str(g) for g in self.geometries))
        if self.energy_encoding not in ("linear", "log"):
            raise ValueError(f"energy_encoding must be 'linear' or 'log', got {self.energy_encoding!r}")
        if not self.energy_scale_mev > 0:
            raise ValueError(f"energy_scale_mev must be > 0, got {self.energy_scale_mev}")
        lo, hi = self.energy_range_mev if len(self.energy_range_mev) == 2 else (0.0, 0.0)
        if not 0 < lo < hi:
            raise ValueError(
                f"energy_range_mev must be (E_min, E_max) with 0 < E_min < E_max, got {self.energy_range_mev}"
            )
        if not self.angle_max_deg > 0:
            raise ValueError(f"angle_max_deg must be > 0, got {self.angle_max_deg}")
        if len(set(self.geometries)) != len(self.geometries):
            raise ValueError(f"duplicate geometry names in {self.geometries}")

    @property
    def n_cond(self) -> int:
        """Number of condition columns."""
        return 1 + int(self.use_angle) + len(self.geometries)

    def to_dict(self) -> dict:
        """A JSON-able dict; :meth:`from_dict` rebuilds the spec."""
        d = dataclasses.asdict(self)
        d["energy_range_mev"] = list(self.energy_range_mev)
        d["geometries"] = list(self.geometries)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ConditionSpec:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ConditionSpec fields {sorted(unknown)}")
        return cls(**d)


def _column(values, n: int | None, what: str) -> np.ndarray:
    if _is_torch(values):
        values = values.detach().cpu().numpy()
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if n is not None and v.size == 1 and n != 1:
        v = np.full(n, v[0])
    if n is not None and v.size != n:
        raise ValueError(f"{v.size} {what} values for {n} energies")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"non-finite {what} values")
    return v


def encode_conditions(energy_mev, angle_deg=None, geometry=None, *, spec: ConditionSpec):
    """Condition vectors for a model: shape (N, spec.n_cond), float32.

    energy_mev: incident energies, (N,) or (N, 1), MeV, > 0 for the log encoding.
    angle_deg: incident angles in degrees, (N,) or a scalar; required iff ``spec.use_angle``.
    geometry: a geometry name for all showers, or a sequence of N names; required iff
        ``spec.geometries`` is non-empty. An unknown name raises ValueError listing the known ones.
    A torch ``energy_mev`` gives a torch tensor on its device; anything else a numpy array.
    """
    e = _column(energy_mev, None, "energy")
    n = e.size
    if spec.energy_encoding == "linear":
        cols = [e / spec.energy_scale_mev]
    else:
        if np.any(e <= 0):
            raise ValueError("the log energy encoding needs energies > 0")
        lo, hi = np.log(spec.energy_range_mev)
        cols = [(np.log(e) - lo) / (hi - lo)]
    if spec.use_angle:
        if angle_deg is None:
            raise ValueError("this ConditionSpec encodes the angle: pass angle_deg")
        cols.append(_column(angle_deg, n, "angle") / spec.angle_max_deg)
    elif angle_deg is not None:
        raise ValueError("this ConditionSpec has no angle column (use_angle=False), but angle_deg was given")
    if spec.geometries:
        if geometry is None:
            raise ValueError(f"this ConditionSpec encodes the geometry: pass geometry= one of {list(spec.geometries)}")
        names = [geometry] * n if isinstance(geometry, str) else [str(g) for g in geometry]
        if len(names) != n:
            raise ValueError(f"{len(names)} geometry names for {n} energies")
        index = {g: i for i, g in enumerate(spec.geometries)}
        unknown = sorted(set(names) - set(index))
        if unknown:
            raise ValueError(f"unknown geometry {', '.join(map(repr, unknown))}; known: {', '.join(spec.geometries)}")
        onehot = np.zeros((n, len(spec.geometries)))
        onehot[np.arange(n), [index[g] for g in names]] = 1.0
        cols.extend(onehot.T)
    elif geometry is not None:
        raise ValueError("this ConditionSpec has no geometry columns (geometries=()), but geometry was given")
    out = np.stack(cols, axis=1).astype(np.float32)
    if _is_torch(energy_mev):
        import torch

        return torch.from_numpy(out).to(energy_mev.device)
    return out


def decode_energy(conditions, *, spec: ConditionSpec):
    """Incident energies in MeV, shape (N,), from condition vectors (N, spec.n_cond) (column 0).

    The inverse of the energy part of :func:`encode_conditions`; numpy or torch in, same out.
    """
    c = conditions[:, 0]
    if spec.energy_encoding == "linear":
        return c * spec.energy_scale_mev
    lo, hi = np.log(spec.energy_range_mev)
    return _exp(c * (hi - lo) + lo)
