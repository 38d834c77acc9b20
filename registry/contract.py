"""A registered model as a folder that a simulation framework loads without calozoo.

:func:`export_model` pulls ``NAME@ALIAS`` or ``NAME@VERSION`` (``registry.pull``) and writes

- ``model.onnx``: the inference graph as registered, (noise, conditions) → voxel energies in MeV;
- ``contract.json``: :func:`contract`, its metadata in readable form: the inputs and output read from
  the graph (names, shapes, dtypes), units, how the conditions are encoded (one entry per column,
  with its formula), the noise distribution, the trained range, the readout (voxel order, layers),
  the variant, family, registered name and version;
- ``README.txt``: how to call it with plain ONNX Runtime (a Python snippet for this model that
  needs numpy and onnxruntime alone, and what a C++ caller feeds it).

Like the rest of this package it needs neither torch nor Ray.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from registry.pull import ShowerGenerator, parse_ref, pull

__all__ = ["CONTRACT_VERSION", "contract", "export_model", "readme_text"]

#: the layout of contract.json; a change that a reader must know of raises it
CONTRACT_VERSION = 1

_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
           "tensor(int64)": "int64", "tensor(int32)": "int32"}
VOXEL_ORDER = ("CaloChallenge order: layer outermost, then the angular bin (alpha), then the radial bin fastest; "
               "a regular readout reshapes as (N, n_layers, n_alpha, n_r)")


def _io(arg) -> dict:
    # a dynamic axis has a name (or none) instead of a size: the batch, N
    return {"name": arg.name, "shape": [d if isinstance(d, int) else "N" for d in arg.shape],
            "dtype": _DTYPES.get(arg.type, arg.type)}


def _columns(gen: ShowerGenerator) -> list[dict]:
    """The condition columns in order, each with its formula (``showers.transforms.encode_conditions``)."""
    spec = gen.condition_spec
    if spec.energy_encoding == "linear":
        energy = {"formula": f"E / {spec.energy_scale_mev!r}", "unit": "MeV"}
    else:
        lo, hi = spec.energy_range_mev
        energy = {"formula": f"(ln E - ln {lo!r}) / (ln {hi!r} - ln {lo!r})", "unit": "MeV",
                  "note": "maps E in [lo, hi] onto [0, 1]; outside, it extrapolates (not clipped)"}
    cols = [{"name": "energy", "what": "incident (kinetic) energy E of the particle", **energy}]
    if spec.use_angle:
        cols.append({"name": "angle", "what": "incident angle a (90: normal incidence)",
                     "formula": f"a / {spec.angle_max_deg!r}", "unit": "degree"})
    for g in spec.geometries:
        cols.append({"name": f"geometry={g}", "what": f"one-hot: 1 for geometry {g!r}, else 0",
                     "formula": f"1 if geometry == {g!r} else 0"})
    return cols


def contract(gen: ShowerGenerator, sha256: str | None = None) -> dict:
    """The contract of a pulled model (see the module docstring); ``sha256`` of its ONNX file if known."""
    meta, ro = gen.metadata, gen.readout
    inputs = {a.name: _io(a) for a in gen.session.get_inputs()}
    outputs = [_io(a) for a in gen.session.get_outputs()]
    if "noise" in inputs:
        inputs["noise"]["meaning"] = ("latent noise: independent standard normal draws N(0, 1), a new row for "
                                      "every shower")
    if "conditions" in inputs:
        inputs["conditions"]["meaning"] = "the encoded conditions of each shower, one column each (see 'conditions')"
    for out in outputs:
        if out["name"] == "showers":
            out.update(unit="MeV", meaning=f"energy deposited in each voxel of the readout, {VOXEL_ORDER}")
    trained = dict(gen.trained_range)
    if "energy_mev" in trained:
        trained["energy_gev"] = [e / 1e3 for e in trained["energy_mev"]]
    return {
        "contract_version": CONTRACT_VERSION,
        "registered_name": gen.name, "version": str(gen.version),
        "model": meta.get("model"), "family": meta.get("family"), "kind": meta.get("kind"),
        "campaign": meta.get("campaign"), "region": meta.get("region"), "iteration": meta.get("iteration"),
        "mlflow_run_id": meta.get("mlflow_run_id"), "calozoo_version": meta.get("calozoo_version"),
        "file": "model.onnx", "sha256": sha256, "opset": meta.get("opset"),
        "inputs": list(inputs.values()), "outputs": outputs,
        "noise": {"input": "noise", "size": gen.noise_dim, "distribution": "standard normal N(0, 1), float32"},
        "conditions": {"input": "conditions", "size": gen.condition_spec.n_cond, "columns": _columns(gen),
                       "spec": gen.condition_spec.to_dict()},
        "trained_range": trained,
        "readout": {"name": ro.name, "n_layers": ro.n_layers, "n_voxels": ro.n_voxels, "voxel_order": VOXEL_ORDER,
                    **{k: v for k, v in ro.to_dict().items() if k != "name"}},
        "transform": meta.get("transform"),
        "metrics": meta.get("metrics"),
        "onnx_metadata_keys": sorted(meta),
    }


def _example_energies(c: dict) -> list[float]:
    lo, hi = c["trained_range"].get("energy_mev") or c["conditions"]["spec"]["energy_range_mev"]
    return [float(lo), float((lo * hi) ** 0.5), float(hi)]


def readme_text(c: dict) -> str:
    """README.txt for the contract ``c``: what the files are and a runnable plain-ONNX-Runtime snippet."""
    spec = c["conditions"]["spec"]
    names = {i["name"]: i for i in c["inputs"]}
    out = c["outputs"][0]
    energies = _example_energies(c)
    code = ["import numpy as np", "import onnxruntime as ort", "",
            'session = ort.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])',
            f"E_mev = np.array({[round(e, 3) for e in energies]!r})   # incident energies, MeV",
            "n = len(E_mev)"]
    if spec["energy_encoding"] == "linear":
        code.append(f"columns = [E_mev / {spec['energy_scale_mev']!r}]")
    else:
        lo, hi = spec["energy_range_mev"]
        code.append(f"columns = [(np.log(E_mev) - np.log({lo!r})) / (np.log({hi!r}) - np.log({lo!r}))]")
    if spec["use_angle"]:
        angle = (c["trained_range"].get("angle_deg") or [90.0])[0]
        code += [f"angle_deg = np.full(n, {float(angle)!r})   # incident angle, degrees",
                 f"columns.append(angle_deg / {spec['angle_max_deg']!r})"]
    if spec["geometries"]:
        code.append(f"geometry = np.array([{spec['geometries'][0]!r}] * n)")
        code += [f"columns.append((geometry == {g!r}).astype(np.float64))   # one-hot" for g in spec["geometries"]]
    code += ["conditions = np.stack(columns, axis=1).astype(np.float32)",
             f"noise = np.random.default_rng(0).standard_normal((n, {c['noise']['size']})).astype(np.float32)",
             f'showers = session.run(["{out["name"]}"], {{"noise": noise, "conditions": conditions}})[0]',
             f"print(showers.shape)   # (n, {c['readout']['n_voxels']}): MeV per voxel"]
    trained = c["trained_range"].get("energy_gev")
    rng = (f"Trained on incident energies of {trained[0]:g}-{trained[1]:g} GeV; outside them the model extrapolates."
           if trained else "The trained energy range is not recorded in this model.")
    cond = "; ".join(f"{col['name']} = {col['formula']}" for col in c["conditions"]["columns"])

    def shape(io):
        return "(" + ", ".join(map(str, io["shape"])) + ")"

    return "\n".join([
        f"{c['registered_name']} v{c['version']}: {c['model']} ({c['family']}), readout {c['readout']['name']} "
        f"({c['readout']['n_voxels']} voxels)",
        "",
        "model.onnx     the generator: (noise, conditions) -> showers; no calozoo needed to run it",
        "contract.json  its inputs, output, units, condition encoding, noise, readout and provenance",
        "",
        f"Inputs, float32, N showers at a time: noise {shape(names['noise'])}, standard normal draws; "
        f"conditions {shape(names['conditions'])}, columns: {cond} (E in MeV).",
        f"Output: {out['name']} {shape(out)} float32, MeV per voxel, {VOXEL_ORDER}.",
        rng,
        "",
        "With plain ONNX Runtime in Python (pip install onnxruntime numpy), from this folder:",
        "",
        *("    " + line if line else "" for line in code),
        "",
        "From C++ (a Geant4 fast-simulation model, e.g. Par04's ONNX Runtime inference): create an",
        "Ort::Session on model.onnx and feed two float32 tensors by name, noise and conditions, as above;",
        "Par04's own models take one concatenated input tensor, so its inference settings do not apply",
        "as they are: give the noise size and the condition columns of contract.json. Deposit each",
        "output voxel's energy (MeV) at its position in the readout described in contract.json.",
        "",
    ])


def _write(path: Path, write) -> None:
    """Write ``path`` through a temporary file beside it: a crash leaves the old file or the new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_model(ref: str, out_dir=None, *, uri: str | None = None, offline: bool = False) -> tuple[Path, dict]:
    """Pull ``ref`` (``NAME@ALIAS``, ``NAME@VERSION``) and write ``model.onnx``, ``contract.json`` and
    ``README.txt`` into ``out_dir`` (default: ``out/export/NAME``); returns (the folder, the contract)."""
    name = parse_ref(ref)[0]
    gen = pull(ref, uri=uri, offline=offline)
    out = Path(out_dir or Path("out/export") / name)
    out.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(gen.path.read_bytes()).hexdigest()
    c = contract(gen, sha256=digest)
    _write(out / "model.onnx", lambda p: shutil.copyfile(gen.path, p))
    _write(out / "contract.json", lambda p: p.write_text(json.dumps(c, indent=1) + "\n"))
    _write(out / "README.txt", lambda p: p.write_text(readme_text(c)))
    return out, c
