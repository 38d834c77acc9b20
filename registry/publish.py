"""From a finished training run to a registered model: best epoch, ONNX export, parity gate,
registration under the region's name, what the version shows, and the ``champion`` alias.

1. **Best epoch**: by the validation ``criterion`` (the sum of the χ²/ndf of E_tot/E_inc, of the
   layer energies and of the per-layer centres and widths, summed over incident-energy points,
   ``validate.metrics``; ``chi2_sum``, FastCaloGAN's criterion, is reported with it), the latest kept
   checkpoint that the smallest one's statistical error cannot tell from it, as
   ``zoo.checkpoint.CheckpointManager`` picks it.
2. **Export**: its inference graph, (noise, conditions) → voxel energies in MeV, dynamic batch axis,
   opset ``zoo.export.OPSET``, ``onnx.checker``; metadata_props carry everything a consumer needs
   (:func:`export_metadata`). A fleet's regions of one structure (``zoo.export.graph_key``) reuse one
   exported graph with their own tensors (``zoo.export.export_like``) once two fresh exports of the
   structure agree on every constant the exporter computed; every graph then passes the same gate.
3. **Parity gate**: ONNX Runtime judged against the torch model run in float64 on fresh random
   noise and conditions spread over the trained range, voxel by voxel, at most ``ARBITER_FACTOR``
   times as far from it as torch's own float32 runs (``zoo.export.onnx_parity``, which explains the
   rule); a model that fails is not registered.
4. **Registration**: one registered model per (campaign, region), named ``{campaign}.{region}``,
   whatever the family: every family trained for a region adds versions to the same name. A version
   carries its family, model (variant), config and iteration, the champion measure and its parts,
   the parity figures, and, where the training left one (``calozoo.tracked``), its validation summary
   against held-out showers beside their floor, as tags, as a table in its description and as
   metrics of its logged model, with the profile plots among its files. The ONNX file is logged
   with MLflow's onnx flavour and a signature (noise (-1, noise_dim), conditions (-1, n_cond) →
   showers (-1, n_voxels), float32). Registering the same checkpoint of the same run again returns
   the existing version. Stores of the former naming, ``{campaign}.{family}.{region}``, are read as
   they are (``registry.pull``).
5. **Champion**: the new version takes the alias ``champion`` only if its champion measure is
   smaller than the current champion's, measured on the same held-out showers. The measure,
   ``CHAMPION_METRIC``, is the best-epoch criterion of the selected checkpoint: the four χ²/ndf of
   the model's generated showers against the run's held-out selection split, computed by the same
   code for every family from showers alone (a family's own loss is not comparable with another's;
   the classifier AUC is not computed for every version). Two versions are comparable only when
   their selection splits are the same showers (``SPLIT_TAG``, a fingerprint of them that training
   records: the same data file, split and seed); otherwise the new version is not crowned and its
   ``champion_decision`` tag says why, as it does whenever it loses. A champion registered before
   the criterion existed, with only ``val_chi2_sum``, is compared on ``chi2_sum``.
   :func:`promote` moves the alias by hand and records why; the alias set in the MLflow UI is
   followed as well (pulls resolve it, and the next registration compares with whichever version
   holds it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from registry.pull import registered_name
from registry.tracking import RUN_FILE, fluent_uri, get_client, quick_http, tracking_uri
from showers import __version__
from zoo.base import ShowerModel, model_from_checkpoint
from zoo.checkpoint import CheckpointManager, load_checkpoint
from zoo.export import (ARBITER_FACTOR, EDGE_RTOL, OPSET, PARITY_RTOL, export_like, export_onnx, graph_key,
                        onnx_parity, unnamed_initializers)

__all__ = ["ALIAS", "CHAMPION_METRIC", "FIGURES", "ParityError", "Publication", "attach_validation",
           "export_metadata", "parity_gate", "promote", "publish", "publish_many", "registered_name", "select_best"]

log = logging.getLogger("calozoo.registry")

ALIAS = "champion"
CHAMPION_METRIC = "criterion"  # validate.metrics.CRITERION (registry may not import validate); smaller is better
LEGACY_METRIC = "chi2_sum"  # what versions registered before the criterion were compared on
#: the run tag (and version tag) holding the fingerprint of the selection split's showers (calozoo.tracked)
SPLIT_TAG = "selection_split"
#: the validation summary a training run leaves in its folder (calozoo.tracked.heldout_validation)
SUMMARY_FILE = Path("validation") / "summary.json"
#: the validation figures a version shows, in this order: the fleet table's, then the report's
FIGURES = {"max_sep_power_etot_per_energy": "separation power of E_tot/E_inc, worst energy",
           "sep_power_etot": "separation power of E_tot/E_inc, all energies",
           "max_long_rel": "largest difference of the mean longitudinal profile",
           "max_rad_rel": "largest difference of the mean radial profile",
           "mean_sep_power_features": "mean separation power of the high-level features",
           "auc_low": "classifier AUC, voxels (0.5: indistinguishable)",
           "auc_high": "classifier AUC, high-level features",
           "fpd": "FPD (Fréchet physics distance)", "kpd": "KPD (kernel physics distance)"}


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
    family: str = ""
    model: str = ""
    export: str = ""  # "fresh" or "reused" (zoo.export.export_like)


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
                rtol: float = PARITY_RTOL, factor: float = ARBITER_FACTOR) -> dict:
    """ONNX Runtime judged against the torch model in float64 (``zoo.export.onnx_parity``: voxel by voxel,
    at most ``factor`` times as far from it as torch's own float32 runs, or ``rtol``) on fresh random
    noise and conditions spread over the trained range (log-uniform energies, uniform angles, random
    geometries); raises :class:`ParityError` if it fails, naming the voxel and the figures."""
    rng = np.random.default_rng(seed)
    spec = model.condition_spec
    lo, hi = trained_range.get("energy_mev", spec.energy_range_mev)
    energy = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    energy[:2] = lo, hi
    angle = rng.uniform(*trained_range.get("angle_deg", (90.0, 90.0)), n) if spec.use_angle else None
    geometry = list(rng.choice(spec.geometries, n)) if spec.geometries else None
    try:
        parity = onnx_parity(model, onnx_path, energy, angle, geometry, seed=seed, rtol=rtol, factor=factor)
    except Exception as exc:
        raise ParityError(f"{onnx_path}: ONNX Runtime cannot run the exported model ({str(exc).splitlines()[0]}); "
                          "not registered") from exc
    where = f"on {n} random inputs over {lo / 1e3:g}-{hi / 1e3:g} GeV; not registered"
    if any(parity["nonfinite"].values()):
        counts = ", ".join(f"{k} {v}" for k, v in parity["nonfinite"].items())
        raise ParityError(f"{onnx_path}: the model generates non-finite voxel energies (NaN or inf: {counts}) {where}")
    if parity["edge_voxels"] > parity["max_edge_voxels"]:
        raise ParityError(f"{onnx_path}: {parity['edge_voxels']} voxels within {EDGE_RTOL:g} of the hit threshold "
                          f"were kept by one runtime and zeroed by the other (at most {parity['max_edge_voxels']} "
                          f"may be) {where}")
    if not parity["ok"]:
        w = parity["worst"]
        raise ParityError(
            f"{onnx_path}: ONNX Runtime differs from the float64 torch model by {w.get('ort', float('inf')):.3g} "
            f"relative at voxel {w.get('voxel')} of shower {w.get('shower')}, where torch float32 differs by "
            f"{w.get('torch', 0.0):.3g}: more than max({rtol:g}, {factor:g} x torch's) (margin "
            f"{parity['margin']:.3g} < 1; against torch float32 it differs by {parity['max_rel_diff']:.3g}) {where}")
    return {**parity, "energy_range_mev": [float(lo), float(hi)]}


# -- the champion -------------------------------------------------------------------------------------
def _version_metric(version, metric: str = CHAMPION_METRIC) -> float:
    try:
        return float(version.tags.get("val_" + metric, "inf"))
    except ValueError:
        return float("inf")


def _comparable_metric(champ, best_metrics: dict) -> tuple[str, float]:
    """The metric to compare a new version with the champion on, and the new version's value: the
    criterion, or ``chi2_sum`` where the champion predates the criterion. The value is rounded as
    the tags are (9 digits), so that the same model does not beat itself by rounding."""
    key = (LEGACY_METRIC if "val_" + CHAMPION_METRIC not in champ.tags and "val_" + LEGACY_METRIC in champ.tags
           else CHAMPION_METRIC)
    return key, float(f"{float(best_metrics.get(key, float('inf'))):.9g}")


def _decide(champ, metrics: dict, split: str | None) -> tuple[bool, str]:
    """(crowned, why) for a new version with these best-checkpoint ``metrics`` and selection ``split``
    against the current champion version ``champ`` (None: there is none)."""
    if champ is None:
        return True, "first version"
    who = f"v{champ.version}" + (f" ({champ.tags['model']})" if champ.tags.get("model") else "")
    theirs_split = champ.tags.get(SPLIT_TAG)
    if split and theirs_split and split != theirs_split:
        return False, (f"not champion: its {CHAMPION_METRIC} was measured on other held-out showers than {who}'s "
                       f"(selection split {split} against {theirs_split}): compare them and move the alias by hand "
                       "(calozoo promote) if it is better")
    key, mine = _comparable_metric(champ, metrics)
    theirs = _version_metric(champ, key)
    if mine < theirs:
        return True, f"beats {who}: val {key} {mine:.4g} < {theirs:.4g}"
    return False, f"not champion: val {key} {mine:.4g} does not beat {who}'s {theirs:.4g}"


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


# -- what a version shows ---------------------------------------------------------------------------------
def _figure(value) -> str:
    return "–" if value is None or not math.isfinite(float(value)) else f"{float(value):.3g}"


def _validation_table(figures: dict, floor: dict | None) -> list[str]:
    lines = ["| figure | this version | floor |", "|---|---|---|"]
    for key, label in FIGURES.items():
        if key in figures:
            error = f" ± {_figure(figures[key + '_error'])}" if key + "_error" in figures else ""
            lines.append(f"| {label} | {_figure(figures[key])}{error} | {_figure((floor or {}).get(key))} |")
    return lines


def _validation_tags(prefix: str, figures: dict, floor: dict | None) -> dict:
    tags = {f"{prefix}.{k}": _figure(figures[k]) for k in FIGURES if k in figures}
    tags.update({f"{prefix}.floor.{k}": _figure(floor[k]) for k in FIGURES if floor and k in floor})
    return tags


def _description(pub: Publication, model_desc: str, metrics: dict, summary: dict | None, parity: dict,
                 plot_url: str | None) -> str:
    m = metrics
    parts = " + ".join(f"{m[c] / max(m[n], 1):.3g}" for c, n in (("chi2_sum", "ndf_sum"), ("chi2_layers", "ndf_layers"),
                                                                 ("chi2_centre", "ndf_centre"), ("chi2_width", "ndf_width"))
                       if c in m and n in m)
    lines = [f"**{pub.model}** ({pub.family}), iteration {pub.iteration}: {model_desc}", "",
             f"**Champion measure** (`{CHAMPION_METRIC}`, smaller is better): {_figure(m.get(CHAMPION_METRIC))}"
             + (f" ± {_figure(m[CHAMPION_METRIC + '_error'])}" if CHAMPION_METRIC + "_error" in m else "")
             + (f" = {parts} (χ²/ndf of E_tot/E_inc, layer energies, centres, widths)" if parts else "")
             + ", on the held-out selection showers. " + f"Decision: {pub.decision}."]
    if summary:
        lines += ["", f"**Against held-out showers** ({summary.get('reference', 'the selection split')}; "
                      f"the floor: {summary.get('floor_reference', 'the held-out showers against themselves')}):", ""]
        lines += _validation_table(summary["figures"], summary.get("floor"))
    if plot_url:
        lines += ["", f"![profiles and E_tot/E_inc against the held-out showers]({plot_url})"]
    lines += ["", f"**Parity gate**: ONNX Runtime within max({parity.get('rtol', PARITY_RTOL):g}, "
                  f"{parity.get('factor', ARBITER_FACTOR):g} × torch float32) of the float64 torch model at every voxel "
                  f"of {parity.get('n', 0)} showers; margin {_figure(parity.get('margin'))} (≥ 1 passes), "
                  f"{parity.get('edge_voxels', 0)} threshold-edge voxels left out; against torch float32 "
                  f"{_figure(parity.get('max_rel_diff'))}."]
    return "\n".join(lines)


def attach_validation(name: str, version: str, figures: dict, *, floor: dict | None = None, reference: str = "",
                      prefix: str = "report", uri: str | None = None) -> None:
    """Add a validation's figures (``validate.report.headline``: the fleet table's, the classifier AUCs,
    FPD ...) to a registered version: as tags ``PREFIX.FIGURE`` (and ``PREFIX.floor.FIGURE``), and as a
    table under its description, beside the ``floor`` where one was measured."""
    client = get_client(uri)
    with quick_http(retries=1, timeout=30):
        mv = client.get_model_version(name, str(version))
        for key, value in _validation_tags(prefix, figures, floor).items():
            client.set_model_version_tag(name, str(version), key, value)
        text = "\n".join(["", f"**Validation report** ({reference or 'held-out showers'}):", "",
                          *_validation_table(figures, floor)])
        client.update_model_version(name, str(version), description=(mv.description or "") + "\n" + text)


# -- one run: what the registry needs, then export and gate ----------------------------------------------------
@dataclass
class _Job:
    """A run to register: everything export and gate need, picklable (a fleet's jobs run in a pool)."""

    run_dir: str
    name: str
    campaign: str
    region: str
    run_id: str
    experiment_id: str
    best: dict
    split: str | None
    rtol: float
    factor: float


def _job(client, run_dir: Path, campaign: str | None, region: str | None, rtol: float, factor: float):
    """The run's _Job, or its Publication if this checkpoint of it is registered already."""
    info_path = run_dir / RUN_FILE
    if not info_path.exists():
        raise FileNotFoundError(f"{run_dir}: no {RUN_FILE}; train with MLflow tracking (calozoo train) first")
    info = json.loads(info_path.read_text())
    # the checkpoint first: a truncated or foreign one is refused (naming it) before the registry is asked
    best = select_best(run_dir)
    load_checkpoint(run_dir / "checkpoints" / best["file"])
    run = client.get_run(info["run_id"])
    campaign = campaign or run.data.tags.get("calozoo.campaign") or info.get("experiment", "default")
    region = region or run.data.tags.get("calozoo.region", "all")
    name = registered_name(campaign, region)
    existing = _existing_version(client, name, run.info.run_id, best["iteration"])
    if existing is not None:
        champ = _current_champion(client, name)
        return Publication(name, str(existing.version), champ is not None and str(champ.version) == str(existing.version),
                           existing.tags.get("champion_decision", ""), best["iteration"], best["metrics"],
                           existing=True, family=existing.tags.get("family", ""), model=existing.tags.get("model", ""))
    return _Job(str(run_dir), name, campaign, region, run.info.run_id, run.info.experiment_id, best,
                run.data.tags.get(SPLIT_TAG), rtol, factor)


class _Graphs:
    """Exported graphs by ``zoo.export.graph_key``: a structure's graph is reused (``export_like``) once two
    fresh exports of it agree on every constant the exporter computed; where a reused graph fails the
    gate, the model is exported afresh and its structure is not reused again."""

    def __init__(self):
        self.state: dict[str, object] = {}  # key -> [first fresh path] | proven template path | False

    def export(self, model: ShowerModel, path: Path, meta: dict) -> str:
        key = graph_key(model)
        state = self.state.get(key)
        if isinstance(state, Path) and export_like(model, state, path, meta) is not None:
            return "reused"
        export_onnx(model, path, meta)
        if state is None:
            self.state[key] = [path]
        elif isinstance(state, list):
            same = unnamed_initializers(state[0]) == unnamed_initializers(path)
            self.state[key] = state[0] if same else False
        return "fresh"

    def refuse(self, model: ShowerModel) -> None:
        self.state[graph_key(model)] = False


def _prepare(job: _Job, graphs: _Graphs | None = None) -> dict:
    """Export and gate a job's checkpoint; raises ParityError (nothing is registered)."""
    run_dir = Path(job.run_dir)
    state = load_checkpoint(run_dir / "checkpoints" / job.best["file"])
    model = model_from_checkpoint(state).eval()
    onnx_path = run_dir / "export" / f"{model.variant}-it{job.best['iteration']}.onnx"
    meta = export_metadata(model, state, name=job.name, campaign=job.campaign, region=job.region, run_id=job.run_id)
    graphs = graphs or _Graphs()
    how = graphs.export(model, onnx_path, meta)
    try:
        parity = parity_gate(model, onnx_path, meta["trained_range"], rtol=job.rtol, factor=job.factor)
    except ParityError:
        if how != "reused":
            raise
        graphs.refuse(model)
        export_onnx(model, onnx_path, meta)
        how = "fresh"
        parity = parity_gate(model, onnx_path, meta["trained_range"], rtol=job.rtol, factor=job.factor)
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("readout", "conditions", "transform")}
    return {"onnx_path": str(onnx_path), "parity": parity, "meta": meta, "family": model.family,
            "model": model.variant, "config": cfg, "readout": model.readout.name, "noise_dim": model.noise_dim,
            "n_cond": model.n_cond, "n_voxels": model.n_voxels, "export": how,
            "describe": f"(noise, conditions) -> {model.n_voxels} voxel energies in MeV ({model.readout.name})"}


#: this process's exported graphs (a registration pool's worker keeps its own across its jobs)
_GRAPHS = _Graphs()


def _prepare_one(job: _Job) -> dict | str:
    """_prepare with this process's graphs; a refused job gives its one-line reason."""
    try:
        return _prepare(job, _GRAPHS)
    except (ParityError, ValueError, RuntimeError, OSError) as exc:
        return str(exc).splitlines()[0]


def _signature(prepared: dict):
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    f32 = np.dtype(np.float32)
    return ModelSignature(inputs=Schema([TensorSpec(f32, (-1, prepared["noise_dim"]), "noise"),
                                         TensorSpec(f32, (-1, prepared["n_cond"]), "conditions")]),
                          outputs=Schema([TensorSpec(f32, (-1, prepared["n_voxels"]), "showers")]))


def _summary(job: _Job) -> dict | None:
    """The run's validation summary (calozoo.tracked) if it is of the registered checkpoint."""
    path = Path(job.run_dir) / SUMMARY_FILE
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("iteration") == job.best["iteration"] else None


def _register(client, uri: str, job: _Job, prepared: dict) -> Publication:
    """The MLflow side, in as few calls as it takes: the champion decision (against the version that holds
    the alias now), the ONNX model with its signature and the validation plot as a logged model of the run
    (the held-out figures its metrics), then the version under the region's name with its tags and
    description, then the alias if it won."""
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow.entities import LoggedModelOutput, Metric, RunTag

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parity, best, metrics = prepared["parity"], job.best, job.best["metrics"]
    summary = _summary(job)
    plot = Path(job.run_dir) / summary["plot"] if summary and summary.get("plot") else None
    plot = plot if plot is not None and plot.exists() else None
    champ = _current_champion(client, job.name)
    crowned, decision = _decide(champ, metrics, job.split)
    # the logged model, in the run's experiment and from the run, filled by MLflow's onnx flavour; the run's
    # output at the registered iteration (without an active run, MLflow does not read every metric history)
    logged = client.create_logged_model(job.experiment_id, name="generator", source_run_id=job.run_id)
    with fluent_uri(uri):
        info_model = mlflow.onnx.log_model(
            onnx.load(prepared["onnx_path"]), name="generator", model_id=logged.model_id,
            save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"],
            signature=_signature(prepared), extra_files=[str(plot)] if plot else None,
            # what the graph needs is known (onnx, onnxruntime): MLflow's inference of it runs a
            # subprocess that imports the model's modules, 10-15 s per registration on a CPU
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),
            metadata={k: v if isinstance(v, (str, int, float)) else json.dumps(v) for k, v in prepared["meta"].items()})
    client.log_outputs(job.run_id, [LoggedModelOutput(info_model.model_id, step=best["iteration"])])
    # the held-out figures as the logged model's metrics (and the run's, at the registered iteration)
    figures = {}
    if summary:
        figures.update({f"heldout_{k}": v for k, v in summary["figures"].items() if k in FIGURES})
        figures.update({f"heldout_floor_{k}": v for k, v in (summary.get("floor") or {}).items() if k in FIGURES})
    ts = int(time.time() * 1000)
    client.log_batch(job.run_id, metrics=[Metric(k, float(v), ts, best["iteration"], model_id=info_model.model_id)
                                          for k, v in figures.items() if math.isfinite(float(v))],
                     tags=[RunTag("registered_as", job.name), RunTag("parity_margin", _figure(parity["margin"]))])
    try:
        client.get_registered_model(job.name)
    except Exception:  # noqa: BLE001 - not there yet (MLflow's RESOURCE_DOES_NOT_EXIST)
        client.create_registered_model(
            job.name, tags={"campaign": job.campaign, "region": job.region},
            description=f"calozoo generators for region {job.region} of campaign {job.campaign}: (noise, "
                        f"conditions) -> voxel energies in MeV. Every family's versions for the region compete: "
                        f"@{ALIAS} is the one with the smallest {CHAMPION_METRIC} on the held-out selection showers "
                        "(see each version's champion_decision).")
    tags = {"family": prepared["family"], "model": prepared["model"], "readout": prepared["readout"],
            "config": json.dumps(prepared["config"], sort_keys=True, default=str)[:4900],
            "iteration": str(best["iteration"]), f"val_{CHAMPION_METRIC}": f"{metrics[CHAMPION_METRIC]:.9g}",
            f"val_{LEGACY_METRIC}": f"{metrics[LEGACY_METRIC]:.9g}",
            "val_chi2_ndf": f"{metrics['chi2_ndf']:.6g}", "val_sep_power": f"{metrics['sep_power']:.6g}",
            "parity_margin": _figure(parity["margin"]), "parity_max_rel_diff": f"{parity['max_rel_diff']:.3g}",
            "parity_edge_voxels": str(parity["edge_voxels"]), "champion_decision": decision,
            "calozoo_version": __version__}
    if f"{CHAMPION_METRIC}_error" in metrics:
        tags[f"val_{CHAMPION_METRIC}_error"] = f"{metrics[CHAMPION_METRIC + '_error']:.3g}"
    if job.split:
        tags[SPLIT_TAG] = job.split
    if summary:
        tags.update(_validation_tags("heldout", summary["figures"], summary.get("floor")))
    pub = Publication(job.name, "", crowned, decision, best["iteration"], metrics, Path(prepared["onnx_path"]),
                      parity, family=prepared["family"], model=prepared["model"], export=prepared["export"])
    # the plot among the version's own files (the logged model's extra_files), as the UI fetches them
    plot_url = (f"ajax-api/2.0/mlflow/logged-models/{info_model.model_id}/artifacts/files?"
                f"artifact_file_path=extra_files/{plot.name}" if plot else None)
    with fluent_uri(uri):  # the registry reads the logged model's MLmodel through the fluent tracking URI
        version = client.create_model_version(
            job.name, info_model.model_uri, run_id=job.run_id, tags=tags, model_id=info_model.model_id,
            description=_description(pub, prepared["describe"], metrics, summary, parity, plot_url))
    pub.version = str(version.version)
    if crowned:
        client.set_registered_model_alias(job.name, ALIAS, pub.version)
    log.info("%s v%s: %s", job.name, pub.version, decision)
    return pub


def publish(run_dir, *, campaign: str | None = None, region: str | None = None, uri: str | None = None,
            rtol: float = PARITY_RTOL, factor: float = ARBITER_FACTOR) -> Publication:
    """Select, export, gate, register and (maybe) crown the best checkpoint of a tracked run.

    campaign, region: default to the ones the run was tracked with.
    Raises :class:`ParityError` (nothing registered) if the export does not reproduce the model.
    """
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).exists():
        raise FileNotFoundError(f"{run_dir}: no {RUN_FILE}; train with MLflow tracking (calozoo train) first")
    uri = tracking_uri(uri or json.loads((run_dir / RUN_FILE).read_text()).get("tracking_uri"))
    client = get_client(uri)
    job = _job(client, run_dir, campaign, region, rtol, factor)
    if isinstance(job, Publication):
        return job
    return _register(client, uri, job, _prepare(job))


def publish_many(run_dirs, *, campaign: str | None = None, uri: str | None = None, workers: int = 1,
                 rtol: float = PARITY_RTOL, factor: float = ARBITER_FACTOR,
                 progress=None) -> tuple[list[Publication], dict[str, str]]:
    """:func:`publish` for many runs (a fleet's regions, each under its own region's name), with the same
    checks per run: the export and the gate in ``workers`` processes (those of one graph structure after
    one another, so that each worker reuses its graph: ``_Graphs``) while this process makes the MLflow
    calls of the runs already prepared, one run after another (one writer for a local store). Returns
    (the publications, {run folder: why it was not registered}); ``progress(text)`` is called per run."""
    run_dirs = [Path(d) for d in run_dirs]
    uri = tracking_uri(uri)
    client = get_client(uri)
    pubs, failed, jobs = [], {}, []
    for d in run_dirs:
        try:
            job = _job(client, d, campaign, None, rtol, factor)
        except (FileNotFoundError, LookupError, ValueError) as exc:
            failed[str(d)] = str(exc).splitlines()[0]
            continue
        (pubs if isinstance(job, Publication) else jobs).append(job)
    jobs.sort(key=lambda j: (_structure_hint(j), j.run_dir))
    for job, result in zip(jobs, _prepared(jobs, workers)):
        if isinstance(result, str):
            failed[job.run_dir] = result
            if progress:
                progress(f"{job.name}: {result}")
            continue
        pub = _register(client, uri, job, result)
        pubs.append(pub)
        if progress:
            progress(f"{pub.name} v{pub.version} ({pub.model}, iteration {pub.iteration}, {CHAMPION_METRIC} "
                     f"{pub.metrics.get(CHAMPION_METRIC, float('nan')):.3g}, parity margin {_figure(pub.parity['margin'])}); "
                     f"{pub.decision}" + (f" -> @{ALIAS}" if pub.champion else ""))
    return pubs, failed


def _prepared(jobs: list[_Job], workers: int):
    """_prepare_one of each job, in order, as they come: in this process, or in a pool of ``workers``
    processes, one job a task (a worker then gets every other job of a structure, and reuses its graph
    from its third on)."""
    workers = max(1, min(int(workers), len(jobs)))
    if workers == 1:
        yield from map(_prepare_one, jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: a fork of a process that runs torch or MLflow threads may deadlock
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        yield from pool.map(_prepare_one, jobs)


def _structure_hint(job: _Job) -> str:
    """The run's variant and voxel count (its model.json), which stand for its graph structure in the order of
    the jobs."""
    meta = Path(job.run_dir) / "model.json"
    if meta.exists():
        d = json.loads(meta.read_text())
        return f"{d.get('variant')}:{d.get('n_voxels')}"
    return ""


def _worker_init() -> None:
    """One torch thread per worker process (the pool has as many processes as CPUs it may use)."""
    import torch

    torch.set_num_threads(1)


def promote(name: str, version: str, reason: str, uri: str | None = None) -> str | None:
    """Give ``version`` of ``name`` the champion alias by hand, recording ``reason`` (and the version it
    replaces) in its ``champion_decision`` tag; returns the former champion's version (None: there was
    none). The MLflow UI's alias editing does the same without the record."""
    if not reason or not reason.strip():
        raise ValueError("give a reason for moving the champion alias (--reason)")
    client = get_client(uri)
    with quick_http():
        mv = client.get_model_version(name, str(version))  # an unknown name or version fails here
        before = _current_champion(client, name)
        client.set_registered_model_alias(name, ALIAS, str(mv.version))
        was = f" from v{before.version}" if before is not None and str(before.version) != str(mv.version) else ""
        client.set_model_version_tag(name, str(mv.version), "champion_decision",
                                     f"promoted by hand{was} ({os.environ.get('USER', 'unknown user')}, "
                                     f"{time.strftime('%Y-%m-%d %H:%M')}): {reason.strip()}")
    return None if before is None else str(before.version)
