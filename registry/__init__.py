"""The registry: MLflow as the system of record.

- ``registry.tracking``: the tracking URI (``MLFLOW_TRACKING_URI``, else ``./mlflow.db``), runs
  that never kill training when the server goes away;
- ``registry.training``: the single-model trainer with MLflow tracking;
- ``registry.publish``: best epoch, ONNX export with metadata, parity gate, registration, champion;
- ``registry.pull``: registered models by name for inference with ONNX Runtime;
- ``registry.server``: a real ``mlflow server`` for teams (``calozoo mlflow``).
"""

from registry.publish import ALIAS, ParityError, Publication, publish, registered_name
from registry.pull import RegistryError, ShowerGenerator, pull
from registry.tracking import TrackedRun, tracking_uri
from registry.training import train_tracked

__all__ = ["ALIAS", "ParityError", "Publication", "RegistryError", "ShowerGenerator", "TrackedRun", "publish",
           "pull", "registered_name", "tracking_uri", "train_tracked"]
