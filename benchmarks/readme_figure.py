"""The README's picture: Geant4 showers against a registered model's, in one PNG.

    .venv/bin/python benchmarks/readme_figure.py --model pbwo4.all@champion \
        --data tests/fixtures/g4_pbwo4_electrons_reduced.h5 -o docs/figures/geant4-vs-model.png

Top row: the mean longitudinal and radial profiles at three incident energies (Geant4 solid, the
model dashed) and the response E_tot/E_inc at every energy of the file; bottom row: single showers at
one energy, each as its energy per layer and radial ring (summed over the angle), three of Geant4's
and three of the model's, on one logarithmic colour scale. The model (an ONNX file, or a registered
name pulled with ``registry.pull``) generates as many showers as the file holds at each energy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib.colors
import matplotlib.style
import mplhep
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from registry import ShowerGenerator, pull
from showers import observables as obs
from showers.formats import read_calochallenge
from showers.plots import energy_colours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="ONNX file, or a registered NAME@ALIAS to pull")
    ap.add_argument("--data", required=True, help="Geant4 showers (CaloChallenge HDF5)")
    ap.add_argument("--readout", default=None, help="readout of the data if the file records none")
    ap.add_argument("--energies", default="2,16,128", help="GeV: the profiles' energies (the first for the showers)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-o", "--out", default="docs/figures/geant4-vs-model.png")
    args = ap.parse_args()

    gen = ShowerGenerator(args.model) if Path(args.model).suffix == ".onnx" else pull(args.model)
    readout = gen.readout
    energy, g4 = read_calochallenge(args.data, readout=args.readout or readout)
    model = gen.generate(energy, seed=args.seed)
    label = f"{gen.name or Path(args.model).stem}" + (f" v{gen.version}" if gen.version else "")
    out = draw(g4, model, energy, readout, [float(e) * 1000.0 for e in args.energies.split(",")], label, args.out)
    print(f"wrote {out}")


def draw(g4, model, energy, readout, energies_mev, label, out_png) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    points = np.unique(energy)
    chosen = [points[np.argmin(np.abs(np.log(points / e)))] for e in energies_mev]
    colours = energy_colours(len(chosen))
    depth = np.arange(len(readout.active_layers) + 1)
    r_edges = readout.r_edges_union
    with matplotlib.style.context(mplhep.style.ROOT):
        fig = Figure(figsize=(24, 13))
        FigureCanvasAgg(fig)
        grid = fig.add_gridspec(2, 6, height_ratios=(1.2, 1), hspace=0.3, wspace=0.45)
        ax_long, ax_rad, ax_e = (fig.add_subplot(grid[0, 2 * i:2 * i + 2]) for i in range(3))
        for e, colour in zip(chosen, colours):
            for sample, style, who in ((g4, "-", "Geant4"), (model, "--", label)):
                m = energy == e
                mplhep.histplot(obs.longitudinal_profile(sample[m], readout), depth, ax=ax_long, color=colour,
                                ls=style, lw=2, label=f"{e / 1000:g} GeV {who}")
                rad = obs.radial_profile(sample[m], readout, normalise=True) / np.diff(r_edges)
                mplhep.histplot(rad, r_edges, ax=ax_rad, color=colour, ls=style, lw=2)
        ax_long.set(yscale="log", xlabel="layer", ylabel="fraction of the energy")
        ax_rad.set(yscale="log", xlabel="r [mm]", ylabel="fraction of the energy per mm")
        ax_long.legend(fontsize="xx-small", frameon=False, ncol=2)
        for sample, style, marker, who in ((g4, "-", "o", "Geant4"), (model, "--", "s", label)):
            rows = [(e / 1000.0, obs.etot_over_einc(sample[energy == e], readout, energy[energy == e])) for e in points]
            ax_e.errorbar([r[0] for r in rows], [r[1].mean() for r in rows], [r[1].std() for r in rows], color="k",
                          ls=style, marker=marker, mfc="none", capsize=3, label=who)
        ax_e.set(xscale="log", xlabel=r"$E_\mathrm{inc}$ [GeV]", ylabel=r"$E_\mathrm{tot}/E_\mathrm{inc}$ (mean, spread)")
        ax_e.legend(fontsize="small", frameon=False)
        m = np.flatnonzero(energy == chosen[0])[:3]
        images = [_image(s, readout) for s in (*g4[m], *model[m])]
        positive = np.concatenate([i[i > 0] for i in images])
        norm = matplotlib.colors.LogNorm(vmin=max(positive.min(), 1e-2), vmax=positive.max())
        for j, (image, who) in enumerate(zip(images, ["Geant4"] * 3 + [label] * 3)):
            ax = fig.add_subplot(grid[1, j])
            ax.imshow(np.where(image > 0, image, np.nan).T, origin="lower", aspect="auto", norm=norm, cmap="viridis",
                      extent=(0, image.shape[0], r_edges[0], r_edges[-1]))
            ax.set_title(f"{who}, {chosen[0] / 1000:g} GeV", fontsize="small")
            ax.set_xlabel("layer", fontsize="small")
            ax.set_ylabel("r [mm]" if j == 0 else "", fontsize="small")
            ax.tick_params(labelsize="x-small")
        fig.savefig(out_png, dpi=50, bbox_inches="tight")
    return out_png


def _image(shower, readout) -> np.ndarray:
    """(n_layers, n_r) MeV: a shower's energy per layer and radial ring, summed over the angle."""
    return obs.radial_profile_per_layer(shower[None], readout)


if __name__ == "__main__":
    main()
