"""The CLI says one thing one way: every command's options checked against the shared vocabulary, the
former spellings still accepted (hidden), and `calozoo export` / `calozoo models --variants`."""

import hashlib
import json

import click
import numpy as np
import pytest
from click.testing import CliRunner

from calozoo.cli import SECTIONS, _device_options, main

MLFLOW = {"train", "fleet", "tune", "register", "models", "promote", "generate", "export", "validate",
          "validate-fleet", "demo", "mlflow-sync"}
DEVICES = {"train", "fleet", "tune", "validate", "validate-fleet"}
GPU_COUNTS = {"fleet", "tune"}
FORMER = {"--threads", "--gpu", "--cpus-per-worker", "--gpus-per-trial", "--cpus-per-trial", "--family"}


def _visible(cmd) -> set[str]:
    return {o for p in cmd.params if isinstance(p, click.Option) and not p.hidden for o in p.opts}


def test_every_command_speaks_the_shared_vocabulary():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    listed = [line.split()[0] for line in top.output.splitlines() if line.startswith("  ") and
              line.split()[0] in main.commands]
    assert listed == [n for _, names in SECTIONS for n in names] and set(listed) == set(main.commands)
    width = max(map(len, main.commands))
    for name, cmd in main.commands.items():
        assert cmd.short_help and f"  {name.ljust(width)}  {cmd.short_help}\n" in top.output, name  # whole, one line
        res = runner.invoke(main, [name, "--help"])
        assert res.exit_code == 0, res.output
        opts = _visible(cmd)
        assert ("--tracking-uri" in opts) == (name in MLFLOW), name
        assert {"--device", "--cpus"} <= opts if name in DEVICES else not opts & {"--device", "--cpus"}, name
        assert ("--gpus" in opts) == (name in GPU_COUNTS), name
        assert not opts & FORMER, (name, opts & FORMER)
        assert not any(f"{old} " in res.output or f"{old}\n" in res.output for old in FORMER), name
        for p in cmd.params:
            if "-o" in getattr(p, "opts", ()):
                assert p.required or str(p.default or "").startswith("out/") or "(default: out/" in p.help, name
    assert "tune [OPTIONS] [MODEL]\n" in runner.invoke(main, ["tune", "--help"]).output
    assert "validate-fleet [OPTIONS] CAMPAIGN [MODEL]\n" in runner.invoke(main, ["validate-fleet", "--help"]).output


def test_former_spellings_stand_for_the_new_options():
    """The hidden former spellings give what the new ones give; both at once is refused by name."""
    def probe(kind):
        @click.command()
        @_device_options(kind)
        def cmd(devices):
            click.echo(f"{devices.device} {devices.cpus:g} {devices.gpus:g}")
        return cmd

    runner = CliRunner()
    for kind, old, new in (("tune", ["--cpus-per-trial", "2", "--gpus-per-trial", "0.5"], ["--cpus", "2", "--gpus", "0.5"]),
                           ("fleet", ["--gpu", "--cpus-per-worker", "3"], ["--device", "cuda", "--cpus", "3"]),
                           ("train", ["--threads", "2"], ["--cpus", "2"]),
                           ("validate", ["--gpu", "--threads", "1"], ["--device", "cuda", "--cpus", "1"])):
        a, b = runner.invoke(probe(kind), old), runner.invoke(probe(kind), new)
        assert a.exit_code == 0 and a.output == b.output, (kind, a.output, b.output)
    assert runner.invoke(probe("tune"), ["--gpus-per-trial", "0.5"]).output == "cuda 1 0.5\n"
    both = runner.invoke(probe("train"), ["--threads", "2", "--cpus", "2"])
    assert both.exit_code == 2 and "--threads is the former spelling of --cpus" in both.output
    wrong = runner.invoke(probe("fleet"), ["--device", "cuda:1"])
    assert wrong.exit_code == 2 and "--device cuda" in wrong.output


@pytest.fixture
def reference(tmp_path):
    """A held-out reference for the registered model's region, named like its registered region (r0)."""
    from showers.detector import get_detector
    from showers.formats import write_calochallenge

    region = get_detector("atlas-like").select(["photon_eta_020_025"])[0]
    e = np.repeat([4096.0, 16384.0], 30)
    x = region.simulator().simulate(e, angle_deg=region.angle_deg, rng=np.random.default_rng(3))
    (tmp_path / "ref").mkdir()
    write_calochallenge(tmp_path / "ref" / "r0.h5", e, x, {"readout": region.readout})
    return tmp_path / "ref"


def test_validate_fleet_takes_campaign_and_model_and_its_former_spellings(registered, reference, tmp_path,
                                                                          monkeypatch):
    _, uri, _ = registered
    monkeypatch.setenv("CALOZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")  # restored after --tracking-uri
    common = ["--reference", str(reference), "--classifier", "none", "--no-per-layer", "--no-distances",
              "--no-floor", "--tracking-uri", uri]
    runner = CliRunner()
    new = runner.invoke(main, ["validate-fleet", "layering", "fastcalogan", *common, "-o", str(tmp_path / "new"),
                               "--cpus", "1"])
    old = runner.invoke(main, ["validate-fleet", "--campaign", "layering", "--family", "fastcalogan", *common,
                               "-o", str(tmp_path / "old"), "--threads", "1"])
    assert "layering.fastcalogan.r0@champion" in new.output and new.exit_code in (0, 1), new.output
    assert (old.exit_code, (tmp_path / "old" / "summary.csv").read_text()) == \
        (new.exit_code, (tmp_path / "new" / "summary.csv").read_text())
    bad = runner.invoke(main, ["validate-fleet", "layering", *common, "--fail", "auc<=0.6"])
    assert bad.exit_code == 2 and "unknown metric 'auc'" in bad.output and "auc_low" in bad.output


def test_export_writes_a_folder_that_plain_onnxruntime_runs(registered, tmp_path, monkeypatch):
    import onnxruntime as ort

    from registry.pull import ShowerGenerator

    path, uri, n_voxels = registered
    monkeypatch.setenv("CALOZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["export", "layering.fastcalogan.r0@1", "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out" / "export" / "layering.fastcalogan.r0"
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "contract.json", "model.onnx"]
    c = json.loads((out / "contract.json").read_text())
    assert (c["registered_name"], c["version"], c["family"], c["model"]) == \
        ("layering.fastcalogan.r0", "1", "fastcalogan", "fastcalogan")
    assert c["sha256"] == hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [(i["name"], "tensor(float)") for i in c["inputs"]]
    assert c["outputs"][0]["shape"] == ["N", n_voxels] and c["outputs"][0]["unit"] == "MeV"
    # README.txt's snippet, as written, from the folder: the contract's encoding is the model's own
    code = "\n".join(line[4:] for line in (out / "README.txt").read_text().splitlines() if line.startswith("    "))
    monkeypatch.chdir(out)
    ns = {}
    exec(code, ns)
    gen = ShowerGenerator(path)
    np.testing.assert_allclose(ns["conditions"], gen.encode(ns["E_mev"]), rtol=1e-6)
    assert ns["showers"].shape == (len(ns["E_mev"]), n_voxels)
    np.testing.assert_allclose(ns["showers"], gen.generate(ns["E_mev"], noise=ns["noise"]), rtol=1e-5, atol=1e-6)


def test_a_commands_tracking_uri_wins_over_the_groups(registered, tmp_path, monkeypatch):
    from tests.conftest import mlflow_store

    _, uri, _ = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    empty = mlflow_store(tmp_path / "empty.db")
    res = CliRunner().invoke(main, ["--tracking-uri", empty, "models", "--tracking-uri", uri])
    assert res.exit_code == 0 and "layering.fastcalogan.r0" in res.output, res.output


def test_models_lists_the_zoos_variants_without_mlflow(monkeypatch):
    from zoo import list_models

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    res = CliRunner().invoke(main, ["models", "--variants"])
    assert res.exit_code == 0, res.output
    rows = {line.split()[0]: line.split() for line in res.output.splitlines()[1:]}
    assert sorted(rows) == list_models()
    assert rows["flow_matching_pbwo4"][1:3] == ["flow_matching", "g4-pbwo4"]
