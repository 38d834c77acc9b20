"""Hits <-> voxels (showers.voxelise): binning conventions, exact energy conservation, round trips."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from showers.errors import ShowerDataError
from showers.formats import read_edm4hep_hits
from showers.readout import Layer, Readout, get_readout
from showers.voxelise import devoxelise, edm4hep_event_to_voxels, shower_frame, transverse_basis, voxelise

EDM4HEP = Path(__file__).parent / "fixtures" / "caloclouds3_single_event_example.edm4hep.root"
HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# conventions, on hand-placed hits
# ---------------------------------------------------------------------------------------------
def small_readout():
    # layer 0: 2 r x 4 alpha; layer 1: no voxels; layer 2: 1 r x 2 alpha
    return Readout("small", (Layer((0, 2, 4), 4), Layer((0.0,), 1), Layer((0, 3), 2)), (1.0, 1.0, 2.0))


def test_hand_placed_hits_along_z():
    ro = small_readout()  # 8 + 0 + 2 voxels; layer depths [0, 1), [1, 2), [2, 4)
    # alpha bins of layer 0: [-pi, -pi/2), [-pi/2, 0), [0, pi/2), [pi/2, pi)
    hits = [  # x, y, z, energy, expected voxel (None: outside)
        (1.0, 0.5, 0.5, 1.0, 2 * 2 + 0),     # alpha ~0.46 -> bin 2, r 1.1 -> 0
        (0.0, -3.0, 0.9, 2.0, 1 * 2 + 1),    # alpha -pi/2 -> bin 1 (left edge), r 3 -> 1
        (-1.0, 0.0, 0.1, 4.0, 0),            # alpha = +pi folds onto -pi: bin 0
        (-1.0, -1e-9, 0.1, 8.0, 0),          # just below -pi... i.e. just above -pi: bin 0
        (0.0, 0.5, 3.9, 16.0, 8 + 1),        # layer 2, alpha pi/2 -> bin 1 of 2
        (0.5, -0.5, 2.0, 32.0, 8 + 0),       # layer 2 front edge, alpha -pi/4 -> bin 0
        (1.0, 0.0, 1.5, 64.0, None),         # layer 1 has no voxels
        (0.0, 4.0, 0.5, 128.0, None),        # r = 4: beyond the last edge of layer 0
        (0.0, 0.0, -0.01, 256.0, None),      # in front
        (0.0, 0.0, 4.0, 512.0, None),        # behind the last layer
    ]
    x, y, z, e, idx = zip(*hits)
    vox, out = voxelise(x, y, z, e, ro, return_outside=True)
    expected = np.zeros(ro.n_voxels)
    for energy, i in zip(e, idx):
        if i is not None:
            expected[i] += energy
    np.testing.assert_array_equal(vox[0], expected)
    assert out.tolist() == [64.0 + 128 + 256 + 512]


def test_calochallenge_alpha_convention_along_z():
    # shared/g4showers: ia = floor((atan2(y, x) + pi) / (2 pi / 16)), ir = floor(r / 5), iz = floor(z / 4.4515)
    ro = get_readout("g4-pbwo4")
    rng = np.random.default_rng(1)
    x, y, z = rng.uniform(-40, 40, 500), rng.uniform(-40, 40, 500), rng.uniform(0, 200, 500)
    ia = np.floor((np.arctan2(y, x) + np.pi) / (2 * np.pi / 16)).astype(int)
    ir = np.floor(np.hypot(x, y) / 5.0).astype(int)
    iz = np.floor(z / 4.4515).astype(int)
    keep = ir < 9
    expected = np.zeros(6480)
    np.add.at(expected, ((iz * 16 + ia) * 9 + ir)[keep], 1.0)
    np.testing.assert_array_equal(voxelise(x, y, z, np.ones(500), ro)[0], expected)


def test_transverse_basis():
    e1, e2, u = transverse_basis([0.0, 0.0, 2.0])
    np.testing.assert_allclose([e1, e2, u], np.eye(3), atol=1e-15)
    e1, e2, u = transverse_basis([0.0, 1.0, 0.0])  # documented example: +y gives e1 = x, e2 = -z
    np.testing.assert_allclose(e1, [1, 0, 0], atol=1e-15)
    np.testing.assert_allclose(e2, [0, 0, -1], atol=1e-15)
    e1, e2, _ = transverse_basis([0.0, 0.0, -1.0])
    np.testing.assert_allclose([e1, e2], [[1, 0, 0], [0, -1, 0]], atol=1e-15)
    rng = np.random.default_rng(0)
    d = rng.normal(size=(200, 3))
    e1, e2, u = transverse_basis(d)
    for a, b in [(e1, e2), (e1, u), (e2, u)]:
        np.testing.assert_allclose(np.sum(a * b, 1), 0, atol=1e-12)
    np.testing.assert_allclose(np.cross(e1, e2), u, atol=1e-12)  # right-handed
    # continuous: a small tilt away from +z barely moves e1 (no jump of the alpha origin)
    e1, _, _ = transverse_basis([1e-3, -2e-3, 1.0])
    np.testing.assert_allclose(e1, [1, 0, 0], atol=2e-3)


def test_tilted_axis_matches_a_per_hit_reference():
    ro = Readout("r", (Layer((0, 1, 3, 7), 5),) * 3 + (Layer((0, 10), 3),), (2.0, 3.0, 1.5, 4.0))
    origin, direction = np.array([10.0, -5.0, 3.0]), np.array([0.3, 0.8, -0.5])
    rng = np.random.default_rng(7)
    p = origin + rng.normal(0, 6, (300, 3))
    e = rng.exponential(1.0, 300)
    vox, out = voxelise(p[:, 0], p[:, 1], p[:, 2], e, ro, origin, direction, return_outside=True)
    # reference: one hit at a time, plain Python
    e1, e2, u = transverse_basis(direction)
    ref, ref_out = np.zeros(ro.n_voxels), 0.0
    edges = ro.layer_edges_mm
    for pi, ei in zip(p, e):
        d = pi - origin
        t, a, b = float(d @ u), float(d @ e1), float(d @ e2)
        r, alpha = math.hypot(a, b), math.atan2(b, a)
        layer = next((i for i in range(ro.n_layers) if edges[i] <= t < edges[i + 1]), None)
        if layer is None or r >= ro.layers[layer].r_edges[-1]:
            ref_out += ei
            continue
        lay = ro.layers[layer]
        ir = max(i for i in range(lay.n_r) if lay.r_edges[i] <= r)
        ia = int((alpha + math.pi) // (2 * math.pi / lay.n_alpha)) % lay.n_alpha
        ref[ro.layer_offsets[layer] + ia * lay.n_r + ir] += ei
    np.testing.assert_allclose(vox[0], ref, rtol=1e-12, atol=1e-12)
    assert out[0] == pytest.approx(ref_out, rel=1e-12)
    assert 0 < vox.sum() < e.sum()  # a test with hits on both sides


def test_events_and_per_event_axes():
    ro = small_readout()
    rng = np.random.default_rng(3)
    origins = rng.normal(0, 50, (3, 3))
    dirs = rng.normal(size=(3, 3))
    hits = [devoxelise(rng.exponential(1, (1, ro.n_voxels)), ro, 2, rng, origins[i], dirs[i]) for i in range(3)]
    cat = {k: np.concatenate([h[k] for h in hits]) for k in ("x", "y", "z", "energy")}
    ev = np.repeat(np.arange(3), [h["energy"].size for h in hits])
    together = voxelise(cat["x"], cat["y"], cat["z"], cat["energy"], ro, origins, dirs, event_index=ev)
    for i, h in enumerate(hits):
        alone = voxelise(h["x"], h["y"], h["z"], h["energy"], ro, origins[i], dirs[i])
        np.testing.assert_allclose(together[i], alone[0], rtol=1e-12)
    # n_events larger than the last event with hits gives empty rows
    assert voxelise([0.1], [0], [0.5], [1.0], ro, event_index=[1], n_events=4).shape == (4, ro.n_voxels)


def test_errors():
    ro = get_readout("calochallenge-2")  # no layer depths in the CaloChallenge XMLs
    with pytest.raises(ValueError, match="layer thicknesses"):
        voxelise([0], [0], [0], [1], ro)
    with pytest.raises(ValueError, match="layer thicknesses"):
        devoxelise(np.ones((1, ro.n_voxels)), ro)
    with pytest.raises(ShowerDataError, match=r"\[energy\].*NaN"):
        voxelise([0], [0], [0], [np.nan], small_readout())
    with pytest.raises(ShowerDataError, match="different lengths"):
        voxelise([0, 1], [0], [0], [1], small_readout())
    with pytest.raises(ShowerDataError, match=r"event_index"):
        voxelise([0], [0], [0], [1], small_readout(), event_index=[3], n_events=2)
    with pytest.raises(ValueError, match="non-zero"):
        voxelise([0], [0], [0], [1], small_readout(), axis_direction=(0, 0, 0))
    with pytest.raises(ValueError, match=">= 1"):
        devoxelise(np.ones((1, 10)), small_readout(), n_per_voxel=0)


def test_devoxelise_is_uniform_in_area_and_depth():
    ro = Readout("one", (Layer((0, 10), 1),), (4.0,))
    h = devoxelise(np.array([[1.0]]), ro, n_per_voxel=20_000, rng=0)
    r = np.hypot(h["x"], h["y"])
    # uniform in area: P(r < 10/sqrt(2)) = 1/2; uniform in depth: P(z < 1) = 1/4; std of a fraction ~0.0035
    assert abs((r < 10 / math.sqrt(2)).mean() - 0.5) < 0.015
    assert abs((h["z"] < 1.0).mean() - 0.25) < 0.015
    assert r.max() < 10.0 and h["z"].min() > 0 and h["z"].max() < 4.0
    assert h["energy"].sum() == pytest.approx(1.0, rel=1e-12) and np.ptp(h["energy"]) == 0


# ---------------------------------------------------------------------------------------------
# hypothesis: conservation and round trips on random readouts
# ---------------------------------------------------------------------------------------------
@st.composite
def readouts(draw):
    n_layers = draw(st.integers(1, 5))
    layers = []
    for _ in range(n_layers):
        if draw(st.integers(0, 3)) == 0:
            layers.append(Layer((0.0,), 1))  # a layer without voxels, as in CaloChallenge dataset 1
        else:
            widths = draw(st.lists(st.floats(0.1, 40.0), min_size=1, max_size=6))
            layers.append(Layer(tuple(np.concatenate([[0.0], np.cumsum(widths)])), draw(st.integers(1, 12))))
    assume(any(layer.n_voxels for layer in layers))
    thickness = draw(st.lists(st.floats(0.1, 30.0), min_size=n_layers, max_size=n_layers))
    return Readout("random", tuple(layers), tuple(thickness))


@st.composite
def cc1_photons_with_depths(draw):
    """The irregular CaloChallenge dataset-1 photon readout with made-up layer thicknesses."""
    ro = get_readout("calochallenge-1-photons")
    thickness = draw(st.lists(st.floats(0.5, 100.0), min_size=ro.n_layers, max_size=ro.n_layers))
    return dataclasses.replace(ro, layer_thickness_mm=tuple(thickness))


any_readout = st.one_of(readouts(), cc1_photons_with_depths())
axes = st.tuples(
    st.tuples(*[st.floats(-1000, 1000)] * 3),
    st.tuples(*[st.floats(-1, 1)] * 3).filter(lambda d: np.linalg.norm(d) > 0.1),
)


@HYPO
@given(ro=any_readout, axis=axes, seed=st.integers(0, 2**32 - 1), n_events=st.integers(1, 4))
def test_devoxelise_then_voxelise_gives_the_showers_back(ro, axis, seed, n_events):
    rng = np.random.default_rng(seed)
    showers = rng.exponential(100.0, (n_events, ro.n_voxels)) * (rng.random((n_events, ro.n_voxels)) < 0.5)
    n_per = rng.integers(1, 4, ro.n_voxels)  # a different number of points per voxel
    origin, direction = axis
    hits = devoxelise(showers, ro, n_per_voxel=n_per, rng=rng, axis_origin=origin, axis_direction=direction)
    assert hits["energy"].size == int((n_per * (showers > 0)).sum())
    back, out = voxelise(hits["x"], hits["y"], hits["z"], hits["energy"], ro, origin, direction,
                         event_index=hits["event"], n_events=hits["n_events"], return_outside=True)
    np.testing.assert_allclose(back, showers, rtol=1e-12, atol=0)  # every point in its own voxel
    assert np.all(out == 0)


@HYPO
@given(ro=any_readout, axis=axes, seed=st.integers(0, 2**32 - 1))
def test_voxelise_conserves_energy_exactly(ro, axis, seed):
    rng = np.random.default_rng(seed)
    origin, direction = np.array(axis[0]), np.array(axis[1])
    depth = ro.layer_edges_mm[-1]
    r_max = max(ro.r_edges_union[-1], 1.0)
    # hits inside (sampled from voxels) and hits anywhere in a box around the readout (many outside)
    inner = devoxelise(rng.exponential(1.0, (2, ro.n_voxels)), ro, 1, rng, origin, direction)
    n_box = 300
    e1, e2, u = transverse_basis(direction)
    t, a, b = rng.uniform(-0.3 * depth, 1.3 * depth, n_box), *rng.uniform(-1.5 * r_max, 1.5 * r_max, (2, n_box))
    box = origin + t[:, None] * u + a[:, None] * e1 + b[:, None] * e2
    x = np.concatenate([inner["x"], box[:, 0]])
    y = np.concatenate([inner["y"], box[:, 1]])
    z = np.concatenate([inner["z"], box[:, 2]])
    e = np.concatenate([inner["energy"], rng.exponential(1.0, n_box)])
    ev = np.concatenate([inner["event"], rng.integers(0, 3, n_box)])
    vox, out = voxelise(x, y, z, e, ro, origin, direction, event_index=ev, n_events=3, return_outside=True)
    per_event = np.bincount(ev, e, minlength=3)
    np.testing.assert_allclose(vox.sum(1) + out, per_event, rtol=1e-12)
    assert np.all(out >= 0) and np.all(vox >= 0)
    # an independent check of "outside": the frame coordinates of the hits
    tt, rr, _ = shower_frame(x, y, z, origin, direction)
    assert np.all(out >= np.bincount(ev[(tt < 0) | (tt >= depth)], e[(tt < 0) | (tt >= depth)], minlength=3) - 1e-9)
    assert out.sum() >= e[rr >= ro.r_edges_union[-1]].sum() - 1e-9


# ---------------------------------------------------------------------------------------------
# the real EDM4hep event
# ---------------------------------------------------------------------------------------------
def test_edm4hep_event_voxelisation_conserves_energy():
    hits = read_edm4hep_hits(EDM4HEP, collections=["ECalBarrelSiHitsEven", "ECalBarrelSiHitsOdd"])
    vox, out, ro = edm4hep_event_to_voxels(EDM4HEP)
    total = hits["energy"].sum()
    assert (vox.sum() + out.sum()) == pytest.approx(total, rel=1e-9)
    assert vox.shape == (1, ro.n_voxels) and ro.n_layers == 30 and ro.shape == (30, 16, 20)
    # the shower is contained: > 99 % of the Si energy in the 30 x 100 mm readout
    assert vox.sum() > 0.99 * total
    profile = ro.to_grid(vox)[0].sum(axis=(1, 2))
    # one Si plane per layer: no empty layer inside the shower, and the maximum mid-way
    assert np.all(profile[:25] > 0) and 5 <= int(np.argmax(profile)) <= 18
    assert ro.meta["planes_seen"] == 29 and ro.meta["mean_pitch_mm"] == pytest.approx(6.99, abs=0.05)
    # the core of an EM shower: most energy within the first 10 mm
    assert ro.to_grid(vox)[0][:, :, :2].sum() > 0.6 * vox.sum()
    # a given readout with depths works too
    given_ro = Readout.regular("coarse", 10, 4, (0, 20, 60), 25.0)
    vox2, out2, ro2 = edm4hep_event_to_voxels(EDM4HEP, readout=given_ro)
    assert ro2 is given_ro and vox2.sum() + out2.sum() == pytest.approx(total, rel=1e-9)
