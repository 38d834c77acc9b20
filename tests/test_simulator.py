"""The built-in simulator: reproducibility, conservation, and the physics each option must show."""

import numpy as np
import pytest

from showers.readout import Readout, get_readout
from showers.simulator import ShowerSimulator, canonical_particle

DEEP = Readout.regular("deep", 40, 8, np.arange(11) * 20.0, 30.0)  # 1.2 m deep, 20 cm radius


def moments(sim, energy, n=400, seed=1, angle=90.0):
    x, leak = sim.simulate(np.full(n, energy), angle_deg=angle, seed=seed, return_leakage=True)
    grid = sim.readout.to_grid(x).astype(np.float64)
    layers, radial = grid.sum((2, 3)), grid.sum((1, 2))
    depth = (layers * np.arange(layers.shape[1])).sum(1) / layers.sum(1)
    r = np.array(sim.readout.layers[0].r_edges)
    rmid = 0.5 * (r[1:] + r[:-1])
    radius = (radial * rmid).sum(1) / radial.sum(1)
    resp = x.sum(1) / energy
    return {"depth": depth.mean(), "radius": radius.mean(), "resp": resp.mean(), "resp_std": resp.std(),
            "x": x, "leak": leak}


def test_seeded_and_reproducible():
    sim = ShowerSimulator("g4-pbwo4", "PbWO4", "e-")
    a = sim.simulate([5000.0, 20000.0], seed=3)
    b = sim.simulate([5000.0, 20000.0], seed=3)
    c = sim.simulate([5000.0, 20000.0], seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.dtype == np.float32 and a.shape == (2, 6480)


def test_energy_in_voxels_plus_leakage_is_the_deposit():
    sim = ShowerSimulator("g4-pbwo4", "PbWO4", "e-")
    e = np.array([1000.0, 50000.0, 200000.0])
    x, leak = sim.simulate(e, seed=1, return_leakage=True)
    np.testing.assert_allclose(x.astype(np.float64).sum(1) + leak, e * sim.em.deposit, rtol=1e-5)
    assert np.all(x >= 0)


def test_showers_deepen_logarithmically_with_energy():
    sim = ShowerSimulator(DEEP, "PbWO4", "e-")
    d = [moments(sim, e)["depth"] for e in (1000.0, 10000.0, 100000.0)]
    assert d[0] < d[1] < d[2]
    # equal steps in ln E give (roughly) equal steps in depth
    assert (d[2] - d[1]) == pytest.approx(d[1] - d[0], rel=0.35)


def test_photons_start_later_than_electrons():
    e = moments(ShowerSimulator(DEEP, "PbWO4", "e-"), 20000.0, n=1000)
    g = moments(ShowerSimulator(DEEP, "PbWO4", "gamma"), 20000.0, n=1000)
    # 9/7 X0 of conversion length ~ 11 mm ~ 0.4 of a 30 mm layer
    assert 0.2 < g["depth"] - e["depth"] < 0.7


def test_pions_are_wider_deeper_and_fluctuate_more():
    e = moments(ShowerSimulator(DEEP, "PbLAr", "e-"), 20000.0)
    p = moments(ShowerSimulator(DEEP, "PbLAr", "pion"), 20000.0)
    assert p["depth"] > e["depth"] + 3
    assert p["radius"] > 1.5 * e["radius"]
    assert p["resp_std"] > 2 * e["resp_std"]
    assert p["resp"] < e["resp"]  # non-compensation: h/e < 1


def test_sampling_calorimeter_resolution_follows_the_stochastic_term():
    ro = Readout.regular("contained", 60, 1, [0.0, 500.0], 10.0)
    sim = ShowerSimulator(ro, "SiW", "e-")
    for e in (4000.0, 64000.0):
        m = moments(sim, e, n=2000)
        expected = sim.medium.sigma_samp / np.sqrt(e / 1000.0)
        assert m["resp_std"] == pytest.approx(expected, rel=0.2)
    homog = moments(ShowerSimulator(Readout.regular("c", 60, 1, [0.0, 500.0], 10.0), "PbWO4", "e-"), 4000.0, n=2000)
    assert homog["resp_std"] < 0.2 * sim.medium.sigma_samp / 2


def test_incident_angle_changes_a_sampling_calorimeter_only():
    ro = Readout.regular("a", 40, 4, np.arange(6) * 10.0, 5.0)
    samp = ShowerSimulator(ro, "SciPb", "e-")
    hom = ShowerSimulator(ro, "PbWO4", "e-")
    s90, s30 = moments(samp, 20000.0, n=2000, angle=90.0), moments(samp, 20000.0, n=2000, angle=30.0)
    # a longer path per sampling cell: GFLASH's F_s halves, so the shower peaks earlier and the
    # sampling resolution grows as 1/sqrt(sin(angle))
    assert s30["depth"] < s90["depth"] - 0.1
    assert s30["resp_std"] / s90["resp_std"] == pytest.approx(np.sqrt(2.0), rel=0.15)
    h90, h30 = moments(hom, 20000.0, angle=90.0), moments(hom, 20000.0, angle=30.0)
    assert h90["depth"] == pytest.approx(h30["depth"], abs=1e-9)


def test_sparse_at_low_and_dense_at_high_energy():
    sim = ShowerSimulator("g4-pbwo4", "PbWO4", "e-")
    lo = (sim.simulate(np.full(50, 1000.0), seed=2) > 0).mean()
    hi = (sim.simulate(np.full(50, 256000.0), seed=2) > 0).mean()
    # Geant4 in this readout: 8% of voxels hit at 1 GeV, 91% at 256 GeV
    assert lo < 0.2 and hi > 0.6


def test_irregular_readout_and_errors():
    ro = get_readout("calochallenge-1-photons")
    with pytest.raises(ValueError, match="layer thicknesses"):
        ShowerSimulator(ro, "PbLAr", "gamma")
    from dataclasses import replace
    thick = tuple(30.0 if layer.n_voxels else 0.0 for layer in ro.layers)
    sim = ShowerSimulator(replace(ro, layer_thickness_mm=thick), "PbLAr", "gamma")
    x, leak = sim.simulate([8000.0] * 10, seed=1, return_leakage=True)
    assert x.shape == (10, 368)
    assert np.all(np.isfinite(x)) and np.all(x >= 0)
    # only the active layers are scored: a shower in a layer without voxels is leakage
    assert (x.sum(1) + leak).mean() == pytest.approx(8000.0, rel=0.05)
    with pytest.raises(ValueError, match="energies"):
        sim.simulate([-1.0])
    with pytest.raises(KeyError, match="known"):
        canonical_particle("muon")
    with pytest.raises(KeyError, match="known media"):
        ShowerSimulator("g4-pbwo4", "Unobtainium")
