"""The main job's reduced path: `calozoo demo --scale test` runs every stage of `make demo`
(simulate on Ray, ASHA sweep, fleet on Ray Train, registry, pull, generate, validate) on a tenth
of the work, with a real local Ray, a real MLflow store and real ONNX Runtime sessions."""

from __future__ import annotations

import json
import re

import h5py
import mlflow
import pytest
from click.testing import CliRunner

from calozoo.cli import main
from .conftest import mlflow_store

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_chain(tmp_path, monkeypatch, local_ray):  # on the session's Ray, as on any running Ray
    uri = mlflow_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CALOZOO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", "-o", str(out), "--scale", "test"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    for stage in ("[1/7] simulate", "[2/7] sweep", "[3/7] fleet", "[4/7] register", "[5/7] pull + generate",
                  "[6/7] validate", "[7/7] summary"):
        assert stage in r.output
    assert "MLflow UI:" in r.output and "report:" in r.output
    # the sweep says what its trials do, and the end says how the champions fare against the thresholds
    assert r.output.count("sweep: trial") >= 4 and "started" in r.output
    assert "threshold" in r.output and "of 2 champions pass the thresholds on held-out showers" in r.output

    result = json.loads((out / "demo.json").read_text())
    assert sorted(result["regions"]) == ["electron_eta_020_025", "photon_eta_020_025"]
    chosen = result["regions"][0]  # the region pulled back, generated and reported on
    # held-out reference files were simulated with another seed than the training files
    for region in result["regions"]:
        with h5py.File(out / "data" / "train" / f"{region}.h5") as a, \
                h5py.File(out / "data" / "reference" / f"{region}.h5") as b:
            assert a.attrs["seed"] != b.attrs["seed"]
    # the sweep's winner configured the fleet
    fleet = json.loads((out / "fleet" / "fleet.json").read_text())
    assert fleet["config"]["overrides"] == {k: v for k, v in result["sweep_best"].items()}
    # every region registered under its own name, each version @champion, the table saying which model won
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    for region in result["regions"]:
        mv = client.get_model_version_by_alias(f"calozoo-demo.{region}", "champion")
        assert str(mv.version) == "1" and mv.tags["family"] == "par04_vae"
        assert re.search(rf"{region}\s+v1 par04_vae_region\s+\d", r.output), r.output
        # the fleet table's figures against the held-out reference, beside its floor, on the version
        assert float(mv.tags["report.max_long_rel"]) >= 0 and float(mv.tags["report.floor.max_long_rel"]) >= 0
    assert result["champion"] == f"calozoo-demo.{chosen}@champion"
    assert 0.0 <= float(client.get_model_version(f"calozoo-demo.{chosen}", "1").tags["report.auc_low"]) <= 1.0
    # the validation report of the pulled model, and the fleet table
    report = out / "validation" / chosen
    for name in ("report.md", "metrics.json", "profiles.png", "features_etot_einc.png"):
        assert (report / name).stat().st_size > 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert 0.0 <= metrics["headline"]["auc_low"] <= 1.0 and metrics["n_gen"] == metrics["n_ref"] == 200
    summary = (out / "validation" / "fleet" / "summary.md").read_text()
    assert "electron_eta_020_025" in summary and "photon_eta_020_025" in summary
    # ... both logged to MLflow: the report into the champion's training run, the table into the fleet's
    run_id = json.loads((out / "fleet" / chosen / "mlflow-run.json").read_text())["run_id"]
    assert "val_auc_low" in client.get_run(run_id).data.metrics
    assert "validation/report.md" in {a.path for a in client.list_artifacts(run_id, "validation")}
    fleet_run = json.loads((out / "fleet" / "_fleet" / "mlflow-run.json").read_text())["run_id"]
    assert "validation/summary.md" in {a.path for a in client.list_artifacts(fleet_run, "validation")}

    # a second run into the same folder starts afresh; a folder that is not a demo's is refused
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    r = CliRunner().invoke(main, ["demo", "-o", str(tmp_path / "mine"), "--scale", "test"])
    assert r.exit_code != 0 and "not a calozoo demo folder" in r.output
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"
