"""Train the model families on real Geant4 showers and report their quality per energy, next to
the Geant4-against-Geant4 floor measured the same way. ``--leave-out 32`` keeps an energy out of
training and checkpoint selection (it is only in the report): the same figures for interpolation.

    .venv/bin/python benchmarks/g4_quality.py --data ../shared/g4showers/pbwo4_electrons_main.h5 \
        --models par04_vae_pbwo4:30000:1000 fastcalogan_pbwo4:3000 fast_ar:3000 --out out/quality

Splits (per energy point, seeded): a *report* set of 100 showers that no model sees, a *selection*
set of 50 for choosing the best checkpoint (FastCaloGAN's χ² sum), the rest for training. The
floor: a Geant4 subset of the training set of the report set's size, compared with the report set
exactly as a model's showers are. The classifier (low-level: log10 E_inc and voxels / E_inc) is
trained on all energies pooled.

Each model (and the floor) also gets the full validation report (``validate.report``: high-level
features, classifier AUC/JSD on low- and high-level input, FPD/KPD, profile plots) in
``OUT/NAME/validation/``, and the summary table of all of them is printed at the end. ``--reuse``
takes the best checkpoint already in ``OUT/NAME`` instead of training again; ``--set KEY=VALUE``
overrides the config of every model trained in the run (e.g. ``--set kl_weight=0.01``), and with
``--reuse`` that of the loaded checkpoint: fields read at generation only (``--set n_steps=4``);
``--iteration N`` with ``--reuse`` takes that checkpoint instead of the best.
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from calozoo.cli import _overrides
from zoo.checkpoint import CheckpointManager, load_checkpoint
from trainers.data import load_showers, split_validation
from trainers.loop import TrainConfig, train
from validate.classifier import ClassifierConfig, classifier_auc, low_level_features
from validate.compare import compare_per_energy
from validate.report import ValidateConfig, validate_samples
from zoo import create_model, model_from_checkpoint


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--readout", default="g4-pbwo4")
    ap.add_argument("--models", nargs="+", default=["par04_vae_pbwo4:6000"],
                    help="NAME:ITERATIONS[:CHECKPOINT_EVERY]")
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--out", default="out/quality")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--classifier-epochs", type=int, default=30)
    ap.add_argument("--reuse", action="store_true", help="Use the best checkpoint already in OUT/NAME if any.")
    ap.add_argument("--iteration", type=int, default=None,
                    help="With --reuse: that iteration's checkpoint rather than the best (e.g. the last).")
    ap.add_argument("--leave-out", default="", metavar="GEV[,GEV]",
                    help="Energies kept out of training and checkpoint selection, only in the report (interpolation).")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="Config overrides (JSON values) for every model of this run, e.g. kl_weight=0.01.")
    args = ap.parse_args()
    out = Path(args.out)
    overrides = _overrides(args.overrides)  # the CLI's --set parser: JSON values, lists as tuples
    data = load_showers(args.data, readout=args.readout)
    rest, report = split_validation(data, fraction=0.0, min_per_energy=100, seed=1)
    tr, select = split_validation(rest, fraction=0.0, min_per_energy=50, seed=2)
    pool = tr  # the floor's Geant4 sample (left-out energies included)
    left_out = [float(x) * 1000.0 for x in args.leave_out.split(",") if x.strip()]
    if left_out:
        tr, select = (d.subset(np.flatnonzero(~np.isin(d.energy, left_out))) for d in (tr, select))
        missing = [e / 1000.0 for e in left_out if e not in report.energy]
        if missing:
            raise SystemExit(f"--leave-out {missing} GeV: not an energy of {args.data}")
        print(f"left out of training and selection: {[e / 1000.0 for e in left_out]} GeV (report only)")
    print(f"{len(tr)} training, {len(select)} selection, {len(report)} report showers ({data.readout.name})")
    ro = data.readout
    ccfg = ClassifierConfig(epochs=args.classifier_epochs)
    x_report = low_level_features(report.showers, report.energy)

    # the floor: Geant4 against Geant4, with the report set's sizes
    rng = np.random.default_rng(3)
    idx = np.concatenate([rng.choice(np.flatnonzero(pool.energy == e), (report.energy == e).sum(), replace=False)
                          for e in np.unique(report.energy)])
    floor_rows = compare_per_energy(pool.showers[idx], pool.energy[idx], report.showers, report.energy, ro)
    floor_auc = classifier_auc(low_level_features(pool.showers[idx], pool.energy[idx]), x_report, ccfg)["auc"]
    results = {"floor": {"rows": floor_rows, "auc": floor_auc}}
    print_table("Geant4 vs Geant4 (floor)", floor_rows, floor_auc)
    vcfg = ValidateConfig(classifier="cpu", classifier_epochs=args.classifier_epochs, labels=("Geant4", "model"))
    reports = {"Geant4 (floor)": validate_samples(pool.energy[idx], pool.showers[idx], report.energy, report.showers, ro,
                                                  out / "floor" / "validation", vcfg, title="Geant4 vs Geant4 (floor)")}

    for spec in args.models:
        name, iters, *every = spec.split(":")
        torch.manual_seed(0)
        model = create_model(name, **overrides)
        t0 = time.perf_counter()
        every = int(every[0]) if every else args.checkpoint_every
        best = _checkpoint(out / name / "checkpoints", args.iteration) if args.reuse else None
        reused = best is not None
        if best is None:
            res = train(model, tr, select, TrainConfig(iterations=int(iters), checkpoint_every=every,
                                                       device=args.device, progress=False), out / name)
            best = res.best
        model = model_from_checkpoint(load_checkpoint(out / name / "checkpoints" / best["file"]))
        if reused:  # what the model keeps of its data, from the same split: the statistics a newer version adds
            model.fit_data(tr.energy, tr.showers)
            for key, value in overrides.items():  # generation-side fields (n_steps, solver, recentre, ...)
                setattr(model.config, key, value)
        model.to("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        gen = model.sample(report.energy, generator=torch.Generator(device=model.device).manual_seed(7)).cpu().numpy()
        rows = compare_per_energy(gen, report.energy, report.showers, report.energy, ro)
        a = classifier_auc(low_level_features(gen, report.energy), x_report, ccfg)["auc"]
        results[name] = {"rows": rows, "auc": a, "best_iteration": best["iteration"], "iterations": int(iters),
                         "seconds": time.perf_counter() - t0,
                         "device": str(model.device), "parameters": sum(p.numel() for p in model.parameters())}
        cost = "checkpoint reused" if reused else f"{results[name]['seconds']:.0f} s on {model.device}"
        results[name]["reused"] = reused
        print_table(f"{name}: best iteration {best['iteration']} of {iters}, {cost}", rows, a, floor_rows)
        reports[f"{name} (iteration {best['iteration']})"] = validate_samples(
            report.energy, gen, report.energy, report.showers, ro, out / name / "validation",
            replace(vcfg, labels=("Geant4", name)), title=f"{name} vs Geant4 (held out)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    print("\n### Validation reports (held-out Geant4 split; 0.5 / 0 mean indistinguishable)")
    print("| sample | AUC low-level (JSD) | AUC high-level (JSD) | FPD | KPD | sep. power E_tot/E_inc | "
          "worst per energy | max Δ long / radial | mean sep. power of all features |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, m in reports.items():
        h = m["headline"]
        print(f"| {label} | {h['auc_low']:.3f} ({h['jsd_low']:.2f}) | {h['auc_high']:.3f} ({h['jsd_high']:.2f}) | "
              f"{h['fpd']:.3g} ± {h['fpd_error']:.1g} | {h['kpd']:.2g} ± {h['kpd_error']:.1g} | "
              f"{h['sep_power_etot']:.3f} | {h['max_sep_power_etot_per_energy']:.3f} | "
              f"{h['max_long_rel']:.1%} / {h['max_rad_rel']:.1%} | {h['mean_sep_power_features']:.3f} |")


def _checkpoint(directory: Path, iteration: int | None) -> dict | None:
    """The best checkpoint in ``directory`` (None if none), or the one of ``iteration``."""
    manager = CheckpointManager(directory)
    if iteration is None:
        return manager.best()
    kept = {c["iteration"]: c for c in manager.entries}
    if iteration not in kept:
        raise SystemExit(f"--iteration {iteration}: {directory} keeps the checkpoints of {sorted(kept)}")
    return kept[iteration]


def print_table(title, rows, auc, floor=None):
    print(f"\n### {title}\nclassifier AUC (all energies): {auc:.3f}")
    print("| E [GeV] | χ²/ndf E_tot | sep. power E_tot/E_inc | max Δ long (90%) | max Δ radial (90%) |")
    print("|---|---|---|---|---|")
    for i, r in enumerate(rows):
        f = floor[i] if floor else None
        def cell(k, fmt):
            return fmt.format(r[k]) + (f" ({fmt.format(f[k])})" if f else "")
        print(f"| {r['energy_gev']:g} | {cell('chi2_ndf', '{:.2f}')} | {cell('sep_power', '{:.3f}')} | "
              f"{cell('long_max_rel', '{:.1%}')} | {cell('rad_max_rel', '{:.1%}')} |")


if __name__ == "__main__":
    main()
