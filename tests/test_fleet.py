"""The fleet on a real Ray runtime: a 2-worker fleet of a few regions on a simulated cluster, with the
node of one worker removed mid-run (every region finishes, and the lost worker's regions resumed from
their checkpoints instead of restarting), tracked in MLflow; a fleet of FAST.AR models on a local
Ray, which trains as a bank like every family; a fleet's registration, exported and gated in parallel."""

import dataclasses
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from showers.campaign import CampaignSpec, run_campaign
from showers.detector import get_detector
from zoo.checkpoint import CheckpointManager
from calozoo.tracked import MLflowFleetTracker, run_tracked_fleet
from showers.campaign import list_regions
from trainers.data import DataSplit
from trainers.fleet import FleetConfig, assign_regions, run_fleet, train_share
from trainers.loop import TrainConfig
from .conftest import mlflow_store

ITERATIONS, EVERY = 40, 10


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    out = tmp_path_factory.mktemp("campaign")
    regions = get_detector("atlas-like").select(["photon_eta_020_025", "photon_eta_100_105", "pion_eta_020_025",
                                                 "electron_eta_200_205"])
    run_campaign(regions, out, CampaignSpec((8192.0, 65536.0), 60, seed=3), use_ray=False, progress=False)
    return out


def fleet_config(data_dir, out, **kw) -> FleetConfig:
    return FleetConfig(model="fastcalogan", data_dir=str(data_dir), out_dir=str(out),
                       regions=list_regions(data_dir), split=DataSplit(min_per_energy=15), bank_size=2,
                       train=TrainConfig(iterations=ITERATIONS, checkpoint_every=EVERY, progress=False, n_val_max=50),
                       overrides={"batch_size": 16, "n_critic": 2, "learning_rate": 1e-3}, **kw)


def test_assign_regions_balances_cost():
    costs = {"a": 10, "b": 9, "c": 5, "d": 4, "e": 1}
    shares = assign_regions(costs, 2)
    loads = sorted(sum(costs[r] for r in s) for s in shares)
    assert loads == [14, 15] and sorted(sum(shares, [])) == sorted(costs)


def starts(run_dir: Path) -> list[int]:
    text = (run_dir / "fleet.log").read_text()
    return [int(m) for m in re.findall(r"start iteration=(\d+)", text)]


def kill_when_checkpointed(out: Path, regions, kill, timeout=300.0):
    """Once every region has a checkpoint, kill worker 1 (the process, or its node)."""
    def run():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [r for r in regions if CheckpointManager(out / r / "checkpoints").latest() is not None]
            if len(done) == len(regions):
                kill()
                return
            time.sleep(0.2)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def assert_all_finished_and_resumed(out: Path, regions):
    """Every region reached the last iteration with at most 5 checkpoint files and started from scratch
    once. A worker trains its banks one after another (one voxel count each), so when the failure
    came (once every region had a checkpoint) its earlier banks had finished, and are skipped after
    it; the regions still training then resumed from their checkpoints: at least those of one bank."""
    resumed = 0
    for r in regions:
        latest = CheckpointManager(out / r / "checkpoints").latest()
        assert latest is not None and latest.name == f"ckpt-{ITERATIONS:09d}.pt", r
        assert len(list((out / r / "checkpoints").glob("*.pt"))) <= 5
        s = starts(out / r)
        assert s[0] == 0 and all(x > 0 for x in s[1:]), f"{r} restarted from scratch: starts {s}"
        assert s == sorted(s), f"{r} went back: starts {s}"
        if len(s) == 1:
            assert "done iteration=" in (out / r / "fleet.log").read_text(), r
        resumed += len(s) > 1
    assert resumed >= 1, "no region resumed after the failure"


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_fleet_survives_losing_a_node(campaign, tmp_path, monkeypatch):
    """A node that goes takes its worker process with it (the harder case of a killed worker): every
    region finishes, those of the lost worker resumed from their checkpoints; the fleet is tracked,
    every region's MLflow run a child of the fleet's."""
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path / "mlflow.db"))
    ray.shutdown()  # a driver joins one Ray: not the session's (conftest.local_ray), this cluster
    # a head that trains nothing and three one-CPU nodes for two workers: the spare takes the place
    # of the node that goes (an autoscaler's replacement; Cluster.add_node needs the main thread)
    # the GCS declares a node that stopped answering dead after 1 s instead of Ray's default 15 s (3 s x 5)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2}})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    out = tmp_path / "fleet"
    cfg = fleet_config(campaign, out)
    try:
        ray.init(address=cluster.address, log_to_driver=False)

        def kill():
            node_id = (out / "_workers" / "rank1.node").read_text()
            victim = next(n for n in nodes if n.node_id == node_id)
            cluster.remove_node(victim)

        watcher = kill_when_checkpointed(out, cfg.regions, kill)
        summary, parent_run = run_tracked_fleet(cfg, campaign="fleet-test", plots=False, num_workers=2,
                                                max_failures=2, address=cluster.address)
        watcher.join(1)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert sorted(sum(summary["shares"], [])) == sorted(cfg.regions)
    assert_all_finished_and_resumed(out, cfg.regions)
    from registry.tracking import get_client

    client = get_client(os.environ["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("fleet-test")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.info.run_name == "fleet/fastcalogan"]
    assert len(parent) == 1 and parent[0].info.run_id == parent_run.run_id
    assert parent[0].info.status == "FINISHED"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert children == {f"fastcalogan/{r}" for r in cfg.regions}


class DiesBeforeTheEnd(MLflowFleetTracker):
    """A worker that dies as its second region ends: after its last checkpoint, before its run ends."""

    ended = 0

    def finish_region(self, region, run_dir, val):
        self.ended += 1
        if self.ended == 2:
            raise SystemExit(f"worker lost while ending {region}")
        super().finish_region(region, run_dir, val)


def test_a_region_whose_worker_died_as_it_ended_is_ended_on_resume(campaign, tmp_path):
    """The race a node loss can hit (seen in CI): the last checkpoint is on disk, but the run's end (its
    tracked run, its log line) is not. The resumed worker ends that region, training nothing, and
    skips the one that had ended."""
    from registry.tracking import get_client

    uri = mlflow_store(tmp_path / "mlflow.db")
    regions = ["photon_eta_020_025", "pion_eta_020_025"]
    cfg = dataclasses.replace(fleet_config(campaign, tmp_path / "fleet"), bank_size=1)  # one region a bank
    with pytest.raises(SystemExit, match="worker lost"):
        train_share(cfg, regions, tracker=DiesBeforeTheEnd("race", uri))
    out = tmp_path / "fleet"
    ended = [r for r in regions if "done iteration=" in (out / r / "fleet.log").read_text()]
    assert len(ended) == 1
    [cut] = [r for r in regions if r not in ended]
    assert CheckpointManager(out / cut / "checkpoints").latest().name == f"ckpt-{ITERATIONS:09d}.pt"

    results = train_share(cfg, regions, tracker=MLflowFleetTracker("race", uri))
    assert sorted(results) == sorted(regions) and all(results[r] is not None for r in regions)
    assert starts(out / ended[0]) == [0]  # not touched again
    assert starts(out / cut) == [0, ITERATIONS]  # ended, not retrained
    assert (out / cut / "fleet.log").read_text().splitlines()[-1].split()[1:3] == ["done", f"iteration={ITERATIONS}"]
    client = get_client(uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert {r.info.run_name: r.info.status for r in runs} == {f"fastcalogan/{r}": "FINISHED" for r in regions}
    assert all("best_iteration" in r.data.tags for r in runs)
    # a third pass has nothing to do
    train_share(cfg, regions, tracker=MLflowFleetTracker("race", uri))
    assert starts(out / cut) == [0, ITERATIONS] and starts(out / ended[0]) == [0]


def test_list_regions_filters(campaign):
    assert list_regions(campaign, ["photon_*"]) == ["photon_eta_020_025", "photon_eta_100_105"]
    with pytest.raises(ValueError, match="no region"):
        list_regions(campaign, ["nothing*"])
    assert np.all([r.endswith(("025", "105", "205")) for r in list_regions(campaign)])


@pytest.fixture(scope="module")
def pbwo4_campaign(tmp_path_factory):
    """Two 'regions' on the Geant4 PbWO4 readout (regular: what FAST.AR needs), electrons and photons."""
    from showers.formats import CaloChallengeWriter
    from showers.simulator import ShowerSimulator

    out = tmp_path_factory.mktemp("pbwo4")
    energies = np.repeat([4096.0, 32768.0], 24)
    for j, particle in enumerate(("e-", "gamma")):
        x = ShowerSimulator("g4-pbwo4", medium="PbWO4", particle=particle).simulate(energies, seed=j)
        with CaloChallengeWriter(out / f"{particle}.h5", x.shape[1], {"readout": "g4-pbwo4"}) as w:
            w.append(energies, x)
    return out


@pytest.mark.timeout(600)
def test_fast_ar_fleet_on_ray_train(pbwo4_campaign, tmp_path, local_ray):
    """FAST.AR trains as a fleet like every family (no code of its own in trainers/)."""
    out = tmp_path / "fleet"
    cfg = FleetConfig(model="fast_ar", data_dir=str(pbwo4_campaign), out_dir=str(out),
                      regions=list_regions(pbwo4_campaign), split=DataSplit(min_per_energy=4), bank_size=2,
                      train=TrainConfig(iterations=4, checkpoint_every=2, progress=False, n_val_max=8),
                      overrides={"batch_size": 4, "width": 4, "n_conv": 1, "n_components": 2})
    summary = run_fleet(cfg, num_workers=1, max_failures=0)
    assert summary["status"] == "FINISHED"
    for r in cfg.regions:
        best = summary["regions"][r]
        assert best is not None and np.isfinite(best["metrics"]["chi2_sum"])
        assert CheckpointManager(out / r / "checkpoints").latest().name == "ckpt-000000004.pt"
        assert "bank=2 " in (out / r / "fleet.log").read_text()  # both regions shared one bank
        assert starts(out / r) == [0]


@pytest.mark.timeout(900)
def test_a_fleet_registers_in_parallel_with_the_same_checks(tmp_path):
    """A fleet's registration (publish_many): export and gate in a pool of 2 processes, MLflow calls in this
    one; every region registered under its own name, gated, @champion; registering again makes nothing new.
    In one process, the regions of one structure reuse an exported graph from the third on, gated alike."""
    from registry.publish import publish_many
    from registry.tracking import get_client

    names = ["photon_eta_020_025", "photon_eta_025_030", "photon_eta_030_035"]  # one structure (368 voxels)
    data = tmp_path / "data"
    run_campaign(get_detector("atlas-like").select(names), data, CampaignSpec((8192.0, 65536.0), 60, seed=3),
                 use_ray=False, progress=False)
    uri = mlflow_store(tmp_path / "mlflow.db")
    cfg = dataclasses.replace(fleet_config(data, tmp_path / "fleet"), train=TrainConfig(
        iterations=EVERY, checkpoint_every=EVERY, progress=False, n_val_max=50))
    train_share(cfg, names, tracker=MLflowFleetTracker("reg", uri, plots=False))
    dirs = [tmp_path / "fleet" / n for n in names]

    pubs, failed = publish_many(dirs, uri=uri, workers=2)
    assert not failed and sorted(p.name for p in pubs) == [f"reg.{n}" for n in names]
    assert all(p.champion and p.parity["ok"] and p.parity["margin"] >= 1.0 for p in pubs)
    client = get_client(uri)
    assert all(client.get_model_version_by_alias(f"reg.{n}", "champion").tags["family"] == "fastcalogan"
               for n in names)
    again, failed = publish_many(dirs, uri=uri, workers=2)
    assert not failed and all(p.existing for p in again)

    pubs, failed = publish_many(dirs, campaign="one-process", uri=uri, workers=1)
    assert not failed and [p.export for p in pubs] == ["fresh", "fresh", "reused"]
    assert all(p.parity["ok"] for p in pubs)
