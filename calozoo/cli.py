"""The `calozoo` command: one entry point for data, training, registry and validation."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import sys
from pathlib import Path

import click

from calozoo import __version__


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (a KeyError's without its quotes)."""
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str) else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _fail(exc: Exception) -> None:
    """Bad input ends in one line naming the problem, not a traceback."""
    raise click.ClickException(_one_line(exc)) from exc


class _UsageLine(click.ClickException):
    """A usage error (a bad option value, an unknown command) as one line, with click's exit status 2."""

    exit_code = 2


#: the top-level help's sections: the commands in the order of the work
SECTIONS = (
    ("Data", ("catalogue", "simulate", "voxelise", "show", "calibrate")),
    ("Training", ("train", "fleet", "tune")),
    ("Registry", ("register", "models", "promote")),
    ("Inference", ("generate", "export")),
    ("Validation", ("validate", "validate-fleet")),
    ("MLflow", ("mlflow", "mlflow-sync")),
    ("Demo", ("demo",)),
)


class _Main(click.Group):
    """The command group; what a command lets through of the errors that bad input raises (data,
    configs, registry lookups, files, runtime refusals) still ends in one line and a non-zero exit,
    not a traceback (``CALOZOO_DEBUG=1`` shows the traceback). Usage errors too end in one line,
    which names the command's ``--help`` instead of printing the usage block above it. The help
    lists the commands in the order of the work (:data:`SECTIONS`), each with its whole ``short_help``."""

    def list_commands(self, ctx):
        ordered = [name for _, names in SECTIONS for name in names if name in self.commands]
        return ordered + sorted(set(self.commands) - set(ordered))

    def format_commands(self, ctx, formatter):
        width = max(map(len, self.commands))  # one column for the descriptions, across the sections
        listed = set()
        for title, names in (*SECTIONS, ("Other", tuple(self.list_commands(ctx)))):
            rows = [(n.ljust(width), self.commands[n].get_short_help_str(limit=1000)) for n in names
                    if n in self.commands and n not in listed and not self.commands[n].hidden]
            listed.update(n.strip() for n, _ in rows)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    @staticmethod
    def _usage_line(exc: click.UsageError, where: str) -> _UsageLine:
        where = exc.ctx.command_path if exc.ctx is not None else where
        return _UsageLine(f"{' '.join(exc.format_message().split())} (see `{where} --help`)")

    def make_context(self, info_name, args, parent=None, **extra):
        # the group's own options (--tracking-uri) are parsed here, before invoke
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise self._usage_line(exc, info_name or "calozoo") from exc

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise self._usage_line(exc, ctx.command_path) from exc
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (ValueError, LookupError, OSError, RuntimeError, FloatingPointError) as exc:
            if os.environ.get("CALOZOO_DEBUG"):
                raise
            raise click.ClickException(_one_line(exc)) from exc


#: where ``--tracking-uri`` (the group's or a command's) leaves the store it names (``ctx.meta`` is
#: shared by the group's context and its command's)
_STORE = "calozoo.tracking_uri"


def _use_store(ctx, param, value):
    """``--tracking-uri``: checked now, before any work (a store that cannot be one is named), and made
    this process's MLFLOW_TRACKING_URI; a command's option, parsed after the group's, wins."""
    if value:
        from registry.tracking import check_store

        try:
            check_store(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
        os.environ["MLFLOW_TRACKING_URI"] = value
        ctx.meta[_STORE] = value
    return value


def _tracking_option(help: str = "MLflow tracking store, e.g. sqlite:///out/demo/mlflow.db (default: "
                                 "MLFLOW_TRACKING_URI, else ./mlflow.db)."):
    return click.option("--tracking-uri", metavar="URI", default=None, expose_value=False, callback=_use_store,
                        help=help)


def _energies(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) * 1000.0 for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated energies in GeV, got {text!r}",
                                 param_hint="--energies") from None
    if not values:
        raise click.BadParameter(f"no energy given ({text!r}): expected e.g. 1,4,16,64 (GeV)", param_hint="--energies")
    bad = [v / 1000.0 for v in values if not (v > 0 and v < float("inf"))]
    if bad:
        raise click.BadParameter(f"energies must be finite and > 0 GeV, got {bad}", param_hint="--energies")
    return values


_POSITIVE = click.IntRange(min=1)
#: numpy's and torch's seeds are 32-bit: -1 or 2**40 would fail deep inside, without naming --seed
_SEED = click.IntRange(0, 2**32 - 1)
#: showers per energy, per file, per batch: beyond these a request is a typo (10^9 showers of 368 voxels
#: are 1.5 TB), refused by name before anything starts
_SHOWERS = click.IntRange(1, 10**9)
_BATCH = click.IntRange(1, 10**7)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, prog_name="calozoo")
@_tracking_option("MLflow tracking store of the command, e.g. sqlite:///out/demo/mlflow.db (default: "
                  "MLFLOW_TRACKING_URI, else ./mlflow.db); every command that uses MLflow takes it too.")
def main() -> None:
    """calozoo: ML fast calorimeter simulation, from showers to registered ONNX models.

    Energies typed on the command line are GeV; the files and the Python API hold MeV."""
    # MLflow announces at INFO that it creates or upgrades a sqlite store's tables: noise between a
    # command's own lines (its warnings and errors still show)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


@main.command(short_help="List the built-in readouts, detectors and media.")
def catalogue() -> None:
    """List the built-in readouts, detectors and media."""
    from showers.detector import get_detector, list_detectors
    from showers.materials import list_media
    from showers.readout import get_readout, list_readouts

    click.echo("readouts:")
    for name in list_readouts():
        r = get_readout(name)
        click.echo(f"  {name:26s} {r.n_layers:3d} layers, {r.n_voxels:6d} voxels")
    click.echo("detectors:")
    for name in list_detectors():
        d = get_detector(name)
        click.echo(f"  {name:26s} {len(d.regions):3d} regions, e.g. {d.regions[-1].name}")
    click.echo("media: " + ", ".join(list_media()))


@main.command(short_help="Simulate detector regions into CaloChallenge HDF5 files.")
@click.option("--detector", default="atlas-like", show_default=True, help="Detector (see `calozoo catalogue`).")
@click.option("--regions", "patterns", multiple=True, help="Region name or glob, e.g. 'photon_eta_02*' (repeatable).")
@click.option("--particles", multiple=True, help="Only these particles (photon, electron, pion).")
@click.option("--eta", nargs=2, type=float, default=None, help="Only regions overlapping this |eta| range.")
@click.option("--energies", "energies", default="1,4,16,64", show_default=True, help="Incident energies in GeV.")
@click.option("-n", "--n-per-energy", type=_SHOWERS, default=1000, show_default=True,
              help="Showers per energy (in all with --log-uniform).")
@click.option("--log-uniform", is_flag=True, help="Sample energies log-uniformly between the two --energies.")
@click.option("--seed", type=_SEED, default=1234, show_default=True)
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Campaign folder, one <region>.h5 per region (default: out/simulate/DETECTOR).")
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray).")
@click.option("--no-ray", is_flag=True, help="Run the regions in this process, one after the other.")
@click.option("--num-cpus", type=click.IntRange(1, 4096), default=None, help="CPUs for a local Ray (default: all).")
@click.option("--overwrite", is_flag=True, help="Simulate regions whose files already exist again.")
def simulate(detector, patterns, particles, eta, energies, n_per_energy, log_uniform, seed, out_dir, address,
             no_ray, num_cpus, overwrite) -> None:
    """Simulate a detector's regions with the built-in simulator: one CaloChallenge HDF5 file per
    region, written atomically; regions already done are skipped."""
    from showers.campaign import CampaignSpec, run_campaign
    from showers.detector import get_detector

    out_dir = out_dir or f"out/simulate/{detector}"
    try:
        det = get_detector(detector)
        regions = det.select(list(patterns) or None, list(particles) or None, eta)
        spec = CampaignSpec(_energies(energies), n_per_energy, seed, log_uniform)
        results = run_campaign(regions, out_dir, spec, address=address, use_ray=not no_ray, overwrite=overwrite,
                               num_cpus=num_cpus)
    except (KeyError, ValueError) as exc:
        _fail(exc)
    failed = [r for r in results if "error" in r]
    done = [r for r in results if "error" not in r and not r["skipped"]]
    skipped = [r for r in results if r.get("skipped")]
    click.echo(f"{len(done)} regions simulated, {len(skipped)} already done, {len(failed)} failed -> {out_dir}")
    for r in failed:
        click.echo(f"  FAILED {r['region']}: {r['error']}", err=True)
    if failed:
        sys.exit(1)


@main.command(short_help="Plot a shower file's profiles and E_tot/E_inc to a PNG.")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out_png", default=None, help="PNG to write (default: out/show/NAME.png, NAME the file's "
              "name without .h5).")
@click.option("--readout", default=None, help="Readout name or XML, if the file does not record one.")
@click.option("--max-showers", type=_SHOWERS, default=20000, show_default=True)
def show(path, out_png, readout, max_showers) -> None:
    """Plot a file's mean longitudinal and radial profiles and E_tot/E_inc per incident energy."""
    from showers.errors import ShowerDataError
    from showers.plots import plot_file

    out_png = out_png or str(Path("out/show") / f"{Path(path).stem}.png")
    try:
        written = plot_file(path, out_png, readout=readout, max_showers=max_showers)
    except (ShowerDataError, KeyError, ValueError) as exc:
        _fail(exc)
    click.echo(f"wrote {written}")


@main.command(short_help="Voxelise a Geant4 EDM4hep event into a CaloChallenge file.")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out_h5", required=True, help="CaloChallenge HDF5 file to write.")
@click.option("--collections", default="ECalBarrelSiHitsEven,ECalBarrelSiHitsOdd", show_default=True,
              help="Comma-separated SimCalorimeterHit collections.")
@click.option("--entry", type=click.IntRange(0, 2**62), default=0, show_default=True, help="Event number in the file.")
def voxelise(path, out_h5, collections, entry) -> None:
    """Voxelise a Geant4 (ddsim) EDM4hep event around its primary particle into a CaloChallenge
    file (energy conserved exactly: voxels + outside = hits), and print where the energy went."""
    from showers.errors import ShowerDataError
    from showers.formats import read_edm4hep_hits, write_calochallenge
    from showers.voxelise import edm4hep_event_to_voxels

    try:
        vox, outside, ro = edm4hep_event_to_voxels(path, collections=collections.split(","), entry=entry)
        primary = read_edm4hep_hits(path, collections=collections.split(","), entry=entry)["primary"]
        write_calochallenge(out_h5, [primary["kinetic_energy"]], vox,
                            {"readout": ro, "source": Path(path).name, "entry": entry, "particle_pdg": primary["pdg"]})
    except (ShowerDataError, KeyError, ValueError) as exc:
        _fail(exc)
    click.echo(f"primary PDG {primary['pdg']}, {primary['kinetic_energy'] / 1000:.2f} GeV; "
               f"{vox.sum():.1f} MeV in {int((vox > 0).sum())} voxels of {ro.n_voxels} ({ro.name}), "
               f"{outside.sum():.1f} MeV outside -> {out_h5}")


@main.command(short_help="Compare (or fit) the built-in simulator to Geant4 showers.")
@click.argument("reference", type=click.Path(exists=True, dir_okay=False))
@click.option("--readout", default="g4-pbwo4", show_default=True)
@click.option("--medium", default="PbWO4", show_default=True)
@click.option("--particle", default="e-", show_default=True)
@click.option("-n", "--n-sim", type=click.IntRange(1, 10**7), default=2000, show_default=True,
              help="Simulated showers per energy for the table.")
@click.option("--fit", "do_fit", is_flag=True, help="Fit the EM coefficients to the reference first.")
@click.option("--write", "write_to", default=None, help="With --fit: write the calibration JSON here.")
@click.option("--seed", type=_SEED, default=7, show_default=True)
def calibrate(reference, readout, medium, particle, n_sim, do_fit, write_to, seed) -> None:
    """Compare the simulator with reference (Geant4) showers, optionally fitting it first; prints
    the per-energy agreement table (mean profiles, E_grid/E_inc and its spread)."""
    import numpy as np

    from showers import calibrate as cal
    from showers.readout import get_readout
    from showers.simulator import ShowerSimulator

    try:
        ro = get_readout(readout)
        ref = cal.reference_profiles(reference, ro)
        sim = ShowerSimulator(ro, medium, particle)
    except (KeyError, ValueError) as exc:
        _fail(exc)
    if do_fit:
        click.echo(f"fitting {len(cal.FREE_PARAMETERS)} coefficients to {len(ref)} energies ...")
        sim = ShowerSimulator(ro, medium, particle, em=cal.fit(ref, sim, verbose=1))
    rng = np.random.default_rng(seed)
    rows = []
    for e in sorted(ref):
        showers = sim.simulate(np.full(n_sim, e), rng=rng)
        rows.append(cal.agreement(ref[e], cal.sample_profiles(np.full(n_sim, e), showers, ro)[e]))
    table = cal.agreement_table(rows)
    click.echo(table)
    if do_fit and write_to:
        cal.save_calibration(write_to, medium, sim.em, {"reference": Path(reference).name, "readout": readout,
                                                        "particle": particle}, table)
        click.echo(f"wrote {write_to}")


def _overrides(pairs, hint: str = "--set") -> dict:
    """KEY=VALUE pairs: VALUE as JSON (a number, true/false, a list), else as text; a VALUE that opens a
    JSON list or object must be one (``learning_rate=[1e-4,`` is refused by name, not read as text)."""
    import json

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=hint)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError as exc:
            if value.lstrip().startswith(("[", "{")):
                raise click.BadParameter(f"{pair!r}: the value is not valid JSON ({exc.msg} at character "
                                         f"{exc.pos + 1}), e.g. {key}=[1e-4,2e-4]", param_hint=hint) from None
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


def _options(*decorators):
    def apply(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn
    return apply


@dataclasses.dataclass(frozen=True)
class Devices:
    """What a command runs torch on (``--device``) and with how much (``--cpus``, ``--gpus``).

    device: train, validate: auto, cpu, cuda or cuda:N; fleet, tune: cpu or cuda (Ray gives each
    worker or trial its GPUs). cpus: train: torch threads (None: the CPUs this process may use);
    validate: torch and BLAS threads; fleet: per worker; tune: per trial. gpus: per worker or trial
    (fleet, tune; 0 on the CPU)."""

    device: str
    cpus: float | None
    gpus: float = 0.0


_CPUS = click.IntRange(1, 4096)
_GPUS = click.FloatRange(0, 64)
#: per kind of command: --device's default and help, --cpus's type, default and help, --gpus's help
#: (None: no GPU count), and the former spellings (hidden) with what each stands for
_DEVICE_KINDS = {
    "train": ("auto", "What torch runs on: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N.",
              _CPUS, None, "torch threads (default: the CPUs this process may use).", None,
              {"--threads": "cpus"}),
    "validate": ("cpu", "What the classifiers run on: cpu, cuda, cuda:N or auto (CUDA when present).",
                 _CPUS, None, "torch and BLAS threads (default: the CPUs this process may use).", None,
                 {"--threads": "cpus", "--gpu": "device"}),
    "fleet": ("cpu", "What the workers run on: cpu, cuda (a GPU per worker, or --gpus each) or auto (cuda where "
                     "this machine has a GPU).",
              _CPUS, 1, "CPUs (and torch threads) per worker.",
              "GPUs per worker (default with --device cuda: 1; a fraction shares a GPU); --gpus alone means "
              "--device cuda.",
              {"--cpus-per-worker": "cpus", "--gpu": "device"}),
    "tune": ("cpu", "What the trials run on: cpu, cuda (a GPU per trial, or --gpus each) or auto (cuda where this "
                    "machine has a GPU).",
             click.FloatRange(0, 4096, min_open=True), 1.0, "CPUs per trial (its torch threads: the whole part).",
             "GPUs per trial (default with --device cuda: 1; fractions pack small trials onto a GPU; refused if the "
             "Ray cluster has no GPU); --gpus alone means --device cuda.",
             {"--cpus-per-trial": "cpus", "--gpus-per-trial": "gpus"}),
}


def _device_options(kind: str):
    """--device, --cpus and (fleet, tune) --gpus: one vocabulary on every command that runs torch,
    handed over as ``devices`` (:class:`Devices`). The former spellings (``_DEVICE_KINDS``) are
    hidden options that stand for the new ones, so that scripts written with them still run."""
    device_default, device_help, cpus_type, cpus_default, cpus_help, gpus_help, former = _DEVICE_KINDS[kind]
    opts = [click.option("--device", default=device_default, show_default=True,
                         metavar="auto|cpu|cuda" + ("" if gpus_help else "|cuda:N"), help=device_help),
            click.option("--cpus", type=cpus_type, default=cpus_default, show_default=cpus_default is not None,
                         help=cpus_help)]
    if gpus_help:
        opts.append(click.option("--gpus", type=_GPUS, default=None, help=gpus_help))
    for flag, target in former.items():
        dest = "former_" + flag.strip("-").replace("-", "_")
        opts.append(click.option(flag, dest, is_flag=True, hidden=True) if target == "device" else
                    click.option(flag, dest, type=cpus_type if target == "cpus" else _GPUS, default=None, hidden=True))

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, device, cpus, gpus=None, **kw):
            from click.core import ParameterSource

            ctx = click.get_current_context()
            values = {"device": device, "cpus": cpus, "gpus": gpus}
            given = {name: ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT,
                                                                    ParameterSource.DEFAULT_MAP)
                     for name in values}
            for flag, target in former.items():
                value = kw.pop("former_" + flag.strip("-").replace("-", "_"))
                if value is None or value is False:
                    continue
                if given[target]:
                    raise click.UsageError(f"{flag} is the former spelling of --{target}: give --{target} alone")
                values[target], given[target] = "cuda" if target == "device" else value, True
            return fn(*args, devices=_devices(kind, values, given), **kw)

        return _options(*opts)(wrapper)

    return decorate


def _devices(kind: str, values: dict, given: dict) -> Devices:
    """The devices of a command from its options (:func:`_device_options`). A single process checks its
    device when it starts (``trainers.loop.resolve_device``); a fleet's workers and a sweep's trials are
    placed by Ray, which gives each its GPUs: there, cuda:N has no meaning and a GPU count does."""
    device, cpus, gpus = str(values["device"]).strip().lower(), values["cpus"], values["gpus"]
    if kind in ("train", "validate"):
        return Devices(device, cpus)
    who = "worker" if kind == "fleet" else "trial"
    if device.startswith("cuda:"):
        raise click.BadParameter(f"{device!r}: Ray gives each {who} its GPUs; give --device cuda (and --gpus per "
                                 f"{who})", param_hint="--device")
    if device == "auto":
        import torch

        device = "cuda" if gpus or torch.cuda.is_available() else "cpu"
    elif device not in ("cpu", "cuda"):
        raise click.BadParameter(f"expected auto, cpu or cuda, got {device!r}", param_hint="--device")
    if gpus and device == "cpu":
        if given["device"]:
            raise click.BadParameter(f"--gpus {gpus:g} with --device cpu: give --device cuda, or no --gpus",
                                     param_hint="--gpus")
        device = "cuda"
    if device == "cuda":
        gpus = 1.0 if gpus is None else float(gpus)
        if gpus == 0:
            raise click.BadParameter(f"--device cuda with --gpus 0: give each {who} a GPU or a share of one "
                                     "(e.g. --gpus 0.5), or --device cpu", param_hint="--gpus")
    return Devices(device, cpus, gpus or 0.0)


def _training_options(fn):
    """The options of ``trainers.loop.TrainConfig``, handed to the command as ``train`` (its device is
    the command's ``--device``, :func:`_device_options`)."""
    opts = [
        click.option("--iterations", default=2000, show_default=True, help="Training iterations per model."),
        click.option("--checkpoint-every", default=500, show_default=True,
                     help="Checkpoint (and validate) every N iterations; at most 5 checkpoints are kept."),
        click.option("--incremental-every", type=int, default=None,
                     help="FastCaloGAN's schedule: start at 32 GeV, add an energy point every M iterations."),
        click.option("--seed", type=_SEED, default=0, show_default=True,
                     help="Seeds the weights, the data split and the batches."),
        click.option("--bf16", is_flag=True, help="bf16 autocast on CUDA."),
    ]

    @functools.wraps(fn)
    def wrapper(*args, iterations, checkpoint_every, incremental_every, seed, bf16, **kw):
        from trainers.loop import TrainConfig

        try:
            train = TrainConfig(iterations=iterations, checkpoint_every=checkpoint_every, seed=seed, bf16=bf16,
                                incremental_every=incremental_every)
        except ValueError as exc:
            _fail(exc)
        return fn(*args, train=train, **kw)

    return _options(*opts)(wrapper)


def _split_options(fn):
    """--val-fraction and --min-val-per-energy, handed over as ``split`` (``trainers.data.DataSplit``)."""
    @functools.wraps(fn)
    def wrapper(*args, val_fraction, min_val_per_energy, **kw):
        from click.core import ParameterSource

        from trainers.data import DataSplit

        # a value asked for is refused where the data cannot hold it out, not silently capped
        given = click.get_current_context().get_parameter_source("min_val_per_energy") == ParameterSource.COMMANDLINE
        try:
            split = DataSplit(val_fraction, min_val_per_energy, strict=given)
        except ValueError as exc:
            _fail(exc)
        return fn(*args, split=split, **kw)

    return _options(
        click.option("--val-fraction", default=0.2, show_default=True,
                     help="Held out for validation (best epoch) per energy point."),
        click.option("--min-val-per-energy", default=100, show_default=True,
                     help="At least this many held out per energy point (by default at most half of a point's "
                          "showers; a value given here that the data cannot hold out is refused)."))(wrapper)


def _model_options(fn):
    """--config (a sweep's best.json) and --set KEY=VALUE, handed over as the model's ``overrides``."""
    @functools.wraps(fn)
    def wrapper(*args, config_path, sets, **kw):
        return fn(*args, overrides={**_config_overrides(config_path, kw["model_name"]), **_overrides(sets)}, **kw)

    return _options(
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                     help="Override a model config field (repeatable)."),
        click.option("--config", "config_path", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="A sweep's best.json: its model config overrides (then --set on top)."))(wrapper)


@main.command(short_help="Train one model on showers, resuming from its run folder.")
@click.argument("model_name", metavar="MODEL")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True),
              help="CaloChallenge HDF5 file, or a folder of them (same readout).")
@click.option("--readout", default=None, help="Readout of the data if the file does not record one.")
@click.option("-o", "--out", "out_dir", default=None, help="Run folder (default: out/train/MODEL).")
@_device_options("train")
@_training_options
@_split_options
@_model_options
@click.option("--no-resume", is_flag=True, help="Start from scratch even if the run folder has checkpoints.")
@click.option("--campaign", default=None, help="MLflow experiment and registry prefix (default: the data's "
              "'campaign' or 'detector' attribute, else the file name).")
@click.option("--region", default=None, help="Detector region (default: the data's 'region' attribute, else 'all').")
@click.option("--mlflow/--no-mlflow", "use_mlflow", default=True, show_default=True,
              help="Track the run in MLflow (--tracking-uri, else MLFLOW_TRACKING_URI, else ./mlflow.db).")
@_tracking_option()
@click.option("--register", "do_register", is_flag=True,
              help="Then select the best checkpoint, export it to ONNX, gate and register it (see `calozoo register`).")
def train(model_name, data_path, readout, out_dir, devices, train, split, overrides, no_resume, campaign, region,
          use_mlflow, do_register) -> None:
    """Train one MODEL (a variant: `calozoo models --variants`) on showers, on the data's readout;
    resumes from the run folder's latest checkpoint."""
    import torch

    from calozoo.tracked import run_labels, train_tracked
    from showers.errors import ShowerDataError
    from showers.lock import writer_lock
    from trainers.data import load_showers
    from trainers.loop import set_threads
    from trainers.loop import train as run_training
    from zoo import create_model_for

    if do_register and not use_mlflow:
        raise click.UsageError("--register needs MLflow tracking (drop --no-mlflow)")
    try:
        train = dataclasses.replace(train, device=devices.device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    set_threads(devices.cpus)
    out = Path(out_dir or f"out/train/{model_name}")
    try:
        data = load_showers(data_path, readout=readout)
        torch.manual_seed(train.seed)
        model = create_model_for(model_name, data.readout, **overrides)
        tr, va = split(data, seed=train.seed)
        click.echo(f"{model_name}: {sum(p.numel() for p in model.parameters()):,} parameters; "
                   f"{len(tr)} training and {len(va)} validation showers ({data.readout.name}) -> {out}")
        with writer_lock(out):  # one writer per run folder, from before its MLflow run starts
            if use_mlflow:
                campaign, region = run_labels(data_path, campaign, region)
                result, run = train_tracked(model, tr, va, train, out, campaign=campaign, region=region,
                                            resume=not no_resume)
            else:
                result, run = run_training(model, tr, va, train, out, resume=not no_resume), None
    except (ShowerDataError, KeyError, TypeError, ValueError, FloatingPointError) as exc:
        _fail(exc)
    best = result.best
    click.echo(f"done in {result.seconds:.0f} s; best checkpoint: iteration {best['iteration']} "
               f"(chi2 sum {best['metrics']['chi2_sum']:.1f}, chi2/ndf {best['metrics']['chi2_ndf']:.2f}, "
               f"separation power {best['metrics']['sep_power']:.3f}) in {out / 'checkpoints'}")
    if run is not None:
        left = run.pending()
        where = f"MLflow run {run.name!r} ({run.run_id}) at {run.uri}"
        click.echo(where if not left else f"{where}: {len(left)} operations not logged, kept in {run.pending_path}; "
                   f"`calozoo mlflow-sync {out}` logs them")
        if do_register:
            _register(out, campaign, region)


def _config_overrides(path, model_name: str) -> dict:
    """The model config overrides of a sweep's best.json (none without --config)."""
    if not path:
        return {}
    from tune.sweep import load_best

    try:
        best = load_best(path)
    except ValueError as exc:
        _fail(exc)
    if best["model"] != model_name:
        _fail(ValueError(f"{path} is the best config of {best['model']}, not {model_name}"))
    return {k: tuple(v) if isinstance(v, list) else v for k, v in best["overrides"].items()}


def _register(run_dir, campaign=None, region=None) -> None:
    from registry.publish import ParityError, publish

    try:
        pub = publish(run_dir, campaign=campaign, region=region)
    except (ParityError, FileNotFoundError, LookupError, ValueError) as exc:  # a truncated checkpoint: ValueError
        _fail(exc)
    click.echo(_publication_line(pub))


def _publication_line(pub) -> str:
    what = "already registered as" if pub.existing else "registered"
    crit = pub.metrics.get("criterion")  # best-epoch criterion (validate.metrics); absent in older runs
    margin = pub.parity.get("margin")
    return (f"{what} {pub.name} v{pub.version} ({pub.model or 'model'}, iteration {pub.iteration}, "
            + (f"criterion {crit:.3g}, " if crit is not None else "") + f"chi2 sum {pub.metrics['chi2_sum']:.1f}"
            + (f", parity margin {margin:.3g}" if margin is not None else "") + f"); {pub.decision}"
            + (" -> @champion" if pub.champion else ""))


@main.command(short_help="Export, gate and register a run's best checkpoint.")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--campaign", default=None, help="Default: the campaign the run was tracked with.")
@click.option("--region", default=None, help="Default: the region the run was tracked with.")
@_tracking_option()
def register(run_dir, campaign, region) -> None:
    """Register a tracked run's best checkpoint: select it (the validation criterion: the summed
    chi2/ndf of E_tot/E_inc, the layer energies and their centres and widths against held-out
    showers), export it to ONNX with its metadata, check ONNX Runtime against the torch model in
    float64 (the parity gate), register it as CAMPAIGN.REGION (the family a tag of the version) and
    make it @champion if its criterion is smaller than the current champion's on the same held-out
    showers, whatever that one's family (docs/registry.md)."""
    _register(run_dir, campaign, region)


@main.command(short_help="Make a version @champion by hand, recording why.")
@click.argument("name")
@click.argument("version")
@click.option("--reason", required=True, help="Why this version is the champion (recorded on the version).")
@_tracking_option()
def promote(name, version, reason) -> None:
    """Make VERSION of the registered model NAME its @champion by hand, recording why (its
    champion_decision tag). Pulls follow the alias at once; so they do when it is moved in the MLflow UI."""
    from registry.publish import promote as move_alias

    try:
        before = move_alias(name, version, reason)
    except ValueError as exc:
        _fail(exc)
    except Exception as exc:  # noqa: BLE001 - an unknown name or version: MLflow's message, on one line
        _fail(RuntimeError(f"cannot promote {name} v{version}: {str(exc).splitlines()[0][:300]}"))
    click.echo(f"{name}@champion -> v{version}" + (f" (was v{before})" if before and before != str(version) else "")
               + f": {reason}")


@main.command(short_help="Generate showers with a registered model into a file.")
@click.argument("ref", metavar="NAME[@ALIAS|@VERSION]")
@click.option("--energies", required=True, help="Incident energies in GeV, comma-separated.")
@click.option("-n", "--n-per-energy", type=_SHOWERS, default=1000, show_default=True)
@click.option("--angle", type=float, default=None, help="Incident angle in degrees (models conditioned on it).")
@click.option("--geometry", default=None, help="Geometry name (multi-geometry models).")
@click.option("--seed", type=_SEED, default=0, show_default=True)
@click.option("--batch-size", type=_BATCH, default=10_000, show_default=True)
@click.option("--allow-extrapolation", is_flag=True, help="Allow conditions outside the trained range.")
@click.option("--offline", is_flag=True, help="Use the local cache only.")
@click.option("-o", "--out", "out_h5", required=True, help="CaloChallenge HDF5 file to write.")
@_tracking_option()
def generate(ref, energies, n_per_energy, angle, geometry, seed, batch_size, allow_extrapolation, offline,
             out_h5) -> None:
    """Generate showers with a registered model into a CaloChallenge HDF5 file (MeV), written in
    batches as they are generated (memory holds one batch, whatever -n)."""
    import numpy as np

    from registry.pull import RegistryError, pull
    from showers.formats import CaloChallengeWriter, check_disk, check_memory, check_output_path
    from showers.progress import progress

    try:
        points = np.asarray(_energies(energies))
        total = len(points) * n_per_energy
        out_path = check_output_path(out_h5)  # before the model is pulled and the showers generated
        gen = pull(ref, offline=offline)
        gen.encode(points, angle, geometry, allow_extrapolation)  # conditions outside the trained range: now
        check_memory(min(batch_size, n_per_energy), gen.n_voxels, f"--batch-size {batch_size}",
                     what="showers of a batch")
        check_disk(out_path, total * (gen.n_voxels * np.dtype(np.float32).itemsize + 8), f"{total:,} showers")
    except (RegistryError, ValueError) as exc:
        _fail(exc)
    attrs = {"readout": gen.readout, "generator": f"calozoo:{gen.name}@v{gen.version}", "model": gen.metadata.get("model"),
             "seed": seed, "calozoo_version": __version__}
    if angle is not None:
        attrs["angle_deg"] = angle
    # one noise stream in the order of the showers: the same showers for the same seed, whatever the batch size
    rng = np.random.default_rng(seed)
    # validate=False: the unit heuristics of the reader (E_tot/E_inc < 2) are for data, and a model
    # early in training may well put out ten times the incident energy; it should be written as it is.
    with CaloChallengeWriter(out_h5, gen.n_voxels, attrs, validate=False) as w, \
            progress(total, f"generate {gen.name}", "shower", disable=total <= batch_size) as bar:
        for point in points:
            for start in range(0, n_per_energy, batch_size):
                e = np.full(min(batch_size, n_per_energy - start), point)
                noise = rng.standard_normal((len(e), gen.noise_dim), dtype=np.float32)
                showers = gen.generate(e, angle, geometry, noise=noise, batch_size=batch_size,
                                       allow_extrapolation=allow_extrapolation)
                if not np.all(np.isfinite(showers)):
                    raise ValueError(f"{gen.name} v{gen.version} produced non-finite voxel energies; nothing written")
                w.append(e, showers)
                bar.update(len(e))
    click.echo(f"{total} showers from {gen.name} v{gen.version} ({gen.providers[0]}) -> {out_h5}")


@main.command(short_help="Write a registered model as ONNX + contract to a folder.")
@click.argument("ref", metavar="NAME[@ALIAS|@VERSION]")
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder to write (default: out/export/NAME).")
@click.option("--offline", is_flag=True, help="Use the local cache only.")
@_tracking_option()
def export(ref, out_dir, offline) -> None:
    """Write a registered model (NAME@champion by default) to a folder for a simulation framework:
    model.onnx, contract.json (its inputs, output, units, condition encoding, noise, readout and
    provenance) and README.txt (how to call it with plain ONNX Runtime)."""
    from registry.contract import export_model
    from registry.pull import RegistryError

    try:
        out, c = export_model(ref, out_dir, offline=offline)
    except (RegistryError, ValueError) as exc:
        _fail(exc)
    click.echo(f"{c['registered_name']} v{c['version']} ({c['model']}, {c['readout']['n_voxels']} voxels) -> "
               f"{out}/model.onnx, contract.json, README.txt")


@main.command("mlflow", short_help="Start an MLflow tracking server for a team.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0: the network).")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--backend-store-uri", default=None, help="sqlite:///... or postgresql://... (default: ./mlflow.db).")
@click.option("--artifacts-destination", default=None, help="Where artifacts are kept (default: ./mlartifacts).")
def mlflow_server(host, port, backend_store_uri, artifacts_destination) -> None:
    """Start an MLflow tracking server for a team (then: export MLFLOW_TRACKING_URI=http://HOST:PORT)."""
    import os

    from registry.server import server_command, server_env

    cmd = server_command(backend_store_uri, artifacts_destination, host, port)
    click.echo(" ".join(cmd))
    os.execvpe(cmd[0], cmd, server_env())


@main.command("mlflow-sync", short_help="Log what a run could not log while its server was away.")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--to", "to_uri", default=None, metavar="URI",
              help="Log into this store instead of the one the run recorded when it started (the shell's "
                   "MLFLOW_TRACKING_URI is never used).")
@_tracking_option("The same as --to here, the store to log into (so does the option before the command).")
def mlflow_sync(run_dir, to_uri) -> None:
    """Log what a run could not log while its tracking server was away, into the store it was
    tracked in (or the one --to names)."""
    from registry.tracking import flush_pending, pending_count, recorded_run

    named = click.get_current_context().meta.get(_STORE)  # --tracking-uri, the command's or the group's
    if to_uri and named and to_uri != named:
        raise click.UsageError(f"--to {to_uri} and --tracking-uri {named} name two stores: give one")
    tracking_uri = to_uri or named
    try:
        before = pending_count(run_dir)
        left = flush_pending(run_dir, uri=tracking_uri)
        where = tracking_uri or recorded_run(run_dir).get("tracking_uri")
    except ValueError as exc:
        _fail(exc)
    if left:
        _fail(RuntimeError(f"{left} operations still pending in {run_dir}: is the server at {where} up?"))
    click.echo(f"{run_dir}: {before} pending operations logged to {where}" if before
               else f"{run_dir}: nothing was pending")


@main.command(short_help="List registered models and champions, or --variants.")
@click.option("--filter", "pattern", default=None, help="Only names containing this.")
@click.option("--variants", is_flag=True, help="List the zoo's model variants instead (the MODEL of train, fleet and "
              "tune), with their family and default readout; no MLflow needed.")
@click.option("--timeout", type=click.IntRange(min=1), default=10, show_default=True,
              help="Seconds to wait for the tracking server per request.")
@_tracking_option()
def models(pattern, variants, timeout) -> None:
    """List the registered models (one per region), their versions and champions: the champion's family
    and the figure it won on (its validation criterion). With --variants: the zoo's model variants."""
    if variants:
        _list_variants(pattern)
        return
    from registry.pull import RegistryError, list_models

    try:
        rows = list_models(pattern, timeout=timeout)
    except RegistryError as exc:
        _fail(exc)
    for r in rows:
        champ = r["champion"]
        won = f", val {r['metric']} {r['value']:.4g}" if r["value"] is not None else ""
        line = (f"{r['name']:40s} {r['versions']:3d} version{'s' if r['versions'] != 1 else ' '}  champion: "
                + (f"v{champ} {r['family'] or '?'} ({r['model'] or '?'}{won})" if champ else "none"))
        if len(r["families"]) > 1:
            line += f"; families: {', '.join(r['families'])}"
        click.echo(line + ("  [former naming CAMPAIGN.FAMILY.REGION]" if r["legacy"] else ""))


def _list_variants(pattern: str | None) -> None:
    """One line per variant of the zoo: its family and the readout it has unless the data gives it one."""
    from zoo import create_model, list_models

    names = [n for n in list_models() if not pattern or pattern in n]
    click.echo(f"{'variant':22s} {'family':14s} default readout (training takes the data's readout)")
    for name in names:
        m = create_model(name)
        click.echo(f"{name:22s} {m.family:14s} {m.readout.name} ({m.readout.n_voxels} voxels)")


@main.command(short_help="Train one model per detector region on Ray Train workers.")
@click.argument("model_name", metavar="MODEL")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Campaign folder: one <region>.h5 per region (calozoo simulate writes one).")
@click.option("--regions", "patterns", multiple=True, help="Region name or glob (repeatable; default: all).")
@click.option("-o", "--out", "out_dir", default=None, help="Fleet folder on shared storage (default: out/fleet/MODEL).")
@click.option("--workers", type=click.IntRange(1, 4096), default=2, show_default=True, help="Ray Train workers.")
@_device_options("fleet")
@click.option("--address", default=None, help="Ray cluster address (default: a local Ray, or RAY_ADDRESS).")
@click.option("--max-failures", type=click.IntRange(0, 4096), default=3, show_default=True,
              help="Worker failures to recover from.")
@_training_options
@_split_options
@_model_options
@click.option("--bank-size", type=click.IntRange(1, 4096), default=64, show_default=True,
              help="At most this many regions of one voxel count per bank (on a CPU, fewer for big regions).")
@click.option("--init", "init_checkpoint", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Start every region from this checkpoint (a Reptile meta-initialisation): a meta-adapted fleet.")
@click.option("--campaign", default=None, help="MLflow experiment and registry prefix (default: the data files' "
              "'campaign' or 'detector' attribute, else the first file's name; as `calozoo train` picks it).")
@click.option("--mlflow/--no-mlflow", "use_mlflow", default=True, show_default=True)
@_tracking_option()
@click.option("--plots/--no-plots", default=True, show_default=True, help="A validation plot per region.")
@click.option("--register", "do_register", is_flag=True,
              help="Then register every region's best checkpoint (as CAMPAIGN.REGION; docs/registry.md).")
@click.option("--register-workers", type=_POSITIVE, default=1, show_default=True,
              help="With --register: processes that export and gate the regions while this one registers them "
                   "(more pay where regions cannot share an exported graph, e.g. flow matching's).")
def fleet(model_name, data_dir, patterns, out_dir, workers, devices, address, max_failures, train, split,
          overrides, bank_size, init_checkpoint, campaign, use_mlflow, plots, do_register, register_workers) -> None:
    """Train one MODEL per detector region (each on its region's readout) on Ray Train workers, as
    banks of stacked models."""
    if do_register and not use_mlflow:
        raise click.UsageError("--register needs MLflow tracking (drop --no-mlflow)")

    from calozoo.tracked import run_labels, run_tracked_fleet
    from showers.campaign import list_regions
    from showers.errors import ShowerDataError
    from showers.lock import writer_lock
    from trainers.fleet import FleetConfig, FleetProgress, check_config, run_fleet

    try:
        cfg = FleetConfig(model=model_name, data_dir=data_dir, out_dir=out_dir or f"out/fleet/{model_name}",
                          regions=list_regions(data_dir, patterns or None), bank_size=bank_size, overrides=overrides,
                          init_checkpoint=str(Path(init_checkpoint).resolve()) if init_checkpoint else None,
                          train=dataclasses.replace(train, progress=False), split=split)
        check_config(cfg)  # in seconds, before any Ray worker starts
        if cfg.init_checkpoint:  # a truncated or foreign --init, named here rather than inside a worker
            from zoo.checkpoint import load_checkpoint

            load_checkpoint(cfg.init_checkpoint)
    except (ShowerDataError, FileNotFoundError, KeyError, TypeError, ValueError) as exc:
        _fail(exc)
    click.echo(f"fleet of {len(cfg.regions)} {model_name} models on {workers} workers -> {cfg.out_dir}")
    run = dict(num_workers=workers, use_gpu=devices.device == "cuda", gpus_per_worker=devices.gpus or 1.0,
               address=address, max_failures=max_failures, threads_per_worker=devices.cpus)
    # one fleet per folder, from before its MLflow run starts; the regions' iterations as they happen
    with writer_lock(cfg.out_dir, "fleet folder"), FleetProgress(cfg.out_dir, list(cfg.regions), train.iterations):
        if use_mlflow:
            # the same campaign name as `calozoo train` on the same data (its files' campaign or detector)
            summary, _ = run_tracked_fleet(cfg, campaign=campaign or run_labels(data_dir)[0], plots=plots, **run)
        else:
            summary = run_fleet(cfg, **run)
    done = {r: b for r, b in summary["regions"].items() if b}
    click.echo(f"{len(done)}/{len(cfg.regions)} regions trained in {summary['seconds']:.0f} s")
    for r, b in sorted(done.items()):
        click.echo(f"  {r:24s} best iteration {b['iteration']:7d}  chi2 sum {b['metrics']['chi2_sum']:9.2f}")
    missing = sorted(set(cfg.regions) - set(done))
    if missing:
        _fail(RuntimeError(f"{len(missing)} regions have no checkpoint: {', '.join(missing[:10])}"))
    if do_register:
        _register_fleet([Path(cfg.out_dir) / r for r in sorted(done)], register_workers)


def _register_fleet(run_dirs: list[Path], workers: int) -> None:
    """Register a fleet's regions (``registry.publish.publish_many``: export and gate in ``workers``
    processes while this one makes the MLflow calls); one line per region; a region refused ends the
    command with a non-zero exit after the others are registered."""
    import time

    from registry.publish import publish_many

    workers = min(workers, len(run_dirs))
    t0 = time.perf_counter()
    pubs, failed = publish_many(run_dirs, workers=workers, progress=lambda text: click.echo(f"  {text}"))
    click.echo(f"{len(pubs)} of {len(run_dirs)} regions registered in {time.perf_counter() - t0:.0f} s "
               f"(export and parity gate in {workers} process{'es' if workers != 1 else ''})")
    if failed:
        _fail(RuntimeError(f"{len(failed)} regions not registered: "
                           + "; ".join(f"{Path(d).name}: {why}" for d, why in list(failed.items())[:5])))


@main.command(short_help="Search a model's hyper-parameters with Ray Tune.")
@click.argument("model_name", metavar="[MODEL]", required=False)
@click.option("--data", "data_path", type=click.Path(exists=True), help="CaloChallenge HDF5 file (or folder).")
@click.option("--mode", type=click.Choice(["grid", "asha"]), default="asha", show_default=True)
@click.option("--num-samples", type=click.IntRange(1, 100_000), default=8, show_default=True,
              help="ASHA: trials sampled from the space.")
@click.option("--metric", type=click.Choice(["criterion", "chi2_sum", "sep_power", "etot_shift"]), default="criterion",
              show_default=True, help="criterion: the best-epoch metric (E_tot, layers, shape); etot_shift does not "
              "saturate early in training (short ASHA rungs).")
@click.option("--grace-period", type=click.IntRange(1, 1_000_000), default=1, show_default=True,
              help="ASHA: first rung, in checkpoints.")
@click.option("--reduction-factor", default=2.0, show_default=True, help="ASHA: keep 1/this of the trials per rung.")
@click.option("--space", "spaces", multiple=True, metavar="KEY=JSON",
              help="Candidates of a field, e.g. learning_rate=[1e-4,2e-4] (repeatable; others keep the family's).")
@click.option("--only-given", is_flag=True, help="Search only the --space fields.")
@_training_options
@_split_options
@_device_options("tune")
@click.option("--address", default=None, help="Ray cluster address (default: a local Ray).")
@click.option("-o", "--out", "out_dir", default=None, help="Sweep folder (default: out/tune/MODEL-MODE).")
@click.option("--resume", "resume_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="Resume the interrupted sweep in this folder (finished trials are not repeated); only a sweep "
                   "your calozoo wrote and signed is resumed (docs/security.md).")
@click.option("--from", "from_json", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Start a new sweep with the settings of a sweep's sweep.json (plain JSON; MODEL, --data and the "
                   "search options come from it), into -o.")
@click.option("--mlflow/--no-mlflow", "use_mlflow", default=True, show_default=True)
@_tracking_option()
def tune(model_name, data_path, mode, num_samples, metric, grace_period, reduction_factor, spaces, only_given, train,
         split, devices, address, out_dir, resume_dir, from_json, use_mlflow) -> None:
    """Search MODEL's hyper-parameters with Ray Tune (grid or ASHA); writes OUT/best.json, which
    `calozoo train --config` and `calozoo fleet --config` take. MODEL and --data are needed unless
    --resume or --from gives them."""
    from calozoo.tracked import resume_tracked_sweep, run_tracked_sweep
    from showers.lock import writer_lock
    from tune.sweep import SweepConfig, check_config, check_resumable, load_config, resume_sweep, run_sweep

    if resume_dir and (from_json or model_name or data_path):
        raise click.UsageError("--resume FOLDER takes everything from the folder: give no MODEL, --data or --from")
    try:
        if resume_dir:
            check_resumable(resume_dir)  # before anything is written into it (docs/security.md)
            with writer_lock(resume_dir, "sweep folder"):  # one writer, from before its MLflow runs resume
                if use_mlflow:  # into the runs it was tracked in, if it was
                    result, _ = resume_tracked_sweep(resume_dir, address=address)
                else:
                    result = resume_sweep(resume_dir, address)
        else:
            if from_json:
                if model_name or data_path:
                    raise click.UsageError("--from SWEEP_JSON takes MODEL and --data from the file: give neither")
                cfg = load_config(from_json)
                cfg = dataclasses.replace(cfg, out_dir=out_dir or f"out/tune/{cfg.model}-{cfg.mode}")
            else:
                if not model_name or not data_path:
                    raise click.UsageError("give MODEL and --data (or --resume FOLDER, or --from SWEEP_JSON)")
                space = {k: list(v) if isinstance(v, (list, tuple)) else [v]
                         for k, v in _overrides(spaces, "--space").items()}
                cfg = SweepConfig(model=model_name, data=data_path, out_dir=out_dir or f"out/tune/{model_name}-{mode}",
                                  mode=mode, space=space, only_given=only_given, num_samples=num_samples,
                                  metric=metric, grace_period=grace_period, reduction_factor=reduction_factor,
                                  # a trial without a GPU of its own does not take one Ray did not give it
                                  train=dataclasses.replace(train, progress=False,
                                                            device="auto" if devices.gpus else "cpu"),
                                  split=split, cpus_per_trial=devices.cpus, gpus_per_trial=devices.gpus)
            check_config(cfg)  # the candidates, the split, the folder: before an MLflow run or Ray starts
            with writer_lock(cfg.out_dir, "sweep folder"):
                result = run_tracked_sweep(cfg, address=address)[0] if use_mlflow else run_sweep(cfg, address)
    except (ValueError, TypeError, KeyError, FileNotFoundError, RuntimeError) as exc:
        _fail(exc)
    best = result.best
    click.echo(f"{len(result.trials)} trials, {result.n_stopped_early} stopped early by ASHA, {result.seconds:.0f} s")
    click.echo(f"best: {best['metric']} {best['value']:.4g} at iteration {best['iteration']} "
               f"(trial {best['trial']}): {best['overrides']} -> {Path(result.path) / 'best.json'}")


#: ``validate.classifier.SIZES`` (named here so that the CLI starts without importing torch)
CLASSIFIER_SIZES = ("official", "small", "tiny")


def _validate_config(classifier, epochs, seeds, dataset, floor, max_showers, per_layer, distances, devices: Devices,
                     labels=None):
    """The report's config from the validate options; gives torch and numpy's BLAS ``devices.cpus``
    threads (default: the CPUs this process may use) and returns (config, the BLAS limit, a context)."""
    from threadpoolctl import threadpool_limits

    from trainers.loop import resolve_device, set_threads
    from validate.report import ValidateConfig

    try:
        device = str(resolve_device(devices.device))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None
    n = set_threads(devices.cpus)
    kw = {"labels": tuple(labels)} if labels else {}
    try:
        cfg = ValidateConfig(classifier=classifier, classifier_epochs=epochs, seeds=seeds, dataset=dataset, floor=floor,
                             max_showers=max_showers, per_layer=per_layer, distances=distances, device=device, **kw)
    except ValueError as exc:
        _fail(exc)
    return cfg, threadpool_limits(n)  # numpy's BLAS as many threads as torch (FPD's many small eigensolvers)


def _validate_options(classifier: str):
    """The options of the validation report (``validate.report.ValidateConfig``), ``classifier``
    the default size."""
    return _options(
        click.option("--classifier", type=click.Choice(["auto", *CLASSIFIER_SIZES, "none"]), default=classifier,
                     show_default=True,
                     help="Classifier size: official (the CaloChallenge evaluator's 3x2048 network, float64, 50 "
                          "epochs), small, tiny (tests), none; auto: official on a readout with the evaluator's "
                          "binning, else small."),
        click.option("--epochs", type=click.IntRange(1, 10_000), default=None,
                     help="Override the classifier's number of epochs."),
        click.option("--seeds", type=click.IntRange(1, 100), default=3, show_default=True,
                     help="Runs of each classifier with different seeds: the report gives their mean and spread."),
        click.option("--dataset", type=click.Choice(["auto", "1-photons", "1-pions", "2", "3", "none"]), default="auto",
                     show_default=True, help="Whose CaloChallenge binning and voxel threshold (auto: from the readout)."),
        click.option("--floor/--no-floor", default=True, show_default=True,
                     help="The reference against itself at the generated sample's size, where it has twice as many."),
        click.option("--max-showers", type=_SHOWERS, default=50_000, show_default=True,
                     help="At most this many showers per file."),
        click.option("--per-layer/--no-per-layer", default=True, show_default=True,
                     help="Histogram every layer's features on the reference's binning too, and draw them."),
        click.option("--distances/--no-distances", default=True, show_default=True, help="FPD and KPD."),
        _device_options("validate"),
    )


@main.command(short_help="Compare generated with reference showers in a report.")
@click.argument("generated", type=click.Path(exists=True, dir_okay=False))
@click.argument("reference", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out_dir", default=None,
              help="Report folder (default: out/validate/GENERATED, the file's name without .h5).")
@click.option("--readout", default=None, help="Readout name, if the files do not record one.")
@_validate_options("auto")
@click.option("--labels", nargs=2, default=None,
              help="Names of REFERENCE, GENERATED (default: what made each file, from its attributes).")
@click.option("--mlflow", "use_mlflow", is_flag=True, help="Log the report to MLflow (a new run, or --run-id).")
@click.option("--run-id", default=None, help="Log into this MLflow run (e.g. the model's training run).")
@_tracking_option()
def validate(generated, reference, out_dir, readout, classifier, epochs, seeds, dataset, floor, max_showers, per_layer,
             distances, devices, labels, use_mlflow, run_id) -> None:
    """Compare GENERATED showers with REFERENCE showers (CaloChallenge HDF5, same readout): a report
    (markdown + PNGs) with the CaloChallenge evaluator's figures (its classifiers over several
    seeds, its histograms' separation powers, FPD/KPD), each beside the reference's own floor where
    the reference has twice the generated showers; see docs/validation.md."""
    from validate.report import validate_files

    out = Path(out_dir or Path("out/validate") / Path(generated).stem)
    cfg, blas = _validate_config(classifier, epochs, seeds, dataset, floor, max_showers, per_layer, distances, devices,
                                 labels)
    try:
        with blas:
            m = validate_files(generated, reference, out, cfg, readout=readout, progress=_step_printer("validate"))
    except ValueError as exc:
        _fail(exc)
    h = m["headline"]
    for key in ("auc_low", "jsd_low", "auc_high", "jsd_high", "fpd", "kpd", "sep_etot_einc", "sep_voxel_energy",
                "sep_layers_over_floor_max", "sep_power_etot", "max_long_rel", "max_rad_rel"):
        if key in h:
            err = next((f" ± {h[key + s]:.2g}" for s in ("_std", "_error") if key + s in h and math.isfinite(h[key + s])),
                       "")
            floor_text = f"  (floor {h[key + '_floor']:.4g})" if key + "_floor" in h else ""
            click.echo(f"  {key:26s} {h[key]:.4g}{err}{floor_text}")
    click.echo(f"report: {out / 'report.md'}")
    if use_mlflow or run_id:
        from calozoo.tracked import log_report
        from registry.tracking import tracking_uri

        try:
            rid = log_report(out, run_id=run_id)
        except Exception as exc:  # noqa: BLE001 - the report is written; say why it is not in MLflow
            _fail(RuntimeError(f"the report is in {out}, but logging it to MLflow at {tracking_uri()} failed: "
                               f"{str(exc).splitlines()[0][:300]}"))
        click.echo(f"logged to MLflow run {rid}")


class _HelpFrom(click.Option):
    """An option whose help is made when it is shown (``help_from()``): what it names lives in a module
    that the CLI does not import to start."""

    def __init__(self, *args, help_from, **kw):
        super().__init__(*args, **kw)
        self.help_from = help_from

    def get_help_record(self, ctx):
        self.help = self.help_from()
        return super().get_help_record(ctx)


def _threshold_help() -> str:
    from validate.fleet import DEFAULT_THRESHOLDS, METRICS

    # a figure and its companions (auc_low, auc_low_std) as one entry: auc_low[_std]
    extra = {}
    for name in METRICS:
        base = next((name[:-len(x)] for x in ("_std", "_error", "_floor") if name.endswith(x) and name[:-len(x)] in
                     METRICS), None)
        extra.setdefault(base or name, [])
        if base:
            extra[base].append(name[len(base):])
    names = ", ".join(k + (f"[{','.join(v)}]" if v else "") for k, v in extra.items())
    return (f"A region fails unless METRIC<=VALUE or METRIC>=VALUE (repeatable; default: {', '.join(DEFAULT_THRESHOLDS)})."
            f" METRIC is one of the report's figures (docs/validation.md): {names}.")


@main.command("validate-fleet", short_help="Validate every region's champion; table of failures.")
@click.argument("campaign", metavar="CAMPAIGN", required=False)
@click.argument("model_name", metavar="[MODEL]", required=False)
@click.option("--campaign", "campaign_option", default=None, hidden=True)
@click.option("--family", default=None, hidden=True)
@click.option("--reference", "reference_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Folder of held-out <region>.h5 reference files.")
@click.option("--regions", "patterns", multiple=True, help="Region name or glob (repeatable; default: all).")
@click.option("-o", "--out", "out_dir", default=None, help="Summary and reports folder (default: out/validation/CAMPAIGN).")
@click.option("--alias", default="champion", show_default=True)
@click.option("--fail", "thresholds", multiple=True, metavar="METRIC<=VALUE", cls=_HelpFrom, help_from=_threshold_help)
@_validate_options("small")
@click.option("--offline", is_flag=True, help="Use cached models only.")
@click.option("--attach", is_flag=True, help="Add each region's figures (and the reference's floor) to the model "
              "version validated, in the registry.")
@_tracking_option()
def validate_fleet_cmd(campaign, model_name, campaign_option, family, reference_dir, patterns, out_dir, alias,
                       thresholds, classifier, epochs, seeds, dataset, floor, max_showers, per_layer, distances, devices,
                       offline, attach) -> None:
    """Validate every region's registered model (CAMPAIGN.REGION@ALIAS, whatever its family) against its
    reference showers; one report per region and a summary table of which regions fail the thresholds.
    MODEL (a variant or a family) is only for a store of the former naming CAMPAIGN.FAMILY.REGION: the
    family in its names."""
    from calozoo.fleet_validation import validate_fleet
    from validate.fleet import DEFAULT_THRESHOLDS, parse_threshold

    if campaign and campaign_option and campaign != campaign_option:
        raise click.UsageError("--campaign is the former spelling of the CAMPAIGN argument: give CAMPAIGN alone")
    campaign = campaign or campaign_option
    if not campaign:
        raise click.UsageError("give CAMPAIGN, the campaign the models were registered under")
    if model_name and family:
        raise click.UsageError("--family is the former spelling of the MODEL argument: give MODEL alone")
    family = _family(model_name) if model_name else family
    thresholds = thresholds or DEFAULT_THRESHOLDS
    try:
        for t in thresholds:
            parse_threshold(t)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fail") from None
    out = Path(out_dir or f"out/validation/{campaign}" + (f".{family}" if family else ""))
    cfg, blas = _validate_config(classifier, epochs, seeds, dataset, floor, max_showers, per_layer, distances, devices)
    try:
        with blas:
            rows = validate_fleet(campaign, reference_dir, out, regions=patterns or None, alias=alias, cfg=cfg,
                                  thresholds=thresholds, offline=offline, progress=click.echo, family=family,
                                  attach=attach)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    failing = [r for r in rows if r["fails"]]
    for r in rows:
        click.echo(f"  {r['region']:24s} {r.get('family') or '':16s} {'FAIL: ' + '; '.join(r['fails']) if r['fails'] else 'ok'}")
    click.echo(f"{len(rows)} regions, {len(failing)} failing; summary: {out / 'summary.md'}")
    if failing:
        sys.exit(1)


def _family(model: str) -> str:
    """The family of ``model``: a variant's (``zoo``), or ``model`` itself where it names a family."""
    from zoo import list_models, model_entrypoint
    from zoo.base import family_class

    if model in list_models():
        return model_entrypoint(model)().family
    try:
        family_class(model)
    except KeyError:
        raise click.BadParameter(f"{model!r} is neither a model variant nor a family; variants: "
                                 f"{', '.join(list_models())}", param_hint="MODEL") from None
    return model


def _step_printer(name: str):
    """``say(text)`` printing one progress line per step with the elapsed time: ``[name  12.3 s] text``."""
    import time

    t0 = time.perf_counter()
    return lambda text: click.echo(f"[{name} {time.perf_counter() - t0:6.1f} s] {text}", err=True)


@main.command(short_help="Run the whole chain on a small detector on this machine.")
@click.option("-o", "--out", "out_dir", default="out/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--scale", type=click.Choice(["demo", "test"]), default="demo", show_default=True,
              help="test: the reduced path the test suite runs (a tenth of the work).")
@_tracking_option("MLflow tracking store (default: MLFLOW_TRACKING_URI, else OUT/mlflow.db).")
def demo(out_dir, scale) -> None:
    """The main job on the embedded defaults (local Ray, the output folder's MLflow store, the
    built-in simulator): simulate a small detector, sweep, train the fleet, register champions,
    pull one back, generate and validate. See calozoo/pipeline.py."""
    from calozoo.pipeline import run_demo

    try:
        run_demo(out_dir, scale, echo=click.echo)
    except (FileExistsError, RuntimeError) as exc:
        _fail(exc)


if __name__ == "__main__":  # pragma: no cover
    main()
