"""The validation report: generated showers against reference (Geant4) showers, in one folder.

:func:`validate_files` (``calozoo validate GENERATED.h5 REFERENCE.h5``) and :func:`validate_samples`
write to ``out_dir``:

- ``report.md``: first the CaloChallenge evaluator's figures (``validate.official``, the classifier
  ``validate.classifier``, the distances ``validate.distances``): the low- and high-level
  classifiers' AUC and JSD as mean ± standard deviation over ``seeds`` runs, FPD and KPD on the
  evaluator's high-level vector with the sample sizes, and the separation powers of the evaluator's
  histograms (E_tot/E_inc, the voxel-energy spectrum, and per layer the energy, centres and widths:
  mean, largest and where), each beside the reference-against-reference floor at the same sizes
  where there is one; then the per-energy table (χ²/ndf and separation power of E_tot/E_inc, largest
  difference of the mean longitudinal and radial profiles over the bins holding 90 % of the energy),
  the high-level features on the reference's own binning (``validate.features``), and the figures;
- ``metrics.json``: every number of the report; :func:`headline` flattens it into named figures
  (:data:`HEADLINE` lists the names), which MLflow logs and ``validate-fleet --fail`` thresholds;
- ``profiles.png``: FullSim against MLSim, mean longitudinal and radial profiles and E_tot/E_inc per
  energy, with ratio panels (``validate.plots.plot_comparison``);
- ``features_*.png``: the feature histograms, on the evaluator's bins where the readout has them
  (``validate.plots.plot_features``).

The floor: the figures of the reference against itself at the generated sample's size, which a
finite sample cannot go below. ``floor=(E, showers)`` gives it a sample to use (e.g. held-out Geant4
showers that the model never saw, as many as the generated ones, compared with the same reference);
otherwise the reference is split in two (``validate.official.floor_split``: the generated sample's
size against the rest) when it holds at least twice the generated sample, and the report says when
it does not.

``calozoo.tracked.log_report`` puts a report folder into MLflow (this package tracks nothing).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from showers import __version__
from showers.calibrate import core_bins
from showers.formats import read_strided, source_label
from showers.observables import chi2_histograms
from showers.plots import energy_groups
from showers.readout import Readout
from validate import official
from validate.classifier import SIZES, ClassifierConfig, classifier_seeds
from validate.compare import compare_per_energy
from validate.distances import fpd, kpd
from validate.features import FeatureComparison, compare_features, high_level_features
from validate.plots import plot_comparison, plot_features

__all__ = ["HEADLINE", "ValidateConfig", "headline", "read_sample", "validate_files", "validate_samples"]

#: the per-layer features whose separation powers must stay within a multiple of the floor
LAYER_FEATURES = ("e_layer", "centre_x", "centre_y", "width_x", "width_y")
PER_LAYER = tuple(name for name, per_layer, _ in official.HIST_FEATURES if per_layer)

#: the names of :func:`headline`'s figures (stable: MLflow metrics and fleet thresholds use them)
HEADLINE = {
    "auc_low": "low-level classifier AUC (voxels / E_inc), mean over seeds",
    "auc_low_std": "its standard deviation over seeds",
    "jsd_low": "low-level classifier JSD, mean over seeds", "jsd_low_std": "its standard deviation over seeds",
    "auc_high": "high-level classifier AUC, mean over seeds", "auc_high_std": "its standard deviation over seeds",
    "jsd_high": "high-level classifier JSD, mean over seeds", "jsd_high_std": "its standard deviation over seeds",
    "fpd": "FPD on the evaluator's high-level vector", "fpd_error": "its uncertainty",
    "kpd": "KPD on the evaluator's high-level vector", "kpd_error": "its uncertainty",
    "fpd_floor": "FPD of the reference against itself at the same sizes", "kpd_floor": "KPD likewise",
    "sep_etot_einc": "separation power of E_tot/E_inc, evaluator's bins",
    "sep_voxel_energy": "separation power of the voxel-energy spectrum, evaluator's bins",
    **{f"sep_{f}_{k}": f"{k} over layers of the separation powers of {f}, evaluator's bins"
       for f in PER_LAYER for k in ("mean", "max")},
    **{f"sep_{f}_floor": "the floor of the figure before" for f in ("etot_einc", "voxel_energy")},
    **{f"sep_{f}_{k}_floor": "the floor of the figure before" for f in PER_LAYER for k in ("mean", "max")},
    "sep_etot_einc_over_floor": "separation power of E_tot/E_inc over its floor",
    "sep_voxel_energy_over_floor": "separation power of the voxel spectrum over its floor",
    **{f"sep_{f}_over_floor": f"{f}: the larger of its mean over layers over the floor's mean and its largest "
                              "layer over the floor's largest" for f in LAYER_FEATURES},
    "sep_layers_over_floor_max": "the largest of the five figures before (the layers' energies, centres, widths)",
    "sep_power_etot": "separation power of E_tot/E_inc, reference's binning",
    "chi2_ndf_etot": "χ²/ndf of E_tot/E_inc, reference's binning",
    "max_sep_power_etot_per_energy": "largest separation power of E_tot/E_inc at one energy",
    "max_long_rel": "largest relative difference of the mean longitudinal profile (90 % bins)",
    "max_rad_rel": "largest relative difference of the mean radial profile (90 % bins)",
    "mean_sep_power_features": "mean separation power of the features on the reference's binning",
}


@dataclass
class ValidateConfig:
    """What the report computes.

    classifier: a size of ``validate.classifier.SIZES`` ("official", "small", "tiny"), "none", or
        "auto": "official" for a readout with the evaluator's binning (``dataset``), whose figures are
        then comparable with the published ones, "small" for any other.
    classifier_epochs: overrides the size's number of epochs.
    seeds: runs of each classifier (seeds ``seed``, ``seed + 1``, ...): the report gives their mean
        and standard deviation.
    dataset: the CaloChallenge dataset whose binning and threshold the evaluator's figures take:
        "auto" (from the readout, ``validate.official.evaluator_dataset``), "1-photons", "1-pions",
        "2", "3", or "none".
    floor: compare the reference with itself at the generated sample's size, where it can be split
        (or where ``validate_samples`` is given a floor sample).
    max_showers: at most this many showers of each file are read (evenly strided, so a file sorted by
        energy keeps all its energies).
    n_bins: bins of the feature histograms on the reference's binning.
    per_layer: histogram every layer's features on the reference's binning, and draw the per-layer
        histograms (the evaluator's histograms are computed per layer in any case).
    distances: compute FPD and KPD (``fpd_batches`` batches per batch size).
    plots: draw the PNGs (per-layer features for at most ``max_layers_drawn`` layers).
    """

    classifier: str = "auto"
    classifier_epochs: int | None = None
    seeds: int = 3
    dataset: str = "auto"
    floor: bool = True
    max_showers: int = 50_000
    n_bins: int = 50
    per_layer: bool = True
    distances: bool = True
    fpd_batches: int = 20
    plots: bool = True
    max_layers_drawn: int = 12
    seed: int = 0
    labels: tuple[str, str] = ("reference", "generated")  # validate_files takes them from the files
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"classifier seeds must be at least 1, got {self.seeds}")
        self.classifier_size(None)  # an unknown size fails here, before any work

    def classifier_size(self, dataset: str | None) -> str:
        """The classifier size for a readout with the evaluator's ``dataset`` binning (None: none)."""
        if self.classifier == "auto":
            return "official" if dataset is not None else "small"
        if self.classifier != "none" and self.classifier not in SIZES:
            raise ValueError(f"unknown classifier size {self.classifier!r}; known: auto, {', '.join(SIZES)}, none")
        return self.classifier

    def classifier_config(self, dataset: str | None = "2") -> ClassifierConfig | None:
        size = self.classifier_size(dataset)
        if size == "none":
            return None
        kw = dict(SIZES[size])
        if self.classifier_epochs is not None:
            kw["epochs"] = self.classifier_epochs
        return ClassifierConfig(**kw, seed=self.seed, device=self.device)


def read_sample(path, readout=None, max_showers: int = 50_000, *,
                data_checks: bool = True) -> tuple[np.ndarray, np.ndarray, Readout]:
    """(E (N,) MeV, showers (N, n_voxels) MeV, readout) of a CaloChallenge file, at most
    ``max_showers`` rows evenly strided through it; only those rows are read (memory is bounded by
    ``max_showers``, not by the file). Checked as every reader checks (``ShowerDataError`` naming
    the file, the dataset and the problem): ``showers.formats.read_strided``.

    data_checks: also the checks meant for data (units, negative energies, E_tot/E_inc < 2); a
        generated file, which a poor model may fill with ten times the incident energy, is only
        checked for non-finite values."""
    e, x, readout, _ = read_strided(path, readout, max_showers, data_checks=data_checks)
    return e, x, readout


def _layers_to_draw(e_layer_ref: np.ndarray, n: int) -> set[int]:
    """At most ``n`` layers, evenly spread over those holding 90 % of the reference's energy (the
    metrics cover every layer; drawing 45 layers × 6 features would be unreadable and slow)."""
    core = core_bins(e_layer_ref.mean(0), 0.9)
    return {int(core[i]) for i in np.unique(np.linspace(0, len(core) - 1, min(n, len(core))).round().astype(int))}


def _ratio(value: float, floor: float) -> float:
    """value / floor; 0 when both are 0, inf when only the floor is."""
    if value == 0:
        return 0.0
    return value / floor if floor > 0 else float("inf")


def headline(metrics: dict) -> dict[str, float]:
    """The report's figures as a flat {name: value} (what goes to MLflow and the fleet table);
    :data:`HEADLINE` says what each name is."""
    out = {}
    for kind in ("low", "high"):
        c = metrics.get("classifier", {}).get(kind)
        if c:
            for key in ("auc", "jsd"):
                out[f"{key}_{kind}"], out[f"{key}_{kind}_std"] = c[key], c[f"{key}_std"]
    for name in ("fpd", "kpd"):
        if name in metrics:
            out[name], out[f"{name}_error"] = metrics[name]["value"], metrics[name]["error"]
            if metrics[name].get("floor"):
                out[f"{name}_floor"] = metrics[name]["floor"]["value"]
    ev = metrics.get("evaluator", {}).get("summary", {})
    for feature, s in ev.items():
        keys = ("mean",) if feature in ("etot_einc", "voxel_energy") else ("mean", "max")
        for k in keys:
            name = f"sep_{feature}" + ("" if len(keys) == 1 else f"_{k}")
            out[name] = s[k]
            if "floor_mean" in s:
                out[f"{name}_floor"] = s[f"floor_{k}"]
        if feature in ("etot_einc", "voxel_energy") and "floor_mean" in s:
            out[f"sep_{feature}_over_floor"] = _ratio(s["mean"], s["floor_mean"])
        elif feature in LAYER_FEATURES and "over_floor" in s:
            out[f"sep_{feature}_over_floor"] = s["over_floor"]
    ratios = [s["over_floor"] for f, s in ev.items() if f in LAYER_FEATURES and "over_floor" in s]
    if ratios:
        out["sep_layers_over_floor_max"] = max(ratios)
    etot = next(f for f in metrics["features"] if f["label"] == "etot_einc")  # all showers
    out.update(sep_power_etot=etot["sep_power"], chi2_ndf_etot=etot["chi2_ndf"])
    per_e = metrics["per_energy"]
    out["max_sep_power_etot_per_energy"] = max(r["sep_power"] for r in per_e)
    out["max_long_rel"] = max(r["long_max_rel"] for r in per_e)
    out["max_rad_rel"] = max(r["rad_max_rel"] for r in per_e)
    out["mean_sep_power_features"] = float(np.mean([f["sep_power"] for f in metrics["features"]]))
    return {k: float(v) for k, v in out.items()}


def _feature_summary(features: list[dict]) -> list[dict]:
    """Per feature (and energy): how many histograms, mean and worst separation power, where."""
    groups: dict[tuple, list[dict]] = {}
    for f in features:
        groups.setdefault((f["feature"], f["layer"] is not None and f["layer"] >= 0, f["energy"] != ""), []).append(f)
    rows = []
    for (name, per_layer, per_energy), fs in groups.items():
        worst = max(fs, key=lambda f: f["sep_power"])
        what = name + (" per layer" if per_layer else "") + (" per energy" if per_energy else "")
        rows.append({"feature": what, "n": len(fs), "mean_sep_power": float(np.mean([f["sep_power"] for f in fs])),
                     "worst_sep_power": worst["sep_power"], "worst": worst["label"],
                     "median_chi2_ndf": float(np.nanmedian([f["chi2_ndf"] for f in fs]))})
    return rows


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _floor_pair(gen_e, ref_e, ref_t, cfg: ValidateConfig, floor, threshold: float):
    """(floor sample E, showers, floor reference E, showers) thresholded, or (None, why not)."""
    if floor is not None:
        fe, fx = floor
        return (np.asarray(fe, np.float64).ravel(), official.apply_threshold(fx, threshold), ref_e, ref_t), None
    if not cfg.floor:
        return None, "no floor asked for"
    split = official.floor_split(gen_e, ref_e, cfg.seed)
    if isinstance(split, str):
        return None, split
    a, b = split
    return (ref_e[a], ref_t[a], ref_e[b], ref_t[b]), None


def _evaluator_figures(gen_e, gen_x, ref_e, ref_x, readout, cfg: ValidateConfig, floor, say) -> tuple[dict, list]:
    """The CaloChallenge evaluator's figures (``validate.official``), their floor, the classifiers
    and the distances: (metrics entries, the evaluator's histograms for the plots)."""
    dataset = official.evaluator_dataset(readout, cfg.dataset)
    threshold = official.min_energy(dataset)
    gen_t, ref_t = official.apply_threshold(gen_x, threshold), official.apply_threshold(ref_x, threshold)
    say("the evaluator's high-level features")
    fg, fr = official.evaluator_features(gen_t, gen_e, readout), official.evaluator_features(ref_t, ref_e, readout)
    pair, why_not = _floor_pair(gen_e, ref_e, ref_t, cfg, floor, threshold)
    ff = official.evaluator_features(pair[1], pair[0], readout) if pair else None
    ffr = official.evaluator_features(pair[3], pair[2], readout) if pair else None
    out = {"evaluator": {"dataset": dataset, "min_energy_mev": threshold,
                         "floor": ({"n_gen": len(pair[0]), "n_ref": len(pair[2]),
                                    "source": "given" if floor is not None else "reference split"}
                                   if pair else {"note": why_not})}}
    hists = []
    if dataset is not None:
        say(f"the evaluator's histograms (dataset {dataset} binning)")
        hists = official.evaluator_histograms(fg, fr, gen_t, ref_t, dataset)
        summary = official.summarise(hists)
        rows = [{"feature": h.feature, "layer": h.layer, "sep_power": h.sep_power} for h in hists]
        if pair:
            floors = {(h.feature, h.layer): h.sep_power
                      for h in official.evaluator_histograms(ff, ffr, pair[1], pair[3], dataset)}
            for row in rows:
                row["floor"] = floors.get((row["feature"], row["layer"]), float("nan"))
                row["over_floor"] = _ratio(row["sep_power"], row["floor"]) if np.isfinite(row["floor"]) else float("nan")
            for name, sm in summary.items():
                mine = [r for r in rows if r["feature"] == name and np.isfinite(r["floor"]) and np.isfinite(r["sep_power"])]
                if not mine:
                    continue
                sm["floor_mean"] = float(np.mean([r["floor"] for r in mine]))
                sm["floor_max"] = float(max(r["floor"] for r in mine))
                # the mean over layers against the floor's mean, the largest against the floor's
                # largest: one layer's floor is one noisy draw, and the largest of some 200 ratios of
                # noisy figures stands far above 1 for a sample against itself
                sm["over_floor"] = max(_ratio(sm["mean"], sm["floor_mean"]), _ratio(sm["max"], sm["floor_max"]))
        out["evaluator"].update(histograms=rows, summary=summary)
    hl_gen, hl_ref = official.high_level_input(fg), official.high_level_input(fr)
    if cfg.distances:
        say("FPD and KPD on the evaluator's high-level vector")
        for name, fn in (("fpd", lambda r, g: fpd(r, g, min_samples=10_000, num_batches=cfg.fpd_batches, seed=cfg.seed)),
                         ("kpd", lambda r, g: kpd(r, g, batch_size=10_000, seed=cfg.seed))):
            d = fn(hl_ref, hl_gen)
            out[name] = {"value": d.value, "error": d.error, "n_gen": len(hl_gen), "n_ref": len(hl_ref),
                         "n_features": hl_gen.shape[1], "floor": None}
            if pair:
                f = fn(official.high_level_input(ffr), official.high_level_input(ff))
                out[name]["floor"] = {"value": f.value, "error": f.error, "n_gen": len(pair[0]), "n_ref": len(pair[2])}
    ccfg = cfg.classifier_config(dataset)
    if ccfg is not None:
        out["classifier_config"] = {**dataclasses.asdict(ccfg), "size": cfg.classifier_size(dataset), "seeds": cfg.seeds}
        out["classifier"] = {}
        for kind, (xg, xr) in (("low", (official.low_level_input(gen_t, gen_e), official.low_level_input(ref_t, ref_e))),
                               ("high", (hl_gen, hl_ref))):
            what = "voxels" if kind == "low" else "high-level features"
            out["classifier"][kind] = classifier_seeds(xg, xr, ccfg, cfg.seeds,
                                                       progress=lambda t, w=what: say(f"classifier on {w}, {t}"))
            del xg, xr
    return out, hists


def _num(v: float, digits: int = 3) -> str:
    """``digits`` significant digits, without an exponent for values up to 10⁶."""
    return f"{v:.0f}" if 10**digits <= abs(v) < 1e6 else f"{v:.{digits}g}"


def _pm(value, std, digits=3) -> str:
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if np.isfinite(std) else "")


def _evaluator_markdown(m: dict) -> list[str]:
    ev, h = m["evaluator"], m["headline"]
    fl = ev["floor"]
    floor_head = (f"floor ({fl['n_gen']} vs {fl['n_ref']})" if "n_gen" in fl else "floor")
    lines = ["## The CaloChallenge evaluator's figures", ""]
    if ev["dataset"] is not None:
        lines.append(f"Binning and threshold of dataset {ev['dataset']}: voxels below {ev['min_energy_mev']:.4g} MeV "
                     "set to 0 in both samples before everything (`validate.official`).")
    else:
        lines.append(f"Readout `{m['readout']}` has no CaloChallenge binning: no threshold, no evaluator histograms.")
    if "note" in fl:
        lines.append(f"No floor: {fl['note'].removeprefix('no reference floor: ')}.")
    elif fl["source"] == "reference split":
        lines.append(f"Floor: the reference split in two, {fl['n_gen']} showers against the other {fl['n_ref']}.")
    else:
        lines.append(f"Floor: {fl['n_gen']} other reference showers against the same {fl['n_ref']}.")
    lines += ["", f"| figure | value | {floor_head} | name |", "|---|---|---|---|"]
    if m.get("classifier"):
        n = m["classifier_config"]["seeds"]
        for kind, what in (("low", "low-level (voxels / E_inc)"), ("high", "high-level features")):
            c = m["classifier"][kind]
            lines.append(f"| classifier AUC, {what}, mean ± std of {n} seeds | {_pm(c['auc'], c['auc_std'])} | – | "
                         f"`auc_{kind}` |")
            lines.append(f"| classifier JSD, {what} | {_pm(c['jsd'], c['jsd_std'])} | – | `jsd_{kind}` |")
    for name in ("fpd", "kpd"):
        if name in m:
            d = m[name]
            f = d["floor"]
            lines.append(f"| {name.upper()} ×10³ ({d['n_gen']} vs {d['n_ref']} showers, {d['n_features']} features) | "
                         f"{_num(1e3 * d['value'])} ± {_num(1e3 * d['error'], 2)} | "
                         + (f"{_num(1e3 * f['value'])} ± {_num(1e3 * f['error'], 2)}" if f else "–") + f" | `{name}` |")
    summary = ev.get("summary", {})
    for feature, _, what in official.HIST_FEATURES:
        s = summary.get(feature)
        if s is None:
            continue
        fmean = s.get("floor_mean")
        if feature in ("etot_einc", "voxel_energy"):
            lines.append(f"| separation power, {what} | {s['mean']:.4f} | {_fmt(fmean, 2)} | `sep_{feature}` |")
        else:
            undefined = f", {s['n_undefined']} undefined" if s["n_undefined"] else ""
            lines.append(f"| separation power, {what}: mean of {s['n']} layers{undefined} / largest (layer) | "
                         f"{s['mean']:.4f} / {s['max']:.4f} ({s['where']}) | "
                         + (f"{fmean:.4f} / {s['floor_max']:.4f}" if fmean is not None else "–")
                         + f" | `sep_{feature}_mean`, `_max` |")
    if "sep_layers_over_floor_max" in h:
        worst = max(((f, s) for f, s in summary.items() if f in LAYER_FEATURES and "over_floor" in s),
                    key=lambda fs: fs[1]["over_floor"])
        lines += ["", "The layers' energies, centres and widths against their floor (each feature's mean over layers "
                      "against the floor's mean, its largest against the floor's largest): at most "
                      f"{h['sep_layers_over_floor_max']:.2f} times the floor ({worst[0]}; `sep_layers_over_floor_max`)."]
    return lines + [""]


def _markdown(m: dict, title: str) -> str:
    h = m["headline"]
    lines = [f"# {title}", "",
             f"{m['labels'][1]} ({m['n_gen']} showers, `{m['generated']}`) against {m['labels'][0]} "
             f"({m['n_ref']} showers, `{m['reference']}`), readout `{m['readout']}` ({m['n_voxels']} voxels). "
             "0.5 (AUC) and 0 (JSD, FPD, KPD, separation power) mean indistinguishable.", ""]
    lines += _evaluator_markdown(m)
    lines += ["## Per incident energy", "",
              f"Separation power of E_tot/E_inc (all energies, reference's binning): {h['sep_power_etot']:.3f} "
              f"(χ²/ndf {h['chi2_ndf_etot']:.2f}); the worst at one energy {h['max_sep_power_etot_per_energy']:.3f}; "
              f"the largest Δ of the mean longitudinal / radial profile (90 % bins) "
              f"{100 * h['max_long_rel']:.1f}% / {100 * h['max_rad_rel']:.1f}%.", "",
              "| E [GeV] | n gen | n ref | χ²/ndf E_tot | sep. power E_tot/E_inc | max Δ long (90%) | max Δ radial (90%) |",
              "|---|---|---|---|---|---|---|"]
    for r in m["per_energy"]:
        lines.append(f"| {r['energy_gev']:.4g} | {r['n_gen']} | {r['n_ref']} | {r['chi2_ndf']:.2f} | "
                     f"{r['sep_power']:.3f} | {100 * r['long_max_rel']:.1f}% | {100 * r['rad_max_rel']:.1f}% |")
    # the profiles figure is linked only where it was drawn (a fleet table's reports draw none)
    lines += (["", "![profiles](profiles.png)"] if "profiles.png" in m.get("figures", []) else []) + [
              "", "## High-level features on the reference's binning", "",
              "Separation power ½ Σ (p−q)²/(p+q) and χ²/ndf of the normalised histograms, binned on the reference's "
              "central 99 % (`validate.features`), no threshold.",
              "", "| feature | histograms | mean sep. power | worst | where | median χ²/ndf |", "|---|---|---|---|---|---|"]
    for r in m["feature_summary"]:
        lines.append(f"| {r['feature']} | {r['n']} | {r['mean_sep_power']:.3f} | {r['worst_sep_power']:.3f} | "
                     f"{r['worst']} | {_fmt(r['median_chi2_ndf'])} |")
    lines.append("")
    for png in m.get("figures", []):
        if png != "profiles.png":
            lines += [f"![{png}]({png})", ""]
    if m.get("classifier"):
        cc, c = m["classifier_config"], m["classifier"]["low"]
        lines += ["## Classifier", "",
                  f"The CaloChallenge evaluator's recipe (`validate.classifier`), size `{cc['size']}`: "
                  f"{cc['layers']} hidden layers of {cc['hidden']} (LeakyReLU), {cc['dtype']}, Adam {cc['learning_rate']:g}, "
                  f"batches of {cc['batch_size']}, {cc['epochs']} epochs (the epoch of the best test accuracy kept), "
                  f"train/test/validation {'/'.join(f'{s:g}' for s in cc['split'])} of each class, isotonic calibration "
                  f"on the test split, AUC and JSD on the validation split ({c['n_val']} showers); "
                  f"{cc['seeds']} seeds, {c['seconds_per_seed']:.0f} s per seed on voxels, "
                  f"{m['classifier']['high']['seconds_per_seed']:.0f} s on high-level features.", "",
                  "| input | seed | AUC | JSD | AUC uncalibrated | kept epoch |", "|---|---|---|---|---|---|"]
        for kind in ("low", "high"):
            for i, r in enumerate(m["classifier"][kind]["runs"]):
                lines.append(f"| {kind} | {cc['seed'] + i} | {r['auc']:.3f} | {r['jsd']:.3f} | "
                             f"{r['auc_uncalibrated']:.3f} | {r['epoch']} |")
        lines.append("")
    lines += [f"Computed in {m['seconds']:.0f} s by calozoo {m['calozoo_version']}.", ""]
    return "\n".join(lines)


def _comparisons(hists) -> list[FeatureComparison]:
    """The evaluator's histograms as ``validate.features.FeatureComparison`` (for the plots)."""
    out = []
    for h in hists:
        if h.gen.sum() > 0 and h.ref.sum() > 0:
            out.append(FeatureComparison(h.feature, h.layer, "", h.edges, h.gen, h.ref, h.sep_power,
                                         chi2_histograms(h.gen, h.ref).reduced))
    return out


def validate_samples(gen_e, gen_x, ref_e, ref_x, readout: Readout, out_dir, cfg: ValidateConfig | None = None, *,
                     title: str = "Validation", names: tuple[str, str] = ("generated", "reference"),
                     floor=None, progress=None) -> dict:
    """Compare generated showers ``gen_x`` (N, n_voxels) MeV at ``gen_e`` (N,) MeV with reference
    showers; write the report into ``out_dir`` and return its metrics (see the module docstring).
    ``floor``: (E, showers) of reference-like showers the generated sample's size, for the floor.
    ``progress(text)`` is called before each step."""
    cfg = cfg or ValidateConfig()
    say = progress or (lambda text: None)
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen_e, ref_e = np.asarray(gen_e, np.float64).ravel(), np.asarray(ref_e, np.float64).ravel()
    if len(gen_e) < 10 or len(ref_e) < 10:
        raise ValueError(f"need at least 10 showers on each side, got {len(gen_e)} generated and {len(ref_e)} reference")
    metrics = {"generated": str(names[0]), "reference": str(names[1]), "labels": list(cfg.labels),
               "n_gen": len(gen_e), "n_ref": len(ref_e), "readout": readout.name, "n_voxels": readout.n_voxels}
    evaluator, hists = _evaluator_figures(gen_e, gen_x, ref_e, ref_x, readout, cfg, floor, say)
    metrics.update(evaluator)
    say("high-level features on the reference's binning")
    gf, rf = high_level_features(gen_x, gen_e, readout), high_level_features(ref_x, ref_e, readout)
    groups = energy_groups(np.concatenate([ref_e, gen_e]))
    n_ref = len(ref_e)
    egroups = [(label, mask[n_ref:], mask[:n_ref]) for label, mask in groups]
    comps = compare_features(gf, rf, energy_groups=egroups, n_bins=cfg.n_bins, per_layer=cfg.per_layer)
    features = [{"feature": c.feature, "layer": c.layer, "energy": c.energy, "label": c.label,
                 "sep_power": c.sep_power, "chi2_ndf": c.chi2_ndf} for c in comps]
    metrics.update(features=features, feature_summary=_feature_summary(features),
                   per_energy=compare_per_energy(gen_x, gen_e, ref_x, ref_e, readout))
    if cfg.plots:
        say("plots")
        per_e = "\n".join(["E [GeV]   sep.power  chi2/ndf  dlong   drad"] +
                          [f"{r['energy_gev']:<9.4g} {r['sep_power']:9.3f} {r['chi2_ndf']:9.2f} "
                           f"{100 * r['long_max_rel']:5.1f}% {100 * r['rad_max_rel']:5.1f}%"
                           for r in metrics["per_energy"][:12]])
        plot_comparison(gen_x, gen_e, ref_x, ref_e, readout, out / "profiles.png", title=title, labels=cfg.labels,
                        max_energies=5, notes=per_e)
        figures = ["profiles.png"]
        shown = _layers_to_draw(rf["e_layer"], cfg.max_layers_drawn)
        by_name: dict[str, list] = {}
        # the evaluator's histograms where the readout has its binning, else the reference-binned ones
        for c in (_comparisons(hists) if hists else comps):
            per_layer = c.layer is not None and c.layer >= 0
            if per_layer and (not cfg.per_layer or c.layer not in shown):
                continue
            key = "etot_einc" if c.feature == "etot_einc" else (c.feature if per_layer else "overall")
            by_name.setdefault(key, []).append(c)
        for key, cs in by_name.items():
            png = f"features_{key}.png"
            plot_features(cs, out / png, title=f"{title}: {key}", labels=cfg.labels)
            figures.append(png)
        metrics["figures"] = figures
    metrics["headline"] = headline(metrics)
    metrics["seconds"] = time.perf_counter() - t0
    metrics["calozoo_version"] = __version__
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    (out / "report.md").write_text(_markdown(metrics, title))
    return metrics


def validate_files(generated, reference, out_dir, cfg: ValidateConfig | None = None, *, readout=None,
                   progress=None) -> dict:
    """:func:`validate_samples` on two CaloChallenge-format HDF5 files of the same readout."""
    cfg = cfg or ValidateConfig()
    if cfg.labels == ValidateConfig.labels:  # not given: what made each file, from its attributes
        cfg = dataclasses.replace(cfg, labels=(source_label(reference), source_label(generated)))
    gen_e, gen_x, gen_ro = read_sample(generated, readout, cfg.max_showers, data_checks=False)
    # read with the generated file's readout: a reference of another width is refused, naming it
    ref_e, ref_x, ref_ro = read_sample(reference, readout or gen_ro, cfg.max_showers)
    title = f"{Path(generated).name} vs {Path(reference).name}"
    return validate_samples(gen_e, gen_x, ref_e, ref_x, ref_ro, out_dir, cfg, title=title,
                            names=(str(generated), str(reference)), progress=progress)
