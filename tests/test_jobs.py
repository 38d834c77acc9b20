"""`ray job submit` of a fleet to a Ray head started on loopback (`ray start --head`), through the job
submission API, as the README shows it; the model it trained is then on disk."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zoo.checkpoint import CheckpointManager, load_checkpoint

from .test_fleet import campaign  # noqa: F401 (a fixture)
from .test_registry_server import free_port

pytestmark = pytest.mark.ray

REPO = Path(__file__).parents[1]


@pytest.fixture
def ray_head(tmp_path):
    import ray as ray_module

    # `ray stop` below ends every Ray process of the machine: the one this process may hold, and any other
    # test's (the tests marked ray run one after another in one test process: tests/conftest.py)
    ray_module.shutdown()
    ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    port, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([ray, "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
                    "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    "--include-dashboard=true", "--disable-usage-stats"], check=True, env=env,
                   capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.timeout(600)
def test_fleet_as_a_ray_job(ray_head, campaign, tmp_path):  # noqa: F811
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = None
    for _ in range(60):  # the dashboard's job API comes up a little after `ray start` returns
        try:
            client = JobSubmissionClient(ray_head)
            break
        except Exception:
            time.sleep(1)
    assert client is not None
    out = tmp_path / "fleet"
    entrypoint = (f"{sys.executable} -m calozoo fleet fastcalogan --data {campaign} --out {out} --workers 1 "
                  "--regions 'photon_*' --iterations 10 --checkpoint-every 10 --min-val-per-energy 15 "
                  "--set batch_size=16 --set n_critic=2 --no-mlflow")
    job = client.submit_job(entrypoint=entrypoint,
                            runtime_env={"working_dir": str(REPO),
                                         "excludes": [".venv", ".git", "out", "test-artifacts", "mlartifacts",
                                                      "mlflow.db", "*.h5"],
                                         "env_vars": {"RAY_AUTH_MODE": "disabled"}})
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        status = client.get_job_status(job)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            break
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "2/2 regions trained" in logs
    for region in ("photon_eta_020_025", "photon_eta_100_105"):
        latest = CheckpointManager(out / region / "checkpoints").latest()
        state = load_checkpoint(latest)
        assert state["iteration"] == 10 and state["family"] == "fastcalogan"
