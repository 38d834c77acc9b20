"""MLflow tracking that never kills a training run.

- :func:`tracking_uri`: ``MLFLOW_TRACKING_URI`` when set, else the embedded default, a sqlite store
  ``./mlflow.db`` with artifacts in ``./mlartifacts`` (the same places ``mlflow server`` and
  ``calozoo mlflow`` use by default, so a later server shows the same runs).
- :class:`TrackedRun`: one MLflow run (named after the model and the region, never a timestamp;
  optionally the child of a fleet's or a sweep's parent run) whose every call goes through a guard:
  a failing call (server gone, network, disk) is written to ``mlflow-pending.jsonl`` in the local
  run folder and replayed later (at the next call once ``retry_after`` seconds have passed, and at
  :meth:`TrackedRun.finish`); what is still pending at the end is reported, and
  ``calozoo mlflow-sync RUN_DIR`` (:func:`flush_pending`) replays it whenever the server is back.
  The run's id is kept in ``mlflow-run.json`` so that a resumed training logs into the same run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["TrackedRun", "artifact_location", "check_store", "flush_pending", "get_client", "get_experiment_id",
           "pending_count", "quick_http", "recorded_run", "tracking_uri"]

log = logging.getLogger("calozoo.registry")

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
PENDING = "mlflow-pending.jsonl"
RUN_FILE = "mlflow-run.json"


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI: ``uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local sqlite store (``mlartifacts/``
    next to the database file); None (the server decides) for a tracking server."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / DEFAULT_ARTIFACTS / experiment).resolve().as_uri()
    return None


@contextlib.contextmanager
def quick_http(retries: int = 1, timeout: float = 10.0):
    """Make MLflow's REST client fail fast (its default retries a dead server for minutes)."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(timeout)),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def fluent_uri(uri: str):
    """Point MLflow's fluent API (``mlflow.start_run``, ``log_model``, ``register_model``) at ``uri``
    for a block, then put back what was there: ``mlflow.set_tracking_uri`` also writes
    ``MLFLOW_TRACKING_URI`` into ``os.environ``, which would silently move every later call of the
    process (and its subprocesses) to that store."""
    import mlflow

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    old = {k: os.environ.get(k) for k in keys}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(old["MLFLOW_REGISTRY_URI"])
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_store(uri: str | None = None) -> str:
    """The tracking URI, if its store can be what it says: a ``sqlite:///PATH`` whose PATH exists must be
    an SQLite database and its folder must exist, else ValueError naming both (sqlalchemy's own error is
    a traceback "file is not a database"). Other stores (a server, PostgreSQL) are checked by use."""
    uri = tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if path.is_dir():
            raise ValueError(f"tracking URI {uri}: {path} is a folder, not an SQLite database file")
        if not path.parent.is_dir():
            raise ValueError(f"tracking URI {uri}: the folder of its database, {path.parent}, does not exist")
        if path.is_file() and path.stat().st_size > 0:
            with path.open("rb") as f:
                head = f.read(16)
            if head != b"SQLite format 3\x00":
                raise ValueError(f"tracking URI {uri}: {path} is not an SQLite database (it starts with "
                                 f"{head[:8]!r}); give another --tracking-uri or MLFLOW_TRACKING_URI")
    return uri


def get_client(uri: str | None = None):
    from mlflow import MlflowClient

    uri = check_store(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def get_experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name))
    except Exception:  # created meanwhile by another process (a fleet's workers)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _flat_params(params: dict, prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts to ``a.b`` keys; long values (a readout's edges) are left to artifacts."""
    out = {}
    for k, v in params.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_params(v, key + "."))
            continue
        text = v if isinstance(v, str) else json.dumps(v)
        if len(text) <= 500:
            out[key] = text
    return out


class TrackedRun:
    """One MLflow run that survives its tracking server going away (see the module docstring).

    name: the run's name (model and region, e.g. ``fastcalogan/photon_eta_020_025``).
    experiment: the experiment (the campaign).
    run_dir: the local run folder (pending operations, the run id).
    params, tags: logged at the start.
    parent_run_id: makes this run a child (fleets, sweeps).
    """

    def __init__(self, name: str, experiment: str, run_dir, *, params: dict | None = None,
                 tags: dict | None = None, parent_run_id: str | None = None, uri: str | None = None,
                 retry_after: float = 30.0, start: bool = True):
        self.name, self.experiment = name, experiment
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri(uri)
        self.parent_run_id = parent_run_id
        self.retry_after = retry_after
        self.run_id: str | None = None
        self._down_since: float | None = None
        self._warned = False
        self.failures = 0
        self._client = get_client(self.uri)
        saved = self.run_dir / RUN_FILE
        if saved.exists():
            info = json.loads(saved.read_text())
            if info.get("tracking_uri") == self.uri and info.get("name") == name:
                self.run_id = info.get("run_id")
        self._params = _flat_params(params or {})
        self._tags = {k: str(v) for k, v in (tags or {}).items()}
        if start:  # flush_pending makes a run that only replays what is pending
            # the store is recorded with the start, so a later replay goes there and nowhere else
            self._do({"op": "start", "name": name, "experiment": experiment, "params": self._params,
                      "tags": self._tags, "parent_run_id": parent_run_id, "tracking_uri": self.uri})

    # -- the guard ------------------------------------------------------------------------------------
    @property
    def pending_path(self) -> Path:
        return self.run_dir / PENDING

    def pending(self) -> list[dict]:
        return _read_pending(self.pending_path)

    def _queue(self, op: dict) -> None:
        with self.pending_path.open("a") as f:
            f.write(json.dumps(op) + "\n")

    def _do(self, op: dict) -> bool:
        """Carry out ``op`` now if the server is reachable (replaying what is pending first), else
        queue it. Never raises."""
        if self._down_since is not None and time.monotonic() - self._down_since < self.retry_after:
            self._queue(op)
            return False
        if self.pending_path.exists() and not self._replay():
            self._queue(op)
            return False
        try:
            with quick_http():
                self._apply(op)
            self._down_since = None
            return True
        except Exception as exc:  # any failure of the tracking side must not stop training
            self._failed(exc)
            self._queue(op)
            return False

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self._down_since = time.monotonic()
        if not self._warned:
            self._warned = True
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            log.warning("MLflow at %s unreachable (%s); training goes on, logging to %s and retrying every %.0f s",
                        self.uri, first, self.pending_path, self.retry_after)

    def _replay(self) -> bool:
        ops = self.pending()
        done = 0
        try:
            with quick_http():
                for op in ops:
                    self._apply(op)
                    done += 1
        except Exception as exc:
            self._failed(exc)
            rest = ops[done:]
            tmp = self.pending_path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(o) + "\n" for o in rest))
            os.replace(tmp, self.pending_path)
            return False
        self.pending_path.unlink(missing_ok=True)
        self._down_since = None
        return True

    def _apply(self, op: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind = op["op"]
        if kind == "start":
            self._start()
            return
        if self.run_id is None:
            self._start()
        c = self._client
        if kind == "metrics":
            ts = int(op.get("ts", time.time() * 1000))
            metrics = [Metric(k, float(v), ts, int(op["step"])) for k, v in op["metrics"].items()]
            c.log_batch(self.run_id, metrics=metrics, synchronous=True)
        elif kind == "tags":
            c.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in op["tags"].items()], synchronous=True)
        elif kind == "params":
            c.log_batch(self.run_id, params=[Param(k, v) for k, v in op["params"].items()], synchronous=True)
        elif kind == "artifact":
            path = Path(op["path"])
            if path.is_dir():
                c.log_artifacts(self.run_id, str(path), op.get("artifact_path"))
            elif path.exists():
                c.log_artifact(self.run_id, str(path), op.get("artifact_path"))
            else:
                log.warning("artifact %s no longer exists; not logged", path)
        elif kind == "finish":
            c.set_terminated(self.run_id, op["status"])
        else:
            raise ValueError(f"unknown pending MLflow operation {kind!r}")

    def _start(self) -> None:
        from mlflow.entities import Param

        c = self._client
        if self.run_id is not None:
            run = c.get_run(self.run_id)
            if run.info.status != "RUNNING":
                c.update_run(self.run_id, status="RUNNING")
            return
        exp_id = get_experiment_id(c, self.experiment)
        tags = dict(self._tags)
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = c.create_run(exp_id, run_name=self.name, tags=tags)
        self.run_id = run.info.run_id
        if self._params:
            items = list(self._params.items())
            for i in range(0, len(items), 100):
                c.log_batch(self.run_id, params=[Param(k, v) for k, v in items[i:i + 100]], synchronous=True)
        text = json.dumps({"run_id": self.run_id, "tracking_uri": self.uri, "name": self.name,
                           "experiment": self.experiment}, indent=1)
        (self.run_dir / RUN_FILE).write_text(text)

    # -- what training calls ----------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}
        self._do({"op": "metrics", "metrics": clean, "step": int(step), "ts": int(time.time() * 1000)})

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._do({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_params(self, params: dict[str, Any]) -> None:
        self._do({"op": "params", "params": _flat_params(params)})

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self._do({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def finish(self, status: str = "FINISHED") -> list[dict]:
        """End the run (a last replay of what is pending); returns what is still pending."""
        self._down_since = None  # try once more now, whatever the back-off says
        self._do({"op": "finish", "status": status})
        left = self.pending()
        if left:
            log.warning("%d MLflow operations of run %r could not be logged; they are kept in %s: "
                        "`calozoo mlflow-sync %s` logs them once the server is back",
                        len(left), self.name, self.pending_path, self.run_dir)
        return left

    @property
    def ok(self) -> bool:
        return not self.pending_path.exists()


def _read_pending(path: Path) -> list[dict]:
    if not path.exists():
        return []
    ops = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            op = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: line {i} is not a pending MLflow operation ({exc})") from None
        if not isinstance(op, dict) or "op" not in op:
            raise ValueError(f"{path}: line {i} is not a pending MLflow operation (no 'op')")
        ops.append(op)
    return ops


def recorded_run(run_dir) -> dict:
    """What a run folder recorded of its MLflow run ({} if nothing): ``mlflow-run.json`` (run id,
    tracking URI, name, experiment), completed by the pending start (the server was away)."""
    run_dir = Path(run_dir)
    info = {}
    if (run_dir / RUN_FILE).exists():
        try:
            info = json.loads((run_dir / RUN_FILE).read_text())
            if not isinstance(info, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise ValueError(f"{run_dir / RUN_FILE}: not a run record ({exc})") from None
    start = next((o for o in _read_pending(run_dir / PENDING) if o["op"] == "start"), {})
    for key in ("name", "experiment", "tracking_uri"):
        if not info.get(key) and start.get(key):
            info[key] = start[key]
    return info


def pending_count(run_dir) -> int:
    """How many MLflow operations a run folder holds that are not logged yet."""
    return len(_read_pending(Path(run_dir) / PENDING))


def flush_pending(run_dir, uri: str | None = None) -> int:
    """Replay a run folder's pending MLflow operations into the store the run recorded when it
    started (``uri``: another store, chosen explicitly; the shell's ``MLFLOW_TRACKING_URI`` is not
    asked). Returns how many are left (0: all logged). Refuses a folder that is not a tracked run's,
    and a run that recorded no store when no ``uri`` is given."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).exists() and not (run_dir / PENDING).exists():
        raise ValueError(f"{run_dir}: not a tracked run folder (no {RUN_FILE} or {PENDING}): nothing to log")
    info = recorded_run(run_dir)
    if not (run_dir / PENDING).exists():
        return 0
    start = next((o for o in _read_pending(run_dir / PENDING) if o["op"] == "start"), {})
    name, experiment = info.get("name"), info.get("experiment")
    if not name or not experiment:
        raise ValueError(f"{run_dir}: no {RUN_FILE} and no recorded run name; cannot replay {PENDING}")
    target = uri or info.get("tracking_uri")
    if not target:
        raise ValueError(f"{run_dir}: the run did not record its tracking store (an older calozoo); say where to "
                         "log it with --tracking-uri")
    run = TrackedRun(name, experiment, run_dir, params=start.get("params"), tags=start.get("tags"),
                     parent_run_id=start.get("parent_run_id"), uri=target, retry_after=0.0, start=False)
    run._replay()
    return len(run.pending())
