"""Shared test set-up."""

import atexit
import fcntl
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray Train's controller looks at its workers every 2 s by default, so every fleet waits up to 2 s to learn that
# its workers started, reported or ended; the tests' fleets are seconds long (a local Ray, the tests' `ray
# start` and their subprocesses inherit this)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

import torch  # noqa: E402

# The models in the tests are tiny: on a shared 2-core machine two OpenMP threads make a small step
# hundreds of times slower than one.
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_stores(tmp_path_factory):
    """Nothing a test does lands in the repository or the home folder: MLflow's embedded default
    (./mlflow.db), the pulled-model cache and calozoo's configuration folder (the sweep signing key)
    point into the session's temporary folder unless a test sets its own."""
    root = tmp_path_factory.mktemp("stores")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    os.environ.setdefault("CALOZOO_CACHE", str(root / "cache"))
    os.environ.setdefault("CALOZOO_CONFIG_DIR", str(root / "config"))
    yield


@pytest.fixture(autouse=True, scope="session")
def _no_ray_at_exit():
    """The local Ray that in-process fleets and sweeps leave up (a CLI process leaves its own to its exit) is
    shut down here, before the interpreter's own end. Once, after every test had passed, a thread other
    than the main one crashed (segmentation fault) while Python finalised, and took the suite's exit
    status with it; the threads of a Ray core worker still up are the likeliest such thread."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def uses_ray(item) -> bool:
    """Whether a test starts or joins a Ray: it asks for ``local_ray``, or is marked ``ray``."""
    return "local_ray" in getattr(item, "fixturenames", ()) or item.get_closest_marker("ray") is not None


def pytest_collection_modifyitems(config, items):
    """The tests that run a Ray come first: with several test processes (``make test``: pytest-xdist,
    ``--dist worksteal``, each process given a contiguous share of this order and the later tests of a
    busy process taken by an idle one), they all land in the first process, one after another, while
    the others run the rest; they are also the longest work. Among them, the tests on the session's local
    Ray (``local_ray``) run last, in their usual order: a test that needs a Ray of its own (a simulated
    cluster, ``ray start --head``, a docs page's commands) shuts down the Ray of this process, and between
    two of them the shared one would start again."""
    shared = {id(item) for item in items if "local_ray" in getattr(item, "fixturenames", ())}
    own = {id(item) for item in items if uses_ray(item)} - shared
    items[:] = ([i for i in items if id(i) in own] + [i for i in items if id(i) in shared]
                + [i for i in items if id(i) not in shared and id(i) not in own])


@pytest.fixture(autouse=True)
def _one_ray_at_a_time(request, tmp_path_factory):
    """A test that runs a Ray holds a lock that every test process of the session shares, so that no two
    Rays run side by side even where the order above does not keep them in one process: two Rays
    starting workers on a small machine slow each other past Ray Train's start-up timeouts, and ``ray
    stop`` (tests/test_jobs.py) ends every Ray process of the machine."""
    if not uses_ray(request.node):
        yield
        return
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each test process's own
    with open(root / "ray.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_runtest_teardown(item, nextitem):
    """The Ray this process runs ends with the last test that uses it, not at the session's end: its
    processes would otherwise idle beside the tests that follow."""
    if uses_ray(item) and (nextitem is None or not uses_ray(nextitem)):
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()


@pytest.fixture
def local_ray():
    """The session's one local Ray (a Ray start costs seconds on 2 cores): in-process fleets, sweeps,
    campaigns and the demo find it up and run on it, as they run on any Ray that is already
    initialised. Started through calozoo's own ``init_ray`` (loopback only) by the first test that
    asks for it, again by the next one if a test shut it down; ``_no_ray_at_exit`` ends it."""
    import ray

    from showers.localray import init_ray

    if not ray.is_initialized():
        init_ray(num_cpus=2, log_to_driver=False)
    return ray


_TEMPLATE: list[Path] = []


def mlflow_store(path) -> str:
    """``sqlite:///PATH``: a new, empty MLflow store at ``path``, copied from one that MLflow built once
    for the session (building a store's schema takes about 2 s on 2 cores, a copy milliseconds)."""
    if not _TEMPLATE:
        from mlflow import MlflowClient

        folder = Path(tempfile.mkdtemp(prefix="calozoo-mlflow-template-"))
        atexit.register(shutil.rmtree, folder, True)
        MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
        _TEMPLATE.append(folder / "mlflow.db")
    shutil.copyfile(_TEMPLATE[0], path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def registered(tmp_path_factory):
    """A small untrained FastCaloGAN (atlas-like photon_eta_020_025) exported the way ``registry.publish``
    exports it (its metadata included), registered as ``layering.fastcalogan.r0@champion`` (a name of the
    former naming CAMPAIGN.FAMILY.REGION) in a fresh sqlite store: (ONNX file, store URI, voxels)."""
    import torch
    from mlflow import MlflowClient

    from registry.publish import export_metadata
    from registry.tracking import artifact_location
    from showers.detector import get_detector
    from zoo.export import export_onnx
    from zoo.fastcalogan import for_region

    tmp = tmp_path_factory.mktemp("layering")
    region = get_detector("atlas-like").select(["photon_eta_020_025"])[0]
    torch.manual_seed(0)
    model = for_region(region)
    name = "layering.fastcalogan.r0"
    path = export_onnx(model, tmp / "model.onnx", export_metadata(model, {"iteration": 0}, name=name,
                                                                    campaign="layering", region=region.name))
    uri = mlflow_store(tmp / "mlflow.db")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.create_run(client.create_experiment("layering", artifact_location=artifact_location(uri, "layering")))
    client.log_artifact(run.info.run_id, str(path), "model")
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)
    return path, uri, model.n_voxels
