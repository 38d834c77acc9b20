"""Hits <-> voxels: bin energy deposits (points in mm) into a readout around a shower axis, and back.

Shower frame. A shower axis is given by an origin (the entry point into the calorimeter, mm) and a
direction (normalised here). For a point p:

* depth  t = (p - origin) . u, the distance along the axis; layer i holds
  ``layer_edges_mm[i] <= t < layer_edges_mm[i + 1]`` (the readout's layer thicknesses are required);
* radius r = |p - origin - t u|, binned by the layer's ``r_edges`` (``r_lo <= r < r_hi``);
* angle  alpha = atan2((p - origin) . e2, (p - origin) . e1) in [-pi, pi) (pi itself is folded
  onto -pi), binned in ``n_alpha`` equal bins.

Reference direction of alpha. (e1, e2, u) is the image of (x, y, z) under the smallest rotation
that turns +z onto u (Rodrigues' rotation about z x u). For a shower along +z this is the CaloChallenge
convention alpha = atan2(y, x) (see shared/g4showers: ``ia = floor((atan2(y, x) + pi) / (2 pi / n))``);
for other axes it moves continuously with u, except at u = -z exactly, where the rotation by pi about
x is used (e1 = x, e2 = -y). Example: u = +y gives e1 = +x, e2 = -z.

Energy is conserved exactly: each hit is either in one voxel or "outside" (before the front, beyond the
last layer, beyond its layer's last radial edge, or in a layer without voxels), and
``voxels.sum() + outside.sum() == energy.sum()`` up to float64 rounding.
"""

from __future__ import annotations

import math

import numpy as np

from showers.errors import ShowerDataError
from showers.readout import Layer, Readout, get_readout

__all__ = [
    "devoxelise",
    "edm4hep_event_to_voxels",
    "planes_readout",
    "sensor_planes",
    "shower_frame",
    "transverse_basis",
    "voxelise",
]

# Sampled points keep this fraction of a bin's width away from its edges, so that the rounding of
# the shower-frame -> xyz -> shower-frame round trip (~1e-16 x coordinates) cannot move a point
# into a neighbouring voxel. A bias of 1e-6 of a bin width is far below anything measurable.
_EDGE_MARGIN = 1e-6


def _unit(direction) -> np.ndarray:
    """Normalise (3,) or (n, 3) directions; a zero or non-finite direction is an error."""
    d = np.asarray(direction, dtype=np.float64)
    if d.shape[-1] != 3:
        raise ValueError(f"axis direction must have 3 components, got shape {d.shape}")
    norm = np.linalg.norm(d, axis=-1, keepdims=True)
    if not np.all(np.isfinite(norm)) or np.any(norm == 0):
        raise ValueError("axis direction must be a finite non-zero vector")
    return d / norm


def transverse_basis(direction) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(e1, e2, u) for axis direction(s) (3,) or (n, 3): the minimal rotation of (x, y, z) onto u.

    Each of shape like ``direction``; (e1, e2, u) is right-handed and orthonormal. alpha is measured
    from e1 towards e2 (module docstring).
    """
    u = _unit(direction)
    ux, uy, uz = u[..., 0], u[..., 1], u[..., 2]
    # Rotation R = I + [k]x + [k]x^2 / (1 + c), k = z x u, c = uz; its first two columns are e1, e2.
    # ux^2 / (1 + uz) <= 1 - uz, so the division is harmless except at uz = -1 exactly.
    antiparallel = 1.0 + uz <= 1e-12
    s = 1.0 / np.where(antiparallel, 1.0, 1.0 + uz)
    e1 = np.stack([1.0 - ux * ux * s, -ux * uy * s, -ux], axis=-1)
    e1 = np.where(antiparallel[..., None], np.array([1.0, 0.0, 0.0]), e1)
    # Re-orthogonalise against rounding, then complete the right-handed frame.
    e1 = e1 - np.sum(e1 * u, axis=-1, keepdims=True) * u
    e1 /= np.linalg.norm(e1, axis=-1, keepdims=True)
    e2 = np.cross(u, e1)
    return e1, e2, u


def shower_frame(x, y, z, axis_origin, axis_direction) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(depth t, radius r, alpha) of points in mm/rad; origin and direction (3,) or per point (n, 3)."""
    p = np.stack([np.asarray(x, np.float64), np.asarray(y, np.float64), np.asarray(z, np.float64)], axis=-1)
    d = p - np.asarray(axis_origin, dtype=np.float64)
    e1, e2, u = transverse_basis(axis_direction)
    t = np.sum(d * u, axis=-1)
    a = np.sum(d * e1, axis=-1)
    b = np.sum(d * e2, axis=-1)
    return t, np.hypot(a, b), np.arctan2(b, a)


def _layer_edges(readout: Readout) -> np.ndarray:
    edges = readout.layer_edges_mm
    if edges is None:
        raise ValueError(f"readout {readout.name!r} has no layer thicknesses (layer_thickness_mm is None); "
                         "voxelising needs depths: give one, e.g. dataclasses.replace(readout, layer_thickness_mm=...)")
    if np.any(np.diff(edges) <= 0):
        raise ValueError(f"readout {readout.name!r}: layer thicknesses must be > 0")
    return np.asarray(edges, dtype=np.float64)


def _per_event(value, n_events: int, name: str) -> np.ndarray:
    """(3,) or (n_events, 3) -> (n_events, 3)."""
    v = np.asarray(value, dtype=np.float64)
    if v.shape == (3,):
        return np.broadcast_to(v, (n_events, 3))
    if v.shape == (n_events, 3):
        return v
    raise ValueError(f"{name} must have shape (3,) or (n_events={n_events}, 3), got {v.shape}")


def voxelise(x, y, z, energy, readout, axis_origin=(0.0, 0.0, 0.0), axis_direction=(0.0, 0.0, 1.0),
             event_index=None, n_events: int | None = None, return_outside: bool = False,
             source: str = "hits"):
    """Bin hits into a readout's voxels around a shower axis.

    x, y, z: (n_hits,) hit positions in mm.
    energy: (n_hits,) hit energies, any unit (kept: voxels come out in the same unit).
    readout: a Readout (or name/dict) with layer thicknesses.
    axis_origin: (3,) entry point in mm, or (n_events, 3), one per event.
    axis_direction: (3,) direction (normalised here), or (n_events, 3).
    event_index: (n_hits,) int event of each hit, in [0, n_events); default all in event 0.
    n_events: number of events (rows); default ``event_index.max() + 1`` (1 without event_index).
    return_outside: also return the energy outside the voxels per event.
    source: what to name in errors.

    Returns voxels (n_events, n_voxels) float64 in CaloChallenge order, and with return_outside
    ``(voxels, outside)`` where outside (n_events,) is the energy of the hits in no voxel, so that
    ``voxels.sum(1) + outside`` equals the hits' energy per event (float64 rounding).
    """
    readout = get_readout(readout)
    edges = _layer_edges(readout)
    x, y, z, e = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (x, y, z, energy))
    n_hits = e.shape[0]
    if not (x.shape[0] == y.shape[0] == z.shape[0] == n_hits):
        raise ShowerDataError(source, f"x, y, z, energy have different lengths {x.shape[0]}, {y.shape[0]}, "
                              f"{z.shape[0]}, {n_hits}")
    for name, v in (("x", x), ("y", y), ("z", z), ("energy", e)):
        if not np.all(np.isfinite(v)):
            raise ShowerDataError(source, f"{int((~np.isfinite(v)).sum())} NaN/inf values", name)
    if event_index is None:
        ev = np.zeros(n_hits, dtype=np.int64)
        n_events = 1 if n_events is None else int(n_events)
    else:
        ev = np.asarray(event_index).reshape(-1).astype(np.int64)
        if ev.shape[0] != n_hits:
            raise ShowerDataError(source, f"{ev.shape[0]} event indices for {n_hits} hits", "event_index")
        if n_events is None:
            n_events = int(ev.max()) + 1 if n_hits else 1
        if n_hits and (ev.min() < 0 or ev.max() >= n_events):
            raise ShowerDataError(source, f"event indices must lie in [0, {n_events})", "event_index")
    origin = _per_event(axis_origin, n_events, "axis_origin")
    direction = _per_event(_unit(axis_direction), n_events, "axis_direction")
    # Per-hit axis only when events differ; a single (3,) axis is broadcast without a copy.
    per_hit = np.ndim(axis_origin) == 2 or np.ndim(axis_direction) == 2
    o = origin[ev] if per_hit else origin[0]
    d = direction[ev] if per_hit else direction[0]
    t, r, alpha = shower_frame(x, y, z, o, d)

    voxel = np.full(n_hits, -1, dtype=np.int64)  # -1: outside
    layer = np.searchsorted(edges, t, side="right") - 1
    in_depth = (layer >= 0) & (layer < readout.n_layers)
    # Loop over distinct layer geometries (one for a regular readout, a handful for CaloChallenge
    # dataset 1), never over hits: every step below is a vectorised numpy operation.
    kinds: dict = {}
    for i, lay in enumerate(readout.layers):
        kinds.setdefault(lay, []).append(i)
    kind_of_layer = np.empty(readout.n_layers, dtype=np.int64)
    for k, layer_ids in enumerate(kinds.values()):
        kind_of_layer[layer_ids] = k
    hit_kind = np.where(in_depth, kind_of_layer[np.clip(layer, 0, readout.n_layers - 1)], -1)
    offsets = readout.layer_offsets
    for k, lay in enumerate(kinds):
        if lay.n_voxels == 0:
            continue  # a layer without voxels: its hits stay outside
        sel = np.flatnonzero(hit_kind == k)
        r_edges = np.asarray(lay.r_edges)
        ir = np.searchsorted(r_edges, r[sel], side="right") - 1
        ok = (ir >= 0) & (ir < lay.n_r)
        # floor((alpha + pi) / bin width), with alpha = pi folded onto bin 0 (= -pi).
        ia = np.floor((alpha[sel] + math.pi) * (lay.n_alpha / (2 * math.pi))).astype(np.int64) % lay.n_alpha
        sel, ir, ia = sel[ok], ir[ok], ia[ok]
        voxel[sel] = offsets[layer[sel]] + ia * lay.n_r + ir

    inside = voxel >= 0
    n_vox = readout.n_voxels
    voxels = np.bincount(ev[inside] * n_vox + voxel[inside], weights=e[inside],
                         minlength=n_events * n_vox).reshape(n_events, n_vox)
    if not return_outside:
        return voxels
    outside = np.bincount(ev[~inside], weights=e[~inside], minlength=n_events)
    return voxels, outside


def devoxelise(showers, readout, n_per_voxel=1, rng=None, axis_origin=(0.0, 0.0, 0.0),
               axis_direction=(0.0, 0.0, 1.0)) -> dict:
    """Sample hits inside the non-zero voxels of showers: the inverse of :func:`voxelise`.

    showers: (N, n_voxels) or (n_voxels,) voxel energies (any unit).
    readout: a Readout (or name/dict) with layer thicknesses.
    n_per_voxel: points per non-zero voxel: an int, or ints broadcastable to (N, n_voxels) (e.g.
        more points where there is more energy); must be >= 1 for every non-zero voxel.
    rng: numpy Generator or seed.
    axis_origin, axis_direction: (3,) or (N, 3): where each shower's axis is (as in voxelise).

    Points are uniform in each voxel's volume: depth uniform in the layer, r = sqrt(U(r_lo^2, r_hi^2))
    (uniform in area), alpha uniform in the bin; each stays 1e-6 of a bin width inside the bin
    edges (see _EDGE_MARGIN). A voxel's energy is shared equally among its points, so summing the
    points of a voxel gives its energy back to float64 rounding, and
    ``voxelise(**devoxelise(v), ...) == v`` (with the same axis).

    Returns a dict of (n_points,) arrays: ``event`` (int64 row of showers), ``x``, ``y``, ``z`` (mm),
    ``energy`` (float64); and ``n_events`` (int), so ``voxelise(h['x'], h['y'], h['z'], h['energy'],
    readout, ..., event_index=h['event'], n_events=h['n_events'])`` rebuilds the showers.
    """
    readout = get_readout(readout)
    edges = _layer_edges(readout)
    X = np.asarray(showers, dtype=np.float64)
    if X.ndim == 1:
        X = X[None, :]
    X = readout.check_showers(X, "showers")
    n_events = X.shape[0]
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)

    ev, vox = np.nonzero(X)
    counts = np.broadcast_to(np.asarray(n_per_voxel), X.shape)[ev, vox].astype(np.int64)
    if np.any(counts < 1):
        raise ValueError("n_per_voxel must be >= 1 for every non-zero voxel (its energy would be lost)")
    energy = np.repeat(X[ev, vox] / counts, counts)
    ev, vox = np.repeat(ev, counts), np.repeat(vox, counts)
    n = vox.shape[0]

    def inside(lo, hi):
        u = _EDGE_MARGIN + (1.0 - 2.0 * _EDGE_MARGIN) * gen.random(n)
        return lo + (hi - lo) * u

    lay = readout.voxel_layer[vox]
    t = inside(edges[lay], edges[lay + 1])
    rlo, rhi = (a[vox] for a in readout.voxel_r_edges)
    r = np.sqrt(inside(rlo**2, rhi**2))
    alo, ahi = (a[vox] for a in readout.voxel_alpha_edges)
    alpha = inside(alo, ahi)

    origin = _per_event(axis_origin, n_events, "axis_origin")[ev]
    e1, e2, u = (b[ev] for b in transverse_basis(_per_event(_unit(axis_direction), n_events, "axis_direction")))
    p = origin + t[:, None] * u + (r * np.cos(alpha))[:, None] * e1 + (r * np.sin(alpha))[:, None] * e2
    return {"event": ev.astype(np.int64), "x": p[:, 0], "y": p[:, 1], "z": p[:, 2], "energy": energy,
            "n_events": n_events}


# ---------------------------------------------------------------------------------------------
# demo on a real event
# ---------------------------------------------------------------------------------------------
ILD_SI_COLLECTIONS = ("ECalBarrelSiHitsEven", "ECalBarrelSiHitsOdd")
_PLANE_GAP_MM = 1.5  # depth gap that separates two sensor planes (ILD Si planes are >= 3.1 mm apart)


def sensor_planes(depth_mm, gap_mm: float = _PLANE_GAP_MM) -> np.ndarray:
    """Depths (mm) of the sensor planes seen in hits' depths: sorted depths split where they jump by
    more than ``gap_mm``; each plane is the mean depth of its hits. Assumes near-normal incidence
    (hits of one plane then lie within a fraction of a mm in depth)."""
    d = np.sort(np.asarray(depth_mm, dtype=np.float64))
    if d.size == 0:
        return d
    cut = np.flatnonzero(np.diff(d) > gap_mm) + 1
    return np.array([part.mean() for part in np.split(d, cut)])


def planes_readout(planes_mm, n_layers: int, r_edges, n_alpha: int, name: str = "ild-ecal-demo") -> Readout:
    """A readout whose layers are centred on sensor planes: boundaries mid-way between consecutive
    planes, the first and last seen plane given half the mean pitch on their outer side, and, if
    fewer than ``n_layers`` planes were seen, further layers of the mean pitch behind them (more
    planes than ``n_layers``: the first ``n_layers`` are used).

    planes_mm: (k,) increasing plane depths in mm, k >= 2, relative to any origin; the readout's
        depth 0 is then at ``planes_mm[0] - mean_pitch / 2``.
    """
    p = np.asarray(planes_mm, dtype=np.float64)
    pitch = float((p[-1] - p[0]) / (p.size - 1))
    p = p[:n_layers]
    edges = np.concatenate([[p[0] - pitch / 2], (p[1:] + p[:-1]) / 2, [p[-1] + pitch / 2]])
    thickness = np.concatenate([np.diff(edges), np.full(n_layers - p.size, pitch)])
    layer = Layer(tuple(r_edges), n_alpha)
    return Readout(name, (layer,) * n_layers, tuple(thickness),
                   {"source": "edm4hep_event_to_voxels", "planes_seen": int(np.size(planes_mm)),
                    "mean_pitch_mm": pitch})


def edm4hep_event_to_voxels(path, readout=None, collections=ILD_SI_COLLECTIONS, entry: int = 0,
                            n_layers: int = 30, r_max_mm: float = 100.0, r_bin_mm: float = 5.0,
                            n_alpha: int = 16):
    """Voxelise one EDM4hep event (the ILD SiW ECAL photon of tests/fixtures) around its primary.

    Axis: the primary's direction through its vertex. Depth origin (the entry point): the vertex
    moved along the axis to half a layer before the first sensor plane, where the planes are found
    from the depths of the hits within ``r_max_mm`` of the axis and in front of the vertex
    (:func:`sensor_planes`); hits elsewhere in the detector (the far side of the barrel, backscatter)
    end up outside.

    Default readout ("ild-ecal-demo", see :func:`planes_readout`): ``n_layers`` (30, as the ILD SiW
    ECAL) layers, each holding one sensor plane, 16 alpha bins, radial bins of 5 mm (about one
    5.1 mm ILD cell) up to 100 mm. Why not one equal pitch: the ILD ECAL mounts its Si planes in
    pairs on both faces of a slab, so consecutive planes are alternately ~3.1 and ~9.3 mm apart
    (~4.2 and ~12.5 mm in the last ten, thicker-tungsten layers); equal layers of the mean pitch
    (~6.99 mm here) would leave some layers with two planes and others with none. The mean pitch,
    (last plane - first plane) / (planes seen - 1), is kept in ``readout.meta['mean_pitch_mm']``.
    A given ``readout`` must have layer thicknesses; the first plane is then put mid-way through its
    first layer.

    Returns ``(voxels (1, n_voxels), outside (1,), readout)``, in MeV, with
    ``voxels.sum() + outside.sum()`` equal to the hits' total energy (float64 rounding).
    """
    from showers.formats import read_edm4hep_hits

    hits = read_edm4hep_hits(path, collections=list(collections), entry=entry)
    primary = hits["primary"]
    if primary is None:
        raise ShowerDataError(path, "no primary particle (MCParticles with generatorStatus 1)", "MCParticles")
    direction, vertex = primary["direction"], primary["vertex"]
    t, r, _ = shower_frame(hits["x"], hits["y"], hits["z"], vertex, direction)
    core = (t >= 0) & (r < r_max_mm)
    planes = sensor_planes(t[core])
    if planes.size < 2 and readout is None:
        raise ShowerDataError(path, f"{planes.size} sensor planes near the axis: cannot estimate the layer pitch",
                              ",".join(collections))
    if readout is None:
        readout = planes_readout(planes, n_layers, np.arange(0.0, r_max_mm + 0.5 * r_bin_mm, r_bin_mm), n_alpha)
        front_depth = planes[0] - 0.5 * readout.meta["mean_pitch_mm"]
    else:
        readout = get_readout(readout)
        if planes.size == 0:
            raise ShowerDataError(path, "no hits near the axis: cannot place the front", ",".join(collections))
        front_depth = planes[0] - 0.5 * float(_layer_edges(readout)[1])
    entry_point = vertex + front_depth * direction
    voxels, outside = voxelise(hits["x"], hits["y"], hits["z"], hits["energy"], readout,
                               entry_point, direction, return_outside=True, source=str(path))
    return voxels, outside, readout
