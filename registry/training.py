"""Training with MLflow tracking: the single-model trainer (``trainers.loop.train``) plus a
:class:`~registry.tracking.TrackedRun` that logs what the UI needs to tell a good model at a glance.

Logged: the model config, the training config and the data provenance as params; the losses and
the validation metrics at every checkpoint (step = iteration); at the end, the best checkpoint's
iteration and metrics as tags (FastCaloGAN's criterion), the kept checkpoints (at most five files)
as artifacts, and the validation plot of the best checkpoint (mean longitudinal and radial profiles
and E_tot/E_inc, generated against the validation showers).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from registry.tracking import TrackedRun
from trainers.checkpoint import CheckpointManager, load_checkpoint
from trainers.data import ShowerData
from trainers.loop import TrainConfig, TrainResult, train, validate
from zoo.base import ShowerModel, model_from_checkpoint

__all__ = ["run_name", "train_tracked", "best_tags", "validation_plot"]


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
    """The best kept checkpoint by FastCaloGAN's criterion, as run tags."""
    best = CheckpointManager(Path(run_dir) / "checkpoints").best()
    if best is None:
        return {}
    m = best["metrics"]
    return {"best_iteration": best["iteration"], "best_chi2_sum": f"{m['chi2_sum']:.6g}",
            "best_chi2_ndf": f"{m['chi2_ndf']:.6g}", "best_sep_power": f"{m['sep_power']:.6g}"}


def validation_plot(run_dir, val_data: ShowerData, title: str = "") -> Path | None:
    """Draw the best checkpoint's showers against the validation showers (``plots/validation.png``)."""
    from validate.plots import plot_comparison

    best = CheckpointManager(Path(run_dir) / "checkpoints").best()
    if best is None:
        return None
    model = model_from_checkpoint(load_checkpoint(Path(run_dir) / "checkpoints" / best["file"]))
    _, fake = validate(model, val_data)
    n = len(fake)
    return plot_comparison(fake, val_data.energy[:n], val_data.showers[:n], val_data.energy[:n], val_data.readout,
                           Path(run_dir) / "plots" / "validation.png",
                           title=title or f"{model.variant}, iteration {best['iteration']}")


def train_tracked(model: ShowerModel, train_data: ShowerData, val_data: ShowerData, cfg: TrainConfig, run_dir, *,
                  campaign: str, region: str = "all", uri: str | None = None, parent_run_id: str | None = None,
                  resume: bool = True, retry_after: float = 30.0) -> tuple[TrainResult, TrackedRun]:
    """Train ``model`` and track it in MLflow (experiment = ``campaign``); see the module docstring.

    Tracking never stops training: what cannot be logged is kept in the run folder (``run.pending()``).
    """
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
    run.set_tags(best_tags(run_dir))
    run.log_artifact(run_dir / "model.json")
    run.log_artifact(run_dir / "checkpoints", "checkpoints")
    png = validation_plot(run_dir, val_data, title=f"{run.name} ({campaign})")
    if png is not None:
        run.log_artifact(png, "plots")
    run.finish("FINISHED")
    return result, run
