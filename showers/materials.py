"""Calorimeter media for the built-in simulator: homogeneous materials and sampling stacks.

Pure-material constants are from the PDG's "Atomic and nuclear properties of materials" tables
(X0, Molière radius, nuclear interaction length, critical energy for e-, minimum dE/dx). A sampling
calorimeter (absorber + active layer, repeated) is reduced to effective constants by the usual
thickness-weighted mixture rules (PDG review "Passage of particles through matter", section on
mixtures; GFLASH, hep-ex/0001020, section 4).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Material", "Medium", "get_medium", "list_media"]


@dataclass(frozen=True)
class Material:
    """A pure material or compound.

    Z: effective atomic number (electron-weighted for compounds, as GFLASH uses it).
    density: g/cm³. x0_mm: radiation length. rm_mm: Molière radius. lambda_mm: nuclear
    interaction length. ec_mev: critical energy for electrons. dedx_mip: minimum ionisation
    energy loss in MeV/mm.
    """

    name: str
    Z: float
    density: float
    x0_mm: float
    rm_mm: float
    lambda_mm: float
    ec_mev: float
    dedx_mip: float


#                 name            Z      rho     X0      R_M     lambda_I  E_c     dE/dx_mip
_PURE = {m.name: m for m in [
    Material("PbWO4",        68.4,  8.28,   8.903,  19.59,  207.7,    9.64,   1.021),
    Material("W",            74.0, 19.30,   3.504,   9.327,  99.46,   7.97,   2.210),
    Material("Pb",           82.0, 11.35,   5.612,  16.02,  182.6,    7.43,   1.274),
    Material("Fe",           26.0,  7.874, 17.57,   16.93,  167.7,   21.68,   1.143),
    Material("Si",           14.0,  2.329, 93.70,   48.82,  465.2,   40.19,   0.3876),
    Material("LAr",          18.0,  1.396, 140.0,   90.43,  857.0,   32.84,   0.2105),
    Material("Scintillator",  5.6,  1.032, 413.1,   95.90,  775.0,   93.11,   0.2052),
]}


@dataclass(frozen=True)
class Medium:
    """What the simulator needs of a calorimeter, homogeneous or sampling.

    For a sampling stack the constants are effective ones; ``pitch_mm`` is the thickness of one
    absorber + active cell, ``sampling_fraction`` the MIP-based visible fraction, ``e_hat`` GFLASH's
    ê = 1/(1 + 0.007 (Z_abs - Z_act)), ``sigma_samp`` the stochastic sampling resolution in √GeV,
    ``dedx_mip`` the mean MIP energy loss in MeV/mm (of the whole stack: stored energies are divided
    by the sampling fraction, as in CaloChallenge datasets 2 and 3).
    """

    name: str
    Z: float
    x0_mm: float
    rm_mm: float
    lambda_mm: float
    ec_mev: float
    sampling: bool = False
    pitch_mm: float = 0.0
    sampling_fraction: float = 1.0
    e_hat: float = 1.0
    sigma_samp: float = 0.0
    dedx_mip: float = 0.0

    def fs(self, angle_deg: float = 90.0) -> float:
        """GFLASH's F_s = X0_eff / (d_abs + d_act), for a particle crossing the layers at
        ``angle_deg`` to their plane (90° = normal incidence: the path per cell grows as 1/sin)."""
        import math

        if not self.sampling:
            return float("inf")
        return self.x0_mm / (self.pitch_mm / max(math.sin(math.radians(angle_deg)), 1e-3))


def homogeneous(name: str) -> Medium:
    m = _PURE[name]
    return Medium(m.name, m.Z, m.x0_mm, m.rm_mm, m.lambda_mm, m.ec_mev, dedx_mip=m.dedx_mip)


def sampling(name: str, absorber: str, d_abs_mm: float, active: str, d_act_mm: float,
             sigma_samp: float) -> Medium:
    """Effective constants of a repeated (absorber d_abs, active d_act) cell."""
    a, s = _PURE[absorber], _PURE[active]
    d = d_abs_mm + d_act_mm
    wa, ws = d_abs_mm / d, d_act_mm / d
    x0 = 1.0 / (wa / a.x0_mm + ws / s.x0_mm)
    lam = 1.0 / (wa / a.lambda_mm + ws / s.lambda_mm)
    # Molière radius and critical energy of a mixture: 1/R_M = sum w_j/R_M,j (w by thickness);
    # E_c = X0 sum w_j E_c,j / X0_j.
    rm = 1.0 / (wa / a.rm_mm + ws / s.rm_mm)
    ec = x0 * (wa * a.ec_mev / a.x0_mm + ws * s.ec_mev / s.x0_mm)
    # Z weighted by mass fraction, as GFLASH does for the sampling parametrisation.
    ma, ms = wa * a.density, ws * s.density
    z = (ma * a.Z + ms * s.Z) / (ma + ms)
    vis = d_act_mm * s.dedx_mip / (d_act_mm * s.dedx_mip + d_abs_mm * a.dedx_mip)
    e_hat = 1.0 / (1.0 + 0.007 * (a.Z - s.Z))
    dedx = (d_abs_mm * a.dedx_mip + d_act_mm * s.dedx_mip) / d
    return Medium(name, z, x0, rm, lam, ec, True, d, vis, e_hat, sigma_samp, dedx)


_MEDIA = {
    "PbWO4": lambda: homogeneous("PbWO4"),
    "W": lambda: homogeneous("W"),
    "Pb": lambda: homogeneous("Pb"),
    # Par04's Si-W: 1.4 mm W + 0.3 mm Si (two cells per 3.4 mm readout layer); its sampling
    # fraction comes out near the 0.033 by which CaloChallenge datasets 2 and 3 were divided.
    "SiW": lambda: sampling("SiW", "W", 1.4, "Si", 0.3, sigma_samp=0.17),
    # A scintillator-lead stack (CALICE/Par04-style SciPb): 2.0 mm Pb + 1.4 mm scintillator.
    "SciPb": lambda: sampling("SciPb", "Pb", 2.0, "Scintillator", 1.4, sigma_samp=0.12),
    # ATLAS-like liquid-argon/lead accordion, flattened: 1.5 mm Pb + 4.2 mm LAr.
    "PbLAr": lambda: sampling("PbLAr", "Pb", 1.5, "LAr", 4.2, sigma_samp=0.10),
}


def list_media() -> list[str]:
    return sorted(_MEDIA)


def get_medium(name) -> Medium:
    """A :class:`Medium` by name (``list_media()``), or the Medium itself."""
    if isinstance(name, Medium):
        return name
    try:
        return _MEDIA[name]()
    except KeyError:
        raise KeyError(f"unknown medium {name!r}; known media: {', '.join(list_media())}") from None
