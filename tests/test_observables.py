"""Observables and histogram metrics on showers whose answers are known in closed form."""

import math

import hist
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from showers import ShowerDataError, get_readout
from showers import observables as obs

REGULAR = get_readout("g4-pbwo4")  # 45 layers x 16 alpha x 9 r, 5 mm r bins
IRREGULAR = get_readout("calochallenge-1-photons")  # 24 layers, several without voxels


def _voxel(readout, layer, ia, ir):
    """Index of voxel (alpha bin ia, r bin ir) of ``layer``, from the documented order alone:
    layers outermost, then alpha, then r fastest."""
    n_before = sum(lay.n_voxels for lay in readout.layers[:layer])
    return n_before + ia * readout.layers[layer].n_r + ir


def _centre_xy(readout, layer, ia, ir):
    lay = readout.layers[layer]
    r = 0.5 * (lay.r_edges[ir] + lay.r_edges[ir + 1])
    step = 2 * math.pi / lay.n_alpha
    a = -math.pi + (ia + 0.5) * step
    return r * math.cos(a), r * math.sin(a), r


# -- energies ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("readout", [REGULAR, IRREGULAR], ids=lambda r: r.name)
def test_energy_per_layer_recovers_known_layer_energies(readout):
    rng = np.random.default_rng(1)
    n = 4
    layer_e = rng.uniform(1, 100, (n, readout.n_layers))
    showers = np.zeros((n, readout.n_voxels))
    for layer in range(readout.n_layers):
        lo, hi = readout.layer_offsets[layer], readout.layer_offsets[layer + 1]
        if hi == lo:
            layer_e[:, layer] = 0.0  # nowhere to put energy
            continue
        share = rng.dirichlet(np.ones(hi - lo), size=n)  # a random split summing to 1
        showers[:, lo:hi] = share * layer_e[:, layer : layer + 1]
    np.testing.assert_allclose(obs.energy_per_layer(showers, readout), layer_e, rtol=1e-12)
    einc = np.full(n, 2.0 * layer_e.sum(axis=1).max())
    np.testing.assert_allclose(obs.etot_over_einc(showers, readout, einc[:, None]),
                               layer_e.sum(axis=1) / einc, rtol=1e-12)


def test_energy_per_layer_keeps_empty_layers_zero_in_irregular_readout():
    # reduceat would hand an empty layer the next layer's first voxel: make that voxel non-zero.
    showers = np.zeros((1, IRREGULAR.n_voxels))
    first_of_layer_12 = IRREGULAR.layer_offsets[12]
    showers[0, first_of_layer_12] = 5.0
    e = obs.energy_per_layer(showers, IRREGULAR)[0]
    assert e[12] == 5.0
    assert e.sum() == 5.0


def test_longitudinal_profile_is_ratio_of_means():
    a = np.zeros(REGULAR.n_voxels)
    b = np.zeros(REGULAR.n_voxels)
    a[_voxel(REGULAR, 0, 3, 0)] = 30.0
    b[_voxel(REGULAR, 2, 0, 4)] = 10.0
    b[_voxel(REGULAR, 0, 1, 1)] = 20.0
    showers = np.stack([a, b])
    raw = obs.longitudinal_profile(showers, REGULAR, normalise=False)
    expected = np.zeros(REGULAR.n_layers)
    expected[0], expected[2] = (30 + 20) / 2, 10 / 2
    np.testing.assert_allclose(raw, expected)
    np.testing.assert_allclose(obs.longitudinal_profile(showers, REGULAR), expected / 30.0)


# -- radial -----------------------------------------------------------------------------------------
def test_radial_profile_regular_puts_energy_in_its_bin():
    showers = np.zeros((2, REGULAR.n_voxels))
    showers[0, _voxel(REGULAR, 5, 2, 3)] = 4.0
    showers[0, _voxel(REGULAR, 9, 11, 3)] = 6.0
    showers[1, _voxel(REGULAR, 0, 0, 8)] = 2.0
    per_shower = obs.energy_per_radial_bin(showers, REGULAR)
    expected = np.zeros((2, 9))
    expected[0, 3], expected[1, 8] = 10.0, 2.0
    np.testing.assert_array_equal(per_shower, expected)
    np.testing.assert_allclose(obs.radial_profile(showers, REGULAR), expected.mean(axis=0))
    np.testing.assert_allclose(obs.radial_profile(showers, REGULAR, normalise=True),
                               [0, 0, 0, 10 / 12, 0, 0, 0, 0, 2 / 12])


def test_radial_profile_irregular_shares_a_wide_voxel_by_area():
    # calochallenge-1-photons layer 0 has the bin [10, 30] mm; the union of all layers' edges cuts
    # it at 12, 15, 20, 25 mm, so a uniform annulus shares its energy as (r2² - r1²) / (30² - 10²).
    layer0 = IRREGULAR.layers[0]
    ir = layer0.r_edges.index(10.0)
    assert layer0.r_edges[ir + 1] == 30.0
    showers = np.zeros((1, IRREGULAR.n_voxels))
    showers[0, _voxel(IRREGULAR, 0, 0, ir)] = 800.0
    edges = IRREGULAR.r_edges_union
    prof = obs.radial_profile(showers, IRREGULAR)
    cuts = [10, 12, 15, 20, 25, 30]
    for lo, hi in zip(cuts, cuts[1:]):
        j = int(np.flatnonzero(edges == lo)[0])
        assert edges[j + 1] == hi
        assert prof[j] == pytest.approx(800.0 * (hi**2 - lo**2) / (30**2 - 10**2))
    assert prof.sum() == pytest.approx(800.0)


@pytest.mark.parametrize("readout", [REGULAR, IRREGULAR], ids=lambda r: r.name)
def test_radial_profiles_conserve_energy_and_agree(readout):
    rng = np.random.default_rng(2)
    showers = rng.exponential(1.0, (5, readout.n_voxels))
    per_layer = obs.radial_profile_per_layer(showers, readout)
    assert per_layer.shape == (readout.n_layers, len(readout.r_edges_union) - 1)
    np.testing.assert_allclose(per_layer.sum(axis=0), obs.radial_profile(showers, readout), rtol=1e-12)
    np.testing.assert_allclose(per_layer.sum(axis=1), obs.longitudinal_profile(showers, readout, normalise=False),
                               rtol=1e-12)
    normed = obs.radial_profile_per_layer(showers, readout, normalise=True)
    active = np.diff(readout.layer_offsets) > 0
    np.testing.assert_allclose(normed[active].sum(axis=1), 1.0)
    assert np.all(normed[~active] == 0)


# -- centre of energy and width ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "readout, layer, ia, ir",
    [(REGULAR, 7, 4, 2), (REGULAR, 0, 15, 8), (IRREGULAR, 1, 3, 5), (IRREGULAR, 2, 9, 0)],
    ids=["regular-a", "regular-b", "cc1-layer1", "cc1-layer2"],
)
def test_single_voxel_shower_centre_is_voxel_centre_width_zero(readout, layer, ia, ir):
    showers = np.zeros((1, readout.n_voxels), dtype=np.float32)
    showers[0, _voxel(readout, layer, ia, ir)] = 7.5
    x, y, _ = _centre_xy(readout, layer, ia, ir)
    m = obs.transverse_moments(showers, readout, empty=np.nan)
    assert m.x[0, layer] == pytest.approx(x, abs=1e-9)
    assert m.y[0, layer] == pytest.approx(y, abs=1e-9)
    assert m.width_x[0, layer] == pytest.approx(0.0, abs=1e-5)
    assert m.width_y[0, layer] == pytest.approx(0.0, abs=1e-5)
    others = np.arange(readout.n_layers) != layer
    assert np.all(np.isnan(m.x[0, others])) and np.all(np.isnan(m.width_y[0, others]))
    # The default marks layers without energy with 0, as the CaloChallenge's +1e-16 does.
    cx, cy = obs.centre_of_energy(showers, readout)
    assert np.all(cx[0, others] == 0) and np.all(cy[0, others] == 0)


@pytest.mark.parametrize("readout, layer, ir", [(REGULAR, 3, 4), (IRREGULAR, 2, 7)], ids=["regular", "cc1"])
def test_uniform_ring_is_centred_with_width_r_over_sqrt2(readout, layer, ir):
    # Equal energy in every alpha bin at one radius: centre 0 by symmetry, and <cos²> over
    # n >= 3 equally spaced angles is exactly 1/2, so both widths are r / sqrt(2).
    lay = readout.layers[layer]
    showers = np.zeros((1, readout.n_voxels))
    for ia in range(lay.n_alpha):
        showers[0, _voxel(readout, layer, ia, ir)] = 3.0
    r = _centre_xy(readout, layer, 0, ir)[2]
    cx, cy = obs.centre_of_energy(showers, readout)
    wx, wy = obs.width(showers, readout)
    assert cx[0, layer] == pytest.approx(0.0, abs=1e-9)
    assert cy[0, layer] == pytest.approx(0.0, abs=1e-9)
    assert wx[0, layer] == pytest.approx(r / math.sqrt(2), rel=1e-9)
    assert wy[0, layer] == pytest.approx(r / math.sqrt(2), rel=1e-9)


def test_two_opposite_voxels_weighted_mean_and_std():
    # Two points at ±p with weights w1, w2: mean (w1 - w2) / (w1 + w2) p, std 2|p| sqrt(w1 w2) / (w1 + w2).
    layer, ia, ir, w1, w2 = 10, 2, 6, 3.0, 1.0
    n_alpha = REGULAR.layers[layer].n_alpha
    showers = np.zeros((1, REGULAR.n_voxels))
    showers[0, _voxel(REGULAR, layer, ia, ir)] = w1
    showers[0, _voxel(REGULAR, layer, ia + n_alpha // 2, ir)] = w2
    px, py, _ = _centre_xy(REGULAR, layer, ia, ir)
    m = obs.transverse_moments(showers, REGULAR)
    f = (w1 - w2) / (w1 + w2)
    g = 2 * math.sqrt(w1 * w2) / (w1 + w2)
    assert (m.x[0, layer], m.y[0, layer]) == pytest.approx((f * px, f * py), abs=1e-9)
    assert (m.width_x[0, layer], m.width_y[0, layer]) == pytest.approx((g * abs(px), g * abs(py)), abs=1e-6)


@pytest.mark.parametrize("readout", [REGULAR, IRREGULAR], ids=lambda r: r.name)
def test_radial_moments_of_two_rings(readout):
    """Weights w1, w2 at the midpoints r1, r2 of two radial bins (any angles): mean and standard
    deviation of two points; a layer without energy (or voxels) gives ``empty``."""
    layer = readout.active_layers[-1]
    lay = readout.layers[layer]
    (ia, ir1), (ib, ir2), w1, w2 = (0, 0), (lay.n_alpha - 1, lay.n_r - 1), 3.0, 1.0
    showers = np.zeros((1, readout.n_voxels))
    showers[0, _voxel(readout, layer, ia, ir1)] = w1
    showers[0, _voxel(readout, layer, ib, ir2)] = w2
    r1, r2 = _centre_xy(readout, layer, ia, ir1)[2], _centre_xy(readout, layer, ib, ir2)[2]
    centre, width = obs.radial_moments(showers, readout, empty=-1.0)
    assert centre[0, layer] == pytest.approx((w1 * r1 + w2 * r2) / (w1 + w2), rel=1e-12)
    assert width[0, layer] == pytest.approx(abs(r2 - r1) * math.sqrt(w1 * w2) / (w1 + w2), rel=1e-9)
    others = np.arange(readout.n_layers) != layer
    assert (centre[0, others] == -1.0).all() and (width[0, others] == -1.0).all()


def test_layers_without_angular_bins_have_no_transverse_centre():
    # cc1-photons layers 0 and 3 have a single alpha bin: a voxel's "x" would just be its radius.
    assert obs.layers_binned_in_alpha(IRREGULAR) == [1, 2]
    showers = np.zeros((1, IRREGULAR.n_voxels))
    showers[0, _voxel(IRREGULAR, 0, 0, 3)] = 1.0
    m = obs.transverse_moments(showers, IRREGULAR, empty=-1.0)
    assert m.x[0, 0] == -1.0 and m.width_x[0, 0] == -1.0


# -- voxel statistics -------------------------------------------------------------------------------
def test_occupancy_and_sparsity_count_voxels_strictly_above_threshold():
    showers = np.zeros((2, IRREGULAR.n_voxels))
    lo = IRREGULAR.layer_offsets[1]
    showers[0, lo : lo + 40] = 2.0  # 40 of layer 1's 160 voxels above 1 MeV
    showers[0, lo + 40] = 1.0  # at the threshold: not counted
    occ, occ_all = obs.occupancy(showers, IRREGULAR, threshold=1.0)
    assert occ[0, 1] == pytest.approx(40 / 160)
    assert occ_all[0] == pytest.approx(40 / 368)
    assert np.all(occ[1] == 0) and occ_all[1] == 0
    sp, sp_all = obs.sparsity(showers, IRREGULAR, threshold=1.0)
    np.testing.assert_allclose(sp, 1 - occ)
    assert sp_all[0] == pytest.approx(1 - 40 / 368)
    assert sp[0, 5] == 1.0  # layer 5 has no voxels


def test_voxel_energy_spectrum_returns_exactly_the_hits():
    rng = np.random.default_rng(3)
    showers = np.where(rng.random((3, REGULAR.n_voxels)) < 0.1, rng.exponential(1.0, (3, REGULAR.n_voxels)), 0.0)
    spec = obs.voxel_energy_spectrum(showers, REGULAR, threshold=0.5)
    np.testing.assert_array_equal(np.sort(spec), np.sort(showers[showers > 0.5]))


def test_wrong_shapes_are_refused():
    with pytest.raises(ShowerDataError, match="6480"):
        obs.energy_per_layer(np.zeros((2, 100)), REGULAR)
    with pytest.raises(ValueError, match="3 incident energies for 2 showers"):
        obs.etot_over_einc(np.zeros((2, REGULAR.n_voxels)), REGULAR, [1.0, 2.0, 3.0])


# -- histograms -------------------------------------------------------------------------------------
def test_histogram_counts_match_numpy_and_weights_give_variances():
    values = np.array([0.1, 0.2, 0.25, 0.7, 1.5, -3.0, np.nan])
    edges = np.array([0.0, 0.5, 1.0])
    h = obs.histogram(values, edges)
    assert isinstance(h, hist.Hist)
    np.testing.assert_array_equal(h.values(), np.histogram(values[~np.isnan(values)], edges)[0])
    hw = obs.histogram(values, edges, weights=np.full(values.size, 2.0))
    np.testing.assert_array_equal(hw.values(), [6.0, 2.0])
    np.testing.assert_array_equal(hw.variances(), [12.0, 4.0])
    with pytest.raises(ValueError):
        obs.histogram(values, [1.0, 0.0])


def test_calochallenge_bins():
    e = obs.calochallenge_bins("etot_einc")
    assert len(e) == 101 and e[0] == 0.5 and e[-1] == 1.5
    layer = obs.calochallenge_bins("energy_per_layer", "1-photons", e_max=1e5)
    assert len(layer) == 40 and layer[0] == pytest.approx(1.0) and layer[-1] == pytest.approx(1e5)
    np.testing.assert_allclose(np.diff(np.log(layer)), np.log(1e5) / 39)
    vox = obs.calochallenge_bins("voxel_energy", "2", e_max=1e3)
    assert len(vox) == 50 and vox[0] == pytest.approx(0.5e-3 / 0.033)
    assert obs.calochallenge_bins("centre", "1-pions", layer=12)[0] == -500.0
    assert obs.calochallenge_bins("width", "1-pions", layer=1)[-1] == 100.0
    assert obs.calochallenge_bins("centre", "3")[-1] == 30.0
    assert len(obs.calochallenge_bins("sparsity")) == 21
    assert obs.calochallenge_bins("centre_r", "2")[-1] == 42.0 and obs.calochallenge_bins("width_r", "3")[-1] == 20.0
    assert obs.calochallenge_bins("centre_r", "1-pions", layer=14)[-1] == 1500.0
    with pytest.raises(ValueError, match="e_max"):
        obs.calochallenge_bins("energy_per_layer", "2")
    with pytest.raises(ValueError, match="layer"):
        obs.calochallenge_bins("width", "1-photons")
    with pytest.raises(ValueError, match="unknown feature"):
        obs.calochallenge_bins("depth")


def test_separation_power_closed_forms():
    h = np.array([3.0, 5.0, 0.0, 2.0])
    assert obs.separation_power(h, h) == 0.0
    assert obs.separation_power(h, 7 * h) == pytest.approx(0.0)  # shapes, not counts, compared
    assert obs.separation_power([4.0, 0.0, 0.0], [0.0, 1.0, 3.0]) == pytest.approx(1.0)
    # p = (1, 0), q = (1/2, 1/2): ½ [(1/2)² / (3/2) + (1/2)² / (1/2)] = 1/3
    assert obs.separation_power([2.0, 0.0], [1.0, 1.0]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        obs.separation_power([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        obs.separation_power([0.0, 0.0], [1.0, 2.0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=12).filter(
    lambda rows: sum(a for a, _ in rows) > 0 and sum(b for _, b in rows) > 0))
def test_separation_power_is_symmetric_and_in_unit_interval(rows):
    a = np.array([r[0] for r in rows], dtype=float)
    b = np.array([r[1] for r in rows], dtype=float)
    sp = obs.separation_power(a, b)
    assert -1e-12 <= sp <= 1 + 1e-12
    assert sp == pytest.approx(obs.separation_power(b, a))


def test_separation_power_accepts_hist_objects():
    edges = np.linspace(0, 1, 5)
    h1 = obs.histogram([0.1, 0.1, 0.6], edges)
    h2 = obs.histogram([0.9], edges)
    assert obs.separation_power(h1, h2) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="edges"):
        obs.separation_power(h1, obs.histogram([0.1], np.linspace(0, 2, 5)))


def test_chi2_closed_forms():
    h = np.array([10.0, 20.0, 0.0, 5.0])
    assert obs.chi2_histograms(h, h) == (0.0, 2)  # the bin empty in both is skipped
    assert obs.chi2_histograms(3 * h, h).chi2 == pytest.approx(0.0)  # scaled to the reference count
    # Unit weights, k = 1: Σ (n_gen - n_ref)² / (n_gen + n_ref) = 100/10 + 100/10.
    r = obs.chi2_histograms([0.0, 10.0], [10.0, 0.0])
    assert r.chi2 == pytest.approx(20.0) and r.ndf == 1 and r.reduced == pytest.approx(20.0)
    # k = 20/10 = 2: (2·6 - 8)² / (4·6 + 8) + (2·4 - 12)² / (4·4 + 12)
    assert obs.chi2_histograms([6.0, 4.0], [8.0, 12.0]).chi2 == pytest.approx(16 / 32 + 16 / 28)


def test_chi2_uses_the_histograms_own_variances():
    edges = np.array([0.0, 1.0, 2.0])
    # generated: 5 entries of weight 2 in bin 0 → count 10, variance 20; reference: 10 in bin 1.
    gen = obs.histogram(np.full(5, 0.5), edges, weights=np.full(5, 2.0))
    ref = obs.histogram(np.full(10, 1.5), edges)
    r = obs.chi2_histograms(gen, ref)
    assert r.chi2 == pytest.approx(100 / 20 + 100 / 10)
    assert r.ndf == 1
