"""Shared test set-up."""

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

# The models in the tests are tiny: on a shared 2-core machine two OpenMP threads make a small step
# hundreds of times slower than one.
torch.set_num_threads(1)
