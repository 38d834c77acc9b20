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
