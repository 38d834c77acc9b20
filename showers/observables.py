"""Physics observables of calorimeter showers, and the histogram metrics that compare them.

Every observable is a pure, vectorised function of

- ``showers``: array (N, n_voxels), voxel energies in MeV, voxel order of ``readout``;
- ``readout``: a :class:`showers.readout.Readout` (or anything :func:`get_readout` accepts);
- where relevant ``incident_energies``: array (N,) or (N, 1), MeV.

Sums are accumulated in float64 whatever the input dtype, so float32 files give the same answers.

Conventions follow the CaloChallenge 2022 evaluation (``code/HighLevelFeatures.py`` and
``code/evaluate.py`` of CaloChallenge/homepage): transverse coordinates of a voxel are
``x = r cos(alpha)``, ``y = r sin(alpha)`` at its centre (mid-radius, mid-angle), centres of energy and
widths are energy-weighted means and standard deviations of those, and the histogram binnings are
those of :func:`calochallenge_bins`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import hist
import numpy as np

from showers.readout import Readout, get_readout

__all__ = [
    "BINS_ETOT_EINC",
    "CALOCHALLENGE_MIN_ENERGY_MEV",
    "Chi2Result",
    "TransverseMoments",
    "calochallenge_bins",
    "centre_of_energy",
    "chi2_histograms",
    "energy_per_layer",
    "energy_per_radial_bin",
    "etot_over_einc",
    "histogram",
    "layers_binned_in_alpha",
    "longitudinal_profile",
    "occupancy",
    "radial_moments",
    "radial_profile",
    "radial_profile_per_layer",
    "separation_power",
    "sparsity",
    "total_energy",
    "transverse_moments",
    "voxel_energy_spectrum",
    "width",
]


# -- input checks --------------------------------------------------------------------------------
def _prepare(showers, readout) -> tuple[np.ndarray, Readout]:
    readout = get_readout(readout)
    return readout.check_showers(showers), readout


def _incident(incident_energies, n: int) -> np.ndarray:
    e = np.asarray(incident_energies, dtype=np.float64).reshape(-1)
    if e.shape[0] != n:
        raise ValueError(f"{e.shape[0]} incident energies for {n} showers")
    return e


def _dot64(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``a @ w`` in float64, converting ``a`` a block of rows at a time: a float32 (N, 40500) sample
    converted whole would need several GB."""
    rows = max(1, (1 << 23) // max(a.shape[1], 1))  # about 64 MB of float64 per block
    out = np.empty((a.shape[0], w.shape[1]))
    for start in range(0, a.shape[0], rows):
        out[start:start + rows] = a[start:start + rows].astype(np.float64, copy=False) @ w
    return out


def _layer_slices(readout: Readout):
    off = readout.layer_offsets
    return [slice(int(off[i]), int(off[i + 1])) for i in range(readout.n_layers)]


# -- energies ---------------------------------------------------------------------------------------
def total_energy(showers, readout) -> np.ndarray:
    """Energy deposited in all voxels of each shower: shape (N,), MeV."""
    showers, _ = _prepare(showers, readout)
    return showers.sum(axis=1, dtype=np.float64)


def etot_over_einc(showers, readout, incident_energies) -> np.ndarray:
    """Total deposited energy over incident energy of each shower: shape (N,), dimensionless."""
    showers, readout = _prepare(showers, readout)
    return total_energy(showers, readout) / _incident(incident_energies, showers.shape[0])


def energy_per_layer(showers, readout) -> np.ndarray:
    """Energy deposited in each layer: shape (N, n_layers), MeV (0 for layers without voxels)."""
    showers, readout = _prepare(showers, readout)
    # Slicing per layer rather than np.add.reduceat: reduceat returns the next element, not 0,
    # for a layer without voxels (equal offsets), and the CaloChallenge readouts have such layers.
    out = np.zeros((showers.shape[0], readout.n_layers))
    for i, sl in enumerate(_layer_slices(readout)):
        if sl.stop > sl.start:
            out[:, i] = showers[:, sl].sum(axis=1, dtype=np.float64)
    return out


def _normalised(profile: np.ndarray, normalise: bool) -> np.ndarray:
    if not normalise:
        return profile
    total = profile.sum()
    return profile / total if total > 0 else np.zeros_like(profile)


def longitudinal_profile(showers, readout, normalise: bool = True) -> np.ndarray:
    """Mean energy per layer over the showers: shape (n_layers,).

    normalise: if True (default), divide by the sum over layers, so the result is the fraction of
        the sample's deposited energy found in each layer (sums to 1; a ratio of means, not a mean
        of per-shower fractions, so high-energy showers weigh more); if False, MeV per shower.
    """
    return _normalised(energy_per_layer(showers, readout).mean(axis=0), normalise)


# -- radial profiles --------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def _radial_weights(readout: Readout) -> np.ndarray:
    """(n_voxels, n_union_bins): share of each voxel's annulus area lying in each union radial bin.

    For a regular readout the union edges are the layers' own edges, so this is a 0/1 matrix. For
    an irregular one a voxel that spans several union bins is shared between them in proportion to
    area, i.e. assuming its energy is spread uniformly over it (the data say nothing finer).
    """
    edges = readout.r_edges_union
    rlo, rhi = readout.voxel_r_edges
    lo = np.maximum(rlo[:, None], edges[None, :-1])
    hi = np.minimum(rhi[:, None], edges[None, 1:])
    overlap = np.clip(hi**2 - lo**2, 0.0, None) * (hi > lo)
    return overlap / (rhi**2 - rlo**2)[:, None]


def energy_per_radial_bin(showers, readout) -> np.ndarray:
    """Energy in each radial bin summed over layers and angle: shape (N, n_bins), MeV.

    The bins are ``readout.r_edges_union`` (mm): the layers' own edges for a regular readout; for an
    irregular readout (CaloChallenge dataset 1) the union of all layers' edges, each voxel's energy
    shared between the union bins it spans in proportion to area.
    """
    showers, readout = _prepare(showers, readout)
    return _dot64(showers, _radial_weights(readout))


def radial_profile(showers, readout, normalise: bool = False) -> np.ndarray:
    """Mean energy per radial bin, summed over layers and angle: shape (n_bins,).

    Bins are ``readout.r_edges_union`` (see :func:`energy_per_radial_bin`). normalise: if True, divide
    by the sum over bins (fraction of the energy per bin); if False (default), MeV per shower.
    Divide by ``np.diff(readout.r_edges_union)`` for a density per mm.
    """
    return _normalised(energy_per_radial_bin(showers, readout).mean(axis=0), normalise)


def radial_profile_per_layer(showers, readout, normalise: bool = False) -> np.ndarray:
    """Mean energy per layer and radial bin, summed over angle: shape (n_layers, n_bins).

    Bins are ``readout.r_edges_union`` for every layer, so that layers can be compared and
    ``radial_profile_per_layer(...).sum(axis=0) == radial_profile(...)`` (for an irregular readout a
    voxel is shared between the union bins it spans in proportion to area; a layer's profile on its
    own edges is ``readout.split_layers(showers)[layer].sum(axis=1).mean(axis=0)``). Layers without
    voxels give rows of 0. normalise: if True, each layer's row is divided by its own sum (rows of
    layers without energy stay 0); if False (default), MeV per shower.
    """
    showers, readout = _prepare(showers, readout)
    w = _radial_weights(readout)
    mean = showers.mean(axis=0, dtype=np.float64)
    out = np.zeros((readout.n_layers, w.shape[1]))
    for i, sl in enumerate(_layer_slices(readout)):
        out[i] = _normalised(mean[sl] @ w[sl], normalise)
    return out


# -- transverse centre of energy and width ----------------------------------------------------------
class TransverseMoments(NamedTuple):
    """Per-layer centre of energy and width of each shower, each (N, n_layers), mm."""

    x: np.ndarray
    y: np.ndarray
    width_x: np.ndarray
    width_y: np.ndarray


def layers_binned_in_alpha(readout) -> list[int]:
    """Indices of the layers with more than one angular bin: those with a transverse centre."""
    readout = get_readout(readout)
    return [i for i, layer in enumerate(readout.layers) if layer.n_voxels and layer.n_alpha > 1]


def transverse_moments(showers, readout, empty: float = 0.0) -> TransverseMoments:
    """Energy-weighted mean and standard deviation of x and y in each layer: each (N, n_layers), mm.

    x = r cos(alpha), y = r sin(alpha) of each voxel's centre (mid-radius, mid-angle), as the
    CaloChallenge does with its "eta" and "phi". The width is sqrt(<x²> - <x>²) clipped at 0 (the
    CaloChallenge formula).

    empty: value given where the quantity is undefined: layers with no energy in that shower (the
        CaloChallenge's ``+1e-16`` in the denominator gives 0 there, hence the default), layers without
        voxels, and layers with a single angular bin, which carry no transverse direction (the
        CaloChallenge leaves those out; see :func:`layers_binned_in_alpha`). Pass ``np.nan`` to mark
        them.
    """
    showers, readout = _prepare(showers, readout)
    r, alpha = readout.voxel_centres
    vx, vy = r * np.cos(alpha), r * np.sin(alpha)
    n = showers.shape[0]
    out = [np.full((n, readout.n_layers), float(empty)) for _ in range(4)]
    slices = _layer_slices(readout)
    for i in layers_binned_in_alpha(readout):
        sl = slices[i]
        coords = np.stack([np.ones(sl.stop - sl.start), vx[sl], vy[sl], vx[sl] ** 2, vy[sl] ** 2], axis=1)
        s0, s1x, s1y, s2x, s2y = _dot64(showers[:, sl], coords).T
        ok = s0 > 0
        mx, my = s1x[ok] / s0[ok], s1y[ok] / s0[ok]
        out[0][ok, i], out[1][ok, i] = mx, my
        out[2][ok, i] = np.sqrt(np.clip(s2x[ok] / s0[ok] - mx**2, 0.0, None))
        out[3][ok, i] = np.sqrt(np.clip(s2y[ok] / s0[ok] - my**2, 0.0, None))
    return TransverseMoments(*out)


def centre_of_energy(showers, readout, empty: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) centre of energy of each shower in each layer, each (N, n_layers), mm.

    See :func:`transverse_moments` for the coordinates and for ``empty``.
    """
    m = transverse_moments(showers, readout, empty)
    return m.x, m.y


def width(showers, readout, empty: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) energy-weighted standard deviation of each shower in each layer, each (N, n_layers), mm.

    See :func:`transverse_moments` for the coordinates and for ``empty``.
    """
    m = transverse_moments(showers, readout, empty)
    return m.width_x, m.width_y


def radial_moments(showers, readout, empty: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Energy-weighted mean and standard deviation of the radius in each layer: (centre_r, width_r),
    each (N, n_layers), mm.

    The radius of a voxel is its radial bin's midpoint, as the CaloChallenge's ``EC_r`` and
    ``width_r`` (``HighLevelFeatures.GetECandWidthR``); the width is sqrt(<r²> - <r>²) clipped at 0.
    empty: value where the quantity is undefined (a layer without energy in that shower, or without
        voxels); the CaloChallenge's ``+1e-16`` in the denominator gives 0 there, hence the default.
    """
    showers, readout = _prepare(showers, readout)
    r, _ = readout.voxel_centres
    n = showers.shape[0]
    centre, spread = np.full((n, readout.n_layers), float(empty)), np.full((n, readout.n_layers), float(empty))
    for i, sl in enumerate(_layer_slices(readout)):
        if sl.stop == sl.start:
            continue
        s0, s1, s2 = _dot64(showers[:, sl], np.stack([np.ones(sl.stop - sl.start), r[sl], r[sl] ** 2], axis=1)).T
        ok = s0 > 0
        m = s1[ok] / s0[ok]
        centre[ok, i] = m
        spread[ok, i] = np.sqrt(np.clip(s2[ok] / s0[ok] - m**2, 0.0, None))
    return centre, spread


# -- voxel statistics -------------------------------------------------------------------------------
def occupancy(showers, readout, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of voxels with energy strictly above ``threshold`` (MeV).

    Returns (per_layer (N, n_layers), overall (N,)). A layer without voxels has occupancy 0.
    """
    showers, readout = _prepare(showers, readout)
    # Per layer, so that the boolean mask never spans the whole (N, n_voxels) array.
    hits = np.zeros((showers.shape[0], readout.n_layers))
    for i, sl in enumerate(_layer_slices(readout)):
        hits[:, i] = np.count_nonzero(showers[:, sl] > threshold, axis=1)
    sizes = np.diff(readout.layer_offsets)
    per_layer = np.divide(hits, sizes, out=np.zeros_like(hits), where=sizes > 0)
    return per_layer, hits.sum(axis=1) / readout.n_voxels


def sparsity(showers, readout, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of voxels at or below ``threshold`` (MeV): ``1 - occupancy``, the CaloChallenge's
    definition (``HighLevelFeatures._calculate_sparsity``).

    Returns (per_layer (N, n_layers), overall (N,)). A layer without voxels has sparsity 1.
    """
    per_layer, overall = occupancy(showers, readout, threshold)
    return 1.0 - per_layer, 1.0 - overall


def voxel_energy_spectrum(showers, readout, threshold: float = 0.0) -> np.ndarray:
    """Energies of all voxels above ``threshold`` of all showers, flattened: shape (n_hits,), MeV."""
    showers, _ = _prepare(showers, readout)
    return showers[showers > threshold].astype(np.float64, copy=False)


# -- histograms and binnings ------------------------------------------------------------------------
def histogram(values, bins, weights=None, label: str | None = None) -> hist.Hist:
    """A 1-d ``hist.Hist`` of ``values`` on the bin edges ``bins`` (array of increasing edges).

    Weight storage, so ``.variances()`` holds the sum of squared weights (the counts when unweighted).
    Values outside the edges go to the under/overflow bins, which ``.values()`` leaves out, as
    ``np.histogram`` drops them; unlike ``np.histogram`` a value equal to the last edge is overflow.
    NaNs are dropped.
    """
    edges = np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError("bins must be a 1-d array of at least 2 strictly increasing edges")
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    keep = ~np.isnan(values)
    h = hist.Hist(hist.axis.Variable(edges, label=label or ""), storage=hist.storage.Weight())
    if weights is None:
        h.fill(values[keep])
    else:
        w = np.asarray(weights, dtype=np.float64).reshape(-1)
        if w.shape != values.shape:
            raise ValueError(f"{w.size} weights for {values.size} values")
        h.fill(values[keep], weight=w[keep])
    return h


#: E_tot / E_inc: 100 bins over 0.5-1.5 (``plot_Etot_Einc``).
BINS_ETOT_EINC = np.linspace(0.5, 1.5, 101)

#: Lowest voxel energy the CaloChallenge keeps, MeV (``args.min_energy`` of ``evaluate.py``): voxels
#: below it are set to 0 in both samples before anything is computed, and the energy histograms start
#: there. Dataset 1: 1 MeV; datasets 2 and 3: the 0.5 keV cut scaled by the sampling fraction 0.033.
CALOCHALLENGE_MIN_ENERGY_MEV = {"1-photons": 1.0, "1-pions": 1.0, "2": 0.5e-3 / 0.033, "3": 0.5e-3 / 0.033}

_BIN_FEATURES = ("etot_einc", "energy_per_layer", "voxel_energy", "centre", "width", "sparsity", "centre_r",
                 "width_r")


def calochallenge_bins(feature: str, dataset: str = "2", *, e_max: float | None = None,
                       layer: int | None = None) -> np.ndarray:
    """Bin edges the CaloChallenge evaluation uses for a feature, as in its ``evaluate.py`` and
    ``evaluate_plotting_helper.py``.

    feature: "etot_einc" (100 bins, 0.5-1.5), "energy_per_layer" (``np.logspace`` with 40 edges, i.e.
        39 bins, from the dataset's minimum energy to ``e_max``), "voxel_energy" (50 edges likewise),
        "centre" (100 bins over ±lim mm) or "width" (100 bins over 0-lim mm), where lim is 30 mm for
        datasets 2 and 3, and for dataset 1 500 / 400 mm in layers 12 and 13, else 100 mm;
        "sparsity" (20 bins over 0-1), "centre_r" and "width_r" (100 bins over 0-42 and 0-20 mm for
        datasets 2 and 3; for dataset 1 0-1500 mm in layers 12 to 14, else 0-500 mm): the helper's
        ``plot_sparsity``, ``plot_ECR`` and ``plot_ECWidthR``, which its histogram mode does not call.
    dataset: "1-photons", "1-pions", "2" or "3".
    e_max: the upper edge in MeV for the energy features (the CaloChallenge takes the maximum of
        the reference sample).
    layer: the layer index, needed for the transverse and radial features in dataset 1.
    """
    if dataset not in CALOCHALLENGE_MIN_ENERGY_MEV:
        raise ValueError(f"unknown CaloChallenge dataset {dataset!r}; known: {sorted(CALOCHALLENGE_MIN_ENERGY_MEV)}")
    if feature not in _BIN_FEATURES:
        raise ValueError(f"unknown feature {feature!r}; known: {', '.join(_BIN_FEATURES)}")
    if feature == "etot_einc":
        return BINS_ETOT_EINC.copy()
    if feature == "sparsity":
        return np.linspace(0.0, 1.0, 21)
    if feature in ("energy_per_layer", "voxel_energy"):
        if e_max is None:
            raise ValueError(f"{feature} bins need e_max (MeV), the maximum of the reference sample")
        e_min = CALOCHALLENGE_MIN_ENERGY_MEV[dataset]
        if e_max <= e_min:
            raise ValueError(f"e_max={e_max} MeV is not above the minimum energy {e_min} MeV")
        n_edges = 40 if feature == "energy_per_layer" else 50
        edges = np.logspace(np.log10(e_min), np.log10(e_max), n_edges)
        edges[-1] = e_max  # 10**log10(x) may round below x: the largest value stays in the last bin
        return edges
    if dataset in ("2", "3"):
        lim = {"centre": 30.0, "width": 30.0, "centre_r": 42.0, "width_r": 20.0}[feature]
    elif layer is None:
        raise ValueError(f"dataset 1 {feature} bins depend on the layer: pass layer=")
    elif feature in ("centre", "width"):
        lim = (500.0 if feature == "centre" else 400.0) if layer in (12, 13) else 100.0
    else:
        lim = 1500.0 if layer in (12, 13, 14) else 500.0
    return np.linspace(-lim, lim, 101) if feature == "centre" else np.linspace(0.0, lim, 101)


# -- histogram comparisons --------------------------------------------------------------------------
def _counts_and_variances(h) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(counts, variances, edges) of a hist.Hist or of an array of counts (Poisson variances)."""
    if isinstance(h, hist.Hist):
        if h.ndim != 1:
            raise ValueError("only 1-d histograms can be compared")
        counts = np.asarray(h.values(), dtype=np.float64)
        var = h.variances()
        var = counts.copy() if var is None else np.asarray(var, dtype=np.float64)
        return counts, var, np.asarray(h.axes[0].edges)
    counts = np.asarray(h, dtype=np.float64)
    if counts.ndim != 1:
        raise ValueError(f"expected a 1-d array of counts, got shape {counts.shape}")
    return counts, counts.copy(), None


def _matching(h1, h2):
    c1, v1, e1 = _counts_and_variances(h1)
    c2, v2, e2 = _counts_and_variances(h2)
    if c1.shape != c2.shape:
        raise ValueError(f"histograms have {c1.size} and {c2.size} bins")
    if e1 is not None and e2 is not None and not np.allclose(e1, e2):
        raise ValueError("histograms have different bin edges")
    return c1, v1, c2, v2


def separation_power(h1, h2) -> float:
    """Separation power of two histograms: ½ Σ_i (p_i − q_i)² / (p_i + q_i), in [0, 1].

    p and q are the histograms normalised to unit sum over their in-range bins (what the
    CaloChallenge's ``density=True`` counts times bin widths are); bins empty in both are skipped.
    0 for identical shapes, 1 for disjoint ones. h1, h2: ``hist.Hist`` or 1-d arrays of counts on the
    same bins.
    """
    c1, _, c2, _ = _matching(h1, h2)
    s1, s2 = c1.sum(), c2.sum()
    if s1 <= 0 or s2 <= 0:
        raise ValueError("separation power of an empty histogram is undefined")
    p, q = c1 / s1, c2 / s2
    both = (p + q) > 0
    return float(0.5 * np.sum((p[both] - q[both]) ** 2 / (p[both] + q[both])))


class Chi2Result(NamedTuple):
    """χ² of two histograms and its number of degrees of freedom."""

    chi2: float
    ndf: int

    @property
    def reduced(self) -> float:
        """χ² / ndf (nan when ndf is 0)."""
        return self.chi2 / self.ndf if self.ndf > 0 else float("nan")


def chi2_histograms(h_gen, h_ref) -> Chi2Result:
    """χ² between a generated and a reference histogram, each with its own statistical errors.

    The generated histogram is scaled to the reference's in-range count, k = N_ref / N_gen, and

        χ² = Σ_i (k n_gen,i − n_ref,i)² / (k² σ²_gen,i + σ²_ref,i),

    over the bins where the denominator is positive (bins empty in both are skipped), with
    ndf = (number of those bins) − 1 for the normalisation. σ² is the histogram's variance
    (``hist.Hist`` with Weight storage) or the count (Poisson) for plain arrays and unweighted
    histograms; with unit weights and k = 1 each term is (n_gen − n_ref)² / (n_gen + n_ref).
    Sums of this χ² over energy points are FastCaloGAN's best-epoch criterion.

    h_gen, h_ref: ``hist.Hist`` or 1-d arrays of counts on the same bins.
    """
    n_gen, v_gen, n_ref, v_ref = _matching(h_gen, h_ref)
    s_gen, s_ref = n_gen.sum(), n_ref.sum()
    if s_gen <= 0 or s_ref <= 0:
        raise ValueError("χ² of an empty histogram is undefined")
    k = s_ref / s_gen
    denom = k**2 * v_gen + v_ref
    used = denom > 0
    chi2 = float(np.sum((k * n_gen[used] - n_ref[used]) ** 2 / denom[used]))
    return Chi2Result(chi2, max(int(used.sum()) - 1, 0))
