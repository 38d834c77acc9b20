"""validate.official and the evaluator's recipe in the report: the CaloChallenge evaluator's inputs,
bins and separation powers on cases with a known answer, its network's size, the floor."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from showers.readout import get_readout
from showers.simulator import ShowerSimulator
from validate import official
from validate.classifier import SIZES, ClassifierConfig, _network, classifier_seeds
from validate.distances import frechet_distance
from validate.report import HEADLINE, ValidateConfig, validate_samples

RO = get_readout("g4-pbwo4")  # 45 layers x 16 alpha x 9 r of 5 mm
THRESHOLD = official.min_energy("2")


def _voxel(layer, ia, ir):
    return layer * 144 + ia * 9 + ir


def test_one_voxel_shower_gives_the_evaluators_inputs_in_closed_form():
    """One voxel of 500 MeV (layer 10, alpha bin 3, r bin 4) and one below the threshold (layer 20):
    the evaluator's cls-low and cls-high inputs, entry by entry."""
    e_inc, e0 = 1000.0, 500.0
    x = np.zeros((1, RO.n_voxels))
    x[0, _voxel(10, 3, 4)] = e0
    x[0, _voxel(20, 0, 0)] = 0.5 * THRESHOLD
    t = official.apply_threshold(x, THRESHOLD)
    low = official.low_level_input(t, [e_inc])
    assert low.shape == (1, 6481) and low[0, 0] == pytest.approx(3.0)
    assert low[0, 1 + _voxel(10, 3, 4)] == pytest.approx(0.5) and np.count_nonzero(low[0, 1:]) == 1

    hl = official.high_level_input(official.evaluator_features(t, [e_inc], RO))[0]
    assert hl.shape == (362,)
    r, a = 22.5, -math.pi + 3.5 * 2 * math.pi / 16  # the voxel's mid-radius and mid-angle
    # E_inc | E layer, centres x and y, widths x and y | E_tot | sparsity, centre r, width r: blocks of 45
    e_layer, cx, cy, wx, wy = np.split(hl[1:226], 5)
    sparsity, cr, wr = np.split(hl[227:], 3)
    assert hl[0] == pytest.approx(3.0) and hl[226] == pytest.approx(np.log10(e0 + 1e-8))
    assert e_layer[10] == pytest.approx(np.log10(e0 + 1e-8)) and np.allclose(np.delete(e_layer, 10), -8.0)
    assert cx[10] == pytest.approx(r * math.cos(a) / 100) and cy[10] == pytest.approx(r * math.sin(a) / 100)
    assert np.allclose(np.delete(cx, 10), 0.0) and np.allclose(wx, 0.0) and np.allclose(wy, 0.0)
    assert sparsity[10] == pytest.approx(1 - 1 / 144) and np.allclose(np.delete(sparsity, 10), 1.0)
    assert cr[10] == pytest.approx(r / 100) and np.allclose(np.delete(cr, 10), 0.0) and np.allclose(wr, 0.0)


def _evaluators_separation_power(gen, ref, bins):
    """``evaluate_plotting_helper._separation_power`` of ``plt.hist(density=True)`` counts, written
    from the evaluator's code with numpy's histogram (what matplotlib's calls)."""
    h_ref = np.histogram(ref, bins, density=True)[0] * np.diff(bins)
    h_gen = np.histogram(gen, bins, density=True)[0] * np.diff(bins)
    return 0.5 * ((h_ref - h_gen) ** 2 / (h_ref + h_gen + 1e-16)).sum()


@pytest.fixture(scope="module")
def pair():
    sim = ShowerSimulator(RO, "PbWO4", "e-")
    e = np.repeat([2000.0, 64000.0], 100)
    a = official.apply_threshold(sim.simulate(e, seed=1), THRESHOLD)
    b = official.apply_threshold(sim.simulate(e, seed=2), THRESHOLD)
    return e, a, b


def test_separation_powers_are_the_evaluators_on_its_bins(pair):
    """Every histogram of ours against the evaluator's formula on the bins its plotting helper
    builds: the reference's largest layer energy and voxel, ±30 mm centres, 0-30 mm widths."""
    e, a, b = pair
    fa, fb = official.evaluator_features(a, e, RO), official.evaluator_features(b, e, RO)
    hists = {(h.feature, h.layer): h.sep_power for h in official.evaluator_histograms(fa, fb, a, b, "2")}
    expect = {("etot_einc", None): _evaluators_separation_power(fa["e_tot"] / e, fb["e_tot"] / e,
                                                                 np.linspace(0.5, 1.5, 101)),
              ("voxel_energy", None): _evaluators_separation_power(
                  a.ravel(), b.ravel(), np.logspace(np.log10(THRESHOLD), np.log10(b.max()), 50))}
    for layer in (0, 12, 44):
        expect["e_layer", layer] = _evaluators_separation_power(
            fa["e_layer"][:, layer], fb["e_layer"][:, layer],
            np.logspace(np.log10(THRESHOLD), np.log10(fb["e_layer"][:, layer].max()), 40))
        for name, lo in (("centre_x", -30.0), ("centre_y", -30.0), ("width_x", 0.0), ("width_y", 0.0)):
            expect[name, layer] = _evaluators_separation_power(fa[name][:, layer], fb[name][:, layer],
                                                               np.linspace(lo, 30.0, 101))
    for key, value in expect.items():
        assert hists[key] == pytest.approx(value, rel=1e-9, abs=1e-15), key
    assert len(hists) == 2 + 45 * 8 and 0 < hists["e_layer", 12] < 0.5
    summary = official.summarise(official.evaluator_histograms(fa, fa, a, a, "2"))
    assert summary["width_y"]["max"] == 0.0 and summary["etot_einc"]["mean"] == 0.0


def test_values_outside_the_bins_are_dropped_and_an_empty_histogram_is_undefined(pair):
    e, a, _ = pair
    fa = official.evaluator_features(a, e, RO)
    far = dict(fa, e_tot=2.0 * fa["e_tot"])  # E_tot/E_inc near 1.9: outside 0.5-1.5, nothing left
    h = official.evaluator_histograms(far, fa, a, a, "2", features=("etot_einc",))[0]
    assert h.gen.sum() == 0 and math.isnan(h.sep_power)
    half = dict(fa, e_tot=np.where(np.arange(len(e)) % 2 == 0, 2.0, 1.0) * fa["e_tot"])
    h = official.evaluator_histograms(half, fa, a, a, "2", features=("etot_einc",))[0]
    assert h.gen.sum() == len(e) // 2 and h.sep_power < 0.1  # the half in range is the reference's shape


def test_which_readouts_get_the_evaluators_binning():
    from showers.detector import get_detector

    assert official.evaluator_dataset("g4-pbwo4") == "2" and official.evaluator_dataset("par04") == "3"
    assert official.evaluator_dataset("calochallenge-1-pions") == "1-pions"
    assert official.evaluator_dataset(get_detector("atlas-like").regions[0].readout) is None
    assert official.evaluator_dataset("g4-pbwo4", "none") is None and official.min_energy(None) == 0.0
    with pytest.raises(ValueError, match="unknown CaloChallenge dataset '4'"):
        official.evaluator_dataset("g4-pbwo4", "4")


def test_floor_split_takes_the_generated_energies_or_says_why_not():
    gen_e = np.repeat([1000.0, 8000.0], [10, 5])
    ref_e = np.repeat([1000.0, 8000.0, 64000.0], [25, 12, 7])
    a, b = official.floor_split(gen_e, ref_e, seed=1)
    assert sorted(ref_e[a]) == sorted(gen_e) and not set(a) & set(b) and len(a) + len(b) == len(ref_e)
    why = official.floor_split(gen_e, ref_e[np.r_[0:15, 25:44]])
    assert isinstance(why, str) and "15 showers at 1 GeV, fewer than twice the generated sample's 10" in why
    continuous = np.geomspace(1000.0, 9000.0, 15)
    assert len(official.floor_split(continuous, ref_e)[0]) == 15
    assert "fewer than twice" in official.floor_split(continuous, ref_e[:20])


# -- the classifier -----------------------------------------------------------------------------------
def test_official_size_is_the_evaluators_network():
    """cls-low on 6480 voxels: 21669889 parameters, what the evaluator prints for its DNN."""
    cfg = ClassifierConfig(**SIZES["official"])
    net = _network(6481, cfg)
    assert sum(p.numel() for p in net.parameters()) == 21_669_889
    assert [m.negative_slope for m in net if hasattr(m, "negative_slope")] == [0.01] * 3
    assert (cfg.dtype, cfg.epochs, cfg.batch_size, cfg.learning_rate) == ("float64", 50, 1000, 2e-4)
    from calozoo.cli import CLASSIFIER_SIZES

    assert CLASSIFIER_SIZES == tuple(SIZES)


def test_classifier_seeds_give_the_mean_and_spread_of_their_runs():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(600, 4))
    gen = rng.normal(size=(600, 4)) + [1.0, 0, 0, 0]
    r = classifier_seeds(gen, ref, ClassifierConfig(**SIZES["tiny"]), n_seeds=3)
    aucs = [run["auc"] for run in r["runs"]]
    assert r["auc"] == pytest.approx(np.mean(aucs)) and r["auc_std"] == pytest.approx(np.std(aucs, ddof=1))
    assert len(set(aucs)) > 1 and 0.65 < r["auc"] < 0.85  # Phi(1 / sqrt 2) = 0.76
    assert r["n_val"] == 240 and all(1 <= run["epoch"] <= 12 for run in r["runs"])


def test_frechet_distance_with_a_constant_feature():
    """A feature constant in one sample (a singular covariance) leaves the closed form as it is."""
    s1, s2 = np.array([0.0, 2.0, 0.5]), np.array([3.0, 2.0, 1.5])
    expected = 1.0 + np.sum((s1 - s2) ** 2)
    got = frechet_distance([0.0, 0.0, 0.0], np.diag(s1**2), [1.0, 0.0, 0.0], np.diag(s2**2))
    assert got == pytest.approx(expected, rel=1e-9)


# -- the report ---------------------------------------------------------------------------------------
def test_report_gives_the_floor_where_the_reference_has_twice_the_showers(pair, tmp_path):
    e, a, b = pair
    cfg = ValidateConfig(classifier="none", plots=False, per_layer=False, fpd_batches=3)
    gen = np.r_[0:50, 100:150]
    m = validate_samples(e[gen], a[gen], e, b, RO, tmp_path / "split", cfg)
    h, fl = m["headline"], m["evaluator"]["floor"]
    assert (fl["n_gen"], fl["n_ref"], fl["source"]) == (100, 100, "reference split")
    assert {"fpd_floor", "kpd_floor", "sep_etot_einc_floor", "sep_layers_over_floor_max"} <= set(h)
    assert 0 < h["sep_layers_over_floor_max"] < 2.5  # another seed of the same simulator
    assert h["sep_etot_einc_over_floor"] == pytest.approx(h["sep_etot_einc"] / h["sep_etot_einc_floor"])
    assert "Floor: the reference split in two, 100 showers against the other 100." in (
        tmp_path / "split" / "report.md").read_text()
    cfg = ValidateConfig(classifier="none", plots=False, per_layer=False, distances=False)
    m = validate_samples(e, a, e, b, RO, tmp_path / "none", cfg)
    assert "sep_etot_einc_floor" not in m["headline"] and "fewer than twice" in m["evaluator"]["floor"]["note"]
    m = validate_samples(e, a, e, b, RO, tmp_path / "given", cfg, floor=(e, b))  # the reference itself
    assert m["headline"]["sep_e_layer_mean_floor"] == 0.0 and m["headline"]["sep_e_layer_over_floor"] == math.inf


def test_every_headline_name_is_listed_and_documented(pair, tmp_path):
    e, a, b = pair
    m = validate_samples(e[::2], a[::2], e, b, RO, tmp_path, ValidateConfig(classifier="tiny", seeds=2, plots=False,
                                                                          per_layer=False, fpd_batches=3))
    assert set(m["headline"]) <= set(HEADLINE)
    assert {"auc_low", "auc_low_std", "jsd_high_std", "sep_voxel_energy_over_floor"} <= set(m["headline"])
    doc = (Path(__file__).parents[1] / "docs" / "validation.md").read_text()
    missing = [name for name in HEADLINE if f"`{name}`" not in doc]
    assert not missing, f"docs/validation.md does not name {missing}"
