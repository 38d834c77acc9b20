"""FullSim-against-MLSim plots: the reference (Geant4 or the simulator) as solid lines, the model
as dashed lines.

:func:`plot_comparison` draws, for up to ``max_energies`` incident energies, the mean longitudinal
and radial profiles with their ratios, and the response and resolution against the incident energy,
in the style of the Par04 validation figure, so that one look tells whether a model is good;
:func:`plot_features` draws the histograms of the high-level features. Figures are built without
pyplot (Agg canvas; mplhep's ROOT style only inside the call).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.style
import mplhep
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from showers import observables as obs
from showers.plots import (
    _depth_axis,
    energy_colours,
    energy_groups,
    style_panels,
)
from showers.readout import Readout

__all__ = ["plot_comparison", "plot_features"]


def _response(sample, energy, groups, readout, offset: int):
    """Mean E_tot/E_inc and its relative spread σ/μ with their standard errors, per energy group."""
    rows = []
    for _, mask in groups:
        m = mask[offset:offset + len(energy)]
        if m.sum() < 2:
            continue
        r = obs.etot_over_einc(sample[m], readout, energy[m])
        mu, sd, n = r.mean(), r.std(ddof=1), len(r)
        rows.append((float(np.median(energy[m])) / 1000.0, mu, sd / np.sqrt(n), sd / mu, sd / mu / np.sqrt(2 * (n - 1))))
    return np.array(rows).reshape(-1, 5)


def plot_comparison(gen, gen_energy, ref, ref_energy, readout: Readout, out_png, *, title: str = "",
                    labels: tuple[str, str] = ("reference", "generated"), max_energies: int = 4,
                    x0_mm: float | None = None, notes: str = "") -> Path:
    """Write a PNG comparing generated showers ``gen`` (N, n_voxels) MeV at ``gen_energy`` (N,) MeV
    with reference showers ``ref`` at ``ref_energy``; return its path.

    Panels, the reference solid and the generated dashed: the mean longitudinal and radial profiles
    for up to ``max_energies`` incident energies spread over the range (energies grouped as in
    ``showers.plots.energy_groups``), each with the ratio generated / reference underneath and a grey
    ±5 % band; the response (mean E_tot/E_inc) and the resolution (σ/μ of E_tot/E_inc) against the
    incident energy, for every energy; the legend and ``notes`` (monospace text, e.g. the per-energy
    metrics) on the right.
    """
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    gen, ref = np.asarray(gen, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    gen_energy = np.asarray(gen_energy, dtype=np.float64).ravel()
    ref_energy = np.asarray(ref_energy, dtype=np.float64).ravel()
    all_groups = energy_groups(np.concatenate([ref_energy, gen_energy]))
    groups = all_groups
    if len(groups) > max_energies:
        groups = [groups[i] for i in np.unique(np.linspace(0, len(groups) - 1, max_energies).round().astype(int))]
    depth_edges, depth_label = _depth_axis(readout, x0_mm)
    r_edges = readout.r_edges_union
    colours = energy_colours(len(groups))
    n_ref = len(ref_energy)

    with matplotlib.style.context(mplhep.style.ROOT):
        fig = Figure(figsize=(32, 11))
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(2, 4, height_ratios=(3, 1.3), width_ratios=(1, 1, 1, 0.75), hspace=0.06, wspace=0.28)
        ax_long, ax_rad, ax_e = (fig.add_subplot(grid[0, i]) for i in range(3))
        rat_long = fig.add_subplot(grid[1, 0], sharex=ax_long)
        rat_rad = fig.add_subplot(grid[1, 1], sharex=ax_rad)
        ax_res = fig.add_subplot(grid[1, 2], sharex=ax_e)
        ax_text = fig.add_subplot(grid[:, 3])
        drawn_long, drawn_rad = [], []
        for (label, mask), colour in zip(groups, colours):
            r_mask, g_mask = mask[:n_ref], mask[n_ref:]
            if not r_mask.any() or not g_mask.any():
                continue
            profiles = {}
            for sample, m, style, who in ((ref, r_mask, "-", labels[0]), (gen, g_mask, "--", labels[1])):
                text = f"{label} {who}"
                long = obs.longitudinal_profile(sample[m], readout)
                rad = obs.radial_profile(sample[m], readout, normalise=True) / np.diff(r_edges)
                profiles[style] = (long, rad)
                drawn_long.append(long)
                drawn_rad.append(rad)
                mplhep.histplot(long, depth_edges, ax=ax_long, color=colour, ls=style, label=text, lw=2)
                mplhep.histplot(rad, r_edges, ax=ax_rad, color=colour, ls=style, label=text, lw=2)
            for i, (ax, edges) in enumerate(((rat_long, depth_edges), (rat_rad, r_edges))):
                ref_p, gen_p = profiles["-"][i], profiles["--"][i]
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.where(ref_p > 0, gen_p / ref_p, np.nan)
                mplhep.histplot(ratio, edges, ax=ax, color=colour, lw=2)
        style_panels(ax_long, ax_rad, ax_e, depth_edges, depth_label, r_edges, drawn_long, drawn_rad)
        for ax, name in ((rat_long, depth_label), (rat_rad, "r [mm]")):
            ax.axhspan(0.95, 1.05, color="0.85", zorder=0)
            ax.axhline(1.0, color="0.4", lw=1)
            ax.set_ylim(0.5, 1.5)
            ax.set_ylabel(f"{labels[1]} / {labels[0]}", fontsize="x-small")
            ax.set_xlabel(name)
        for ax in (ax_long, ax_rad, ax_e):
            ax.set_xlabel("")
            ax.tick_params(labelbottom=False)
        responses, resolutions = [], []
        for sample, energy, offset, style, marker, who in ((ref, ref_energy, 0, "-", "o", labels[0]),
                                                          (gen, gen_energy, n_ref, "--", "s", labels[1])):
            rows = _response(sample, energy, all_groups, readout, offset)
            responses.append(rows[:, 1])
            resolutions.append(rows[:, 3])
            ax_e.errorbar(rows[:, 0], rows[:, 1], rows[:, 2], color="k", ls=style, marker=marker, mfc="none",
                          label=who, capsize=3)
            ax_res.errorbar(rows[:, 0], rows[:, 3], rows[:, 4], color="k", ls=style, marker=marker, mfc="none",
                            capsize=3)
        ax_e.set_xscale("log")
        ys = np.concatenate(responses)
        if ys.size:  # the response varies by per cent: zoom on it (style_panels starts it at 0)
            pad = max(0.25 * (ys.max() - ys.min()), 0.01)
            ax_e.set_ylim(ys.min() - pad, ys.max() + pad)
        ax_e.set_ylabel(r"response $\langle E_\mathrm{tot}/E_\mathrm{inc}\rangle$")
        ax_e.legend(fontsize="small", frameon=False)
        res = np.concatenate(resolutions)
        if res.size and res.min() > 0 and res.max() / res.min() > 5:
            ax_res.set_yscale("log")  # a calorimeter's resolution falls by a decade over the range
        ax_res.set_xlabel(r"$E_\mathrm{inc}$ [GeV]")
        ax_res.set_ylabel(r"resolution $\sigma/\mu$", fontsize="x-small")
        ax_text.axis("off")
        handles, texts = ax_long.get_legend_handles_labels()
        ax_text.legend(handles, texts, loc="upper left", fontsize="small", frameon=False,
                       title=f"solid: {labels[0]}, dashed: {labels[1]}", title_fontsize="small")
        if notes:
            ax_text.text(0.0, 0.36, notes, va="top", ha="left", family="monospace", fontsize="x-small",
                         transform=ax_text.transAxes)
        if title:
            fig.suptitle(title)
        fig.savefig(out_png, dpi=60, bbox_inches="tight")
    return out_png


def plot_features(comparisons, out_png, *, title: str = "", labels: tuple[str, str] = ("reference", "generated"),
                  ncols: int = 6) -> Path:
    """A grid of histograms, one panel per :class:`validate.features.FeatureComparison`: the
    reference solid, the generated dashed, both normalised to unit area, with the separation power
    and χ²/ndf in the corner (red when the separation power is above 0.1)."""
    from validate.features import LABELS, LOG_FEATURES

    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    n = max(len(comparisons), 1)
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    # Matplotlib's plain style, no tight layout: ROOT-style minor ticks and a layout pass over dozens
    # of small panels made this 20 times slower.
    with matplotlib.style.context("default"):
        # at least 6.4 in wide, so that a figure of one or two panels has room for its title and legend
        fig = Figure(figsize=(max(3.6 * ncols, 6.4), 2.9 * nrows + 0.5))
        FigureCanvasAgg(fig)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        fig.subplots_adjust(left=0.06, right=0.99, bottom=0.5 / fig.get_figheight(), top=1 - 0.95 / fig.get_figheight(),
                            wspace=0.25, hspace=0.55)
        for ax, c in zip(axes, comparisons):
            # Fractions per bin (what the separation power compares); log x for log-spaced bins.
            ax.stairs(c.ref / c.ref.sum(), c.edges, color="k", lw=1.5, label=labels[0])
            ax.stairs(c.gen / c.gen.sum(), c.edges, color="tab:red", ls="--", lw=1.5, label=labels[1])
            if c.feature in LOG_FEATURES:
                ax.set_xscale("log")
            ax.set_ylim(0, None)
            ax.set_xlabel(LABELS.get(c.feature, c.feature), fontsize=9)
            ax.set_ylabel("")
            ax.tick_params(labelsize=8)
            where = c.label[len(c.feature):].strip()
            ax.set_title(where or "all showers", fontsize=9)
            ax.text(0.97, 0.95, f"S = {c.sep_power:.3f}\nχ²/ndf = {c.chi2_ndf:.2f}", ha="right", va="top",
                    transform=ax.transAxes, fontsize=8, color="tab:red" if c.sep_power > 0.1 else "k")
        for ax in axes[len(comparisons):]:
            ax.axis("off")
        if comparisons:  # under the title, never over it
            fig.legend(*axes[0].get_legend_handles_labels(), loc="upper left", ncols=2, fontsize=9, frameon=False,
                       bbox_to_anchor=(0.02, 1 - 0.3 / fig.get_figheight()))
        if title:
            fig.suptitle(title, fontsize=11, x=0.02, ha="left")
        # a grid of dozens of panels stays light at 60 dpi; a few panels are drawn sharp enough to read
        fig.savefig(out_png, dpi=60 if nrows * ncols > 12 else 100)
    return out_png
