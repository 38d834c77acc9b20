"""The validation metric at each checkpoint: FastCaloGAN's best-epoch criterion.

For every incident-energy point, the total energy over the incident energy, E_tot/E_inc, of the
generated showers is histogrammed against the reference (validation) showers' and the χ² between
the two histograms is computed (``showers.observables.chi2_histograms``: the generated histogram
scaled to the reference's count, each with its own Poisson errors, bins empty in both skipped).
The criterion is the **sum of these χ² over the energy points** (smaller is better); it is reported
with the summed ndf and with the mean separation power of the same histograms.

Binning (per energy point): 30 equal bins spanning the reference's 0.5–99.5 % quantiles of
E_tot/E_inc, widened by 10 % of that span on each side; generated values outside are put in the
first or last bin, so a generator that puts energy far off is penalised, not ignored. A continuous
energy spectrum is cut into 8 log-spaced energy ranges, which play the role of the points.
"""

from __future__ import annotations

import numpy as np

from showers.observables import chi2_histograms, separation_power

__all__ = ["N_BINS", "energy_groups", "etot_chi2"]

N_BINS = 30


def energy_groups(energy: np.ndarray, max_points: int = 30, n_ranges: int = 8) -> list[tuple[float, float]]:
    """(low, high) MeV ranges that group showers by incident energy: one per discrete point, or
    ``n_ranges`` log-spaced ranges for a continuous spectrum."""
    points = np.unique(energy)
    if len(points) <= max_points:
        return [(float(e), float(e)) for e in points]
    edges = np.geomspace(points[0], points[-1] * (1 + 1e-9), n_ranges + 1)
    return [(float(a), float(b)) for a, b in zip(edges[:-1], edges[1:])]


def _in(energy, group):
    lo, hi = group
    return energy == lo if lo == hi else (energy >= lo) & (energy < hi)


def etot_chi2(gen_showers, gen_energy, ref_showers, ref_energy) -> dict:
    """FastCaloGAN's criterion between generated and reference showers.

    gen_showers (N, n_voxels) MeV with gen_energy (N,) MeV; ref_showers (M, n_voxels) MeV with
    ref_energy (M,) MeV. Returns ``chi2_sum``, ``ndf_sum``, ``chi2_ndf`` (= chi2_sum / ndf_sum),
    ``sep_power`` (mean over points), ``etot_shift`` (mean over points of |mean(gen) - mean(ref)| of
    E_tot/E_inc in units of the reference's standard deviation: unlike the χ² and the separation
    power, which saturate once the generated peak leaves the reference's range, it keeps telling
    bad models apart early in training, which is what ASHA's first rungs need) and ``per_energy``:
    [(energy MeV, χ², ndf, separation power)].
    """
    gen_r = np.asarray(gen_showers, dtype=np.float64).sum(1) / np.asarray(gen_energy, dtype=np.float64)
    ref_r = np.asarray(ref_showers, dtype=np.float64).sum(1) / np.asarray(ref_energy, dtype=np.float64)
    per, chi2_sum, ndf_sum, shifts = [], 0.0, 0, []
    for group in energy_groups(np.asarray(ref_energy)):
        r, g = ref_r[_in(ref_energy, group)], gen_r[_in(gen_energy, group)]
        if len(r) == 0 or len(g) == 0:
            continue
        lo, hi = np.quantile(r, [0.005, 0.995])
        span = max(hi - lo, 1e-6)
        edges = np.linspace(lo - 0.1 * span, hi + 0.1 * span, N_BINS + 1)
        h_ref = np.histogram(np.clip(r, edges[0], edges[-1]), edges)[0].astype(np.float64)
        h_gen = np.histogram(np.clip(g, edges[0], edges[-1]), edges)[0].astype(np.float64)
        c = chi2_histograms(h_gen, h_ref)
        sep = separation_power(h_gen, h_ref)
        per.append((0.5 * (group[0] + group[1]), c.chi2, c.ndf, sep))
        shifts.append(abs(float(np.mean(g)) - float(np.mean(r))) / max(float(np.std(r)), 1e-6))
        chi2_sum += c.chi2
        ndf_sum += c.ndf
    if not per:
        raise ValueError("no incident-energy point has both generated and reference showers")
    return {"chi2_sum": chi2_sum, "ndf_sum": ndf_sum, "chi2_ndf": chi2_sum / max(ndf_sum, 1),
            "sep_power": float(np.mean([p[3] for p in per])), "etot_shift": float(np.mean(shifts)),
            "per_energy": per}
