"""Bad input, through the CLI (click's runner) and the Python API (issue #15).

Every case asserts: a non-zero exit (or the named exception), a single-line message that names the
problem, no traceback, and input files unchanged (their sha256 before and after). No case trains a
model or starts Ray; the whole module runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from calozoo.cli import main
from registry.publish import export_metadata
from zoo.export import export_onnx

RO = "calochallenge-1-photons"  # 368 voxels
FIXTURES = Path(__file__).parent / "fixtures"
#: a CUDA device this machine does not have
NO_CUDA = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


# -- inputs ------------------------------------------------------------------------------------------
def _showers(n_per_e=20, energies=(2048.0, 8192.0), seed=0):
    from showers.readout import get_readout

    ro = get_readout(RO)
    rng = np.random.default_rng(seed)
    e = np.repeat(np.asarray(energies, dtype=np.float64), n_per_e)
    x = rng.gamma(2.0, 1.0, (len(e), ro.n_voxels)).astype(np.float32)
    x *= (0.9 * e / x.sum(1))[:, None]
    return e, x, ro


def _h5(path, e, x, readout=RO, **attrs):
    with h5py.File(path, "w") as f:
        f["incident_energies"] = np.asarray(e, np.float64).reshape(-1, 1)
        f["showers"] = np.asarray(x, np.float32)
        if readout:
            from showers.readout import get_readout

            f.attrs["readout"] = get_readout(readout).to_json()
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


@pytest.fixture(scope="module")
def inp(tmp_path_factory):
    """A folder of inputs, good and bad, written once for all the cases."""
    d = tmp_path_factory.mktemp("inputs")
    e, x, ro = _showers()
    good = _h5(d / "good.h5", e, x)
    _h5(d / "negative.h5", e, np.where(np.arange(x.shape[1]) == 3, -1.0, x))
    e4, x4, _ = _showers(10, energies=(1e3, 4e3, 16e3, 64e3))
    _h5(d / "gev_both.h5", e4 / 1000.0, x4 / 1000.0)  # 1-64 GeV primaries, both arrays in GeV
    _h5(d / "gev_incident.h5", e / 1000.0, x)
    _h5(d / "empty.h5", np.zeros(0), np.zeros((0, ro.n_voxels)))
    with h5py.File(d / "fill.h5", "w") as f:  # 20 000 rows claimed, never written: fill values (zeros)
        f.create_dataset("incident_energies", shape=(20000, 1), dtype="f8", chunks=(1000, 1))
        f.create_dataset("showers", shape=(20000, ro.n_voxels), dtype="f4", chunks=(100, ro.n_voxels))
        f.attrs["readout"] = ro.to_json()
    with h5py.File(d / "huge.h5", "w") as f:  # claims 10^9 showers (1.4 TB) in a file of a few kB
        f.create_dataset("incident_energies", shape=(10**9, 1), dtype="f8", chunks=(4096, 1))
        f.create_dataset("showers", shape=(10**9, ro.n_voxels), dtype="f4", chunks=(64, ro.n_voxels))
        f.attrs["readout"] = ro.to_json()
    raw = good.read_bytes()
    (d / "truncated.h5").write_bytes(raw[: len(raw) // 2])
    (d / "text.h5").write_text("not hdf5\n")
    broken = d / "campaign_broken"
    broken.mkdir()
    _h5(broken / "photon_eta_000_005.h5", e, x)
    (broken / "photon_eta_005_010.h5").write_bytes(raw[:1000])
    campaign = d / "campaign"
    campaign.mkdir()
    _h5(campaign / "photon_eta_000_005.h5", e, x)
    # checkpoints: a real one, a truncated one, a foreign .pt
    from zoo import create_model_for

    model = create_model_for("fastcalogan", ro)
    state = {"family": model.family, "variant": model.variant, "config": model.config.to_dict(),
             "model": model.state_dict(), "iteration": 10, "metrics": {"chi2_sum": 1.0}}
    torch.save(state, d / "real.pt")
    blob = (d / "real.pt").read_bytes()
    (d / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    torch.save({"weights": torch.zeros(3)}, d / "foreign.pt")
    (d / "notes.pt").write_text("hello")
    for name, ckpt in (("run_foreign", (d / "foreign.pt").read_bytes()), ("run_text", b"hello")):
        run = d / name / "checkpoints"
        run.mkdir(parents=True)
        (run / "ckpt-000000010.pt").write_bytes(ckpt)
        index = [{"iteration": 10, "file": "ckpt-000000010.pt", "metrics": {"chi2_sum": 1.0}, "value": 1.0}]
        (run / "checkpoints.json").write_text(json.dumps(index))
    for name, ckpt in (("run_truncated", blob[: len(blob) // 2]), ("run_garbage_index", blob)):
        run = d / name / "checkpoints"
        run.mkdir(parents=True)
        (run / "ckpt-000000010.pt").write_bytes(ckpt)
        index = [{"iteration": 10, "file": "ckpt-000000010.pt", "metrics": {"chi2_sum": 1.0}, "value": 1.0}]
        (run / "checkpoints.json").write_text(json.dumps(index) if name == "run_truncated" else "{garbage")
        (d / name / "mlflow-run.json").write_text(json.dumps({"run_id": "0" * 32, "name": "x", "experiment": "x"}))
    (d / "empty_dir").mkdir()
    shutil.copy(FIXTURES / "caloclouds3_single_event_example.edm4hep.root", d / "event.edm4hep.root")
    # a model in the pull cache (as `calozoo generate` finds it offline), conditioned on the energy only
    version = d / "cache" / "c.fastcalogan.r" / "v1"
    version.mkdir(parents=True)
    onnx_file = export_onnx(model, version / "model.onnx", export_metadata(model, state, name="c.fastcalogan.r"))
    (version / "meta.json").write_text(json.dumps({"name": "c.fastcalogan.r", "version": "1", "source": "planted",
                                                   "sha256": hashlib.sha256(onnx_file.read_bytes()).hexdigest()}))
    # the same model cached under a name one character away from a registered one ('_' for a space), and
    # under another name than the one its meta.json records (two names onto one folder)
    for folder in ("c.fastcalogan.r_x", "c.fastcalogan.q"):
        shutil.copytree(version, d / "cache" / folder / "v1")
    meta = json.loads((d / "cache" / "c.fastcalogan.r_x" / "v1" / "meta.json").read_text())
    (d / "cache" / "c.fastcalogan.r_x" / "v1" / "meta.json").write_text(json.dumps({**meta,
                                                                                   "name": "c.fastcalogan.r_x"}))
    # a file whose header claims 10^8 showers with plausible fill values, a few kB on disk
    with h5py.File(d / "claims.h5", "w") as f:
        f.create_dataset("incident_energies", shape=(10**8, 1), dtype="f8", chunks=(4096, 1), fillvalue=8192.0)
        f.create_dataset("showers", shape=(10**8, ro.n_voxels), dtype="f4", chunks=(64, ro.n_voxels), fillvalue=10.0)
        f.attrs["readout"] = ro.to_json()
    (d / "best_list.json").write_text(json.dumps({"model": "fastcalogan", "overrides": [["learning_rate", 1e-4]]}))
    (d / "not_a_db.db").write_text("a text file, not an SQLite database\n")
    (d / "sweep_settings.json").write_text(json.dumps({"model": "fastcalogan", "data": str(d / "gone.h5"),
                                                       "out_dir": str(d / "elsewhere"), "mode": "grid"}))
    # a sweep folder with a planted pickle that others may write
    sweep = d / "sweep"
    (sweep / "tune").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    (sweep / "tune" / "tuner.pkl").write_bytes(b"\x80\x04N.")
    (sweep / "tune" / "tuner.pkl").chmod(0o666)
    return d


def _digest(folder: Path) -> dict:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _check_cli(res, *needles: str) -> str:
    """One line on stderr, "Error: ..." naming every needle; no usage block, no traceback anywhere."""
    assert "Traceback" not in res.output, res.output
    assert not any(line.startswith(("Usage:", "Try ")) for line in res.output.splitlines()), res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


def _cli(inp, args, *needles, env=None, **kw):
    before = _digest(inp)
    res = CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=True, **kw)
    assert res.exit_code not in (0, None), res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    _check_cli(res, *needles)
    assert _digest(inp) == before, "an input file changed"
    return res


def _api(inp, fn, exc, *needles):
    before = _digest(inp)
    with pytest.raises(exc) as info:
        fn()
    text = str(info.value)
    assert "\n" not in text and "Traceback" not in text, text
    for n in needles:
        assert n.lower() in text.lower(), (n, text)
    assert _digest(inp) == before, "an input file changed"
    return info.value


# -- CLI cases: (args with {d} for the inputs folder, needles) -----------------------------------------
TMP = "{tmp}"
CLI_CASES = {
    # training: options, configs, devices, checkpoints, data
    "train_unknown_set_key": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "-o", TMP,
                               "--set", "nosuchkey=1"], ["nosuchkey", "unknown config field"]),
    "train_set_not_a_number": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "-o", TMP,
                                "--set", "learning_rate=abc"], ["learning_rate", "number", "abc"]),
    "train_set_not_key_value": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "--set", "oops"],
                                ["KEY=VALUE"]),
    "train_iterations_0": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "--iterations", "0"],
                           ["iterations", ">= 1", "got 0"]),
    "train_iterations_negative": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow",
                                   "--iterations", "-5"], ["iterations", "-5"]),
    "train_checkpoint_every_0": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow",
                                  "--checkpoint-every", "0"], ["checkpoint_every", ">= 1", "got 0"]),
    "train_device_nonsense": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "--device", "tpu9"],
                              ["device", "tpu9", "cuda:N"]),
    "train_device_cuda_missing": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "--device", NO_CUDA],
                                  [NO_CUDA, "CUDA"]),
    "train_val_fraction_1.5": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow",
                                "--val-fraction", "1.5"], ["val_fraction", "1.5"]),
    "train_val_fraction_negative": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow",
                                     "--val-fraction", "-0.1"], ["val_fraction", "[0, 1)", "-0.1"]),
    "train_min_val_negative": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow",
                                "--min-val-per-energy", "-1"], ["min_per_energy", ">= 0", "-1"]),
    "train_unknown_model": (["train", "nosuchmodel", "--data", "{d}/good.h5", "--no-mlflow", "-o", TMP],
                            ["nosuchmodel"]),
    "train_empty_file": (["train", "fastcalogan", "--data", "{d}/empty.h5", "--no-mlflow", "-o", TMP],
                         ["empty.h5", "no showers", "N = 0"]),
    "train_huge_n": (["train", "fastcalogan", "--data", "{d}/huge.h5", "--no-mlflow", "-o", TMP],
                     ["huge.h5", "1,000,000,000", "memory"]),
    "train_truncated_h5": (["train", "fastcalogan", "--data", "{d}/truncated.h5", "--no-mlflow", "-o", TMP],
                           ["truncated.h5", "truncated"]),
    "train_text_h5": (["train", "fastcalogan", "--data", "{d}/text.h5", "--no-mlflow", "-o", TMP],
                      ["text.h5", "not an HDF5 file"]),
    "train_negative_voxels": (["train", "fastcalogan", "--data", "{d}/negative.h5", "--no-mlflow", "-o", TMP],
                              ["negative.h5", "negative energies"]),
    "train_both_in_gev": (["train", "fastcalogan", "--data", "{d}/gev_both.h5", "--no-mlflow", "-o", TMP],
                          ["gev_both.h5", "looks like GeV"]),
    "train_incident_in_gev": (["train", "fastcalogan", "--data", "{d}/gev_incident.h5", "--no-mlflow", "-o", TMP],
                              ["gev_incident.h5", "looks like GeV"]),
    "train_fill_values": (["train", "fastcalogan", "--data", "{d}/fill.h5", "--no-mlflow", "-o", TMP],
                          ["fill.h5", "claims 20,000 rows", "fill value"]),
    "train_empty_folder": (["train", "fastcalogan", "--data", "{d}/empty_dir", "--no-mlflow", "-o", TMP],
                           ["empty_dir", "no *.h5"]),
    "train_missing_data": (["train", "fastcalogan", "--data", "{d}/nothere.h5"], ["nothere.h5", "does not exist"]),
    "train_resume_truncated_checkpoint": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow",
                                           "-o", "{d}/run_truncated", "--iterations", "20", "--checkpoint-every", "10"],
                                          ["ckpt-000000010.pt", "truncated"]),
    "train_garbage_index": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow",
                             "-o", "{d}/run_garbage_index"], ["checkpoints.json", "not a checkpoint index"]),
    "train_resume_foreign_checkpoint": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow",
                                         "-o", "{d}/run_foreign", "--iterations", "20"],
                                        ["ckpt-000000010.pt", "not a calozoo checkpoint"]),
    "train_resume_text_checkpoint": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow",
                                      "-o", "{d}/run_text", "--iterations", "20"],
                                     ["ckpt-000000010.pt", "not a PyTorch checkpoint"]),
    "fleet_init_not_a_checkpoint": (["fleet", "fastcalogan", "--data", "{d}/campaign", "--no-mlflow", "-o", TMP,
                                     "--init", "{d}/foreign.pt"], ["foreign.pt", "not a calozoo checkpoint"]),
    # fleet: checked before Ray starts
    "fleet_broken_region_file": (["fleet", "fastcalogan", "--data", "{d}/campaign_broken", "--no-mlflow", "-o", TMP],
                                 ["photon_eta_005_010.h5", "truncated"]),
    "fleet_unknown_set_key": (["fleet", "fastcalogan", "--data", "{d}/campaign", "--no-mlflow", "-o", TMP,
                               "--set", "nosuchkey=1"], ["nosuchkey", "unknown config field", "known"]),
    "fleet_iterations_0": (["fleet", "fastcalogan", "--data", "{d}/campaign", "--no-mlflow", "-o", TMP,
                            "--iterations", "0"], ["iterations", ">= 1", "got 0"]),
    "fleet_no_matching_region": (["fleet", "fastcalogan", "--data", "{d}/campaign", "--no-mlflow", "-o", TMP,
                                  "--regions", "pion*"], ["pion*"]),
    "fleet_empty_folder": (["fleet", "fastcalogan", "--data", "{d}/empty_dir", "--no-mlflow", "-o", TMP],
                           ["empty_dir", "no <region>.h5"]),
    # register
    "register_truncated_checkpoint": (["register", "{d}/run_truncated"], ["ckpt-000000010.pt", "truncated"]),
    "register_not_a_run": (["register", "{d}/empty_dir"], ["empty_dir", "mlflow-run.json"]),
    # generate: the output path and the numbers are checked before any model is pulled
    "generate_missing_folder": (["generate", "x.y.z@1", "--energies", "1", "--offline", "-o", "{tmp}/no/such/out.h5"],
                                ["out.h5", "does not exist"]),
    "generate_onto_folder": (["generate", "x.y.z@1", "--energies", "1", "--offline", "-o", TMP], [TMP, "is a folder"]),
    "generate_n_0": (["generate", "x.y.z@1", "--energies", "1", "-n", "0", "-o", "{tmp}/o.h5"], ["n-per-energy", "0"]),
    "generate_n_negative": (["generate", "x.y.z@1", "--energies", "1", "-n", "-5", "-o", "{tmp}/o.h5"],
                            ["n-per-energy", "-5"]),
    "generate_batch_size_0": (["generate", "x.y.z@1", "--energies", "1", "--batch-size", "0", "-o", "{tmp}/o.h5"],
                              ["batch-size", "0"]),
    "generate_energies_empty": (["generate", "x.y.z@1", "--energies", "", "-o", "{tmp}/o.h5"], ["energies", "no energy given"]),
    "generate_energies_text": (["generate", "x.y.z@1", "--energies", "a,b", "-o", "{tmp}/o.h5"], ["energies", "a,b"]),
    "generate_energies_negative": (["generate", "x.y.z@1", "--energies", "-4", "-o", "{tmp}/o.h5"], ["> 0"]),
    "generate_name_dot": (["generate", ".@1", "--energies", "1", "-o", "{tmp}/o.h5"], ["invalid model name"]),
    "generate_name_dotdot": (["generate", "..@1", "--energies", "1", "-o", "{tmp}/o.h5"], ["invalid model name"]),
    "generate_name_5000": (["generate", "m" * 5000, "--energies", "1", "-o", "{tmp}/o.h5"],
                           ["invalid model name", "5000 characters"]),
    "generate_offline_uncached": (["generate", "never.pulled.here", "--energies", "1", "--offline",
                                   "-o", "{tmp}/o.h5"], ["never.pulled.here", "offline"]),
    # simulate
    "simulate_n_0": (["simulate", "--no-ray", "-n", "0", "-o", TMP], ["n-per-energy", "0"]),
    "simulate_n_negative": (["simulate", "--no-ray", "-n", "-5", "-o", TMP], ["n-per-energy", "-5"]),
    "simulate_energies_empty": (["simulate", "--no-ray", "--energies", "", "-o", TMP], ["energies", "no energy given"]),
    "simulate_unknown_detector": (["simulate", "--no-ray", "--detector", "nope", "-o", TMP], ["unknown detector"]),
    "simulate_no_region": (["simulate", "--no-ray", "--regions", "nothing_*", "-o", TMP], ["nothing_*", "its regions are"]),
    # show: the same validated reader as train
    "show_negative_voxels": (["show", "{d}/negative.h5", "-o", "{tmp}/p.png"], ["negative.h5", "negative"]),
    "show_gev": (["show", "{d}/gev_both.h5", "-o", "{tmp}/p.png"], ["gev_both.h5", "looks like GeV"]),
    "show_fill_values": (["show", "{d}/fill.h5", "-o", "{tmp}/p.png"],
                         ["fill.h5", "claims 20,000 rows", "fill value"]),
    "show_empty": (["show", "{d}/empty.h5", "-o", "{tmp}/p.png"], ["empty.h5", "no showers"]),
    "show_truncated": (["show", "{d}/truncated.h5", "-o", "{tmp}/p.png"], ["truncated.h5", "truncated HDF5"]),
    "show_max_showers_0": (["show", "{d}/good.h5", "--max-showers", "0"], ["max-showers", "1<=x"]),
    # validate
    "validate_huge_reference": (["validate", "{d}/good.h5", "{d}/fill.h5", "-o", TMP, "--classifier", "none",
                                 "--no-distances"], ["fill.h5", "fill value"]),
    # a file that claims 10^9 showers: validate reads only the rows it keeps (strided), never the claim
    "validate_huge_n": (["validate", "{d}/good.h5", "{d}/huge.h5", "-o", TMP],
                        ["huge.h5", "claims 1,000,000,000 rows", "fill value"]),
    "validate_truncated": (["validate", "{d}/truncated.h5", "{d}/good.h5", "-o", TMP],
                           ["truncated.h5", "truncated HDF5"]),
    "validate_gev_reference": (["validate", "{d}/good.h5", "{d}/gev_both.h5", "-o", TMP], ["gev_both.h5", "GeV"]),
    "validate_max_showers_0": (["validate", "{d}/good.h5", "{d}/good.h5", "--max-showers", "0"],
                               ["max-showers", "1<=x"]),
    # registry and tracking
    "mlflow_sync_empty_folder": (["mlflow-sync", "{d}/empty_dir"], ["empty_dir", "not a tracked run folder"]),
    "tune_resume_planted_pickle": (["tune", "--resume", "{d}/sweep", "--no-mlflow"],
                                   ["refusing to resume", "tuner.pkl", "writable by others"]),
    "tune_resume_not_a_sweep": (["tune", "--resume", "{d}/empty_dir", "--no-mlflow"], ["not a sweep folder"]),
    "tune_no_model": (["tune", "--no-mlflow"], ["MODEL", "--data", "--resume"]),
    # a model that is not conditioned on the angle or the geometry (from the cache, offline)
    "generate_angle_not_conditioned": (["generate", "c.fastcalogan.r@1", "--offline", "--energies", "4",
                                        "--angle", "30", "-o", "{tmp}/o.h5"], ["not conditioned on the angle"]),
    "generate_geometry_not_conditioned": (["generate", "c.fastcalogan.r@1", "--offline", "--energies", "4",
                                           "--geometry", "SiW", "-o", "{tmp}/o.h5"],
                                          ["not conditioned on the geometry"]),
    # issue #27: each a traceback, an unclear line or a silent acceptance before
    "train_config_overrides_list": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "-o", TMP,
                                     "--config", "{d}/best_list.json"], ["best_list.json", "'overrides' an object"]),
    "train_tracking_uri_not_a_database": (["--tracking-uri", "sqlite:///{d}/not_a_db.db", "train", "fastcalogan",
                                           "--data", "{d}/good.h5", "-o", TMP],
                                          ["--tracking-uri", "not_a_db.db", "not an SQLite database"]),
    "models_tracking_uri_not_a_database": (["--tracking-uri", "sqlite:///{d}/not_a_db.db", "models"],
                                           ["not_a_db.db", "not an SQLite database"]),
    "train_seed_negative": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "-o", TMP, "--seed=-1"],
                            ["--seed", "-1"]),
    "simulate_seed_negative": (["simulate", "--no-ray", "--seed", "-1", "-o", TMP], ["--seed", "-1"]),
    "train_min_val_beyond_the_data": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "-o", TMP,
                                       "--min-val-per-energy", "5000"],
                                      ["--min-val-per-energy 5000", "good.h5", "20 showers at 2.048 GeV",
                                       "at most 10"]),
    "fleet_min_val_beyond_the_data": (["fleet", "fastcalogan", "--data", "{d}/campaign", "--no-mlflow", "-o", TMP,
                                       "--min-val-per-energy", "5000"], ["--min-val-per-energy 5000", "at most 10"]),
    "fleet_workers_0": (["fleet", "fastcalogan", "--data", "{d}/campaign", "--no-mlflow", "-o", TMP, "--workers", "0"],
                        ["--workers", "0"]),
    "fleet_cpus_0": (["fleet", "fastcalogan", "--data", "{d}/campaign", "--no-mlflow", "-o", TMP, "--cpus", "0"],
                     ["--cpus", "0"]),
    "fleet_set_batch_size_huge": (["fleet", "fastcalogan", "--data", "{d}/campaign", "--no-mlflow", "-o", TMP,
                                   "--set", "batch_size=1000000000"], ["batch_size", "65,536", "1000000000"]),
    "tune_space_not_json": (["tune", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "-o", TMP,
                             "--space", "learning_rate=[1e-4,"], ["--space", "learning_rate=[1e-4,", "not valid JSON"]),
    "tune_space_out_of_range": (["tune", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "-o", TMP,
                                 "--space", "n_critic=[5,1000]"], ["n_critic", "1000", "from 1 to 100"]),
    "tune_space_text_for_a_number": (["tune", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "-o", TMP,
                                      "--space", "learning_rate=fast"], ["learning_rate", "finite number", "fast"]),
    "tune_num_samples_0": (["tune", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "-o", TMP,
                            "--num-samples", "0"], ["--num-samples", "0"]),
    "tune_min_val_beyond_the_data": (["tune", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "-o", TMP,
                                      "--min-val-per-energy", "5000"], ["--min-val-per-energy 5000", "at most 10"]),
    "tune_from_not_a_sweep": (["tune", "--from", "{d}/not_a_db.db", "--no-mlflow", "-o", TMP],
                              ["not_a_db.db", "not a sweep's sweep.json"]),
    "tune_from_missing_data": (["tune", "--from", "{d}/sweep_settings.json", "--no-mlflow", "-o", TMP],
                               ["gone.h5", "does not exist"]),
    "tune_resume_and_model": (["tune", "fastcalogan", "--resume", "{d}/sweep", "--no-mlflow"], ["--resume", "MODEL"]),
    "train_iterations_huge": (["train", "fastcalogan", "--data", "{d}/good.h5", "--no-mlflow", "-o", TMP,
                               "--iterations", "1000000000000"], ["iterations", "at most 100,000,000"]),
    "train_set_sampler_steps_huge": (["train", "flow_matching", "--data", "{d}/good.h5", "--no-mlflow", "-o", TMP,
                                      "--set", "n_steps=100000000"], ["n_steps", "from 1 to 1,000", "100000000"]),
    "train_set_widths_huge": (["train", "flow_matching", "--data", "{d}/good.h5", "--no-mlflow", "-o", TMP,
                               "--set", "shape_widths=[256,1000000]"], ["shape_widths", "16,384"]),
    "generate_n_beyond_the_disk": (["generate", "c.fastcalogan.r@1", "--offline", "--energies", "1,2,4,8",
                                    "-n", "1000000000", "-o", "{tmp}/o.h5"], ["o.h5", "GiB", "free", "-n"]),
    "generate_n_beyond_any_file": (["generate", "c.fastcalogan.r@1", "--offline", "--energies", "1",
                                    "-n", "100000000000", "-o", "{tmp}/o.h5"], ["--n-per-energy", "100000000000"]),
    "generate_name_with_a_space": (["generate", "c.fastcalogan.r x@1", "--offline", "--energies", "1",
                                    "-o", "{tmp}/o.h5"], ["invalid model name", "' '"]),
    "generate_name_with_a_colon": (["generate", "c.fastcalogan.r:x@1", "--offline", "--energies", "1",
                                    "-o", "{tmp}/o.h5"], ["invalid model name", "':'"]),
    "show_header_claims_1e8_rows": (["show", "{d}/claims.h5", "-o", "{tmp}/p.png"],
                                    ["claims.h5", "claims 100,000,000 rows", "fill value"]),
    # an EDM4hep file without the hit collections asked for
    "voxelise_no_hit_collection": (["voxelise", "{d}/event.edm4hep.root", "--collections", "NoSuchHits",
                                    "-o", "{tmp}/v.h5"], ["event.edm4hep.root", "no calorimeter hit collection"]),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_input(case, inp, tmp_path, monkeypatch):
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CALOZOO_CACHE", str(inp / "cache"))
    args, needles = ([a.replace("{d}", str(inp)).replace("{tmp}", str(tmp_path)) for a in part]
                     for part in CLI_CASES[case])
    ray_before = ray.is_initialized()
    _cli(inp, args, *needles)
    if case.startswith(("fleet_", "tune_")) and not ray_before:
        assert not ray.is_initialized(), "Ray was started before the input was checked"


def test_cli_models_with_a_dead_server(inp, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _cli(inp, ["models", "--timeout", "2"], f"127.0.0.1:{port}", "cannot list",
         env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})


def test_cli_models_with_a_hanging_server(inp):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)  # accepts connections (the kernel does) and never answers
    port = srv.getsockname()[1]
    try:
        import time

        t0 = time.monotonic()
        _cli(inp, ["models", "--timeout", "1"], f"127.0.0.1:{port}", "cannot list",
             env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
        assert time.monotonic() - t0 < 30
    finally:
        srv.close()


def test_cli_mlflow_sync_into_the_recorded_store_only(inp, tmp_path, monkeypatch):
    """A run whose server was away when it started records the store; mlflow-sync never replays it
    into the store the shell points at, and an empty pending log is not "everything logged"."""
    from registry.tracking import TrackedRun

    dead = "http://127.0.0.1:9"  # discard port: refused
    run_dir = tmp_path / "run"
    run = TrackedRun("m/r", "exp", run_dir, uri=dead, retry_after=0.0)
    run.log_metrics({"loss": 1.0}, 1)
    assert run.pending()
    other = tmp_path / "other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    before = _digest(run_dir)
    res = CliRunner().invoke(main, ["mlflow-sync", str(run_dir)])
    assert res.exit_code != 0, res.output
    _check_cli(res, dead, "still pending")
    assert not other.exists()  # nothing went to the shell's store
    assert _digest(run_dir) == before  # the pending log is kept for a later sync
    # into another store only when asked for by name: then everything is logged there
    res = CliRunner().invoke(main, ["mlflow-sync", str(run_dir), "--to", f"sqlite:///{other}"])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert other.exists() and not run.pending()


# -- API cases ---------------------------------------------------------------------------------------
def _fake_generator(conditioned_on_angle=False, geometries=()):
    from registry.pull import ShowerGenerator
    from showers.transforms import ConditionSpec

    gen = object.__new__(ShowerGenerator)
    gen.name, gen.version, gen.trained_range = "c.fastcalogan.r", "1", {}
    gen.condition_spec = ConditionSpec(use_angle=conditioned_on_angle, geometries=tuple(geometries))
    gen.noise_dim, gen.n_voxels = 4, 368
    return gen


def _pull_beside_the_cache(d: Path, pull):
    """``pull("..@1")`` with a whole, checksummed model planted where ``..`` would lead (the cache's
    parent): a pinned version there must not be served."""
    shutil.copytree(d / "cache" / "c.fastcalogan.r" / "v1", d / "v1")
    try:
        return pull("..@1", offline=True)
    finally:
        shutil.rmtree(d / "v1")


def _api_cases():
    from registry.pull import RegistryError, list_models, pull
    from showers.errors import ShowerDataError
    from showers.formats import (CaloChallengeWriter, check_output_path, iter_calochallenge, read_edm4hep_hits,
                                 read_strided, validate_showers)
    from trainers.data import DataSplit, load_showers
    from trainers.loop import TrainConfig
    from tune.sweep import check_resumable, load_best
    from zoo import create_model
    from zoo.checkpoint import CheckpointError, CheckpointManager, load_checkpoint

    fixtures = Path(__file__).parent / "fixtures"
    return {
        "trainconfig_iterations_0": (lambda d: TrainConfig(iterations=0), ValueError, ["iterations"]),
        "trainconfig_checkpoint_every_0": (lambda d: TrainConfig(checkpoint_every=0), ValueError, ["checkpoint_every"]),
        "trainconfig_keep_1": (lambda d: TrainConfig(keep_checkpoints=1), ValueError, ["keep_checkpoints"]),
        "trainconfig_cuda_without_cuda": (
            lambda d: TrainConfig(device="cuda") if not torch.cuda.is_available() else TrainConfig(device="cuda:99"),
            ValueError, ["cuda"]),
        "datasplit_fraction_1.5": (lambda d: DataSplit(1.5), ValueError, ["val_fraction", "1.5"]),
        "model_unknown_field": (lambda d: create_model("fastcalogan", nosuchkey=1), ValueError, ["nosuchkey"]),
        "model_field_wrong_kind": (lambda d: create_model("fastcalogan", learning_rate="abc"), ValueError,
                                   ["learning_rate", "abc"]),
        "model_int_field_float": (lambda d: create_model("fastcalogan", latent_dim=1.5), ValueError,
                                  ["latent_dim", "whole number"]),
        "load_checkpoint_truncated": (lambda d: load_checkpoint(d / "truncated.pt"), CheckpointError,
                                      ["truncated.pt", "truncated"]),
        "load_checkpoint_foreign": (lambda d: load_checkpoint(d / "foreign.pt"), CheckpointError,
                                    ["foreign.pt", "not a calozoo checkpoint"]),
        "load_checkpoint_text": (lambda d: load_checkpoint(d / "notes.pt"), CheckpointError,
                                 ["notes.pt", "not a PyTorch checkpoint"]),
        "load_checkpoint_missing": (lambda d: load_checkpoint(d / "gone.pt"), CheckpointError,
                                    ["gone.pt", "does not exist"]),
        "checkpoint_garbage_index": (lambda d: CheckpointManager(d / "run_garbage_index" / "checkpoints"),
                                     CheckpointError, ["checkpoints.json", "delete it"]),
        "load_showers_empty": (lambda d: load_showers(d / "empty.h5"), ShowerDataError, ["empty.h5", "N = 0"]),
        "load_showers_huge": (lambda d: load_showers(d / "huge.h5"), ShowerDataError, ["huge.h5", "memory"]),
        "load_showers_gev": (lambda d: load_showers(d / "gev_both.h5"), ShowerDataError, ["gev_both.h5", "GeV"]),
        "read_strided_fill": (lambda d: read_strided(d / "fill.h5", max_showers=100), ShowerDataError,
                              ["fill.h5", "fill value"]),
        "read_strided_max_0": (lambda d: read_strided(d / "good.h5", max_showers=0), ValueError, ["max_showers"]),
        "iter_step_0": (lambda d: list(iter_calochallenge(d / "good.h5", step=0)), ValueError, ["step"]),
        "validate_gev_per_energy": (
            lambda d: validate_showers([1e5, 1e5, 10.0 * 1e3, 64.0], np.ones((4, 368)) * 1e3, "arr"),
            ShowerDataError, ["arr", "looks like GeV"]),
        "writer_missing_folder": (lambda d: CaloChallengeWriter(d / "no" / "x.h5", 368), ShowerDataError,
                                  ["does not exist"]),
        "writer_onto_folder": (lambda d: check_output_path(d / "empty_dir"), ShowerDataError, ["is a folder"]),
        "edm4hep_no_hit_collection": (
            lambda d: read_edm4hep_hits(fixtures / "caloclouds3_single_event_example.edm4hep.root",
                                        tree="metadata"),
            ShowerDataError, ["edm4hep.root", "no calorimeter hit collection"]),
        "pull_dotdot_cached_version": (lambda d: pull("..@1", offline=True), RegistryError, ["invalid model name"]),
        "pull_dotdot_planted_version": (lambda d: _pull_beside_the_cache(d, pull), RegistryError,
                                        ["invalid model name", "'..'"]),
        "pull_dot": (lambda d: pull(".", uri="http://127.0.0.1:9"), RegistryError, ["invalid model name"]),
        "pull_long_name": (lambda d: pull("n" * 5000, offline=True), RegistryError, ["invalid model name"]),
        "pull_control_character": (lambda d: pull("a\nb", offline=True), RegistryError, ["invalid model name"]),
        "list_models_dead_server": (lambda d: list_models(uri="http://127.0.0.1:9", timeout=2), RegistryError,
                                    ["127.0.0.1:9"]),
        "generate_angle_not_conditioned": (lambda d: _fake_generator().encode([1e3], angle_deg=30.0), ValueError,
                                           ["not conditioned on the angle"]),
        "generate_geometry_not_conditioned": (lambda d: _fake_generator().encode([1e3], geometry="SiW"), ValueError,
                                              ["not conditioned on the geometry"]),
        "generate_batch_size_0": (lambda d: _fake_generator().generate([1e3], batch_size=0), ValueError,
                                  ["batch size"]),
        "resume_untrusted_sweep": (lambda d: check_resumable(d / "sweep"), ValueError, ["writable by others"]),
        "pull_name_with_a_space": (lambda d: pull("c.fastcalogan.r x@1", offline=True), RegistryError,
                                   ["invalid model name", "' '"]),
        "pull_a_folder_of_another_name": (lambda d: pull("c.fastcalogan.q@1", offline=True), RegistryError,
                                          ["c.fastcalogan.q", "not in the cache"]),
        "model_sampler_steps_huge": (lambda d: create_model("flow_matching", n_steps=10**8), ValueError,
                                     ["n_steps", "1,000"]),
        "trainconfig_iterations_huge": (lambda d: TrainConfig(iterations=10**12), ValueError,
                                        ["iterations", "at most"]),
        "datasplit_strict_beyond_the_data": (
            lambda d: DataSplit(min_per_energy=30, strict=True).check(np.repeat([1e3, 4e3], 40), "x.h5"),
            ValueError, ["x.h5", "40 showers at 1 GeV", "at most 20"]),
        "load_best_overrides_list": (lambda d: load_best(d / "best_list.json"), ValueError,
                                     ["best_list.json", "'overrides' an object"]),
        "read_strided_claims_1e8": (lambda d: read_strided(d / "claims.h5"), ShowerDataError,
                                    ["claims.h5", "claims 100,000,000 rows"]),
    }


@pytest.mark.parametrize("case", sorted(_api_cases()))
def test_api_bad_input(case, inp, monkeypatch):
    monkeypatch.setenv("CALOZOO_CACHE", str(inp / "cache"))
    fn, exc, needles = _api_cases()[case]
    _api(inp, lambda: fn(inp), exc, *needles)


# -- what survives: a deleted index, a killed writer ----------------------------------------------------
def test_a_deleted_index_is_rebuilt_from_the_checkpoints(inp, tmp_path):
    from zoo.checkpoint import CheckpointManager

    d = tmp_path / "checkpoints"
    d.mkdir()
    for it in (10, 20):
        state = torch.load(inp / "real.pt", weights_only=True)
        state["iteration"], state["metrics"] = it, {"chi2_sum": 30.0 - it, "criterion": 30.0 - it}
        torch.save(state, d / f"ckpt-{it:09d}.pt")
    mgr = CheckpointManager(d)
    assert [e["iteration"] for e in mgr.entries] == [10, 20] and mgr.latest().name == "ckpt-000000020.pt"
    assert mgr.best()["iteration"] == 20 and (d / "checkpoints.json").exists()


def test_train_after_its_index_was_deleted_continues_and_keeps_the_checkpoints(inp, tmp_path):
    run = tmp_path / "run"
    base = ["train", "fastcalogan", "--data", str(inp / "good.h5"), "--no-mlflow", "-o", str(run),
            "--checkpoint-every", "10", "--set", "batch_size=16"]
    res = CliRunner().invoke(main, base + ["--iterations", "20"])
    assert res.exit_code == 0, res.output
    ck = run / "checkpoints"
    (ck / "checkpoints.json").unlink()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in ck.glob("ckpt-*.pt")}
    assert sorted(kept) == ["ckpt-000000010.pt", "ckpt-000000020.pt"]
    res = CliRunner().invoke(main, base + ["--iterations", "30"])
    assert res.exit_code == 0, res.output
    # it went on from iteration 20: the two checkpoints are the same files, untouched, and one more
    assert {n: (ck / n).stat().st_ino for n in kept} == {n: v[0] for n, v in kept.items()}
    assert {n: (ck / n).stat().st_mtime_ns for n in kept} == {n: v[1] for n, v in kept.items()}
    index = json.loads((ck / "checkpoints.json").read_text())
    assert [e["iteration"] for e in index] == [10, 20, 30]


def test_a_killed_campaign_leaves_nothing_behind_after_its_rerun(tmp_path):
    """SIGKILL a campaign while it writes its region file; the rerun removes the temporary file."""
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = tmp_path / "campaign"
    args = [sys.executable, "-m", "calozoo", "simulate", "--no-ray", "--regions", "photon_eta_000_005",
            "--energies", "1,4,16,64,256", "-o", str(out)]
    proc = subprocess.Popen(args + ["-n", "20000"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob(".*.tmp")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = list(out.glob(".*.tmp"))
    assert left and not (out / "photon_eta_000_005.h5").exists()
    subprocess.run(args + ["-n", "20"], env=env, check=True, capture_output=True)
    assert not list(out.glob(".*.tmp")) and (out / "photon_eta_000_005.h5").exists()


def test_validate_memory_is_bounded_by_the_rows_it_keeps(tmp_path):
    """Reading 100 of 5000 showers allocates about 100 showers' worth, not the file's 7 MB."""
    import tracemalloc

    import showers.formats as fm

    e, x, _ = _showers(2500)
    path = _h5(tmp_path / "big.h5", e, x)
    whole = x.nbytes
    del x
    tracemalloc.start()
    try:
        E, X, _, n = fm.read_strided(path, max_showers=100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert n == 5000 and X.shape == (100, 368)
    assert peak < whole / 10, (peak, whole)


def test_stale_tmp_files_of_a_killed_writer_are_removed(tmp_path):
    import subprocess
    import sys

    from showers.atomic import tmp_path as tmp_name
    from showers.formats import write_calochallenge
    from zoo.checkpoint import CheckpointManager

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    target = tmp_path / "region.h5"
    stale = tmp_name(target).name.replace(f".{os.getpid()}.", f".{dead}.")
    (tmp_path / stale).write_bytes(b"half")
    foreign = tmp_path / f".region.h5.otherhost.{dead}.r00ff00ff.tmp"  # another host's writer: not ours
    foreign.write_bytes(b"theirs")
    live = tmp_path / tmp_name(target).name  # this (live) process
    live.write_bytes(b"busy")
    e, x, _ = _showers(5)
    write_calochallenge(target, e, x, {"readout": RO})
    assert not (tmp_path / stale).exists() and foreign.exists() and live.exists()
    ck = tmp_path / "ck"
    ck.mkdir()
    left = ck / tmp_name(ck / "ckpt-000000010.pt", unique=False).name.replace(f".{os.getpid()}.", f".{dead}.")
    left.write_bytes(b"half")
    CheckpointManager(ck)
    assert not left.exists()


def test_validate_reads_only_the_rows_it_keeps(tmp_path, monkeypatch):
    """max_showers bounds what is read: the reader is asked for strided rows, never a whole chunk."""
    import showers.formats as fm

    e, x, _ = _showers(500)  # 1000 showers
    path = _h5(tmp_path / "big.h5", e, x)
    seen = []
    real = fm._read
    monkeypatch.setattr(fm, "_read", lambda ds, sl, p: (seen.append(sl), real(ds, sl, p))[1])
    E, X, _, n = fm.read_strided(path, max_showers=100)
    assert n == 1000 and len(E) == 100 and X.shape == (100, 368)
    assert all(s.step == 10 for s in seen), seen
    assert max((s.stop - s.start) // s.step for s in seen) <= 100


def test_the_module_has_enough_cases():
    assert len(CLI_CASES) + len(_api_cases()) >= 60
