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

The best-epoch criterion (``CRITERION``, :func:`checkpoint_metrics`). χ² of E_tot alone is blind to
a model whose E_tot does not come from its network (par04_vae's ``response_quantiles`` draws it from
the training data's quantile table: the same χ² at every checkpoint), and it never looks at the
shape. So each checkpoint also gets, per energy point and per layer, the χ² of the histograms of

- ``chi2_layers``: the layer's fraction of the shower's energy, E_layer/E_tot (the longitudinal
  shape, whatever sets E_tot);
- ``chi2_centre``: the layer's centres of energy, x and y (mm);
- ``chi2_width``: the layer's widths, x and y (mm),

each summed over layers and energy points with its ndf (``ndf_layers``...), on ``N_LAYER_BINS`` bins
per histogram spanning the reference's 0.5–99.5 % quantiles widened by 10 % (as for E_tot; a layer
without energy in a shower has no centre or width there and is left out of those two). The
criterion is the sum of the four parts' χ²/ndf,

    criterion = chi2_sum/ndf_sum + chi2_layers/ndf_layers + chi2_centre/ndf_centre + chi2_width/ndf_width,

so each part weighs the same whatever its number of bins (about 1 each for a model as good as the
statistics can tell, 0 for identical samples); smaller is better, and it is what the checkpoints are
ranked by (``zoo.checkpoint.CheckpointManager``).

Its statistical error, ``criterion_error``: each part's χ²/ndf has the variance of a (non-central) χ²
over ndf², 2 (ndf + 2 λ) / ndf² with λ = χ² - ndf estimated from the part itself (at least 2 / ndf,
a model as good as the statistics can tell), and the parts add in quadrature. A good model's
criterion sits near its floor of about 4 with an error of 0.1-0.2 (some 50 validation showers per
energy point): two checkpoints closer than that are not told apart, and the checkpoint manager then
prefers the later one (trained longer, at the end of a cosine schedule settled).

``chi2_sum`` keeps its meaning, FastCaloGAN's criterion, and is still reported. Cost: one pass over the
voxels for the layer energies and one for the moments, of the generated and the reference showers, and
the histograms of all layers binned at once: 2.7 s for 5000 against 5000 showers of 6480 voxels on a
shared 2-core CPU (E_tot's χ²: 0.2 s), a fraction of what generating them costs; a 368-voxel
FastCaloGAN region costs a twentieth of that.
"""

from __future__ import annotations

import warnings

import numpy as np

from showers.observables import (chi2_histograms, energy_per_layer, layers_binned_in_alpha, separation_power,
                                 transverse_moments)

__all__ = ["CRITERION", "N_BINS", "N_LAYER_BINS", "checkpoint_metrics", "energy_groups", "etot_chi2", "layer_chi2"]

N_BINS = 30
#: bins of each per-layer histogram (fewer than E_tot's 30: there are n_layers of them per energy point)
N_LAYER_BINS = 10
#: the key of :func:`checkpoint_metrics` that ranks checkpoints (smaller is better)
CRITERION = "criterion"


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
    # summed in float64 without a float64 copy of the showers (hundreds of MB at every checkpoint)
    gen_r = np.asarray(gen_showers).sum(1, dtype=np.float64) / np.asarray(gen_energy, dtype=np.float64)
    ref_r = np.asarray(ref_showers).sum(1, dtype=np.float64) / np.asarray(ref_energy, dtype=np.float64)
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


def _layer_histograms(ref: np.ndarray, gen: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts (n_layers, n_bins) of the reference's and the generated values (n, n_layers) per layer
    (NaN: no value, left out), on each layer's own bins: the reference's 0.5–99.5 % quantiles widened
    by 10 % of their span on each side, values outside counted in the first or last bin."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a layer without values: all-NaN column
        lo, hi = np.nan_to_num(np.nanquantile(ref, [0.005, 0.995], axis=0))
    span = np.maximum(hi - lo, 1e-6 * np.maximum(np.abs(hi), 1e-12))
    lo, width = lo - 0.1 * span, 1.2 * span / n_bins
    n_layers = ref.shape[1]

    def counts(v):
        ok = np.isfinite(v)
        b = np.clip(np.floor((np.where(ok, v, 0.0) - lo) / width), 0, n_bins - 1)
        layer = np.broadcast_to(np.arange(n_layers), v.shape)
        return np.bincount((layer[ok] * n_bins + b[ok]).astype(np.int64), minlength=n_layers * n_bins
                           ).reshape(n_layers, n_bins).astype(np.float64)

    return counts(ref), counts(gen)


def layer_chi2(ref: np.ndarray, gen: np.ndarray, n_bins: int = N_LAYER_BINS) -> tuple[float, int]:
    """χ² and ndf summed over the layers of per-layer histograms of one quantity, reference (M, n_layers)
    against generated (N, n_layers) (NaN: no value). A layer counts where both have values; its χ² is
    :func:`showers.observables.chi2_histograms`'s."""
    h_ref, h_gen = _layer_histograms(ref, gen, n_bins)
    chi2, ndf = 0.0, 0
    for r, g in zip(h_ref, h_gen):
        if r.sum() > 0 and g.sum() > 0:
            c = chi2_histograms(g, r)
            chi2, ndf = chi2 + c.chi2, ndf + c.ndf
    return chi2, ndf


def _shape_features(showers: np.ndarray, readout) -> dict[str, np.ndarray]:
    """Per shower and layer: E_layer/E_tot (N, L), and centres and widths (N, 2 L') over the L' layers
    with angular bins (NaN where the shower has no energy in the layer)."""
    e_layer = energy_per_layer(showers, readout)
    total = e_layer.sum(1, keepdims=True)
    fractions = np.where(total > 0, e_layer / np.where(total > 0, total, 1.0), np.nan)
    m = transverse_moments(showers, readout, empty=np.nan)
    binned = layers_binned_in_alpha(readout)
    return {"layers": fractions,
            "centre": np.concatenate([m.x[:, binned], m.y[:, binned]], axis=1),
            "width": np.concatenate([m.width_x[:, binned], m.width_y[:, binned]], axis=1)}


def checkpoint_metrics(gen_showers, gen_energy, ref_showers, ref_energy, readout) -> dict:
    """The validation metrics of a checkpoint (module docstring): :func:`etot_chi2`'s, plus
    ``chi2_layers``/``ndf_layers``, ``chi2_centre``/``ndf_centre``, ``chi2_width``/``ndf_width`` summed
    over energy points, ``criterion`` (``CRITERION``), the sum of the four χ²/ndf, and its statistical
    error ``criterion_error`` (module docstring).

    gen_showers (N, n_voxels) MeV with gen_energy (N,) MeV; ref_showers (M, n_voxels) MeV with
    ref_energy (M,) MeV; readout: theirs (a Readout or a name).
    """
    out = etot_chi2(gen_showers, gen_energy, ref_showers, ref_energy)
    gen_energy, ref_energy = np.asarray(gen_energy), np.asarray(ref_energy)
    gen_f = _shape_features(np.asarray(gen_showers), readout)
    ref_f = _shape_features(np.asarray(ref_showers), readout)
    totals = {name: [0.0, 0] for name in gen_f}
    for group in energy_groups(ref_energy):
        r_in, g_in = _in(ref_energy, group), _in(gen_energy, group)
        if not r_in.any() or not g_in.any():
            continue
        for name in totals:
            if ref_f[name].shape[1]:
                chi2, ndf = layer_chi2(ref_f[name][r_in], gen_f[name][g_in])
                totals[name][0] += chi2
                totals[name][1] += ndf
    parts = [(out["chi2_sum"], out["ndf_sum"])]
    for name, (chi2, ndf) in totals.items():
        out[f"chi2_{name}"], out[f"ndf_{name}"] = chi2, ndf
        parts.append((chi2, ndf))
    out[CRITERION] = float(sum(chi2 / max(ndf, 1) for chi2, ndf in parts))
    out[CRITERION + "_error"] = float(np.sqrt(sum(max(2.0 * (2.0 * chi2 - ndf), 2.0 * ndf) / max(ndf, 1) ** 2
                                                  for chi2, ndf in parts)))
    return out
