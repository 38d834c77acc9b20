"""Training throughput of banks against the plain single-model loop, side by side in one run.

FastCaloGAN's WGAN-GP at the atlas-like barrel photon size (368 voxels; critic 368-368-368-1,
generator 50-50-100-200-368), batch 128, 5 critic steps with gradient penalty + 1 generator step per
iteration. The plain loop is ``trainers.loop``'s adversarial step on one model; a bank of K trains K
such models in lockstep (``trainers.bank``, rng="bank"). Printed per K: GAN-iterations/s (K ×
bank iterations/s), the ratio to the plain loop, and the peak memory (CUDA) — fp32, and bf16
autocast on CUDA. CUDA graphs are not used (yet): that column says so. Needs only torch and numpy.

    .venv/bin/python benchmarks/bench_banks.py [--ks 1,10,100,300] [--seconds 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from showers.readout import Readout
from trainers.bank import make_bank
from trainers.data import ShowerData
from trainers.loop import _STEPS, _Batches
from zoo.fastcalogan import FastCaloGAN, FastCaloGANConfig

N_VOXELS = 368


def _readout() -> Readout:
    from showers.detector import get_detector

    return get_detector("atlas-like").region("photon_eta_020_025").readout


def _data(readout: Readout, n: int, seed: int) -> ShowerData:
    rng = np.random.default_rng(seed)
    energy = np.repeat([4096.0, 16384.0, 65536.0, 262144.0], n // 4)
    x = (rng.gamma(0.3, 1.0, (len(energy), readout.n_voxels)) * energy[:, None] / readout.n_voxels).astype(np.float32)
    return ShowerData(x, energy, readout, "synthetic")


def _model(readout: Readout, seed: int) -> FastCaloGAN:
    torch.manual_seed(seed)
    return FastCaloGAN(FastCaloGANConfig(readout=readout.to_dict()), variant="fastcalogan")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(step, device, seconds: float, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        step()
        n += 1
    _sync(device)
    return n / (time.perf_counter() - t0)


def plain(readout, device, seconds: float, bf16: bool) -> float:
    model = _model(readout, 0).to(device).train()
    step = _STEPS[model.kind](model)
    batches = _Batches(model, _data(readout, 512, 0), 128, device, torch.Generator().manual_seed(0))

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    return _rate(lambda: step(batches, autocast), device, seconds)


def bank(readout, k: int, device, seconds: float, bf16: bool) -> tuple[float, float]:
    models = [_model(readout, i) for i in range(k)]
    data = [_data(readout, 256, i) for i in range(k)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    b = make_bank(models, data, device=device, rng="bank")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    rate = _rate(lambda: b.step(autocast), device, seconds)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return rate * k, mem


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="1,10,100,300")
    ap.add_argument("--seconds", type=float, default=5.0, help="timing window per measurement")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    readout = _readout()
    assert readout.n_voxels == N_VOXELS
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"FastCaloGAN WGAN-GP, {N_VOXELS} voxels, batch 128, 5 critic steps + GP; {name}; torch {torch.__version__}")
    precisions = [False, True] if device.type == "cuda" else [False]
    print(f"{'precision':9s} {'K':>5s} {'GAN-it/s':>10s} {'x plain':>8s} {'peak GiB':>9s}  CUDA graphs")
    for bf16 in precisions:
        label = "bf16" if bf16 else "fp32"
        base = plain(readout, device, args.seconds, bf16)
        print(f"{label:9s} {'plain':>5s} {base:10.1f} {1.0:8.2f} {'':>9s}  -")
        for k in (int(x) for x in args.ks.split(",")):
            try:
                rate, mem = bank(readout, k, device, args.seconds, bf16)
            except torch.OutOfMemoryError:
                print(f"{label:9s} {k:5d} {'out of memory':>10s}")
                torch.cuda.empty_cache()
                continue
            print(f"{label:9s} {k:5d} {rate:10.1f} {rate / base:8.2f} {mem:9.2f}  not used")


if __name__ == "__main__":
    main()
