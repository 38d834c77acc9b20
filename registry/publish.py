"""From a finished training run to a registered model: best epoch, ONNX export, parity gate,
registration, and the ``champion`` alias.

1. **Best epoch**: by the validation ``criterion`` (the sum of the χ²/ndf of E_tot/E_inc, of the
   layer energies and of the per-layer centres and widths, summed over incident-energy points,
   ``validate.metrics``; ``chi2_sum``, FastCaloGAN's criterion, is reported with it), the latest kept
   checkpoint that the smallest one's statistical error cannot tell from it, as
   ``zoo.checkpoint.CheckpointManager`` picks it.
2. **Export**: its inference graph, (noise, conditions) → voxel energies in MeV, dynamic batch axis,
   opset ``zoo.export.OPSET``, ``onnx.checker``; metadata_props carry everything a consumer needs
   (:func:`export_metadata`).
3. **Parity gate**: ONNX Runtime against torch within 1e-4 relative on fresh random noise and
   conditions spread over the trained range; a model that fails is not registered.
4. **Registration**: one registered model per (campaign, family, region), named
   ``{campaign}.{family}.{region}``; the ONNX file is logged with MLflow's onnx flavour (so
   ``mlflow.pyfunc`` can load it too); registering the same checkpoint of the same run again returns
   the existing version.
5. **Champion**: the new version takes the alias ``champion`` only if its validation criterion beats
   the current champion's (a champion registered before the criterion existed, with only
   ``val_chi2_sum``, is compared on ``chi2_sum``); otherwise the reason is written as the version's
   tag ``champion_decision``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from registry.pull import registered_name
from registry.tracking import RUN_FILE, fluent_uri, get_client, quick_http, tracking_uri
from showers import __version__
from zoo.base import ShowerModel, model_from_checkpoint
from zoo.checkpoint import CheckpointManager, load_checkpoint
from zoo.export import OPSET, export_onnx, onnx_parity

__all__ = ["ALIAS", "ParityError", "Publication", "export_metadata", "parity_gate", "publish", "registered_name",
           "select_best"]

log = logging.getLogger("calozoo.registry")

ALIAS = "champion"
METRIC = "criterion"  # validate.metrics.CRITERION (registry may not import validate); smaller is better
LEGACY_METRIC = "chi2_sum"  # what versions registered before the criterion were compared on


class ParityError(RuntimeError):
    """The exported ONNX model does not reproduce the torch model: it must not be registered."""


@dataclass
class Publication:
    name: str
    version: str
    champion: bool
    decision: str
    iteration: int
    metrics: dict
    onnx_path: Path | None = None
    parity: dict = field(default_factory=dict)
    existing: bool = False  # True: this run's checkpoint was already registered


def select_best(run_dir) -> dict:
    """The index entry (iteration, file, metrics) of the run's best kept checkpoint."""
    best = CheckpointManager(Path(run_dir) / "checkpoints").best()
    if best is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint with a validation metric (train first)")
    return best


def _trained_range(state: dict) -> dict:
    train = (state.get("data") or {}).get("train") or {}
    out = {}
    if "energy_min_mev" in train:
        out["energy_mev"] = [train["energy_min_mev"], train["energy_max_mev"]]
    if "angle_min_deg" in train:
        out["angle_deg"] = [train["angle_min_deg"], train["angle_max_deg"]]
    if "geometries" in train:
        out["geometries"] = train["geometries"]
    return out


def export_metadata(model: ShowerModel, state: dict, *, name: str = "", campaign: str = "", region: str = "",
                    run_id: str = "") -> dict:
    """What travels inside the ONNX file (metadata_props; values JSON where not strings)."""
    cfg = model.config.to_dict()
    return {"calozoo_version": __version__, "registered_name": name, "model": model.variant,
            "family": model.family, "kind": model.kind, "campaign": campaign, "region": region,
            "readout": cfg["readout"], "transform": cfg["transform"], "conditions": cfg["conditions"],
            "trained_range": _trained_range(state), "noise_dim": model.noise_dim, "n_voxels": model.n_voxels,
            "n_cond": model.n_cond, "iteration": int(state["iteration"]), "metrics": state.get("metrics", {}),
            "mlflow_run_id": run_id, "opset": OPSET,
            "inputs": "noise (N, noise_dim) standard normal float32; conditions (N, n_cond) float32, encoded "
                      "as in 'conditions' (showers.transforms.encode_conditions)",
            "outputs": "showers (N, n_voxels) float32: energy per voxel in MeV, CaloChallenge voxel order"}


def parity_gate(model: ShowerModel, onnx_path, trained_range: dict, n: int = 64, seed: int = 2024,
                rtol: float = 1e-4) -> dict:
    """ONNX Runtime against torch (``zoo.export.onnx_parity``) on fresh random noise and conditions
    spread over the trained range (log-uniform energies, uniform angles, random geometries); raises
    :class:`ParityError` if the largest relative difference exceeds ``rtol``."""
    rng = np.random.default_rng(seed)
    spec = model.condition_spec
    lo, hi = trained_range.get("energy_mev", spec.energy_range_mev)
    energy = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    energy[:2] = lo, hi
    angle = rng.uniform(*trained_range.get("angle_deg", (90.0, 90.0)), n) if spec.use_angle else None
    geometry = list(rng.choice(spec.geometries, n)) if spec.geometries else None
    try:
        parity = onnx_parity(model, onnx_path, energy, angle, geometry, seed=seed, rtol=rtol)
    except Exception as exc:
        raise ParityError(f"{onnx_path}: ONNX Runtime cannot run the exported model ({str(exc).splitlines()[0]}); "
                          "not registered") from exc
    if not parity["ok"]:
        raise ParityError(f"{onnx_path}: ONNX Runtime differs from torch by {parity['max_rel_diff']:.3g} relative "
                          f"(limit {rtol:g}) on {n} random inputs over {lo / 1e3:g}-{hi / 1e3:g} GeV; not registered")
    return {**parity, "rtol": rtol, "energy_range_mev": [float(lo), float(hi)]}


def _version_metric(version, metric: str = METRIC) -> float:
    try:
        return float(version.tags.get("val_" + metric, "inf"))
    except ValueError:
        return float("inf")


def _comparable_metric(champ, best_metrics: dict) -> tuple[str, float]:
    """The metric to compare a new version with the champion on, and the new version's value: the
    criterion, or ``chi2_sum`` where the champion predates the criterion. The value is rounded as
    the tags are (9 digits), so that the same model does not beat itself by rounding."""
    key = LEGACY_METRIC if "val_" + METRIC not in champ.tags and "val_" + LEGACY_METRIC in champ.tags else METRIC
    return key, float(f"{float(best_metrics.get(key, float('inf'))):.9g}")


def _current_champion(client, name: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        return None


def _existing_version(client, name: str, run_id: str, iteration: int):
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    for v in versions:
        if v.run_id == run_id and v.tags.get("iteration") == str(iteration):
            return v
    return None


def publish(run_dir, *, campaign: str | None = None, region: str | None = None, uri: str | None = None,
            rtol: float = 1e-4) -> Publication:
    """Select, export, gate, register and (maybe) crown the best checkpoint of a tracked run.

    campaign, region: default to the ones the run was tracked with.
    Raises :class:`ParityError` (nothing registered) if the export does not reproduce the model.
    """
    import mlflow
    import mlflow.onnx
    import onnx

    run_dir = Path(run_dir)
    info_path = run_dir / RUN_FILE
    if not info_path.exists():
        raise FileNotFoundError(f"{run_dir}: no {RUN_FILE}; train with MLflow tracking (calozoo train) first")
    info = json.loads(info_path.read_text())
    # the checkpoint first: a truncated or foreign one is refused (naming it) before the registry is asked
    best = select_best(run_dir)
    state = load_checkpoint(run_dir / "checkpoints" / best["file"])
    uri = tracking_uri(uri or info.get("tracking_uri"))
    client = get_client(uri)
    run = client.get_run(info["run_id"])
    campaign = campaign or run.data.tags.get("calozoo.campaign") or info.get("experiment", "default")
    region = region or run.data.tags.get("calozoo.region", "all")

    model = model_from_checkpoint(state)
    name = registered_name(campaign, model.family, region)
    metric = float(best["metrics"].get(METRIC, float("inf")))
    existing = _existing_version(client, name, run.info.run_id, best["iteration"])
    if existing is not None:
        champ = _current_champion(client, name)
        return Publication(name, str(existing.version), champ is not None and str(champ.version) == str(existing.version),
                           existing.tags.get("champion_decision", ""), best["iteration"], best["metrics"],
                           existing=True)

    onnx_path = run_dir / "export" / f"{model.variant}-it{best['iteration']}.onnx"
    meta = export_metadata(model, state, name=name, campaign=campaign, region=region, run_id=run.info.run_id)
    export_onnx(model, onnx_path, metadata=meta)
    parity = parity_gate(model, onnx_path, meta["trained_range"], rtol=rtol)

    with fluent_uri(uri):
        with mlflow.start_run(run_id=run.info.run_id):
            info_model = mlflow.onnx.log_model(
                onnx.load(str(onnx_path)), name="generator", save_as_external_data=False,
                onnx_execution_providers=["CPUExecutionProvider"],
                # what the graph needs is known (onnx, onnxruntime): MLflow's inference of it runs a
                # subprocess that imports the model's modules, 10-15 s per registration on a CPU
                pip_requirements=mlflow.onnx.get_default_pip_requirements(),
                metadata={k: v if isinstance(v, (str, int, float)) else json.dumps(v) for k, v in meta.items()})
            mlflow.set_tags({"registered_as": name, "parity_max_rel_diff": f"{parity['max_rel_diff']:.3g}"})

        try:
            client.get_registered_model(name)
        except Exception:
            client.create_registered_model(
                name, tags={"campaign": campaign, "family": model.family, "region": region},
                description=f"calozoo {model.family} generator for region {region} of campaign {campaign}: "
                            f"(noise, conditions) -> {model.n_voxels} voxel energies in MeV ({model.readout.name}).")
        tags = {"iteration": str(best["iteration"]), f"val_{METRIC}": f"{metric:.9g}",
                f"val_{LEGACY_METRIC}": f"{best['metrics'][LEGACY_METRIC]:.9g}",
                "val_chi2_ndf": f"{best['metrics']['chi2_ndf']:.6g}", "val_sep_power": f"{best['metrics']['sep_power']:.6g}",
                "model": model.variant, "parity_max_rel_diff": f"{parity['max_rel_diff']:.3g}",
                "calozoo_version": __version__}
        chatter = io.StringIO()  # MLflow prints "already exists. Creating a new version" (we created it just above)
        with contextlib.redirect_stderr(chatter):
            version = mlflow.register_model(info_model.model_uri, name, tags=tags)
        log.debug("mlflow.register_model: %s", chatter.getvalue().strip())

    champ = _current_champion(client, name)
    if champ is None:
        crowned, decision = True, "first version"
    else:
        key, mine = _comparable_metric(champ, best["metrics"])
        theirs = _version_metric(champ, key)
        crowned = mine < theirs
        decision = (f"beats v{champ.version}: val {key} {mine:.4g} < {theirs:.4g}" if crowned else
                    f"not champion: val {key} {mine:.4g} does not beat v{champ.version}'s {theirs:.4g}")
    if crowned:
        client.set_registered_model_alias(name, ALIAS, version.version)
    client.set_model_version_tag(name, version.version, "champion_decision", decision)
    log.info("%s v%s: %s", name, version.version, decision)
    return Publication(name, str(version.version), crowned, decision, best["iteration"], best["metrics"],
                       onnx_path, parity)


def promote(name: str, version: str, uri: str | None = None) -> None:
    """Give ``version`` of ``name`` the champion alias by hand (the decision is tagged)."""
    client = get_client(uri)
    with quick_http():
        client.set_registered_model_alias(name, ALIAS, str(version))
        client.set_model_version_tag(name, str(version), "champion_decision", "promoted by hand")
