"""Training throughput of banks against a plain single-model loop, side by side in one run.

For each family, model-iterations/s of
- ``plain``: one model, its own losses called directly, ``torch.optim.Adam`` (what a user's own script
  does; no vmap);
- banks of K (``trainers.bank.Bank``, rng="bank"): K models stacked under ``torch.func.vmap`` (a bank
  of one calls its model directly), one ``Bank.step`` per iteration; printed as K × bank-iterations/s
  and the ratio to ``plain``.

Families (one iteration each): FastCaloGAN's WGAN-GP at the atlas-like barrel photon size (368 voxels,
critic 368-368-368-1, generator 50-50-100-200-368, batch 128, 5 critic steps with gradient penalty and
1 generator step); the Par04 VAE on the Geant4 PbWO4 readout (6480 voxels, batch 100, its own
config); FAST.AR on the same readout (batch 64, width 32; on a CPU ``--small-ar`` (default there)
takes batch 8 and width 8, since one iteration of the full one takes about a second); flow matching
(``flow_matching_pbwo4``, the flagship) on the same readout with its own config. fp32, and bf16
autocast on CUDA. Needs only torch and numpy.

Plain and each bank are built once and timed in turn, window for window (``--seconds`` each),
``--repeat`` times: on a machine that other work shares, each ratio is the median of the ratios of
neighbouring windows, which saw the same load; the rates printed are the best windows' (the least
disturbed) and the spread is that of the window ratios (min to max). The peak memory on CUDA is that of
the bank with the plain model beside it. ``--clock cpu`` (a CPU device only) counts this process's CPU
time instead of the wall clock's: on a machine that other work shares, the time it waits for a core
is then not counted (give it one thread, ``--threads 1``, so that CPU time is the work's time).

    .venv/bin/python benchmarks/bench_banks.py [--ks 1,10,30]
        [--families fastcalogan,par04_vae,fast_ar,flow_matching] [--seconds 5] [--repeat 1]
        [--device cuda] [--threads 2] [--clock wall]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from showers.detector import get_detector
from showers.readout import Readout, get_readout
from trainers.bank import Bank
from trainers.data import ShowerData
from zoo import create_model


def _data(readout: Readout, n: int, seed: int) -> ShowerData:
    rng = np.random.default_rng(seed)
    energy = np.repeat([4096.0, 16384.0, 65536.0, 262144.0], n // 4)
    x = rng.gamma(0.3, 1.0, (len(energy), readout.n_voxels)) * (rng.random((len(energy), readout.n_voxels)) < 0.4)
    x *= (0.9 * energy / np.maximum(x.sum(1), 1e-9))[:, None]
    return ShowerData(x.astype(np.float32), energy, readout, "synthetic")


def _family(name: str, small_ar: bool) -> tuple[str, dict, Readout]:
    if name == "fastcalogan":
        return "fastcalogan", {}, get_detector("atlas-like").region("photon_eta_020_025").readout
    if name == "par04_vae":
        return "par04_vae_pbwo4", {}, get_readout("g4-pbwo4")
    if name == "fast_ar":
        return "fast_ar", (dict(batch_size=8, width=8) if small_ar else {}), get_readout("g4-pbwo4")
    if name == "flow_matching":
        return "flow_matching_pbwo4", {}, get_readout("g4-pbwo4")
    raise SystemExit(f"unknown family {name!r}: fastcalogan, par04_vae, fast_ar or flow_matching")


def _model(variant: str, overrides: dict, readout: Readout, seed: int, device):
    torch.manual_seed(seed)
    return create_model(variant, **overrides, readout=readout.to_dict()).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rate(step, device, seconds: float, clock=time.perf_counter) -> float:
    """Iterations per second of ``clock`` of ``step`` over one window of at least ``seconds`` (and 3
    iterations)."""
    _sync(device)
    n, t0, c0 = 0, time.perf_counter(), clock()
    while time.perf_counter() - t0 < seconds or n < 3:
        step()
        n += 1
    _sync(device)
    return n / (clock() - c0)


def _autocast(device, bf16: bool):
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


def _warm(step, warmup: int = 2):
    for _ in range(warmup):
        step()
    return step


def plain(variant, overrides, readout, device, bf16: bool):
    """One iteration of one model trained by hand: its losses, torch.optim.Adam."""
    model = _model(variant, overrides, readout, 0, device).train()
    data = _data(readout, 512, 0)
    model.fit_data(data.energy, data.showers)
    showers = torch.as_tensor(data.showers, device=device)
    energy = torch.as_tensor(data.energy, dtype=torch.float32, device=device)
    conditions = model.encode_conditions(data.energy)
    b = int(model.config.batch_size)
    gen = torch.Generator(device=device).manual_seed(0)
    autocast = _autocast(device, bf16)
    cfg = model.config

    def batch(step):
        idx = torch.randint(len(energy), (b,), generator=gen, device=device)
        return {"showers": showers[idx], "energy": energy[idx], "conditions": conditions[idx],
                **model.draw_training_noise(step, b, gen)}

    if model.kind == "adversarial":
        opt_c = torch.optim.Adam(model.critic_parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
        opt_g = torch.optim.Adam(model.generator_parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))

        def step():
            for _ in range(cfg.n_critic):
                with autocast():
                    loss = model.critic_loss(batch("critic"))["loss"]
                opt_c.zero_grad(set_to_none=True)
                loss.backward()
                opt_c.step()
            with autocast():
                loss = model.generator_loss(batch("generator"))["loss"]
            opt_g.zero_grad(set_to_none=True)
            loss.backward()
            opt_g.step()
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)

        def step():
            with autocast():
                loss = model.losses(batch("loss"))["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return _warm(step)


def bank(variant, overrides, readout, k: int, device, bf16: bool):
    """One ``Bank.step`` of K models."""
    models = [_model(variant, overrides, readout, i, device) for i in range(k)]
    data = [_data(readout, 128, i) for i in range(k)]
    for m, d in zip(models, data):
        m.fit_data(d.energy, d.showers)
    b = Bank(models, data, device=device, rng="bank")
    autocast = _autocast(device, bf16)
    return _warm(lambda: b.step(autocast))


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="1,10,30")
    ap.add_argument("--families", default="fastcalogan,par04_vae,fast_ar,flow_matching")
    ap.add_argument("--seconds", type=float, default=5.0, help="timing window per measurement")
    ap.add_argument("--repeat", type=int, default=1,
                    help="windows of plain and of each bank in turn, N of each (ratio: the median of their ratios)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time by the wall clock or by this process's CPU time (a CPU device only)")
    ap.add_argument("--small-ar", action=argparse.BooleanOptionalAction, default=None,
                    help="FAST.AR at batch 8 and width 8 (default: on a CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit("--clock cpu measures a CPU device only")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    small_ar = device.type == "cpu" if args.small_ar is None else args.small_ar
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; torch {torch.__version__}; model-iterations per {args.clock} second (one iteration: one step "
          "of every model)")
    precisions = [False, True] if device.type == "cuda" else [False]
    print(f"{'family':26s} {'precision':9s} {'K':>5s} {'model-it/s':>11s} {'x plain':>8s} {'peak GiB':>9s} "
          f"{'spread':>13s}")
    for family in args.families.split(","):
        variant, overrides, readout = _family(family, small_ar)
        label = f"{variant} ({readout.n_voxels})" + (" small" if overrides else "")
        for bf16 in precisions:
            prec = "bf16" if bf16 else "fp32"
            base = plain(variant, overrides, readout, device, bf16)
            best_plain = 0.0
            rows = []
            for k in (int(x) for x in args.ks.split(",")):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                try:
                    step = bank(variant, overrides, readout, k, device, bf16)
                    ratios, best = [], 0.0
                    for _ in range(args.repeat):
                        p = _rate(base, device, args.seconds, clock)
                        b = k * _rate(step, device, args.seconds, clock)
                        best_plain, best = max(best_plain, p), max(best, b)
                        ratios.append(b / p)
                    rows.append((k, best, float(np.median(ratios)), min(ratios), max(ratios), _peak_gib(device)))
                except torch.OutOfMemoryError:
                    rows.append((k, None, 0.0, 0.0, 0.0, 0.0))
                    torch.cuda.empty_cache()
                step = None  # one bank alive at a time
            print(f"{label:26s} {prec:9s} {'plain':>5s} {best_plain:11.1f} {1.0:8.3f}", flush=True)
            for k, best, ratio, lo, hi, mem in rows:
                if best is None:
                    print(f"{label:26s} {prec:9s} {k:5d} {'out of memory':>11s}", flush=True)
                    continue
                print(f"{label:26s} {prec:9s} {k:5d} {best:11.1f} {ratio:8.3f} {mem:9.2f} {lo:6.3f}-{hi:.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
