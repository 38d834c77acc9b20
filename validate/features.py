"""High-level features of showers, their histograms, and the per-feature comparison metrics.

The features are those of the CaloChallenge evaluation (``HighLevelFeatures.py``), computed by
``showers.observables``:

===================  =============================================  =========================
name                 what (per shower)                              binning
===================  =============================================  =========================
``etot_einc``        E_tot / E_inc                                  the reference's central
                                                                    99 %, padded (see below)
``e_layer``          energy in each layer, MeV                      log, CaloChallenge style
``centre_x/_y``      centre of energy in x / y per layer, mm        the reference's range
``width_x/_y``       energy-weighted std of x / y per layer, mm     the reference's range
``sparsity``         fraction of empty voxels, per layer and all    [0, 1]
``voxel_energy``     energy of each voxel above 0 (all showers)     log, CaloChallenge style
===================  =============================================  =========================

Binning. The CaloChallenge fixes E_tot/E_inc to 0.5–1.5 in 100 bins, which squeezes a homogeneous
calorimeter's narrow peak into two bins; here every feature is binned on the *reference*: the
central 99 % of its values, widened by 10 % of that span on each side, in ``n_bins`` bins (for
energies the same in log10 of the values above the CaloChallenge's lowest energy, 0.0152 MeV; zero
energies, i.e. empty layers and voxels, are left to the sparsity). Values outside the range are put
in the first or last bin (clipped), so a generator that puts showers far off is penalised rather than
ignored. Layers with one angular bin have no transverse direction and no centre or width; they are
left out, as the CaloChallenge does.

Metrics per histogram: the separation power ½ Σ (p−q)²/(p+q) of the normalised histograms
(0 identical, 1 disjoint) and χ²/ndf (``showers.observables.chi2_histograms``, each sample with its
own Poisson errors).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from showers import observables as obs
from showers.readout import Readout

__all__ = ["FeatureComparison", "compare_features", "feature_matrix", "high_level_features", "feature_bins"]

#: the CaloChallenge's lowest energy for datasets 2 and 3 (0.5 keV over the sampling fraction), MeV
E_MIN_MEV = obs.CALOCHALLENGE_MIN_ENERGY_MEV["2"]

LABELS = {
    "etot_einc": r"$E_\mathrm{tot}/E_\mathrm{inc}$",
    "e_layer": "energy in layer [MeV]",
    "centre_x": "centre of energy x [mm]",
    "centre_y": "centre of energy y [mm]",
    "width_x": "width x [mm]",
    "width_y": "width y [mm]",
    "sparsity": "fraction of empty voxels",
    "voxel_energy": "voxel energy [MeV]",
}
LOG_FEATURES = ("e_layer", "voxel_energy")


def high_level_features(showers, incident_mev, readout: Readout) -> dict[str, np.ndarray]:
    """Per-shower high-level features: {name: (N,) or (N, n_layers)}; centres and widths are NaN in
    layers without a transverse direction or without energy; ``voxel_energy`` is (n_hits,)."""
    e = np.asarray(incident_mev, dtype=np.float64).ravel()
    moments = obs.transverse_moments(showers, readout, empty=np.nan)
    sparsity_layer, sparsity_all = obs.sparsity(showers, readout)
    return {
        "etot_einc": obs.etot_over_einc(showers, readout, e),
        "e_layer": obs.energy_per_layer(showers, readout),
        "centre_x": moments.x, "centre_y": moments.y,
        "width_x": moments.width_x, "width_y": moments.width_y,
        "sparsity": np.concatenate([sparsity_all[:, None], sparsity_layer], axis=1),
        "voxel_energy": obs.voxel_energy_spectrum(showers, readout),
    }


def feature_matrix(feats: dict[str, np.ndarray], incident_mev, readout: Readout) -> np.ndarray:
    """(N, F) high-level vector of each shower for the high-level classifier and FPD/KPD:
    log10 E_inc/GeV, E_tot/E_inc, log10(1 + E_layer/keV) of every layer with voxels, centres and
    widths in x and y of every layer with a transverse direction (0 where a layer is empty), and the
    overall sparsity."""
    e = np.asarray(incident_mev, dtype=np.float64).ravel()
    layers = [i for i, layer in enumerate(readout.layers) if layer.n_voxels]
    transverse = obs.layers_binned_in_alpha(readout)
    cols = [np.log10(e / 1000.0)[:, None], feats["etot_einc"][:, None],
            np.log10(1.0 + 1000.0 * feats["e_layer"][:, layers])]
    cols += [np.nan_to_num(feats[k][:, transverse]) for k in ("centre_x", "centre_y", "width_x", "width_y")]
    cols.append(feats["sparsity"][:, :1])
    return np.concatenate(cols, axis=1)


def feature_bins(values_ref: np.ndarray, name: str, n_bins: int = 50) -> np.ndarray:
    """Bin edges for a feature from the reference's values (see the module docstring)."""
    v = np.asarray(values_ref, dtype=np.float64)
    v = v[np.isfinite(v)]
    if name == "sparsity":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if name in LOG_FEATURES:
        v = v[v > E_MIN_MEV]
        if v.size == 0:
            return np.logspace(np.log10(E_MIN_MEV), np.log10(10 * E_MIN_MEV), n_bins + 1)
        lo, hi = np.quantile(np.log10(v), [0.005, 0.995])
        span = max(hi - lo, 0.1)
        return np.logspace(max(lo - 0.1 * span, np.log10(E_MIN_MEV)), hi + 0.1 * span, n_bins + 1)
    if v.size == 0:
        return np.linspace(0.0, 1.0, n_bins + 1)
    lo, hi = np.quantile(v, [0.005, 0.995])
    span = max(hi - lo, 1e-6 * max(abs(hi), 1.0), 1e-9)
    return np.linspace(lo - 0.1 * span, hi + 0.1 * span, n_bins + 1)


def _counts(values: np.ndarray, edges: np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if name in LOG_FEATURES:  # energies at or below the lowest energy (empty) are not histogrammed
        v = v[v > E_MIN_MEV]
    return np.histogram(np.clip(v, edges[0], edges[-1]), edges)[0].astype(np.float64)


@dataclass
class FeatureComparison:
    """One histogram compared: the feature, the layer (None for per-shower features), the incident
    energy group ('' for all), the counts of both samples on ``edges`` and the two metrics."""

    feature: str
    layer: int | None
    energy: str
    edges: np.ndarray
    gen: np.ndarray
    ref: np.ndarray
    sep_power: float
    chi2_ndf: float

    @property
    def label(self) -> str:
        where = "" if self.layer is None else (" (all layers)" if self.layer < 0 else f" layer {self.layer}")
        return f"{self.feature}{where}{' @ ' + self.energy if self.energy else ''}"


def _compare(feature, layer, energy, gen_values, ref_values, n_bins) -> FeatureComparison | None:
    edges = feature_bins(ref_values, feature, n_bins)
    g, r = _counts(gen_values, edges, feature), _counts(ref_values, edges, feature)
    if g.sum() == 0 or r.sum() == 0:
        return None
    chi2 = obs.chi2_histograms(g, r)
    return FeatureComparison(feature, layer, energy, edges, g, r, obs.separation_power(g, r), chi2.reduced)


def compare_features(gen_feats: dict, ref_feats: dict, *, energy_groups=(), n_bins: int = 50,
                     per_layer: bool = True) -> list[FeatureComparison]:
    """Histogram every feature of both samples on the reference's bins and compare them.

    energy_groups: [(label, gen_mask, ref_mask)] for E_tot/E_inc per incident energy.
    per_layer: compare each layer's e_layer, centres, widths and sparsity (else only the overall
        sparsity, E_tot/E_inc and the voxel spectrum). Layers where either sample has no value are
        skipped.
    """
    out = [_compare("etot_einc", None, "", gen_feats["etot_einc"], ref_feats["etot_einc"], n_bins)]
    for label, gm, rm in energy_groups:
        if gm.any() and rm.any():
            out.append(_compare("etot_einc", None, label, gen_feats["etot_einc"][gm], ref_feats["etot_einc"][rm],
                                max(10, min(n_bins, int(3 * np.sqrt(rm.sum()))))))
    out.append(_compare("voxel_energy", None, "", gen_feats["voxel_energy"], ref_feats["voxel_energy"], n_bins))
    out.append(_compare("sparsity", -1, "", gen_feats["sparsity"][:, 0], ref_feats["sparsity"][:, 0], n_bins))
    if per_layer:
        for name in ("e_layer", "centre_x", "centre_y", "width_x", "width_y", "sparsity"):
            g_all, r_all = gen_feats[name], ref_feats[name]
            offset = 1 if name == "sparsity" else 0
            for layer in range(r_all.shape[1] - offset):
                out.append(_compare(name, layer, "", g_all[:, layer + offset], r_all[:, layer + offset], n_bins))
    return [c for c in out if c is not None]
