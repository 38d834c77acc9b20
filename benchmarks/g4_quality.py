"""Train the model families on real Geant4 showers and report their quality with the CaloChallenge
evaluator's figures (``validate.report``), next to the Geant4-against-Geant4 floor at the same
sizes; leave training energies out to measure interpolation at every gap.

    .venv/bin/python benchmarks/g4_quality.py --data ../shared/g4showers/pbwo4_electrons_main.h5 \
        --models par04_vae_pbwo4:30000:1000 fastcalogan_pbwo4:3000 fast_ar:3000 --out out/quality

Splits (per energy point, seeded): a *report* set (``--report-per-energy``, 100) that no model sees,
a *selection* set (``--select-per-energy``, 50) for choosing the best checkpoint, the rest for
training (each at most half of what is left). The held-out report of each model
(``OUT/NAME/validation/``) compares its showers at the report set's energies with the report set,
with the floor of a Geant4 sample of the training pool of the same size and energies against the
same report set: the evaluator's classifiers (AUC, JSD: mean ± std of ``--seeds`` seeds), its
histograms' separation powers, FPD/KPD, the per-energy profile table. ``--floor-report`` also runs
the classifiers on that Geant4 sample against the report set (the classifiers' own floor, ~0.5).

Interpolation (the energies a run leaves out are kept out of training and checkpoint selection):

- ``--leave-out 32``: one run without 32 GeV;
- ``--leave-out-each``: one run per inner training energy (all but the lowest and the highest),
  each without that energy alone: a gap of one energy point each;
- ``--leave-out-groups N``: N runs, the inner energies dealt round-robin into N groups (2: 2, 8, 32,
  128 GeV and 4, 16, 64 GeV), each run without one group: every inner energy is left out once in N
  runs, but the gaps are wider (a left-out energy's neighbours are left out too: for the file's
  factor-2 spacing, interpolation across a factor 4).

At each left-out energy on its own, all the file's showers at that energy (none was trained on) are
split in two halves: the reference and the floor sample; the model generates as many and gets a
report of its own (``OUT/RUN/NAME/energy_<E>GeV/``), with a verdict against the thresholds
``PER_ENERGY``; the held-out split as a whole gets one against ``HELD_OUT``. Runs go to
``OUT/leave-out-<E1>-<E2>.../NAME``.

Cost (one torch thread of a shared 2-core CPU): a model's training as its own iterations say, times
the number of runs (``--leave-out-each`` 7 runs for a file of 9 energies, ``--leave-out-groups 2``
2); the evaluator's classifiers at the official size take about 8 min per seed for 900 against 900
showers of 6480 voxels (both inputs), so about 25 min per held-out report and some 8 min per
left-out energy of 250 against 250 with 3 seeds; ``--classifier small`` takes a few seconds.

``--reuse`` takes the best checkpoint already in the run's folder instead of training again; ``--set
KEY=VALUE`` overrides the config of every model trained in the run (e.g. ``--set kl_weight=0.01``),
and with ``--reuse`` that of the loaded checkpoint: fields read at generation only (``--set
n_steps=4``); ``--iteration N`` with ``--reuse`` takes that checkpoint instead of the best.
"""

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from calozoo.cli import _overrides
from trainers.data import load_showers, split_validation
from trainers.loop import TrainConfig, set_threads, train
from validate.classifier import SIZES
from validate.fleet import failures
from validate.report import ValidateConfig, validate_samples
from zoo import create_model, model_from_checkpoint
from zoo.checkpoint import CheckpointManager, load_checkpoint

#: the thresholds at each left-out energy, and for the held-out split as a whole (the headline's names)
PER_ENERGY = ("auc_low<=0.65", "auc_high<=0.65", "sep_etot_einc_over_floor<=2")
HELD_OUT = ("auc_low<=0.60", "auc_high<=0.60", "sep_voxel_energy_over_floor<=10", "sep_layers_over_floor_max<=2")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--readout", default="g4-pbwo4")
    ap.add_argument("--models", nargs="+", default=["par04_vae_pbwo4:6000"],
                    help="NAME:ITERATIONS[:CHECKPOINT_EVERY]")
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--out", default="out/quality")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs this process may use)")
    ap.add_argument("--classifier", choices=list(SIZES), default="official")
    ap.add_argument("--seeds", type=int, default=3, help="classifier runs per figure (mean and std)")
    ap.add_argument("--report-per-energy", type=int, default=100)
    ap.add_argument("--select-per-energy", type=int, default=50)
    ap.add_argument("--floor-report", action="store_true",
                    help="Also the classifiers on Geant4 against Geant4 (the held-out split's floor sample).")
    ap.add_argument("--reuse", action="store_true", help="Use the best checkpoint already in OUT/NAME if any.")
    ap.add_argument("--iteration", type=int, default=None,
                    help="With --reuse: that iteration's checkpoint rather than the best (e.g. the last).")
    leave = ap.add_mutually_exclusive_group()
    leave.add_argument("--leave-out", default="", metavar="GEV[,GEV]",
                       help="Energies kept out of training and checkpoint selection, only in the report (interpolation).")
    leave.add_argument("--leave-out-each", action="store_true", help="One run per inner training energy, without it.")
    leave.add_argument("--leave-out-groups", type=int, default=None, metavar="N",
                       help="N runs, each without one of N round-robin groups of the inner energies.")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="Config overrides (JSON values) for every model of this run, e.g. kl_weight=0.01.")
    args = ap.parse_args()
    set_threads(args.threads)
    out = Path(args.out)
    data = load_showers(args.data, readout=args.readout)
    rest, report = split_validation(data, fraction=0.0, min_per_energy=args.report_per_energy, seed=1)
    pool, select = split_validation(rest, fraction=0.0, min_per_energy=args.select_per_energy, seed=2)
    energies = np.unique(data.energy)
    runs = leave_out_runs(args, energies)
    print(f"{len(pool)} training, {len(select)} selection, {len(report)} report showers ({data.readout.name}); "
          f"{len(runs)} run(s)" + "".join(f"\n  run {i + 1}: without {_gev(r)} GeV" for i, r in enumerate(runs) if r))
    vcfg = ValidateConfig(classifier=args.classifier, seeds=args.seeds, labels=("Geant4", "model"))
    # the held-out split's floor: a Geant4 sample of the training pool of the report set's sizes
    rng = np.random.default_rng(3)
    idx = np.concatenate([rng.choice(np.flatnonzero(pool.energy == e), (report.energy == e).sum(), replace=False)
                          for e in np.unique(report.energy)])
    floor = (pool.energy[idx], pool.showers[idx])
    summary = {}
    if args.floor_report:
        summary["Geant4 (floor)"] = validate_samples(*floor, report.energy, report.showers, data.readout,
                                                     out / "floor" / "validation", vcfg, title="Geant4 vs Geant4 (floor)")
    verdicts = []
    for left_out in runs:
        run_dir = out / ("leave-out-" + "-".join(f"{e / 1000:g}" for e in left_out)) if len(runs) > 1 else out
        tr, sel = (d.subset(np.flatnonzero(~np.isin(d.energy, left_out))) for d in (pool, select))
        for spec in args.models:
            name, model = _trained(spec, args, tr, sel, run_dir)
            label = f"{name}" + (f" without {_gev(left_out)} GeV" if left_out else "")
            gen = model.sample(report.energy, generator=torch.Generator(device=model.device).manual_seed(7)).cpu().numpy()
            m = validate_samples(report.energy, gen, report.energy, report.showers, data.readout,
                                 run_dir / name / "validation", replace(vcfg, labels=("Geant4", name)), floor=floor,
                                 title=f"{label} vs Geant4 (held out)")
            summary[label] = m
            print_table(f"{label}: held-out split", m)
            verdicts.append((label, "held-out split", len(report), m["headline"], failures(m["headline"], HELD_OUT)))
            for e in left_out:
                verdicts.append(_at_energy(e, data, model, label, run_dir / name / f"energy_{e / 1000:g}GeV", vcfg))
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({k: m["headline"] for k, m in summary.items()}, indent=1))
    print("\n### Held-out Geant4 split (official-style figures; 0.5 / 0 mean indistinguishable; floor in brackets)")
    print("| sample | AUC low-level | AUC high-level | FPD ×10³ | KPD ×10³ | sep. E_tot/E_inc | voxel spectrum | "
          "layers / floor | Δ long / radial (90 %) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, m in summary.items():
        h = m["headline"]
        print(f"| {label} | {_pm(h, 'auc_low')} | {_pm(h, 'auc_high')} | {_fl(h, 'fpd', 1e3)} | {_fl(h, 'kpd', 1e3)} | "
              f"{_fl(h, 'sep_etot_einc')} | {_fl(h, 'sep_voxel_energy')} | {h.get('sep_layers_over_floor_max', np.nan):.2f} | "
              f"{h['max_long_rel']:.1%} / {h['max_rad_rel']:.1%} |")
    if verdicts:
        print("\n### Verdicts (held-out split: " + ", ".join(HELD_OUT) + "; each left-out energy: "
              + ", ".join(PER_ENERGY) + ")")
        print("| model | where | showers | AUC low | AUC high | sep. E_tot/E_inc / floor | voxel spectrum / floor | "
              "E layer / centre / width over floor | verdict |")
        print("|---|---|---|---|---|---|---|---|---|")
        for label, where, n, h, fails in verdicts:
            layers = " / ".join(f"{max(h.get(f'sep_{a}_over_floor', np.nan), h.get(f'sep_{b}_over_floor', np.nan)):.2f}"
                                for a, b in (("e_layer", "e_layer"), ("centre_x", "centre_y"), ("width_x", "width_y")))
            print(f"| {label} | {where} | {n} | {_pm(h, 'auc_low')} | {_pm(h, 'auc_high')} | "
                  f"{h.get('sep_etot_einc_over_floor', np.nan):.2f} | {h.get('sep_voxel_energy_over_floor', np.nan):.2f} | "
                  f"{layers} | {'pass' if not fails else 'FAIL: ' + '; '.join(fails)} |")


def leave_out_runs(args, energies: np.ndarray) -> list[list[float]]:
    """The energies (MeV) each run leaves out: [[]] for none, one list per run otherwise."""
    inner = [float(e) for e in np.sort(energies)[1:-1]]
    if args.leave_out_each:
        return [[e] for e in inner]
    if args.leave_out_groups:
        n = args.leave_out_groups
        if not 1 <= n <= len(inner):
            raise SystemExit(f"--leave-out-groups {n}: between 1 and the {len(inner)} inner energies")
        return [inner[i::n] for i in range(n)]
    left = [float(x) * 1000.0 for x in args.leave_out.split(",") if x.strip()]
    missing = [e / 1000.0 for e in left if e not in energies]
    if missing:
        raise SystemExit(f"--leave-out {missing} GeV: not an energy of {args.data}")
    return [left]


def _trained(spec: str, args, tr, select, run_dir: Path):
    """(name, the model at its best (or ``--iteration``) checkpoint), trained into ``run_dir/NAME``
    unless ``--reuse`` finds a checkpoint there."""
    name, iters, *every = spec.split(":")
    overrides = _overrides(args.overrides)  # the CLI's --set parser: JSON values, lists as tuples
    torch.manual_seed(0)
    t0 = time.perf_counter()
    best = _checkpoint(run_dir / name / "checkpoints", args.iteration) if args.reuse else None
    reused = best is not None
    if best is None:
        res = train(create_model(name, **overrides), tr, select,
                    TrainConfig(iterations=int(iters), checkpoint_every=int(every[0]) if every else args.checkpoint_every,
                                device=args.device, progress=False), run_dir / name)
        best = res.best
    model = model_from_checkpoint(load_checkpoint(run_dir / name / "checkpoints" / best["file"]))
    if reused:  # what the model keeps of its data, from the same split: the statistics a newer version adds
        model.fit_data(tr.energy, tr.showers)
        for key, value in overrides.items():  # generation-side fields (n_steps, solver, recentre, ...)
            setattr(model.config, key, value)
    model.to("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model.eval()
    cost = "checkpoint reused" if reused else f"trained in {time.perf_counter() - t0:.0f} s"
    print(f"\n{name} in {run_dir}: best iteration {best['iteration']} of {iters} ({cost}, "
          f"{sum(p.numel() for p in model.parameters())} parameters)")
    return name, model


def _at_energy(e: float, data, model, label: str, out_dir: Path, vcfg: ValidateConfig):
    """A left-out energy on its own: the file's showers there split in halves (reference, floor
    sample), the model's showers as many; its report and its verdict row."""
    idx = np.random.default_rng(4).permutation(np.flatnonzero(data.energy == e))
    ref, flo = idx[: len(idx) // 2], idx[len(idx) // 2: 2 * (len(idx) // 2)]
    energy = np.full(len(flo), e)
    gen = model.sample(energy, generator=torch.Generator(device=model.device).manual_seed(11)).cpu().numpy()
    m = validate_samples(energy, gen, data.energy[ref], data.showers[ref], data.readout, out_dir,
                         replace(vcfg, plots=False, per_layer=False, labels=("Geant4", label.split()[0])),
                         floor=(data.energy[flo], data.showers[flo]), title=f"{label} at {e / 1000:g} GeV (left out)")
    h = m["headline"]
    fails = failures(h, PER_ENERGY)
    print(f"  {e / 1000:g} GeV (left out, {len(flo)} vs {len(ref)}): AUC low {_pm(h, 'auc_low')}, high "
          f"{_pm(h, 'auc_high')}; E_tot/E_inc {_fl(h, 'sep_etot_einc')}; voxel spectrum {_fl(h, 'sep_voxel_energy')}; "
          f"layers {h.get('sep_layers_over_floor_max', np.nan):.2f}x floor -> {'pass' if not fails else 'FAIL: ' + '; '.join(fails)}")
    return label, f"{e / 1000:g} GeV left out", len(flo), h, fails


def _checkpoint(directory: Path, iteration: int | None) -> dict | None:
    """The best checkpoint in ``directory`` (None if none), or the one of ``iteration``."""
    manager = CheckpointManager(directory)
    if iteration is None:
        return manager.best()
    kept = {c["iteration"]: c for c in manager.entries}
    if iteration not in kept:
        raise SystemExit(f"--iteration {iteration}: {directory} keeps the checkpoints of {sorted(kept)}")
    return kept[iteration]


def _gev(energies) -> str:
    return ", ".join(f"{e / 1000:g}" for e in energies)


def _pm(h: dict, key: str) -> str:
    if key not in h:
        return "–"
    std = h.get(f"{key}_std", np.nan)
    return f"{h[key]:.3f}" + (f" ± {std:.3f}" if np.isfinite(std) else "")


def _fl(h: dict, key: str, scale: float = 1.0) -> str:
    """The figure and its floor in brackets."""
    if key not in h:
        return "–"
    floor = h.get(f"{key}_floor")
    return f"{scale * h[key]:.4g}" + (f" ({scale * floor:.4g})" if floor is not None else "")


def print_table(title: str, m: dict):
    h = m["headline"]
    print(f"\n### {title}\nAUC low-level {_pm(h, 'auc_low')}, high-level {_pm(h, 'auc_high')}; FPD×10³ {_fl(h, 'fpd', 1e3)}; "
          f"sep. power E_tot/E_inc {_fl(h, 'sep_etot_einc')}, voxel spectrum {_fl(h, 'sep_voxel_energy')}; layers' "
          f"energy/centre/width at most {h.get('sep_layers_over_floor_max', np.nan):.2f}x the floor")
    print("| E [GeV] | χ²/ndf E_tot | sep. power E_tot/E_inc | max Δ long (90%) | max Δ radial (90%) |")
    print("|---|---|---|---|---|")
    for r in m["per_energy"]:
        print(f"| {r['energy_gev']:g} | {r['chi2_ndf']:.2f} | {r['sep_power']:.3f} | {r['long_max_rel']:.1%} | "
              f"{r['rad_max_rel']:.1%} |")


if __name__ == "__main__":
    main()
