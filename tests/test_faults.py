"""Faults around the commands: a full disk, two writers of one folder, output that is not a terminal.

Full disks are tried twice: on a real 1 MB file system (tmpfs; as root, where mounting is allowed,
else skipped with the reason) and everywhere by fault injection (a file-size limit, RLIMIT_FSIZE:
every write past 1 MB fails with EFBIG, through the same code paths as ENOSPC). Each command runs in
a child process, so that a crash shows as its exit status rather than taking the test session.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from .test_bad_inputs import RO, _h5, _showers

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "CALOZOO_DEBUG": "", **extra}


def _calozoo(args, *, limit_bytes: int | None = None, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "calozoo", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=_env(**env), cwd=REPO, preexec_fn=limit if limit_bytes else None)


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A non-zero exit that is not a signal (no crash), one line "Error: ..." naming every needle."""
    assert proc.returncode > 0, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Segmentation" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "Error" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: "), proc.stderr[-3000:]
    for n in needles:
        assert n.lower() in errors[0].lower(), (n, errors[0])
    return errors[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("faults")
    e, x, _ = _showers(40)
    return _h5(d / "good.h5", e, x)


@pytest.fixture(scope="module")
def cached_model(tmp_path_factory) -> Path:
    """A pull cache holding c.fastcalogan.r v1 (as `calozoo generate --offline` finds it)."""
    from registry.publish import export_metadata
    from showers.readout import get_readout
    from zoo import create_model_for
    from zoo.export import export_onnx

    cache = tmp_path_factory.mktemp("cache")
    model = create_model_for("fastcalogan", get_readout(RO))
    state = {"family": model.family, "variant": model.variant, "config": model.config.to_dict(),
             "model": model.state_dict(), "iteration": 10, "metrics": {"chi2_sum": 1.0}}
    version = cache / "c.fastcalogan.r" / "v1"
    version.mkdir(parents=True)
    onnx_file = export_onnx(model, version / "model.onnx", export_metadata(model, state, name="c.fastcalogan.r"))
    (version / "meta.json").write_text(json.dumps({"name": "c.fastcalogan.r", "version": "1", "source": "test",
                                                   "sha256": _sha(onnx_file)}))
    return cache


# -- full disks -----------------------------------------------------------------------------------------
@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MB tmpfs, or a skip saying why there is none."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a 1 MB tmpfs needs root and mount(8); the fault-injection tests cover the same paths")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode}); the fault-injection tests "
                    "cover the same paths")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _full_disk_cases(root: Path, data: Path, cache: Path, limit: int | None = None) -> dict:
    """simulate, generate and train onto ``root``: each ends in one line naming its file and the cause, no
    temporary file left, the files finished before untouched, no crash."""
    run = {"limit_bytes": limit, "CALOZOO_CACHE": str(cache)}
    sim = root / "sim"
    done = _calozoo(["simulate", "--no-ray", "--regions", "photon_eta_020_025", "--energies", "1", "-n", "20",
                     "-o", sim])
    assert done.returncode == 0, done.stderr[-2000:]
    finished = sim / "photon_eta_020_025.h5"
    before = _sha(finished)
    procs = {"simulate": _calozoo(["simulate", "--no-ray", "--regions", "photon_eta_025_030", "--energies", "1,4,16",
                                   "-n", "3000", "-o", sim], **run)}
    _one_error_line(procs["simulate"], "photon_eta_025_030.h5")
    assert _sha(finished) == before and not list(sim.glob(".*.tmp"))
    assert sorted(p.name for p in sim.iterdir()) == ["photon_eta_020_025.h5"]

    generate = ["generate", "c.fastcalogan.r@1", "--offline", "--energies", "1,4", "--batch-size", "500"]
    assert _calozoo(generate + ["-n", "10", "-o", root / "gen.h5"], CALOZOO_CACHE=str(cache)).returncode == 0
    before = _sha(root / "gen.h5")
    procs["generate"] = _calozoo(generate + ["-n", "2000", "-o", root / "gen.h5"], **run)
    _one_error_line(procs["generate"], "gen.h5")
    assert _sha(root / "gen.h5") == before and not list(root.glob(".*.tmp"))

    procs["train"] = _calozoo(["train", "fastcalogan", "--data", data, "--no-mlflow", "-o", root / "run",
                               "--iterations", "4", "--checkpoint-every", "2", "--cpus", "1",
                               "--set", "batch_size=16"], **run)
    line = _one_error_line(procs["train"], "ckpt-000000002.pt", "cannot write")
    assert "enforce fail" not in line and "unexpected pos" not in line
    assert not list((root / "run" / "checkpoints").glob(".*.tmp"))
    return procs


def test_a_full_file_system_is_an_error_not_a_crash(tiny_fs, data, cached_model):
    procs = _full_disk_cases(tiny_fs, data, cached_model)
    for name in ("simulate", "train"):
        assert "cannot write (no space left on device" in procs[name].stderr.lower(), procs[name].stderr[-1000:]
    # generate knows how much it will write: refused before it starts, saying what is needed
    assert re.search(r"need up to [\d.]+ GiB .* GiB free", procs["generate"].stderr), procs["generate"].stderr


def test_a_write_the_system_refuses_is_an_error_not_a_crash(tmp_path, data, cached_model):
    """Fault injection, everywhere: past 1 MB every write fails (EFBIG), in libhdf5 and torch.save alike."""
    procs = _full_disk_cases(tmp_path, data, cached_model, limit=1 << 20)
    for proc in procs.values():
        assert "cannot write (file too large" in proc.stderr.lower(), proc.stderr[-1000:]


# -- one writer per folder --------------------------------------------------------------------------------
def test_two_trains_into_one_folder_one_is_refused_and_the_index_is_the_others(data, tmp_path):
    """Two `calozoo train -o SAME` started together with different seeds: the one that takes the folder
    first trains; the other is refused in one line naming the folder and the winner's pid, and the
    index holds the winner's checkpoints only (each checkpoint records the seed it was trained with)."""
    run = tmp_path / "run"
    base = [sys.executable, "-m", "calozoo", "train", "fastcalogan", "--data", str(data), "--no-mlflow", "-o",
            str(run), "--iterations", "90", "--checkpoint-every", "30", "--set", "batch_size=16", "--cpus", "1"]
    procs = {seed: subprocess.Popen(base + ["--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=_env(), cwd=REPO) for seed in (1, 2)}
    out = {seed: p.communicate(timeout=600) for seed, p in procs.items()}
    codes = {seed: p.returncode for seed, p in procs.items()}
    assert sorted(codes.values())[0] == 0 and sorted(codes.values())[1] > 0, (codes, out)
    winner = next(seed for seed, c in codes.items() if c == 0)
    loser = 3 - winner
    errors = [line for line in out[loser][1].splitlines() if "Error" in line]
    assert len(errors) == 1 and "Traceback" not in out[loser][1], out[loser][1][-2000:]
    assert str(run) in errors[0] and f"pid {procs[winner].pid} " in errors[0] and "in use" in errors[0], errors[0]
    index = json.loads((run / "checkpoints" / "checkpoints.json").read_text())
    assert [e["iteration"] for e in index] == [30, 60, 90]
    for e in index:
        state = torch.load(run / "checkpoints" / e["file"], weights_only=True)
        assert state["train_config"]["seed"] == winner and state["iteration"] == e["iteration"]
        assert state["metrics"]["chi2_sum"] == pytest.approx(e["metrics"]["chi2_sum"])
    assert not (run / "calozoo.lock").exists()  # let go when the winner ended


_HOLD = """
import sys, time
sys.path.insert(0, sys.argv[1])
from showers.lock import writer_lock
with writer_lock(sys.argv[2]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(REPO), str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_lock_of_a_killed_writer_is_taken_over(tmp_path):
    from showers.lock import FolderBusyError, writer_lock

    holder = _holder(tmp_path)
    try:
        with pytest.raises(FolderBusyError, match=rf"{re.escape(str(tmp_path))} is in use: .*pid {holder.pid} "):
            with writer_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "calozoo.lock").exists()  # left by the killed holder
    with writer_lock(tmp_path):
        assert f"{os.getpid()} " in (tmp_path / "calozoo.lock").read_text()
    assert not (tmp_path / "calozoo.lock").exists()


def test_a_region_a_fleet_and_a_sweep_in_use_are_refused_before_ray_starts(data, tmp_path):
    import ray

    from showers.lock import FolderBusyError
    from trainers.fleet import FleetConfig, run_fleet, train_share
    from trainers.loop import TrainConfig
    from tune.sweep import SweepConfig, run_sweep

    campaign = tmp_path / "campaign"
    campaign.mkdir()
    shutil.copy(data, campaign / "photon_eta_000_005.h5")
    out = tmp_path / "fleet"
    cfg = FleetConfig(model="fastcalogan", data_dir=str(campaign), out_dir=str(out), regions=["photon_eta_000_005"],
                      train=TrainConfig(iterations=20, checkpoint_every=10, progress=False))
    ray_before = ray.is_initialized()
    holder = _holder(out / "photon_eta_000_005")  # e.g. a `calozoo train -o FLEET/REGION`
    try:
        with pytest.raises(FolderBusyError, match=rf"photon_eta_000_005 is in use: .*pid {holder.pid} .*region folder"):
            train_share(cfg, ["photon_eta_000_005"])  # what a fleet worker does
        assert not (out / "photon_eta_000_005" / "checkpoints" / "checkpoints.json").exists()
    finally:
        holder.kill()
        holder.wait()
    for folder, start in ((out, lambda: run_fleet(cfg)),
                          (tmp_path / "sweep", lambda: run_sweep(SweepConfig(model="fastcalogan", data=str(data),
                                                                              out_dir=str(tmp_path / "sweep"))))):
        holder = _holder(folder)
        try:
            with pytest.raises(FolderBusyError, match=rf"pid {holder.pid} "):
                start()
        finally:
            holder.kill()
            holder.wait()
    if not ray_before:
        assert not ray.is_initialized()


# -- bounds and progress --------------------------------------------------------------------------------
def test_generate_streams_its_showers_in_batches(cached_model, tmp_path, monkeypatch):
    """Memory holds one batch whatever -n: the file is written a batch at a time, and the showers are
    the same for the same seed whatever the batch size."""
    from click.testing import CliRunner

    from calozoo.cli import main
    from showers.formats import CaloChallengeWriter, read_calochallenge

    monkeypatch.setenv("CALOZOO_CACHE", str(cached_model))
    appended = []
    real = CaloChallengeWriter.append
    monkeypatch.setattr(CaloChallengeWriter, "append", lambda self, e, x: (appended.append(len(e)), real(self, e, x)))
    args = ["generate", "c.fastcalogan.r@1", "--offline", "--energies", "1,4", "-n", "250", "--seed", "3"]
    res = CliRunner().invoke(main, args + ["--batch-size", "100", "-o", str(tmp_path / "a.h5")])
    assert res.exit_code == 0, res.output
    assert appended == [100, 100, 50, 100, 100, 50]
    res = CliRunner().invoke(main, args + ["--batch-size", "1000", "-o", str(tmp_path / "b.h5")])
    assert res.exit_code == 0, res.output
    (ea, xa), (eb, xb) = read_calochallenge(tmp_path / "a.h5", validate=False), \
        read_calochallenge(tmp_path / "b.h5", validate=False)
    assert np.array_equal(ea, eb) and np.allclose(xa, xb, rtol=1e-5, atol=1e-6)


def test_progress_in_a_log_is_plain_lines(data, tmp_path):
    """Output to a file (as under nohup or a batch system): plain progress lines, no carriage returns."""
    proc = _calozoo(["train", "fastcalogan", "--data", data, "--no-mlflow", "-o", tmp_path / "run", "--iterations",
                     "20", "--checkpoint-every", "10", "--set", "batch_size=16", "--cpus", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if re.match(r"fastcalogan: \d+/20 it \(\d+ %\), ", line)]
    assert lines and lines[-1].startswith("fastcalogan: 20/20 it (100 %)") and ", done" in lines[-1], proc.stderr


def test_log_progress_prints_every_step_and_when_nothing_moves():
    import io
    import time

    from showers.progress import LogProgress

    out = io.StringIO()
    bar = LogProgress(100, "work", "it", stream=out, every=0.3, step=0.25, min_gap=0.0)
    for _ in range(100):
        bar.update(1)
    assert [re.match(r"work: (\d+)/100", line).group(1) for line in out.getvalue().splitlines()] == \
        ["25", "50", "75", "100"]
    time.sleep(0.8)  # nothing advances: a line every `every` seconds all the same
    assert len(out.getvalue().splitlines()) >= 5
    bar.close()
    assert out.getvalue().splitlines()[-1].endswith(", done")

