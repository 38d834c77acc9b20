"""Sweeps on a real local Ray runtime, logged to a real MLflow store through calozoo's tracker: ASHA
stops trials early, a grid runs every combination, the best config retrains to its reported metric,
and an interrupted sweep resumes without repeating finished trials."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calozoo.tracked import run_tracked_sweep
from showers.campaign import CampaignSpec, run_campaign
from showers.detector import get_detector
from tune.sweep import SweepConfig, resume_sweep, retrain_best
from .conftest import mlflow_store

TRIAL_ID = re.compile(r"^[0-9a-f]{5}_[0-9]{5}$")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    region = get_detector("atlas-like").select(["photon_eta_020_025"])
    run_campaign(region, out, CampaignSpec((8192.0, 65536.0), 60, seed=5), use_ray=False, progress=False)
    return out / "photon_eta_020_025.h5"


def sweep(data, out, **kw) -> SweepConfig:
    # train and split as dicts, the way sweep.json and the trials' configs carry them
    base = dict(model="fastcalogan", data=str(data), out_dir=str(out), only_given=True, split={"min_per_energy": 15},
                train={"iterations": 40, "checkpoint_every": 10})
    return SweepConfig(**{**base, **kw})


def run_tracked(cfg: SweepConfig, uri: str):
    result, parent = run_tracked_sweep(cfg, campaign="tune-test", uri=uri)
    assert parent.ok and parent.pending() == []
    return result


def children_of(uri, parent_name):
    from registry.tracking import get_client

    client = get_client(uri)
    exp = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_name == parent_name]
    assert len(parent) == 1
    return client, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]


@pytest.mark.timeout(600)
def test_asha_stops_bad_trials_and_the_best_retrains(data, local_ray, tmp_path):
    uri = mlflow_store(tmp_path / "mlflow.db")
    # etot_shift: after tens of iterations every model is still off the narrow E_tot peak, where the
    # chi2 sum is saturated (all trials tie and ASHA has nothing to cut)
    cfg = sweep(data, tmp_path / "asha", mode="asha", num_samples=6, max_concurrent=1, grace_period=1,
                reduction_factor=2, metric="etot_shift",
                space={"learning_rate": [1e-3, 3e-4, 1e-5], "n_critic": [1, 2], "batch_size": [16]})
    result = run_tracked(cfg, uri)
    assert len(result.trials) == 6
    assert result.n_stopped_early >= 1, result.trials  # ASHA cut some trials short
    assert any(t["iteration"] == 40 for t in result.trials)
    for t in result.trials:
        assert TRIAL_ID.match(t["trial"]), t["trial"]
        assert len(list((tmp_path / "asha" / "trials" / t["trial"] / "checkpoints").glob("*.pt"))) <= 5
    # MLflow: a parent run with one child per trial, each with its per-report metrics
    client, children = children_of(uri, "sweep/fastcalogan/asha")
    assert len(children) == 6
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "chi2_sum")]
        trial = child.data.tags["calozoo.trial"]
        assert steps == list(range(10, next(t["iteration"] for t in result.trials if t["trial"] == trial) + 1, 10))
    # best.json, and the best config trains again to the reported value
    best = json.loads((tmp_path / "asha" / "best.json").read_text())
    assert best["metric"] == "etot_shift" and best["value"] == min(t["etot_shift"] for t in result.trials)
    history = retrain_best(tmp_path / "asha", tmp_path / "retrain")
    assert history[-1]["iteration"] == best["iteration"]
    assert history[-1]["etot_shift"] == pytest.approx(best["value"], rel=1e-6)


def _finished(out: Path, iterations: int) -> list[str]:
    done = []
    for d in (out / "trials").glob("*"):
        index = d / "checkpoints" / "checkpoints.json"
        if index.exists() and any(e["iteration"] == iterations for e in json.loads(index.read_text())):
            done.append(d.name)
    return done


@pytest.mark.timeout(900)
def test_interrupted_sweep_resumes_without_repeating_finished_trials(data, local_ray, tmp_path):
    out = tmp_path / "sweep"
    cfg = sweep(data, out, mode="grid", max_concurrent=1,
                space={"learning_rate": [1e-3, 3e-4, 1e-4], "batch_size": [16], "n_critic": [1]},
                train={"iterations": 40, "checkpoint_every": 10})
    script = ("import json, sys; from tune.sweep import SweepConfig, run_sweep; "
              "run_sweep(SweepConfig(**json.loads(sys.argv[1])))")
    from dataclasses import asdict

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(asdict(cfg))], env=env,
                            cwd=Path(__file__).parents[1], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and len(_finished(out, 40)) < 1 and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(3)  # into the next trial
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: Tune saves its state and stops
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finished_before = _finished(out, 40)
    assert 1 <= len(finished_before) < 3, "the sweep should have been stopped mid-way"

    result = resume_sweep(out)  # on this process's Ray (the interrupted one had its own)
    assert len(result.trials) == 3 and all(t["iteration"] == 40 for t in result.trials)
    # a grid runs every combination, each to the end (ASHA's early stops are the other test's)
    assert sorted(t["params"]["learning_rate"] for t in result.trials) == [1e-4, 3e-4, 1e-3]
    assert result.n_stopped_early == 0
    for trial in finished_before:  # finished trials were not run again
        assert len((out / "trials" / trial / "starts.log").read_text().splitlines()) == 1


@pytest.mark.timeout(600)
def test_a_refused_sweep_starts_afresh_from_its_sweep_json(data, local_ray, tmp_path):
    """A sweep folder whose pickles calozoo did not sign is refused; `tune --from OLD/sweep.json` (plain
    JSON) runs its sweep again in a new folder, whose every pickle is signed and which resumes."""
    from dataclasses import asdict

    from click.testing import CliRunner

    from calozoo.cli import main
    from tune.signing import unsigned_pickles
    from tune.sweep import check_resumable

    old = tmp_path / "old"
    cfg = sweep(data, old, mode="grid", space={"learning_rate": [1e-3], "batch_size": [16], "n_critic": [1]},
                train={"iterations": 10, "checkpoint_every": 10})
    (old / "tune").mkdir(parents=True)
    (old / "sweep.json").write_text(json.dumps(asdict(cfg)))
    (old / "tune" / "tuner.pkl").write_bytes(b"\x80\x04N.")  # a pickle from elsewhere
    res = CliRunner().invoke(main, ["tune", "--resume", str(old), "--no-mlflow"])
    assert res.exit_code != 0 and f"--from {old / 'sweep.json'}" in res.output, res.output
    new = tmp_path / "new"
    res = CliRunner().invoke(main, ["tune", "--from", str(old / "sweep.json"), "-o", str(new), "--no-mlflow"])
    assert res.exit_code == 0, res.output
    best = json.loads((new / "best.json").read_text())
    assert best["overrides"]["learning_rate"] == 1e-3 and best["iteration"] == 10
    assert (new / "tune" / "tuner.pkl").exists() and unsigned_pickles(new) == []
    assert check_resumable(new) == new.resolve()
