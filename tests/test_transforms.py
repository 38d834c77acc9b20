"""Preprocessing transforms (invertibility, serialisation, known values) and condition encodings."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from showers.transforms import (
    Chain,
    ConditionSpec,
    build_transform,
    decode_energy,
    encode_conditions,
    list_transform_kinds,
)

SPECS = [
    [{"kind": "divide_by_incident"}],
    [{"kind": "divide_by_constant", "constant": 1000.0}],
    [{"kind": "log", "eps": 1e-6}],
    [{"kind": "divide_by_incident"}, {"kind": "log", "eps": 1e-8}],
    [{"kind": "divide_by_incident"}, {"kind": "logit", "alpha": 1e-6}],
    [{"kind": "divide_by_constant", "constant": 2.5}, {"kind": "divide_by_incident"}, {"kind": "logit", "alpha": 0.05}],
    [],
]


@st.composite
def showers_and_energies(draw):
    """Voxel fractions in [0, 1] of the incident energy (so logit applies), zeros included."""
    n = draw(st.integers(1, 4))
    v = draw(st.integers(1, 6))
    frac = draw(hnp.arrays(np.float64, (n, v), elements=st.one_of(st.just(0.0), st.floats(0.0, 1.0))))
    einc = draw(hnp.arrays(np.float64, (n,), elements=st.floats(1.0, 1e7)))
    return frac * einc[:, None], einc


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "+".join(d["kind"] for d in s) or "identity")
@settings(max_examples=40, deadline=None)
@given(data=showers_and_energies())
def test_forward_then_inverse_is_identity(spec, data):
    showers, einc = data
    t = build_transform(spec)
    y = t.forward(showers, einc)
    assert y.shape == showers.shape and np.all(np.isfinite(y))
    back = t.inverse(y, einc)
    # Relative to the incident energy: log/logit lose absolute, not relative, precision near 0.
    np.testing.assert_allclose(back, showers, rtol=1e-7, atol=1e-9 * einc.max())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "+".join(d["kind"] for d in s) or "identity")
def test_spec_round_trips_through_json(spec):
    t = build_transform(spec)
    assert t.spec == spec
    rebuilt = build_transform(json.loads(json.dumps(t.spec)))
    assert rebuilt.spec == spec
    x, e = np.array([[0.0, 1.0, 5.0]]), np.array([10.0])
    np.testing.assert_array_equal(rebuilt.forward(x, e), t.forward(x, e))


def test_known_values():
    x = np.array([[2.0, 4.0], [0.0, 9.0]])
    e = np.array([2.0, 3.0])
    np.testing.assert_array_equal(build_transform({"kind": "divide_by_incident"}).forward(x, e), [[1, 2], [0, 3]])
    np.testing.assert_array_equal(build_transform({"kind": "divide_by_constant", "constant": 2.0}).forward(x),
                                  x / 2)
    log = build_transform({"kind": "log", "eps": 1e-3})
    assert log.forward(np.array([[0.0]]))[0, 0] == pytest.approx(math.log(1e-3))
    logit = build_transform({"kind": "logit", "alpha": 0.1})
    # u = 0.1 + 0.8 x: x = 0.5 → logit(0.5) = 0; x = 0 → logit(0.1) = ln(1/9); x = 1 → ln 9.
    np.testing.assert_allclose(logit.forward(np.array([[0.5, 0.0, 1.0]])), [[0.0, math.log(1 / 9), math.log(9)]],
                               atol=1e-12)


def test_chain_applies_in_order_and_inverts_in_reverse():
    t = build_transform([{"kind": "divide_by_incident"}, {"kind": "log", "eps": 1.0}])
    assert isinstance(t, Chain)
    x, e = np.array([[6.0]]), np.array([2.0])
    assert t.forward(x, e)[0, 0] == pytest.approx(math.log(6 / 2 + 1))  # divide first, then log
    assert t.inverse(np.array([[math.log(4.0)]]), e)[0, 0] == pytest.approx((4 - 1) * 2)


def test_torch_matches_numpy_and_keeps_dtype():
    spec = [{"kind": "divide_by_incident"}, {"kind": "logit", "alpha": 1e-4}]
    t = build_transform(spec)
    rng = np.random.default_rng(0)
    e = rng.uniform(1e3, 1e5, 5)
    x = rng.uniform(0, 1, (5, 7)) * e[:, None]
    y_np = t.forward(x, e)
    y_t = t.forward(torch.from_numpy(x), torch.from_numpy(e))
    assert isinstance(y_t, torch.Tensor) and y_t.dtype == torch.float64
    np.testing.assert_allclose(y_t.numpy(), y_np, rtol=1e-12)
    x32 = torch.from_numpy(x).float()
    y32 = t.forward(x32, e)  # numpy energies with a float32 tensor: converted to the tensor's dtype
    assert y32.dtype == torch.float32
    np.testing.assert_allclose(t.inverse(y32, e).numpy(), x, rtol=1e-3, atol=1e-3)


def test_float32_numpy_stays_float32():
    t = build_transform([{"kind": "divide_by_incident"}, {"kind": "log", "eps": 1e-6}])
    y = t.forward(np.ones((2, 3), dtype=np.float32), np.array([1.0, 2.0]))
    assert y.dtype == np.float32


def test_bad_specs_and_inputs_raise_clearly():
    with pytest.raises(ValueError, match="unknown transform kind 'sqrt'.*divide_by_incident"):
        build_transform([{"kind": "sqrt"}])
    with pytest.raises(ValueError, match="takes"):
        build_transform([{"kind": "log", "epsilon": 1e-6}])
    with pytest.raises(ValueError, match="constant"):
        build_transform([{"kind": "divide_by_constant"}])
    with pytest.raises(ValueError, match="eps > 0"):
        build_transform([{"kind": "log", "eps": 0.0}])
    with pytest.raises(ValueError, match="alpha"):
        build_transform([{"kind": "logit", "alpha": 0.5}])
    with pytest.raises(ValueError, match="kind"):
        build_transform([{"eps": 1.0}])
    with pytest.raises(ValueError, match="list of dicts"):
        build_transform("log")
    t = build_transform({"kind": "divide_by_incident"})
    with pytest.raises(ValueError, match="needs the incident energies"):
        t.forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match="3 incident energies for 2 showers"):
        t.forward(np.ones((2, 3)), np.ones(3))
    assert set(list_transform_kinds()) == {"divide_by_incident", "divide_by_constant", "log", "logit"}


# -- conditions -------------------------------------------------------------------------------------
def test_condition_spec_round_trips_through_json():
    spec = ConditionSpec(energy_encoding="log", energy_range_mev=(256.0, 4.2e6), use_angle=True,
                         geometries=("SiW", "SciPb"))
    d = json.loads(json.dumps(spec.to_dict()))
    assert ConditionSpec.from_dict(d) == spec
    with pytest.raises(ValueError, match="unknown ConditionSpec fields"):
        ConditionSpec.from_dict({**d, "colour": "red"})


def test_linear_energy_angle_and_geometry_encoding():
    spec = ConditionSpec(use_angle=True, geometries=("SiW", "SciPb"))
    assert spec.n_cond == 4
    c = encode_conditions([1024e3, 256e3], [90.0, 45.0], ["SciPb", "SiW"], spec=spec)
    assert c.dtype == np.float32 and c.shape == (2, 4)
    np.testing.assert_allclose(c, [[1.0, 1.0, 0.0, 1.0], [0.25, 0.5, 1.0, 0.0]])
    # a scalar angle and a single geometry name apply to every shower
    c2 = encode_conditions(np.array([[1e3], [2e3]]), 30.0, "SiW", spec=spec)
    np.testing.assert_allclose(c2[:, 1:], [[1 / 3, 1, 0], [1 / 3, 1, 0]], rtol=1e-6)


def test_log_energy_encoding_maps_range_onto_unit_interval():
    spec = ConditionSpec(energy_encoding="log", energy_range_mev=(1e3, 1e5))
    c = encode_conditions([1e3, 1e4, 1e5, 1e6], spec=spec)
    np.testing.assert_allclose(c[:, 0], [0.0, 0.5, 1.0, 1.5], atol=1e-6)  # not clipped outside
    np.testing.assert_allclose(decode_energy(c, spec=spec), [1e3, 1e4, 1e5, 1e6], rtol=1e-5)


def test_unknown_geometry_lists_known_ones():
    spec = ConditionSpec(geometries=("SiW", "SciPb"))
    with pytest.raises(ValueError, match="unknown geometry 'PbWO4'; known: SiW, SciPb"):
        encode_conditions([1e3], geometry="PbWO4", spec=spec)
    with pytest.raises(ValueError, match="pass geometry"):
        encode_conditions([1e3], spec=spec)
    with pytest.raises(ValueError, match="no angle column"):
        encode_conditions([1e3], angle_deg=10.0, geometry="SiW", spec=spec)
    with pytest.raises(ValueError, match="log energy encoding"):
        encode_conditions([0.0], spec=ConditionSpec(energy_encoding="log"))


def test_torch_conditions_give_torch_and_decode():
    spec = ConditionSpec()
    e = torch.tensor([512e3, 2048.0], dtype=torch.float64)
    c = encode_conditions(e, spec=spec)
    assert isinstance(c, torch.Tensor) and c.dtype == torch.float32 and c.shape == (2, 1)
    np.testing.assert_allclose(decode_energy(c, spec=spec).numpy(), e.numpy(), rtol=1e-6)
