"""Readout geometry: how a shower's energy is binned into voxels.

A readout is a stack of layers along the shower axis. Each layer is a polar grid around the axis:
radial bins with given edges (mm) times ``n_alpha`` equal angular bins covering [-pi, pi). Layers
may differ from one another, and a layer may have no voxels at all (CaloChallenge dataset 1 keeps
such layers in its XMLs: ``r_edges="0"``).

Voxel order is the CaloChallenge one: layer outermost, then alpha, then r fastest, so that a
regular readout reshapes as ``showers.reshape(N, n_layers, n_alpha, n_r)``.

Readouts come from the official CaloChallenge binning XMLs (shipped in ``showers/data/binning``),
from the Par04 grid, or from the built-in definitions (:func:`get_readout` lists them).
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

from showers.errors import ShowerDataError

__all__ = ["Layer", "Readout", "get_readout", "list_readouts", "register_readout"]


@dataclass(frozen=True)
class Layer:
    """One layer of a readout.

    r_edges: radial bin edges in mm, increasing, starting at 0 (``(0.0,)`` or ``()``: no voxels).
    n_alpha: number of equal angular bins over [-pi, pi).
    """

    r_edges: tuple[float, ...]
    n_alpha: int = 1

    def __post_init__(self) -> None:
        edges = tuple(float(e) for e in self.r_edges)
        object.__setattr__(self, "r_edges", edges)
        if len(edges) > 1 and any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"r_edges must increase strictly, got {edges}")
        if self.n_alpha < 1:
            raise ValueError(f"n_alpha must be >= 1, got {self.n_alpha}")

    @property
    def n_r(self) -> int:
        return max(len(self.r_edges) - 1, 0)

    @property
    def n_voxels(self) -> int:
        return self.n_r * self.n_alpha

    @property
    def alpha_edges(self) -> np.ndarray:
        """Angular bin edges in rad, shape (n_alpha + 1,), from -pi to pi."""
        return np.linspace(-math.pi, math.pi, self.n_alpha + 1)


@dataclass(frozen=True)
class Readout:
    """A voxel readout: layers along the shower axis, each a polar (alpha, r) grid.

    name: a short identifier (stored in files and models).
    layers: the layers, front to back.
    layer_thickness_mm: thickness of each layer along the shower axis in mm, or None where the
        source does not say (the CaloChallenge XMLs give no depths).
    """

    name: str
    layers: tuple[Layer, ...]
    layer_thickness_mm: tuple[float, ...] | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ValueError("a readout needs at least one layer")
        if self.layer_thickness_mm is not None:
            t = tuple(float(x) for x in self.layer_thickness_mm)
            if len(t) != len(self.layers):
                raise ValueError(
                    f"{len(t)} layer thicknesses for {len(self.layers)} layers in readout {self.name!r}"
                )
            object.__setattr__(self, "layer_thickness_mm", t)
        if self.n_voxels == 0:
            raise ValueError(f"readout {self.name!r} has no voxels")

    # -- sizes -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def n_voxels(self) -> int:
        return sum(layer.n_voxels for layer in self.layers)

    @cached_property
    def layer_offsets(self) -> np.ndarray:
        """Index of each layer's first voxel, shape (n_layers + 1,); the last entry is n_voxels."""
        return np.concatenate([[0], np.cumsum([layer.n_voxels for layer in self.layers])]).astype(np.int64)

    @property
    def is_regular(self) -> bool:
        """True when every layer has the same (n_alpha, r_edges): the readout is a dense 3-d grid."""
        first = self.layers[0]
        return all(layer == first for layer in self.layers)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_layers, n_alpha, n_r) of a regular readout."""
        if not self.is_regular:
            raise ValueError(f"readout {self.name!r} is not regular: its layers differ")
        first = self.layers[0]
        return (self.n_layers, first.n_alpha, first.n_r)

    @property
    def active_layers(self) -> list[int]:
        """Indices of the layers that have voxels."""
        return [i for i, layer in enumerate(self.layers) if layer.n_voxels]

    @cached_property
    def layer_edges_mm(self) -> np.ndarray | None:
        """Depth of the layer boundaries along the axis in mm, shape (n_layers + 1,), or None."""
        if self.layer_thickness_mm is None:
            return None
        return np.concatenate([[0.0], np.cumsum(self.layer_thickness_mm)])

    # -- per-voxel geometry --------------------------------------------------------------------
    @cached_property
    def voxel_layer(self) -> np.ndarray:
        """Layer index of each voxel, shape (n_voxels,)."""
        return np.repeat(np.arange(self.n_layers), [layer.n_voxels for layer in self.layers])

    @cached_property
    def _voxel_bins(self) -> tuple[np.ndarray, ...]:
        ia, ir, rlo, rhi, alo, ahi = [], [], [], [], [], []
        for layer in self.layers:
            if not layer.n_voxels:
                continue
            a, r = np.meshgrid(np.arange(layer.n_alpha), np.arange(layer.n_r), indexing="ij")
            a, r = a.ravel(), r.ravel()  # r fastest
            edges, aedges = np.asarray(layer.r_edges), layer.alpha_edges
            ia.append(a), ir.append(r)
            rlo.append(edges[r]), rhi.append(edges[r + 1])
            alo.append(aedges[a]), ahi.append(aedges[a + 1])
        return tuple(np.concatenate(x) for x in (ia, ir, rlo, rhi, alo, ahi))

    @property
    def voxel_alpha(self) -> np.ndarray:
        """Alpha-bin index of each voxel within its layer, shape (n_voxels,)."""
        return self._voxel_bins[0]

    @property
    def voxel_r(self) -> np.ndarray:
        """Radial-bin index of each voxel within its layer, shape (n_voxels,)."""
        return self._voxel_bins[1]

    @property
    def voxel_r_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """(r_low, r_high) of each voxel in mm, each shape (n_voxels,)."""
        return self._voxel_bins[2], self._voxel_bins[3]

    @property
    def voxel_alpha_edges(self) -> tuple[np.ndarray, np.ndarray]:
        """(alpha_low, alpha_high) of each voxel in rad, each shape (n_voxels,)."""
        return self._voxel_bins[4], self._voxel_bins[5]

    @cached_property
    def voxel_area_mm2(self) -> np.ndarray:
        """Transverse area of each voxel in mm², shape (n_voxels,)."""
        rlo, rhi = self.voxel_r_edges
        alo, ahi = self.voxel_alpha_edges
        return 0.5 * (rhi**2 - rlo**2) * (ahi - alo)

    @cached_property
    def voxel_centres(self) -> tuple[np.ndarray, np.ndarray]:
        """(r, alpha) of each voxel's centre (mid-radius, mid-angle), each shape (n_voxels,)."""
        rlo, rhi = self.voxel_r_edges
        alo, ahi = self.voxel_alpha_edges
        return 0.5 * (rlo + rhi), 0.5 * (alo + ahi)

    @cached_property
    def r_edges_union(self) -> np.ndarray:
        """All radial edges of all layers, sorted and unique (mm)."""
        return np.unique(np.concatenate([np.asarray(layer.r_edges) for layer in self.layers]))

    # -- reshaping ------------------------------------------------------------------------------
    def check_showers(self, showers: np.ndarray, source: str = "array") -> np.ndarray:
        """Return ``showers`` as (N, n_voxels), raising ShowerDataError naming ``source`` otherwise."""
        showers = np.asarray(showers)
        if showers.ndim == 1:
            showers = showers[None, :]
        if showers.ndim != 2 or showers.shape[1] != self.n_voxels:
            raise ShowerDataError(
                source, f"shape {showers.shape} does not match readout {self.name!r} "
                f"({self.n_voxels} voxels per shower)"
            )
        return showers

    def to_grid(self, showers: np.ndarray) -> np.ndarray:
        """(N, n_voxels) → (N, n_layers, n_alpha, n_r) for a regular readout (a view, no copy)."""
        showers = self.check_showers(showers)
        return showers.reshape(showers.shape[0], *self.shape)

    def split_layers(self, showers: np.ndarray) -> list[np.ndarray]:
        """(N, n_voxels) → one (N, n_alpha_l, n_r_l) view per layer (empty layers give (N, 0, 0))."""
        showers = self.check_showers(showers)
        out = []
        for i, layer in enumerate(self.layers):
            lo, hi = self.layer_offsets[i], self.layer_offsets[i + 1]
            n_a = layer.n_alpha if layer.n_voxels else 0
            out.append(showers[:, lo:hi].reshape(showers.shape[0], n_a, layer.n_r))
        return out

    def from_grid(self, grid: np.ndarray) -> np.ndarray:
        """(N, n_layers, n_alpha, n_r) → (N, n_voxels) for a regular readout."""
        grid = np.asarray(grid)
        if grid.shape[1:] != self.shape:
            raise ValueError(f"grid shape {grid.shape[1:]} is not readout {self.name!r}'s {self.shape}")
        return grid.reshape(grid.shape[0], -1)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "layers": [{"r_edges": list(layer.r_edges), "n_alpha": layer.n_alpha} for layer in self.layers],
            "layer_thickness_mm": None if self.layer_thickness_mm is None else list(self.layer_thickness_mm),
            "meta": dict(self.meta),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Readout:
        return cls(
            name=d["name"],
            layers=tuple(Layer(tuple(x["r_edges"]), int(x["n_alpha"])) for x in d["layers"]),
            layer_thickness_mm=None if d.get("layer_thickness_mm") is None else tuple(d["layer_thickness_mm"]),
            meta=dict(d.get("meta") or {}),
        )

    @classmethod
    def from_json(cls, text: str) -> Readout:
        return cls.from_dict(json.loads(text))

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def regular(
        cls,
        name: str,
        n_layers: int,
        n_alpha: int,
        r_edges,
        layer_thickness_mm: float | None = None,
        **meta,
    ) -> Readout:
        """A readout whose layers are all alike."""
        layer = Layer(tuple(r_edges), n_alpha)
        thick = None if layer_thickness_mm is None else (float(layer_thickness_mm),) * n_layers
        return cls(name, (layer,) * n_layers, thick, meta)

    @classmethod
    def from_xml(cls, path, particle: str | None = None, name: str | None = None,
                 layer_thickness_mm=None) -> Readout:
        """Read a CaloChallenge binning XML (``<Bins><Bin name=...><Layer r_edges=... n_bin_alpha=...>``).

        particle: the ``name`` or ``pid`` of the ``<Bin>`` to take; needed only if the file has several.
        """
        path = Path(path)
        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as exc:
            raise ShowerDataError(path, f"not a readable binning XML: {exc}") from exc
        bins = list(root.iter("Bin"))
        if particle is not None:
            bins = [b for b in bins if particle in (b.get("name"), b.get("pid"))]
        if len(bins) != 1:
            names = [b.get("name") for b in root.iter("Bin")]
            raise ShowerDataError(path, f"expected one <Bin> for particle={particle!r}, found {names}")
        b = bins[0]
        layers = []
        for el in b.iter("Layer"):
            edges = tuple(float(x) for x in el.get("r_edges", "0").split(",") if x.strip())
            layers.append(Layer(edges, int(el.get("n_bin_alpha", "1"))))
        meta = {k: v for k, v in b.attrib.items()}
        meta["source"] = path.name
        return cls(name or path.stem, tuple(layers), layer_thickness_mm, meta)


# -- built-in readouts ------------------------------------------------------------------------------
_BUILTIN = {}


def register_readout(name: str):
    """Decorator: register a zero-argument function returning a :class:`Readout` under ``name``."""

    def deco(fn):
        if name in _BUILTIN:
            raise ValueError(f"readout {name!r} is already registered")
        _BUILTIN[name] = fn
        return fn

    return deco


def _xml(filename: str) -> Path:
    return Path(str(resources.files("showers") / "data" / "binning" / filename))


@register_readout("calochallenge-1-photons")
def _cc1_photons() -> Readout:
    return Readout.from_xml(_xml("binning_dataset_1_photons.xml"), name="calochallenge-1-photons")


@register_readout("calochallenge-1-pions")
def _cc1_pions() -> Readout:
    return Readout.from_xml(_xml("binning_dataset_1_pions.xml"), name="calochallenge-1-pions")


@register_readout("calochallenge-2")
def _cc2() -> Readout:
    # The XMLs give no layer depths, so the thickness stays unknown for the CaloChallenge readouts.
    return Readout.from_xml(_xml("binning_dataset_2.xml"), name="calochallenge-2")


@register_readout("calochallenge-3")
def _cc3() -> Readout:
    return Readout.from_xml(_xml("binning_dataset_3.xml"), name="calochallenge-3")


@register_readout("par04")
def _par04() -> Readout:
    # Geant4 example Par04: a cylindrical mesh of 18 r x 50 phi x 45 z cells of 2.325 mm x 3.4 mm,
    # aligned with the particle direction. Its files store (r, phi, z); calozoo stores CaloChallenge
    # order (z, phi, r): see showers.formats for the transposition.
    return Readout.regular("par04", 45, 50, np.arange(19) * 2.325, 3.4, source="Geant4 Par04")


@register_readout("g4-pbwo4")
def _g4_pbwo4() -> Readout:
    # The readout of the Geant4 reference file shared/g4showers/pbwo4_electrons_main.h5:
    # 45 layers of 0.5 X0 (4.4515 mm) of PbWO4, 9 radial bins of 5 mm, 16 alpha bins.
    return Readout.regular("g4-pbwo4", 45, 16, np.arange(10) * 5.0, 4.4515, material="PbWO4")


def list_readouts() -> list[str]:
    """Names of the built-in readouts (the detector's regions come from showers.detector)."""
    return sorted(_BUILTIN)


def get_readout(spec) -> Readout:
    """A readout from a built-in name, a binning XML path, a JSON dict/string, or a Readout."""
    if isinstance(spec, Readout):
        return spec
    if isinstance(spec, dict):
        return Readout.from_dict(spec)
    text = str(spec)
    if text in _BUILTIN:
        return _BUILTIN[text]()
    if text.lstrip().startswith("{"):
        return Readout.from_json(text)
    path = Path(text)
    if path.suffix.lower() == ".xml":
        if not path.exists():
            raise ShowerDataError(path, "binning XML does not exist")
        return Readout.from_xml(path)
    raise KeyError(f"unknown readout {text!r}; built-in readouts: {', '.join(list_readouts())}")

