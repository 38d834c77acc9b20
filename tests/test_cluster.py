"""cluster.yaml passes Ray's own cluster-config validation, and says what a fleet needs."""

import copy
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).parents[1] / "cluster.yaml"


def validate(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_is_valid_for_ray():
    cfg = yaml.safe_load(CLUSTER.read_text())
    prepared = validate(cfg)
    nodes = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head" and nodes["head"]["resources"] == {"CPU": 0}
    assert nodes["gpu_worker"]["min_workers"] == 0 and nodes["gpu_worker"]["max_workers"] >= 1
    setup = "\n".join(cfg["setup_commands"])
    assert "ray[default,train,tune]" in setup and "MLFLOW_TRACKING_URI" in setup
    assert any("/shared" in c for c in cfg["initialization_commands"])  # shared checkpoints


def test_validation_rejects_a_broken_config():
    cfg = yaml.safe_load(CLUSTER.read_text())
    cfg["available_node_types"]["gpu_worker"]["max_workers"] = "eight"
    with pytest.raises(Exception, match="not of type 'integer'"):
        validate(cfg)
