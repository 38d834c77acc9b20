"""zoo.calibration: a generator's voxel energies mapped onto the data's per-ring distributions and
onto its spectrum of small deposits with its discrete lines, each layer's energy kept; and the
flow-matching family refitting it at every checkpoint."""

from pathlib import Path

import numpy as np
import pytest
import torch

from showers import get_readout
from trainers.data import load_showers
from zoo.calibration import MarginalCalibration

G4 = Path(__file__).parent / "fixtures" / "g4_pbwo4_electrons_reduced.h5"
PB_K_LINE = np.float32(0.088005)  # MeV: the lead K-shell binding energy (as Geant4 stores it), a line of the spectrum


@pytest.fixture(scope="module")
def g4_16gev():
    data = load_showers(G4, readout="g4-pbwo4")
    return data.showers[data.energy == 16000.0].astype(np.float64)


def _smeared(showers: np.ndarray, seed: int) -> np.ndarray:
    """What a smooth generator makes of them: every hit off by a log-normal factor (lines smeared) and
    a fifth of the empty voxels given a spurious deposit of 20-50 keV (occupancy too high)."""
    rng = np.random.default_rng(seed)
    out = showers * np.exp(rng.normal(0.0, 0.3, showers.shape))
    spurious = (showers == 0) & (rng.random(showers.shape) < 0.2)
    out[spurious] = rng.uniform(0.02, 0.05, int(spurious.sum()))
    return out


def _on_line(x: np.ndarray) -> float:
    hits = x[x > 0]
    return float(np.mean(np.abs(hits - PB_K_LINE) < 1e-7))


def test_the_maps_put_back_the_lines_the_occupancy_and_each_layers_energy(g4_16gev):
    n = len(g4_16gev)
    calib = MarginalCalibration(get_readout("g4-pbwo4"), n_knots=1, per_knot=n)
    calib.fit_reference(np.zeros(n, dtype=int), np.full(n, 16000.0), g4_16gev, np.array([16000.0]))
    assert not calib.is_fitted
    calib.fit_model(_smeared(g4_16gev, seed=1))
    assert calib.is_fitted

    fresh = _smeared(g4_16gev, seed=2)  # another draw of the "generator": the maps are not fitted to it
    with torch.no_grad():
        out = calib(torch.as_tensor(fresh), torch.zeros(n, dtype=torch.float64)).numpy()

    # the lead K line: ~3 % of Geant4's hits sit exactly on it, none of the smeared ones, and again after
    assert _on_line(g4_16gev) > 0.01 and _on_line(fresh) < 1e-4
    assert abs(_on_line(out) / _on_line(g4_16gev) - 1.0) < 0.25
    # occupancy per layer: the spurious deposits are gone
    occ = [(x.reshape(n, 45, -1) > 0).mean(axis=(0, 2)) for x in (g4_16gev, fresh, out)]
    assert np.abs(occ[1] - occ[0]).max() > 0.1
    assert np.abs(occ[2] - occ[0]).max() < 0.03
    # and almost no hit below 60 keV, as in Geant4 (the smeared sample has many)
    low = [float(np.mean(x[x > 0] < 0.06)) for x in (g4_16gev, fresh, out)]
    assert low[1] > 5 * low[0] and low[2] < 2 * low[0] + 0.005
    # each layer keeps the energy it had: its voxels of 1 MeV and more take up the difference, by a
    # factor between 1/2 and 2 (a layer of one such voxel and many removed deposits may miss a little)
    layers_in, layers_out = fresh.reshape(n, 45, -1).sum(-1), out.reshape(n, 45, -1).sum(-1)
    big = (out.reshape(n, 45, -1) >= 1.0).any(-1)
    assert np.isclose(layers_out[big], layers_in[big], rtol=1e-6).mean() > 0.99
    np.testing.assert_allclose(layers_out[big], layers_in[big], rtol=0.5)


def test_the_maps_keep_the_order_of_a_rings_voxels_in_a_shower_and_leave_empty_ones_empty(g4_16gev):
    n = len(g4_16gev)
    calib = MarginalCalibration(get_readout("g4-pbwo4"), n_knots=1, per_knot=n, restore_min_mev=np.inf)
    calib.fit_reference(np.zeros(n, dtype=int), np.full(n, 16000.0), g4_16gev, np.array([16000.0]))
    calib.fit_model(_smeared(g4_16gev, seed=1))
    fresh = _smeared(g4_16gev, seed=3)
    with torch.no_grad():
        out = calib(torch.as_tensor(fresh), torch.zeros(n, dtype=torch.float64)).numpy()
    assert not out[fresh == 0].any()
    cls = calib.voxel_class.numpy()
    for c in (0, 40, 200):  # a core ring of an early layer, an outer one, a deep layer's
        for v, t in zip(fresh[:, cls == c], out[:, cls == c]):  # within each shower (its layers are rescaled)
            order = np.argsort(v, kind="stable")
            assert np.all(np.diff(t[order]) >= -1e-12), c


def test_a_knot_without_data_takes_its_neighbours_quantiles(g4_16gev):
    data = load_showers(G4, readout="g4-pbwo4")
    keep = np.isin(data.energy, [8000.0, 32000.0])
    knot_of = np.where(data.energy[keep] == 8000.0, 0, 2)
    calib = MarginalCalibration(get_readout("g4-pbwo4"), n_knots=3, per_knot=10)
    calib.fit_reference(knot_of, data.energy[keep], data.showers[keep], np.array([8000.0, 16000.0, 32000.0]))
    q = calib.data_quantiles.numpy()
    np.testing.assert_allclose(q[1], 0.5 * (q[0] + q[2]), rtol=1e-6)
    assert np.all(calib.sample_energy.numpy()[1] == 16000.0)  # sampled at its own energy
    assert set(calib.sample_energy.numpy()[0]) == {8000.0}
