"""ONNX export time of every variant: torch's TorchScript exporter (what ``zoo.export.export_onnx`` uses)
against its dynamo exporter (the fallback), side by side in one run, and the largest difference of the
two graphs' outputs (ONNX Runtime, the same noise and conditions, relative as the parity gate measures).

    .venv/bin/python benchmarks/bench_export.py [--variants flow_matching_pbwo4,fast_ar] [--threads 2]

Each variant is exported once by each exporter after one warm-up export of the smallest variant (the
first export in a process imports the exporter); untrained models, the graph's size does not depend on
training. Needs torch, onnx and onnxruntime.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zoo import create_model, list_models  # noqa: E402
from zoo.export import _example_conditions, export_onnx, onnx_session, relative_difference  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(list_models()))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for dynamo in (False, True):
            export_onnx(create_model("fastcalogan"), Path(tmp) / "warm.onnx", dynamo=dynamo)
        print(f"{'variant':<22} {'torchscript s':>14} {'dynamo s':>9} {'ratio':>6} {'outputs differ by':>18}")
        for variant in args.variants.split(","):
            torch.manual_seed(0)
            model = create_model(variant).eval()
            seconds, outputs = [], []
            noise = np.random.default_rng(0).standard_normal((8, model.noise_dim)).astype(np.float32)
            cond = model.encode_conditions(np.geomspace(2e3, 2e5, 8), *_example_conditions(model, 8)).numpy()
            for dynamo in (False, True):
                path = Path(tmp) / f"{variant}-{dynamo}.onnx"
                t0 = time.perf_counter()
                export_onnx(model, path, dynamo=dynamo)
                seconds.append(time.perf_counter() - t0)
                outputs.append(onnx_session(path).run(None, {"noise": noise, "conditions": cond})[0])
            print(f"{variant:<22} {seconds[0]:>14.2f} {seconds[1]:>9.2f} {seconds[1] / seconds[0]:>6.1f} "
                  f"{relative_difference(outputs[0], outputs[1]):>18.1e}", flush=True)


if __name__ == "__main__":
    main()
