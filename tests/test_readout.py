"""Readout geometry: the official XMLs, the Par04 grid, ordering and serialisation."""

import numpy as np
import pytest

from showers import Layer, Readout, ShowerDataError, get_readout, list_readouts


@pytest.mark.parametrize("name, n_voxels, active", [
    ("calochallenge-1-photons", 368, [0, 1, 2, 3, 12]),
    ("calochallenge-1-pions", 533, [0, 1, 2, 3, 12, 13, 14]),
    ("calochallenge-2", 6480, list(range(45))),
    ("calochallenge-3", 40500, list(range(45))),
])
def test_official_xmls_give_the_documented_voxel_counts(name, n_voxels, active):
    r = get_readout(name)
    assert r.n_voxels == n_voxels
    assert r.active_layers == active


def test_dataset_1_photon_layers_match_the_xml():
    r = get_readout("calochallenge-1-photons")
    # (n_r, n_alpha) per active layer as documented: 8x1, 16x10, 19x10, 5x1, 5x1
    assert [(r.layers[i].n_r, r.layers[i].n_alpha) for i in r.active_layers] == [(8, 1), (16, 10), (19, 10), (5, 1), (5, 1)]
    assert not r.is_regular


def test_par04_grid_and_order():
    r = get_readout("par04")
    assert r.shape == (45, 50, 18)
    assert r.layer_thickness_mm[0] == pytest.approx(3.4)
    assert r.layers[0].r_edges[-1] == pytest.approx(18 * 2.325)


def test_voxel_order_is_layer_alpha_r_fastest():
    r = Readout.regular("t", 3, 4, [0, 1, 2], 1.0)
    x = np.zeros((1, r.n_voxels))
    x[0, 1 * 8 + 2 * 2 + 1] = 1.0  # layer 1, alpha 2, r 1
    grid = r.to_grid(x)
    assert grid[0, 1, 2, 1] == 1.0 and grid.sum() == 1.0
    assert (r.voxel_layer[9], r.voxel_alpha[9], r.voxel_r[9]) == (1, 0, 1)
    np.testing.assert_array_equal(r.from_grid(grid), x)


def test_split_layers_of_an_irregular_readout():
    r = get_readout("calochallenge-1-photons")
    x = np.arange(r.n_voxels, dtype=float)[None, :]
    parts = r.split_layers(x)
    assert [p.shape[1:] for p in parts][:3] == [(1, 8), (10, 16), (10, 19)]
    assert parts[4].shape == (1, 0, 0)
    assert sum(p.sum() for p in parts) == x.sum()


def test_voxel_areas_add_up_to_the_disc():
    r = get_readout("calochallenge-2")
    per_layer = np.bincount(r.voxel_layer, r.voxel_area_mm2)
    np.testing.assert_allclose(per_layer, np.pi * 41.85**2)


@pytest.mark.parametrize("name", list_readouts())
def test_json_round_trip(name):
    r = get_readout(name)
    back = Readout.from_json(r.to_json())
    assert back == r and back.n_voxels == r.n_voxels


def test_wrong_shape_is_a_data_error_naming_the_source():
    r = get_readout("calochallenge-2")
    with pytest.raises(ShowerDataError, match=r"myfile.h5.*6480"):
        r.check_showers(np.zeros((2, 100)), source="myfile.h5")


def test_bad_xml_and_unknown_names(tmp_path):
    bad = tmp_path / "bins.xml"
    bad.write_text("<Bins><Bin name='x'><Layer r_edges='0,1'")
    with pytest.raises(ShowerDataError, match="bins.xml"):
        get_readout(str(bad))
    with pytest.raises(KeyError, match="calochallenge-2"):
        get_readout("no-such-readout")
    with pytest.raises(ValueError):
        Layer((0.0, 2.0, 1.0), 1)
