"""Sweeps: grid and ASHA hyper-parameter search with Ray Tune.

``run_sweep`` runs a Ray Tune ``Tuner`` over :func:`_trial`, which trains one model with the same
trainer as everywhere (``trainers.loop.train``): no second training loop. The search space is the
family's typed ``SearchSpace`` (declared next to its config in ``zoo/``), optionally restricted.

- ``mode="grid"``: every combination of the candidates, run to the end.
- ``mode="asha"``: ``num_samples`` random combinations under ``ASHAScheduler`` (metric: the
  best-epoch ``criterion`` (``validate.metrics``: χ²/ndf of E_tot, layer energies, centres and widths),
  the validation χ² sum of E_tot, the E_tot separation power, or ``etot_shift``, the distance of the mean E_tot
  in reference standard deviations, which does not saturate early in training as the other two do
  once a generator's peak is off the reference's histogram; mode min), which stops bad trials at rungs of
  ``grace_period`` × ``reduction_factor``^k training iterations. Time is counted in training
  iterations (``time_attr="iteration"``), so a resumed trial is judged where it really is.

Each trial trains into ``OUT/trials/<trial id>/`` (its checkpoints, at most ``keep_checkpoints``
files; nothing is reported to Ray as a checkpoint), so an interrupted sweep resumes with
:func:`resume_sweep` (``Tuner.restore``): finished trials are not repeated and unfinished ones go on
from their last checkpoint. Trial names come from their ids and parameters, never timestamps. The
best trial's config is written to ``OUT/best.json``, which ``calozoo train --config`` and
``calozoo fleet --config`` accept.

Tracking is a :class:`SweepTracker` the sweep is handed (calozoo's: every trial an MLflow child run
of the sweep's, ``calozoo.tracked``); the sweep itself imports no tracking library.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Protocol

import torch
from ray.tune import Callback

from showers.lock import writer_lock
from showers.progress import LogProgress
from trainers.data import DataSplit, load_showers
from trainers.loop import TrainConfig, train
from tune.signing import Signer, key_path, unsigned_pickles
from zoo import create_model, create_model_for
from zoo.base import SearchSpace, ShowerModel

__all__ = ["SweepConfig", "SweepResult", "SweepTracker", "TrialProgress", "check_config", "check_resumable",
           "load_best", "load_config", "param_space", "resume_sweep", "retrain_best", "run_sweep", "search_space",
           "trial_label"]

METRICS = ("criterion", "chi2_sum", "sep_power", "etot_shift")
#: at most this many trials in a sweep (and running at once)
MAX_TRIALS = 100_000


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep trains and how it searches.

    model: a zoo variant; data: a CaloChallenge file (or folder) with the readout in its attributes.
    space: candidates per config field ({} = the family's whole search space; a field given here
        replaces its candidates, others keep theirs unless ``only_given``).
    train: how every trial trains (its ``seed`` also seeds the models, the split and the search).
    split: the training/validation split of the data.
    """

    model: str
    data: str
    out_dir: str
    mode: str = "asha"
    space: dict = field(default_factory=dict)
    only_given: bool = False
    num_samples: int = 8
    metric: str = "criterion"
    grace_period: int = 1  # in checkpoints: the first rung is at grace_period × checkpoint_every
    reduction_factor: float = 2.0
    train: TrainConfig = field(default_factory=lambda: TrainConfig(progress=False))
    split: DataSplit = field(default_factory=DataSplit)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None

    def __post_init__(self):
        # a config read back from sweep.json has dicts here
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", TrainConfig(**{"progress": False, **self.train}))
        if isinstance(self.split, dict):
            object.__setattr__(self, "split", DataSplit(**self.split))
        if not 0 < self.cpus_per_trial <= 4096 or not 0 <= self.gpus_per_trial <= 64:
            raise ValueError(f"cpus_per_trial must be > 0 (and at most 4096) and gpus_per_trial >= 0 (and at most 64), "
                             f"got {self.cpus_per_trial} and {self.gpus_per_trial}")
        if self.mode not in ("grid", "asha"):
            raise ValueError(f"mode must be 'grid' or 'asha', got {self.mode!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        for name, high in (("num_samples", MAX_TRIALS), ("grace_period", 1_000_000), ("max_concurrent", MAX_TRIALS)):
            value = getattr(self, name)
            if name == "max_concurrent" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{name} must be a whole number from 1 to {high:,}, got {value!r}")
        if not 1.0 < self.reduction_factor <= 1000.0:
            raise ValueError(f"reduction_factor must be above 1 (ASHA keeps 1/this of the trials per rung), got "
                             f"{self.reduction_factor!r}")


@dataclass
class SweepResult:
    best: dict
    trials: list[dict]
    n_stopped_early: int
    seconds: float
    path: str


class SweepTracker(Protocol):
    """How a sweep records its trials without importing a tracking library (calozoo hands it an
    MLflow one). It is pickled to the trials, so it holds only what pickles (a URI, a run id)."""

    def start_trial(self, trial_id: str, model: ShowerModel, params: dict,
                    run_dir: Path) -> tuple[Callable[[dict, int], None], Callable[[], object]]:
        """Called in the trial before it trains (again when it resumes); returns
        ``(log(record, iteration), finish())``, ``finish`` called however the trial ends."""


def load_config(path) -> SweepConfig:
    """The :class:`SweepConfig` a sweep folder was started with (``OUT/sweep.json``, or that file
    itself); fields this version no longer has (the tracking fields of older sweeps) are ignored. Plain
    JSON: nothing in it runs."""
    path = Path(path)
    path = path / "sweep.json" if path.is_dir() else path
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a sweep's sweep.json ({_first_line(exc)})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a sweep's sweep.json (a JSON object of settings is expected)")
    try:
        return _sweep_config(saved)
    except TypeError as exc:
        raise ValueError(f"{path}: not a sweep's sweep.json ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _sweep_config(saved: dict) -> SweepConfig:
    known = {f.name for f in fields(SweepConfig)}
    return SweepConfig(**{k: v for k, v in saved.items() if k in known})


def search_space(cfg: SweepConfig) -> SearchSpace:
    """The family's typed search space, restricted as ``cfg.space`` and ``cfg.only_given`` say."""
    cls = type(create_model(cfg.model)).search_space
    if cfg.only_given:
        return cls.restricted(only=True, **cfg.space)
    base = cls().candidates()
    base.update({k: list(v) for k, v in cfg.space.items()})
    return cls.restricted(**base)


def param_space(cfg: SweepConfig) -> dict:
    """The Tune param_space: grid_search over the candidates (grid), or choice among them (asha)."""
    from ray import tune

    cands = search_space(cfg).candidates()
    if not cands:
        raise ValueError(f"{cfg.model}: empty search space")
    pick = tune.grid_search if cfg.mode == "grid" else tune.choice
    return {"params": {k: pick([list(x) if isinstance(x, tuple) else x for x in v]) for k, v in cands.items()}}


def trial_label(params: dict) -> str:
    """A trial's parameters in one short line, e.g. ``learning_rate=0.0001,n_critic=5``."""
    def short(v):
        if isinstance(v, (list, tuple)):
            return "-".join(map(str, v))
        return f"{v:g}" if isinstance(v, float) else str(v)

    return ",".join(f"{k}={short(v)}" for k, v in sorted(params.items()))


def _prepare(cfg: SweepConfig, params: dict):
    """The model (seeded, with the data's readout), the data split and the TrainConfig of a trial."""
    data = load_showers(cfg.data)
    tr, va = cfg.split(data, seed=cfg.train.seed)
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    torch.manual_seed(cfg.train.seed)
    model = create_model_for(cfg.model, data.readout, **params)
    return model, tr, va, replace(cfg.train, progress=False)


def retrain_best(out_dir, run_dir) -> list[dict]:
    """Train the sweep's best config again, outside Ray, to the iteration it was judged at; returns
    the checkpoint history (its last ``chi2_sum`` is the sweep's reported value, on the same data and
    seed)."""
    cfg = load_config(out_dir)
    best = load_best(Path(out_dir) / "best.json")
    model, tr, va, tcfg = _prepare(cfg, best["overrides"])
    result = train(model, tr, va, replace(tcfg, iterations=best["iteration"]), run_dir, resume=False)
    return result.history


def _trial(config: dict, tracker: SweepTracker | None = None) -> None:
    """One trial: train the model with the trial's parameters, reporting at every checkpoint."""
    from ray import tune

    torch.set_num_threads(max(1, int(config["sweep"].get("cpus_per_trial", 1))))
    cfg = _sweep_config(config["sweep"])
    params = config["params"]
    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(cfg.out_dir) / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "starts.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} pid={os.getpid()}\n")
    (run_dir / "params.json").write_text(json.dumps(params, indent=1))
    model, tr, va, tcfg = _prepare(cfg, params)
    track, finish = tracker.start_trial(trial_id, model, params, run_dir) if tracker is not None else (None, None)

    def log(record, iteration):
        if track is not None:
            track(record, iteration)
        tune.report({"iteration": iteration, **{m: record[m] for m in (*METRICS, "chi2_ndf")}})

    try:
        train(model, tr, va, tcfg, run_dir, resume=True, log=log)
    finally:
        if finish is not None:
            finish()


class TrialProgress(Callback):
    """One line per trial as it starts, ends, is stopped early by ASHA or fails, with the counts so far,
    and between them the iterations of all trials as plain lines (``showers.progress.LogProgress``:
    every 5 % and every 30 s): a sweep is never silent for minutes (Tune's own table is off,
    ``verbose=0``)."""

    def __init__(self, metric: str, iterations: int):
        self.metric, self.iterations = metric, iterations
        self.started = self.ended = 0
        self._reached: dict[str, int] = {}
        self._bar = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_bar": None}  # Tune pickles its callbacks into tuner.pkl

    def setup(self, total_num_samples: int | None = None, **info) -> None:
        total = (total_num_samples or 0) * self.iterations or None  # at most: ASHA stops some trials early
        self._bar = LogProgress(total, "sweep: iterations of all trials", "it", stream=sys.stdout)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        at = int(result.get("iteration", 0))
        before = self._reached.get(trial.trial_id, 0)
        self._reached[trial.trial_id] = at
        if self._bar is not None and at > before:
            self._bar.update(at - before)

    def on_experiment_end(self, trials, **info):
        if self._bar is not None:
            self._bar.close()

    def _say(self, trial, what: str) -> None:
        print(f"  sweep: trial {trial.trial_id} [{trial_label(trial.config.get('params', {}))}] {what} "
              f"({self.started} started, {self.ended} ended)", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started += 1
        self._say(trial, "started")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended += 1
        last = trial.last_result or {}
        at = int(last.get("iteration", 0))
        how = "finished" if at >= self.iterations else "stopped early by ASHA"
        value = last.get(self.metric)
        self._say(trial, f"{how} at iteration {at}" + (f", {self.metric} {value:.4g}" if value is not None else ""))

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended += 1
        self._say(trial, "failed (see its error.txt)")


def _tuner(cfg: SweepConfig, restore_path: str | None = None, tracker: SweepTracker | None = None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    # the tracker goes through the object store, not the config (which Tune writes to every trial's params.json)
    trainable = tune.with_resources(tune.with_parameters(_trial, tracker=tracker), resources)
    if restore_path is not None:
        return tune.Tuner.restore(restore_path, trainable, resume_unfinished=True)
    iterations, every = cfg.train.iterations, cfg.train.checkpoint_every
    scheduler = None
    if cfg.mode == "asha":
        scheduler = ASHAScheduler(time_attr="iteration", max_t=iterations, grace_period=cfg.grace_period * every,
                                  reduction_factor=cfg.reduction_factor)
    space = param_space(cfg)
    space["sweep"] = asdict(cfg)
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(metric=cfg.metric, mode="min", scheduler=scheduler,
                                    search_alg=BasicVariantGenerator(random_state=cfg.train.seed,
                                                                     max_concurrent=cfg.max_concurrent or 0),
                                    num_samples=cfg.num_samples if cfg.mode == "asha" else 1,
                                    trial_name_creator=lambda t: f"{t.trial_id}[{trial_label(t.config['params'])}]",
                                    trial_dirname_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name="tune", storage_path=str(Path(cfg.out_dir).resolve()), verbose=0,
                                  callbacks=[TrialProgress(cfg.metric, iterations)]),
    )


def check_config(cfg: SweepConfig, space: bool = True) -> None:
    """Refuse, before Ray starts, a sweep that cannot run: a folder that holds a sweep already (its
    ``tune/``: resume it instead), and (``space``) a sweep whose trials would all fail: a candidate
    that the family's config does not take (a value of the wrong kind or out of range), each built once
    into a model on the data's readout, or a validation split the data cannot hold (``DataSplit.strict``)."""
    from showers.errors import ShowerDataError
    from showers.formats import file_readout

    out = Path(cfg.out_dir).resolve()
    if (out / "tune").exists():
        raise ValueError(f"{out} holds a sweep already (its tune/ folder): resume it (`calozoo tune --resume {out}`), "
                         "or start this one in another folder (-o)")
    if not space:
        return
    data = Path(cfg.data)
    files = sorted(data.glob("*.h5")) if data.is_dir() else [data]
    if not files:
        raise ShowerDataError(data, "no *.h5 files in this folder")
    readout = file_readout(files[0])
    if readout is None:
        raise ShowerDataError(files[0], "the file records no readout (a campaign of `calozoo simulate` does)")
    for key, values in cfg.space.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"the candidates of {key} must be a non-empty list, got {values!r}")
        search_space(replace(cfg, space={key: values}, only_given=True))  # an unknown field, by name
        for value in values:
            create_model_for(cfg.model, readout, **{key: tuple(value) if isinstance(value, list) else value})
    if cfg.split.strict:
        from trainers.data import read_energies

        cfg.split.check(read_energies(data), data)


def run_sweep(cfg: SweepConfig, address: str | None = None, tracker: SweepTracker | None = None) -> SweepResult:
    """Run the sweep (a local Ray unless ``address``); write ``OUT/best.json``; see the module docstring.

    tracker: records each trial (in the trial), e.g. calozoo's MLflow tracker; None: no tracking.
    """
    out = Path(cfg.out_dir).resolve()
    cfg = replace(cfg, out_dir=str(out), data=str(Path(cfg.data).resolve()))
    check_config(cfg)
    with writer_lock(out, "sweep folder"):
        check_config(cfg, space=False)  # again, now that no other sweep can be starting in it
        (out / "sweep.json").write_text(json.dumps(asdict(cfg), indent=1))
        return _fit(cfg, lambda: _tuner(cfg, tracker=tracker), address)


def resume_sweep(out_dir, address: str | None = None, tracker: SweepTracker | None = None) -> SweepResult:
    """Resume an interrupted sweep (``Tuner.restore``): finished trials are kept, unfinished ones
    resume (recorded by ``tracker``, which should be the one the sweep started with)."""
    out = check_resumable(out_dir)
    with writer_lock(out, "sweep folder"):
        out = check_resumable(out)  # again, now that no other sweep can be writing it
        cfg = replace(load_config(out), out_dir=str(out))
        return _fit(cfg, lambda: _tuner(cfg, restore_path=str(out / "tune"), tracker=tracker), address)


def _untrusted(path: Path, st, uid: int, *, allow_root: bool = False) -> str | None:
    """Why ``path`` (its ``os.lstat`` ``st``) cannot be trusted, or None."""
    import stat

    if st.st_uid != uid and not (allow_root and st.st_uid == 0):
        return f"{path} is owned by uid {st.st_uid}, not by you (uid {uid})"
    if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and allow_root:
        return None  # a sticky folder (/tmp): others cannot rename or replace what is yours in it
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} (mode {stat.filemode(st.st_mode)})"
    return None


def check_resumable(out_dir) -> Path:
    """The resolved sweep folder, if resuming it is safe; else ValueError saying why.

    Resuming hands ``OUT/tune`` to Ray's ``Tuner.restore``, which unpickles ``tuner.pkl`` (and the
    pickles inside the experiment state), and unpickling runs code. So only a folder this user's
    sweep wrote is resumed. As ssh does with its keys: the folder, ``sweep.json`` and everything under
    ``tune/`` must be owned by this user and writable by no one else (no group or world write bit),
    and no folder above it may let another user replace it (owned by this user or root, and not
    writable by others unless sticky, as /tmp is); symbolic links under ``tune/`` are refused. And
    every pickle under ``tune/`` must carry a valid signature of this user's key (``tune.signing``:
    a folder copied from elsewhere is owned by whoever copied it). Nothing is unpickled here.
    """
    import os
    import stat

    out = Path(out_dir).resolve()
    tuner = out / "tune" / "tuner.pkl"
    if not tuner.is_file():
        raise ValueError(f"{out}: not a sweep folder to resume (no tune/tuner.pkl); start a sweep with MODEL --data")
    uid = os.geteuid()
    problems = []
    for parent in reversed(out.parents):
        why = _untrusted(parent, os.lstat(parent), uid, allow_root=True)
        if why:
            problems.append(why)
    for path in (out, out / "sweep.json"):
        if path.exists() or path.is_symlink():
            why = _untrusted(path, os.lstat(path), uid)
            if why:
                problems.append(why)
    for root, dirs, files in os.walk(out / "tune"):
        for name in [".", *dirs, *files]:
            path = Path(root) / name if name != "." else Path(root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                problems.append(f"{path} is a symbolic link")
                continue
            why = _untrusted(path, st, uid)
            if why:
                problems.append(why)
        if len(problems) > 5:
            break
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ValueError(f"refusing to resume {out}: {problems[0]}{more}. Resuming unpickles tune/tuner.pkl, which "
                         "runs code: only a sweep folder that you own and no one else can write is resumed (fix it "
                         f"with `chmod -R go-w {out}` if it is yours)")
    unsigned = unsigned_pickles(out)
    if unsigned:
        more = f" and {len(unsigned) - 1} more" if len(unsigned) > 1 else ""
        raise ValueError(f"refusing to resume {out}: tune/{unsigned[0]}{more} carries no valid signature of your "
                         f"calozoo (key {key_path()}), so this sweep was not written by you here, or was changed "
                         "since. Resuming unpickles those files, which runs code. To start the sweep afresh from "
                         f"its settings (plain JSON): `calozoo tune --from {out / 'sweep.json'} -o NEW_FOLDER`")
    return out


def _fit(cfg: SweepConfig, make_tuner, address) -> SweepResult:
    """Fit the tuner ``make_tuner()`` builds (once Ray is up: the tracker goes to its object store)."""
    from showers.localray import init_ray

    t0 = time.perf_counter()
    init_ray(address, log_to_driver=False)  # a cluster (address, RAY_ADDRESS) or a local Ray on loopback only
    _check_resources(cfg, address)
    with Signer(cfg.out_dir):  # every pickle Ray writes into OUT/tune is signed (tune.signing)
        results = make_tuner().fit()
    iterations = cfg.train.iterations
    trials = []
    for r in results:
        if r.metrics is None or "iteration" not in r.metrics:
            continue
        trial_id = r.metrics.get("trial_id") or Path(r.path).name
        trials.append({"trial": trial_id, "params": r.config["params"], "iteration": int(r.metrics["iteration"]),
                       cfg.metric: float(r.metrics[cfg.metric]), "error": r.error is not None})
    done = [t for t in trials if not t["error"]]
    if not done:
        errors = [r.error for r in results if r.error is not None]
        why = f": {len(errors)} errored, the first with {_last_line(errors[0])}" if errors else ""
        raise RuntimeError(f"no trial of the sweep in {cfg.out_dir} finished{why} (see {cfg.out_dir}/tune)")
    best_trial = min(done, key=lambda t: (t[cfg.metric], -t["iteration"]))
    stopped = sum(1 for t in done if t["iteration"] < iterations)
    best = {"model": cfg.model, "overrides": best_trial["params"], "metric": cfg.metric,
            "value": best_trial[cfg.metric], "iteration": best_trial["iteration"], "trial": best_trial["trial"],
            "train": asdict(cfg.train), "data": cfg.data, "split": asdict(cfg.split)}
    out = Path(cfg.out_dir)
    (out / "best.json").write_text(json.dumps(best, indent=1))
    return SweepResult(best, trials, stopped, time.perf_counter() - t0, str(out))


def _last_line(error: BaseException) -> str:
    """The line of a trial's error that says what went wrong (Ray wraps it in its own traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def _check_resources(cfg: SweepConfig, address: str | None = None) -> None:
    """Refuse trials that ask for more than the Ray has (``showers.localray.require_resources``): Tune
    would wait for them forever."""
    from showers.localray import require_resources

    asks = {"CPU": cfg.cpus_per_trial, **({"GPU": cfg.gpus_per_trial} if cfg.gpus_per_trial else {})}
    require_resources(asks, f"each trial (--cpus {cfg.cpus_per_trial:g}, --gpus {cfg.gpus_per_trial:g})", address)


def load_best(path) -> dict:
    """A sweep's ``best.json``: {"model", "overrides", ...}; refuses anything else by name."""
    path = Path(path)
    try:
        best = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a sweep's best.json ({exc})") from None
    if not isinstance(best, dict) or "model" not in best or "overrides" not in best:
        raise ValueError(f"{path}: not a sweep's best.json (needs 'model' and 'overrides')")
    if not isinstance(best["model"], str) or not isinstance(best["overrides"], dict):
        raise ValueError(f"{path}: not a sweep's best.json ('model' must be a name and 'overrides' an object of "
                         f"config fields, got {type(best['model']).__name__} and {type(best['overrides']).__name__})")
    return best
