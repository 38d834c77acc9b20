"""Generation speed: torch eager against ONNX Runtime, for each model family, in one run.

For every variant (untrained weights: the speed does not depend on them), the inference graph
(noise, conditions) → MeV per voxel is run by torch eager (eval, ``torch.inference_mode``) and by an
ONNX Runtime session of its export, with the same number of intra-op threads and the session options
that ``registry.pull.ShowerGenerator`` uses (:func:`registry.pull.session_options`), at batch sizes 1,
100 and 10 000 (a batch is skipped when its output would exceed ``--max-mb``, 200 MB by default:
raise it on a GPU). The two are timed in alternate blocks (torch, ORT, torch, ORT: see :func:`timed`)
so that load from other processes falls on both alike; each figure is the median over the calls. All showers are at one incident
energy (``--energy-gev``, 65 GeV: the speed of these graphs does not depend on it) so that the
Geant4 reference is exact: about 2.6 ms of CPU per GeV of electron energy in PbWO4 (169 ms at 65 GeV).

Printed per (device, model, batch): showers/s of torch and of ORT, their ratio (ORT / torch), ORT's
time per shower and Geant4's CPU time over it. With CUDA, also on the GPU: torch fp32, torch bf16
(autocast), ORT's CUDA provider with the output left on the GPU (IO binding), and the pulled model's
``ShowerGenerator.generate`` into host memory against the host-transfer bound, output bytes ÷ the
device-to-host bandwidth measured with pinned memory.

    .venv/bin/python benchmarks/bench_inference.py [--threads 2] [--models par04_vae,fast_ar] [--max-mb 2000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from registry.pull import ShowerGenerator, session_options
from zoo import create_model, list_models
from zoo.export import export_onnx

G4_MS_PER_GEV = 2.6


def timed(fns: dict, min_seconds: float = 1.0, min_reps: int = 3, max_reps: int = 50, sync=None,
          rounds: int = 2) -> dict:
    """Median seconds per call of each function. The functions run in blocks, one after the other,
    ``rounds`` times (A B A B): each block is a warm-up call, then calls until ``min_seconds / rounds``
    have passed and at least ``min_reps / rounds`` calls were made (at most ``max_reps / rounds``).
    Blocks rather than alternate calls: a runtime's idle worker threads spin for a while after each
    call (ONNX Runtime's pool, OpenMP's), and on a machine with few cores they would take the CPU from
    the other runtime's next call."""
    times = {k: [] for k in fns}
    per_block = min_seconds / rounds
    reps_lo, reps_hi = max(1, -(-min_reps // rounds)), max(1, max_reps // rounds)
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()
            if sync:
                sync()
            t_end, n = time.perf_counter() + per_block, 0
            while n < reps_hi and (n < reps_lo or time.perf_counter() < t_end):
                t = time.perf_counter()
                fn()
                if sync:
                    sync()
                times[k].append(time.perf_counter() - t)
                n += 1
    return {k: float(np.median(v)) for k, v in times.items()}


def _extra(model, n):
    spec = model.condition_spec
    return (np.full(n, 90.0) if spec.use_angle else None,
            [spec.geometries[0]] * n if spec.geometries else None)


def _inputs(model, b, energy_gev, device):
    cond = model.encode_conditions(np.full(b, energy_gev * 1e3), *_extra(model, b)).to(device)
    noise = torch.randn(b, model.noise_dim, generator=torch.Generator().manual_seed(1)).to(device)
    return noise, cond


def _export(model, path: Path) -> Path:
    cfg = model.config.to_dict()
    meta = {"model": model.variant, "readout": cfg["readout"], "conditions": cfg["conditions"],
            "noise_dim": model.noise_dim, "n_voxels": model.n_voxels}
    return export_onnx(model, path, metadata=meta)


def bench_cpu(model, path, batches, threads, max_mb, energy_gev, min_seconds) -> list[dict]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    rows = []
    for b in batches:
        mb = b * model.n_voxels * 4 / 1e6
        if mb > max_mb:
            rows.append({"batch": b, "skipped": f"output {mb:.0f} MB > --max-mb"})
            continue
        noise, cond = _inputs(model, b, energy_gev, "cpu")
        feed = {"noise": noise.numpy(), "conditions": cond.numpy()}

        def run_torch():
            with torch.inference_mode():
                return model.generate(noise, cond)

        t = timed({"torch": run_torch, "ort": lambda: sess.run(["showers"], feed)[0]}, min_seconds)
        rows.append({"batch": b, "torch": b / t["torch"], "ort": b / t["ort"], "ratio": t["torch"] / t["ort"]})
    return rows


def d2h_bandwidth(nbytes: int) -> tuple[float, float]:
    """Device-to-host bytes/s into pinned and into pageable memory (a copy of ``nbytes``, up to 1 GB)."""
    nbytes = int(min(max(nbytes, 1 << 20), 1 << 30))
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    t = timed({"pinned": lambda: pinned.copy_(src, non_blocking=True),
               "pageable": lambda: pageable.copy_(src)}, 0.5, sync=torch.cuda.synchronize)
    return nbytes / t["pinned"], nbytes / t["pageable"]


def bench_cuda(model, path, batches, max_mb, energy_gev, min_seconds) -> list[dict]:
    import onnxruntime as ort

    model = model.to("cuda")
    has_ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    sess = ort.InferenceSession(str(path), session_options(), providers=["CUDAExecutionProvider"]) \
        if has_ort_cuda else None
    pulled = ShowerGenerator(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]) \
        if has_ort_cuda else None
    rows = []
    for b in batches:
        out_bytes = b * model.n_voxels * 4
        if out_bytes / 1e6 > max_mb:
            rows.append({"batch": b, "skipped": f"output {out_bytes / 1e6:.0f} MB > --max-mb"})
            continue
        noise, cond = _inputs(model, b, energy_gev, "cuda")

        def run_fp32():
            with torch.inference_mode():
                return model.generate(noise, cond)

        def run_bf16():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                return model.generate(noise, cond)

        fns = {"fp32": run_fp32, "bf16": run_bf16}
        if sess is not None:
            binding = sess.io_binding()
            for name, x in (("noise", noise), ("conditions", cond)):
                binding.bind_input(name, "cuda", 0, np.float32, list(x.shape), x.data_ptr())
            out = torch.empty(b, model.n_voxels, device="cuda")
            binding.bind_output("showers", "cuda", 0, np.float32, list(out.shape), out.data_ptr())
            fns["ort"] = lambda: sess.run_with_iobinding(binding)
        t = timed(fns, min_seconds, sync=torch.cuda.synchronize)
        row = {"batch": b, "torch": b / t["fp32"], "bf16": b / t["bf16"]}
        if sess is not None:
            row.update(ort=b / t["ort"], ratio=t["fp32"] / t["ort"])
            energies = np.full(b, energy_gev * 1e3)
            angle, geometry = _extra(model, b)
            tg = timed({"gen": lambda: pulled.generate(energies, angle, geometry, batch_size=b,
                                                       allow_extrapolation=True)}, min_seconds)["gen"]
            pinned_bw, pageable_bw = d2h_bandwidth(out_bytes)
            row.update(generate=b / tg, bound=pinned_bw / (model.n_voxels * 4), d2h_gbs=pinned_bw / 1e9,
                       d2h_pageable_gbs=pageable_bw / 1e9)
        rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and ORT intra-op threads (CPU)")
    ap.add_argument("--models", default=",".join(list_models()))
    ap.add_argument("--batches", default="1,100,10000")
    ap.add_argument("--max-mb", type=float, default=200.0, help="skip batches whose output exceeds this (MB)")
    ap.add_argument("--energy-gev", type=float, default=65.0, help="incident energy of every shower")
    ap.add_argument("--seconds", type=float, default=1.0, help="least time spent timing each (model, batch)")
    ap.add_argument("--no-cuda", action="store_true", help="CPU only, even where CUDA is available")
    args = ap.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    cuda = torch.cuda.is_available() and not args.no_cuda
    g4_ms = G4_MS_PER_GEV * args.energy_gev
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__} {ort.get_available_providers()}, "
          f"{args.threads} threads, CUDA: {torch.cuda.get_device_name() if cuda else 'no'}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"showers at {args.energy_gev:g} GeV; Geant4: {G4_MS_PER_GEV} ms/GeV = {g4_ms:.0f} ms of CPU per shower")
    cpu_header = (f"{'model':18s} {'voxels':>6s} {'batch':>6s} {'torch sh/s':>11s} {'ORT sh/s':>11s} "
                  f"{'ORT/torch':>9s} {'ORT ms/sh':>10s} {'G4/ORT':>8s}")
    cuda_header = (f"{'model':18s} {'voxels':>6s} {'batch':>6s} {'fp32 sh/s':>11s} {'bf16 sh/s':>11s} "
                   f"{'ORT sh/s':>11s} {'ORT/fp32':>8s} {'ms/sh':>9s} {'G4/fp32':>8s} | {'to-host sh/s':>12s} "
                   f"{'bound sh/s':>11s} {'time/bound':>10s} {'D2H GB/s':>8s}")
    results = {"cpu": [], "cuda": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            torch.manual_seed(0)
            model = create_model(name).eval()
            path = _export(model, Path(tmp) / f"{name}.onnx")
            results["cpu"] += [(name, model.n_voxels, r) for r in bench_cpu(
                model, path, batches, args.threads, args.max_mb, args.energy_gev, args.seconds)]
            if cuda:
                results["cuda"] += [(name, model.n_voxels, r) for r in bench_cuda(
                    model, path, batches, args.max_mb, args.energy_gev, args.seconds)]
            print(f"  ({name} done; load average {os.getloadavg()[0]:.1f})", flush=True)
    print(f"\nCPU ({args.threads} threads each)\n{cpu_header}")
    for name, n_vox, r in results["cpu"]:
        if "skipped" in r:
            print(f"{name:18s} {n_vox:6d} {r['batch']:6d}  {r['skipped']}")
            continue
        ms = 1e3 / r["ort"]
        print(f"{name:18s} {n_vox:6d} {r['batch']:6d} {r['torch']:11.4g} {r['ort']:11.4g} {r['ratio']:9.2f} "
              f"{ms:10.3g} {g4_ms / ms:7.3g}x")
    if cuda:
        print(f"\nCUDA ({torch.cuda.get_device_name()})\n{cuda_header}")
        for name, n_vox, r in results["cuda"]:
            if "skipped" in r:
                print(f"{name:18s} {n_vox:6d} {r['batch']:6d}  {r['skipped']}")
                continue
            ms = 1e3 / r["torch"]
            line = (f"{name:18s} {n_vox:6d} {r['batch']:6d} {r['torch']:11.4g} {r['bf16']:11.4g} "
                    f"{r.get('ort', float('nan')):11.4g} {r.get('ratio', float('nan')):8.2f} {ms:9.3g} "
                    f"{g4_ms / ms:7.3g}x")
            if "generate" in r:
                line += (f" | {r['generate']:12.4g} {r['bound']:11.4g} {r['bound'] / r['generate']:10.2f} "
                         f"{r['d2h_gbs']:8.1f}")
            else:
                line += " | (no ORT CUDA provider)"
            print(line)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
