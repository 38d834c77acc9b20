"""The built-in shower simulator: calozoo's embedded default data source.

Geant4 data sets cannot be shipped, so calozoo generates showers with a parametrisation in the
spirit of GFLASH (Grindhammer & Peters, hep-ex/0001020; the same constants are in Geant4's
``source/parameterisations/gflash``), calibrated for PbWO4 against real Geant4 showers (see
``showers/calibrate.py`` and ``showers/data/calibration/``). What it does, per shower:

1. **Longitudinal profile**: a gamma distribution dE/dt ∝ (βt)^(α-1) e^(-βt) in radiation lengths,
   whose parameters fluctuate from shower to shower as correlated log-normals (GFLASH's ⟨ln T⟩,
   ⟨ln α⟩, σ and ρ, each a function of ln y with y = E/E_c). Photons start after a conversion depth
   drawn from an exponential of mean 9/7 X0; electrons start at the front face.
2. **Radial profile** at each depth τ = t/T: GFLASH's core + tail,
   f(r) = p·2rR_C²/(r²+R_C²)² + (1-p)·2rR_T²/(r²+R_T²)², with r in Molière radii, integrated
   exactly over each voxel's radial bin (the CDF of one component is r²/(r²+R²)); uniform in α.
3. **Energy spots**: the expected fraction of the shower in each voxel (and in the leakage beyond
   the readout) sets the mean number of spots there, N_spot·fraction; the count is Poisson and each
   spot's energy exponential, so a voxel's energy is Gamma(count) distributed (compound
   Poisson-gamma, which gives the sparsity and voxel-energy spectrum of real showers), and the
   shower is normalised to its deposited energy: energy is conserved between the voxels and the
   leakage exactly. Sampling calorimeters smear the deposit by σ_samp/√E (GFLASH's gamma-smeared
   spots amount to this) and use GFLASH's sampling corrections of T, α and the radial profile.
4. **Charged pions** (a simple model, documented in :class:`PionModel`): a first interaction at an
   exponential depth in nuclear interaction lengths with a MIP track before it; after it, an
   electromagnetic fraction f_em (Groom's ⟨f_em⟩ = 1 - (E/E0)^(k-1), beta-distributed per shower)
   that showers like an electron, and a hadronic remainder seen with weight h/e < 1
   (non-compensation), deeper (a gamma profile in λ_I with its maximum at 0.2 ln(E/GeV) + 0.7 λ_I)
   and wider (core and tail radii set by λ_I), with fewer, larger spots: wider, deeper and with
   larger fluctuations than electron showers, and a lower, broader E_vis/E.
5. **Incident angle** (Par04's convention: the angle between the particle and the layers' plane,
   90° = normal incidence): the readout follows the particle (as Par04's does), so in a
   homogeneous medium nothing changes; in a sampling stack the path per sampling cell grows as
   1/sin(angle), which changes GFLASH's F_s and so T, α, the radial profile and the resolution.

Everything is vectorised numpy over batches of showers, seeded through ``numpy.random.Generator``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources

import numpy as np
from scipy.special import gammainc

from showers.materials import Medium, get_medium
from showers.readout import Readout, get_readout

__all__ = ["EMParams", "PionModel", "ShowerSimulator", "canonical_particle", "PARTICLES"]

#: canonical particle names and the aliases accepted for them (PDG ids included)
PARTICLES = {
    "e-": ("e-", "electron", "11"),
    "e+": ("e+", "positron", "-11"),
    "gamma": ("gamma", "photon", "22"),
    "pi+": ("pi+", "pion", "211", "pi"),
    "pi-": ("pi-", "-211"),
}


def canonical_particle(name) -> str:
    """'electron', 11, 'e-' → 'e-'; 'photon', 22 → 'gamma'; 'pion', 211 → 'pi+'."""
    key = str(name).strip().lower()
    for canon, aliases in PARTICLES.items():
        if key in aliases:
            return canon
    raise KeyError(f"unknown particle {name!r}; known: {', '.join(PARTICLES)}")


@dataclass(frozen=True)
class EMParams:
    """Coefficients of the electromagnetic parametrisation (defaults: GFLASH, homogeneous media).

    Longitudinal, with y = E/E_c:
      ⟨ln T⟩ = ln(t_a + t_b ln y), ⟨ln α⟩ = ln(a_a + (a_b + a_c/Z) ln y),
      σ(ln T) = s_T/(sT_a + sT_b ln y), σ(ln α) = s_T/(sa_a + sa_b ln y), ρ = rho_a + rho_b ln y
    (``s_T`` scales both widths; it is 1 in GFLASH). Radial, E in GeV, τ = t/T, radii in R_M
    (``rm_scale`` multiplies the medium's Molière radius):
      R_C = rc_a + rc_b ln E + (rc_c + rc_d Z) τ^rc_pow,
      R_T = k1 (e^(k3 (τ-k2)) + e^(k4 (τ-k2))), k1 = k1_a + k1_b Z, k4 = k4_a + k4_b ln E,
      p = p1 exp((p2-τ)/p3 - e^((p2-τ)/p3)), p1 = p1_a + p1_b Z + p1_c ln E (p1_c = 0 in GFLASH), p2 = p2_a + p2_b Z,
      p3 = p3_a + p3_b ln E;
    the tail's CDF is generalised to 1 - (1 + r²/R_T²)^(-tail_power) (GFLASH: tail_power = 1), so a
    calibration can make the far tail fall faster or slower than GFLASH's 1/r³.
    Spots: N_spot = spot_a ln(Z) (E/GeV)^spot_b (homogeneous) or 10.3/σ_samp (E/GeV)^0.959
    (sampling). ``deposit`` is the fraction of E deposited in the calorimeter (a Geant4 PbWO4
    block keeps 99.7%: backscatter and escaping photons take the rest).
    """

    t_a: float = -0.812
    t_b: float = 1.0
    a_a: float = 0.81
    a_b: float = 0.458
    a_c: float = 2.26
    s_T: float = 1.0
    sT_a: float = -1.4
    sT_b: float = 1.26
    sa_a: float = -0.58
    sa_b: float = 0.86
    rho_a: float = 0.705
    rho_b: float = -0.023
    rc_a: float = 0.0251
    rc_b: float = 0.00319
    rc_c: float = 0.1162
    rc_d: float = -0.000381
    rc_pow: float = 1.0
    k1_a: float = 0.659
    k1_b: float = -0.00309
    k2: float = 0.645
    k3: float = -2.59
    k4_a: float = 0.3585
    k4_b: float = 0.0412
    p1_a: float = 2.632
    p1_b: float = -0.00094
    p1_c: float = 0.0
    p2_a: float = 0.401
    p2_b: float = 0.00187
    p3_a: float = 1.313
    p3_b: float = -0.0686
    rm_scale: float = 1.0
    tail_power: float = 1.0
    spot_a: float = 93.0
    spot_b: float = 0.876
    deposit: float = 1.0

    @classmethod
    def from_dict(cls, d: dict) -> EMParams:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown EM parameters {sorted(unknown)}")
        return cls(**{k: float(v) for k, v in d.items()})


@dataclass(frozen=True)
class PionModel:
    """A simple charged-pion shower model (see the module docstring).

    first interaction ~ Exp(λ_I); ⟨f_em⟩ = 1 - (E/e0_gev)^(k-1) (Groom, k = 0.82), f_em ~ Beta with
    concentration ``fem_conc``; the hadronic part is seen with weight ``h_over_e``; hadronic
    longitudinal gamma in λ_I with β = ``beta_h`` and maximum at tmax_a + tmax_b ln(E/GeV) λ_I,
    log-normal spread ``sigma_ln_alpha``; radial core ``r_core`` and tail ``r_tail`` (in λ_I) with core
    weight ``p_core``; N_spot = spot_a (E/GeV)^spot_b for the hadronic part.
    """

    e0_gev: float = 1.0
    k: float = 0.82
    fem_conc: float = 6.0
    h_over_e: float = 0.7
    beta_h: float = 1.0
    tmax_a: float = 0.7
    tmax_b: float = 0.2
    sigma_ln_alpha: float = 0.3
    r_core: float = 0.08
    r_tail: float = 0.35
    p_core: float = 0.55
    spot_a: float = 30.0
    spot_b: float = 0.8


def _calibration(medium: str, particle: str) -> dict:
    """Calibrated EM coefficients shipped with the package, if any, for (medium, particle)."""
    path = resources.files("showers") / "data" / "calibration" / f"{medium}.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    # electrons and positrons share one calibration, photons use the electron one plus the
    # conversion depth, and a pion's EM part is electron-like too.
    return dict(data.get("em", {}))


@dataclass
class ShowerSimulator:
    """Simulate showers of one particle in one medium, scored into a readout.

    readout: a :class:`Readout` (or built-in name) with known layer thicknesses along the particle.
    medium: a :class:`Medium` or its name (``showers.materials.list_media()``).
    particle: 'e-', 'e+', 'gamma', 'pi+', 'pi-' (or aliases: electron, photon, pion, PDG ids).
    em: EM coefficients; by default GFLASH's, updated by the shipped calibration of the medium.
    """

    readout: Readout | str
    medium: Medium | str = "PbWO4"
    particle: str = "e-"
    em: EMParams | None = None
    pion: PionModel = field(default_factory=PionModel)

    def __post_init__(self) -> None:
        self.readout = get_readout(self.readout)
        self.medium = get_medium(self.medium)
        self.particle = canonical_particle(self.particle)
        if self.em is None:
            self.em = EMParams.from_dict(_calibration(self.medium.name, self.particle))
        if self.readout.layer_edges_mm is None:
            raise ValueError(
                f"readout {self.readout.name!r} has no layer thicknesses: the simulator needs to know "
                "how deep each layer is (give layer_thickness_mm)"
            )
        r = self.readout
        self._edges = r.layer_edges_mm  # (L+1,) mm along the particle
        self._mid = 0.5 * (self._edges[1:] + self._edges[:-1])
        # (layer, r-bin) pairs of the readout: the radial integral does not depend on alpha.
        key = r.voxel_layer * 10_000 + r.voxel_r
        uniq, self._lr_of_voxel = np.unique(key, return_inverse=True)
        self._lr_layer, self._lr_r = uniq // 10_000, uniq % 10_000
        rlo, rhi = r.voxel_r_edges
        first = np.zeros(len(uniq), dtype=np.int64)
        first[self._lr_of_voxel[::-1]] = np.arange(r.n_voxels)[::-1]
        self._lr_rlo, self._lr_rhi = rlo[first], rhi[first]
        n_alpha = np.array([layer.n_alpha for layer in r.layers], dtype=np.float64)
        self._alpha_share = 1.0 / n_alpha[r.voxel_layer]
        # the outermost radius of each layer: beyond it the energy leaks out of the readout
        self._r_max = np.array([layer.r_edges[-1] if layer.n_voxels else 0.0 for layer in r.layers])

    # -- public API ----------------------------------------------------------------------------
    def simulate(self, energies_mev, angle_deg=90.0, seed=None, rng=None,
                 return_leakage: bool = False, batch_size: int = 1024):
        """Simulate one shower per incident energy.

        energies_mev: (N,) incident (kinetic) energies in MeV.
        angle_deg: scalar or (N,) incident angle in degrees (90 = normal incidence).
        Returns showers (N, n_voxels) float32 in MeV; with ``return_leakage`` also the energy
        deposited outside the readout (N,) MeV (voxels + leakage = deposited energy, exactly).
        """
        rng = rng if rng is not None else np.random.default_rng(seed)
        energies = np.atleast_1d(np.asarray(energies_mev, dtype=np.float64))
        if np.any(~np.isfinite(energies)) or np.any(energies <= 0):
            raise ValueError("incident energies must be finite and > 0 (MeV)")
        angles = np.broadcast_to(np.asarray(angle_deg, dtype=np.float64), energies.shape)
        out = np.empty((len(energies), self.readout.n_voxels), dtype=np.float32)
        leak = np.empty(len(energies))
        for lo in range(0, len(energies), batch_size):
            sl = slice(lo, lo + batch_size)
            out[sl], leak[sl] = self._simulate_batch(energies[sl], angles[sl], rng)
        return (out, leak) if return_leakage else out

    def voxels_from_lr(self, frac_lr):
        """(N, n_lr) fractions per (layer, r-bin) → (N, n_voxels), shared equally among alpha bins."""
        return frac_lr[:, self._lr_of_voxel] * self._alpha_share

    @property
    def lr_layer_and_r(self):
        """Layer index and radial-bin index of each (layer, r-bin) pair, each (n_lr,)."""
        return self._lr_layer, self._lr_r

    # -- internals --------------------------------------------------------------------------------
    def _simulate_batch(self, energies, angles, rng):
        comps = self._components(energies, angles, rng)
        n = len(energies)
        vox = np.zeros((n, self.readout.n_voxels))
        leak = np.zeros(n)
        for weight, (frac_lr, frac_out), n_spot in comps:
            frac_vox = self.voxels_from_lr(frac_lr)
            # compound Poisson-gamma: spot counts, each spot of exponential energy
            lam_vox = frac_vox * n_spot[:, None]
            counts = rng.poisson(lam_vox)
            e_vox = np.zeros_like(lam_vox)
            nz = counts > 0
            e_vox[nz] = rng.standard_gamma(counts[nz])
            frac_out = np.maximum(frac_out, 0.0)  # 1 - sum can round below zero
            counts_out = rng.poisson(frac_out * n_spot)
            e_out = np.where(counts_out > 0, rng.standard_gamma(np.maximum(counts_out, 1)), 0.0)
            total = e_vox.sum(1) + e_out
            # a shower that drew no spot at all (only possible at absurdly low energies) keeps
            # its expectation rather than vanishing
            empty = total <= 0
            if np.any(empty):
                e_vox[empty], e_out[empty] = frac_vox[empty], frac_out[empty]
                total[empty] = e_vox[empty].sum(1) + e_out[empty]
            scale = weight / total
            vox += e_vox * scale[:, None]
            leak += e_out * scale
        return vox.astype(np.float32), leak

    def _components(self, energies, angles, rng):
        """[(deposited energy (N,) MeV, (fraction per (layer, r-bin) (N, n_lr), fraction leaked (N,)),
        N_spot (N,))]"""
        med, em = self.medium, self.em
        if self.particle in ("pi+", "pi-"):
            return self._pion_components(energies, angles, rng)
        start = np.zeros(len(energies))
        if self.particle == "gamma":
            # a photon travels a conversion length (mean 9/7 X0) before its shower starts
            start = rng.exponential(9.0 / 7.0 * med.x0_mm, len(energies))
        (frac_lr, out), n_spot = self._em_fractions(energies, angles, start, rng)
        deposit = energies * em.deposit * self._sampling_smear(energies, angles, rng)
        return [(deposit, (frac_lr, out), n_spot)]

    def _sampling_smear(self, energies, angles, rng):
        med = self.medium
        if not med.sampling:
            return np.ones(len(energies))
        fs = np.array([med.fs(a) for a in np.atleast_1d(angles)]) if np.ndim(angles) else med.fs(angles)
        # σ/E = σ_samp/√E, the path per cell growing as 1/sin(angle) (√ of the cell thickness)
        rel = med.sigma_samp / np.sqrt(energies / 1000.0) * np.sqrt(med.fs(90.0) / fs)
        shape = 1.0 / np.maximum(rel, 1e-6) ** 2
        return rng.gamma(shape, 1.0 / shape)

    def _em_fractions(self, energies, angles, start_mm, rng):
        med, em = self.medium, self.em
        ln_y = np.log(np.maximum(energies / med.ec_mev, math.e**1.5))
        mean_ln_t = np.log(em.t_a + em.t_b * ln_y)
        mean_ln_a = np.log(em.a_a + (em.a_b + em.a_c / med.Z) * ln_y)
        if med.sampling:
            fs = np.vectorize(med.fs)(angles)
            t_hom, a_hom = np.exp(mean_ln_t), np.exp(mean_ln_a)
            mean_ln_t = np.log(np.maximum(t_hom - 0.55 / fs - 0.69 * (1 - med.e_hat), 0.3))
            mean_ln_a = np.log(np.maximum(a_hom - 0.476 / fs, 1.1))
            s_t = 1.0 / (-2.5 + 1.25 * ln_y)
            s_a = 1.0 / (-0.82 + 0.79 * ln_y)
            rho = 0.784 - 0.023 * ln_y
        else:
            fs = None
            s_t = 1.0 / (em.sT_a + em.sT_b * ln_y)
            s_a = 1.0 / (em.sa_a + em.sa_b * ln_y)
            rho = em.rho_a + em.rho_b * ln_y
        # GFLASH's widths diverge where their denominators cross zero (ln y ≈ 1-2, far below the
        # energies they were fitted at): cap them at 1 in ln T and ln α
        s_t = em.s_T * np.where(s_t > 0, np.minimum(s_t, 1.0), 1.0)
        s_a = em.s_T * np.where(s_a > 0, np.minimum(s_a, 1.0), 1.0)
        rho = np.clip(rho, -0.99, 0.99)
        z1, z2 = rng.standard_normal((2, len(energies)))
        c1, c2 = np.sqrt((1 + rho) / 2), np.sqrt((1 - rho) / 2)
        t_max = np.exp(mean_ln_t + s_t * (c1 * z1 + c2 * z2))
        alpha = np.exp(mean_ln_a + s_a * (c1 * z1 - c2 * z2))
        alpha = np.maximum(alpha, 1.05)  # the profile must rise from zero at the start
        beta = (alpha - 1.0) / t_max  # per X0
        x0 = med.x0_mm
        e_gev = energies / 1000.0

        def radial(tau):
            ln_e = np.log(e_gev)[:, None]
            z = med.Z
            rc = em.rc_a + em.rc_b * ln_e + (em.rc_c + em.rc_d * z) * tau**em.rc_pow
            k4 = em.k4_a + em.k4_b * ln_e
            rt = (em.k1_a + em.k1_b * z) * (np.exp(em.k3 * (tau - em.k2)) + np.exp(k4 * (tau - em.k2)))
            p3 = em.p3_a + em.p3_b * ln_e
            u = (em.p2_a + em.p2_b * z - tau) / p3
            p = (em.p1_a + em.p1_b * z + em.p1_c * ln_e) * np.exp(u - np.exp(u))
            if fs is not None:
                fsc, eh = fs[:, None], med.e_hat
                rc = rc - 0.0203 * (1 - eh) + 0.0397 * np.exp(-tau) / fsc
                rt = rt - 0.14 * (1 - eh) - 0.495 * np.exp(-tau) / fsc
                p = p + (1 - eh) * (0.348 - 0.642 * np.exp(-((tau - 1) ** 2)) / fsc)
            rm = med.rm_mm * em.rm_scale
            return np.clip(p, 0.0, 1.0), np.maximum(rc, 1e-3) * rm, np.maximum(rt, 2e-3) * rm

        fr = self._profile_fractions(start_mm, alpha, beta / x0, t_max * x0, radial, em.tail_power)
        if med.sampling:
            n_spot = 10.3 / med.sigma_samp * e_gev**0.959
        else:
            n_spot = em.spot_a * math.log(med.Z) * e_gev**em.spot_b
        return fr, np.maximum(n_spot, 5.0)

    def _profile_fractions(self, start_mm, alpha, beta_per_mm, tmax_mm, radial, tail_power: float = 1.0):
        """Fractions of a gamma-profile shower (starting at ``start_mm``) in each (layer, r-bin)
        pair of the readout (N, n_lr), and out of the readout (N,).

        radial(τ (N, L)) → (p, R_core mm, R_tail mm), each (N, L), at depth τ = (t - start)/T.
        """
        edges = self._edges
        depth = np.maximum(edges[None, :] - start_mm[:, None], 0.0)  # (N, L+1)
        cdf = gammainc(alpha[:, None], beta_per_mm[:, None] * depth)
        long = np.diff(cdf, axis=1)  # (N, L)
        behind = 1.0 - cdf[:, -1]
        # τ = t/T; capped where the radial formulas would overflow (far behind the shower, no energy)
        tau = np.minimum(np.maximum(self._mid[None, :] - start_mm[:, None], 0.0) / tmax_mm[:, None], 30.0)
        p, rc, rt = radial(tau)
        lay = self._lr_layer
        pc, rc2, rt2 = p[:, lay], rc[:, lay] ** 2, rt[:, lay] ** 2
        lo2, hi2 = self._lr_rlo**2, self._lr_rhi**2
        n = tail_power
        # tail CDF 1 - (1 + r²/R_T²)^-n (GFLASH: n = 1); n > 1 steepens the far tail
        rad = (pc * (hi2 / (hi2 + rc2) - lo2 / (lo2 + rc2))
               + (1 - pc) * ((1 + lo2 / rt2) ** -n - (1 + hi2 / rt2) ** -n))
        frac_lr = long[:, lay] * rad
        # energy beyond each layer's outermost radius (all of it in a layer without voxels)
        rmax2 = self._r_max**2
        inside = p * rmax2 / (rmax2 + rc**2) + (1 - p) * (1 - (1 + rmax2 / rt**2) ** -n)
        out = behind + (long * (1.0 - inside)).sum(1)
        return frac_lr, out

    def _pion_components(self, energies, angles, rng):
        med, pm = self.medium, self.pion
        n = len(energies)
        lam = med.lambda_mm
        # the first interaction; a pion that loses all its energy by ionisation before it stops there
        t_int = rng.exponential(lam, n)
        if med.dedx_mip:
            t_int = np.minimum(t_int, energies / med.dedx_mip)
        mip = self._mip_track(t_int)
        e_left = energies if mip is None else np.maximum(energies - mip[0], 0.0)
        energies = np.maximum(e_left, 1e-3)
        e_gev = energies / 1000.0
        mean_fem = np.clip(1.0 - np.maximum(e_gev / pm.e0_gev, 1.0) ** (pm.k - 1.0), 0.02, 0.98)
        f_em = rng.beta(mean_fem * pm.fem_conc, (1 - mean_fem) * pm.fem_conc)
        # the EM part: an electron-like shower from the first interaction
        em_fr, em_spots = self._em_fractions(energies * f_em + 1.0, angles, t_int, rng)
        # the hadronic part, in λ_I
        tmax_lam = pm.tmax_a + pm.tmax_b * np.log(np.maximum(e_gev, 0.1))
        alpha = np.maximum(1.0 + pm.beta_h * tmax_lam * np.exp(pm.sigma_ln_alpha * rng.standard_normal(n)), 1.05)
        beta = np.full(n, pm.beta_h / lam)

        def radial(tau):
            shape = np.ones_like(tau)
            return pm.p_core * shape, pm.r_core * lam * (1 + 0.5 * tau), pm.r_tail * lam * shape

        had_fr = self._profile_fractions(t_int, alpha, beta, (alpha - 1) / beta, radial)
        had_spots = pm.spot_a * np.maximum(e_gev, 0.05) ** pm.spot_b
        smear = self._sampling_smear(energies, angles, rng)
        comps = [
            (e_left * f_em * self.em.deposit * smear, em_fr, em_spots),
            (e_left * (1 - f_em) * pm.h_over_e * smear, had_fr, had_spots),
        ]
        if mip is not None:  # the track before the first interaction (innermost radial bin)
            comps.append(mip)
        return comps

    def _mip_track(self, t_int):
        """The pion's ionisation track before its first interaction: dE/dx_mip times the path in
        each layer, in the innermost radial bin (energy in layers without voxels leaks)."""
        if not self.medium.dedx_mip:
            return None
        seg = np.clip(t_int[:, None] - self._edges[None, :-1], 0.0, np.diff(self._edges)[None, :])
        path = seg.sum(1)
        frac_layer = seg / np.maximum(path, 1e-12)[:, None]
        frac_lr = np.where(self._lr_r[None, :] == 0, frac_layer[:, self._lr_layer], 0.0)
        out = 1.0 - frac_lr.sum(1)
        return (path * self.medium.dedx_mip, (frac_lr, out), np.maximum(path / 2.0, 1.0))

    def describe(self) -> dict:
        """How this simulator is set up, for file attributes."""
        return {
            "generator": "calozoo.showers.simulator (GFLASH-like)",
            "medium": self.medium.name,
            "particle": self.particle,
            "em_params": json.dumps(asdict(self.em)),
            "pion_model": json.dumps(asdict(self.pion)),
        }

    def with_em(self, **overrides) -> ShowerSimulator:
        return replace(self, em=replace(self.em, **overrides))
