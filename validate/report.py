"""The validation report: generated showers against reference (Geant4) showers, in one folder.

:func:`validate_files` (``calozoo validate GENERATED.h5 REFERENCE.h5``) and :func:`validate_samples`
write to ``out_dir``:

- ``report.md``: the headline table (classifier AUC and JSD on low- and high-level input, FPD and
  KPD with their uncertainties, separation power of E_tot/E_inc), the per-energy table
  (χ²/ndf and separation power of E_tot/E_inc, largest difference of the mean longitudinal and radial
  profiles over the bins holding 90 % of the energy), a table per high-level feature (separation
  power and χ²/ndf, per layer summarised by the mean, the worst and where it is), and the figures;
- ``metrics.json``: every number of the report;
- ``profiles.png``: FullSim against MLSim, mean longitudinal and radial profiles and E_tot/E_inc per
  energy, with ratio panels (``validate.plots.plot_comparison``);
- ``features_*.png``: the histograms of every feature (``validate.plots.plot_features``).

``calozoo.tracked.log_report`` puts a report folder into MLflow (this package tracks nothing).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from showers import __version__
from showers.calibrate import core_bins
from showers.formats import read_strided, source_label
from showers.plots import energy_groups
from showers.readout import Readout
from validate.classifier import (
    SIZES,
    ClassifierConfig,
    classifier_auc,
    low_level_features,
)
from validate.compare import compare_per_energy
from validate.distances import fpd, kpd
from validate.features import compare_features, feature_matrix, high_level_features
from validate.plots import plot_comparison, plot_features

__all__ = ["ValidateConfig", "headline", "read_sample", "validate_files", "validate_samples"]


@dataclass
class ValidateConfig:
    """What the report computes.

    classifier: a size of ``validate.classifier.SIZES`` ("tiny", "cpu", "full") or "none".
    classifier_epochs: overrides the size's number of epochs.
    max_showers: at most this many showers of each file are read (evenly strided, so a file sorted by
        energy keeps all its energies).
    n_bins: bins of the feature histograms.
    per_layer: histogram every layer's features (else only the per-shower ones).
    distances: compute FPD and KPD (``fpd_batches`` batches per batch size).
    plots: draw the PNGs (per-layer features for at most ``max_layers_drawn`` layers).
    """

    classifier: str = "cpu"
    classifier_epochs: int | None = None
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

    def classifier_config(self) -> ClassifierConfig | None:
        if self.classifier == "none":
            return None
        if self.classifier not in SIZES:
            raise ValueError(f"unknown classifier size {self.classifier!r}; known: {', '.join(SIZES)}, none")
        kw = dict(SIZES[self.classifier])
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


def headline(metrics: dict) -> dict[str, float]:
    """The report's figures as a flat {name: value} (what goes to MLflow and the fleet table)."""
    etot = next(f for f in metrics["features"] if f["label"] == "etot_einc")  # all showers
    out = {"sep_power_etot": etot["sep_power"], "chi2_ndf_etot": etot["chi2_ndf"]}
    per_e = metrics["per_energy"]
    out["max_sep_power_etot_per_energy"] = max(r["sep_power"] for r in per_e)
    out["max_long_rel"] = max(r["long_max_rel"] for r in per_e)
    out["max_rad_rel"] = max(r["rad_max_rel"] for r in per_e)
    seps = [f["sep_power"] for f in metrics["features"]]
    out["mean_sep_power_features"] = float(np.mean(seps))
    for kind in ("low", "high"):
        c = metrics.get("classifier", {}).get(kind)
        if c:
            out[f"auc_{kind}"], out[f"jsd_{kind}"] = c["auc"], c["jsd"]
    for name in ("fpd", "kpd"):
        if name in metrics:
            out[name], out[f"{name}_error"] = metrics[name]["value"], metrics[name]["error"]
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


def _markdown(m: dict, title: str) -> str:
    h = m["headline"]
    lines = [f"# {title}", "",
             f"{m['labels'][1]} ({m['n_gen']} showers, `{m['generated']}`) against {m['labels'][0]} "
             f"({m['n_ref']} showers, `{m['reference']}`), readout `{m['readout']}` ({m['n_voxels']} voxels). "
             "0.5 (AUC) and 0 (JSD, FPD, KPD, separation power) mean indistinguishable.", "",
             "| metric | value |", "|---|---|"]
    for kind, what in (("low", "low-level (voxels / E_inc)"), ("high", "high-level features")):
        c = m.get("classifier", {}).get(kind)
        if c:
            lines.append(f"| classifier AUC, {what} | {c['auc']:.3f} (JSD {c['jsd']:.3f}) |")
    for name, what in (("fpd", "FPD (Fréchet physics distance)"), ("kpd", "KPD (kernel physics distance)")):
        if name in m:
            lines.append(f"| {what} | {m[name]['value']:.3g} ± {m[name]['error']:.2g} |")
    lines += [f"| separation power E_tot/E_inc (all energies) | {h['sep_power_etot']:.3f} |",
              f"| χ²/ndf E_tot/E_inc (all energies) | {h['chi2_ndf_etot']:.2f} |",
              f"| worst separation power of E_tot/E_inc at one energy | {h['max_sep_power_etot_per_energy']:.3f} |",
              f"| largest Δ mean longitudinal / radial profile (90 % bins) | "
              f"{100 * h['max_long_rel']:.1f}% / {100 * h['max_rad_rel']:.1f}% |", "",
              "## Per incident energy", "",
              "| E [GeV] | n gen | n ref | χ²/ndf E_tot | sep. power E_tot/E_inc | max Δ long (90%) | max Δ radial (90%) |",
              "|---|---|---|---|---|---|---|"]
    for r in m["per_energy"]:
        lines.append(f"| {r['energy_gev']:.4g} | {r['n_gen']} | {r['n_ref']} | {r['chi2_ndf']:.2f} | "
                     f"{r['sep_power']:.3f} | {100 * r['long_max_rel']:.1f}% | {100 * r['rad_max_rel']:.1f}% |")
    # the profiles figure is linked only where it was drawn (a fleet table's reports draw none)
    lines += (["", "![profiles](profiles.png)"] if "profiles.png" in m.get("figures", []) else []) + [
              "", "## High-level features", "",
              "Separation power ½ Σ (p−q)²/(p+q) of the normalised histograms and χ²/ndf, on the reference's binning.",
              "", "| feature | histograms | mean sep. power | worst | where | median χ²/ndf |", "|---|---|---|---|---|---|"]
    for r in m["feature_summary"]:
        lines.append(f"| {r['feature']} | {r['n']} | {r['mean_sep_power']:.3f} | {r['worst_sep_power']:.3f} | "
                     f"{r['worst']} | {_fmt(r['median_chi2_ndf'])} |")
    lines.append("")
    for png in m.get("figures", []):
        if png != "profiles.png":
            lines += [f"![{png}]({png})", ""]
    if m.get("classifier"):
        c = next(iter(m["classifier"].values()))
        lines += ["## Classifier", "",
                  f"MLP {list(m['classifier_config']['hidden'])}, {m['classifier_config']['epochs']} epochs at most "
                  f"(the epoch with the best test loss kept), train/test/validation "
                  f"{'/'.join(str(int(100 * s)) for s in m['classifier_config']['split'])} per class, "
                  f"isotonic calibration on the test split, AUC and JSD on the validation split "
                  f"({c['n_val']} showers).", ""]
    lines += [f"Computed in {m['seconds']:.0f} s by calozoo {m['calozoo_version']}.", ""]
    return "\n".join(lines)


def validate_samples(gen_e, gen_x, ref_e, ref_x, readout: Readout, out_dir, cfg: ValidateConfig | None = None, *,
                     title: str = "Validation", names: tuple[str, str] = ("generated", "reference"),
                     progress=None) -> dict:
    """Compare generated showers ``gen_x`` (N, n_voxels) MeV at ``gen_e`` (N,) MeV with reference
    showers; write the report into ``out_dir`` and return its metrics (see the module docstring).
    ``progress(text)`` is called before each step."""
    cfg = cfg or ValidateConfig()
    say = progress or (lambda text: None)
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen_e, ref_e = np.asarray(gen_e, np.float64).ravel(), np.asarray(ref_e, np.float64).ravel()
    if len(gen_e) < 10 or len(ref_e) < 10:
        raise ValueError(f"need at least 10 showers on each side, got {len(gen_e)} generated and {len(ref_e)} reference")
    say("high-level features")
    gf, rf = high_level_features(gen_x, gen_e, readout), high_level_features(ref_x, ref_e, readout)
    groups = energy_groups(np.concatenate([ref_e, gen_e]))
    n_ref = len(ref_e)
    egroups = [(label, mask[n_ref:], mask[:n_ref]) for label, mask in groups]
    comps = compare_features(gf, rf, energy_groups=egroups, n_bins=cfg.n_bins, per_layer=cfg.per_layer)
    features = [{"feature": c.feature, "layer": c.layer, "energy": c.energy, "label": c.label,
                 "sep_power": c.sep_power, "chi2_ndf": c.chi2_ndf} for c in comps]
    metrics = {"generated": str(names[0]), "reference": str(names[1]), "labels": list(cfg.labels),
               "n_gen": len(gen_e), "n_ref": n_ref, "readout": readout.name, "n_voxels": readout.n_voxels,
               "features": features, "feature_summary": _feature_summary(features),
               "per_energy": compare_per_energy(gen_x, gen_e, ref_x, ref_e, readout)}
    hl_gen, hl_ref = feature_matrix(gf, gen_e, readout), feature_matrix(rf, ref_e, readout)
    if cfg.distances:
        say("FPD and KPD")
        metrics["fpd"] = fpd(hl_ref, hl_gen, num_batches=cfg.fpd_batches, seed=cfg.seed)._asdict()
        metrics["kpd"] = kpd(hl_ref, hl_gen, seed=cfg.seed)._asdict()
    ccfg = cfg.classifier_config()
    if ccfg is not None:
        metrics["classifier_config"] = asdict(ccfg)
        metrics["classifier"] = {}
        say("classifier on voxels")
        metrics["classifier"]["low"] = classifier_auc(low_level_features(gen_x, gen_e), low_level_features(ref_x, ref_e),
                                                      ccfg)
        say("classifier on high-level features")
        metrics["classifier"]["high"] = classifier_auc(hl_gen, hl_ref, ccfg)
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
        for c in comps:
            per_layer = c.layer is not None and c.layer >= 0
            if per_layer and c.layer not in shown:
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
