"""Flow matching: quality and speed against the number of sampler steps, from one trained checkpoint.

The velocity fields are trained once; how many steps generation takes (``n_steps``) and with which
rule (``solver``: ``euler``, one velocity evaluation per step, or ``midpoint``, two) is chosen at
generation, so one checkpoint shows what fewer steps cost. For each (solver, steps) the held-out
report split of ``benchmarks/g4_quality.py`` (the same seeds) is generated and compared with Geant4:
low-level classifier AUC (the evaluator's recipe at ``--classifier`` size, the report's threshold
and input: ``validate.official``), E_tot/E_inc separation power per energy
(mean and worst),
and ONNX Runtime's showers/s at batch 100 on ``--threads`` threads (the exported graph unrolls the steps).

    .venv/bin/python benchmarks/fm_steps.py --data ../shared/g4showers/pbwo4_electrons_main.h5 \
        --checkpoint out/quality/flow_matching_pbwo4/checkpoints/ckpt-000009000.pt --steps midpoint:12,euler:12,euler:6
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from registry.pull import session_options
from trainers.data import load_showers, split_validation
from validate import official
from validate.classifier import SIZES, ClassifierConfig, classifier_auc
from validate.compare import compare_per_energy
from zoo import model_from_checkpoint
from zoo.checkpoint import load_checkpoint
from zoo.export import export_onnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--readout", default="g4-pbwo4")
    ap.add_argument("--checkpoint", required=True, help="a flow_matching checkpoint (.pt)")
    ap.add_argument("--steps", default="midpoint:12,euler:12,midpoint:6,euler:6", help="SOLVER:N_STEPS,...")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--classifier", choices=list(SIZES), default="small")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    data = load_showers(args.data, readout=args.readout)
    rest, report = split_validation(data, fraction=0.0, min_per_energy=100, seed=1)  # as g4_quality.py
    train_split, _ = split_validation(rest, fraction=0.0, min_per_energy=50, seed=2)
    threshold = official.min_energy(official.evaluator_dataset(data.readout))
    x_report = official.low_level_input(official.apply_threshold(report.showers, threshold), report.energy)
    ccfg = ClassifierConfig(**SIZES[args.classifier])
    state = load_checkpoint(args.checkpoint)
    print(f"{args.checkpoint}: iteration {state['iteration']}; {len(report)} held-out showers")
    print("| solver | steps | velocity evaluations | AUC low-level | E_tot/E_inc sep. power: mean over energies | worst "
          "| ORT showers/s at batch 100 |")
    print("|---|---|---|---|---|---|---|")
    for spec in args.steps.split(","):
        solver, n = spec.split(":")
        model = model_from_checkpoint(state)
        model.fit_data(train_split.energy, train_split.showers)  # the same statistics, and any a newer version adds
        model.config.solver, model.config.n_steps = solver, int(n)
        model.eval()
        gen = model.sample(report.energy, generator=torch.Generator().manual_seed(7)).numpy()
        rows = compare_per_energy(gen, report.energy, report.showers, report.energy, model.readout)
        auc = classifier_auc(official.low_level_input(official.apply_threshold(gen, threshold), report.energy),
                             x_report, ccfg)["auc"]
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, Path(tmp) / "m.onnx", {"model": model.variant})
            speed = _ort_speed(model, path, args.threads)
        evals = int(n) * (2 if solver == "midpoint" else 1)
        print(f"| {solver} | {n} | {evals} | {auc:.3f} | {np.mean([r['sep_power'] for r in rows]):.3f} | "
              f"{max(r['sep_power'] for r in rows):.3f} "
              f"| {speed:.0f} |", flush=True)


def _ort_speed(model, path, threads: int, batch: int = 100, seconds: float = 3.0) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((batch, model.noise_dim)).astype(np.float32)
    cond = model.encode_conditions(np.full(batch, 65000.0)).numpy().astype(np.float32)
    feeds = {"noise": noise, "conditions": cond}
    sess.run(None, feeds)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        sess.run(None, feeds)
        n += batch
    return n / (time.perf_counter() - t0)


if __name__ == "__main__":
    main()
