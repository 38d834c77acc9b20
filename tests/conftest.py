"""Shared test set-up."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

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


def pytest_collection_modifyitems(config, items):
    """The tests on the session's local Ray (``local_ray``) run last, in their usual order: a test that
    needs a Ray of its own (a simulated cluster, ``ray start --head``, the README's commands) shuts
    down the Ray of this process, and between two of them the shared one would start again."""
    shared = {id(item) for item in items if "local_ray" in getattr(item, "fixturenames", ())}
    items[:] = [i for i in items if id(i) not in shared] + [i for i in items if id(i) in shared]


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
