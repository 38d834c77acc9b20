"""The registry against a real MLflow tracking store (a fresh sqlite store per test): tracking,
best epoch, ONNX export with metadata, the parity gate, registration, the champion alias, pulling
by name and generating with ONNX Runtime. The tests against a real `mlflow server` process are in
test_registry_server.py."""

import json
import os
import time

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from calozoo.cli import main
from calozoo.tracked import train_tracked
from registry import RegistryError, pull
from registry.publish import ParityError, parity_gate, publish
from registry.pull import ShowerGenerator
from registry.tracking import TrackedRun, get_client
from showers.detector import get_detector
from showers.formats import read_calochallenge
from zoo.checkpoint import CheckpointManager, load_checkpoint
from trainers.data import ShowerData, split_validation
from trainers.loop import TrainConfig
from zoo import model_from_checkpoint
from zoo.export import relative_difference
from zoo.fastcalogan import for_region
from .conftest import mlflow_store

ENERGIES = (4000.0, 16000.0, 64000.0)


REGION = get_detector("atlas-like").select(["photon_eta_020_025"])[0]  # 368 voxels


@pytest.fixture(scope="module")
def split():
    energies = np.repeat(ENERGIES, 100)
    x = REGION.simulator().simulate(energies, angle_deg=REGION.angle_deg, rng=np.random.default_rng(1))
    return split_validation(ShowerData(x, energies, REGION.readout, "simulated:photon_eta_020_025"), 0.3, 30, seed=0)


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("CALOZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return mlflow_store(tmp_path / "mlflow.db")


def tiny_gan(seed: int = 0):
    # a fast learning rate: after tens of iterations the E_tot/E_inc criterion already tells models apart
    torch.manual_seed(seed)
    return for_region(REGION, batch_size=32, learning_rate=1e-3)


def train_run(split, run_dir, uri, seed=0, iterations=20, region="r0", every=10, **kw):
    tr, va = split
    cfg = TrainConfig(iterations=iterations, checkpoint_every=every, seed=seed, progress=False)
    return train_tracked(tiny_gan(seed), tr, va, cfg, run_dir, campaign="test", region=region, uri=uri, **kw)


def test_tracked_run_logs_what_the_ui_needs(split, store, tmp_path):
    result, run = train_run(split, tmp_path / "run", store)
    assert run.ok and run.pending() == []
    client = get_client(store)
    r = client.get_run(run.run_id)
    assert r.info.run_name == "fastcalogan/r0" and r.info.status == "FINISHED"
    assert r.data.params["model.family"] == "fastcalogan"
    assert r.data.params["config.readout"] == REGION.readout.name
    assert r.data.params["data.train.source"] == "simulated:photon_eta_020_025"
    steps = [m.step for m in client.get_metric_history(run.run_id, "chi2_sum")]
    assert steps == [10, 20]
    assert len(client.get_metric_history(run.run_id, "critic_loss")) == 2
    best = CheckpointManager(tmp_path / "run" / "checkpoints").best()
    assert r.data.tags["best_iteration"] == str(best["iteration"])
    arts = {a.path for a in client.list_artifacts(run.run_id)}
    assert {"checkpoints", "plots", "model.json"} <= arts
    assert [a.path for a in client.list_artifacts(run.run_id, "plots")] == ["plots/validation.png"]
    ckpts = [a.path for a in client.list_artifacts(run.run_id, "checkpoints") if a.path.endswith(".pt")]
    assert 1 <= len(ckpts) <= 5


def test_register_pull_generate_matches_torch(split, store, tmp_path):
    _, run = train_run(split, tmp_path / "run", store)
    pub = publish(tmp_path / "run")
    assert pub.name == "test.fastcalogan.r0" and pub.version == "1" and pub.champion
    # publishing leaves the process's default store as it was (MLflow's set_tracking_uri writes it
    # into os.environ)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert pub.parity["max_rel_diff"] <= 1e-4

    # the exported file carries what a consumer needs
    meta = {p.key: p.value for p in onnx.load(str(pub.onnx_path)).metadata_props}
    assert {"model", "readout", "transform", "conditions", "trained_range", "region", "calozoo_version"} <= set(meta)
    assert json.loads(meta["trained_range"])["energy_mev"] == [min(ENERGIES), max(ENERGIES)]
    assert meta["region"] == "r0" and json.loads(meta["readout"])["name"] == REGION.readout.name

    client = get_client(store)
    assert str(client.get_model_version_by_alias(pub.name, "champion").version) == "1"
    assert client.get_run(run.run_id).data.tags["registered_as"] == pub.name

    # registering the same run again makes no new version
    again = publish(tmp_path / "run")
    assert again.existing and again.version == "1"
    assert len(client.search_model_versions(f"name = '{pub.name}'")) == 1

    gen = pull(f"{pub.name}@champion", uri=store)
    assert gen.n_voxels == 368 and gen.version == "1"
    energies = np.array([4000.0, 9000.0, 30000.0, 64000.0] * 5)
    noise = np.random.default_rng(3).standard_normal((len(energies), gen.noise_dim), dtype=np.float32)
    onnx_out = gen.generate(energies, noise=noise)
    best = CheckpointManager(tmp_path / "run" / "checkpoints").best()
    model = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "checkpoints" / best["file"])).eval()
    torch_out = model.sample(energies, noise=torch.from_numpy(noise)).numpy()
    assert relative_difference(onnx_out, torch_out) <= 1e-4

    # seeded, and independent of the batch size
    a = gen.generate(energies, seed=7, batch_size=3)
    b = gen.generate(energies, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, gen.generate(energies, seed=8))

    # a version pin works from the cache alone (no tracking store at all)
    t0 = time.perf_counter()
    cached = pull(f"{pub.name}@1", uri="http://127.0.0.1:9")
    assert time.perf_counter() - t0 < 5
    np.testing.assert_array_equal(cached.generate(energies, seed=7), a)


def test_a_recreated_store_with_the_same_names_is_not_served_from_the_cache(split, store, tmp_path):
    """Two stores (or one deleted and made again, as a rerun demo does) both hold test.fastcalogan.r0
    v1; pulling @champion from the second must not return the first one's cached file."""
    energies = np.array([4000.0, 64000.0] * 4)
    outputs = []
    for i, seed in enumerate((0, 1)):
        uri = mlflow_store(tmp_path / f"store{i}.db")
        train_run(split, tmp_path / f"run{i}", uri, seed=seed)
        pub = publish(tmp_path / f"run{i}", uri=uri)
        assert pub.version == "1"
        gen = pull(f"{pub.name}@champion", uri=uri)
        own = ShowerGenerator(pub.onnx_path).generate(energies, seed=5)
        np.testing.assert_array_equal(gen.generate(energies, seed=5), own)
        outputs.append(own)
    assert not np.array_equal(outputs[0], outputs[1])


def test_champion_moves_only_when_beaten(split, store, tmp_path):
    runs = {}
    for seed in (0, 1):
        train_run(split, tmp_path / f"run{seed}", store, seed=seed, iterations=40, every=20)
        runs[seed] = CheckpointManager(tmp_path / f"run{seed}" / "checkpoints").best()["metrics"]["criterion"]
    assert runs[0] != runs[1], "the two seeds should give different models"
    worse, better = sorted(runs, key=runs.get, reverse=True)
    first = publish(tmp_path / f"run{worse}")
    assert first.champion and first.decision == "first version"
    second = publish(tmp_path / f"run{better}")
    assert second.champion and second.decision.startswith("beats v1")
    # the same model as the champion again does not beat it: registered, not crowned, reason tagged
    train_run(split, tmp_path / "run-again", store, seed=better, iterations=40, every=20)
    third = publish(tmp_path / "run-again")
    assert third.version == "3" and not third.champion
    client = get_client(store)
    assert str(client.get_model_version_by_alias(first.name, "champion").version) == "2"
    assert client.get_model_version(first.name, "3").tags["champion_decision"].startswith("not champion")
    # pulls follow the alias
    assert pull(f"{first.name}@champion", uri=store).version == "2"
    assert pull(first.name, uri=store).version == "2"
    assert pull(f"{first.name}/3", uri=store).version == "3"


def test_parity_gate_refuses_a_model_that_onnx_does_not_reproduce(split, store, tmp_path):
    train_run(split, tmp_path / "run", store)
    with pytest.raises(ParityError, match="not registered"):
        publish(tmp_path / "run", rtol=0.0)  # float32 rounding alone exceeds a zero tolerance
    assert get_client(store).search_registered_models() == []

    pub = publish(tmp_path / "run")
    model = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "checkpoints" /
                                                  CheckpointManager(tmp_path / "run" / "checkpoints").best()["file"]))
    proto = onnx.load(str(pub.onnx_path))
    init = max(proto.graph.initializer, key=lambda t: len(t.raw_data))  # a weight matrix
    w = onnx.numpy_helper.to_array(init) * np.float32(1.001)  # 0.1 %, ten times the tolerance
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    bad = tmp_path / "tampered.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(ParityError, match="differs from torch"):
        parity_gate(model, bad, {"energy_mev": [min(ENERGIES), max(ENERGIES)]})


def test_pull_errors_say_what_exists(split, store, tmp_path):
    pub = (train_run(split, tmp_path / "run", store), publish(tmp_path / "run"))[1]
    with pytest.raises(RegistryError, match=r"no registered model 'nope'.*test\.fastcalogan\.r0"):
        pull("nope@champion", uri=store)
    with pytest.raises(RegistryError, match=r"no alias @staging.*@champion \(v1\)"):
        pull(f"{pub.name}@staging", uri=store)
    with pytest.raises(RegistryError, match="no version 7; versions: 1"):
        pull(f"{pub.name}@7", uri=store)

    gen = pull(f"{pub.name}@champion", uri=store)
    with pytest.raises(ValueError, match=r"energy 100-200 GeV outside the trained range 4-64 GeV.*allow_extrapolation"):
        gen.generate([100e3, 200e3])
    assert gen.generate([100e3, 2e3], allow_extrapolation=True).shape == (2, 368)

    # offline, and with the registry gone, the remembered champion comes from the cache
    assert pull(f"{pub.name}@champion", offline=True).version == "1"
    t0 = time.perf_counter()
    assert pull(f"{pub.name}@champion", uri="http://127.0.0.1:9").version == "1"
    assert time.perf_counter() - t0 < 15
    with pytest.raises(RegistryError, match="never pulled here"):
        pull(f"{pub.name}@other", offline=True)

    # a corrupted cached file is noticed (checksum) and pulled again
    cached = gen.path
    cached.write_bytes(b"garbage")
    assert pull(f"{pub.name}@champion", uri=store).generate([8000.0]).shape == (1, 368)

    # a missing artifact in the store: one line naming the model, version and source
    import shutil

    shutil.rmtree(cached.parent)
    shutil.rmtree(tmp_path / "mlartifacts")
    with pytest.raises(RegistryError, match=rf"{pub.name} v1: its artifact .* is missing or unreadable"):
        pull(f"{pub.name}@champion", uri=store)


def test_cli_train_register_generate(split, store, tmp_path, monkeypatch):
    from showers.formats import CaloChallengeWriter

    tr, _ = split
    data = tmp_path / "data.h5"
    with CaloChallengeWriter(data, tr.readout.n_voxels, {"readout": tr.readout, "region": "barrel-1",
                                                          "campaign": "cli"}) as w:
        w.append(np.concatenate([tr.energy, split[1].energy]), np.concatenate([tr.showers, split[1].showers]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    runner = CliRunner()
    res = runner.invoke(main, ["train", "fastcalogan", "--data", str(data), "-o", str(tmp_path / "run"),
                               "--iterations", "10", "--checkpoint-every", "10", "--min-val-per-energy", "30",
                               "--set", "batch_size=32", "--register"])
    assert res.exit_code == 0, res.output
    assert "MLflow run 'fastcalogan/barrel-1'" in res.output
    assert "registered cli.fastcalogan.barrel-1 v1" in res.output and "@champion" in res.output
    out = tmp_path / "gen.h5"
    res = runner.invoke(main, ["generate", "cli.fastcalogan.barrel-1@champion", "--energies", "4,16",
                               "-n", "25", "-o", str(out)])
    assert res.exit_code == 0, res.output
    e, x = read_calochallenge(out, validate=False)
    assert x.shape == (50, 368) and np.allclose(np.unique(e), [4000.0, 16000.0])
    res = runner.invoke(main, ["generate", "cli.fastcalogan.barrel-1@champion", "--energies", "500", "-o", str(out)])
    assert res.exit_code != 0 and "outside the trained range" in res.output
    res = runner.invoke(main, ["generate", "cli.fastcalogan.barrel-2", "--energies", "4", "-o", str(out)])
    assert res.exit_code != 0 and "registered models: cli.fastcalogan.barrel-1" in res.output
    res = runner.invoke(main, ["models"])
    assert res.exit_code == 0 and "cli.fastcalogan.barrel-1" in res.output and "champion: v1" in res.output


def test_fleet_or_sweep_runs_are_children_of_a_parent(store, tmp_path):
    parent = TrackedRun("fleet/fastcalogan", "nesting", tmp_path / "parent", uri=store)
    child = TrackedRun("fastcalogan/r7", "nesting", tmp_path / "child", uri=store, parent_run_id=parent.run_id,
                       params={"config": {"latent_dim": 50, "widths": [50, 100]}})
    child.log_metrics({"chi2_sum": 3.0, "iteration": 10}, 10)
    assert child.finish() == [] and parent.finish() == []
    client = get_client(store)
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.params == {"config.latent_dim": "50", "config.widths": "[50, 100]"}
    assert "iteration" not in run.data.metrics and run.data.metrics["chi2_sum"] == 3.0
    # a resumed run (same folder, same name) logs into the same MLflow run
    again = TrackedRun("fastcalogan/r7", "nesting", tmp_path / "child", uri=store, parent_run_id=parent.run_id)
    assert again.run_id == child.run_id
    again.finish()
