"""What a user installs and cites: the licence, CITATION.cff, and the ``[inference]`` extra.

``pip install "calozoo[inference]"`` is what a simulation framework (a Geant4 or Athena hook, a
service) installs to pull registered models and generate showers: ONNX Runtime, numpy, h5py and the
MLflow client, without torch and without Ray. The slow test below installs exactly that into a fresh
virtual environment and pulls a model registered in a real MLflow store, from the sqlite file and
through a tracking server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

try:
    import tomllib
except ImportError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

from registry.pull import ShowerGenerator
from registry.server import start_server, stop_server

from .test_registry_server import free_port

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT_TOML = tomllib.loads((ROOT / "pyproject.toml").read_text())
PYPROJECT = PYPROJECT_TOML["project"]


def test_licence_is_the_apache_text_pyproject_declares():
    text = (ROOT / "LICENSE").read_text()
    assert PYPROJECT["license"] == "Apache-2.0"
    assert "Apache License\n                           Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "Copyright 2026 The calozoo authors" in text
    assert "[yyyy]" not in text


def test_citation_cff_has_the_required_keys_and_the_package_metadata():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):
        assert cff.get(key), f"CITATION.cff lacks {key!r}"
    assert cff["version"] == PYPROJECT["version"] and cff["license"] == PYPROJECT["license"]
    assert all(a.get("name") or a.get("family-names") for a in cff["authors"])
    refs = cff["references"]
    for ref in refs:
        assert ref.get("type") and ref.get("title") and ref.get("authors"), ref
        assert ref.get("doi") or ref.get("url"), f"{ref['title']}: no DOI and no URL"
        if "doi" in ref:
            assert re.fullmatch(r"10\.\d{4,9}/\S+", str(ref["doi"])), ref["doi"]
    dois = {str(r.get("doi")) for r in refs}
    # the CaloChallenge data set (the file format), MetaHEP (the Par04 data and VAE), FPD/KPD (the metrics)
    assert {"10.5281/zenodo.6366271", "10.1016/j.physletb.2023.138079", "10.1103/PhysRevD.107.076017"} <= dois


# -- pip install "calozoo[inference]" into a fresh venv ---------------------------------------------
_INFERENCE_RUN = """
import json, os, sys

for name in ("torch", "ray"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} came with calozoo[inference]")

import numpy as np
import registry
from registry import pull

ref, out = sys.argv[1], sys.argv[2]
energies = [4096.0] * 5 + [65536.0] * 3
for i, uri in enumerate(sys.argv[3:]):
    os.environ["CALOZOO_CACHE"] = f"{out}-cache-{i}"  # a download from each store
    showers = pull(ref, uri=uri).generate(energies, seed=1)
    np.save(f"{out}-{i}.npy", showers)
print(json.dumps({"registry": registry.__file__}))
"""


def _source_copy(dest: Path) -> Path:
    """The files a wheel is built from (pyproject's packages, README, LICENSE), copied, so that the
    build's ``build/`` and ``*.egg-info`` land in the copy and not in the working tree."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dest / name)
    for package in (p.rstrip("*") for p in PYPROJECT_TOML["tool"]["setuptools"]["packages"]["find"]["include"]):
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_inference_extra_pulls_and_generates_without_torch_or_ray(registered, tmp_path):  # noqa: F811
    path, uri, n_voxels = registered
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # the store was written by this environment's MLflow: its client reads that schema version
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"mlflow-skinny=={version('mlflow')}\n")
    # --no-compile: byte-compiling the ~60 packages costs more CPU than the test's imports save;
    # nothing of this checkout on the path (PYTHONPATH would also show pip its egg-info as installed)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "VIRTUAL_ENV")}
    pip = subprocess.Popen([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                            "--no-compile", "-c", str(constraints), f"{_source_copy(tmp_path / 'src')}[inference]"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    port = free_port()  # a tracking server on the same store, started while pip installs
    server = start_server(uri, str(tmp_path / "mlartifacts"), port, log_path=tmp_path / "server.log")
    try:
        _, err = pip.communicate(timeout=840)
        assert pip.returncode == 0, err[-3000:]

        env["CALOZOO_CACHE"] = str(tmp_path / "cache")
        http = f"http://127.0.0.1:{port}"
        ref = "layering.fastcalogan.r0@champion"
        run = subprocess.run([str(python), "-c", _INFERENCE_RUN, ref, str(tmp_path / "gen"), uri, http],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        out = json.loads(run.stdout.strip().splitlines()[-1])
        assert out["registry"].startswith(str(venv)), f"registry imported from {out['registry']}, not the venv"

        expected = ShowerGenerator(path).generate([4096.0] * 5 + [65536.0] * 3, seed=1)
        for i in range(2):  # sqlite, then the server
            np.testing.assert_allclose(np.load(tmp_path / f"gen-{i}.npy"), expected, rtol=1e-5, atol=1e-6)

        # the console script's inference commands run there too
        cli = subprocess.run([str(venv / "bin" / "calozoo"), "generate", ref, "--energies", "4,64", "-n", "3",
                              "-o", str(tmp_path / "gen.h5")], cwd=tmp_path, env={**env, "MLFLOW_TRACKING_URI": http},
                             capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stderr[-3000:]
        with h5py.File(tmp_path / "gen.h5") as f:
            assert f["showers"].shape == (6, n_voxels)
    finally:
        if pip.poll() is None:
            pip.kill()
        stop_server(server)
