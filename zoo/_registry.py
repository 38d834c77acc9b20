"""The model registry: named variants, each a small function that fills a config and builds a model
(the way timm declares its variants)."""

from __future__ import annotations

from typing import Callable

__all__ = ["register_model", "create_model", "create_model_for", "list_models", "model_entrypoint"]

_ENTRYPOINTS: dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Decorator: register ``fn(**overrides) -> ShowerModel`` under its function name."""
    name = fn.__name__
    if name in _ENTRYPOINTS:
        raise ValueError(f"model {name!r} is already registered (by {_ENTRYPOINTS[name].__module__})")
    _ENTRYPOINTS[name] = fn
    return fn


def list_models(pattern: str | None = None) -> list[str]:
    """Names of the registered variants, optionally filtered by a glob pattern."""
    import fnmatch

    _import_families()
    names = sorted(_ENTRYPOINTS)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def model_entrypoint(name: str) -> Callable:
    _import_families()
    try:
        return _ENTRYPOINTS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(_ENTRYPOINTS))}") from None


def create_model(name: str, **overrides):
    """Build the variant ``name``; keyword arguments override fields of its config."""
    return model_entrypoint(name)(**overrides)


def create_model_for(name: str, readout, **overrides):
    """The variant ``name`` for showers of ``readout`` (a ``showers.readout.Readout``): the one place
    that decides which model trains on which data, for the CLI, sweeps, fleets and the demo. The
    variant keeps its architecture and takes the data's readout (a region's voxel count sets its
    widths); a ``readout`` among the overrides wins."""
    return create_model(name, **{"readout": readout.to_dict(), **overrides})


def _import_families() -> None:
    # importing a family's module registers its variants
    import zoo.fast_ar  # noqa: F401
    import zoo.flow_matching  # noqa: F401
    import zoo.fastcalogan  # noqa: F401
    import zoo.par04_vae  # noqa: F401
