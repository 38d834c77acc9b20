"""Training, fleets, sweeps and validation reports tracked in MLflow: the composition of the training
packages (``trainers``, ``tune``), which log through a callback they are handed and import no
tracking library, with ``registry.tracking``'s :class:`~registry.tracking.TrackedRun`.

- :func:`train_tracked`: the single-model trainer (``trainers.loop.train``) in one MLflow run that
  logs what the UI needs to tell a good model at a glance: the model config, the training config and
  the data provenance as params; the losses and the validation metrics at every checkpoint (step =
  iteration); at the end, the best checkpoint's iteration and metrics as tags (FastCaloGAN's
  criterion) with a fingerprint of the held-out showers (:func:`selection_split`: the registry compares
  champions only on the same ones), the kept checkpoints (at most five files) as artifacts, and the
  best checkpoint's validation plot (mean longitudinal and radial profiles and E_tot/E_inc against the
  validation showers) and summary beside their floor (:func:`heldout_validation`), which registration
  shows on the model version.
- :func:`run_tracked_fleet`: a fleet (``trainers.fleet.run_fleet``) under a parent run
  ``fleet/MODEL``, each region a child run (:class:`MLflowFleetTracker`, handed to the Ray workers).
- :func:`run_tracked_sweep` / :func:`resume_tracked_sweep`: a sweep (``tune.sweep``) under a parent
  run ``sweep/MODEL/MODE``, each trial a child run (:class:`MLflowSweepTracker`, handed to the trials).
- :func:`log_report`: a validation report folder (``validate.report``) into a run.

Tracking never stops training: what cannot be logged is kept in the run folder (``run.pending()``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from registry.publish import SPLIT_TAG
from registry.tracking import PENDING, RUN_FILE, TrackedRun, get_client, get_experiment_id, quick_http
from showers.formats import file_attrs, source_label
from trainers.data import ShowerData
from trainers.fleet import FleetConfig, run_fleet
from trainers.loop import TrainConfig, TrainResult, train, validate
from tune.sweep import (SweepConfig, SweepResult, check_resumable, load_config, resume_sweep, run_sweep, search_space,
                        trial_label)
from validate.plots import plot_comparison
from validate.report import ValidateConfig, validate_samples
from zoo.base import ShowerModel, model_from_checkpoint
from zoo.checkpoint import CheckpointManager, load_checkpoint

__all__ = ["MLflowFleetTracker", "MLflowSweepTracker", "best_tags", "heldout_validation", "log_report", "model_params",
           "resume_tracked_sweep", "run_labels", "run_name", "run_tracked_fleet", "run_tracked_sweep", "selection_split",
           "train_tracked"]


def run_name(model: ShowerModel, region: str) -> str:
    """Runs are named after the model and the region, never a timestamp."""
    return f"{model.variant}/{region}"


def model_params(model: ShowerModel) -> dict:
    cfg = model.config.to_dict()
    cfg["readout"] = model.readout.name
    return {"model": {"family": model.family, "variant": model.variant, "kind": model.kind,
                      "n_voxels": model.n_voxels, "noise_dim": model.noise_dim,
                      "n_parameters": sum(p.numel() for p in model.parameters())},
            "config": cfg}


def best_tags(run_dir) -> dict:
    """The best kept checkpoint (by the validation criterion, ``validate.metrics``), as run tags."""
    best = CheckpointManager(Path(run_dir) / "checkpoints").best()
    if best is None:
        return {}
    m = best["metrics"]
    return {"best_iteration": best["iteration"], "best_chi2_sum": f"{m['chi2_sum']:.6g}",
            **({"best_criterion": f"{m['criterion']:.6g}"} if "criterion" in m else {}),
            "best_chi2_ndf": f"{m['chi2_ndf']:.6g}", "best_sep_power": f"{m['sep_power']:.6g}"}


def selection_split(data: ShowerData) -> str:
    """A fingerprint of held-out showers (their energies and voxels): two runs' best-epoch criteria are
    comparable when they were measured on the same showers (``registry.publish``'s champion rule)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(data.energy, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(data.showers, dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


def _halves(energy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two halves of showers, every incident energy split alike (alternately)."""
    a, b = [], []
    for e in np.unique(energy):
        idx = np.flatnonzero(energy == e)
        a.append(idx[0::2])
        b.append(idx[1::2])
    return np.concatenate(a), np.concatenate(b)


def heldout_validation(run_dir, val_data: ShowerData, *, plots: bool = True, title: str = "") -> dict | None:
    """The best checkpoint against the run's held-out (selection) showers, what registration shows on the
    model version (``registry.publish``): the validation plot (``plots/validation.png``: mean profiles and
    E_tot/E_inc) and ``validation/summary.json``, the figures of the fleet table with FPD and KPD
    (``validate.report``, no classifier) of its showers against one half of the held-out showers, beside
    the floor: the other half against the same half (equal sizes, so the floor is what these showers can
    tell apart). None if there is no checkpoint, or too few showers to halve."""
    best = CheckpointManager(Path(run_dir) / "checkpoints").best()
    if best is None:
        return None
    model = model_from_checkpoint(load_checkpoint(Path(run_dir) / "checkpoints" / best["file"]))
    _, fake = validate(model, val_data)
    n = len(fake)
    energy, showers = val_data.energy[:n], val_data.showers[:n]
    source = val_data.source.split(",")[0]
    reference = source_label(source) if Path(source).is_file() else "validation showers"
    png = None
    if plots:
        png = plot_comparison(fake, energy, showers, energy, val_data.readout, Path(run_dir) / "plots" / "validation.png",
                              labels=(reference, model.variant),
                              title=title or f"{model.variant}, iteration {best['iteration']}")
    a, b = _halves(energy)
    if min(len(a), len(b)) < 10:
        return None
    out = Path(run_dir) / "validation"
    cfg = ValidateConfig(classifier="none", per_layer=False, plots=False, fpd_batches=5)
    figures = validate_samples(energy[b], fake[b], energy[b], showers[b], val_data.readout, out / "heldout", cfg,
                               title=f"{model.variant} against held-out showers")["headline"]
    floor = validate_samples(energy[a], showers[a], energy[b], showers[b], val_data.readout, out / "floor", cfg,
                             title="held-out showers against themselves")["headline"]
    summary = {"iteration": best["iteration"], "model": model.variant, "n": int(len(b)),
               "reference": f"{len(b)} held-out showers of the selection split ({reference})",
               "floor_reference": f"the other {len(a)} held-out showers against them",
               "split": selection_split(val_data), "figures": figures, "floor": floor,
               "plot": None if png is None else "plots/validation.png"}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _finish_trained(run: TrackedRun, run_dir, val_data: ShowerData, plots: bool = True) -> None:
    """The end of a trained model's run: best-checkpoint tags and the selection split's fingerprint, the
    checkpoints, the validation plot and summary (:func:`heldout_validation`)."""
    run.set_tags({**best_tags(run_dir), SPLIT_TAG: selection_split(val_data)})
    run.log_artifact(Path(run_dir) / "checkpoints", "checkpoints")
    summary = heldout_validation(run_dir, val_data, plots=plots, title=f"{run.name} ({run.experiment})")
    if summary is not None:
        run.log_artifact(Path(run_dir) / "validation", "validation")
        if summary["plot"]:
            run.log_artifact(Path(run_dir) / summary["plot"], "plots")
    run.finish("FINISHED")


def run_labels(data_path, campaign: str | None = None, region: str | None = None) -> tuple[str, str]:
    """The MLflow experiment (campaign) and region of a run on ``data_path``: as given, else from the
    data's attributes (``campaign`` or ``detector``; ``region``), else the file's name and "all"."""
    path = Path(data_path)
    first = path if path.is_file() else sorted(path.glob("*.h5"))[0]
    attrs = file_attrs(first)
    return (campaign or str(attrs.get("campaign") or attrs.get("detector") or first.stem),
            region or str(attrs.get("region") or "all"))


def train_tracked(model: ShowerModel, train_data: ShowerData, val_data: ShowerData, cfg: TrainConfig, run_dir, *,
                  campaign: str, region: str = "all", uri: str | None = None, parent_run_id: str | None = None,
                  resume: bool = True, retry_after: float = 30.0) -> tuple[TrainResult, TrackedRun]:
    """Train ``model`` and track it in MLflow (experiment = ``campaign``); see the module docstring."""
    run_dir = Path(run_dir)
    params = {**model_params(model), "train": {k: v for k, v in asdict(cfg).items() if k != "extra"},
              "data": {"train": train_data.describe(), "validation": val_data.describe()}}
    params["data"]["train"].pop("energy_points_mev", None)
    params["data"]["validation"].pop("energy_points_mev", None)
    tags = {"calozoo.family": model.family, "calozoo.variant": model.variant, "calozoo.region": region,
            "calozoo.campaign": campaign, "calozoo.run_dir": str(run_dir.resolve())}
    run = TrackedRun(run_name(model, region), campaign, run_dir, params=params, tags=tags,
                     parent_run_id=parent_run_id, uri=uri, retry_after=retry_after)
    status = "FAILED"
    try:
        result = train(model, train_data, val_data, cfg, run_dir, resume=resume, log=run.log_metrics)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            run.finish(status)
    (run_dir / "model.json").write_text(json.dumps(model.describe(), indent=1))
    run.log_artifact(run_dir / "model.json")
    _finish_trained(run, run_dir, val_data)
    return result, run


def _parent_outcome(parent: TrackedRun, work: Callable[[], object]):
    """Run ``work()``; end ``parent`` as FAILED (an exception) or KILLED (Ctrl-C) if it does not return."""
    status = "FAILED"
    try:
        out = work()
        status = "FINISHED"
        return out
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if status != "FINISHED":
            parent.finish(status)


# -- fleets ------------------------------------------------------------------------------------------
@dataclass
class MLflowFleetTracker:
    """A ``trainers.fleet.FleetTracker``: each region an MLflow run ``VARIANT/REGION`` of experiment
    ``campaign``, a child of ``parent_run_id``, with the region's model, data, losses and validation
    metrics, and at the end the best-checkpoint tags, the checkpoints and (``plots``) a validation
    plot. Pickled to the Ray workers: it holds only the URI, ids and plain params; each worker keeps
    its own regions' runs.

    params: logged by every region's run besides its model and data (the fleet's training and bank
        config).
    """

    campaign: str
    uri: str | None = None
    parent_run_id: str | None = None
    plots: bool = True
    params: dict = field(default_factory=dict)
    _runs: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_runs": {}}  # open runs stay on the worker that started them

    def start_region(self, region: str, model: ShowerModel, run_dir: Path, train: ShowerData,
                     val: ShowerData) -> Callable[[dict, int], None]:
        params = {**model_params(model), **self.params,
                  "data": {"source": train.source, "n_train": len(train), "n_validation": len(val)}}
        tags = {"calozoo.family": model.family, "calozoo.variant": model.variant, "calozoo.region": region,
                "calozoo.campaign": self.campaign, "calozoo.run_dir": str(Path(run_dir).resolve())}
        run = TrackedRun(run_name(model, region), self.campaign, run_dir, params=params, tags=tags,
                         parent_run_id=self.parent_run_id, uri=self.uri)
        self._runs[region] = run
        return run.log_metrics

    def finish_region(self, region: str, run_dir: Path, val: ShowerData) -> None:
        _finish_trained(self._runs.pop(region), run_dir, val, self.plots)


def run_tracked_fleet(cfg: FleetConfig, *, campaign: str, uri: str | None = None, plots: bool = True,
                      num_workers: int = 2, use_gpu: bool = False, address: str | None = None, max_failures: int = 3,
                      threads_per_worker: int = 1, gpus_per_worker: float = 1.0) -> tuple[dict, TrackedRun]:
    """``trainers.fleet.run_fleet`` tracked in MLflow: a parent run ``fleet/MODEL`` (run folder
    ``OUT/_fleet``) whose children are the regions' runs (:class:`MLflowFleetTracker`); the parent
    gets the fleet's summary (regions done, seconds, mean best χ² sum, ``summary.json``) and ends
    with its status. Returns (the summary, the parent run)."""
    out = Path(cfg.out_dir).resolve()
    iterations = cfg.train.iterations
    parent = TrackedRun(f"fleet/{cfg.model}", campaign, out / "_fleet", uri=uri,
                        params={"model": cfg.model, "n_regions": len(cfg.regions), "workers": num_workers,
                                "train": asdict(cfg.train), "overrides": cfg.overrides, "bank_size": cfg.bank_size},
                        tags={"calozoo.fleet": "true", "calozoo.campaign": campaign})
    tracker = MLflowFleetTracker(campaign, parent.uri, parent.run_id, plots,
                                 params={"train": asdict(cfg.train),
                                         "fleet": {"bank_size": cfg.bank_size, "rng": cfg.rng}})
    t0 = time.time()
    status, summary = "FAILED", None
    try:
        summary = run_fleet(cfg, num_workers, use_gpu, address, max_failures, threads_per_worker, tracker=tracker,
                            gpus_per_worker=gpus_per_worker)
        status = summary["status"]
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        # run_fleet writes its summary even when it fails: the parent gets what was trained
        path = out / "summary.json"
        if summary is None and path.exists() and path.stat().st_mtime >= t0:
            summary = json.loads(path.read_text())
        if summary is not None:
            _log_fleet_summary(parent, summary, path, iterations)
        parent.finish(status)
    return summary, parent


def _log_fleet_summary(parent: TrackedRun, summary: dict, path: Path, iterations: int) -> None:
    done = [b for b in summary["regions"].values() if b]
    parent.log_metrics({"regions_done": len(done), "seconds": summary["seconds"],
                        "mean_best_chi2_sum": (sum(b["metrics"]["chi2_sum"] for b in done) / len(done))
                        if done else float("nan")}, iterations)
    parent.log_artifact(path)


# -- sweeps ------------------------------------------------------------------------------------------
@dataclass
class MLflowSweepTracker:
    """A ``tune.sweep.SweepTracker``: each trial an MLflow run ``MODEL/TRIAL_ID`` of experiment
    ``campaign``, a child of ``parent_run_id``, with the model config and the trial's parameters as
    params and its validation metrics at every checkpoint. Pickled to the trials."""

    campaign: str
    uri: str | None = None
    parent_run_id: str | None = None

    def start_trial(self, trial_id: str, model: ShowerModel, params: dict,
                    run_dir: Path) -> tuple[Callable[[dict, int], None], Callable[[], object]]:
        run = TrackedRun(f"{model.variant}/{trial_id}", self.campaign, run_dir, uri=self.uri,
                         parent_run_id=self.parent_run_id, params={**model_params(model), "params": params},
                         tags={"calozoo.trial": trial_id, "calozoo.trial_params": trial_label(params)})
        return run.log_metrics, run.finish


def _sweep_parent_name(cfg: SweepConfig) -> str:
    return f"sweep/{cfg.model}/{cfg.mode}"


def run_tracked_sweep(cfg: SweepConfig, *, campaign: str = "sweeps", uri: str | None = None,
                      address: str | None = None) -> tuple[SweepResult, TrackedRun]:
    """``tune.sweep.run_sweep`` tracked in MLflow: a parent run ``sweep/MODEL/MODE`` (run folder
    ``OUT/_sweep``) whose children are the trials' runs (:class:`MLflowSweepTracker`); the parent
    gets the best trial (metric, tags, ``best.json``). Returns (the result, the parent run)."""
    parent = TrackedRun(_sweep_parent_name(cfg), campaign, Path(cfg.out_dir).resolve() / "_sweep", uri=uri,
                        params={"model": cfg.model, "mode": cfg.mode, "metric": cfg.metric,
                                "space": {k: json.dumps(v) for k, v in search_space(cfg).candidates().items()},
                                "train": asdict(cfg.train)},
                        tags={"calozoo.sweep": "true"})
    tracker = MLflowSweepTracker(campaign, parent.uri, parent.run_id)
    result = _parent_outcome(parent, lambda: run_sweep(cfg, address, tracker=tracker))
    _finish_sweep(parent, cfg, result)
    return result, parent


def resume_tracked_sweep(out_dir, *, uri: str | None = None,
                         address: str | None = None) -> tuple[SweepResult, TrackedRun | None]:
    """``tune.sweep.resume_sweep`` into the MLflow runs the sweep was tracked in (its parent run is
    found in ``OUT/_sweep``; the resumed trials log into their own runs); untracked (None for the
    parent run) if the sweep was not tracked."""
    out = check_resumable(out_dir)  # before anything is started or logged
    recorded = _recorded_run(out / "_sweep")
    if recorded is None:
        return resume_sweep(out, address), None
    cfg = load_config(out)
    parent = TrackedRun(_sweep_parent_name(cfg), recorded["experiment"], out / "_sweep",
                        uri=uri or recorded.get("tracking_uri"))
    tracker = MLflowSweepTracker(parent.experiment, parent.uri, parent.run_id)
    result = _parent_outcome(parent, lambda: resume_sweep(out, address, tracker=tracker))
    _finish_sweep(parent, cfg, result)
    return result, parent


def _recorded_run(run_dir: Path) -> dict | None:
    """The MLflow run a run folder was tracked in ({"experiment", "tracking_uri"?}), from its
    ``mlflow-run.json`` or, if the server was away when it started, its pending start; None if none."""
    if (run_dir / RUN_FILE).exists():
        return json.loads((run_dir / RUN_FILE).read_text())
    if (run_dir / PENDING).exists():
        for line in (run_dir / PENDING).read_text().splitlines():
            op = json.loads(line) if line.strip() else {}
            if op.get("op") == "start":
                return {"experiment": op["experiment"]}
    return None


def _finish_sweep(parent: TrackedRun, cfg: SweepConfig, result: SweepResult) -> None:
    best = result.best
    parent.log_metrics({f"best_{cfg.metric}": best["value"], "trials": len(result.trials),
                        "stopped_early": result.n_stopped_early, "seconds": result.seconds},
                       cfg.train.iterations)
    parent.set_tags({"best_trial": best["trial"], "best_params": trial_label(best["overrides"])})
    parent.log_artifact(Path(result.path) / "best.json")
    parent.finish()


# -- validation reports ------------------------------------------------------------------------------
def log_report(out_dir, *, run_id: str | None = None, experiment: str = "calozoo-validation",
               run_name: str | None = None, uri: str | None = None) -> str:
    """Log a validation report folder (``validate.report``) to MLflow: its headline figures as
    metrics (prefixed ``val_``), the folder as artifacts under ``validation/``. Into ``run_id`` if
    given (e.g. the model's training run), else a new run of ``experiment``. Returns the run id."""
    import mlflow

    out = Path(out_dir)
    metrics = json.loads((out / "metrics.json").read_text())
    with quick_http(retries=1, timeout=30):  # an unreachable server fails in seconds, not minutes
        client = get_client(uri)
        new = run_id is None
        if new:
            run_id = client.create_run(get_experiment_id(client, experiment), run_name=run_name or out.name).info.run_id
        ts = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(f"val_{k}", v, ts, 0)
                                          for k, v in metrics["headline"].items() if math.isfinite(v)])
        client.set_tag(run_id, "validation_reference", metrics["reference"])
        client.log_artifacts(run_id, str(out), "validation")
        if new:
            client.set_terminated(run_id)
    return run_id
