"""Generation speed: torch eager against ONNX Runtime, for each model family, in one run.

For every variant (untrained weights: the speed does not depend on them), the inference graph
(noise, conditions) → MeV per voxel is run by torch (eval, no_grad) and by an ONNX Runtime session of
its export, with the same number of threads, at batch sizes 1, 100 and 10 000 (a batch is skipped when
its output would exceed ``--max-mb``, 200 MB by default: raise it on a GPU). Printed: showers/s of
each, their ratio (ORT / torch), and the
time per shower against Geant4 (about 2.6 ms of CPU per GeV of electron energy in PbWO4, i.e. 0.17 s
for a 65 GeV shower). With CUDA, the same on the GPU (torch CUDA; ORT's CUDA provider if installed).

    .venv/bin/python benchmarks/bench_inference.py [--threads 2] [--models par04_vae,fastcalogan] [--max-mb 800]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from zoo import create_model, list_models
from zoo.export import export_onnx

G4_MS_PER_GEV = 2.6
E_REF_GEV = 65.0


def timed(fn, min_seconds: float = 0.5, min_reps: int = 3) -> float:
    """Median seconds per call, after a warm-up call."""
    fn()
    times, t_end = [], time.perf_counter() + min_seconds
    while len(times) < min_reps or time.perf_counter() < t_end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 50:
            break
    return float(np.median(times))


def bench(name: str, batches, threads: int, max_mb: float, device: str) -> list[dict]:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = create_model(name).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, Path(tmp) / f"{name}.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.log_severity_level = 3
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        providers = [p for p in providers if p in ort.get_available_providers()]
        sess = ort.InferenceSession(str(path), opts, providers=providers)
        ort_device = "cuda" if sess.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        model = model.to(device)
        for b in batches:
            mb = b * model.n_voxels * 4 / 1e6
            if mb > max_mb:
                rows.append({"model": name, "batch": b, "skipped": f"output {mb:.0f} MB > --max-mb"})
                continue
            rng = np.random.default_rng(1)
            energy = np.exp(rng.uniform(np.log(2e3), np.log(200e3), b))
            cond = model.encode_conditions(energy, *_extra(model, b))
            noise = torch.randn(b, model.noise_dim, device=device)
            cond_np, noise_np = cond.cpu().numpy(), noise.cpu().numpy()

            def run_torch():
                with torch.no_grad():
                    out = model.generate(noise, cond)
                    if device == "cuda":
                        out = out.cpu()  # into host memory, like ORT's output
                return out

            def run_ort():
                return sess.run(["showers"], {"noise": noise_np, "conditions": cond_np})[0]

            t_torch, t_ort = timed(run_torch), timed(run_ort)
            rows.append({"model": name, "n_voxels": model.n_voxels, "batch": b, "torch": b / t_torch,
                         "ort": b / t_ort, "ratio": t_torch / t_ort, "ort_device": ort_device})
    return rows


def _extra(model, n):
    spec = model.condition_spec
    return (np.full(n, 90.0) if spec.use_angle else None,
            [spec.geometries[0]] * n if spec.geometries else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--models", default=",".join(list_models()))
    ap.add_argument("--batches", default="1,100,10000")
    ap.add_argument("--max-mb", type=float, default=200.0, help="skip batches whose output exceeds this (MB)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, threads {args.threads}, devices {devices}; Geant4 reference: "
          f"{G4_MS_PER_GEV} ms/GeV = {G4_MS_PER_GEV * E_REF_GEV:.0f} ms per {E_REF_GEV:.0f} GeV shower")
    header = f"{'device':6s} {'model':18s} {'voxels':>6s} {'batch':>6s} {'torch sh/s':>11s} {'ORT sh/s':>11s} " \
             f"{'ORT/torch':>9s} {'ORT us/sh':>9s} {'vs G4':>8s}"
    for device in devices:
        print(header)
        for name in args.models.split(","):
            for r in bench(name, batches, args.threads, args.max_mb, device):
                if "skipped" in r:
                    print(f"{device:6s} {r['model']:18s} {'':6s} {r['batch']:6d}  {r['skipped']}")
                    continue
                us = 1e6 / r["ort"]
                speedup = G4_MS_PER_GEV * E_REF_GEV * 1e3 / us
                print(f"{device:6s} {r['model']:18s} {r['n_voxels']:6d} {r['batch']:6d} {r['torch']:11.4g} "
                      f"{r['ort']:11.4g} {r['ratio']:9.2f} {us:9.3g} {speedup:7.3g}x"
                      + ("" if r["ort_device"] == device else f"  (ORT on {r['ort_device']})"))


if __name__ == "__main__":
    main()
