"""Quick-look plots of shower files.

:func:`plot_file` draws, for one CaloChallenge-format HDF5 file, the mean longitudinal and radial
profiles and the E_tot/E_inc distribution, one line per incident energy (or energy range).

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot), so rendering uses the Agg
canvas without touching the process-wide backend, and mplhep's ROOT style is applied only inside
:func:`plot_file` (a style context), so importing this module changes no global state.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.style
import mplhep
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from showers import observables as obs
from showers.formats import open_h5, read_strided, resolve_readout  # noqa: F401 - resolve_readout re-exported
from showers.readout import Readout

__all__ = ["energy_groups", "format_energy", "plot_file", "resolve_readout", "style_panels", "three_panels", "energy_colours"]

#: At most this many distinct incident energies are drawn one line each; more means a continuous
#: spectrum, which is cut into log-spaced ranges instead.
MAX_DISCRETE_ENERGIES = 12
N_ENERGY_RANGES = 5


def format_energy(e_mev: float) -> str:
    """A short label for an energy in MeV: '512 MeV', '1 GeV', '2.5 TeV'."""
    for unit, scale in (("TeV", 1e6), ("GeV", 1e3)):
        if e_mev >= scale:
            return f"{e_mev / scale:.3g} {unit}"
    return f"{e_mev:.3g} MeV"


def energy_groups(incident_mev: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Split showers by incident energy: [(label, boolean mask (N,)), ...], increasing energy.

    Up to MAX_DISCRETE_ENERGIES distinct energies (compared to 1e-6 relative, as float32 files
    round them) give one group each; otherwise N_ENERGY_RANGES log-spaced ranges from the lowest to
    the highest energy (the last range includes its upper end).
    """
    e = np.asarray(incident_mev, dtype=np.float64).reshape(-1)
    if e.size == 0:
        return []
    rounded = np.unique(np.round(np.log(e) * 1e6))  # energies equal to a relative 1e-6
    if rounded.size <= MAX_DISCRETE_ENERGIES:
        keys = np.round(np.log(e) * 1e6)
        return [(format_energy(float(np.median(e[keys == k]))), keys == k) for k in rounded]
    edges = np.geomspace(e.min(), e.max(), N_ENERGY_RANGES + 1)
    groups = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        mask = (e >= lo) & ((e < hi) if i < N_ENERGY_RANGES - 1 else (e <= hi))
        if mask.any():
            close = ")" if i < N_ENERGY_RANGES - 1 else "]"
            groups.append((f"[{format_energy(lo)}, {format_energy(hi)}{close}", mask))
    return groups


def _read(path: Path, readout, max_showers: int):
    """The file's showers (at most ``max_showers``, evenly strided), through the same validated
    reader as training and validation (``showers.formats.read_strided``): negative voxels, GeV
    energies, fill-value rows and the rest are refused, naming the file."""
    incident, showers, readout, n = read_strided(path, readout, max_showers)
    with open_h5(path) as f:
        x0 = float(f.attrs["x0_mm"]) if "x0_mm" in f.attrs else None
    return showers, incident, readout, x0, n


def _depth_axis(readout: Readout, x0_mm: float | None) -> tuple[np.ndarray, str]:
    """Layer edges along the shower axis and their label: X0 where known, else mm, else index."""
    if readout.layer_edges_mm is not None and x0_mm:
        return readout.layer_edges_mm / x0_mm, r"depth [$X_0$]"
    if readout.layer_edges_mm is not None:
        return readout.layer_edges_mm, "depth [mm]"
    return np.arange(readout.n_layers + 1, dtype=float), "layer"


def _log_range(ax, drawn: list[np.ndarray], decades: float = 6.0) -> None:
    """Log y showing at most ``decades`` below the highest drawn value: empty layers and far radial
    bins would otherwise stretch the axis over tens of decades and squash the profile."""
    ax.set_yscale("log")
    ys = np.concatenate(drawn) if drawn else np.zeros(1)
    pos = ys[np.isfinite(ys) & (ys > 0)]
    if pos.size:
        top = pos.max()
        ax.set_ylim(max(pos.min(), top * 10.0**-decades) / 2, top * 2)


def energy_colours(n: int) -> list:
    """One colour per energy group: viridis up to yellow-green only (its last colours are
    unreadable on white)."""
    return [matplotlib.colormaps["viridis"](v) for v in np.linspace(0.0, 0.85, max(n, 1))]


def three_panels():
    """A figure (Agg canvas, no pyplot) with the longitudinal, radial and E_tot/E_inc panels."""
    fig = Figure(figsize=(24, 8.5))
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, 3)


def style_panels(ax_long, ax_rad, ax_e, depth_edges, depth_label: str, r_edges, drawn_long, drawn_rad) -> None:
    """Labels, ranges and scales of the three panels (longitudinal, radial, E_tot/E_inc) shared by
    this module's quick look and ``validate.plots``' comparison."""
    ax_long.set_xlabel(depth_label)
    ax_long.set_ylabel("fraction of energy per layer")
    ax_rad.set_xlabel("r [mm]")
    ax_rad.set_ylabel(r"$\frac{1}{E}\,\frac{dE}{dr}$ [1/mm]")
    ax_e.set_xlabel(r"$E_\mathrm{tot} / E_\mathrm{inc}$")
    ax_e.set_ylabel("normalised to unit area")
    # Profiles span decades, hence log y; the E_tot/E_inc peaks are compared on a linear one.
    _log_range(ax_long, drawn_long)
    _log_range(ax_rad, drawn_rad)
    ax_e.set_ylim(0, None)
    ax_long.set_xlim(depth_edges[0], depth_edges[-1])
    ax_rad.set_xlim(r_edges[0], r_edges[-1])
    if r_edges[-1] / r_edges[1] > 100:
        # Irregular readouts (CaloChallenge dataset 1) reach from 2 mm to 2 m: only a log axis
        # shows both the core and the halo.
        ax_rad.set_xscale("symlog", linthresh=r_edges[1])


def _etot_bins(ratios: np.ndarray, smallest_group: int) -> np.ndarray:
    # The CaloChallenge's fixed 0.5-1.5 range hides the shape of a narrow peak (a homogeneous
    # calorimeter sits near 0.95); the central 99 % of the data, padded, shows it and its tails.
    # Fewer bins for small groups, so that 20 showers do not scatter over 60 bins.
    lo, hi = np.quantile(ratios, [0.005, 0.995])
    pad = 0.15 * max(hi - lo, 1e-3)
    n_bins = int(np.clip(3 * np.sqrt(smallest_group), 10, 60))
    return np.linspace(max(lo - pad, 0.0), hi + pad, n_bins + 1)


def plot_file(path, out_png, readout=None, max_showers: int = 20000) -> Path:
    """Draw a quick-look PNG of a CaloChallenge-format HDF5 file; return the PNG's path.

    path: HDF5 file with ``incident_energies`` (N, 1) and ``showers`` (N, n_voxels), both MeV.
    out_png: where to write the PNG.
    readout: a readout or name; by default the file's ``readout`` attribute (JSON), else the one
        built-in readout with the file's number of voxels.
    max_showers: at most this many showers are read, evenly strided through the file.

    Panels: mean longitudinal profile (fraction of the energy per layer against depth, in X0 when
    the file has an ``x0_mm`` attribute), mean radial profile (1/E dE/dr per mm, summed over layers
    and angle, on ``readout.r_edges_union``), and the E_tot/E_inc distribution; one line per
    incident energy, or per log-spaced energy range for a continuous spectrum.
    """
    path, out_png = Path(path), Path(out_png)
    if max_showers < 1:
        raise ValueError(f"max_showers must be >= 1, got {max_showers}")
    showers, incident, readout, x0, n_file = _read(path, readout, max_showers)
    groups = energy_groups(incident)
    depth_edges, depth_label = _depth_axis(readout, x0)
    r_edges = readout.r_edges_union
    ratios = obs.etot_over_einc(showers, readout, incident)
    e_bins = _etot_bins(ratios, min(int(mask.sum()) for _, mask in groups))
    colours = energy_colours(len(groups))

    with matplotlib.style.context(mplhep.style.ROOT):
        fig, (ax_long, ax_rad, ax_e) = three_panels()
        drawn_long, drawn_rad = [], []
        for (label, mask), colour in zip(groups, colours):
            sub = showers[mask]
            text = f"{label} ({mask.sum()})"
            drawn_long.append(obs.longitudinal_profile(sub, readout))
            mplhep.histplot(drawn_long[-1], depth_edges, ax=ax_long, color=colour, label=text, lw=2)
            drawn_rad.append(obs.radial_profile(sub, readout, normalise=True) / np.diff(r_edges))
            mplhep.histplot(drawn_rad[-1], r_edges, ax=ax_rad, color=colour, label=text, lw=2)
            counts, _ = np.histogram(ratios[mask], bins=e_bins)
            mplhep.histplot(counts, e_bins, ax=ax_e, density=True, color=colour, label=text, lw=2)

        style_panels(ax_long, ax_rad, ax_e, depth_edges, depth_label, r_edges, drawn_long, drawn_rad)
        ax_e.set_xlim(e_bins[0], e_bins[-1])
        # A framed legend: with a continuous spectrum the distributions overlap and fill the panel.
        ax_e.legend(title="incident energy (showers)", fontsize="x-small", title_fontsize="x-small",
                    loc="best", frameon=True, framealpha=0.85, edgecolor="none")
        shown = f"{showers.shape[0]} of {n_file} showers" if showers.shape[0] < n_file else f"{n_file} showers"
        fig.suptitle(f"{path.name}  —  readout {readout.name} ({readout.n_voxels} voxels), {shown}",
                     fontsize="medium")
        fig.tight_layout()
        out_png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_png, dpi=80)
    return out_png
