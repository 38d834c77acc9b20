"""Shower file formats: CaloChallenge HDF5, Par04 HDF5 and EDM4hep ROOT.

Everything is streamed in chunks of rows (h5py slicing, uproot iteration), so that a
100 000 x 40 500 file is never held in memory whole. Every problem with input data raises
:class:`~showers.errors.ShowerDataError` naming the file, the dataset and the problem.

Units: calozoo works in MeV and mm throughout. Readers convert (EDM4hep stores GeV); the
validation refuses files whose incident energies look like GeV (see :func:`validate_showers`).

CaloChallenge HDF5
    ``incident_energies`` (N, 1) MeV and ``showers`` (N, n_voxels) MeV, gzip; voxel order layer,
    then alpha, then r fastest. Written by :class:`CaloChallengeWriter` (atomic, resizable,
    chunked); read by :func:`iter_calochallenge` / :func:`read_calochallenge`.

Par04 (Geant4 example Par04 training data, Zenodo 6082201)
    Current layout ``{geometry}_angle_{A}.h5``: one dataset per primary energy, named by the energy
    in GeV (``"1"``, ``"2"``, ... ``"1024"``), each (N, 18, 50, 45) MeV in (r, phi, z) order.
    Older layout ``{geometry}/Energy_{E}_Angle_{A}.hdf5``: one energy and angle per file, the group
    ``Grp_Angle_{A}_E_{E}`` holding one dataset per event, each (18, 50, 45) (r, phi, z) (a member
    holding a batch (n, 18, 50, 45) is accepted too). This is the layout the Par04 training code of
    Geant4 11.0 reads; the geometry is the name of the parent directory (``SiW`` or ``SciPb``).
    :func:`iter_par04` detects the layout from the file name and yields CaloChallenge order
    (z, phi, r), i.e. the transposition of each (r, phi, z) block; :func:`write_par04` writes either.

EDM4hep ROOT (key4hep / ddsim output)
    :func:`read_edm4hep_hits` and :func:`iter_edm4hep_events` read SimCalorimeterHit collections
    (``.energy`` GeV -> MeV, ``.position.{x,y,z}`` mm) and the primary particle from ``MCParticles``
    with uproot.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import h5py
import numpy as np

from showers.atomic import GuardedFile, remove_stale, tmp_path
from showers.errors import ShowerDataError, WriteError
from showers.readout import Readout, get_readout, list_readouts

__all__ = [
    "CaloChallengeWriter",
    "check_disk",
    "check_memory",
    "check_output_path",
    "file_attrs",
    "file_readout",
    "iter_calochallenge",
    "iter_edm4hep_events",
    "iter_par04",
    "open_h5",
    "read_calochallenge",
    "read_strided",
    "resolve_readout",
    "read_edm4hep_hits",
    "validate_showers",
    "write_calochallenge",
    "write_par04",
    "PAR04_SHAPE",
]

INCIDENT = "incident_energies"
SHOWERS = "showers"

# Unit rule thresholds (see validate_showers).
GEV_SUSPECT_MAX_INCIDENT_MEV = 20.0
GEV_SUSPECT_MEDIAN_RATIO = 2.0


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _rows(first_row: int, idx, step: int = 1) -> str:
    """Human row description, in absolute row numbers of the file (``step``: rows of a strided read)."""
    idx = np.atleast_1d(np.asarray(idx)) * step + first_row
    shown = ", ".join(str(int(i)) for i in idx[:5])
    return f"row {shown}" if idx.size == 1 else f"rows {shown}{', ...' if idx.size > 5 else ''}"


def validate_showers(
    incident_energies_mev,
    showers_mev,
    source,
    dataset: str = SHOWERS,
    readout=None,
    *,
    energy_dataset: str = INCIDENT,
    first_row: int = 0,
    row_step: int = 1,
) -> None:
    """Check a chunk of showers; raise :class:`ShowerDataError` naming ``source``, the dataset and the problem.

    incident_energies_mev: (n,) or (n, 1) incident energies in MeV.
    showers_mev: (n, n_voxels) voxel energies in MeV.
    source: the file (or other source) to name in messages.
    dataset / energy_dataset: names of the shower and incident-energy datasets for the messages.
    readout: a Readout (or anything :func:`get_readout` takes); the width must be its n_voxels.
    first_row: row number of the chunk's first row in the file, so messages give file rows.
    row_step: the chunk holds every ``row_step``-th row of the file from ``first_row`` (a strided read).

    Checks, in order: shapes (2-d showers, one incident energy per shower, width = readout), NaN or
    inf in either array, incident energies <= 0, any shower value < 0 (no tolerance: a negative
    deposit is a bug upstream, e.g. an unclipped generator output; the message says how many), and
    the units rule.

    Units rule (a file is refused with "looks like GeV; expected MeV" when either holds):
      * any incident energy is below 20 (MeV). Every dataset calozoo knows starts well above:
        CaloChallenge at 256 MeV, Par04 and the Geant4 reference at 1 GeV, so a primary of a few
        MeV is a GeV value: a file of 1-64 GeV primaries with both arrays in GeV trips this (its
        E_tot/E_inc is a calorimeter's, but at "1 MeV" no calorimeter sees a shower).
      * at any incident energy (each energy point of a discrete spectrum; the whole chunk for a
        continuous one) the median of sum(showers) / incident energy exceeds 2. A calorimeter
        cannot see more than the incident energy (sampling-corrected sums scatter around 1, raw
        sampling fractions are ~0.01-1), so a median above 2 means the incident energies are ~1000x
        too small: GeV against showers in MeV. The median, not each shower, so that one low-energy
        shower with a large sampling fluctuation does not trip it.
    A file in GeV for both arrays with every primary above 20 GeV passes; nothing in the numbers
    tells it apart from a MeV file of lower energies. Showers in GeV with incident energies in MeV are not
    detected either: their ratio (~1e-3) overlaps with gaseous sampling calorimeters.
    """
    E = np.asarray(incident_energies_mev)
    X = np.asarray(showers_mev)
    if E.ndim == 2 and E.shape[1] == 1:
        E = E[:, 0]
    if E.ndim != 1:
        raise ShowerDataError(source, f"incident energies must have shape (N,) or (N, 1), got {E.shape}",
                              energy_dataset)
    if X.ndim != 2:
        raise ShowerDataError(source, f"showers must be 2-d (N, n_voxels), got shape {X.shape}", dataset)
    if E.shape[0] != X.shape[0]:
        raise ShowerDataError(
            source, f"{X.shape[0]} showers but {E.shape[0]} incident energies in {energy_dataset!r} "
            f"(row counts differ)", dataset,
        )
    if readout is not None:
        ro = get_readout(readout)
        if X.shape[1] != ro.n_voxels:
            raise ShowerDataError(
                source, f"showers have {X.shape[1]} voxels but readout {ro.name!r} has {ro.n_voxels} "
                f"(width does not match the readout)", dataset,
            )
    if E.shape[0] == 0:
        return

    bad = ~np.isfinite(E)
    if bad.any():
        raise ShowerDataError(
            source, f"{int(bad.sum())} NaN/inf incident energies at {_rows(first_row, np.flatnonzero(bad), row_step)}",
            energy_dataset,
        )
    bad = E <= 0
    if bad.any():
        raise ShowerDataError(
            source, f"{int(bad.sum())} zero or negative incident energies (min {E.min():g}) at "
            f"{_rows(first_row, np.flatnonzero(bad), row_step)}", energy_dataset,
        )
    # Row sums in float64 find NaN/inf without a (n, n_voxels) boolean temporary (inf - inf is
    # NaN, so the sum of a row with any non-finite value is non-finite); they serve the units rule too.
    sums = X.sum(axis=1, dtype=np.float64)
    bad_rows = np.flatnonzero(~np.isfinite(sums))
    if bad_rows.size:
        n_bad = int((~np.isfinite(X[bad_rows])).sum())
        raise ShowerDataError(source, f"{n_bad} NaN/inf values in {_rows(first_row, bad_rows, row_step)}", dataset)
    if X.size and X.min() < 0:
        neg = X < 0
        n_neg, neg_rows = int(neg.sum()), np.flatnonzero(neg.any(axis=1))
        raise ShowerDataError(
            source, f"{n_neg} negative energies (min {X.min():g} MeV) in {_rows(first_row, neg_rows, row_step)}", dataset,
        )
    low = E < GEV_SUSPECT_MAX_INCIDENT_MEV
    if low.all():
        raise ShowerDataError(
            source, f"incident energies: looks like GeV; expected MeV (largest is {E.max():g}, below "
            f"{GEV_SUSPECT_MAX_INCIDENT_MEV:g} MeV)", energy_dataset,
        )
    if low.any():
        raise ShowerDataError(
            source, f"incident energies: looks like GeV; expected MeV ({int(low.sum())} of {E.size} below "
            f"{GEV_SUSPECT_MAX_INCIDENT_MEV:g} MeV, the smallest {E.min():g}, at "
            f"{_rows(first_row, np.flatnonzero(low), row_step)})", energy_dataset,
        )
    ratios = sums / E
    points = np.unique(E)
    groups = [(float(e), ratios[E == e]) for e in points] if points.size <= 50 else [(None, ratios)]
    for e, r in groups:
        ratio = float(np.median(r))
        if ratio > GEV_SUSPECT_MEDIAN_RATIO:
            at = f" at {e:g} MeV" if e is not None else ""
            raise ShowerDataError(
                source, f"incident energies: looks like GeV; expected MeV (median shower sum / incident "
                f"energy = {ratio:.4g} > {GEV_SUSPECT_MEDIAN_RATIO:g}{at})", energy_dataset,
            )


# ---------------------------------------------------------------------------------------------
# resources: output paths, memory
# ---------------------------------------------------------------------------------------------
def check_output_path(path) -> Path:
    """``path`` as a Path if a file can be written there (its folder exists and is writable, and it
    is not a folder itself); else :class:`ShowerDataError` naming it. Call it before the work that
    produces the file, so that a typo in ``-o`` costs nothing."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ShowerDataError(path, "is a folder: give the name of the file to write")
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise ShowerDataError(path, f"cannot write the file: its folder {parent} {what}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ShowerDataError(path, f"cannot write the file: no permission to write into {parent}")
    return path


def check_disk(path, n_bytes: int, what: str) -> None:
    """Refuse to write ``n_bytes`` (uncompressed) into ``path`` when its file system has less free space,
    saying how much is needed and how much there is, before the work that produces them starts."""
    free = shutil.disk_usage(Path(path).parent if str(Path(path).parent) else ".").free
    if n_bytes > free:
        raise ShowerDataError(path, f"{what} need up to {n_bytes / 2**30:.3g} GiB (uncompressed), and its file "
                              f"system has {free / 2**30:.3g} GiB free: ask for fewer (-n), or write elsewhere (-o)")


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable, else free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


#: at most this fraction of the available memory is taken by showers read whole
MEMORY_FRACTION = 0.5


def check_memory(n_rows: int, n_voxels: int, source, itemsize: int = 4, what: str = "showers") -> None:
    """Refuse to hold ``n_rows`` × ``n_voxels`` values of ``itemsize`` bytes in memory when that is
    more than MEMORY_FRACTION of what is available (a file that claims a huge N, say), naming
    ``source``, before anything is allocated."""
    need = int(n_rows) * int(n_voxels) * int(itemsize)
    have = available_memory()
    if need > MEMORY_FRACTION * have:
        raise ShowerDataError(source, f"{n_rows:,} {what} × {n_voxels:,} voxels × {itemsize} bytes = "
                              f"{need / 2**30:.3g} GiB, more than {MEMORY_FRACTION:.0%} of the {have / 2**30:.3g} GiB "
                              "of memory available: read fewer (--max-showers) or split the file")


# ---------------------------------------------------------------------------------------------
# HDF5 helpers
# ---------------------------------------------------------------------------------------------
def open_h5(path, mode: str = "r") -> h5py.File:
    """Open an HDF5 file (use it as a context manager); a missing, empty, truncated or non-HDF5
    file raises :class:`ShowerDataError` naming it instead of h5py's OSError."""
    try:
        return h5py.File(path, mode)
    except FileNotFoundError as exc:
        raise ShowerDataError(path, "file does not exist") from exc
    except OSError as exc:
        text = str(exc)
        if os.path.exists(path) and os.path.getsize(path) == 0:
            what = "empty file (0 bytes), not HDF5"
        elif "truncated" in text:
            what = "truncated HDF5 file (shorter than its header says: an interrupted copy or write?)"
        elif "signature" in text:
            what = "not an HDF5 file"
        else:
            what = "unreadable HDF5 file"
        raise ShowerDataError(path, f"{what}: {text}") from exc


def _dataset(f: h5py.File, name: str, path) -> h5py.Dataset:
    try:
        obj = f[name]
    except KeyError as exc:
        raise ShowerDataError(path, f"dataset {name!r} is missing; the file has {sorted(f.keys())}", name) from exc
    if not isinstance(obj, h5py.Dataset):
        raise ShowerDataError(path, f"{name!r} is a group, not a dataset", name)
    return obj


def _check_stored(ds: h5py.Dataset, path) -> None:
    """Refuse a dataset whose header claims more rows than the file stores: HDF5 hands back its fill
    value for rows never written, and a file whose header claims 10^8 showers (a few kB on disk) would
    be read, plotted or trained on as if its fill values were showers."""
    if ds.shape[0] == 0 or ds.is_virtual or ds.external:
        return
    if ds.chunks is None:  # contiguous or compact: allocated whole when written, else not at all
        if ds.id.get_storage_size() < ds.size * ds.dtype.itemsize:
            raise ShowerDataError(path, f"its header claims {ds.shape[0]:,} rows but the file stores none of them "
                                  "(the values would be HDF5's fill value, not showers)", ds.name.lstrip("/"))
        return
    per_rows = math.prod(-(-n // c) for n, c in zip(ds.shape[1:], ds.chunks[1:]))  # chunks across a row
    need = -(-ds.shape[0] // ds.chunks[0]) * per_rows
    have = ds.id.get_num_chunks()
    if have < need:
        rows = have // per_rows * ds.chunks[0]
        raise ShowerDataError(path, f"its header claims {ds.shape[0]:,} rows but the file stores {have:,} of the "
                              f"{need:,} chunks they need (about {rows:,} rows): the rest would be HDF5's fill value, "
                              "not showers (an interrupted write, or a forged header)", ds.name.lstrip("/"))


def _read(ds: h5py.Dataset, sl, path) -> np.ndarray:
    """ds[sl], with a read error (a corrupt or truncated chunk) named by file and dataset."""
    try:
        return ds[sl]
    except OSError as exc:
        raise ShowerDataError(path, f"cannot read rows {sl}: {exc}", ds.name.lstrip("/")) from exc


def _encode_attr(key: str, value):
    """HDF5 attribute value: str/int/float/bool as they are, dict/list/tuple as JSON, Readout as JSON."""
    if isinstance(value, Readout):
        return value.to_json()
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, (str, bool, int, float, np.integer, np.floating, np.bool_, np.ndarray)):
        return value
    raise TypeError(f"attribute {key!r}: cannot store a {type(value).__name__} (use str, int, float or a dict)")


def _decode_attr(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        # JSON-encoded dicts and lists were written by _encode_attr; other strings stay strings.
        if value[:1] in "{[":
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def file_attrs(path) -> dict:
    """The file-level attributes of an HDF5 file as a dict, JSON-encoded values decoded."""
    with open_h5(path) as f:
        return {k: _decode_attr(v) for k, v in f.attrs.items()}


def source_label(path) -> str:
    """What made a file's showers, for legends and reports, from its own attributes: "Geant4" (a
    ``geant4_version`` attribute, or a generator naming Geant4), "simulator" (calozoo's built-in
    simulator), the model's name (showers generated by a registered model), else the file's name.
    Never a default "Geant4": a figure says what it shows."""
    attrs = file_attrs(path)
    generator = str(attrs.get("generator", ""))
    if "geant4_version" in attrs or "geant4" in generator.lower():
        return "Geant4"
    if generator.startswith("calozoo.showers.simulator"):
        return "simulator"
    if generator.startswith("calozoo:"):
        return generator[len("calozoo:"):]
    return Path(path).name


def file_readout(path) -> Readout | None:
    """The readout stored in the file's ``readout`` attribute (JSON), or None if it has none."""
    with open_h5(path) as f:
        return _attr_readout(f.attrs, path)


def _attr_readout(attrs, path) -> Readout | None:
    if "readout" not in attrs:
        return None
    try:
        return get_readout(_decode_attr(attrs["readout"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise ShowerDataError(path, f"attribute 'readout' is not a readout: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# CaloChallenge
# ---------------------------------------------------------------------------------------------
class CaloChallengeWriter:
    """Write a CaloChallenge HDF5 file in appends, atomically.

    path: the final file. Data go to a temporary file in the same directory, renamed onto ``path``
        by :meth:`close` (or a ``with`` block left without exception); if the block raises, the
        temporary file is removed and ``path`` is left untouched (never half-written).
    n_voxels: showers' width.
    attrs: file attributes (str/int/float/bool/numpy arrays; dicts and lists stored as JSON). A ``readout``
        entry (a Readout, its dict, or a readout name) is stored as the readout's JSON and must
        have ``n_voxels`` voxels. The writer adds ``format='calochallenge'`` and ``n_voxels``.
    dtype: dtype of ``showers`` (incident energies are always float64).
    chunk_rows: HDF5 chunk height of ``showers``; default: about 1 MiB per chunk.
    validate: run :func:`validate_showers` on every appended block (shapes are always checked).

    Datasets are resizable (maxshape (None, ...)), chunked and gzip-compressed with shuffle.
    """

    def __init__(self, path, n_voxels: int, attrs: Mapping | None = None, dtype=np.float32,
                 chunk_rows: int | None = None, validate: bool = True, compression_level: int = 4):
        self.path = Path(path)
        self.n_voxels = int(n_voxels)
        self.dtype = np.dtype(dtype)
        self.validate = validate
        self.readout: Readout | None = None
        self.n_rows = 0
        if chunk_rows is None:
            chunk_rows = max(1, min(1024, (1 << 20) // (self.n_voxels * self.dtype.itemsize)))
        attrs = dict(attrs or {})
        if attrs.get("readout") is not None:
            self.readout = get_readout(attrs["readout"])
            if self.readout.n_voxels != self.n_voxels:
                raise ShowerDataError(
                    self.path, f"readout {self.readout.name!r} has {self.readout.n_voxels} voxels, "
                    f"the writer {self.n_voxels}",
                )
            attrs["readout"] = self.readout
        attrs.update(format="calochallenge", n_voxels=self.n_voxels)
        encoded = {k: _encode_attr(k, v) for k, v in attrs.items()}

        # A unique name, so two writers of the same path cannot clobber each other's temporary file;
        # the same directory, so the final os.replace is an atomic rename. (Not mkstemp: its 0600
        # permissions would stick to the final file; open() creates it with the umask's.) Those of
        # this path that a killed writer of this host left are removed first.
        check_output_path(self.path)
        remove_stale(self.path.parent, self.path.name + ".*")
        self._tmp = tmp_path(self.path)
        self._f = self._io = None
        try:
            # HDF5 writes through a GuardedFile (h5py's fileobj driver), which keeps the operating
            # system's refusals (a full disk, ...) from it: when a write fails inside libhdf5 2.0, the
            # close of the dataset being written fails too, frees the dataset and leaves its
            # identifier registered, so the next close of it (at the file's close, or the dataset
            # object's finaliser at exit) is a segmentation fault. With every failure kept from
            # HDF5, every close succeeds and the writer raises the refusal itself, between HDF5 calls.
            self._io = GuardedFile(open(self._tmp, "x+b", buffering=0))
            self._f = h5py.File(self._io, "w", driver="fileobj")
            opts = dict(compression="gzip", compression_opts=compression_level, shuffle=True)
            self._e = self._f.create_dataset(INCIDENT, shape=(0, 1), maxshape=(None, 1), dtype=np.float64,
                                             chunks=(max(chunk_rows, 4096), 1), **opts)
            self._x = self._f.create_dataset(SHOWERS, shape=(0, self.n_voxels), maxshape=(None, self.n_voxels),
                                             dtype=self.dtype, chunks=(chunk_rows, self.n_voxels), **opts)
            for k, v in encoded.items():
                self._f.attrs[k] = v
            self._check_io()
        except OSError as exc:
            self._abort()
            if isinstance(exc, WriteError):
                raise
            raise ShowerDataError(self.path, f"cannot create {self._tmp.name}: {exc}") from exc
        except BaseException:
            self._abort()
            raise

    def append(self, incident_energies_mev, showers_mev) -> None:
        """Add showers: incident energies (n,) or (n, 1) MeV and showers (n, n_voxels) MeV."""
        if self._f is None:
            raise ShowerDataError(self.path, "the writer is closed (an earlier error, or close())")
        E = np.asarray(incident_energies_mev, dtype=np.float64).reshape(-1)
        X = np.asarray(showers_mev)
        if X.ndim != 2 or X.shape[1] != self.n_voxels:
            raise ShowerDataError(self.path, f"cannot append showers of shape {X.shape}: the file has "
                                  f"{self.n_voxels} voxels per shower", SHOWERS)
        if self.validate:
            validate_showers(E, X, self.path, readout=self.readout, first_row=self.n_rows)
        elif E.shape[0] != X.shape[0]:
            raise ShowerDataError(self.path, f"{X.shape[0]} showers but {E.shape[0]} incident energies", SHOWERS)
        n0, n = self.n_rows, X.shape[0]
        if n == 0:
            return
        try:
            self._e.resize(n0 + n, axis=0)
            self._x.resize(n0 + n, axis=0)
            self._e[n0:] = E[:, None]
            self._x[n0:] = X.astype(self.dtype, copy=False)
            self._check_io()
        except BaseException:
            self._abort()
            raise
        self.n_rows = n0 + n

    def __len__(self) -> int:
        return self.n_rows

    def close(self) -> None:
        """Finish the file and move it into place (atomic rename, once its data are on disk)."""
        if self._f is None:
            return
        try:
            self._drop_datasets()
            f, self._f = self._f, None
            f.close()
            self._check_io()
            self._io.sync()  # a file system that reports a full disk only at fsync (NFS, delayed allocation)
            self._check_io()
            self._io.close()
            self._io = None
            os.replace(self._tmp, self.path)
        except BaseException:
            self._abort()
            raise

    def _check_io(self) -> None:
        """Raise :class:`~showers.errors.WriteError` if the operating system refused a write."""
        if self._io is not None and self._io.error is not None:
            exc = self._io.error
            raise WriteError(self.path, exc, f"writing {self._tmp.name}; it was removed and nothing was written")

    def _drop_datasets(self) -> None:
        # the file's own objects are released before the file is closed
        self._e = self._x = None

    def _abort(self) -> None:
        """Drop the temporary file; the final path is never touched."""
        self._drop_datasets()
        f, self._f = self._f, None
        if f is not None:
            try:
                f.close()
            except Exception:  # noqa: BLE001 - already failing; removing the file matters more
                pass
        io_, self._io = self._io, None
        if io_ is not None:
            io_.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> CaloChallengeWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


def write_calochallenge(path, incident_energies_mev, showers_mev, attrs: Mapping | None = None,
                        dtype=None, validate: bool = True) -> None:
    """Write a whole CaloChallenge file at once (atomic). dtype: of ``showers``, default the array's
    own floating dtype (float32 for other types)."""
    X = np.asarray(showers_mev)
    if X.ndim != 2:
        raise ShowerDataError(path, f"showers must be 2-d (N, n_voxels), got shape {X.shape}", SHOWERS)
    if dtype is None:
        dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float32
    with CaloChallengeWriter(path, X.shape[1], attrs=attrs, dtype=dtype, validate=validate) as w:
        w.append(incident_energies_mev, X)


def iter_calochallenge(path, chunk_size: int = 10_000, readout=None, validate: bool = True, *,
                       start: int = 0, stop: int | None = None, step: int = 1
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(E, showers)`` chunks of a CaloChallenge file: E (n,) float64 MeV, showers (n, n_voxels) MeV.

    chunk_size: rows per chunk (10 000 rows of dataset 3 are 1.6 GB in float32: lower it there).
    readout: the expected readout (name, Readout, ...); default the file's ``readout`` attribute if
        it has one. The width must match it.
    validate: run :func:`validate_showers` on every chunk. Structure (datasets present, row counts
        equal, width) is checked in any case.
    start, stop, step: rows to read (``step``: every step-th row, each chunk holding ``chunk_size``
        of them; only those rows are read into memory).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    with open_h5(path) as f:
        e_ds, x_ds = _dataset(f, INCIDENT, path), _dataset(f, SHOWERS, path)
        if e_ds.ndim not in (1, 2) or (e_ds.ndim == 2 and e_ds.shape[1] != 1):
            raise ShowerDataError(path, f"shape {e_ds.shape}, expected (N, 1)", INCIDENT)
        if x_ds.ndim != 2:
            raise ShowerDataError(path, f"shape {x_ds.shape}, expected (N, n_voxels)", SHOWERS)
        if e_ds.shape[0] != x_ds.shape[0]:
            raise ShowerDataError(path, f"{x_ds.shape[0]} showers but {e_ds.shape[0]} incident energies "
                                  f"(row counts differ)", SHOWERS)
        _check_stored(e_ds, path)
        _check_stored(x_ds, path)
        if readout is None:
            readout = _attr_readout(f.attrs, path)
        if readout is not None:
            ro = get_readout(readout)
            if x_ds.shape[1] != ro.n_voxels:
                raise ShowerDataError(path, f"showers have {x_ds.shape[1]} voxels but readout {ro.name!r} "
                                      f"has {ro.n_voxels} (width does not match the readout)", SHOWERS)
            readout = ro
        n = x_ds.shape[0] if stop is None else min(int(stop), x_ds.shape[0])
        for i in range(int(start), n, chunk_size * step):
            j = min(i + chunk_size * step, n)
            E = np.asarray(_read(e_ds, np.s_[i:j:step], path), dtype=np.float64).reshape(-1)
            X = _read(x_ds, np.s_[i:j:step], path)
            if validate:
                validate_showers(E, X, path, readout=readout, first_row=i, row_step=step)
            yield E, X


def resolve_readout(readout, attrs, n_voxels: int, source) -> Readout:
    """The readout of a file: ``readout`` if given, else the file's ``readout`` attribute (JSON),
    else the one built-in readout with ``n_voxels`` voxels; ShowerDataError when none or several fit.
    """
    if readout is not None:
        readout = get_readout(readout)
    elif "readout" in attrs:
        readout = _attr_readout(attrs, source)
    else:
        fits = [name for name in list_readouts() if get_readout(name).n_voxels == n_voxels]
        if len(fits) != 1:
            which = f"several built-in readouts fit ({', '.join(fits)})" if fits else "no built-in readout fits"
            raise ShowerDataError(source, f"no 'readout' attribute and {which} {n_voxels} voxels; pass readout=")
        readout = get_readout(fits[0])
    if readout.n_voxels != n_voxels:
        raise ShowerDataError(source, f"readout {readout.name!r} has {readout.n_voxels} voxels, "
                              f"the showers {n_voxels}", dataset=SHOWERS)
    return readout


def read_strided(path, readout=None, max_showers: int = 50_000, *, data_checks: bool = True
                 ) -> tuple[np.ndarray, np.ndarray, Readout, int]:
    """(E (n,) MeV, showers (n, n_voxels) MeV, readout, N in the file) of a CaloChallenge file: at
    most ``max_showers`` rows, evenly strided through it (a file sorted by energy keeps all its
    energies), and only those rows are read. What ``calozoo show`` and ``calozoo validate`` read.

    readout: as :func:`resolve_readout` (given, else the file's attribute, else the one built-in
        readout of that width).
    data_checks: every check of :func:`validate_showers` (units, negative energies, ...); False (a
        generated file, which a poor model may fill with ten times the incident energy) checks the
        structure and refuses non-finite values only.
    """
    path = Path(path)
    if isinstance(max_showers, bool) or not isinstance(max_showers, (int, np.integer)) or max_showers < 1:
        raise ValueError(f"max_showers must be a whole number >= 1, got {max_showers!r}")
    with open_h5(path) as f:
        _dataset(f, INCIDENT, path)  # refuses a file without incident energies, by name
        x_ds = _dataset(f, SHOWERS, path)
        if x_ds.ndim != 2:
            raise ShowerDataError(path, f"shape {x_ds.shape}, expected (N, n_voxels)", SHOWERS)
        n, width = x_ds.shape
        readout = resolve_readout(readout, f.attrs, width, path)
        itemsize = x_ds.dtype.itemsize
    if n == 0:
        raise ShowerDataError(path, "no showers (N = 0)", SHOWERS)
    step = max(1, -(-n // int(max_showers)))
    check_memory(-(-n // step), width, path, max(4, itemsize))
    es, xs = [], []
    chunk = max(1, min(10_000, int(max_showers)))
    for i, (e, x) in enumerate(iter_calochallenge(path, chunk_size=chunk, readout=readout, validate=data_checks,
                                                  step=step)):
        if not data_checks and not (np.isfinite(x).all() and np.isfinite(e).all()):
            bad = np.flatnonzero(~(np.isfinite(x).all(axis=1) & np.isfinite(e)))
            raise ShowerDataError(path, f"non-finite values in {_rows(i * chunk * step, bad, step)}", SHOWERS)
        es.append(e)
        xs.append(x)
    return np.concatenate(es), np.concatenate(xs), readout, n


def read_calochallenge(path, readout=None, max_showers: int | None = None,
                       validate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The whole file (or its first ``max_showers`` rows): E (N,) MeV, showers (N, n_voxels) MeV."""
    chunks = list(iter_calochallenge(path, readout=readout, validate=validate, stop=max_showers))
    if not chunks:
        with open_h5(path) as f:
            width, dtype = f[SHOWERS].shape[1], f[SHOWERS].dtype
        return np.zeros(0), np.zeros((0, width), dtype)
    if len(chunks) == 1:
        return chunks[0]
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


# ---------------------------------------------------------------------------------------------
# Par04
# ---------------------------------------------------------------------------------------------
PAR04_SHAPE = (18, 50, 45)  # (r, phi, z) as stored in the Par04 files
_NUM = r"\d+(?:\.\d+)?"
_PAR04_NEW = re.compile(rf"^(?P<geometry>[A-Za-z0-9]+)_angle_(?P<angle>{_NUM})\.h5$")
_PAR04_OLD = re.compile(rf"^Energy_(?P<energy>{_NUM})_Angle_(?P<angle>{_NUM})\.hdf5?$")
PAR04_GEOMETRIES = ("SiW", "SciPb")


def _par04_layout(path: Path) -> tuple[str, dict]:
    m = _PAR04_NEW.match(path.name)
    if m:
        return "new", {"geometry": m["geometry"], "angle": float(m["angle"])}
    m = _PAR04_OLD.match(path.name)
    if m:
        geometry = path.parent.name if path.parent.name in PAR04_GEOMETRIES else "unknown"
        return "old", {"geometry": geometry, "angle": float(m["angle"]), "energy": float(m["energy"])}
    raise ShowerDataError(
        path, "file name does not parse as Par04 data: expected '{geometry}_angle_{A}.h5' "
        "(e.g. SiW_angle_70.h5) or 'Energy_{E}_Angle_{A}.hdf5'",
    )


def _num(text: str) -> str:
    """'64.0' -> '64', 1.5 -> '1.5': how Par04 spells energies and angles."""
    v = float(text)
    return str(int(v)) if v.is_integer() else repr(v)


def _natural_key(name: str):
    m = re.search(r"(\d+)$", name)
    return (name[: m.start()] if m else name, int(m.group(1)) if m else -1)


def _par04_to_calochallenge(block: np.ndarray, source, dataset: str) -> np.ndarray:
    """(n, 18, 50, 45) or (n, 40500) in (r, phi, z) -> (n, 40500) in (z, phi, r)."""
    try:
        block = block.reshape(-1, *PAR04_SHAPE)
    except ValueError as exc:
        raise ShowerDataError(source, f"shape {block.shape} is not (N, 18, 50, 45) = (N, r, phi, z)", dataset) from exc
    # Par04 keeps (r, phi, z); CaloChallenge order is layer (z) outermost, then alpha (phi), then r.
    # Phi bin k is alpha bin k: only the origin of the angle differs, which nothing downstream uses.
    return np.ascontiguousarray(block.transpose(0, 3, 2, 1)).reshape(block.shape[0], -1)


def iter_par04(path, chunk_size: int = 1000, validate: bool = True
               ) -> Iterator[tuple[np.ndarray, np.ndarray, str, np.ndarray]]:
    """Yield ``(E, angle, geometry, showers)`` chunks of a Par04 file (either layout, see module doc).

    E: (n,) primary energy in MeV (from the dataset key or file name, in GeV, x 1000).
    angle: (n,) incidence angle in degrees (from the file name).
    geometry: ``"SiW"``, ``"SciPb"``, ... (from the file name; old layout: the parent directory,
        ``"unknown"`` if that is not a known geometry).
    showers: (n, 40500) MeV in CaloChallenge order (z, phi, r), i.e. the ``par04`` readout.
    A chunk never mixes two energies.
    """
    path = Path(path)
    layout, info = _par04_layout(path)
    readout = get_readout("par04")
    with open_h5(path) as f:
        if layout == "new":
            blocks = []
            for key in f.keys():
                try:
                    energy = float(key)
                except ValueError as exc:
                    raise ShowerDataError(path, "dataset name is not an energy in GeV", key) from exc
                blocks.append((energy, key))
            if not blocks:
                raise ShowerDataError(path, "no energy datasets ('1', '2', ... '1024') in the file")
            for energy, key in sorted(blocks):
                ds = _dataset(f, key, path)
                if ds.shape[1:] not in (PAR04_SHAPE, (int(np.prod(PAR04_SHAPE)),)):
                    raise ShowerDataError(path, f"shape {ds.shape} is not (N, 18, 50, 45) = (N, r, phi, z)", key)
                for i in range(0, ds.shape[0], chunk_size):
                    X = _par04_to_calochallenge(_read(ds, np.s_[i:i + chunk_size], path), path, key)
                    yield from _par04_chunk(X, energy, info, path, key, i, readout, validate)
        else:
            energy, angle = info["energy"], info["angle"]
            group_name = f"Grp_Angle_{_num(angle)}_E_{_num(energy)}"
            if group_name not in f or not isinstance(f[group_name], h5py.Group):
                raise ShowerDataError(path, f"group {group_name!r} is missing; the file has {sorted(f.keys())}",
                                      group_name)
            group = f[group_name]
            keys = sorted(group.keys(), key=_natural_key)
            buf, n_buf, row = [], 0, 0
            for k in keys:
                name = f"{group_name}/{k}"
                block = _par04_to_calochallenge(np.asarray(_read(_dataset(group, k, path), (), path)), path, name)
                buf.append(block)
                n_buf += block.shape[0]
                if n_buf >= chunk_size:
                    X = np.concatenate(buf)
                    yield from _par04_chunk(X, energy, info, path, group_name, row, readout, validate)
                    row += X.shape[0]
                    buf, n_buf = [], 0
            if buf:
                yield from _par04_chunk(np.concatenate(buf), energy, info, path, group_name, row, readout, validate)


def _par04_chunk(X, energy_gev, info, path, dataset, first_row, readout, validate):
    n = X.shape[0]
    E = np.full(n, energy_gev * 1000.0)
    if validate:
        validate_showers(E, X, path, dataset=dataset, readout=readout, energy_dataset=f"{dataset} (name)",
                         first_row=first_row)
    yield E, np.full(n, info["angle"]), info["geometry"], X


def write_par04(path, showers_by_energy: Mapping[float, np.ndarray]) -> None:
    """Write Par04 data (MeV, each array (N, 18, 50, 45) in (r, phi, z)), in the layout the file name says.

    ``{geometry}_angle_{A}.h5``: one dataset per energy, named by the energy in GeV.
    ``Energy_{E}_Angle_{A}.hdf5``: exactly one energy, equal to E; the group ``Grp_Angle_{A}_E_{E}``
    with one dataset ``event_{i}`` per shower.
    """
    path = Path(path)
    layout, info = _par04_layout(path)
    arrays = {}
    for energy, arr in showers_by_energy.items():
        arr = np.asarray(arr)
        if arr.shape[1:] != PAR04_SHAPE:
            raise ShowerDataError(path, f"shape {arr.shape} is not (N, 18, 50, 45) = (N, r, phi, z)", _num(energy))
        arrays[_num(energy)] = arr
    with h5py.File(path, "w") as f:
        if layout == "new":
            for key, arr in arrays.items():
                f.create_dataset(key, data=arr, compression="gzip", chunks=(1, *PAR04_SHAPE))
        else:
            if list(arrays) != [_num(info["energy"])]:
                raise ShowerDataError(path, f"an Energy_{{E}}_Angle_{{A}} file holds one energy, "
                                      f"{_num(info['energy'])} GeV; got {list(arrays)}")
            g = f.create_group(f"Grp_Angle_{_num(info['angle'])}_E_{_num(info['energy'])}")
            for i, shower in enumerate(next(iter(arrays.values()))):
                g.create_dataset(f"event_{i}", data=shower, compression="gzip")


# ---------------------------------------------------------------------------------------------
# EDM4hep
# ---------------------------------------------------------------------------------------------
GEV_TO_MEV = 1000.0
_MC = "MCParticles"
_MC_FIELDS = ("PDG", "generatorStatus", "mass", "momentum.x", "momentum.y", "momentum.z",
              "vertex.x", "vertex.y", "vertex.z")


def _open_events(path, tree: str = "events"):
    import uproot

    try:
        f = uproot.open(path)
    except FileNotFoundError as exc:
        raise ShowerDataError(path, "file does not exist") from exc
    except Exception as exc:  # noqa: BLE001 - uproot raises ValueError/OSError/... on non-ROOT input
        raise ShowerDataError(path, f"not a readable ROOT file: {exc}") from exc
    try:
        return f[tree]
    except Exception as exc:  # noqa: BLE001 - uproot.KeyInFileError and friends
        raise ShowerDataError(path, f"no TTree {tree!r} (not an EDM4hep file?): {exc}", tree) from exc


def _hit_collections(tree) -> list[str]:
    """Names of the SimCalorimeterHit-like collections: those with ``.energy`` and ``.position.x``
    (CaloHitContribution collections have ``.stepPosition`` instead, so they drop out)."""
    tails = [k.rsplit("/", 1)[-1] for k in tree.keys()]
    present = set(tails)
    return [t[: -len(".energy")] for t in tails
            if t.endswith(".energy") and t[: -len(".energy")] + ".position.x" in present]


def iter_edm4hep_events(path, collections=None, entry_start: int = 0, entry_stop: int | None = None,
                        step_size: int = 100, tree: str = "events") -> Iterator[dict]:
    """Yield one dict per event (entry) of an EDM4hep file; see :func:`read_edm4hep_hits` for the keys."""
    import awkward as ak

    t = _open_events(path, tree)
    available = _hit_collections(t)
    if collections is None:
        if not available:
            branches = sorted({k.rsplit("/", 1)[-1].split(".", 1)[0] for k in t.keys()})
            raise ShowerDataError(path, "no calorimeter hit collection (SimCalorimeterHit: '<name>.energy' and "
                                  f"'<name>.position.x') in the tree; it has {branches[:12]}", tree)
        collections = available
    else:
        collections = [collections] if isinstance(collections, str) else list(collections)
        if not collections:
            raise ShowerDataError(path, f"no hit collection asked for; the file has {available}", tree)
        missing = [c for c in collections if c not in available]
        if missing:
            raise ShowerDataError(path, f"no calorimeter hit collection {missing}; the file has {available}",
                                  ",".join(missing))
    fields = ("energy", "position.x", "position.y", "position.z")
    branches = [f"{c}.{x}" for c in collections for x in fields]
    tails = {k.rsplit("/", 1)[-1] for k in t.keys()}
    has_mc = all(f"{_MC}.{x}" in tails for x in _MC_FIELDS)
    if has_mc:
        branches += [f"{_MC}.{x}" for x in _MC_FIELDS]
    n_entries = t.num_entries
    stop = n_entries if entry_stop is None else min(int(entry_stop), n_entries)
    if not 0 <= entry_start < n_entries:
        raise ShowerDataError(path, f"entry {entry_start} out of range: the tree has {n_entries} entries", tree)
    try:
        chunks = t.iterate(branches, entry_start=entry_start, entry_stop=stop, step_size=step_size, library="ak")
        entry = entry_start
        for arrays in chunks:
            for i in range(len(arrays)):
                ev = arrays[i]
                yield _edm4hep_event(ev, collections, has_mc, entry, ak)
                entry += 1
    except ShowerDataError:
        raise
    except Exception as exc:  # noqa: BLE001 - decompression or deserialisation errors of a bad file
        raise ShowerDataError(path, f"cannot read entries: {exc}", tree) from exc


def _edm4hep_event(ev, collections, has_mc, entry, ak) -> dict:
    def col(name):
        return np.asarray(ak.to_numpy(ev[name]), dtype=np.float64)

    parts = {k: [] for k in ("x", "y", "z", "energy")}
    names = []
    for c in collections:
        e = col(f"{c}.energy") * GEV_TO_MEV  # float64 first, so sums over hits are exact to 1e-15
        parts["energy"].append(e)
        for axis in "xyz":
            parts[axis].append(col(f"{c}.position.{axis}"))
        names.append(np.full(e.shape[0], c))
    out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    out["collection"] = np.concatenate(names) if names else np.zeros(0, dtype=str)
    out["entry"] = entry
    out["primary"] = None
    if has_mc:
        status = np.asarray(ak.to_numpy(ev[f"{_MC}.generatorStatus"]))
        idx = np.flatnonzero(status == 1)
        if idx.size:
            i = int(idx[0])
            p = np.array([float(ev[f"{_MC}.momentum.{a}"][i]) for a in "xyz"]) * GEV_TO_MEV
            mass = float(ev[f"{_MC}.mass"][i]) * GEV_TO_MEV
            pnorm = float(np.linalg.norm(p))
            energy = float(np.hypot(pnorm, mass))
            out["primary"] = {
                "pdg": int(ev[f"{_MC}.PDG"][i]),
                "energy": energy,
                "kinetic_energy": energy - mass,
                "momentum": p,
                "direction": p / pnorm if pnorm > 0 else np.full(3, np.nan),
                "vertex": np.array([float(ev[f"{_MC}.vertex.{a}"][i]) for a in "xyz"]),
                "mass": mass,
                "n_primaries": int(idx.size),
            }
    return out


def read_edm4hep_hits(path, collections=None, entry: int = 0, tree: str = "events") -> dict:
    """Calorimeter hits and primary particle of one event of an EDM4hep ROOT file.

    collections: hit collections to read (e.g. ``["ECalBarrelSiHitsEven", "ECalBarrelSiHitsOdd"]``);
        default every SimCalorimeterHit-like collection (one with ``.energy`` and ``.position.x``).
    Returns a dict:
        x, y, z: (n_hits,) float64 hit positions in mm;
        energy: (n_hits,) float64 hit energies in MeV (EDM4hep stores GeV);
        collection: (n_hits,) str, the collection of each hit;
        entry: the entry number;
        primary: the first MCParticle with generatorStatus == 1, or None if there is none: a dict with
            pdg (int), energy (total, MeV), kinetic_energy (MeV), momentum (3,) MeV, direction (3,)
            unit vector, vertex (3,) mm, mass (MeV), n_primaries (how many had generatorStatus 1).
    """
    for event in iter_edm4hep_events(path, collections, entry_start=entry, entry_stop=entry + 1, tree=tree):
        return event
    raise ShowerDataError(path, f"entry {entry} not found", tree)
