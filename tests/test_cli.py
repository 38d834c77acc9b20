"""The `calozoo` command line, through click's runner (in-process) and as a real subprocess."""

import subprocess
import sys

import h5py
import numpy as np
from click.testing import CliRunner

from calozoo.cli import main


def test_help_on_every_subcommand():
    runner = CliRunner()
    for cmd in main.commands:
        res = runner.invoke(main, [cmd, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output, cmd


def test_simulate_then_show(tmp_path):
    runner = CliRunner()
    out = tmp_path / "data"
    res = runner.invoke(main, ["simulate", "--regions", "photon_eta_040_045", "--energies", "2,8", "-n", "20",
                               "-o", str(out), "--no-ray"])
    assert res.exit_code == 0, res.output
    path = out / "photon_eta_040_045.h5"
    with h5py.File(path) as f:
        assert f["showers"].shape == (40, 368)
    res = runner.invoke(main, ["simulate", "--regions", "photon_eta_040_045", "--energies", "2,8", "-n", "20",
                               "-o", str(out), "--no-ray"])
    assert "1 already done" in res.output
    res = runner.invoke(main, ["show", str(path), "-o", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_input_gives_one_line_errors(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["simulate", "--detector", "nope", "--no-ray", "-o", str(tmp_path)])
    assert res.exit_code != 0 and "unknown detector" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["incident_energies"] = np.ones((3, 1)) * 1000.0
    res = runner.invoke(main, ["show", str(bad)])
    assert res.exit_code != 0 and "bad.h5" in res.output and "showers" in res.output


def test_console_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "calozoo.cli", "catalogue"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "atlas-like" in res.stdout and "300 regions" in res.stdout


def test_voxelise_the_real_edm4hep_event(tmp_path):
    from pathlib import Path

    from showers.formats import read_calochallenge, read_edm4hep_hits

    event = Path(__file__).parent / "fixtures" / "caloclouds3_single_event_example.edm4hep.root"
    out = tmp_path / "event.h5"
    res = CliRunner().invoke(main, ["voxelise", str(event), "-o", str(out)])
    assert res.exit_code == 0, res.output
    e, x = read_calochallenge(out, validate=False)
    hits = read_edm4hep_hits(event, collections=["ECalBarrelSiHitsEven", "ECalBarrelSiHitsOdd"])
    assert e[0] == np.float64(hits["primary"]["kinetic_energy"])
    # all but the hits far from the axis land in voxels
    assert 0.99 * hits["energy"].sum() < x.sum() <= hits["energy"].sum() * (1 + 1e-9)


def test_train_each_family_from_the_cli_on_simulated_data(tmp_path):
    runner = CliRunner()
    data = tmp_path / "data"
    for detector, region in (("pbwo4", "electron_eta_000_005"), ("atlas-like", "photon_eta_020_025")):
        res = runner.invoke(main, ["simulate", "--detector", detector, "--regions", region, "--energies", "4,16,64",
                                   "-n", "40", "-o", str(data), "--no-ray"])
        assert res.exit_code == 0, res.output
    runs = [
        ("par04_vae_pbwo4", "electron_eta_000_005", []),
        ("fast_ar", "electron_eta_000_005", ["--set", "width=8", "--set", "n_conv=1", "--set", "n_components=2"]),
        ("fastcalogan", "photon_eta_020_025", ["--set", "batch_size=16"]),
    ]
    for model, region, extra in runs:
        out = tmp_path / model
        res = runner.invoke(main, ["train", model, "--data", str(data / f"{region}.h5"), "--iterations", "6",
                                   "--checkpoint-every", "3", "--min-val-per-energy", "10", "-o", str(out), *extra])
        assert res.exit_code == 0, res.output
        assert "best checkpoint: iteration" in res.output
        assert 1 <= len(list((out / "checkpoints").glob("*.pt"))) <= 5
    # a second call resumes: nothing left to do, the same best checkpoint
    res = runner.invoke(main, ["train", "par04_vae_pbwo4", "--data", str(data / "electron_eta_000_005.h5"),
                               "--iterations", "6", "--checkpoint-every", "3", "--min-val-per-energy", "10",
                               "-o", str(tmp_path / "par04_vae_pbwo4")])
    assert res.exit_code == 0 and "iteration" in res.output
    res = runner.invoke(main, ["train", "no_such_model", "--data", str(data / "electron_eta_000_005.h5")])
    assert res.exit_code != 0 and "registered models" in res.output
