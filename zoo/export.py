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

__all__ = ["OPSET", "MEAN_VOXEL_FLOOR", "export_onnx", "onnx_parity", "onnx_session", "relative_difference"]

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


#: voxels below this fraction of their shower's mean voxel energy are compared in absolute terms
#: (``relative_difference``)
MEAN_VOXEL_FLOOR = 0.1


def relative_difference(out: np.ndarray, ref: np.ndarray) -> float:
    """The largest per-voxel |out - ref| / max(|ref|, 10 % of that shower's mean voxel |ref|).

    Why this measure: every voxel is compared at its own relative precision down to a tenth of its
    shower's average voxel (1.5e-5 of the shower in a 6480-voxel readout, 2.5e-6 in Par04's 40500),
    and below that in absolute terms. A voxel is made of terms of about a typical voxel's size (a
    dense layer's products, E_inc times a sigmoid, a scale to the shower's total), and two correct
    float32 evaluations differ by about 1e-7 of those terms, not of the voxel: a voxel that is the
    small difference of larger terms (an untrained FastCaloGAN's ReLU outputs) reads 5e-7 of a mean
    voxel apart, 1e-3 relative to itself, so a pure relative measure would refuse correct graphs; the
    floor reads that as 5e-6. Above the floor the graphs agree to a few ulps of the voxel itself
    (every variant, trained: at most 4e-6). The former floor, 1 % of the shower's largest voxel,
    is about 10 mean voxels in a real shower (a 6480-voxel PbWO4 shower's core voxel holds some 15 %
    of it): 100 times higher, and blind to errors of less than 1e-6 of the peak below it. With ONNX
    Runtime's Sigmoid (wrong by 100 % at -17), par04_vae_ds2 with trained-like logits (-30 .. -5)
    reads 5e-3 here; a measure relative to the shower's total energy reads 5e-5 and would pass it.
    Shapes that differ give infinity.
    """
    if out.shape != ref.shape:
        return float("inf")
    mag = np.abs(np.asarray(ref, dtype=np.float64))
    mean = mag.mean(axis=-1, keepdims=True) if ref.ndim else mag
    scale = np.maximum(mag, np.maximum(MEAN_VOXEL_FLOOR * mean, 1e-30))
    return float(np.max(np.abs(np.asarray(out, dtype=np.float64) - ref) / scale))


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
    within ``rtol`` (1e-4: float32 rounding is about 1e-7 of a voxel, see there), and, for
    information, ``energy_rel_diff``: the largest fraction of a shower's energy that differs
    (sum |out - ref| / sum |ref|).
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
    l1 = np.abs(out.astype(np.float64) - ref).sum(-1) / np.maximum(np.abs(ref.astype(np.float64)).sum(-1), 1e-30) \
        if out.shape == ref.shape else np.inf
    return {"max_rel_diff": rel, "ok": bool(rel <= rtol), "n": n, "energy_rel_diff": float(np.max(l1))}
