"""A local Ray that calozoo starts, and the work on it, listen on loopback only (issues #15 and #27).

Each in a child process: a campaign's Ray tasks, a 2-worker fleet (Ray Train) and a sweep (Ray Tune)
on one local Ray; and `calozoo mlflow`. While each runs, the listening sockets of every process
below the child (GCS, raylet, workers, agents, the minimal dashboard, the server's workers) are
listed with ``ss -ltnup``, and none may be beyond loopback.
"""

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


def _children(pid: int) -> set[int]:
    """``pid`` and every process below it (from /proc)."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += [c for c, pp in parents.items() if pp == p and c not in out]
    return out


def _listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, pid, process) of every listening TCP/UDP socket of ``pids``."""
    res = subprocess.run(["ss", "-H", "-ltnup"], capture_output=True, text=True, timeout=30, check=True)
    found = []
    for line in res.stdout.splitlines():
        cols = line.split()
        local = cols[4]
        for name, pid in re.findall(r'\("([^"]*)",pid=(\d+)', line):
            if int(pid) in pids:
                found.append((local, int(pid), name))
    return found


def _is_loopback(local: str) -> bool:
    host = local.rsplit(":", 1)[0].strip("[]").split("%")[0]
    if host.startswith("::ffff:"):
        host = host[len("::ffff:"):]
    if host in ("*", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _run_child(script: str, tmp_path, timeout: float) -> dict:
    """Run ``script`` in a child process and return what it printed after ``RESULT``. The child runs with
    Ray's authentication as Ray sets it (the code must not need it off): a process that once ran a Ray
    with token authentication keeps expecting tokens from every later local Ray's workers, so this
    must not happen in the test session."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", script, root, str(tmp_path)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=root)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def test_no_code_switches_ray_authentication_off():
    root = Path(__file__).resolve().parents[1]
    for pkg in ("showers", "zoo", "validate", "trainers", "tune", "registry", "calozoo"):
        for py in (root / pkg).rglob("*.py"):
            assert "RAY_AUTH_MODE" not in py.read_text(), py


_CHILD = """
import json, os, sys, threading
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
import ray
from showers.campaign import CampaignSpec, run_campaign
from showers.detector import get_detector
from showers.localray import init_ray
from tests.test_ray_loopback import _children, _listening
from trainers.data import DataSplit
from trainers.fleet import FleetConfig, run_fleet
from trainers.loop import TrainConfig
from tune.sweep import SweepConfig, run_sweep

out = sys.argv[2]
seen, stop = {}, threading.Event()

def sample():  # every listening socket of this process and its children, while the work runs
    while not stop.is_set():
        for s in _listening(_children(os.getpid())):
            seen[repr(s)] = s
        stop.wait(0.2)

assert init_ray(num_cpus=2, log_to_driver=False)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
try:
    # the campaign's Ray tasks simulate the region that the fleet and the sweep then train on
    campaign = run_campaign(get_detector("atlas-like").select(["photon_eta_020_025"]), out + "/data",
                            CampaignSpec((8192.0, 65536.0), 40, seed=3), progress=False)  # on this Ray
    train, split = TrainConfig(iterations=10, checkpoint_every=10, progress=False, n_val_max=50), DataSplit(0.2, 10)
    fleet = run_fleet(FleetConfig(model="fastcalogan", data_dir=out + "/data", out_dir=out + "/fleet",
                                  regions=["photon_eta_020_025"], train=train, split=split,
                                  overrides={"batch_size": 16}), num_workers=2)
    sweep = run_sweep(SweepConfig(model="fastcalogan", data=out + "/data/photon_eta_020_025.h5", out_dir=out + "/sweep",
                                  mode="grid", only_given=True, space={"batch_size": [16]}, train=train, split=split))
finally:
    stop.set()
    sampler.join()
    ray.shutdown()
import ray._private.ray_constants as rc
print("RESULT " + json.dumps({"campaign": campaign, "fleet": fleet["status"], "trials": len(sweep.trials),
                              "sockets": list(seen.values()), "restored": bool(rc.ENABLE_RAY_CLUSTER)
                              and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ}, default=str))
"""


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
@pytest.mark.timeout(600)
def test_a_local_ray_and_the_campaign_fleet_and_sweep_on_it_listen_on_loopback_only(tmp_path):
    """A campaign's Ray tasks, then a 2-worker fleet (Ray Train) and a sweep (Ray Tune) on the same local
    Ray: every socket their processes listen on while they run is on loopback (the fleet's workers start
    no torch process group, whose rendezvous store would listen on every interface), and the loopback
    switches are put back once Ray is down."""
    result = _run_child(_CHILD, tmp_path, 540)
    assert "error" not in result["campaign"][0], result["campaign"]
    assert result["fleet"] == "FINISHED" and result["trials"] == 1, result
    sockets = [tuple(s) for s in result["sockets"]]
    names = {n for _, _, n in sockets}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), sockets
    open_ = [s for s in sockets if not _is_loopback(s[0])]
    assert not open_, f"listening beyond loopback while a campaign, a fleet and a sweep ran: {open_}"
    assert result["restored"]  # the loopback switches were put back


def test_calozoo_mlflow_listens_on_loopback_only(tmp_path):
    """`calozoo mlflow` (the team's tracking server) and every process it starts: loopback only."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "calozoo", "mlflow", "--port", str(port), "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'mlflow.db'}", "--artifacts-destination", str(tmp_path / "art")],
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from registry.server import wait_for_server

        wait_for_server(f"http://127.0.0.1:{port}", 120, proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200
        sockets = _listening(_children(proc.pid))
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    assert any(f":{port}" in s[0] for s in sockets), sockets
    open_ = [s for s in sockets if not _is_loopback(s[0])]
    assert not open_, f"calozoo mlflow listening beyond loopback: {open_}"
