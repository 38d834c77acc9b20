"""Readers and writers of showers.formats: round trips, atomic writes, validation, Par04, EDM4hep."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from showers.errors import ShowerDataError
from showers.formats import (
    CaloChallengeWriter,
    file_attrs,
    file_readout,
    iter_calochallenge,
    iter_edm4hep_events,
    iter_par04,
    open_h5,
    read_calochallenge,
    read_edm4hep_hits,
    validate_showers,
    write_calochallenge,
    write_par04,
)
from showers.readout import Layer, Readout, get_readout

FIXTURES = Path(__file__).parent / "fixtures"
EDM4HEP = FIXTURES / "caloclouds3_single_event_example.edm4hep.root"
G4_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "g4showers" / "pbwo4_electrons_main.h5"
SI = ["ECalBarrelSiHitsEven", "ECalBarrelSiHitsOdd"]


def fake_showers(n, n_voxels, seed=0):
    """Plausible showers: E in [1, 100] GeV (MeV), each shower summing to ~0.9 E, many zeros."""
    rng = np.random.default_rng(seed)
    E = 1000.0 * rng.uniform(1, 100, n)
    X = rng.exponential(1.0, (n, n_voxels)) * (rng.random((n, n_voxels)) < 0.3)
    X *= (0.9 * E / np.maximum(X.sum(1), 1e-9))[:, None]
    return E, X


# ---------------------------------------------------------------------------------------------
# CaloChallenge round trips
# ---------------------------------------------------------------------------------------------
def test_writer_appends_round_trip_and_chunked_iteration(tmp_path):
    path = tmp_path / "cc.h5"
    E, X = fake_showers(57, 13)
    with CaloChallengeWriter(path, 13, dtype=np.float64, chunk_rows=8) as w:
        for lo, hi in [(0, 10), (10, 11), (11, 11), (11, 40), (40, 57)]:  # uneven, one empty append
            # incident energies in both accepted shapes
            w.append(E[lo:hi] if lo % 2 else E[lo:hi, None], X[lo:hi])
        assert len(w) == 57
    E2, X2 = read_calochallenge(path)
    np.testing.assert_array_equal(E2, E)
    np.testing.assert_array_equal(X2, X)
    chunks = list(iter_calochallenge(path, chunk_size=10))
    assert [c[0].shape[0] for c in chunks] == [10] * 5 + [7]
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), X)
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), E)
    E3, X3 = read_calochallenge(path, max_showers=12)
    np.testing.assert_array_equal(X3, X[:12])
    with h5py.File(path) as f:  # the CaloChallenge layout itself
        assert f["incident_energies"].shape == (57, 1)
        assert f["showers"].shape == (57, 13)
        assert f["showers"].compression == "gzip"
        assert f["showers"].maxshape == (None, 13)
        assert f["showers"].chunks == (8, 13)
    assert sorted(os.listdir(tmp_path)) == ["cc.h5"]  # no temporary file left behind


def test_float32_default_and_one_shot_writer(tmp_path):
    path = tmp_path / "one.h5"
    E, X = fake_showers(5, 368)
    write_calochallenge(path, E, X.astype(np.float32), attrs={"readout": "calochallenge-1-photons"})
    E2, X2 = read_calochallenge(path)
    assert X2.dtype == np.float32
    np.testing.assert_array_equal(X2, X.astype(np.float32))
    assert file_readout(path) == get_readout("calochallenge-1-photons")


def test_exception_inside_with_leaves_no_file(tmp_path):
    path = tmp_path / "never.h5"
    E, X = fake_showers(4, 6)
    with pytest.raises(RuntimeError, match="boom"):
        with CaloChallengeWriter(path, 6) as w:
            w.append(E, X)
            assert len(os.listdir(tmp_path)) == 1  # the temporary file exists meanwhile ...
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []  # ... and neither it nor the final file remains


def test_final_file_permissions_follow_umask_and_bad_directory(tmp_path):
    path = tmp_path / "perm.h5"
    write_calochallenge(path, *fake_showers(2, 3))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not a temporary file's 0600
    with pytest.raises(ShowerDataError, match="nodir"):
        CaloChallengeWriter(tmp_path / "nodir" / "x.h5", 3)


def test_failed_append_leaves_previous_file_untouched(tmp_path):
    path = tmp_path / "keep.h5"
    E, X = fake_showers(3, 6)
    write_calochallenge(path, E, X)
    before = path.read_bytes()
    bad = X.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ShowerDataError, match="NaN"):
        with CaloChallengeWriter(path, 6) as w:
            w.append(E, bad)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.h5"]


def test_attrs_round_trip_including_readout(tmp_path):
    ro = Readout("tiny", (Layer((0, 1, 2), 3), Layer((0.0,), 1), Layer((0, 5), 2)), (1.0, 2.0, 3.5),
                 {"material": "W"})
    path = tmp_path / "attrs.h5"
    attrs = {"particle": "photon", "seed": 7, "x0_mm": 3.5, "flag": True,
             "conditions": {"angle_deg": [70, 90], "geometry": "SiW"}, "readout": ro}
    E, X = fake_showers(4, ro.n_voxels)
    write_calochallenge(path, E, X, attrs=attrs)
    got = file_attrs(path)
    assert got["particle"] == "photon" and got["seed"] == 7 and got["x0_mm"] == 3.5 and got["flag"] is True
    assert got["conditions"] == {"angle_deg": [70, 90], "geometry": "SiW"}
    assert got["format"] == "calochallenge" and got["n_voxels"] == ro.n_voxels
    back = file_readout(path)
    assert back == ro and back.meta == ro.meta and back.layer_thickness_mm == (1.0, 2.0, 3.5)
    # the readout given as its dict works the same
    write_calochallenge(tmp_path / "d.h5", E, X, attrs={"readout": ro.to_dict()})
    assert file_readout(tmp_path / "d.h5") == ro
    assert file_readout(tmp_path / "d.h5") is not None
    write_calochallenge(tmp_path / "none.h5", E, X)
    assert file_readout(tmp_path / "none.h5") is None


def test_writer_refuses_readout_of_other_width(tmp_path):
    with pytest.raises(ShowerDataError, match="368 voxels"):
        CaloChallengeWriter(tmp_path / "w.h5", 10, attrs={"readout": "calochallenge-1-photons"})
    assert os.listdir(tmp_path) == []
    with CaloChallengeWriter(tmp_path / "w.h5", 10) as w:
        with pytest.raises(ShowerDataError, match="10 voxels per shower"):
            w.append(np.ones(2) * 1000, np.ones((2, 11)))


def test_reader_uses_the_stored_readout(tmp_path):
    path = tmp_path / "r.h5"
    E, X = fake_showers(3, 6)
    with h5py.File(path, "w") as f:  # a file whose readout attribute disagrees with its width
        f["incident_energies"] = E[:, None]
        f["showers"] = X
        f.attrs["readout"] = get_readout("g4-pbwo4").to_json()
    with pytest.raises(ShowerDataError, match="6480"):
        read_calochallenge(path)
    assert read_calochallenge(path, readout=Readout.regular("six", 1, 2, (0, 1, 2, 3)))[1].shape == (3, 6)


@pytest.mark.skipif(not G4_REFERENCE.exists(), reason="shared Geant4 reference file not present")
def test_real_geant4_file_passes_validation():
    E, X = read_calochallenge(G4_REFERENCE, readout="g4-pbwo4", max_showers=300)
    assert X.shape == (300, 6480) and E.min() >= 1000.0
    ratio = X.sum(1) / E
    assert 0.85 < ratio.mean() < 1.0  # README: grid/E ~0.94-0.96


# ---------------------------------------------------------------------------------------------
# bad input: every case names the file, the dataset and the problem
# ---------------------------------------------------------------------------------------------
def _write_raw(path, E=None, X=None, **extra):
    with h5py.File(path, "w") as f:
        if E is not None:
            f["incident_energies"] = E
        if X is not None:
            f["showers"] = X
        for k, v in extra.items():
            f[k] = v


def _good(n=6, w=8):
    E, X = fake_showers(n, w, seed=3)
    return E[:, None], X


def _case_missing_incident(p):
    _write_raw(p, X=_good()[1])


def _case_missing_showers(p):
    _write_raw(p, E=_good()[0])


def _case_rows_differ(p):
    E, X = _good()
    _write_raw(p, E[:5], X)


def _case_nan(p):
    E, X = _good()
    X[2, 3] = np.nan
    _write_raw(p, E, X)


def _case_inf_incident(p):
    E, X = _good()
    E[4] = np.inf
    _write_raw(p, E, X)


def _case_negative(p):
    E, X = _good()
    X[1, :3] = -1e-6  # tiny negative noise is refused too
    _write_raw(p, E, X)


def _case_zero_incident(p):
    E, X = _good()
    E[0] = 0.0
    _write_raw(p, E, X)


def _case_negative_incident(p):
    E, X = _good()
    E[3] = -5000.0
    _write_raw(p, E, X)


def _case_gev_small(p):
    E, X = _good()  # both in GeV: 16 GeV primaries, showers summing to 0.9 x 16
    _write_raw(p, np.full_like(E, 16.0), X * (0.9 * 16.0 / X.sum(1, keepdims=True)))


def _case_gev_ratio(p):
    E, X = _good()
    _write_raw(p, E / 1000.0 + 30.0, X)  # > 20, but the showers hold ~1000x the incident energy


def _case_not_hdf5(p):
    p.write_text("incident_energies,showers\n1,2\n")


def _case_empty(p):
    p.write_bytes(b"")


def _case_truncated(p):
    E, X = fake_showers(200, 50)
    write_calochallenge(p, E, X)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _case_missing_file(p):
    pass


BAD_CASES = [
    # (maker, dataset the message must name or None for a file-level problem, words of the problem)
    (_case_missing_incident, "incident_energies", "missing"),
    (_case_missing_showers, "showers", "missing"),
    (_case_rows_differ, "showers", "row counts differ"),
    (_case_nan, "showers", "NaN"),
    (_case_inf_incident, "incident_energies", "NaN/inf"),
    (_case_negative, "showers", "3 negative"),
    (_case_zero_incident, "incident_energies", "zero or negative"),
    (_case_negative_incident, "incident_energies", "zero or negative"),
    (_case_gev_small, "incident_energies", "looks like GeV; expected MeV (largest is 16"),
    (_case_gev_ratio, "incident_energies", "looks like GeV; expected MeV (median shower sum"),
    (_case_not_hdf5, None, "not an HDF5 file"),
    (_case_empty, None, "empty file"),
    (_case_truncated, None, "truncated HDF5 file"),
    (_case_missing_file, None, "does not exist"),
]


@pytest.mark.parametrize("maker,dataset,problem", BAD_CASES, ids=[c[0].__name__[6:] for c in BAD_CASES])
def test_bad_input_raises_named_error(tmp_path, maker, dataset, problem):
    path = tmp_path / f"bad_{maker.__name__[6:]}.h5"
    maker(path)
    with pytest.raises(ShowerDataError) as info:
        read_calochallenge(path)
    msg = str(info.value)
    assert path.name in msg and str(path) == info.value.source
    assert problem in msg
    if dataset is not None:
        assert f"[{dataset}]" in msg and info.value.dataset == dataset


def test_width_must_match_readout(tmp_path):
    path = tmp_path / "width.h5"
    _write_raw(path, *_good(w=100))
    with pytest.raises(ShowerDataError, match=r"width\.h5 \[showers\].*100 voxels.*368") as info:
        read_calochallenge(path, readout="calochallenge-1-photons")
    assert info.value.dataset == "showers"


def test_validation_is_what_catches_values(tmp_path):
    path = tmp_path / "nan.h5"
    _case_nan(path)
    E, X = read_calochallenge(path, validate=False)  # structure fine, values unchecked
    assert np.isnan(X).sum() == 1


def test_messages_give_file_rows_not_chunk_rows(tmp_path):
    path = tmp_path / "neg.h5"
    E, X = _good(n=10)
    X[[5, 6], 0] = -1.0
    _write_raw(path, E, X)
    with pytest.raises(ShowerDataError, match=r"2 negative energies \(min -1 MeV\) in rows 5, 6"):
        list(iter_calochallenge(path, chunk_size=4))


def test_validate_showers_on_arrays_and_unit_rule_boundaries():
    E, X = fake_showers(50, 20)
    validate_showers(E, X, "mem")  # plausible MeV data passes
    validate_showers(np.full(3, 256.0), np.full((3, 4), 256.0 * 0.4), "mem")  # CaloChallenge's lowest energy
    # low-energy showers whose sampling-corrected sum fluctuates above E pass as long as the median is sane
    sums = np.array([0.9, 1.0, 1.1, 1.9, 2.5]) * 1000.0
    validate_showers(np.full(5, 1000.0), np.stack([sums / 2, sums / 2], 1), "mem")
    with pytest.raises(ShowerDataError, match="median shower sum / incident energy = 1000"):
        validate_showers(np.full(4, 50.0), np.full((4, 2), 25_000.0), "run7.h5")
    with pytest.raises(ShowerDataError, match=r"run7\.h5 \[incident_energies\].*largest is 19"):
        validate_showers(np.full(4, 19.0), np.full((4, 2), 5.0), "run7.h5")
    with pytest.raises(ShowerDataError, match=r"\[E\]"):
        validate_showers(np.zeros(2), np.ones((2, 2)), "f", dataset="X", energy_dataset="E")


def test_open_h5_turns_oserror_into_shower_data_error(tmp_path):
    with pytest.raises(ShowerDataError, match="does not exist"):
        open_h5(tmp_path / "nope.h5")
    (tmp_path / "x.h5").write_text("hello")
    with pytest.raises(ShowerDataError, match=r"x\.h5: not an HDF5 file"):
        open_h5(tmp_path / "x.h5")


# ---------------------------------------------------------------------------------------------
# Par04
# ---------------------------------------------------------------------------------------------
def _par04_showers(n, seed):
    rng = np.random.default_rng(seed)
    return rng.exponential(1.0, (n, 18, 50, 45)) * (rng.random((n, 18, 50, 45)) < 0.01)


def _cc_index(ir, iphi, iz):
    """CaloChallenge index of Par04 cell (r, phi, z): layer z outermost, then alpha, then r."""
    return (iz * 50 + iphi) * 18 + ir


def test_par04_current_layout(tmp_path):
    path = tmp_path / "SiW_angle_70.h5"
    data = {64: _par04_showers(3, 1), 2: _par04_showers(2, 2)}
    data[64][1] = 0.0
    data[64][1, 3, 7, 11] = 5.0  # one known cell: r=3, phi=7, z=11
    write_par04(path, data)
    with h5py.File(path) as f:
        assert sorted(f.keys()) == ["2", "64"] and f["64"].shape == (3, 18, 50, 45)
    chunks = list(iter_par04(path, chunk_size=2))
    # energies ascending, a chunk never mixes energies: 2 GeV (2 showers), 64 GeV (2 + 1)
    assert [c[0].tolist() for c in chunks] == [[2000.0, 2000.0], [64000.0, 64000.0], [64000.0]]
    assert all(c[2] == "SiW" and np.all(c[1] == 70.0) for c in chunks)
    X64 = np.concatenate([chunks[1][3], chunks[2][3]])
    assert X64.shape == (3, 40500)
    assert np.flatnonzero(X64[1]).tolist() == [_cc_index(3, 7, 11)] and X64[1, _cc_index(3, 7, 11)] == 5.0
    # the whole transposition, checked through the par04 readout's (layer, alpha, r) grid
    grid = get_readout("par04").to_grid(X64)
    np.testing.assert_array_equal(grid, data[64].transpose(0, 3, 2, 1))


def test_par04_old_layout(tmp_path):
    (tmp_path / "SciPb").mkdir()
    path = tmp_path / "SciPb" / "Energy_256_Angle_90.hdf5"
    showers = _par04_showers(5, 3)
    showers[4] = 0.0
    showers[4, 17, 49, 0] = 2.5  # last r, last phi, first z
    write_par04(path, {256: showers})
    with h5py.File(path) as f:
        assert list(f.keys()) == ["Grp_Angle_90_E_256"] and len(f["Grp_Angle_90_E_256"]) == 5
    chunks = list(iter_par04(path, chunk_size=2))
    assert [len(c[0]) for c in chunks] == [2, 2, 1]
    E = np.concatenate([c[0] for c in chunks])
    X = np.concatenate([c[3] for c in chunks])
    assert np.all(E == 256_000.0) and chunks[0][2] == "SciPb" and np.all(chunks[0][1] == 90.0)
    np.testing.assert_array_equal(X.reshape(5, 45, 50, 18), showers.transpose(0, 3, 2, 1))
    assert np.flatnonzero(X[4]).tolist() == [_cc_index(17, 49, 0)] == [17 + 49 * 18]
    with pytest.raises(ShowerDataError, match="one energy"):
        write_par04(tmp_path / "SciPb" / "Energy_2_Angle_90.hdf5", {4: showers})


@pytest.mark.parametrize("name", ["SiW_70.h5", "angle_70.h5", "Energy_x_Angle_90.hdf5", "SiW_angle_70.root"])
def test_par04_unparsable_name(tmp_path, name):
    with pytest.raises(ShowerDataError, match="does not parse") as info:
        list(iter_par04(tmp_path / name))
    assert name in str(info.value)


def test_par04_bad_dataset_is_named(tmp_path):
    path = tmp_path / "SiW_angle_50.h5"
    with h5py.File(path, "w") as f:
        f["8"] = np.ones((2, 18, 50, 44))
    with pytest.raises(ShowerDataError, match=r"SiW_angle_50\.h5 \[8\].*not \(N, 18, 50, 45\)"):
        list(iter_par04(path))
    with h5py.File(path, "w") as f:
        f["8"] = -np.ones((2, 18, 50, 45))
    with pytest.raises(ShowerDataError, match=r"\[8\].*negative"):
        list(iter_par04(path))


# ---------------------------------------------------------------------------------------------
# EDM4hep
# ---------------------------------------------------------------------------------------------
def test_edm4hep_real_event():
    hits = read_edm4hep_hits(EDM4HEP, collections=SI)
    coll = hits["collection"]
    assert (coll == "ECalBarrelSiHitsEven").sum() == 446 and (coll == "ECalBarrelSiHitsOdd").sum() == 502
    e_even = hits["energy"][coll == "ECalBarrelSiHitsEven"].sum()
    e_odd = hits["energy"][coll == "ECalBarrelSiHitsOdd"].sum()
    # MeV (the file stores GeV: 0.469 and 0.547 according to its README)
    assert e_even == pytest.approx(469.14, abs=0.01) and e_odd == pytest.approx(547.17, abs=0.01)
    assert hits["x"].shape == hits["energy"].shape == (948,) and hits["energy"].dtype == np.float64
    # the barrel sits around y ~ 1.8-2.0 m: positions are in mm
    assert np.median(hits["y"]) == pytest.approx(1900, abs=100)
    p = hits["primary"]
    assert p["pdg"] == 22 and p["n_primaries"] == 1
    assert np.linalg.norm(p["momentum"]) == pytest.approx(43_710, abs=5) and p["energy"] == pytest.approx(43_710, abs=5)
    np.testing.assert_allclose(p["vertex"], [0.0, 1804.7, -50.0], atol=1e-3)
    assert np.linalg.norm(p["direction"]) == pytest.approx(1.0) and p["direction"][1] > 0.999


def test_edm4hep_default_collections_and_iteration():
    hits = read_edm4hep_hits(EDM4HEP)
    names = set(hits["collection"].tolist())
    assert set(SI) <= names and "ECalBarrelScHitsEven" in names
    assert not any("Contributions" in n for n in names)  # contributions have no .position
    assert (hits["collection"] == "ECalBarrelSiHitsOdd").sum() == 502
    events = list(iter_edm4hep_events(EDM4HEP, collections=SI))
    assert len(events) == 1 and events[0]["entry"] == 0
    np.testing.assert_array_equal(events[0]["energy"], read_edm4hep_hits(EDM4HEP, SI)["energy"])


def test_edm4hep_errors(tmp_path):
    with pytest.raises(ShowerDataError, match="NoSuchHits"):
        read_edm4hep_hits(EDM4HEP, collections=["NoSuchHits"])
    with pytest.raises(ShowerDataError, match=r"\[events\].*out of range"):
        read_edm4hep_hits(EDM4HEP, entry=1)
    bad = tmp_path / "bad.root"
    bad.write_text("not root")
    with pytest.raises(ShowerDataError, match=r"bad\.root.*not a readable ROOT file"):
        read_edm4hep_hits(bad)
