"""The registry against a real `mlflow server` process on loopback: the whole chain, the MLflow UI in
headless Chromium, and a training that outlives its tracking server."""

import html
import json
import os
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path
from urllib.parse import urljoin

import numpy as np
import pytest
import torch

from calozoo.tracked import train_tracked
from registry import pull
from registry.publish import publish
from registry.server import start_server, stop_server
from registry.tracking import TrackedRun, flush_pending, get_client
from zoo.checkpoint import CheckpointManager, load_checkpoint
from trainers.loop import TrainConfig, train
from zoo import model_from_checkpoint
from zoo.export import relative_difference

from .test_registry import split, tiny_gan  # noqa: F401 (a fixture)

ARTIFACTS = Path(os.environ.get("CALOZOO_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = start_server(f"sqlite:///{root / 'mlflow.db'}", str(root / "mlartifacts"), port,
                        log_path=root / "server.log")
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def published(server, split, tmp_path_factory):  # noqa: F811
    os.environ["CALOZOO_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    run_dir = tmp_path_factory.mktemp("run")
    tr, va = split
    cfg = TrainConfig(iterations=20, checkpoint_every=10, progress=False)
    _, run = train_tracked(tiny_gan(0), tr, va, cfg, run_dir, campaign="server", region="r0", uri=server)
    assert run.ok
    return publish(run_dir), run_dir


def test_chain_against_a_server(server, published):
    pub, run_dir = published
    assert pub.champion and pub.parity["ok"] and pub.parity["margin"] >= 1.0
    client = get_client(server)
    assert str(client.get_model_version_by_alias(pub.name, "champion").version) == pub.version
    gen = pull(f"{pub.name}@champion", uri=server)
    energies = np.array([4000.0, 16000.0, 64000.0] * 4)
    noise = np.random.default_rng(0).standard_normal((len(energies), gen.noise_dim), dtype=np.float32)
    best = CheckpointManager(run_dir / "checkpoints").best()
    model = model_from_checkpoint(load_checkpoint(run_dir / "checkpoints" / best["file"])).eval()
    expected = model.sample(energies, noise=torch.from_numpy(noise)).numpy()
    assert relative_difference(gen.generate(energies, noise=noise), expected) <= 1e-4


def chromium(url: str, *args, profile: Path, budget_ms: int = 10_000) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--window-size=1400,900", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CALOZOO_REQUIRE_BROWSER"),
    reason="no chromium (apt-get install chromium; .ci/run installs it and requires this test)")


def rendered(url: str, name: str, profile: Path, expect: str) -> tuple[str, str]:
    """(DOM, its text with spaces collapsed) of a page as headless Chromium renders it; the DOM is kept in
    ARTIFACTS/NAME.html. The page is a JavaScript app that fetches what it shows from the server: rendered
    again with more time (up to 60 s of its clock) until ``expect`` is on it, as a busy machine needs."""
    assert CHROMIUM, "CALOZOO_REQUIRE_BROWSER is set but chromium is not installed"
    for budget_ms in (10_000, 30_000, 60_000):
        dom = chromium(url, "--dump-dom", profile=profile, budget_ms=budget_ms)
        text = html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<style[^>]*>.*?</style>", " ", dom.stdout, flags=re.S)))
        text = " ".join(text.split())
        if expect in text:
            break
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.html").write_text(dom.stdout)
    return dom.stdout, text


@needs_chromium
def test_mlflow_ui_shows_the_champion(server, published, tmp_path):
    pub, _ = published
    url = f"{server}/#/models/{pub.name}"
    _, text = rendered(url, "mlflow-registered-model", tmp_path / "p1", expect="champion")
    assert pub.name in text, text[:2000]
    # the alias chip of version 1 reads "@ champion" (the tag champion_decision does not count)
    assert re.search(rf"Version {pub.version}\b.*@\s*champion", text, flags=re.S), "no champion alias on the page"
    png = ARTIFACTS / "mlflow-registered-model.png"
    png.unlink(missing_ok=True)
    chromium(url, f"--screenshot={png}", profile=tmp_path / "p2")
    assert png.exists() and png.stat().st_size > 10_000


@needs_chromium
def test_mlflow_ui_model_version_shows_how_good_it_is(server, published, tmp_path):
    """The model version's page answers "how good is it" without opening runs: the champion measure and the
    decision, the figures against held-out showers beside their floor, the profile plot (served from the
    version's own files), the parity margin, and the contract (Schema: 2 inputs, 1 output)."""
    pub, _ = published
    url = f"{server}/#/models/{pub.name}/versions/{pub.version}"
    dom, text = rendered(url, "mlflow-model-version", tmp_path / "p1", expect="Outputs (1)")
    for words in ("Champion measure", "Decision: first version", "Against held-out showers",
                  "separation power of E_tot/E_inc, worst energy", "largest difference of the mean radial profile",
                  "FPD (Fréchet physics distance)", "Parity gate", "Inputs (2)", "Outputs (1)", "heldout.floor.max_long_rel"):
        assert words in text, (words, text[:3000])
    assert re.search(r"largest difference of the mean longitudinal profile \d\S* \d", text), text[:3000]
    src = re.search(r'<img[^>]+src="([^"]*logged-models/[^"]*/artifacts/files[^"]*)"', dom)
    assert src, "the description shows no plot"
    with urllib.request.urlopen(urljoin(f"{server}/", html.unescape(src.group(1))), timeout=30) as r:
        assert r.read(8) == b"\x89PNG\r\n\x1a\n"
    png = ARTIFACTS / "mlflow-model-version.png"
    png.unlink(missing_ok=True)
    chromium(url, f"--screenshot={png}", "--window-size=1400,2200", profile=tmp_path / "p2")
    assert png.exists() and png.stat().st_size > 30_000


def test_an_alias_moved_as_the_ui_moves_it_is_followed(server, published):
    """The MLflow UI moves an alias with a POST to ajax-api/2.0/mlflow/registered-models/alias: pulls and the
    next registration's champion decision follow it, whoever set it."""
    pub, _ = published
    client = get_client(server)
    first = client.get_model_version(pub.name, pub.version)
    second = client.create_model_version(pub.name, first.source, run_id=first.run_id, tags=first.tags,
                                         model_id=first.source.rsplit("/", 1)[-1])

    def ui_alias(version):
        body = json.dumps({"name": pub.name, "alias": "champion", "version": str(version)}).encode()
        request = urllib.request.Request(f"{server}/ajax-api/2.0/mlflow/registered-models/alias", data=body,
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as r:
            assert r.status == 200

    try:
        ui_alias(second.version)
        assert pull(f"{pub.name}@champion", uri=server).version == str(second.version)
    finally:
        ui_alias(pub.version)
    assert pull(f"{pub.name}@champion", uri=server).version == pub.version


def test_training_outlives_its_tracking_server(split, tmp_path):  # noqa: F811
    db, arts, port = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "mlartifacts"), free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = start_server(db, arts, port)
    try:
        run = TrackedRun("fastcalogan/r0", "outage", tmp_path / "run", params={"lr": 1e-3}, uri=uri, retry_after=0.0)
        assert run.ok

        def log(record, iteration):
            run.log_metrics(record, iteration)
            if iteration == 10:
                stop_server(proc)  # the server goes away mid-training

        tr, va = split
        result = train(tiny_gan(0), tr, va, TrainConfig(iterations=30, checkpoint_every=10, progress=False),
                       tmp_path / "run", log=log)
        assert result.iteration == 30 and len(result.history) == 3
        left = run.finish()
        assert [op["op"] for op in left] == ["metrics", "metrics", "finish"] and run.failures >= 3

        proc = start_server(db, arts, port)  # back, on the same store
        assert flush_pending(tmp_path / "run") == 0
        client = get_client(uri)
        assert [m.step for m in client.get_metric_history(run.run_id, "chi2_sum")] == [10, 20, 30]
        assert client.get_run(run.run_id).info.status == "FINISHED"
    finally:
        stop_server(proc)
