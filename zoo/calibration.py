"""Marginal calibration: a generator's voxel energies mapped onto the training data's distributions.

A generative model gets the joint structure of a shower (which voxels are high together, how the
layers follow each other) from its network, and the marginal distribution of each voxel's energy
only as well as the network can bend its output to it. Two parts of those marginals are out of a
smooth network's reach and are what the CaloChallenge histograms see first:

- the **discrete lines** of Geant4's voxel-energy spectrum: a voxel that holds one photo-absorption
  gets the absorber's K-shell binding energy (69.5 keV in W, 88.0 keV in Pb, with fluorescence off)
  and 511 keV annihilation photons give lines at 511 keV and 511 keV minus those; in the PbWO4
  reference about 8 % of all hits sit exactly on such a value, which a velocity field smears into a
  broad bump (and a tail of hits below 60 keV that Geant4 hardly has);
- the **occupancy** of the sparse outer voxels and deep layers (which voxels hold any energy at all),
  which a continuous model gets only through a threshold.

This module maps them in three monotone steps, fitted per knot of incident energy (the model's own
knots; between two knots step 1 blends their maps, step 2 takes the nearer one's), all of them table
look-ups that export to ONNX:

1. each *class* of voxels (one radial ring of one layer) is mapped from the model's distribution of
   that class's energies (its quantiles on ``levels``, the share of empty voxels included) onto the
   training data's: T = F_data⁻¹ ∘ F_model, tabulated on a grid in log(energy). Where the model fills
   more voxels than the data, its hits below a threshold (that class's share of the surplus) become
   empty; where it fills fewer, its hits take the data's upper quantiles. Voxels that are empty stay
   empty;
2. every hit below ``fine_max_mev``, all classes pooled, is mapped likewise on a fine grid, which
   reproduces the lines (a line is a plateau of T: a whole interval of the model's energies goes onto
   one value);
3. each layer is put back to the energy it had before (the model's own layer energies are what its
   energy network drew): after step 1 by scaling all its hits alike (the removed hits' energy goes
   to the others, within a factor of 50), after step 2 by scaling only its voxels at or above
   ``restore_min_mev``, so that the small deposits keep their values.

Every map keeps the order of the voxels it maps, so the ranks the network drew (its correlations)
are kept. The data's tables come from ``fit_data``; the model's from the model's own showers
(:meth:`MarginalCalibration.fit_model`), which is why a family that calibrates refits after each
training step it is evaluated at (``ShowerModel.calibrate``). A knot without training showers (an
energy left out) takes the mean of its neighbours' quantiles, a displacement interpolation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from showers.readout import Readout

__all__ = ["MarginalCalibration"]


def _neighbour_fill(rows: list) -> list:
    """Rows that are None (knots without data) become the mean of their nearest filled neighbours."""
    filled = [j for j, r in enumerate(rows) if r is not None]
    out = list(rows)
    for j, r in enumerate(rows):
        if r is None and filled:
            below, above = [i for i in filled if i < j], [i for i in filled if i > j]
            near = ([below[-1]] if below else []) + ([above[0]] if above else [])
            out[j] = tuple(np.mean([rows[i][m] for i in near], axis=0) for m in range(len(rows[near[0]])))
    return out


class MarginalCalibration(nn.Module):
    """The three maps of the module docstring for one readout and ``n_knots`` knots of energy.

    levels: quantile levels of each class's hits; grid: points of each class's map in log(E);
    fine_levels, fine_grid: the same for the pooled small hits (below ``fine_max_mev``);
    restore_min_mev: voxels from this energy up are scaled to put each layer back to its energy.
    """

    def __init__(self, readout: Readout, n_knots: int, levels: int = 33, grid: int = 128, fine_levels: int = 513,
                 fine_grid: int = 512, fine_max_mev: float = 1.0, restore_min_mev: float = 1.0,
                 per_knot: int = 64):
        super().__init__()
        layer, ring = np.asarray(readout.voxel_layer), np.asarray(readout.voxel_r)
        pairs = sorted(set(zip(layer.tolist(), ring.tolist())))
        index = {p: i for i, p in enumerate(pairs)}
        self.n_classes, self.n_knots, self.per_knot = len(pairs), int(n_knots), int(per_knot)
        self.fine_max_mev, self.restore_min_mev = float(fine_max_mev), float(restore_min_mev)
        active = readout.active_layers
        onehot = np.zeros((readout.n_voxels, len(active)), dtype=np.float32)
        onehot[np.arange(readout.n_voxels), [active.index(int(l)) for l in layer]] = 1.0
        self.register_buffer("voxel_class", torch.as_tensor([index[p] for p in zip(layer.tolist(), ring.tolist())]),
                             persistent=False)
        self.register_buffer("layer_matrix", torch.from_numpy(onehot), persistent=False)
        # each layer's voxels in slots of a (n_layers, widest layer) grid (padding reads a zero column):
        # a layer's largest voxel by a gather and a max, as ONNX runs it
        layer_index = onehot.argmax(1)
        self.n_layers = len(active)
        self.n_slots = int(np.bincount(layer_index, minlength=self.n_layers).max())
        slot_index = np.full(self.n_layers * self.n_slots, readout.n_voxels, dtype=np.int64)
        for l in range(self.n_layers):
            members = np.flatnonzero(layer_index == l)
            slot_index[l * self.n_slots:l * self.n_slots + len(members)] = members
        self.register_buffer("slot_index", torch.from_numpy(slot_index), persistent=False)
        k, c = self.n_knots, self.n_classes
        self.register_buffer("levels", torch.linspace(0.0, 1.0, levels, dtype=torch.float64), persistent=False)
        self.register_buffer("fine_levels", torch.linspace(0.0, 1.0, fine_levels, dtype=torch.float64),
                             persistent=False)
        # the data's tables (fit_data) and the energies the model is sampled at to fit its own
        self.register_buffer("data_occupancy", torch.zeros(k, c))
        self.register_buffer("data_quantiles", torch.zeros(k, c, levels))
        self.register_buffer("data_fine", torch.zeros(k, fine_levels))
        self.register_buffer("sample_energy", torch.zeros(k, self.per_knot))  # MeV
        # the maps: T tabulated on an even grid in log(E / MeV) between ``log_range``
        self.register_buffer("log_range", torch.tensor([math.log(1e-4), math.log(1e4)]))
        self.register_buffer("table", torch.zeros(k, c, grid))
        self.register_buffer("threshold", torch.zeros(k, c))  # MeV: the model's hits below it become empty
        self.register_buffer("fine", torch.zeros(k, fine_grid))
        self.register_buffer("fitted", torch.zeros(()))
        self._fitted = False

    @property
    def is_fitted(self) -> bool:
        """Whether the maps are fitted (a Python flag beside the ``fitted`` buffer: an exporter traces
        buffers as symbols and cannot branch on their values)."""
        return self._fitted

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        value = state_dict.get(prefix + "fitted")
        self._fitted = bool(value is not None and float(value) > 0)

    # -- fitting -------------------------------------------------------------------------------------
    def _class_tables(self, showers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(occupancy (C,), hit quantiles (C, levels)) of showers (N, n_voxels) MeV."""
        levels = self.levels.cpu().numpy()
        cls = self.voxel_class.cpu().numpy()
        occupancy = np.zeros(self.n_classes)
        quantiles = np.zeros((self.n_classes, len(levels)))
        for c in range(self.n_classes):
            v = showers[:, cls == c].ravel()
            hits = v[v > 0]
            occupancy[c] = len(hits) / max(len(v), 1)
            if len(hits):
                quantiles[c] = np.quantile(hits, levels)
        return occupancy, quantiles

    def _fine_quantiles(self, showers: np.ndarray) -> np.ndarray:
        hits = showers[(showers > 0) & (showers < self.fine_max_mev)]
        levels = self.fine_levels.cpu().numpy()
        return np.quantile(hits, levels) if len(hits) else np.full(len(levels), self.fine_max_mev)

    def fit_reference(self, knot_of: np.ndarray, energy_mev: np.ndarray, showers_mev: np.ndarray,
                      knot_energy_mev: np.ndarray) -> None:
        """The training data's tables per knot (``knot_of``: each shower's nearest knot; a knot without
        showers takes its neighbours' mean) and the energies to sample the model at (up to
        ``per_knot`` of its showers' energies, evenly spread; the knot's own energy where it has none)."""
        showers = np.asarray(showers_mev, dtype=np.float64)
        energy = np.asarray(energy_mev, dtype=np.float64).ravel()
        rows, sample = [], []
        for k in range(self.n_knots):
            idx = np.flatnonzero(knot_of == k)
            if len(idx) == 0:
                rows.append(None)
                sample.append(np.full(self.per_knot, float(knot_energy_mev[k])))
                continue
            rows.append((*self._class_tables(showers[idx]), self._fine_quantiles(showers[idx])))
            pick = idx[np.linspace(0, len(idx) - 1, self.per_knot).round().astype(int)]
            sample.append(energy[pick])
        rows = _neighbour_fill(rows)
        hits = showers[showers > 0]
        lo = math.log(max(0.5 * float(np.quantile(hits, 1e-3)) if len(hits) else 1e-4, 1e-6))
        hi = math.log(max(float(hits.max()) if len(hits) else 1e4, 1e-3) * 2.0)
        with torch.no_grad():
            for buf, m in ((self.data_occupancy, 0), (self.data_quantiles, 1), (self.data_fine, 2)):
                buf.copy_(torch.as_tensor(np.stack([r[m] for r in rows])))
            self.sample_energy.copy_(torch.as_tensor(np.stack(sample)))
            self.log_range.copy_(torch.tensor([lo, hi]))
            self.fitted.zero_()
        self._fitted = False

    def _grid(self, n: int, hi: float | None = None) -> np.ndarray:
        lo, top = (float(v) for v in self.log_range)
        return np.exp(np.linspace(lo, top if hi is None else math.log(hi), n))

    def fit_model(self, showers_mev: np.ndarray) -> None:
        """The maps, from the model's own uncalibrated showers (N, n_voxels) MeV at ``sample_energy``
        (knot by knot, ``per_knot`` each, in that order)."""
        showers = np.asarray(showers_mev, dtype=np.float64).reshape(self.n_knots, self.per_knot, -1)
        levels, fine_levels = self.levels.cpu().numpy(), self.fine_levels.cpu().numpy()
        grid = self._grid(self.table.shape[-1])
        fine_grid = self._grid(self.fine.shape[-1], hi=self.fine_max_mev)
        table = np.zeros(tuple(self.table.shape))
        threshold = np.zeros(tuple(self.threshold.shape))
        fine = np.zeros(tuple(self.fine.shape))
        for k in range(self.n_knots):
            occ_m, q_m = self._class_tables(showers[k])
            occ_d = self.data_occupancy[k].cpu().numpy()
            q_d = self.data_quantiles[k].cpu().numpy()
            for c in range(self.n_classes):
                table[k, c], threshold[k, c] = self._map(grid, occ_m[c], q_m[c], occ_d[c], q_d[c], levels)
            with torch.no_grad():
                self.table[k].copy_(torch.as_tensor(table[k]))
                self.threshold[k].copy_(torch.as_tensor(threshold[k]))
                x = torch.as_tensor(showers[k], dtype=self.table.dtype, device=self.table.device)
                at = torch.full((len(x), 1), k, dtype=torch.long, device=x.device)  # this knot's row alone
                mapped = self._by_class(x, at, at, torch.zeros(len(x), 1, dtype=x.dtype, device=x.device))
                mapped = mapped.double().cpu().numpy()
            q_fm = self._fine_quantiles(mapped)
            fine[k] = np.interp(np.interp(fine_grid, q_fm, fine_levels), fine_levels, self.data_fine[k].cpu().numpy())
        with torch.no_grad():
            self.table.copy_(torch.as_tensor(table))
            self.threshold.copy_(torch.as_tensor(threshold))
            self.fine.copy_(torch.as_tensor(fine))
            self.fitted.fill_(1.0)
        self._fitted = True

    @staticmethod
    def _map(grid, occ_m, q_m, occ_d, q_d, levels) -> tuple[np.ndarray, float]:
        """(T on ``grid``, threshold): a model energy's place among all the model's voxels of its class
        (empty ones first), then the data's energy at that place; below the threshold (the place of the
        data's empty share, where the model fills more) a hit becomes empty."""
        if occ_m <= 0:
            return grid.copy(), 0.0  # the model never fills this class: nothing to map
        if occ_d <= 0:
            return np.zeros_like(grid), 1e30  # never filled in the data: every hit becomes empty
        surplus = max(occ_m - occ_d, 0.0) / occ_m  # the share of the model's hits that must go
        threshold = float(np.interp(surplus, levels, q_m)) if surplus > 0 else 0.0
        place = 1.0 - occ_m + occ_m * np.interp(grid, q_m, levels)
        within = np.clip((place - (1.0 - occ_d)) / occ_d, 0.0, 1.0)
        return np.interp(within, levels, q_d), threshold

    # -- generation ----------------------------------------------------------------------------------
    def _look_up(self, table: torch.Tensor, row: torch.Tensor, x: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor) -> torch.Tensor:
        """Piecewise-linear T(x) in log x from flat ``table`` (rows of ``n`` points on [lo, hi] in log
        E); ``row`` (B, n_voxels or 1) is each value's row."""
        n = table.shape[-1]
        g = ((torch.log(x.clamp_min(1e-30)) - lo) / (hi - lo) * (n - 1)).clamp(0.0, n - 1.0)
        i = torch.floor(g).clamp(max=n - 2.0)
        frac = g - i
        idx = row * n + i.long()
        flat = table.reshape(-1)
        left = flat.index_select(0, idx.reshape(-1)).reshape(idx.shape)
        right = flat.index_select(0, (idx + 1).reshape(-1)).reshape(idx.shape)
        return left + (right - left) * frac

    def _layer_max(self, voxels: torch.Tensor) -> torch.Tensor:
        """(B, n_layers): each layer's largest voxel."""
        padded = torch.cat([voxels, torch.zeros_like(voxels[:, :1])], dim=1).index_select(1, self.slot_index)
        return padded.reshape(voxels.shape[0], self.n_layers, self.n_slots).amax(dim=2)

    def _knots(self, knot_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k0, k1, f) (B, 1) each: the two knots around each shower and the weight of the second."""
        k = self.n_knots
        pos = knot_position.reshape(-1, 1).clamp(0.0, k - 1.0)
        k0 = torch.floor(pos).clamp(max=max(k - 2, 0))
        f = pos - k0
        k0 = k0.long()
        return k0, (k0 + 1).clamp(max=k - 1), f

    def _by_class(self, voxels: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Step 1: each ring's map, the surplus hits emptied, each layer put back to its energy."""
        lo, hi = self.log_range[0], self.log_range[1]
        cls = self.voxel_class.unsqueeze(0)
        row0, row1 = k0 * self.n_classes + cls, k1 * self.n_classes + cls
        y = self._look_up(self.table, row0, voxels, lo, hi) * (1.0 - f) + self._look_up(self.table, row1, voxels, lo, hi) * f
        flat = self.threshold.reshape(-1)
        threshold = flat.index_select(0, row0.reshape(-1)).reshape(row0.shape) * (1.0 - f) \
            + flat.index_select(0, row1.reshape(-1)).reshape(row1.shape) * f
        m = self.layer_matrix.to(y.dtype)
        keep = (voxels > 0) & (voxels >= threshold)
        # a layer that had hits keeps at least its largest one (Geant4's layers of little energy hold
        # it in a few hits; the model's may spread it over many small ones that all fall below)
        emptied = (keep.to(y.dtype) @ m == 0).to(y.dtype) @ m.T > 0
        keep = keep | (emptied & (voxels > 0) & (voxels >= self._layer_max(voxels) @ m.T))
        y = torch.where(keep, y, torch.zeros_like(y))
        # the layer's energy back, all its hits alike (what the removed ones held goes to the others)
        return y * (((voxels @ m) / (y @ m).clamp_min(1e-12)).clamp(0.5, 1e3) @ m.T)

    def _small(self, y: torch.Tensor, k0: torch.Tensor, k1: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """Step 2: the small deposits onto the data's spectrum of them, at the nearer knot: the lines
        lie at the same energies at every knot but take other shares of it, so a blend of two knots'
        maps would put a hit between lines."""
        lo = self.log_range[0]
        top = torch.full_like(lo, math.log(self.fine_max_mev))
        small = (y > 0) & (y < self.fine_max_mev)
        nearer = torch.where(f >= 0.5, k1, k0)
        return torch.where(small, self._look_up(self.fine, nearer.expand_as(y), y, lo, top), y)

    def forward(self, voxels: torch.Tensor, knot_position: torch.Tensor) -> torch.Tensor:
        """Calibrated voxels (B, n_voxels) MeV; knot_position (B,): each shower's fractional place among
        the knots (0 at the first)."""
        k0, k1, f = self._knots(knot_position)
        y = self._small(self._by_class(voxels, k0, k1, f), k0, k1, f)
        # each layer back to its energy again, by its voxels at or above restore_min_mev only
        m = self.layer_matrix.to(y.dtype)
        large = y >= self.restore_min_mev
        kept = torch.where(large, torch.zeros_like(y), y) @ m
        scaled = torch.where(large, y, torch.zeros_like(y)) @ m
        factor = torch.where(scaled > 0, (((voxels @ m) - kept) / scaled.clamp_min(1e-12)).clamp(0.5, 2.0),
                             torch.ones_like(scaled))
        return torch.where(large, y * (factor @ m.T), y)
