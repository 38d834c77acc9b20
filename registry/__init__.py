"""The registry: MLflow as the system of record.

- ``registry.tracking``: the tracking URI (``MLFLOW_TRACKING_URI``, else ``./mlflow.db``), runs
  that never kill training when the server goes away;
- ``registry.publish``: best epoch, ONNX export with metadata, parity gate, registration, champion
  (needs torch and the zoo: ``from registry.publish import publish``);
- ``registry.pull``: registered models by name for inference with ONNX Runtime;
- ``registry.server``: a real ``mlflow server`` for teams (``calozoo mlflow``).

This package imports only the inference and tracking side (no torch, no Ray), so that
``from registry import pull`` is all a simulation framework needs to generate showers.
"""

from registry.pull import RegistryError, ShowerGenerator, pull, registered_name
from registry.tracking import TrackedRun, tracking_uri

__all__ = ["RegistryError", "ShowerGenerator", "TrackedRun", "pull", "registered_name", "tracking_uri"]
