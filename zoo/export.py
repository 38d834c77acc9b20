"""ONNX export of a model's inference graph: (noise, conditions) → voxel energies in MeV.

The graph is complete on its own (inverse preprocessing included), has a dynamic batch axis and a
pinned opset, passes ``onnx.checker``, and is written as one file (weights inside). The registry adds
its metadata and the parity gate; :func:`onnx_parity` is the comparison both use.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from zoo.base import ShowerModel

__all__ = ["OPSET", "export_onnx", "onnx_parity", "onnx_session", "relative_difference"]

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
    # The exporter warns once per missing torchvision op ("torchvision is not installed. Skipping
    # torchvision::nms"): nothing of ours uses them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
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


def relative_difference(out: np.ndarray, ref: np.ndarray) -> float:
    """The largest per-voxel |out - ref| / max(|ref|, 1 % of that shower's largest |ref|).

    The floor keeps float32 rounding in voxels of almost no energy (an 8 MeV voxel next to an 11 GeV
    one differs by 1.5 keV between two correct float32 evaluations) from reading as a disagreement,
    while any voxel holding 1 % of the shower's peak or more is compared at its own relative
    precision. Shapes that differ give infinity.
    """
    if out.shape != ref.shape:
        return float("inf")
    peak = np.abs(ref).max(axis=-1, keepdims=True) if ref.ndim else np.abs(ref)
    scale = np.maximum(np.abs(ref), np.maximum(1e-2 * peak, 1e-30))
    return float(np.max(np.abs(out - ref) / scale))


def onnx_session(path, providers=None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])


def onnx_parity(model: ShowerModel, path, energies_mev, angle_deg=None, geometry=None, seed: int = 0,
                rtol: float = 1e-4) -> dict:
    """Compare ONNX Runtime with the torch model on fresh random noise at the given conditions
    (energies (N,) MeV; angles and geometries where the model has them, else example values).

    The relative difference is :func:`relative_difference`; returns its maximum and whether it is
    within ``rtol``.
    """
    energies = np.asarray(energies_mev, dtype=np.float64)
    n = len(energies)
    example_angle, example_geometry = _example_conditions(model, n)
    angle_deg = example_angle if angle_deg is None else angle_deg
    geometry = example_geometry if geometry is None else geometry
    noise = torch.randn(n, model.noise_dim, generator=torch.Generator().manual_seed(seed))
    cond = model.encode_conditions(energies, angle_deg, geometry).cpu()
    model_cpu = model.cpu().eval()
    with torch.no_grad():
        ref = model_cpu.generate(noise, cond).numpy()
    out = onnx_session(path).run(["showers"], {"noise": noise.numpy(), "conditions": cond.numpy()})[0]
    rel = relative_difference(out, ref)
    return {"max_rel_diff": rel, "ok": bool(rel <= rtol), "n": n}
