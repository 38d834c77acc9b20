"""Calibrate the built-in simulator against Geant4 showers, and measure how well it agrees.

The agreement criterion (issue "Foundation", item 4): for each incident energy, the simulator's
mean longitudinal profile (energy per layer / E_inc) and mean radial profile (energy per radial bin,
summed over layers and α, / E_inc) must agree with the Geant4 means in every bin of those that
together hold 90% of the energy, within 5% or 3 standard errors of the Geant4 mean, whichever is
larger; the mean E_grid/E_inc within 1% and its spread (standard deviation) within 25%.

``fit`` tunes the coefficients of :class:`showers.simulator.EMParams` by least squares on the
*expected* profiles (averaged analytically over the spots, by Monte Carlo with a fixed seed over the
profile-parameter fluctuations), so the objective is smooth; the result is written to
``showers/data/calibration/<medium>.json`` with its provenance. ``calozoo calibrate`` runs it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from showers.observables import energy_per_layer, energy_per_radial_bin
from showers.readout import Readout
from showers.simulator import EMParams, ShowerSimulator

__all__ = ["Profiles", "core_bins", "reference_profiles", "sample_profiles", "model_profiles", "agreement",
           "agreement_table", "fit", "FREE_PARAMETERS"]


@dataclass
class Profiles:
    """Mean profiles at one incident energy, as fractions of E_inc, with standard errors."""

    energy_mev: float
    n: int
    long_mean: np.ndarray  # (n_layers,)
    long_se: np.ndarray
    rad_mean: np.ndarray  # (n_r,)
    rad_se: np.ndarray
    grid_mean: float  # E_grid / E_inc
    grid_std: float


def core_bins(mean: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the largest bins that together hold ``fraction`` of the sum."""
    order = np.argsort(mean)[::-1]
    cum = np.cumsum(mean[order]) / mean.sum()
    return np.sort(order[: int(np.searchsorted(cum, fraction) + 1)])


def _profiles(energies: np.ndarray, long: np.ndarray, rad: np.ndarray) -> dict[float, Profiles]:
    """Profiles per distinct energy from per-shower layer (N, L) and radial (N, R) fractions."""
    out = {}
    for e in np.unique(energies):
        sel = energies == e
        n = int(sel.sum())
        lo, ra = long[sel], rad[sel]
        tot = lo.sum(1)
        out[float(e)] = Profiles(float(e), n, lo.mean(0), lo.std(0, ddof=1) / math.sqrt(n), ra.mean(0),
                                 ra.std(0, ddof=1) / math.sqrt(n), float(tot.mean()), float(tot.std(ddof=1)))
    return out


def _layer_and_radial(energies: np.ndarray, showers: np.ndarray, readout: Readout):
    return (energy_per_layer(showers, readout) / energies[:, None],
            energy_per_radial_bin(showers, readout) / energies[:, None])


def sample_profiles(energies_mev, showers, readout: Readout) -> dict[float, Profiles]:
    """Profiles per distinct incident energy of a sample (Geant4 or simulated).

    energies_mev: (N,) MeV; showers: (N, n_voxels) MeV.
    """
    energies = np.asarray(energies_mev, dtype=np.float64).ravel()
    return _profiles(energies, *_layer_and_radial(energies, np.asarray(showers), readout))


def reference_profiles(path, readout: Readout, chunk: int = 1000) -> dict[float, Profiles]:
    """Profiles per incident energy of a CaloChallenge-format file, read in chunks of showers."""
    from showers.formats import iter_calochallenge

    energies, longs, rads = [], [], []
    for e, x in iter_calochallenge(path, chunk_size=chunk, readout=readout):
        lo, ra = _layer_and_radial(np.asarray(e, dtype=np.float64), x, readout)
        energies.append(e), longs.append(lo), rads.append(ra)
    return _profiles(np.concatenate(energies).astype(np.float64), np.concatenate(longs), np.concatenate(rads))


def model_profiles(sim: ShowerSimulator, energies, n_draws: int = 400, seed: int = 0) -> dict[float, Profiles]:
    """Expected profiles of the simulator (no spot noise in the means), with the predicted spread of
    E_grid/E_inc: the spread of the expectation over profile fluctuations plus the spot noise of a
    compound Poisson-exponential split between the grid and the leakage, 2 f (1 - f) / N_spot."""
    n_lay = sim.readout.n_layers
    lr_layer, lr_r = sim.lr_layer_and_r
    n_r = int(lr_r.max()) + 1
    # one-hot maps from (layer, r-bin) pairs to layers and to radial bins
    to_layer = np.eye(n_lay)[lr_layer]
    to_r = np.eye(n_r)[lr_r]
    out = {}
    for i, e in enumerate(sorted(float(x) for x in energies)):
        rng = np.random.default_rng([seed, i])
        en = np.full(n_draws, e)
        comps = sim._components(en, np.full(n_draws, 90.0), rng)
        deposit, (frac_lr, frac_out), n_spot = comps[0]
        w = deposit / en
        cell = frac_lr * w[:, None]
        long, rad = cell @ to_layer, cell @ to_r
        g = long.sum(1)
        f = np.clip(frac_out, 0, 1)
        spot_var = (w**2 * 2 * f * (1 - f) / n_spot).mean()
        out[e] = Profiles(e, n_draws, long.mean(0), long.std(0) / math.sqrt(n_draws), rad.mean(0),
                          rad.std(0) / math.sqrt(n_draws), float(g.mean()), float(math.sqrt(g.var() + spot_var)))
    return out


def agreement(ref: Profiles, test: Profiles, core: float = 0.90, spread_tol: float = 0.25, z: float = 3.0) -> dict:
    """How ``test`` agrees with ``ref`` (the Geant4 profiles) by the calibration criterion.

    Returns the worst deviation of the longitudinal and radial means over the core bins, each as a
    relative difference and in units of its tolerance max(5%, 3 SE/mean), the relative difference of
    the mean E_grid/E_inc, the ratio of the spreads (within ``spread_tol``), and ``ok``. ``z`` (3 by the
    criterion) is the number of standard errors allowed.
    """
    res = {"energy_gev": ref.energy_mev / 1000.0, "n_ref": ref.n}
    for name, rm, rse, tm in (("long", ref.long_mean, ref.long_se, test.long_mean),
                              ("rad", ref.rad_mean, ref.rad_se, test.rad_mean)):
        bins = core_bins(rm, core)
        rel = tm[bins] / rm[bins] - 1.0
        tol = np.maximum(0.05, z * rse[bins] / rm[bins])
        worst = int(np.argmax(np.abs(rel) / tol))
        res[f"{name}_bins"] = len(bins)
        res[f"{name}_worst_rel"] = float(rel[worst])
        res[f"{name}_worst_tol"] = float(tol[worst])
        res[f"{name}_worst_bin"] = int(bins[worst])
        res[f"{name}_score"] = float(np.max(np.abs(rel) / tol))
    res["grid_rel"] = test.grid_mean / ref.grid_mean - 1.0
    res["std_ratio"] = test.grid_std / ref.grid_std
    res["ok"] = bool(res["long_score"] <= 1 and res["rad_score"] <= 1 and abs(res["grid_rel"]) <= 0.01
                     and abs(res["std_ratio"] - 1) <= spread_tol)
    return res


def agreement_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`agreement` rows."""
    head = ("| E [GeV] | n G4 | long: layers | worst Δ (tol) | radial: bins | worst Δ (tol) "
            "| E_grid/E Δ | spread ratio | ok |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(
            f"| {r['energy_gev']:g} | {r['n_ref']} | {r['long_bins']} | {r['long_worst_rel']:+.1%} "
            f"({r['long_worst_tol']:.1%}) | {r['rad_bins']} | {r['rad_worst_rel']:+.1%} ({r['rad_worst_tol']:.1%}) "
            f"| {r['grid_rel']:+.2%} | {r['std_ratio']:.2f} | {'yes' if r['ok'] else 'NO'} |"
        )
    return "\n".join(lines)


#: the EM coefficients the fit may move (the rest keep GFLASH's values)
FREE_PARAMETERS = ("t_a", "t_b", "a_a", "a_b", "s_T", "sT_a", "sa_a", "rc_a", "rc_b", "rc_c", "rc_pow",
                   "k1_a", "k2", "k3", "k4_a", "k4_b", "p1_a", "p1_c", "p2_a", "p3_a", "p3_b", "tail_power",
                   "spot_a", "deposit")

#: physical bounds: a deposit cannot exceed the incident energy, the number of spots must grow
#: with energy, the core must widen with depth, and so on
BOUNDS = {"rc_a": (0.0, 0.5), "rc_b": (-0.01, 0.05),  # a core radius > 0 at every energy and depth
          "s_T": (0.3, 2.0), "rc_pow": (0.3, 3.0), "spot_a": (10.0, 5000.0), "spot_b": (0.5, 1.2),
          "deposit": (0.99, 1.0), "k3": (-10.0, -0.1), "tail_power": (0.5, 5.0)}


def fit(reference: dict[float, Profiles], sim: ShowerSimulator, free=FREE_PARAMETERS,
        n_draws: int = 600, max_nfev: int = 400, verbose: int = 0, on_improve=None,
        mean_tol: float = 0.01, spread_tol: float = 0.25) -> EMParams:
    """Least-squares fit of the simulator's EM coefficients to reference profiles.

    ``on_improve(params, cost)`` is called whenever an evaluation beats the best so far (to save
    progress during a long fit). Residuals per energy: the relative deviation of every bin of the longitudinal and radial
    profiles holding 95% of the energy, over its tolerance; the mean E_grid/E_inc over ``mean_tol``
    (the criterion's 1%); the spread ratio over ``spread_tol`` (the criterion's 25%). A tighter
    tolerance than the criterion's leaves a margin for the statistical scatter of the reference.
    """
    from scipy.optimize import least_squares

    energies = sorted(reference)
    base = sim.em
    lower = np.array([BOUNDS.get(k, (-np.inf, np.inf))[0] for k in free])
    upper = np.array([BOUNDS.get(k, (-np.inf, np.inf))[1] for k in free])
    x0 = np.clip(np.array([getattr(base, k) for k in free], dtype=np.float64), lower + 1e-9, upper - 1e-9)
    scale = np.maximum(np.abs(x0), 0.05)
    # every radial bin: the tail beyond the core sets the containment, which the criterion holds to 1%
    masks = {e: (core_bins(reference[e].long_mean, 0.95), np.arange(len(reference[e].rad_mean)))
             for e in energies}

    def residuals(x):
        em = replace(base, **dict(zip(free, x)))
        try:
            model = model_profiles(replace(sim, em=em), energies, n_draws=n_draws)
        except (FloatingPointError, ValueError):
            return np.full(n_res, 1e3)
        res = []
        for e in energies:
            r, m = reference[e], model[e]
            lb, rb = masks[e]
            for rm, rse, mm, bins in ((r.long_mean, r.long_se, m.long_mean, lb), (r.rad_mean, r.rad_se, m.rad_mean, rb)):
                tol = np.maximum(0.05, 3.0 * rse[bins] / rm[bins])
                res.append((mm[bins] / rm[bins] - 1.0) / tol)
            res.append([(m.grid_mean / r.grid_mean - 1.0) / mean_tol, (m.grid_std / r.grid_std - 1.0) / spread_tol])
        out = np.concatenate([np.ravel(a) for a in res])
        out = np.where(np.isfinite(out), out, 1e3)
        cost = float(np.sum(out**2))
        if on_improve is not None and cost < best_cost[0]:
            best_cost[0] = cost
            on_improve(em, cost)
        return out

    best_cost = [np.inf]
    with np.errstate(all="ignore"):
        n_res = len(residuals(x0))
        sol = least_squares(residuals, x0, bounds=(lower, upper), x_scale=scale, max_nfev=max_nfev, verbose=verbose,
                            diff_step=1e-3)
    return replace(base, **dict(zip(free, sol.x)))


def save_calibration(path, medium: str, em: EMParams, provenance: dict, table: str) -> None:
    """Write the fitted coefficients (only those differing from GFLASH's) with their provenance."""
    default = EMParams()
    changed = {k: v for k, v in asdict(em).items() if not math.isclose(v, getattr(default, k), rel_tol=1e-12)}
    Path(path).write_text(json.dumps({"medium": medium, "em": changed, "provenance": provenance,
                                      "agreement": table}, indent=2) + "\n")
