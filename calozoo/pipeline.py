"""The main job (``calozoo demo`` / ``make demo``): the whole chain on the embedded defaults.

    simulate ─► sweep (ASHA) ─► fleet (Ray Train, banks) ─► best epoch ─► ONNX + parity gate
        ─► MLflow registry (@champion) ─► pull by name ─► generate ─► validate (report + fleet table)

1. **simulate** a small detector with the built-in simulator on a local Ray: ``particles`` ×
   ``eta_slices`` regions of the atlas-like barrel, a training campaign and a held-out reference
   campaign with another seed; profile plots of every region.
2. **sweep**: a small ASHA sweep of the family's search space on one region (Ray Tune); its
   ``best.json`` is the fleet's config.
3. **fleet**: one model per region, trained as weight-stacked banks by Ray Train workers, tracked
   in MLflow (a parent run and one run per region).
4. **register**: for each region, the best checkpoint by the validation ``criterion`` (χ²/ndf of
   E_tot, the layer energies, centres and widths against held-out showers), exported to
   ONNX, gated (ONNX Runtime against the torch model in float64, ``zoo.export.onnx_parity``) and
   registered as ``CAMPAIGN.REGION`` with its validation summary, ``@champion`` if it beats the
   current one whatever its family (``registry.publish.publish_many``).
5. **pull** one model back by name from the registry and **generate** showers (ONNX Runtime).
6. **validate** them against the held-out reference (full report, logged to that region's training
   run), and every region's champion (the fleet table, logged to the fleet's run, with which model won
   each region); the figures go onto each champion's model version too, beside the reference's floor.

Everything is logged to the embedded MLflow store of the output folder (``OUT/mlflow.db``) unless
``MLFLOW_TRACKING_URI`` says otherwise. :data:`SCALES` holds the full demo and the reduced path the
tests run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SCALES", "DemoScale", "run_demo"]

MARKER = ".calozoo-demo"


@dataclass(frozen=True)
class DemoScale:
    """How big each stage is."""

    # electromagnetic showers (pions' hadronic fluctuations need more than a demo's minutes)
    particles: tuple[str, ...] = ("electron", "photon")
    # |eta| 0.20-0.25 (368 voxels) and 3.50-3.55 (92): a fleet of mixed voxel counts
    eta_slices: tuple[str, ...] = ("020_025", "350_355")
    energies_mev: tuple[float, ...] = (1024.0, 4096.0, 16384.0, 65536.0)
    n_train: int = 400  # per energy, of which min_val_per_energy are held out for checkpoint selection
    # per energy, another seed: at 300, the simulator against itself already differs by up to 0.2 in a
    # radial bin at 1 GeV (forward regions), the fleet table's threshold; at 1000 by about 0.1
    n_reference: int = 1000
    min_val_per_energy: int = 100
    model: str = "par04_vae_region"
    sweep_samples: int = 4
    sweep_iterations: int = 600
    sweep_checkpoint_every: int = 200
    sweep_space: tuple[tuple[str, tuple], ...] = (("learning_rate", (1e-3, 3e-3)), ("kl_weight", (0.5, 1.0)))
    sweep_metric: str = "criterion"
    fleet_iterations: int = 3000
    fleet_checkpoint_every: int = 500
    workers: int = 2
    classifier: str = "small"
    plots: bool = True


SCALES = {
    "demo": DemoScale(),
    # The tests' reduced path: the same stages, a tenth of the work.
    "test": DemoScale(eta_slices=("020_025",), energies_mev=(4096.0, 65536.0), n_train=150, n_reference=100,
                      min_val_per_energy=50, sweep_samples=2, sweep_iterations=40, sweep_checkpoint_every=20,
                      fleet_iterations=60, fleet_checkpoint_every=20, classifier="tiny", plots=False),
}


class _Stages:
    """The progress display: one line per stage with its number and the elapsed time."""

    def __init__(self, n: int, echo):
        self.n, self.i, self.echo, self.t0 = n, 0, echo, time.perf_counter()
        self.times: dict[str, float] = {}
        self._name, self._start = None, None

    def __call__(self, name: str, what: str) -> None:
        self._close()
        self.i += 1
        self._name, self._start = name, time.perf_counter()
        self.echo(f"\n[{self.i}/{self.n}] {name}: {what}  (t = {time.perf_counter() - self.t0:.0f} s)")

    def _close(self) -> None:
        if self._name:
            self.times[self._name] = time.perf_counter() - self._start
            self._name = None

    def done(self) -> float:
        self._close()
        return time.perf_counter() - self.t0


_HEADS = {"max_sep_power_etot_per_energy": "E_tot sep. power (worst energy)", "max_long_rel": "longitudinal Δ",
          "max_rad_rel": "radial Δ"}


def _threshold_table(rows: list[dict]) -> list[str]:
    """The fleet table's thresholds beside each region's figures, as printed lines; the champion column
    names the version and model that won the region (among every family trained for it)."""
    from validate.fleet import DEFAULT_THRESHOLDS, parse_threshold

    limits = [parse_threshold(t) for t in DEFAULT_THRESHOLDS]
    table = [["region", "champion", *(_HEADS.get(key, key) for key, _, _ in limits), "verdict"],
             ["threshold", "", *(f"{op.replace('<=', '≤').replace('>=', '≥')} {v:g}" for _, op, v in limits), ""]]
    for r in sorted(rows, key=lambda r: r["region"]):
        champion = f"v{r['version']} {r['variant']}" if "version" in r else "none"
        table.append([r["region"], champion, *(f"{r[key]:.3f}" if key in r else "–" for key, _, _ in limits),
                      "pass" if not r["fails"] else "FAIL"])
    widths = [max(len(row[j]) for row in table) for j in range(len(table[0]))]
    return ["  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in table]


def _prepare_out(out: Path) -> None:
    """A fresh output folder: a previous demo's folder (marked) is emptied; anything else that is
    not empty is refused rather than deleted."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FileExistsError(f"{out} exists and is not a calozoo demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by calozoo demo; emptied by the next demo run into this folder\n")


def run_demo(out_dir="out/demo", scale: str | DemoScale = "demo", *, echo=print, num_cpus: int | None = None) -> dict:
    """Run the whole chain into ``out_dir``; return a summary (paths, champion, headline metrics,
    stage times). ``echo`` prints the progress lines."""
    import ray

    from calozoo.fleet_validation import validate_fleet
    from calozoo.tracked import log_report, run_tracked_fleet, run_tracked_sweep
    from registry.publish import attach_validation, publish_many
    from registry.pull import pull
    from registry.tracking import RUN_FILE, get_client
    from showers.campaign import CampaignSpec, run_campaign
    from showers.detector import get_detector
    from showers.localray import init_ray
    from showers.plots import plot_file
    from trainers.data import DataSplit
    from trainers.fleet import FleetConfig, FleetProgress
    from trainers.loop import TrainConfig
    from tune.sweep import SweepConfig, load_best
    from validate.report import ValidateConfig, read_sample, validate_samples

    sc = SCALES[scale] if isinstance(scale, str) else scale
    out = Path(out_dir).resolve()
    _prepare_out(out)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"
    uri = os.environ["MLFLOW_TRACKING_URI"]
    campaign = "calozoo-demo"
    stage = _Stages(7, echo)
    det = get_detector("atlas-like")
    regions = det.select([f"{p}_eta_{s}" for p in sc.particles for s in sc.eta_slices])
    names = [r.name for r in regions]
    # a local Ray on loopback only (or the cluster RAY_ADDRESS names, as a plain ray.init would)
    started_ray = not ray.is_initialized()
    if started_ray:
        init_ray(num_cpus=num_cpus or max(2, sc.workers), log_to_driver=False)
    try:
        stage("simulate", f"{len(regions)} regions ({', '.join(names)}), {len(sc.energies_mev)} energies, "
                          f"{sc.n_train} + {sc.n_reference} held-out showers per energy, on Ray")
        train_dir, ref_dir, plots = out / "data" / "train", out / "data" / "reference", out / "plots"
        for folder, n, seed in ((train_dir, sc.n_train, 1234), (ref_dir, sc.n_reference, 4321)):
            results = run_campaign(regions, folder, CampaignSpec(sc.energies_mev, n, seed=seed))
            failed = [r for r in results if "error" in r]
            if failed:
                raise RuntimeError(f"simulating {failed[0]['region']} failed: {failed[0]['error']}")
        if sc.plots:
            for name in names:
                plot_file(train_dir / f"{name}.h5", plots / f"{name}.png")
            echo(f"  profile plots: {plots}/<region>.png")

        sweep_region = names[0]
        stage("sweep", f"ASHA over {dict(sc.sweep_space)} for {sc.model} on {sweep_region}, {sc.sweep_samples} "
                       f"trials of up to {sc.sweep_iterations} iterations")
        sweep, _ = run_tracked_sweep(SweepConfig(
            model=sc.model, data=str(train_dir / f"{sweep_region}.h5"), out_dir=str(out / "sweep"), mode="asha",
            space={k: list(v) for k, v in sc.sweep_space}, only_given=True, num_samples=sc.sweep_samples,
            metric=sc.sweep_metric, train=TrainConfig(iterations=sc.sweep_iterations,
                                                   checkpoint_every=sc.sweep_checkpoint_every, progress=False),
            split=DataSplit(min_per_energy=sc.min_val_per_energy)), campaign=f"{campaign}-sweep", uri=uri)
        best = load_best(Path(sweep.path) / "best.json")
        echo(f"  {len(sweep.trials)} trials, {sweep.n_stopped_early} stopped early; best {best['overrides']} "
             f"({sweep.best['metric']} {sweep.best['value']:.3g})")

        stage("fleet", f"{len(names)} {sc.model} models, {sc.fleet_iterations} iterations each, on {sc.workers} "
                       "Ray Train workers")
        fleet_dir = out / "fleet"
        fcfg = FleetConfig(model=sc.model, data_dir=str(train_dir), out_dir=str(fleet_dir), regions=names,
                           overrides={k: tuple(v) if isinstance(v, list) else v for k, v in best["overrides"].items()},
                           split=DataSplit(min_per_energy=sc.min_val_per_energy),
                           train=TrainConfig(iterations=sc.fleet_iterations, checkpoint_every=sc.fleet_checkpoint_every,
                                             progress=False))
        with FleetProgress(fleet_dir, names, sc.fleet_iterations):
            summary, fleet_run = run_tracked_fleet(fcfg, campaign=campaign, uri=uri, plots=sc.plots,
                                                   num_workers=sc.workers)
        missing = [n for n, b in summary["regions"].items() if not b]
        if missing:
            raise RuntimeError(f"the fleet left {len(missing)} regions without a checkpoint: {', '.join(missing)}")
        echo(f"  trained in {summary['seconds']:.0f} s")

        stage("register", "best checkpoint per region → ONNX → parity gate → MLflow registry (CAMPAIGN.REGION@champion)")
        pubs, failed = publish_many([fleet_dir / name for name in names], campaign=campaign, uri=uri)
        if failed:
            raise RuntimeError(f"{len(failed)} regions not registered: " + "; ".join(failed.values()))
        published = {p.name.split(".", 1)[1]: p for p in pubs}
        for name in names:
            pub = published[name]
            echo(f"  {pub.name} v{pub.version} ({pub.model}): iteration {pub.iteration}, criterion "
                 f"{pub.metrics['criterion']:.3g}, parity margin {pub.parity.get('margin', float('nan')):.3g}"
                 + (" → @champion" if pub.champion else f"; {pub.decision}"))

        chosen = names[0]
        ref_name = f"{published[chosen].name}@champion"
        stage("pull + generate", f"{ref_name} from the registry, showers at the held-out energies with ONNX Runtime")
        gen = pull(ref_name, uri=uri)
        e_ref, x_ref, readout = read_sample(ref_dir / f"{chosen}.h5")
        t = time.perf_counter()
        showers = gen.generate(e_ref, seed=7)
        rate = len(e_ref) / (time.perf_counter() - t)
        echo(f"  {gen!r}: {len(e_ref)} showers at {rate:,.0f} showers/s")

        stage("validate", f"{chosen} against its held-out simulated showers (report), then every region's champion")
        report_dir = out / "validation" / chosen
        metrics = validate_samples(e_ref, showers, e_ref, x_ref, readout, report_dir,
                                   ValidateConfig(classifier=sc.classifier, plots=True, labels=("simulated", sc.model)),
                                   title=f"{ref_name} vs held-out simulated showers",
                                   names=(f"{ref_name} (v{gen.version})", str(ref_dir / f"{chosen}.h5")),
                                   progress=lambda s: echo(f"  {s}"))
        rows = validate_fleet(campaign, ref_dir, out / "validation" / "fleet", uri=uri, attach=True,
                              cfg=ValidateConfig(classifier="none", per_layer=False, plots=False, fpd_batches=5))
        # the classifier's verdict on the pulled champion, on its model version beside the fleet table's figures
        attach_validation(published[chosen].name, gen.version,
                          {k: v for k, v in metrics["headline"].items() if k.startswith("auc_")},
                          reference=f"classifier on {len(e_ref)} showers of {ref_dir / f'{chosen}.h5'}", uri=uri)
        # the report goes into the champion's training run, the fleet table into the fleet's run
        region_run = json.loads((fleet_dir / chosen / RUN_FILE).read_text())["run_id"]
        log_report(report_dir, run_id=region_run, uri=uri)
        get_client(uri).log_artifacts(fleet_run.run_id, str(out / "validation" / "fleet"), "validation")
        echo(f"  logged to MLflow: the report to run {region_run} ({chosen}), the fleet table to the fleet's run "
             f"{fleet_run.run_id}")

        stage("summary", "where everything is")
        seconds = stage.done()
    finally:
        if started_ray:
            ray.shutdown()
    h = metrics["headline"]
    result = {"out": str(out), "tracking_uri": uri, "regions": names, "sweep_best": best["overrides"],
              "champion": ref_name, "champion_version": gen.version, "headline": h,
              "report": str(report_dir / "report.md"), "fleet_summary": str(out / "validation" / "fleet" / "summary.md"),
              "fleet_failing": [r["region"] for r in rows if r["fails"]], "stage_seconds": stage.times,
              "seconds": seconds}
    (out / "demo.json").write_text(json.dumps(result, indent=1, default=float))
    db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None
    cli = Path(sys.executable).parent / "calozoo"  # the venv's command: bare `calozoo` may not be on PATH
    ui = (f"{cli} mlflow --backend-store-uri {uri} --artifacts-destination {Path(db).parent / 'mlartifacts'}"
          if db else f"open {uri}")
    echo(f"  the pulled champion against held-out showers: classifier AUC {h.get('auc_low', float('nan')):.3f} "
         f"(voxels), {h.get('auc_high', float('nan')):.3f} (high-level); FPD {h['fpd']:.3g} ± {h['fpd_error']:.2g}; "
         f"separation power of E_tot/E_inc {h['sep_power_etot']:.3f}")
    echo(f"  report:        {result['report']}")
    echo(f"  plots:         {report_dir}/profiles.png, {report_dir}/features_*.png, {out / 'plots'}/<region>.png")
    echo(f"  fleet table:   {result['fleet_summary']}")
    for line in _threshold_table(rows):
        echo(f"    {line}")
    n_fail = len(result["fleet_failing"])
    echo(f"  {len(rows) - n_fail} of {len(rows)} champions pass the thresholds on held-out showers"
         + (f"; failing: {', '.join(result['fleet_failing'])}" if n_fail else ""))
    echo(f"  MLflow UI:     {ui}   (then http://127.0.0.1:5000)")
    echo(f"  registry:      export MLFLOW_TRACKING_URI={uri}   (then `{cli} models`, `{cli} generate ...`; "
         f"or `{cli} --tracking-uri {uri} models`)")
    echo(f"  done in {seconds:.0f} s: " + ", ".join(f"{k} {v:.0f} s" for k, v in stage.times.items()))
    return result
