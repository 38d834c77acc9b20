"""The simulator against real Geant4 showers (the reduced fixture), and the calibration machinery."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from showers import calibrate as cal
from showers.formats import read_calochallenge
from showers.readout import get_readout
from showers.simulator import ShowerSimulator

FIXTURE = Path(__file__).parent / "fixtures" / "g4_pbwo4_electrons_reduced.h5"


@pytest.fixture(scope="module")
def readout():
    return get_readout("g4-pbwo4")


# Where the calibrated simulator misses the criterion on this fixture: the spread of E_grid/E_inc at
# 32 GeV, which is 1.29 times these 100 Geant4 showers' (0.0060) and 0.68 times the full file's 500
# (0.0116), with the same simulator (0.0078). Geant4's spread at 32 GeV is not known to 25% from
# either sample: half of the full file's variance comes from one shower that keeps only 0.76 of E in
# the grid, and the fixture's 100 hold none below 0.936. Listed, so that the test fails if this
# changes either way; the full-file table is in the foundation issue's note.
KNOWN_MISSES = {32000.0}


def test_simulator_agrees_with_geant4(readout):
    """Mean longitudinal and radial profiles within max(5%, z SE of the Geant4 mean) in the bins
    holding 90% of the energy, mean E_grid/E_inc within 1% and its spread within 25%, at every
    energy of the fixture (100 Geant4 showers per energy, 1-256 GeV) but the known misses.

    With 100 showers per energy and ~200 bins, a 3-SE band is left by chance in about half of such
    comparisons even for a perfect simulator, so z is the family-wise 99% band over all bins tested
    (Bonferroni); the full-file figures with z = 3 are in the closing note."""
    from scipy.stats import norm

    ref = cal.reference_profiles(FIXTURE, readout)
    assert sorted(ref) == [1000.0 * 2**k for k in range(9)]
    e_fix, x_fix = read_calochallenge(FIXTURE)
    sim = ShowerSimulator(readout, "PbWO4", "e-")
    rng = np.random.default_rng(2024)
    n_bins = sum(len(cal.core_bins(p.long_mean, 0.9)) + len(cal.core_bins(p.rad_mean, 0.9)) for p in ref.values())
    z = float(norm.isf(0.01 / (2 * n_bins)))
    rows = []
    for e in sorted(ref):
        n = 1000
        x = sim.simulate(np.full(n, e), rng=rng)
        # The spread of E_grid/E_inc of 100 Geant4 showers is itself uncertain (its low tail comes
        # from a few showers): the 25% tolerance is widened to 3 bootstrap standard errors of the
        # fixture's spread where that is larger. The full-file figures are in the closing note.
        grid = x_fix[e_fix == e].sum(1) / e
        boot = rng.choice(grid, (2000, len(grid))).std(1, ddof=1)
        tol = max(0.25, 3 * boot.std() / grid.std(ddof=1))
        rows.append(cal.agreement(ref[e], cal.sample_profiles(np.full(n, e), x, readout)[e], spread_tol=tol, z=z))
    table = cal.agreement_table(rows)
    missed = {r["energy_gev"] * 1000.0 for r in rows if not r["ok"]}
    assert missed == KNOWN_MISSES, f"z = {z:.2f}\n" + table


def test_agreement_flags_a_wrong_simulator(readout):
    """The criterion can fail: a simulator whose showers start 1.5 X0 too deep is caught."""
    ref = cal.reference_profiles(FIXTURE, readout)
    sim = ShowerSimulator(readout, "PbWO4", "e-")
    bad = sim.with_em(t_a=sim.em.t_a + 1.5)
    e = 16000.0
    x = bad.simulate(np.full(500, e), seed=3)
    row = cal.agreement(ref[e], cal.sample_profiles(np.full(500, e), x, readout)[e])
    assert not row["ok"] and row["long_score"] > 1


def test_fit_recovers_known_coefficients(readout):
    """Fit two longitudinal coefficients to profiles made with known values."""
    truth = ShowerSimulator(readout, "PbWO4", "e-")
    truth = truth.with_em(t_a=truth.em.t_a + 0.4, a_b=truth.em.a_b * 1.1)
    energies = [2000.0, 16000.0, 128000.0]
    ref = cal.model_profiles(truth, energies, n_draws=400, seed=9)
    for p in ref.values():  # give the synthetic reference Geant4-like standard errors
        p.long_se, p.rad_se = 0.01 * p.long_mean, 0.01 * p.rad_mean
    start = replace(truth, em=replace(truth.em, t_a=truth.em.t_a - 0.4, a_b=truth.em.a_b / 1.1))
    fitted = cal.fit(ref, start, free=("t_a", "a_b"), n_draws=400, max_nfev=60)
    assert fitted.t_a == pytest.approx(truth.em.t_a, abs=0.08)
    assert fitted.a_b == pytest.approx(truth.em.a_b, rel=0.03)
