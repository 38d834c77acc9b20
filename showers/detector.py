"""Detectors made of regions: one readout, medium and simulator per (particle, |η| slice).

``atlas-like`` mimics the set-up of ATLAS's FastCaloGAN: 3 particles (γ, e−, π±) × 100 slices of
|η| of 0.05 from 0 to 5 = 300 regions, each with its own readout, whose layers are those of ATLAS's
calorimeter sampling ids (the 24 layer slots of CaloChallenge dataset 1's XMLs: 0–3 EM barrel,
4–7 EM end-cap, 8–11 hadronic end-cap, 12–14 tile barrel, 15–20 tile gap/extended, 21–23 forward).
Which layers a particle crosses depends on |η| (barrel below 1.45, end-cap to 3.2, forward beyond;
the end-cap presampler only below 1.8), and pions see the hadronic layers with more voxels than
photons and electrons do, so the number of voxels depends on both the particle and |η|, as in
FastCaloGAN. The material depth along the particle grows as 1/sin θ in the barrel and 1/|cos θ| in
the end-caps and forward region. Simplifications, stated plainly: one medium (a Pb/LAr sampling
stack) for every layer, including those standing in for ATLAS's iron-scintillator tiles; no dead
material before the calorimeter; the readout follows the particle direction.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from functools import lru_cache

from showers.materials import get_medium
from showers.readout import Layer, Readout, get_readout
from showers.simulator import ShowerSimulator, canonical_particle

__all__ = ["Region", "Detector", "get_detector", "list_detectors"]

_LABEL = {"gamma": "photon", "e-": "electron", "e+": "positron", "pi+": "pion", "pi-": "pion-"}


@dataclass(frozen=True)
class Region:
    """One detector region: a particle in an |η| slice, with its readout and medium."""

    detector: str
    particle: str
    eta_lo: float
    eta_hi: float
    readout: Readout
    medium: str

    @property
    def name(self) -> str:
        """e.g. ``photon_eta_020_025`` (|η| in hundredths), stable across runs: files and models
        are named after it."""
        return f"{_LABEL[self.particle]}_eta_{round(self.eta_lo * 100):03d}_{round(self.eta_hi * 100):03d}"

    @property
    def eta_mid(self) -> float:
        return 0.5 * (self.eta_lo + self.eta_hi)

    @property
    def theta_deg(self) -> float:
        """Polar angle from the beam axis at the slice centre, degrees (90 at η = 0)."""
        return math.degrees(2.0 * math.atan(math.exp(-self.eta_mid)))

    @property
    def angle_deg(self) -> float:
        """Incident angle to the plane of the layers (90° = normal incidence)."""
        # barrel layers are cylinders around the beam (crossed at θ), end-cap and forward layers
        # are discs across it (crossed at 90° - θ)
        return self.theta_deg if self.eta_mid < BARREL_END else 90.0 - self.theta_deg

    def simulator(self) -> ShowerSimulator:
        return ShowerSimulator(self.readout, self.medium, self.particle)

    def describe(self) -> dict:
        return {"detector": self.detector, "region": self.name, "particle": self.particle,
                "eta_lo": self.eta_lo, "eta_hi": self.eta_hi, "medium": self.medium}


@dataclass(frozen=True)
class Detector:
    name: str
    regions: tuple[Region, ...]

    def region(self, name: str) -> Region:
        for r in self.regions:
            if r.name == name:
                return r
        raise KeyError(f"no region {name!r} in detector {self.name!r} (e.g. {self.regions[0].name})")

    def select(self, patterns=None, particles=None, eta_range=None) -> list[Region]:
        """Regions whose name matches any glob pattern (``photon_eta_02*``), of the given particles,
        overlapping the |η| range (lo, hi); all regions when nothing is given."""
        out = list(self.regions)
        if patterns:
            pats = [patterns] if isinstance(patterns, str) else list(patterns)
            out = [r for r in out if any(fnmatch.fnmatch(r.name, p) for p in pats)]
        if particles:
            want = {canonical_particle(p) for p in ([particles] if isinstance(particles, str) else particles)}
            out = [r for r in out if r.particle in want]
        if eta_range is not None:
            lo, hi = eta_range
            out = [r for r in out if r.eta_hi > lo and r.eta_lo < hi]
        if not out:
            asked = [f"{what} {value!r}" for what, value in (("names", patterns), ("particles", particles),
                                                             ("|eta| range", eta_range)) if value]
            raise KeyError(f"no region of detector {self.name!r} matches {', '.join(asked)}; its regions are "
                           f"{self.regions[0].name} ... {self.regions[-1].name} ({len(self.regions)})")
        return out


BARREL_END = 1.45
ENDCAP_END = 3.2
ENDCAP_PRESAMPLER_END = 1.8

# Layer slot → depth at normal incidence, in X0 ("x") or λ_I ("l") of the medium.
_BARREL = {0: (1.0, "x"), 1: (4.3, "x"), 2: (16.0, "x"), 3: (2.0, "x"), 12: (1.5, "l"), 13: (4.1, "l"), 14: (1.8, "l")}
_ENDCAP = {4: (1.0, "x"), 5: (4.0, "x"), 6: (20.0, "x"), 7: (2.0, "x"), 8: (1.5, "l"), 9: (2.5, "l"), 10: (2.5, "l"), 11: (2.0, "l")}
_FORWARD = {21: (28.0, "x"), 22: (3.5, "l"), 23: (3.5, "l")}
# End-cap and forward slots borrow the binning of the barrel slot that plays their part.
_BINNING_FROM = {4: 0, 5: 1, 6: 2, 7: 3, 8: 12, 9: 13, 10: 13, 11: 14, 21: 2, 22: 13, 23: 14}
# The hadronic layers photons and electrons are binned in (as in dataset 1's photon XML, layer 12).
_EM_HADRONIC = {12, 8, 22}


def _region_readout(particle: str, eta_lo: float, eta_hi: float, medium_name: str) -> Readout:
    medium = get_medium(medium_name)
    eta = 0.5 * (eta_lo + eta_hi)
    theta = 2.0 * math.atan(math.exp(-eta))
    if eta < BARREL_END:
        slots, path = _BARREL, 1.0 / math.sin(theta)
    elif eta < ENDCAP_END:
        slots, path = dict(_ENDCAP), 1.0 / abs(math.cos(theta))
        if eta >= ENDCAP_PRESAMPLER_END:
            slots.pop(4)
    else:
        slots, path = _FORWARD, 1.0 / abs(math.cos(theta))
    hadron = particle in ("pi+", "pi-")
    pion_xml = get_readout("calochallenge-1-pions").layers
    photon_xml = get_readout("calochallenge-1-photons").layers
    layers, thick = [], []
    for slot in range(24):
        if slot not in slots:
            layers.append(Layer((0.0,), 1))
            thick.append(0.0)
            continue
        depth, unit = slots[slot]
        src = _BINNING_FROM.get(slot, slot)
        hadronic_slot = unit == "l"
        if hadronic_slot and not hadron and slot not in _EM_HADRONIC:
            layer = Layer((0.0,), 1)  # photons and electrons: no voxels in the deeper hadronic layers
        elif hadronic_slot and not hadron:
            layer = photon_xml[src] if photon_xml[src].n_voxels else Layer(pion_xml[src].r_edges, 1)
        else:
            layer = (pion_xml if hadron else photon_xml)[src]
            if not layer.n_voxels:
                layer = pion_xml[src]
        # forward calorimeter: coarser azimuthal segmentation
        if eta >= ENDCAP_END and layer.n_alpha > 1:
            layer = Layer(layer.r_edges, 4)
        layers.append(layer)
        thick.append(depth * (medium.x0_mm if unit == "x" else medium.lambda_mm) * path)
    return Readout(f"atlas-like-{_LABEL[particle]}-eta{round(eta_lo * 100):03d}", tuple(layers), tuple(thick),
                   {"eta_lo": eta_lo, "eta_hi": eta_hi, "particle": particle})


@lru_cache(maxsize=None)
def atlas_like(n_slices: int = 100, width: float = 0.05, particles=("gamma", "e-", "pi+"),
               medium: str = "PbLAr") -> Detector:
    regions = []
    for particle in particles:
        for i in range(n_slices):
            lo, hi = round(i * width, 4), round((i + 1) * width, 4)
            regions.append(Region("atlas-like", particle, lo, hi, _region_readout(particle, lo, hi, medium), medium))
    return Detector("atlas-like", tuple(regions))


def pbwo4_test_beam() -> Detector:
    """A single region: electrons in the PbWO4 block of the Geant4 reference file (g4-pbwo4)."""
    return Detector("pbwo4", (Region("pbwo4", "e-", 0.0, 0.05, get_readout("g4-pbwo4"), "PbWO4"),))


_DETECTORS = {"atlas-like": atlas_like, "pbwo4": pbwo4_test_beam}


def list_detectors() -> list[str]:
    return sorted(_DETECTORS)


def get_detector(name: str) -> Detector:
    try:
        return _DETECTORS[name]()
    except KeyError:
        raise KeyError(f"unknown detector {name!r}; known: {', '.join(list_detectors())}") from None
