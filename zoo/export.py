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

__all__ = ["ARBITER_FACTOR", "EDGE_RTOL", "MAX_EDGE_FRACTION", "MEAN_VOXEL_FLOOR", "OPSET", "PARITY_RTOL", "TORCH_RUNS",
           "export_like", "export_onnx", "graph_key", "onnx_parity", "onnx_session", "relative_difference",
           "unnamed_initializers"]

OPSET = 18


def export_onnx(model: ShowerModel, path, metadata: dict | None = None, batch: int = 4, dynamo: bool = False) -> Path:
    """Write ``model``'s inference graph to ``path`` (inputs ``noise``, ``conditions``; output
    ``showers``), with ``metadata`` as metadata_props (values JSON-encoded if not strings).

    The graph is traced with torch's TorchScript exporter, or with its dynamo exporter where the trace
    fails or may not hold for other inputs (a ``TracerWarning``), or if ``dynamo``. Both give graphs
    of the same values (the parity gate judges either); the first is many times faster
    (``benchmarks/bench_export.py``)."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = model.inference_module().cpu()
    noise = torch.randn(batch, model.noise_dim)
    cond = model.encode_conditions(np.full(batch, 10_000.0), *_example_conditions(model, batch)).cpu()
    names = dict(input_names=["noise", "conditions"], output_names=["showers"], opset_version=OPSET, verbose=False)
    why = "asked for" if dynamo else _export_traced(module, (noise, cond), path, names)
    if why is not None:
        logging.getLogger(__name__).info("%s: the dynamo exporter (%s)", model.variant, why)
        # it warns once per missing torchvision op ("torchvision is not installed. Skipping
        # torchvision::nms"): nothing of ours uses them
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        dim = torch.export.Dim("batch", min=1, max=1 << 20)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (noise, cond), str(path), dynamo=True, external_data=False, **names,
                              dynamic_shapes=({0: dim}, {0: dim}))
    proto = onnx.load(str(path))
    _set_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    model.to(model.device)
    return path


def _export_traced(module, args, path, names: dict) -> str | None:
    """Export through the TorchScript exporter; None if done, else why not (it failed, or the trace may not
    hold for other inputs: a Python branch on a tensor's value, a ``TracerWarning``)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", torch.jit.TracerWarning)
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, **names,
                              dynamic_axes={"noise": {0: "batch"}, "conditions": {0: "batch"}, "showers": {0: "batch"}})
        except Exception as exc:  # noqa: BLE001 - any failure of this exporter leaves the other one
            return f"the TorchScript trace: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def graph_key(model: ShowerModel) -> str:
    """What an exported graph's structure depends on besides the values of the model's tensors: its family,
    variant and config, the readout reduced to its layers' shapes (the regions of a fleet differ in their
    geometry, which reaches the graph through buffers), and the opset. Models with the same key export to
    graphs of the same ops (:func:`export_like`)."""
    import json

    cfg = model.config.to_dict()
    cfg["readout"] = [[layer.n_alpha, layer.n_r, layer.n_voxels] for layer in model.readout.layers]
    return json.dumps([model.family, model.variant, cfg, OPSET], sort_keys=True, default=str)


def export_like(model: ShowerModel, template, path, metadata: dict | None = None) -> Path | None:
    """Write ``model``'s inference graph as the graph of ``template`` (an ONNX file exported from a model of
    the same :func:`graph_key`) holding this model's tensors: every initializer named after a parameter or
    buffer (``model.NAME``) takes this model's value, the metadata is ``metadata``. What the exporter
    computed from other values stays the template's, so the graph must pass the parity gate like any
    other (a fleet's registration reuses a graph only where two fresh exports agree on all of it:
    ``registry.publish``). None if the template has a named tensor that this model lacks or holds in
    another shape."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(template))
    tensors = {f"model.{k}": v for k, v in (*model.named_parameters(), *model.named_buffers())}
    for init in proto.graph.initializer:
        if not init.name.startswith("model."):
            continue
        value = tensors.get(init.name)
        if value is None or tuple(value.shape) != tuple(init.dims):
            return None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        init.CopyFrom(numpy_helper.from_array(value.detach().cpu().numpy().astype(dtype), init.name))
    _set_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def unnamed_initializers(path) -> dict:
    """{name: bytes} of the initializers of an ONNX file that are not a model tensor (``model.NAME``): the
    constants the exporter computed, which :func:`export_like` keeps from its template."""
    import onnx

    return {i.name: (tuple(i.dims), i.data_type, onnx.numpy_helper.to_array(i).tobytes())
            for i in onnx.load(str(path)).graph.initializer if not i.name.startswith("model.")}


def _set_metadata(proto, metadata: dict | None) -> None:
    import json

    del proto.metadata_props[:]
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), value if isinstance(value, str) else json.dumps(value)


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
    (every variant, trained: at most 4e-6). A floor at 1 % of the shower's largest voxel would be
    about 10 mean voxels in a real shower (a 6480-voxel PbWO4 shower's core voxel holds some 15 %
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


#: the parity gate's rule (:func:`onnx_parity`): ONNX Runtime may be this many times as far from the float64
#: arbiter as torch's own float32 runs, voxel by voxel
ARBITER_FACTOR = 16.0
#: torch float32 runs that measure torch's own distance: the batch at once, then one, two and three showers
#: at a time (other matrix-product kernels, so other roundings inside), then inputs moved by one float32 ulp
TORCH_RUNS = 8
_CHUNKS = (None, 1, 2, 3)
#: below this distance from the arbiter (relative, as in :func:`relative_difference`) every voxel passes
PARITY_RTOL = 1e-4
#: a voxel whose float64 value lies within this fraction of a hit threshold is an edge voxel
EDGE_RTOL = 1e-3
#: at most this fraction of the compared voxels (rounded up) may be left out as edge voxels
MAX_EDGE_FRACTION = 1e-4


def _one_ulp_away(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """``x`` (float32) with every non-zero element moved to a neighbouring float32, up or down at random."""
    a = x.numpy()
    moved = np.nextafter(a, np.where(rng.random(a.shape) < 0.5, -np.inf, np.inf).astype(np.float32))
    return torch.from_numpy(np.where(a != 0, moved, a).astype(np.float32))


def _layer_rescaled(x: np.ndarray, ref: np.ndarray, edges: np.ndarray, layer_matrix: np.ndarray) -> np.ndarray:
    """``x`` (N, V) with the edge voxels zeroed and, in each (shower, layer) holding one, the other voxels
    scaled so that their sum is the arbiter's: a hit kept in one runtime and zeroed in the other moves
    the rest of its layer by its share when the graph renormalises the layer after the threshold."""
    kept = np.where(edges, 0.0, x.astype(np.float64))
    has_edge = (edges.astype(np.float64) @ layer_matrix) > 0  # (N, L)
    sums, ref_sums = kept @ layer_matrix, np.where(edges, 0.0, ref) @ layer_matrix
    factor = np.where(has_edge & (sums > 0), ref_sums / np.where(sums > 0, sums, 1.0), 1.0)
    return kept * (factor @ layer_matrix.T)


def onnx_parity(model: ShowerModel, path, energies_mev, angle_deg=None, geometry=None, seed: int = 0,
                rtol: float = PARITY_RTOL, factor: float = ARBITER_FACTOR) -> dict:
    """Judge ONNX Runtime's output against an arbiter, the torch model in float64, on fresh random noise at
    the given conditions (energies (N,) MeV; angles and geometries where the model has them, else example
    values), voxel by voxel.

    The rule. A float32 graph is exact only to its rounding, and a deep sampler (unrolled ODE steps with
    renormalisations, bounds and a threshold) amplifies that rounding the more the better it is trained:
    no fixed tolerance against torch's own float32 output tells a correct graph from a wrong one at every
    training length. So both float32 runtimes are measured against float64 on the same float32 inputs:
    a voxel's distance is :func:`relative_difference`'s (relative to itself, down to a tenth of its
    shower's mean voxel); torch's own distance is the largest over ``TORCH_RUNS`` float32 runs: the batch
    at once and in chunks of one to three showers (whose matrix products take other kernels, so other
    roundings inside the graph, as ONNX Runtime's do) and on inputs moved by one ulp (one float32 run may
    land near float64 by chance, which would make the allowance of that voxel a coin toss); ONNX Runtime
    passes where, in every voxel, its distance is at most ``max(rtol, factor × torch's)``. Its kernels are
    not torch's (MLAS's exponentials and sigmoids are a few ulps off where torch's are within one), which a
    deep sampler amplifies too: on long-trained flow-matching stand-ins its distance reached 6 times torch's
    largest at single voxels, hence ``ARBITER_FACTOR`` 16. A wrong graph (a changed op, an inaccurate
    kernel, a wrong constant) is far from float64 where torch is not. Edge voxels, whose float64 value
    before a hit threshold lies within ``EDGE_RTOL`` of it (``ShowerModel.threshold_edges``), may be
    kept by one runtime and zeroed by the other: they are left out (their layer compared with its sum
    over the other voxels made the arbiter's) and counted, at most ``MAX_EDGE_FRACTION`` of the voxels.

    Returns ``ok``; ``margin``, the smallest allowance / ONNX Runtime distance over the voxels (>= 1
    passes: how many times farther ONNX Runtime could be); the largest distances of ONNX Runtime
    (``ort_distance``) and of torch (``torch_distance``) from float64; ``edge_voxels`` and
    ``max_edge_voxels``; ``worst`` (the voxel of the margin); ``nonfinite``, the counts of NaN and inf voxels
    of each run (any fails: the model or its graph is broken); and, for information, ``max_rel_diff``
    (ONNX Runtime against torch's float32 output, :func:`relative_difference`) and ``energy_rel_diff``
    (the largest fraction of a shower's energy that differs between the two).
    """
    import copy

    energies = np.asarray(energies_mev, dtype=np.float64)
    n = len(energies)
    example_angle, example_geometry = _example_conditions(model, n)
    angle_deg = example_angle if angle_deg is None else angle_deg
    geometry = example_geometry if geometry is None else geometry
    noise = torch.randn(n, model.noise_dim, generator=torch.Generator().manual_seed(seed))
    cond = model.encode_conditions(energies, angle_deg, geometry).cpu()
    model_cpu = model.cpu().eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        runs = [np.concatenate([model_cpu.generate(noise[i:i + (k or n)], cond[i:i + (k or n)]).numpy()
                                for i in range(0, n, k or n)]) for k in _CHUNKS[:TORCH_RUNS]]
        for _ in range(TORCH_RUNS - len(runs)):
            runs.append(model_cpu.generate(_one_ulp_away(noise, rng), _one_ulp_away(cond, rng)).numpy())
        arbiter = copy.deepcopy(model_cpu).double()
        ref = arbiter.generate(noise.double(), cond.double()).numpy()
        edges = arbiter.threshold_edges(noise.double(), cond.double(), EDGE_RTOL)
    out = onnx_session(path).run(["showers"], {"noise": noise.numpy(), "conditions": cond.numpy()})[0]
    info = {"n": n, "factor": factor, "rtol": rtol, "max_rel_diff": relative_difference(out, runs[0]),
            "nonfinite": {"ort": int((~np.isfinite(out)).sum()), "torch": int((~np.isfinite(runs[0])).sum()),
                          "float64": int((~np.isfinite(ref)).sum())}}
    if out.shape != ref.shape or any(info["nonfinite"].values()):  # a NaN compares as no difference at all
        return {**info, "ok": False, "margin": 0.0, "ort_distance": float("inf"), "torch_distance": 0.0,
                "edge_voxels": 0, "max_edge_voxels": 0, "energy_rel_diff": float("inf"), "worst": {}}
    # the edge voxels that a run did keep where the arbiter zeroed them, or zeroed where it kept them
    edges = np.zeros(ref.shape, bool) if edges is None else edges.numpy()
    edges &= np.any([(r > 0) != (ref > 0) for r in (out, *runs)], axis=0)
    n_edges, max_edges = int(edges.sum()), int(np.ceil(MAX_EDGE_FRACTION * ref.size))
    if n_edges:
        layer_matrix = np.eye(model.readout.n_layers)[model.readout.voxel_layer]  # (V, L)
        out_c = _layer_rescaled(out, ref, edges, layer_matrix)
        runs = [_layer_rescaled(r, ref, edges, layer_matrix) for r in runs]
        ref_c = np.where(edges, 0.0, ref)
    else:
        out_c, ref_c = out.astype(np.float64), ref
    mag = np.abs(ref)
    scale = np.maximum(mag, np.maximum(MEAN_VOXEL_FLOOR * mag.mean(axis=-1, keepdims=True), 1e-30))
    d_ort = np.abs(out_c - ref_c) / scale
    d_torch = np.zeros_like(d_ort)
    for r in runs:
        np.maximum(d_torch, np.abs(r - ref_c) / scale, out=d_torch)
    allowed = np.maximum(rtol, factor * d_torch)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.where(d_ort > 0, allowed / np.where(d_ort > 0, d_ort, 1.0), np.inf)
    worst = np.unravel_index(int(np.argmin(ratio)), ratio.shape)
    margin = float(ratio[worst])
    l1 = np.abs(out.astype(np.float64) - runs[0]).sum(-1) / np.maximum(np.abs(runs[0]).sum(-1), 1e-30)
    return {**info, "ok": bool(margin >= 1.0 and n_edges <= max_edges), "margin": margin,
            "ort_distance": float(d_ort.max()), "torch_distance": float(d_torch.max()), "edge_voxels": n_edges,
            "max_edge_voxels": max_edges, "energy_rel_diff": float(np.max(l1)),
            "worst": {"shower": int(worst[0]), "voxel": int(worst[1]), "ort": float(d_ort[worst]),
                      "torch": float(d_torch[worst]), "allowed": float(allowed[worst])}}
