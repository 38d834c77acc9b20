"""The region detector and data campaigns (local and through a real local Ray)."""

import h5py
import numpy as np
import pytest

from showers import ShowerDataError
from showers.campaign import CampaignSpec, region_path, run_campaign, simulate_region
from showers.detector import get_detector
from showers.formats import file_attrs, file_readout, read_calochallenge


@pytest.fixture(scope="module")
def det():
    return get_detector("atlas-like")


def test_three_hundred_regions_with_unique_names(det):
    assert len(det.regions) == 300
    assert len({r.name for r in det.regions}) == 300
    assert det.region("photon_eta_020_025").readout.n_voxels == 368  # as CaloChallenge dataset 1


def test_voxel_count_depends_on_particle_and_eta(det):
    counts = {(r.particle, r.eta_lo): r.readout.n_voxels for r in det.regions}
    for eta in (0.2, 2.0, 4.0):
        assert len({counts[(p, eta)] for p in ("gamma", "pi+")}) == 2
    for p in ("gamma", "e-", "pi+"):
        assert len({counts[(p, eta)] for eta in (0.2, 2.0, 4.0)}) == 3


def test_material_depth_grows_with_eta_in_the_barrel(det):
    depth = [sum(det.region(f"electron_eta_{i:03d}_{i + 5:03d}").readout.layer_thickness_mm) for i in (0, 50, 100)]
    assert depth[0] < depth[1] < depth[2]
    theta = [det.region(f"electron_eta_{i:03d}_{i + 5:03d}").theta_deg for i in (0, 100)]
    assert depth[2] / depth[0] == pytest.approx(np.sin(np.radians(theta[0])) / np.sin(np.radians(theta[1])), rel=1e-6)


def test_select_by_glob_particle_and_eta(det):
    assert [r.name for r in det.select("pion_eta_00*")] == ["pion_eta_000_005", "pion_eta_005_010"]
    assert len(det.select(particles=["photon"], eta_range=(1.0, 1.2))) == 4
    with pytest.raises(KeyError):
        det.select("nothing_*")


SPEC = CampaignSpec((2048.0, 16384.0), n_per_energy=30, seed=5)


def test_region_file_records_how_it_was_made(det, tmp_path):
    region = det.region("pion_eta_200_205")
    res = simulate_region(region, tmp_path, SPEC)
    attrs = file_attrs(res["path"])
    for key in ("generator", "calozoo_version", "seed", "particle", "eta_lo", "eta_hi", "readout"):
        assert key in attrs
    assert attrs["particle"] == "pi+" and attrs["eta_lo"] == pytest.approx(2.0)
    assert file_readout(res["path"]) == region.readout
    e, x = read_calochallenge(res["path"])
    assert x.shape == (60, region.readout.n_voxels)
    assert sorted(set(e.tolist())) == [2048.0, 16384.0]
    # same seed, same region: the same showers, whichever other regions the campaign holds
    again = run_campaign(det.select("pion_eta_2*"), tmp_path / "b", SPEC, use_ray=False, progress=False)
    mine = [r for r in again if r["region"] == region.name][0]
    np.testing.assert_array_equal(read_calochallenge(mine["path"])[1], x)
    other = simulate_region(region, tmp_path / "c", CampaignSpec((2048.0, 16384.0), 30, seed=6))
    assert not np.array_equal(read_calochallenge(other["path"])[1], x)


def test_killed_campaign_leaves_no_file_and_reruns_skip(det, tmp_path, monkeypatch):
    regions = det.select(["electron_eta_000_005", "electron_eta_005_010"])
    from showers import simulator

    calls = {"n": 0}
    real = simulator.ShowerSimulator.simulate

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 1:  # die while writing the first region's file
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(simulator.ShowerSimulator, "simulate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_campaign(regions, tmp_path, SPEC, use_ray=False, progress=False)
    assert list(tmp_path.iterdir()) == []  # no half file, no temp file
    monkeypatch.setattr(simulator.ShowerSimulator, "simulate", real)
    first = run_campaign(regions, tmp_path, SPEC, use_ray=False, progress=False)
    assert [r["skipped"] for r in first] == [False, False]
    again = run_campaign(regions, tmp_path, SPEC, use_ray=False, progress=False)
    assert [r["skipped"] for r in again] == [True, True]
    with pytest.raises(ShowerDataError, match="other settings"):
        run_campaign(regions, tmp_path, CampaignSpec((2048.0,), 30, 5), use_ray=False, progress=False)


def test_campaign_on_a_real_local_ray(det, tmp_path, local_ray):
    regions = det.select(["photon_eta_100_105", "pion_eta_300_305", "electron_eta_450_455"])
    results = run_campaign(regions, tmp_path, SPEC, use_ray=True, progress=False, num_cpus=2)
    assert [r.get("error") for r in results] == [None] * 3
    for region in regions:
        with h5py.File(region_path(tmp_path, region)) as f:
            assert f["showers"].shape == (60, region.readout.n_voxels)
            assert np.all(np.isfinite(f["showers"][:]))
    # the Ray workers and the local path produce the same showers for the same seed
    local = simulate_region(regions[0], tmp_path / "local", SPEC)
    np.testing.assert_array_equal(read_calochallenge(local["path"])[1],
                                  read_calochallenge(region_path(tmp_path, regions[0]))[1])


def test_every_region_simulates_at_the_extreme_energies(det):
    """All 300 regions, at FastCaloGAN's lowest and highest energy points (256 MeV, 4 TeV)."""
    energies = np.array([256.0, 256.0, 4.194304e6])
    for region in det.regions:
        x, leak = region.simulator().simulate(energies, angle_deg=region.angle_deg, seed=1, return_leakage=True)
        assert np.all(np.isfinite(x)) and np.all(x >= 0), region.name
        total = x.sum(1) + leak
        assert np.all(total > 0) and np.all(total < 1.5 * energies), region.name
