"""validate/: every metric on cases with a known answer (identical samples, shifted distributions),
the report on real HDF5 files, its MLflow logging, and the fleet summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from calozoo.cli import main
from calozoo.tracked import log_report
from showers.errors import ShowerDataError
from showers.formats import write_calochallenge
from showers.readout import get_readout
from showers.simulator import ShowerSimulator
from validate.classifier import (
    SIZES,
    ClassifierConfig,
    classifier_auc,
    jsd_from_probabilities,
)
from validate.distances import fpd, frechet_distance, kpd
from validate.features import compare_features, high_level_features
from validate.fleet import parse_threshold, summarise, write_summary
from validate.report import ValidateConfig, read_sample, validate_samples
from .conftest import mlflow_store


# -- FPD and KPD -------------------------------------------------------------------------------------
def test_frechet_distance_of_gaussians_in_closed_form():
    """Diagonal covariances: |mu1 - mu2|^2 + sum (sigma1 - sigma2)^2."""
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([3.0, 2.0, 1.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    assert frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(s1**2), mu1, np.diag(s1**2)) == pytest.approx(0.0, abs=1e-9)


def test_fpd_and_kpd_of_identical_distributions_are_zero_within_their_errors():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4000, 4)), rng.normal(size=(4000, 4))
    f = fpd(a, b, min_samples=1000, max_samples=4000, num_batches=5, normalise=False)
    k = kpd(a, b, batch_size=1000, normalise=False)
    assert f.value <= 3 * f.error + 2e-3, f
    assert abs(k.value) <= 3 * k.error + 1e-3, k


def test_fpd_and_kpd_see_a_shift():
    """A shift of 0.5 in each of 4 unit Gaussians: FPD = 4 x 0.25 = 1 (the extrapolation removes the
    finite-sample bias); KPD far above its error."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4000, 4)), rng.normal(loc=0.5, size=(4000, 4))
    f = fpd(a, b, min_samples=1000, max_samples=4000, num_batches=5, normalise=False)
    k = kpd(a, b, batch_size=1000, normalise=False)
    assert f.value == pytest.approx(1.0, abs=0.1)
    assert k.value > 5 * k.error and k.value > 0.05


def test_distances_refuse_mismatched_features():
    with pytest.raises(ValueError, match="same features"):
        fpd(np.zeros((10, 3)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="NaN"):
        kpd(np.full((10, 2), np.nan), np.zeros((10, 2)))


# -- classifier ---------------------------------------------------------------------------------------
TINY = ClassifierConfig(**SIZES["tiny"])


def test_classifier_cannot_tell_identical_distributions():
    rng = np.random.default_rng(3)
    r = classifier_auc(rng.normal(size=(3000, 5)), rng.normal(size=(3000, 5)), TINY)
    assert abs(r["auc"] - 0.5) < 0.05
    assert abs(r["jsd"]) < 0.03


def test_classifier_tells_shifted_distributions_and_jsd_grows_with_the_shift():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(3000, 5))
    small = classifier_auc(rng.normal(size=(3000, 5)) + [0.3, 0, 0, 0, 0], ref, TINY)
    large = classifier_auc(rng.normal(size=(3000, 5)) + [4.0, 0, 0, 0, 0], ref, TINY)
    # One unit Gaussian shifted by d: the best AUC is Phi(d / sqrt 2): 0.58 for 0.3, 0.998 for 4.
    assert 0.53 < small["auc"] < 0.65
    assert large["auc"] > 0.99 and large["jsd"] > 0.9
    assert large["jsd"] > small["jsd"] + 0.5


def test_classifier_names_non_finite_rows_instead_of_training_on_them():
    rng = np.random.default_rng(5)
    gen, ref = rng.normal(size=(200, 5)), rng.normal(size=(200, 5))
    gen[17, 2] = np.inf  # what exp() of an outlier gives
    with pytest.raises(ValueError, match=r"1 of 200 generated rows hold NaN or inf .*row 17"):
        classifier_auc(gen, ref, TINY)
    ref[3, 0] = 1e300  # finite in float64, inf in float32
    with pytest.raises(ValueError, match="reference rows"):
        classifier_auc(rng.normal(size=(200, 5)), ref, TINY)


def test_jsd_of_perfect_and_useless_probabilities():
    y = np.array([0, 1] * 50)
    assert jsd_from_probabilities(y, y.astype(float)) == pytest.approx(1.0, abs=1e-4)
    assert jsd_from_probabilities(y, np.full(100, 0.5)) == pytest.approx(0.0, abs=1e-12)


# -- features -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def samples():
    """Simulated PbWO4 electrons at 4 and 32 GeV: two independent samples and a miscalibrated one."""
    readout = get_readout("g4-pbwo4")
    sim = ShowerSimulator(readout, "PbWO4", "e-")
    e = np.repeat([4000.0, 32000.0], 150)
    return readout, e, sim.simulate(e, seed=1), sim.simulate(e, seed=2)


def test_identical_samples_compare_to_zero(samples):
    readout, e, x, _ = samples
    f = high_level_features(x, e, readout)
    comps = compare_features(f, f, energy_groups=[("4 GeV", e == 4000, e == 4000)])
    assert len(comps) > 100
    assert all(c.sep_power == 0.0 and c.chi2_ndf == 0.0 for c in comps)


def test_a_miscalibrated_sample_is_caught_in_etot_and_not_in_the_shapes(samples):
    """Scaling every voxel by 0.9 moves E_tot/E_inc far off (separation power near 1) but leaves the
    centres of energy and widths exactly as they are."""
    readout, e, x, _ = samples
    ref, low = high_level_features(x, e, readout), high_level_features(0.9 * x, e, readout)
    comps = {c.label: c for c in compare_features(low, ref)}
    assert comps["etot_einc"].sep_power > 0.9
    assert comps["centre_x layer 20"].sep_power == pytest.approx(0.0, abs=1e-12)
    assert comps["width_y layer 20"].sep_power == pytest.approx(0.0, abs=1e-12)


def test_values_outside_the_reference_range_are_penalised_not_dropped(samples):
    readout, e, x, _ = samples
    ref = high_level_features(x, e, readout)
    far = dict(ref, etot_einc=ref["etot_einc"] + 5.0)
    c = compare_features(far, ref, per_layer=False)[0]
    assert c.feature == "etot_einc" and c.sep_power > 0.95


# -- the report --------------------------------------------------------------------------------------------
def _write(path, e, x, readout):
    write_calochallenge(path, e, x, attrs={"readout": readout})
    return path


def test_report_of_a_sample_against_itself_and_against_another_seed(samples, tmp_path):
    readout, e, x1, x2 = samples
    cfg = ValidateConfig(classifier="tiny", fpd_batches=5)
    same = validate_samples(e, x1, e, x1, readout, tmp_path / "same", ValidateConfig(classifier="tiny", plots=False,
                                                                                   fpd_batches=5))
    other = validate_samples(e, x2, e, x1, readout, tmp_path / "other", cfg)
    h_same, h_other = same["headline"], other["headline"]
    assert h_same["sep_power_etot"] == 0 and h_same["max_long_rel"] == 0 and h_same["max_rad_rel"] == 0
    assert h_same["fpd"] <= 3 * h_same["fpd_error"] + 1e-3
    assert abs(h_same["auc_low"] - 0.5) < 0.12 and abs(h_same["auc_high"] - 0.5) < 0.12
    # Another seed of the same simulator: profiles within a few per cent, separation powers small.
    assert h_other["max_rad_rel"] < 0.1 and h_other["sep_power_etot"] < 0.15
    for name in ("report.md", "metrics.json", "profiles.png", "features_etot_einc.png", "features_e_layer.png"):
        assert (tmp_path / "other" / name).stat().st_size > 0, name
    text = (tmp_path / "other" / "report.md").read_text()
    assert "classifier AUC, low-level" in text and "FPD" in text and "| 32 |" in text


def test_validate_command_writes_the_report_and_logs_it_to_mlflow(samples, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store(tmp_path / "mlflow.db"))
    readout, e, x1, x2 = samples
    gen, ref = _write(tmp_path / "gen.h5", e, 0.8 * x2, readout), _write(tmp_path / "ref.h5", e, x1, readout)
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["validate", str(gen), str(ref), "-o", str(out), "--classifier", "tiny",
                                  "--no-per-layer", "--mlflow"])
    assert r.exit_code == 0, r.output
    assert "auc_low" in r.output and "logged to MLflow run" in r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["headline"]["sep_power_etot"] > 0.9  # 20 % of the energy missing is obvious
    run_id = r.output.strip().split()[-1]
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_id)
    assert run.data.metrics["val_sep_power_etot"] == pytest.approx(m["headline"]["sep_power_etot"])
    arts = {a.path for a in client.list_artifacts(run_id, "validation")}
    assert "validation/report.md" in arts and "validation/profiles.png" in arts
    assert log_report(out, run_id=run_id) == run_id  # into an existing run


def test_validate_command_prints_the_evaluators_figures_with_their_spread_and_floor(samples, tmp_path):
    """Half the reference's showers generated: the reference splits into a floor; the classifier
    figures come with their spread over seeds; bad thread counts are refused in one line."""
    readout, e, x1, x2 = samples
    gen, ref = _write(tmp_path / "gen.h5", e[::2], x2[::2], readout), _write(tmp_path / "ref.h5", e, x1, readout)
    r = CliRunner().invoke(main, ["validate", str(gen), str(ref), "-o", str(tmp_path / "rep"), "--classifier", "tiny",
                                  "--seeds", "2", "--no-per-layer", "--cpus", "1"])
    assert r.exit_code == 0, r.output
    lines = {line.split()[0]: line for line in r.output.splitlines() if line.startswith("  ")}
    assert " ± " in lines["auc_low"] and " ± " in lines["auc_high"]
    assert "(floor " in lines["fpd"] and "(floor " in lines["sep_voxel_energy"]
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert m["classifier_config"]["seeds"] == 2 and len(m["classifier"]["low"]["runs"]) == 2
    assert m["evaluator"]["floor"] == {"n_gen": 150, "n_ref": 150, "source": "reference split"}
    for bad in (["--cpus", "0"], ["--seeds", "0"], ["--classifier", "full"]):
        r = CliRunner().invoke(main, ["validate", str(gen), str(ref), *bad])
        assert r.exit_code != 0 and bad[0] in r.output and "Traceback" not in r.output, r.output


def test_validate_keeps_the_report_when_mlflow_is_unreachable(samples, tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    readout, e, x1, x2 = samples
    gen, ref = _write(tmp_path / "gen.h5", e, x2, readout), _write(tmp_path / "ref.h5", e, x1, readout)
    t0 = time.perf_counter()
    r = CliRunner().invoke(main, ["validate", str(gen), str(ref), "-o", str(tmp_path / "rep"), "--classifier", "none",
                                  "--no-distances", "--no-per-layer", "--mlflow"])
    assert r.exit_code != 0 and "logging it to MLflow at http://127.0.0.1:9 failed" in r.output
    assert (tmp_path / "rep" / "report.md").exists() and time.perf_counter() - t0 < 90


def test_validate_names_the_bad_file(tmp_path, samples):
    readout, e, x1, _ = samples
    ref = _write(tmp_path / "ref.h5", e, x1, readout)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5 at all")
    r = CliRunner().invoke(main, ["validate", str(bad), str(ref), "-o", str(tmp_path / "r")])
    assert r.exit_code != 0 and "bad.h5" in r.output and "Traceback" not in r.output
    small = _region_readout()
    other = _write(tmp_path / "other.h5", np.full(20, 1000.0), np.full((20, small.n_voxels), 0.01), small)
    r = CliRunner().invoke(main, ["validate", str(other), str(ref), "-o", str(tmp_path / "r")])
    assert r.exit_code != 0 and "voxels" in r.output


def _region_readout():
    from showers.detector import get_detector

    return get_detector("atlas-like").regions[0].readout


def test_read_sample_strides_through_sorted_files(tmp_path, samples):
    readout, e, x1, _ = samples
    path = _write(tmp_path / "f.h5", e, x1, readout)
    e2, x2, ro = read_sample(path, max_showers=100)
    assert ro.n_voxels == readout.n_voxels and len(e2) == 100
    assert set(np.unique(e2)) == {4000.0, 32000.0}  # both energies of a file sorted by energy
    with pytest.raises(ShowerDataError, match="nan.h5.*non-finite"):
        nan = x1.copy()
        nan[3, 5] = np.nan
        write_calochallenge(tmp_path / "nan.h5", e, nan, attrs={"readout": readout}, validate=False)
        read_sample(tmp_path / "nan.h5", data_checks=False)


# -- fleet summary ----------------------------------------------------------------------------------------------
def test_fleet_summary_flags_regions_that_fail(tmp_path):
    rows = [{"region": "a", "model": "m.a v1", "max_long_rel": 0.1, "max_rad_rel": 0.05,
             "max_sep_power_etot_per_energy": 0.1},
            {"region": "b", "model": "m.b v1", "max_long_rel": 0.5, "max_rad_rel": 0.05,
             "max_sep_power_etot_per_energy": 0.1},
            {"region": "c", "model": "m.c", "error": "no model named m.c"}]
    out = write_summary(rows, tmp_path)
    verdict = {r["region"]: r["fails"] for r in out}
    assert verdict["a"] == [] and "max_long_rel" in verdict["b"][0] and verdict["c"] == ["no model named m.c"]
    text = (tmp_path / "summary.md").read_text()
    assert "**2 failing**" in text and text.index("| c") < text.index("[a]")  # failing regions first
    assert (tmp_path / "summary.csv").read_text().count("\n") == 4
    with pytest.raises(ValueError, match="METRIC<=VALUE"):
        parse_threshold("auc < 0.9")


def test_summary_is_rebuilt_from_the_region_reports(samples, tmp_path):
    readout, e, x1, x2 = samples
    cfg = ValidateConfig(classifier="none", distances=False, per_layer=False, plots=False)
    validate_samples(e, x2, e, x1, readout, tmp_path / "good", cfg)
    validate_samples(e, 0.8 * x2, e, x1, readout, tmp_path / "bad", cfg)
    rows = summarise(tmp_path)
    assert {r["region"]: bool(r["fails"]) for r in rows} == {"good": False, "bad": True}


def test_labels_come_from_the_files_provenance(samples, tmp_path):
    """A figure says what it shows: Geant4 only for Geant4 files, the simulator for its showers, the
    model for generated ones; `calozoo validate` takes them from the files unless --labels says."""
    from showers.formats import source_label, write_calochallenge

    readout, e, x1, x2 = samples
    sim = tmp_path / "sim.h5"
    write_calochallenge(sim, e, x1, {"readout": readout, "generator": "calozoo.showers.simulator"})
    gen = tmp_path / "gen.h5"
    write_calochallenge(gen, e, x2, {"readout": readout, "generator": "calozoo:demo.fastcalogan.r1@v3"})
    assert source_label(Path(__file__).parent / "fixtures" / "g4_pbwo4_electrons_reduced.h5") == "Geant4"
    assert source_label(sim) == "simulator" and source_label(gen) == "demo.fastcalogan.r1@v3"
    assert source_label(_write(tmp_path / "plain.h5", e, x1, readout)) == "plain.h5"
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["validate", str(gen), str(sim), "-o", str(out), "--classifier", "none",
                                  "--no-per-layer", "--no-distances"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "metrics.json").read_text())["labels"] == ["simulator", "demo.fastcalogan.r1@v3"]
    assert "Geant4" not in (out / "report.md").read_text()
