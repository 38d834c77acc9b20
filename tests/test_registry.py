"""The registry against a real MLflow tracking store (a fresh sqlite store per test): tracking,
best epoch, ONNX export with metadata, the parity gate, registration, the champion alias, pulling
by name and generating with ONNX Runtime. The tests against a real `mlflow server` process are in
test_registry_server.py."""

import json
import os
import time

import mlflow
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from calozoo.cli import main
from calozoo.tracked import train_tracked
from registry import RegistryError, pull
from registry.publish import ParityError, parity_gate, publish
from registry.pull import ShowerGenerator, list_models
from registry.tracking import TrackedRun, fluent_uri, get_client
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
    assert pub.name == "test.r0" and pub.version == "1" and pub.champion
    # publishing leaves the process's default store as it was (MLflow's set_tracking_uri writes it
    # into os.environ)
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    assert pub.parity["ok"] and pub.parity["margin"] >= 1.0

    # the exported file carries what a consumer needs
    meta = {p.key: p.value for p in onnx.load(str(pub.onnx_path)).metadata_props}
    assert {"model", "readout", "transform", "conditions", "trained_range", "region", "calozoo_version"} <= set(meta)
    assert json.loads(meta["trained_range"])["energy_mev"] == [min(ENERGIES), max(ENERGIES)]
    assert meta["region"] == "r0" and json.loads(meta["readout"])["name"] == REGION.readout.name

    client = get_client(store)
    assert str(client.get_model_version_by_alias(pub.name, "champion").version) == "1"
    assert client.get_run(run.run_id).data.tags["registered_as"] == pub.name

    # the version says what it is and how good it is against held-out showers, beside their floor
    mv = client.get_model_version(pub.name, "1")
    assert (mv.tags["family"], mv.tags["model"], json.loads(mv.tags["config"])["batch_size"]) == \
        ("fastcalogan", "fastcalogan", 32)
    for figure in ("max_sep_power_etot_per_energy", "max_long_rel", "max_rad_rel", "fpd"):
        assert float(mv.tags[f"heldout.{figure}"]) >= 0 and float(mv.tags[f"heldout.floor.{figure}"]) >= 0
    assert "| largest difference of the mean longitudinal profile |" in mv.description
    logged = mv.source.rsplit("/", 1)[-1]  # models:/m-...: the logged model holding the version's files
    assert f"logged-models/{logged}/artifacts/files?artifact_file_path=extra_files/validation.png" in mv.description
    with fluent_uri(store):  # models:/ URIs resolve through the registry URI
        files = mlflow.artifacts.list_artifacts(artifact_uri=f"models:/{pub.name}/1/extra_files")
        sig = mlflow.models.get_model_info(f"models:/{pub.name}/1").signature  # its contract
    assert [f.path.split("/")[-1] for f in files] == ["validation.png"]
    assert [(t["name"], list(t["tensor-spec"]["shape"]), t["tensor-spec"]["dtype"]) for t in sig.inputs.to_dict()] == \
        [("noise", [-1, ShowerGenerator(pub.onnx_path).noise_dim], "float32"), ("conditions", [-1, 1], "float32")]
    assert [(t["name"], list(t["tensor-spec"]["shape"])) for t in sig.outputs.to_dict()] == [("showers", [-1, 368])]

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
    """Two stores (or one deleted and made again, as a rerun demo does) both hold test.r0
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
        publish(tmp_path / "run", rtol=0.0, factor=0.0)  # float32 rounding alone exceeds a zero tolerance
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
    with pytest.raises(ParityError, match="differs from the float64 torch model"):
        parity_gate(model, bad, {"energy_mev": [min(ENERGIES), max(ENERGIES)]})


def test_pull_errors_say_what_exists(split, store, tmp_path):
    pub = (train_run(split, tmp_path / "run", store), publish(tmp_path / "run"))[1]
    with pytest.raises(RegistryError, match=r"no registered model 'nope'.*test\.r0"):
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


def region_file(split, path):
    """The split's showers as one region's CaloChallenge file (campaign "cli", region "barrel-1")."""
    from showers.formats import CaloChallengeWriter

    tr, va = split
    with CaloChallengeWriter(path, tr.readout.n_voxels, {"readout": tr.readout, "region": "barrel-1",
                                                          "campaign": "cli"}) as w:
        w.append(np.concatenate([tr.energy, va.energy]), np.concatenate([tr.showers, va.showers]))
    return path


def test_cli_train_register_generate(split, store, tmp_path, monkeypatch):
    data = region_file(split, tmp_path / "data.h5")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    runner = CliRunner()
    res = runner.invoke(main, ["train", "fastcalogan", "--data", str(data), "-o", str(tmp_path / "run"),
                               "--iterations", "10", "--checkpoint-every", "10", "--min-val-per-energy", "30",
                               "--set", "batch_size=32", "--register"])
    assert res.exit_code == 0, res.output
    assert "MLflow run 'fastcalogan/barrel-1'" in res.output
    assert "registered cli.barrel-1 v1" in res.output and "@champion" in res.output
    out = tmp_path / "gen.h5"
    res = runner.invoke(main, ["generate", "cli.barrel-1@champion", "--energies", "4,16",
                               "-n", "25", "-o", str(out)])
    assert res.exit_code == 0, res.output
    e, x = read_calochallenge(out, validate=False)
    assert x.shape == (50, 368) and np.allclose(np.unique(e), [4000.0, 16000.0])
    res = runner.invoke(main, ["generate", "cli.barrel-1@champion", "--energies", "500", "-o", str(out)])
    assert res.exit_code != 0 and "outside the trained range" in res.output
    res = runner.invoke(main, ["generate", "cli.barrel-2", "--energies", "4", "-o", str(out)])
    assert res.exit_code != 0 and "registered models: cli.barrel-1" in res.output
    res = runner.invoke(main, ["models"])
    assert res.exit_code == 0 and "cli.barrel-1" in res.output and "champion: v1 fastcalogan" in res.output


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


def test_two_families_compete_for_one_region(split, store, tmp_path, monkeypatch):
    """The README's recipe of two families for one region, at a reduced size (a GAN and a VAE on one region's
    file, through the CLI): one name, CAMPAIGN.REGION, one version each; the better by the champion measure
    (the criterion on the same held-out showers) is @champion, a later and worse version of the other family
    does not take the alias; pull needs no family; `calozoo models` names the champion's family and figure;
    `calozoo promote` moves the alias by hand and records why, and pulls follow an alias however it moved."""
    data = region_file(split, tmp_path / "data.h5")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    runner = CliRunner()

    def train(model, out, iterations):
        res = runner.invoke(main, ["train", model, "--data", str(data), "-o", str(tmp_path / out), "--iterations",
                                   str(iterations), "--checkpoint-every", str(iterations), "--min-val-per-energy",
                                   "30", "--set", "batch_size=32", "--register"])
        assert res.exit_code == 0, res.output
        assert "registered cli.barrel-1 v" in res.output, res.output

    train("fastcalogan", "gan", 40)
    train("par04_vae_region", "vae", 40)
    client = get_client(store)
    versions = {str(v.version): v for v in client.search_model_versions("name = 'cli.barrel-1'")}
    assert sorted(v.tags["family"] for v in versions.values()) == ["fastcalogan", "par04_vae"]
    assert len({v.tags["selection_split"] for v in versions.values()}) == 1  # the same held-out showers
    measure = {k: float(v.tags["val_criterion"]) for k, v in versions.items()}
    best, worst = min(measure, key=measure.get), max(measure, key=measure.get)
    champ = client.get_model_version_by_alias("cli.barrel-1", "champion")
    assert str(champ.version) == best and measure[best] < measure[worst]
    loser = versions[worst].tags["model"]

    train(loser, "later", 10)  # the losing family again, shorter: worse than the champion
    later = client.get_model_version("cli.barrel-1", "3")
    assert later.tags["model"] == loser and float(later.tags["val_criterion"]) > measure[best]
    assert str(client.get_model_version_by_alias("cli.barrel-1", "champion").version) == best
    assert later.tags["champion_decision"].startswith(f"not champion: val criterion {float(later.tags['val_criterion']):.4g}")
    gen = pull("cli.barrel-1@champion", uri=store)
    assert gen.version == best and gen.metadata["family"] == versions[best].tags["family"]

    res = runner.invoke(main, ["models"])
    assert res.exit_code == 0 and f"champion: v{best} {versions[best].tags['family']}" in res.output, res.output
    assert f"val criterion {measure[best]:.4g}" in res.output and "families: fastcalogan, par04_vae" in res.output

    res = runner.invoke(main, ["promote", "cli.barrel-1", worst, "--reason", "better showers in the core"])
    assert res.exit_code == 0 and f"(was v{best})" in res.output, res.output
    decision = client.get_model_version("cli.barrel-1", worst).tags["champion_decision"]
    assert decision.startswith(f"promoted by hand from v{best}") and decision.endswith("better showers in the core")
    assert pull("cli.barrel-1@champion", uri=store).version == worst
    client.set_registered_model_alias("cli.barrel-1", "champion", "3")  # as the MLflow UI's alias editor does
    assert pull("cli.barrel-1@champion", uri=store).version == "3"
    res = runner.invoke(main, ["promote", "cli.barrel-1", "9", "--reason", "x"])
    assert res.exit_code != 0 and "cannot promote cli.barrel-1 v9" in res.output and "Traceback" not in res.output


def test_stores_of_the_former_naming_are_read(split, store, tmp_path):
    """A store written before models were registered per region holds CAMPAIGN.FAMILY.REGION: such a name is
    pulled and listed as it is, and a former name that the store does not hold points to the region's name."""
    train_run(split, tmp_path / "run", store)
    pub = publish(tmp_path / "run")
    client = get_client(store)
    v = client.get_model_version(pub.name, pub.version)
    client.create_registered_model("test.fastcalogan.r7")
    with fluent_uri(store):  # the registry reads the logged model through the fluent tracking URI
        old = client.create_model_version("test.fastcalogan.r7", v.source, run_id=v.run_id,
                                          model_id=v.source.rsplit("/", 1)[-1])
    client.set_registered_model_alias("test.fastcalogan.r7", "champion", old.version)
    assert pull("test.fastcalogan.r7@champion", uri=store).generate([8000.0]).shape == (1, 368)
    rows = {r["name"]: r for r in list_models(uri=store)}
    assert rows["test.fastcalogan.r7"]["legacy"] and rows["test.fastcalogan.r7"]["family"] == "fastcalogan"
    assert not rows["test.r0"]["legacy"] and rows["test.r0"]["family"] == "fastcalogan"
    with pytest.raises(RegistryError, match=r"registered per region now.*test\.r0@champion"):
        pull("test.fastcalogan.r0@champion", uri=store)
