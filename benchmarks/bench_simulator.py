"""Speed of the built-in simulator on one core, against the target of 1000 showers/s at 100 GeV in
a 6480-voxel readout (45 layers x 16 alpha x 9 r), plus the other media and particles for context.

    .venv/bin/python benchmarks/bench_simulator.py [--n 4000]
"""

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: numpy's generators are single-threaded anyway

import numpy as np  # noqa: E402

from showers.readout import get_readout  # noqa: E402
from showers.simulator import ShowerSimulator  # noqa: E402

TARGET = 1000.0


def rate(sim, energy, n, angle=90.0):
    sim.simulate(np.full(64, energy), angle_deg=angle, seed=0)  # warm-up
    t = time.perf_counter()
    sim.simulate(np.full(n, energy), angle_deg=angle, seed=1)
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4000)
    args = ap.parse_args()
    ro = get_readout("g4-pbwo4")
    print(f"readout {ro.name}: {ro.n_voxels} voxels; {args.n} showers per point; one core")
    print(f"{'medium':8s} {'particle':8s} {'E [GeV]':>8s} {'showers/s':>10s} {'/ target':>9s}")
    for medium, particle in (("PbWO4", "e-"), ("PbWO4", "gamma"), ("SiW", "e-"), ("PbLAr", "pi+")):
        sim = ShowerSimulator(ro, medium, particle)
        for e_gev in (1, 100):
            r = rate(sim, e_gev * 1000.0, args.n)
            print(f"{medium:8s} {particle:8s} {e_gev:8d} {r:10.0f} {r / TARGET:9.2f}")


if __name__ == "__main__":
    main()
