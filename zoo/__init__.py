"""The model zoo: generative models of calorimeter showers behind one registry and one interface.

    from zoo import create_model, list_models
    model = create_model("par04_vae_pbwo4")

Each family is one file (``par04_vae.py``, ``fastcalogan.py``, ``fast_ar.py``, ``flow_matching.py``); each variant a small
function registered with ``@register_model``. ``zoo.base`` defines the interface.
"""

from zoo._registry import create_model, create_model_for, list_models, model_entrypoint, register_model
from zoo.base import ModelConfig, ShowerModel, model_from_checkpoint

__all__ = ["ModelConfig", "ShowerModel", "create_model", "create_model_for", "list_models", "model_entrypoint",
           "model_from_checkpoint", "register_model"]
