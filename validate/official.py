"""The CaloChallenge 2022 evaluator's figures on any readout: its threshold, its high-level
features, its classifier inputs, its histograms and their separation powers.

What ``code/evaluate.py`` of CaloChallenge/homepage (with ``HighLevelFeatures.py`` and
``evaluate_plotting_helper.py``) computes, written against ``showers.observables``:

- **threshold**: voxels below ``min_energy`` (dataset 1: 1 MeV; datasets 2 and 3: 0.5 keV / 0.033,
  ``showers.observables.CALOCHALLENGE_MIN_ENERGY_MEV``) are set to 0 in both samples before anything
  else is computed;
- **high-level features** (:func:`evaluator_features`), per shower: E_tot; per layer with voxels the
  energy, the sparsity (fraction of voxels at 0 after the threshold) and the energy-weighted centre
  and width of the radius (radial-bin midpoints); per layer with more than one angular bin the
  centre and width of x = r cos α and y = r sin α (the evaluator's "eta" and "phi"). Empty layers
  give 0 (the evaluator's ``+1e-16`` in the denominators);
- **classifier inputs**: low level (:func:`low_level_input`) [log10 E_inc/MeV, voxels / E_inc] after
  the threshold; high level (:func:`high_level_input`) [log10 E_inc, log10(E_layer + 1e-8), centres
  x, centres y, widths x, widths y (each / 100), log10(E_tot + 1e-8), sparsity, centre r / 100,
  width r / 100], in that order (``prepare_high_data_for_classifier``), which FPD and KPD also take;
- **histograms** (:func:`evaluator_histograms`) on the evaluator's bins
  (``showers.observables.calochallenge_bins``): E_tot/E_inc, each layer's energy, centres and
  widths, the voxel-energy spectrum (all voxels of all showers, after the threshold), and the
  helper's sparsity and radial centre and width per layer (drawn by its ``plot_sparsity``,
  ``plot_ECR``, ``plot_ECWidthR``, which its histogram mode does not call). As matplotlib's
  ``hist(density=True)`` does, values outside the bins are dropped and each histogram is normalised
  over the values it holds; the last bin includes its upper edge. The energy bins end at the
  reference's largest value;
- **separation power** ½ Σ (p − q)² / (p + q) of each pair (``_separation_power``), summarised per
  feature over the layers by the mean, the largest and where (:func:`summarise`).

Which binning a readout gets (:func:`evaluator_dataset`): dataset 1's for the dataset-1 readouts,
dataset 3's for ``calochallenge-3`` and ``par04``, dataset 2's for ``calochallenge-2`` and
``g4-pbwo4`` (a PbWO4 readout of the same 45 × 16 × 9 shape, with 5 mm radial bins where dataset 2
has 4.65 mm); other readouts have no CaloChallenge binning (None): their classifiers and distances
use no threshold, and they get no evaluator histograms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from showers import observables as obs
from showers.readout import Readout, get_readout

__all__ = ["EVALUATOR_READOUTS", "HIST_FEATURES", "Histogram", "apply_threshold", "evaluator_dataset",
           "evaluator_features", "evaluator_histograms", "floor_split", "high_level_input", "low_level_input", "min_energy",
           "summarise"]

#: the readouts that get the evaluator's binning, and which dataset's
EVALUATOR_READOUTS = {"calochallenge-1-photons": "1-photons", "calochallenge-1-pions": "1-pions",
                      "calochallenge-2": "2", "g4-pbwo4": "2", "calochallenge-3": "3", "par04": "3"}

#: the histogrammed features, in the report's order: (name, per layer, what the evaluator calls it)
HIST_FEATURES = (
    ("etot_einc", False, "E_tot / E_inc"),
    ("e_layer", True, "E layer"),
    ("centre_x", True, "EC Eta"),
    ("centre_y", True, "EC Phi"),
    ("width_x", True, "Width Eta"),
    ("width_y", True, "Width Phi"),
    ("voxel_energy", False, "voxel distribution"),
    ("sparsity", True, "Sparsity (helper)"),
    ("centre_r", True, "EC r (helper)"),
    ("width_r", True, "Width r (helper)"),
)
_BINS = {"e_layer": "energy_per_layer", "centre_x": "centre", "centre_y": "centre", "width_x": "width",
         "width_y": "width"}


def evaluator_dataset(readout, dataset: str | None = "auto") -> str | None:
    """The CaloChallenge dataset whose binning and threshold ``readout`` gets: ``dataset`` itself
    unless "auto" (then :data:`EVALUATOR_READOUTS`, None for other readouts); "none" gives None."""
    if dataset in (None, "none"):
        return None
    if dataset == "auto":
        return EVALUATOR_READOUTS.get(get_readout(readout).name)
    if dataset not in obs.CALOCHALLENGE_MIN_ENERGY_MEV:
        raise ValueError(f"unknown CaloChallenge dataset {dataset!r}; known: auto, none, "
                         f"{', '.join(obs.CALOCHALLENGE_MIN_ENERGY_MEV)}")
    return dataset


def min_energy(dataset: str | None) -> float:
    """The evaluator's voxel threshold in MeV for ``dataset`` (0 for None)."""
    return 0.0 if dataset is None else obs.CALOCHALLENGE_MIN_ENERGY_MEV[dataset]


def apply_threshold(showers, threshold_mev: float) -> np.ndarray:
    """``showers`` (N, n_voxels) with the voxels below ``threshold_mev`` set to 0 (the evaluator's
    ``np.where(shower < min_energy, 0, shower)``); the same array when the threshold is 0."""
    showers = np.asarray(showers)
    if threshold_mev <= 0:
        return showers
    return np.where(showers < threshold_mev, np.zeros((), showers.dtype), showers)


def evaluator_features(showers, incident_mev, readout: Readout) -> dict[str, np.ndarray]:
    """The evaluator's high-level features of thresholded ``showers`` (N, n_voxels) MeV:
    ``e_inc`` and ``e_tot`` (N,) MeV; ``e_layer``, ``sparsity``, ``centre_r``, ``width_r`` (N, L) for
    the L layers with voxels; ``centre_x``, ``centre_y``, ``width_x``, ``width_y`` (N, La) mm for the La
    layers with more than one angular bin; ``layers`` and ``layers_alpha`` their indices."""
    readout = get_readout(readout)
    e = np.asarray(incident_mev, dtype=np.float64).ravel()
    layers, alpha = readout.active_layers, obs.layers_binned_in_alpha(readout)
    moments = obs.transverse_moments(showers, readout)
    centre_r, width_r = obs.radial_moments(showers, readout)
    sparsity, _ = obs.sparsity(showers, readout)
    return {"e_inc": e, "e_tot": obs.total_energy(showers, readout),
            "e_layer": obs.energy_per_layer(showers, readout)[:, layers], "sparsity": sparsity[:, layers],
            "centre_r": centre_r[:, layers], "width_r": width_r[:, layers],
            "centre_x": moments.x[:, alpha], "centre_y": moments.y[:, alpha],
            "width_x": moments.width_x[:, alpha], "width_y": moments.width_y[:, alpha],
            "layers": np.asarray(layers), "layers_alpha": np.asarray(alpha)}


def high_level_input(feats: dict) -> np.ndarray:
    """(N, 2 + 4 L + 4 La) for a readout of L layers with voxels, La of them with angular bins (362
    for 45 × 16 × 9): the evaluator's cls-high input and FPD/KPD vector (see the module docstring for
    the order and scaling)."""
    return np.concatenate([
        np.log10(feats["e_inc"])[:, None], np.log10(feats["e_layer"] + 1e-8),
        feats["centre_x"] / 1e2, feats["centre_y"] / 1e2, feats["width_x"] / 1e2, feats["width_y"] / 1e2,
        np.log10(feats["e_tot"] + 1e-8)[:, None], feats["sparsity"], feats["centre_r"] / 1e2,
        feats["width_r"] / 1e2], axis=1)


def low_level_input(showers, incident_mev) -> np.ndarray:
    """(N, 1 + n_voxels) float64: log10 of E_inc in MeV, then the (thresholded) voxel energies over
    E_inc: the evaluator's cls-low input."""
    e = np.asarray(incident_mev, dtype=np.float64).ravel()
    x = np.asarray(showers)
    out = np.empty((len(e), 1 + x.shape[1]))
    out[:, 0] = np.log10(e)
    rows = max(1, (1 << 23) // max(x.shape[1], 1))  # a float32 (N, 40500) sample converted a block at a time
    for start in range(0, len(e), rows):
        out[start:start + rows, 1:] = x[start:start + rows] / e[start:start + rows, None]
    return out


@dataclass
class Histogram:
    """One feature (``layer`` None for per-shower features) of both samples on the evaluator's
    ``edges``: the counts in range, and the separation power (NaN when a sample has no value in
    range, where the evaluator's normalisation divides 0 by 0)."""

    feature: str
    layer: int | None
    edges: np.ndarray
    gen: np.ndarray
    ref: np.ndarray
    sep_power: float

    @property
    def label(self) -> str:
        return self.feature + ("" if self.layer is None else f" layer {self.layer}")


def _counts(values, edges) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    return np.histogram(v[np.isfinite(v)], edges)[0].astype(np.float64)  # drops values outside, as plt.hist


def _histogram(feature, layer, gen_values, ref_values, edges) -> Histogram:
    g, r = _counts(gen_values, edges), _counts(ref_values, edges)
    sep = obs.separation_power(g, r) if g.sum() > 0 and r.sum() > 0 else float("nan")
    return Histogram(feature, layer, edges, g, r, sep)


def _voxel_counts(showers, edges) -> np.ndarray:
    x = np.asarray(showers)
    rows = max(1, (1 << 22) // max(x.shape[1], 1))
    return sum((np.histogram(x[i:i + rows], edges)[0] for i in range(0, len(x), rows)),
               np.zeros(len(edges) - 1)).astype(np.float64)


def evaluator_histograms(gen_feats: dict, ref_feats: dict, gen_showers, ref_showers, dataset: str,
                         features=None) -> list[Histogram]:
    """Every feature of :data:`HIST_FEATURES` (or only ``features``) of both samples on the
    evaluator's bins for ``dataset``, from :func:`evaluator_features` of the thresholded showers and
    the thresholded showers themselves (for the voxel spectrum). A layer whose reference energy
    never reaches the threshold has no energy bins and is left out."""
    e_min = min_energy(dataset)
    out = []
    for name, per_layer, _ in HIST_FEATURES:
        if features is not None and name not in features:
            continue
        if name == "etot_einc":
            out.append(_histogram(name, None, gen_feats["e_tot"] / gen_feats["e_inc"],
                                  ref_feats["e_tot"] / ref_feats["e_inc"], obs.calochallenge_bins(name, dataset)))
        elif name == "voxel_energy":
            top = float(np.max(ref_showers))
            if top > e_min:
                edges = obs.calochallenge_bins(name, dataset, e_max=top)
                g, r = _voxel_counts(gen_showers, edges), _voxel_counts(ref_showers, edges)
                sep = obs.separation_power(g, r) if g.sum() > 0 and r.sum() > 0 else float("nan")
                out.append(Histogram(name, None, edges, g, r, sep))
        else:
            ids = gen_feats["layers_alpha" if name in ("centre_x", "centre_y", "width_x", "width_y") else "layers"]
            for j, layer in enumerate(ids):
                r = ref_feats[name][:, j]
                if name == "e_layer":
                    if r.max() <= e_min:
                        continue
                    edges = obs.calochallenge_bins(_BINS[name], dataset, e_max=float(r.max()))
                else:
                    edges = obs.calochallenge_bins(_BINS.get(name, name), dataset, layer=int(layer))
                out.append(_histogram(name, int(layer), gen_feats[name][:, j], r, edges))
    return out


def summarise(histograms: list[Histogram]) -> dict[str, dict]:
    """Per feature: ``mean`` of the separation powers over its layers (the value itself for
    per-shower features), ``max`` and ``where`` (its layer), ``n`` histograms and ``n_undefined``
    (NaN: a sample without values in range)."""
    out = {}
    for name, _, _ in HIST_FEATURES:
        hs = [h for h in histograms if h.feature == name]
        if not hs:
            continue
        ok = [h for h in hs if np.isfinite(h.sep_power)]
        worst = max(ok, key=lambda h: h.sep_power) if ok else None
        out[name] = {"mean": float(np.mean([h.sep_power for h in ok])) if ok else float("nan"),
                     "max": worst.sep_power if worst else float("nan"), "where": worst.layer if worst else None,
                     "n": len(hs), "n_undefined": len(hs) - len(ok)}
    return out


def floor_split(gen_e, ref_e, seed: int = 0) -> tuple[np.ndarray, np.ndarray] | str:
    """Split the reference in two for a reference-against-reference floor at the generated
    sample's size: indices ``a`` (as many showers as ``gen_e``, with its energies where those are
    discrete energies of the reference) and ``b`` (the rest). Returns a sentence saying why not
    when the reference has fewer than twice the generated sample's showers (at one of its energies)."""
    gen_e, ref_e = np.asarray(gen_e, np.float64).ravel(), np.asarray(ref_e, np.float64).ravel()
    rng = np.random.default_rng(seed)
    energies, counts = np.unique(gen_e, return_counts=True)
    if 5 * len(energies) <= len(gen_e) and np.isin(energies, ref_e).all():  # discrete energies
        parts = []
        for e, c in zip(energies, counts):
            idx = np.flatnonzero(ref_e == e)
            if len(idx) < 2 * c:
                return (f"no reference floor: the reference has {len(idx)} showers at {e / 1000:g} GeV, fewer than "
                        f"twice the generated sample's {c}")
            parts.append(rng.choice(idx, size=c, replace=False))
        a = np.sort(np.concatenate(parts))
    elif len(ref_e) < 2 * len(gen_e):
        return (f"no reference floor: the reference has {len(ref_e)} showers, fewer than twice the generated "
                f"sample's {len(gen_e)}")
    else:
        a = np.sort(rng.choice(len(ref_e), size=len(gen_e), replace=False))
    return a, np.setdiff1d(np.arange(len(ref_e)), a)
