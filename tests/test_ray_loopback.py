"""A local Ray that calozoo starts listens on loopback only (issue #15, item 2).

One Ray start for the whole module (about 8 s): a campaign's Ray tasks run on it, and while it is up
the listening sockets of every process of the Ray session (the driver's children: GCS, raylet,
workers, agents, the minimal dashboard) are listed with ``ss -ltnp`` (or /proc as a fallback).
"""

import ipaddress
import os
import re
import shutil
import subprocess

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


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_local_ray_of_a_campaign_listens_on_loopback_only(tmp_path, monkeypatch):
    from showers.campaign import CampaignSpec, run_campaign
    from showers.detector import get_detector
    from showers.localray import init_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # the code must not need authentication off
    if ray.is_initialized():
        ray.shutdown()
    assert init_ray(num_cpus=2, log_to_driver=False)
    try:
        regions = get_detector("atlas-like").select(["photon_eta_040_045"], None, None)
        res = run_campaign(regions, tmp_path, CampaignSpec((2048.0,), 20), progress=False)  # on this Ray
        assert "error" not in res[0], res
        sockets = _listening(_children(os.getpid()))
        names = {n for _, _, n in sockets}
        assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), sockets
        open_ = [s for s in sockets if not _is_loopback(s[0])]
        assert not open_, f"Ray processes listening beyond loopback: {open_}"
    finally:
        ray.shutdown()
    import ray._private.ray_constants as rc

    assert rc.ENABLE_RAY_CLUSTER and "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ  # put back


def test_no_code_switches_ray_authentication_off():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for pkg in ("showers", "zoo", "validate", "trainers", "tune", "registry", "calozoo"):
        for py in (root / pkg).rglob("*.py"):
            assert "RAY_AUTH_MODE" not in py.read_text(), py
