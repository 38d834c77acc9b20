"""plot_file on small files written here; energy grouping and readout resolution."""

import struct

import h5py
import numpy as np
import pytest

from showers import Readout, ShowerDataError
from showers.plots import energy_groups, format_energy, plot_file

SMALL = Readout.regular("test-small", 6, 4, [0.0, 5.0, 10.0, 20.0], 4.0)


def _write(path, showers, energies, readout_json=None, **attrs):
    with h5py.File(path, "w") as f:
        f.create_dataset("incident_energies", data=np.asarray(energies, dtype=np.float32).reshape(-1, 1))
        f.create_dataset("showers", data=np.asarray(showers, dtype=np.float32))
        if readout_json is not None:
            f.attrs["readout"] = readout_json
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


def _fake_showers(readout, energies, rng):
    """Energy falling off with layer and radius, ~95 % of the incident energy, with noise."""
    rc, _ = readout.voxel_centres
    shape = np.exp(-rc / 8.0) * np.exp(-np.abs(readout.voxel_layer - 2.0)) + 1e-4
    shape /= shape.sum()
    noise = rng.gamma(5.0, 0.2, (len(energies), readout.n_voxels))
    return 0.95 * np.asarray(energies)[:, None] * shape * noise


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk comes first
    return len(data), width, height


def test_plot_file_discrete_energies_with_readout_attribute(tmp_path):
    rng = np.random.default_rng(0)
    energies = np.repeat([1e3, 1e4, 1e5], 20)
    path = _write(tmp_path / "small.h5", _fake_showers(SMALL, energies, rng), energies, SMALL.to_json(), x0_mm=8.9)
    out = plot_file(path, tmp_path / "out" / "small.png")
    assert out == tmp_path / "out" / "small.png"
    n_bytes, width, height = _png_size(out)
    assert 20_000 < n_bytes < 3_000_000
    assert 800 < width < 4000 and 300 < height < 2000 and width > height


def test_plot_file_continuous_energies_infers_unique_builtin_readout(tmp_path):
    from showers import get_readout

    cc1 = get_readout("calochallenge-1-photons")  # 368 voxels: no other built-in readout has as many
    rng = np.random.default_rng(1)
    energies = np.exp(rng.uniform(np.log(256.0), np.log(4e6), 60))
    path = _write(tmp_path / "cc1.h5", _fake_showers(cc1, energies, rng), energies)
    n_bytes, _, _ = _png_size(plot_file(path, tmp_path / "cc1.png", max_showers=40))
    assert n_bytes > 20_000


def test_ambiguous_voxel_count_needs_an_explicit_readout(tmp_path):
    # g4-pbwo4 and calochallenge-2 both have 45 x 16 x 9 = 6480 voxels.
    path = _write(tmp_path / "amb.h5", np.zeros((2, 6480)), [1e3, 1e3])
    with pytest.raises(ShowerDataError, match="calochallenge-2.*g4-pbwo4.*pass readout="):
        plot_file(path, tmp_path / "amb.png")


def test_missing_dataset_and_mismatched_readout_are_named(tmp_path):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("showers", data=np.zeros((2, SMALL.n_voxels)))
    with pytest.raises(ShowerDataError, match=r"\[incident_energies\]: dataset 'incident_energies' is missing"):
        plot_file(path, tmp_path / "bad.png")
    path = _write(tmp_path / "mismatch.h5", np.zeros((2, SMALL.n_voxels)), [1e3, 1e3])
    with pytest.raises(ShowerDataError, match="g4-pbwo4.*6480"):
        plot_file(path, tmp_path / "mismatch.png", readout="g4-pbwo4")


def test_energy_groups_discrete_and_continuous():
    e = np.array([1e3, 2e3, 1e3, 256e3, 2e3], dtype=np.float32)
    groups = energy_groups(e)
    assert [label for label, _ in groups] == ["1 GeV", "2 GeV", "256 GeV"]
    np.testing.assert_array_equal(groups[0][1], [True, False, True, False, False])
    cont = np.geomspace(1e3, 1e6, 100)
    groups = energy_groups(cont)
    assert len(groups) == 5
    masks = np.array([m for _, m in groups])
    assert np.all(masks.sum(axis=0) == 1)  # every shower in exactly one range, the top one included
    assert groups[-1][0] == "[251 GeV, 1 TeV]"
    assert format_energy(512.0) == "512 MeV"
