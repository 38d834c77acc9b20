"""Per-energy comparison of generated showers with reference showers (the quality table).

For each incident-energy point: χ²/ndf and separation power of E_tot/E_inc (the binning of
``validate.metrics``), and the largest relative difference of the mean longitudinal and radial
profiles over the bins that hold 90% of the reference's energy.
"""

from __future__ import annotations

import numpy as np

from showers.calibrate import core_bins
from showers.observables import energy_per_layer, energy_per_radial_bin
from validate.metrics import etot_chi2

__all__ = ["compare_per_energy", "profile_differences"]


def profile_differences(gen: np.ndarray, ref: np.ndarray, readout) -> dict:
    """Largest |mean_gen / mean_ref - 1| over the core (90%) bins of the longitudinal and radial
    profiles. gen (N, n_voxels), ref (M, n_voxels) in MeV, one incident energy."""
    out = {}
    for name, fn in (("long", energy_per_layer), ("rad", energy_per_radial_bin)):
        g, r = fn(gen, readout).mean(0), fn(ref, readout).mean(0)
        bins = core_bins(r, 0.9)
        out[f"{name}_max_rel"] = float(np.max(np.abs(g[bins] / r[bins] - 1.0)))
    return out


def compare_per_energy(gen, gen_energy, ref, ref_energy, readout) -> list[dict]:
    """One row per energy point: energy_gev, n_gen, n_ref, chi2_ndf, sep_power, long_max_rel, rad_max_rel."""
    metric = etot_chi2(gen, gen_energy, ref, ref_energy)
    rows = []
    for e, chi2, ndf, sep in metric["per_energy"]:
        g, r = gen[gen_energy == e], ref[ref_energy == e]
        rows.append({"energy_gev": e / 1000.0, "n_gen": len(g), "n_ref": len(r), "chi2_ndf": chi2 / max(ndf, 1),
                     "sep_power": sep, **profile_differences(g, r, readout)})
    return rows
