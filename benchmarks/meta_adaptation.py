"""Reptile's meta-initialisation against training from scratch, on a material left out of meta-training.

Tasks: electron showers of the built-in simulator in five media (PbWO4, W, Pb, SiW, SciPb) on the
6480-voxel g4-pbwo4 readout, at 2, 8, 32 and 128 GeV; held out: PbLAr. Model: Par04's VAE
(``par04_vae_pbwo4``), same architecture and initial weights both ways.

1. From scratch on PbLAr, evaluated every ``--eval-every`` steps for a budget of ``--scratch-steps``.
2. Reptile over the five other media (``--meta-iterations`` × ``--inner-steps``), then adaptation on
   PbLAr with the same budget.
Both count the steps until the figure reaches ``--target``. The figure (``--metric``): the largest
relative difference of the mean longitudinal profile over the layers holding 90% of the energy
(default, target 0.25; it tells the media apart), or the VAE's validation loss (dominated by the many
empty voxels, which every medium shares: a weak test).

Printed: steps and seconds to the target both ways and their ratio (target of the issue: ≥ 10×
fewer steps), and what meta-training cost. Needs only torch, numpy and h5py.

    .venv/bin/python benchmarks/meta_adaptation.py [--scratch-steps 2000] [--meta-iterations 300]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from showers.readout import get_readout
from showers.simulator import ShowerSimulator
from trainers.data import ShowerData, split_validation
from trainers.reptile import ReptileConfig, meta_train, profile_difference, steps_to_target, validation_loss
from zoo import create_model

META_MEDIA = ("PbWO4", "W", "Pb", "SiW", "SciPb")
HELD_OUT = "PbLAr"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch-steps", type=int, default=2000)
    ap.add_argument("--meta-iterations", type=int, default=300)
    ap.add_argument("--inner-steps", type=int, default=16)
    ap.add_argument("--n-per-energy", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target", type=float, default=0.25,
                    help="the figure both must reach (default: a 25%% largest profile difference); "
                         "a negative value takes the best that training from scratch reaches in the budget")
    ap.add_argument("--metric", choices=("profile", "loss"), default="profile",
                    help="profile: the largest relative difference of the mean longitudinal profile (layers "
                         "holding 90%% of the energy, worst energy); loss: the validation loss")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ro = get_readout("g4-pbwo4")
    energies = np.repeat([2048.0, 8192.0, 32768.0, 131072.0], args.n_per_energy)
    t0 = time.perf_counter()
    data = {}
    for i, medium in enumerate((*META_MEDIA, HELD_OUT)):
        x = ShowerSimulator(ro, medium, "e-").simulate(energies, seed=100 + i)
        data[medium] = split_validation(ShowerData(x, energies, ro, f"simulated e- in {medium}"), 0.2, 50, seed=0)
    print(f"data: {len(energies)} showers per medium, {time.perf_counter() - t0:.0f} s")

    torch.manual_seed(0)
    init = create_model("par04_vae_pbwo4")
    tr, va = data[HELD_OUT]

    metric = profile_difference if args.metric == "profile" else validation_loss
    scratch = steps_to_target(copy.deepcopy(init), tr, va, target=-np.inf, max_steps=args.scratch_steps,
                              eval_every=args.eval_every, metric=metric)
    losses = [loss for _, loss in scratch["curve"]]
    target = args.target if args.target >= 0 else min(losses)
    scratch_steps = next((s for s, loss in scratch["curve"] if loss <= target), None)
    scratch_seconds = scratch["seconds"] * (scratch_steps or args.scratch_steps) / args.scratch_steps

    meta = copy.deepcopy(init)
    t0 = time.perf_counter()
    meta_train(meta, {m: data[m][0] for m in META_MEDIA},
               ReptileConfig(meta_iterations=args.meta_iterations, inner_steps=args.inner_steps, progress=False))
    meta_seconds = time.perf_counter() - t0
    adapted = steps_to_target(meta, tr, va, target=target, max_steps=args.scratch_steps, eval_every=args.eval_every,
                              metric=metric)

    what = "largest mean-profile difference" if args.metric == "profile" else "validation loss"
    print(f"held-out medium {HELD_OUT}; {what} at the start {losses[0]:.4g}, target {target:.4g}; "
          f"budget {args.scratch_steps} steps each way")
    print("scratch curve: " + ", ".join(f"{s}:{v:.3g}" for s, v in scratch["curve"][:: max(1, len(losses) // 12)]))
    print("adapted curve: " + ", ".join(f"{s}:{v:.3g}" for s, v in adapted["curve"][:12]))
    print(f"meta-training: {args.meta_iterations} x {args.inner_steps} steps over {', '.join(META_MEDIA)} "
          f"in {meta_seconds:.0f} s; meta-initialisation's loss on {HELD_OUT} before adapting: "
          f"{adapted['curve'][0][1]:.4g}")
    print(f"{'':22s} {'steps':>7s} {'seconds':>8s}")
    def row(label, steps, seconds):
        shown = f"> {args.scratch_steps}" if steps is None else str(steps)
        print(f"{label:22s} {shown:>7s} {seconds:8.1f}" + ("  (target not reached in the budget)" if steps is None else ""))

    row("from scratch", scratch_steps, scratch_seconds)
    row("from the meta-init", adapted["steps"], adapted["seconds"])
    if adapted["steps"] is None:
        return
    a = max(adapted["steps"], 1)
    if scratch_steps is None:
        print(f"ratio (scratch / adapted steps): > {args.scratch_steps / a:.1f}x (scratch never got there)")
    else:
        print(f"ratio (scratch / adapted steps): {scratch_steps / a:.1f}x")


if __name__ == "__main__":
    main()
