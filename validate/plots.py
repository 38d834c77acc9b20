"""FullSim-against-MLSim plots: the reference (Geant4) as solid lines, the model as dashed lines.

:func:`plot_comparison` draws, for up to ``max_energies`` incident energies, the mean longitudinal
profile, the mean radial profile and the E_tot/E_inc distribution, in the style of the Par04
validation figure, so that one look tells whether a model is good. The figure is built without
pyplot (Agg canvas, mplhep's ROOT style only inside the call).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.style
import mplhep
import numpy as np

from showers import observables as obs
from showers.plots import (
    _depth_axis,
    _etot_bins,
    energy_colours,
    energy_groups,
    style_panels,
    three_panels,
)
from showers.readout import Readout

__all__ = ["plot_comparison"]


def plot_comparison(gen, gen_energy, ref, ref_energy, readout: Readout, out_png, *, title: str = "",
                    labels: tuple[str, str] = ("Geant4", "calozoo"), max_energies: int = 4,
                    x0_mm: float | None = None) -> Path:
    """Write a PNG comparing generated showers ``gen`` (N, n_voxels) MeV at ``gen_energy`` (N,) MeV
    with reference showers ``ref`` at ``ref_energy``; return its path.

    Energies are grouped as the reference's (one group per incident energy, or log-spaced ranges);
    at most ``max_energies`` groups, spread over the range, are drawn.
    """
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    gen, ref = np.asarray(gen, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    gen_energy = np.asarray(gen_energy, dtype=np.float64).ravel()
    ref_energy = np.asarray(ref_energy, dtype=np.float64).ravel()
    groups = energy_groups(np.concatenate([ref_energy, gen_energy]))
    if len(groups) > max_energies:
        groups = [groups[i] for i in np.unique(np.linspace(0, len(groups) - 1, max_energies).round().astype(int))]
    depth_edges, depth_label = _depth_axis(readout, x0_mm)
    r_edges = readout.r_edges_union
    colours = energy_colours(len(groups))
    n_ref = len(ref_energy)

    with matplotlib.style.context(mplhep.style.ROOT):
        fig, (ax_long, ax_rad, ax_e) = three_panels()
        drawn_long, drawn_rad = [], []
        for (label, mask), colour in zip(groups, colours):
            r_mask, g_mask = mask[:n_ref], mask[n_ref:]
            if not r_mask.any() or not g_mask.any():
                continue
            ratios_r = obs.etot_over_einc(ref[r_mask], readout, ref_energy[r_mask])
            ratios_g = obs.etot_over_einc(gen[g_mask], readout, gen_energy[g_mask])
            bins = _etot_bins(ratios_r, int(r_mask.sum()))
            for sample, m, ratios, style, who in ((ref, r_mask, ratios_r, "-", labels[0]),
                                                 (gen, g_mask, ratios_g, "--", labels[1])):
                text = f"{label} {who}"
                drawn_long.append(obs.longitudinal_profile(sample[m], readout))
                mplhep.histplot(drawn_long[-1], depth_edges, ax=ax_long, color=colour, ls=style, label=text, lw=2)
                drawn_rad.append(obs.radial_profile(sample[m], readout, normalise=True) / np.diff(r_edges))
                mplhep.histplot(drawn_rad[-1], r_edges, ax=ax_rad, color=colour, ls=style, label=text, lw=2)
                counts, _ = np.histogram(np.clip(ratios, bins[0], bins[-1]), bins=bins)
                mplhep.histplot(counts, bins, ax=ax_e, density=True, color=colour, ls=style, label=text, lw=2)
        style_panels(ax_long, ax_rad, ax_e, depth_edges, depth_label, r_edges, drawn_long, drawn_rad)
        ax_long.legend(fontsize="x-small", title=f"solid: {labels[0]}, dashed: {labels[1]}",
                       title_fontsize="x-small", frameon=True, framealpha=0.85, edgecolor="none")
        if title:
            fig.suptitle(title)
        fig.savefig(out_png, dpi=60, bbox_inches="tight")
    return out_png
