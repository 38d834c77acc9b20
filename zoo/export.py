"""ONNX export of a model's inference graph: (noise, conditions) → voxel energies in MeV.

The graph is complete on its own (inverse preprocessing included), has a dynamic batch axis and a
pinned opset, passes ``onnx.checker``, and is written as one file (weights inside). The registry adds
its metadata and the parity gate; :func:`onnx_parity` is the comparison both use.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from zoo.base import ShowerModel

__all__ = ["OPSET", "export_onnx", "onnx_parity", "onnx_session"]

OPSET = 18


def export_onnx(model: ShowerModel, path, metadata: dict | None = None, batch: int = 4) -> Path:
    """Write ``model``'s inference graph to ``path`` (inputs ``noise``, ``conditions``; output
    ``showers``), with ``metadata`` as metadata_props (values JSON-encoded if not strings)."""
    import json

    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = model.inference_module().cpu()
    noise = torch.randn(batch, model.noise_dim)
    cond = model.encode_conditions(np.full(batch, 10_000.0), *_example_conditions(model, batch)).cpu()
    dim = torch.export.Dim("batch", min=1, max=1 << 20)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (noise, cond), str(path), dynamo=True, external_data=False,
                          input_names=["noise", "conditions"], output_names=["showers"],
                          dynamic_shapes=({0: dim}, {0: dim}), opset_version=OPSET, verbose=False)
    proto = onnx.load(str(path))
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    model.to(model.device)
    return path


def _example_conditions(model: ShowerModel, n: int):
    spec = model.condition_spec
    angle = np.full(n, 90.0) if spec.use_angle else None
    geometry = [spec.geometries[0]] * n if spec.geometries else None
    return angle, geometry


def onnx_session(path, providers=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def onnx_parity(model: ShowerModel, path, energies_mev, n: int | None = None, seed: int = 0,
                rtol: float = 1e-4) -> dict:
    """Compare ONNX Runtime with the torch model on fresh random noise at the given energies.

    The relative difference is |onnx - torch| / max(|torch|, 1e-3 × max|torch|) per voxel (so that
    voxels of ~0 MeV do not divide by zero); returns its maximum and whether it is within ``rtol``.
    """
    energies = np.asarray(energies_mev, dtype=np.float64)
    n = n or len(energies)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, model.noise_dim, generator=g)
    cond = model.encode_conditions(energies[:n], *_example_conditions(model, n)).cpu()
    model_cpu = model.cpu().eval()
    with torch.no_grad():
        ref = model_cpu.generate(noise, cond).numpy()
    out = onnx_session(path).run(["showers"], {"noise": noise.numpy(), "conditions": cond.numpy()})[0]
    scale = np.maximum(np.abs(ref), 1e-3 * max(np.abs(ref).max(), 1e-12))
    rel = float(np.max(np.abs(out - ref) / scale))
    return {"max_rel_diff": rel, "ok": bool(rel <= rtol and out.shape == ref.shape), "n": n}
