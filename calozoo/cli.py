"""The `calozoo` command: one entry point for data, training, registry and validation."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from calozoo import __version__


def _fail(exc: Exception) -> None:
    """Bad input ends in one line naming the problem, not a traceback."""
    raise click.ClickException(str(exc)) from exc


def _energies(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) * 1000.0 for x in text.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated energies in GeV, got {text!r}") from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="calozoo")
def main() -> None:
    """calozoo: ML fast calorimeter simulation, from showers to registered ONNX models."""


@main.command()
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


@main.command()
@click.option("--detector", default="atlas-like", show_default=True, help="Detector (see `calozoo catalogue`).")
@click.option("--regions", "patterns", multiple=True, help="Region name or glob, e.g. 'photon_eta_02*' (repeatable).")
@click.option("--particles", multiple=True, help="Only these particles (photon, electron, pion).")
@click.option("--eta", nargs=2, type=float, default=None, help="Only regions overlapping this |eta| range.")
@click.option("--energies", "energies", default="1,4,16,64", show_default=True, help="Incident energies in GeV.")
@click.option("-n", "--n-per-energy", default=1000, show_default=True, help="Showers per energy (in all with --log-uniform).")
@click.option("--log-uniform", is_flag=True, help="Sample energies log-uniformly between the two --energies.")
@click.option("--seed", default=1234, show_default=True)
@click.option("-o", "--out", "out_dir", default="calozoo-data", show_default=True, type=click.Path(file_okay=False))
@click.option("--address", default=None, help="Ray cluster address (default: start a local Ray).")
@click.option("--no-ray", is_flag=True, help="Run the regions in this process, one after the other.")
@click.option("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all).")
@click.option("--overwrite", is_flag=True, help="Simulate regions whose files already exist again.")
def simulate(detector, patterns, particles, eta, energies, n_per_energy, log_uniform, seed, out_dir, address,
             no_ray, num_cpus, overwrite) -> None:
    """Simulate a detector's regions with the built-in simulator: one CaloChallenge HDF5 file per
    region, written atomically; regions already done are skipped."""
    from showers.campaign import CampaignSpec, run_campaign
    from showers.detector import get_detector

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


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out_png", default=None, help="PNG to write (default: next to the file).")
@click.option("--readout", default=None, help="Readout name or XML, if the file does not record one.")
@click.option("--max-showers", default=20000, show_default=True)
def show(path, out_png, readout, max_showers) -> None:
    """Plot a file's mean longitudinal and radial profiles and E_tot/E_inc per incident energy."""
    from showers.errors import ShowerDataError
    from showers.plots import plot_file

    out_png = out_png or str(Path(path).with_suffix(".png"))
    try:
        written = plot_file(path, out_png, readout=readout, max_showers=max_showers)
    except (ShowerDataError, KeyError, ValueError) as exc:
        _fail(exc)
    click.echo(f"wrote {written}")


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out_h5", required=True, help="CaloChallenge HDF5 file to write.")
@click.option("--collections", default="ECalBarrelSiHitsEven,ECalBarrelSiHitsOdd", show_default=True,
              help="Comma-separated SimCalorimeterHit collections.")
@click.option("--entry", default=0, show_default=True, help="Event number in the file.")
def voxelise(path, out_h5, collections, entry) -> None:
    """Voxelise a Geant4 (ddsim) EDM4hep event around its primary particle into a CaloChallenge
    file (energy conserved exactly: voxels + outside = hits), and print where the energy went."""
    from showers.errors import ShowerDataError
    from showers.formats import write_calochallenge
    from showers.voxelise import edm4hep_event_to_voxels

    try:
        vox, outside, ro = edm4hep_event_to_voxels(path, collections=collections.split(","), entry=entry)
        from showers.formats import read_edm4hep_hits

        primary = read_edm4hep_hits(path, collections=collections.split(","), entry=entry)["primary"]
        write_calochallenge(out_h5, [primary["kinetic_energy"]], vox,
                            {"readout": ro, "source": Path(path).name, "entry": entry, "particle_pdg": primary["pdg"]})
    except (ShowerDataError, KeyError, ValueError) as exc:
        _fail(exc)
    click.echo(f"primary PDG {primary['pdg']}, {primary['kinetic_energy'] / 1000:.2f} GeV; "
               f"{vox.sum():.1f} MeV in {int((vox > 0).sum())} voxels of {ro.n_voxels} ({ro.name}), "
               f"{outside.sum():.1f} MeV outside -> {out_h5}")


@main.command()
@click.argument("reference", type=click.Path(exists=True, dir_okay=False))
@click.option("--readout", default="g4-pbwo4", show_default=True)
@click.option("--medium", default="PbWO4", show_default=True)
@click.option("--particle", default="e-", show_default=True)
@click.option("-n", "--n-sim", default=2000, show_default=True, help="Simulated showers per energy for the table.")
@click.option("--fit", "do_fit", is_flag=True, help="Fit the EM coefficients to the reference first.")
@click.option("--write", "write_to", default=None, help="With --fit: write the calibration JSON here.")
@click.option("--seed", default=7, show_default=True)
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


def _overrides(pairs) -> dict:
    import json

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        if isinstance(out[key], list):
            out[key] = tuple(out[key])
    return out


@main.command()
@click.argument("model_name", metavar="MODEL")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True),
              help="CaloChallenge HDF5 file, or a folder of them (same readout).")
@click.option("--readout", default=None, help="Readout of the data if the file does not record one.")
@click.option("-o", "--out", "out_dir", default=None, help="Run folder (default: out/train/MODEL).")
@click.option("--iterations", default=2000, show_default=True)
@click.option("--checkpoint-every", default=500, show_default=True)
@click.option("--val-fraction", default=0.2, show_default=True, help="Held out per energy point.")
@click.option("--min-val-per-energy", default=100, show_default=True)
@click.option("--incremental-every", type=int, default=None,
              help="FastCaloGAN's schedule: start at 32 GeV, add an energy point every M iterations.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--bf16", is_flag=True, help="bf16 autocast on CUDA.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a model config field (repeatable).")
@click.option("--no-resume", is_flag=True, help="Start from scratch even if the run folder has checkpoints.")
def train(model_name, data_path, readout, out_dir, iterations, checkpoint_every, val_fraction, min_val_per_energy,
          incremental_every, seed, device, bf16, sets, no_resume) -> None:
    """Train one model on showers; resumes from the run folder's latest checkpoint."""
    import torch

    from showers.errors import ShowerDataError
    from trainers.data import load_showers, split_validation
    from trainers.loop import TrainConfig
    from trainers.loop import train as run_training
    from zoo import create_model

    try:
        data = load_showers(data_path, readout=readout)
        torch.manual_seed(seed)
        overrides = _overrides(sets)
        model = create_model(model_name, **overrides)
        if model.readout != data.readout and "readout" not in overrides:
            model = create_model(model_name, readout=data.readout.to_dict(), **overrides)
        tr, va = split_validation(data, val_fraction, min_val_per_energy, seed=seed)
        cfg = TrainConfig(iterations=iterations, checkpoint_every=checkpoint_every, seed=seed, device=device,
                          bf16=bf16, incremental_every=incremental_every)
        out = Path(out_dir or f"out/train/{model_name}")
        click.echo(f"{model_name}: {sum(p.numel() for p in model.parameters()):,} parameters; "
                   f"{len(tr)} training and {len(va)} validation showers ({data.readout.name}) -> {out}")
        result = run_training(model, tr, va, cfg, out, resume=not no_resume)
    except (ShowerDataError, KeyError, ValueError, FloatingPointError) as exc:
        _fail(exc)
    best = result.best
    click.echo(f"done in {result.seconds:.0f} s; best checkpoint: iteration {best['iteration']} "
               f"(chi2 sum {best['metrics']['chi2_sum']:.1f}, chi2/ndf {best['metrics']['chi2_ndf']:.2f}, "
               f"separation power {best['metrics']['sep_power']:.3f}) in {out / 'checkpoints'}")


@main.command()
@click.option("-o", "--out", "out_dir", default="out/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("-n", "--n-per-energy", default=300, show_default=True)
@click.option("--no-ray", is_flag=True, help="Do not start Ray (regions one after the other).")
def demo(out_dir, n_per_energy, no_ray) -> None:
    """The main job on the embedded defaults: simulate a small multi-region data set of the
    atlas-like detector (photons, electrons and pions in two |eta| slices) and draw its profiles."""
    from showers.campaign import CampaignSpec, run_campaign
    from showers.detector import get_detector
    from showers.plots import plot_file

    det = get_detector("atlas-like")
    regions = det.select(["*_eta_020_025", "*_eta_200_205"])
    spec = CampaignSpec((1024.0, 4096.0, 16384.0, 65536.0), n_per_energy, seed=1234)
    data = Path(out_dir) / "data"
    results = run_campaign(regions, data, spec, use_ray=not no_ray, num_cpus=2)
    failed = [r for r in results if "error" in r]
    for r in failed:
        click.echo(f"FAILED {r['region']}: {r['error']}", err=True)
    plots = Path(out_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    for r in results:
        if "error" not in r:
            png = plot_file(r["path"], plots / (Path(r["path"]).stem + ".png"))
            click.echo(f"{r['region']:22s} {r['n']:6d} showers -> {png}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
