"""A local Ray that calozoo starts listens on loopback only (issue #15, item 2).

One Ray start, in a child process (about 8 s): a campaign's Ray tasks run on it, and while it is up
the listening sockets of every process of the Ray session (the driver's children: GCS, raylet,
workers, agents, the minimal dashboard) are listed with ``ss -ltnup``.
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


_CHILD = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import ray
from showers.campaign import CampaignSpec, run_campaign
from showers.detector import get_detector
from showers.localray import init_ray
from tests.test_ray_loopback import _children, _listening

assert init_ray(num_cpus=2, log_to_driver=False)
try:
    regions = get_detector("atlas-like").select(["photon_eta_040_045"], None, None)
    res = run_campaign(regions, sys.argv[2], CampaignSpec((2048.0,), 20), progress=False)  # on this Ray
    sockets = _listening(_children(os.getpid()))
finally:
    ray.shutdown()
import ray._private.ray_constants as rc
print("RESULT " + json.dumps({"campaign": res, "sockets": sockets, "restored": bool(rc.ENABLE_RAY_CLUSTER)
                              and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ}, default=str))
"""


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_local_ray_of_a_campaign_listens_on_loopback_only(tmp_path):
    # In a child process with Ray's authentication as Ray sets it (the code must not need it off): a
    # process that once ran a Ray with token authentication keeps expecting tokens from every later
    # local Ray's workers, so this test must not leave that in the test session.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", _CHILD, root, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=root)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in result["campaign"][0], result["campaign"]
    sockets = result["sockets"]
    names = {n for _, _, n in sockets}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), sockets
    open_ = [s for s in sockets if not _is_loopback(s[0])]
    assert not open_, f"Ray processes listening beyond loopback: {open_}"
    assert result["restored"]  # the loopback switches were put back


def test_no_code_switches_ray_authentication_off():
    root = Path(__file__).resolve().parents[1]
    for pkg in ("showers", "zoo", "validate", "trainers", "tune", "registry", "calozoo"):
        for py in (root / pkg).rglob("*.py"):
            assert "RAY_AUTH_MODE" not in py.read_text(), py
