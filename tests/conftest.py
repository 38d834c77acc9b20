"""Shared test set-up."""

import os

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
    (./mlflow.db) and the pulled-model cache point into the session's temporary folder unless a test
    sets its own."""
    root = tmp_path_factory.mktemp("stores")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    os.environ.setdefault("CALOZOO_CACHE", str(root / "cache"))
    yield
