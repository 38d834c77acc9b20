"""The one way calozoo starts or joins Ray: a local Ray listens on loopback only.

Every ``ray.init`` of the project goes through :func:`init_ray` (campaigns, fleets, sweeps, the demo).

- With an address (the argument, else ``RAY_ADDRESS``: ``"auto"``, ``"ray://host:10001"``,
  ``"10.0.0.1:6379"``) it connects to that cluster as it is: the cluster's own set-up (``ray start``
  and its authentication) decides where it listens.
- Without one it starts a single-node Ray whose every process (GCS, raylet, workers, dashboard and
  runtime-env agents, the minimal dashboard) binds to 127.0.0.1. Ray 2.60 turns a node IP of
  ``127.0.0.1`` given to ``ray.init(_node_ip_address=...)`` into the machine's routable address
  (``services.resolve_ip_for_localhost``) and then listens on every interface; the node IP stays on
  loopback only when Ray believes that clusters are off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
  read at import as ``ray_constants.ENABLE_RAY_CLUSTER``). Both are set for the start alone and put
  back afterwards, so a later connection to a real cluster from the same process is unaffected.

Authentication is never switched off here: Ray's token authentication (on by default) protects the
local Ray too. ``tests/test_ray_loopback.py`` lists the listening sockets of every process such a
Ray starts and finds none beyond loopback.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["LOOPBACK", "init_ray", "local_gpus_missing", "require_resources"]

LOOPBACK = "127.0.0.1"
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only():
    from ray._private import ray_constants

    old_env, old_const = os.environ.get(_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_ENV] = "0"  # the processes Ray starts read it at import
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process read it already
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = old_env


def init_ray(address: str | None = None, *, num_cpus: int | None = None, **kwargs) -> bool:
    """Connect to the Ray at ``address`` (else ``RAY_ADDRESS``), or start a local Ray on loopback.

    num_cpus: CPUs of a local Ray (ignored when connecting). kwargs: more ``ray.init`` arguments
    (``log_to_driver``, ``configure_logging``, ...); a local Ray never starts the dashboard UI.
    Returns True if this call initialised Ray (the caller then owns ``ray.shutdown()``), False if Ray
    was already initialised in this process.
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs.setdefault("include_dashboard", False)
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:  # Ray's own text ends in advice about --address, which we were given
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConnectionError(f"no Ray cluster at address {address!r} ({first.split('. ')[0]}): start one "
                                  "with `ray start --head` or `ray up cluster.yaml`, or leave out --address "
                                  "(and RAY_ADDRESS) for a local Ray") from None
        return True
    kwargs["include_dashboard"] = False
    with _loopback_only():
        # address="local": a Ray of this process's own, never one that `ray start` left up on this machine
        # (another user's, or another run's): without it ray.init() joins that one
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK, **kwargs)
    return True


def require_resources(asks: dict[str, float], what: str, address: str | None = None) -> None:
    """Refuse, in one line, work that asks the Ray this process is connected to for more than it has
    (``asks``: {"CPU": 2, "GPU": 1}; ``what``: the work and its option, for the message), instead of
    leaving it to wait forever. A local Ray cannot grow; a cluster (``address`` or ``RAY_ADDRESS``)
    may have an autoscaler that adds GPU nodes when asked, so there it only warns."""
    import logging

    import ray

    if not ray.is_initialized():
        raise RuntimeError("require_resources: connect to Ray first (init_ray)")
    have = ray.cluster_resources()
    short = {k: v for k, v in asks.items() if v > have.get(k, 0.0)}
    if not short:
        return
    text = ", ".join(f"{v:g} {k}" for k, v in short.items())
    held = ", ".join(f"{have.get(k, 0.0):g} {k}" for k in short)
    if address or os.environ.get("RAY_ADDRESS"):
        logging.getLogger("calozoo.showers").warning("%s asks for %s but the Ray cluster has %s now: waiting for "
                                                     "its autoscaler", what, text, held)
        return
    hint = " (this machine has no GPU that torch can use)" if "GPU" in short else ""
    raise ValueError(f"{what} asks for {text}, but the local Ray has {held}{hint}: it could never start")


def local_gpus_missing(address: str | None = None) -> bool:
    """True when Ray would be started here (no ``address``, no ``RAY_ADDRESS``, none running) on a
    machine without a GPU torch can use: a request for GPUs (``--device cuda``) can be refused before Ray starts."""
    import ray
    import torch

    return not (address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()) and not torch.cuda.is_available()
