"""Pulling registered models for inference: ONNX only, never pickles.

``pull("NAME@champion")`` (an alias), ``pull("NAME@3")`` or ``pull("NAME/3")`` (a version), or
``pull("NAME")`` (the champion) returns a :class:`ShowerGenerator` backed by an ONNX Runtime session
(CUDA provider when available, else CPU). Pulled files are cached in ``$CALOZOO_CACHE`` (default
``~/.cache/calozoo/models``) under the name and version, with their SHA-256 and the artifact they
came from: a pull that resolves an alias online pulls the version again when its registry entry now
points to another artifact (a store recreated at the same place, or another store with the same
names); an alias seen once is remembered, so a second pull needs no server (offline: the
remembered version; online: the alias is resolved again, which moves with the champion).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from registry.tracking import fluent_uri, get_client, quick_http, tracking_uri
from showers.readout import Readout
from showers.transforms import ConditionSpec, encode_conditions

__all__ = ["RegistryError", "ShowerGenerator", "cache_dir", "check_name", "list_models", "parse_ref", "pull",
           "registered_name", "session_options"]

log = logging.getLogger("calozoo.registry")


class RegistryError(LookupError):
    """A registered model, version, alias or artifact that cannot be had; the message says what exists."""


def registered_name(campaign: str, region: str) -> str:
    """``{campaign}.{region}``, with anything but letters, digits, ``_`` and ``-`` made ``-``: the name
    ``registry.publish`` registers every family's models for a region under (the family is a tag of
    each version). Stores of the former naming hold ``{campaign}.{family}.{region}``; they are read as
    they are (:func:`pull`, :func:`list_models`)."""
    def clean(s):
        return re.sub(r"[^A-Za-z0-9_\-]+", "-", str(s)).strip("-") or "none"

    return ".".join(clean(s) for s in (campaign, region))


def cache_dir() -> Path:
    return Path(os.environ.get("CALOZOO_CACHE") or Path.home() / ".cache" / "calozoo" / "models")


#: the longest registered model name accepted (MLflow's SQL stores keep names in 256 characters)
MAX_NAME = 256


#: what a registered name is made of (``registered_name``'s parts joined by dots)
_NAME = re.compile(r"[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*")


def check_name(name: str) -> str:
    """``name`` if it can be a registered model's name, else RegistryError "invalid model name ...".

    A name is letters, digits, ``_`` and ``-`` in dot-separated parts (``CAMPAIGN.FAMILY.REGION``, what
    ``registered_name`` makes), at most MAX_NAME characters; anything else is refused by name, before
    the cache or the registry is asked: a name with a space or a colon is not a near miss to be served
    from a registered model's cache folder, and ``.``, ``..`` or a path separator would map outside
    the cache."""
    shown = name if len(name) <= 60 else f"{name[:40]}... ({len(name)} characters)"
    if not name or name in (".", "..") or set(name) <= {"."}:
        why = "a model name cannot be empty or only dots ('.', '..')"
    elif len(name) > MAX_NAME:
        why = f"at most {MAX_NAME} characters"
    elif any(ord(c) < 32 or c in "/\\\x7f" for c in name):
        why = "no control characters, '/' or '\\'"
    elif not _NAME.fullmatch(name):
        bad = sorted({c for c in name if not (c.isascii() and (c.isalnum() or c in "_-."))})
        why = (f"only letters, digits, '_' and '-' in dot-separated parts, not {' '.join(map(repr, bad))}" if bad
               else "only letters, digits, '_' and '-' in dot-separated parts (no empty part)")
    else:
        return name
    raise RegistryError(f"invalid model name {shown!r}: {why} (registered names are CAMPAIGN.REGION)")


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """``NAME@alias`` / ``NAME@3`` / ``NAME/3`` / ``NAME`` → (name, alias, version); the name is
    checked (:func:`check_name`) before anything touches the cache or the network."""
    ref = ref.strip()
    if ref.startswith("models:/"):
        ref = ref[len("models:/"):]
    m = re.fullmatch(r"(.+?)(?:@([A-Za-z_][\w\-]*|v?\d+)|/(\d+))?", ref, flags=re.DOTALL)
    if not m or not m.group(1):
        raise RegistryError(f"cannot read model reference {ref!r}: expected NAME, NAME@ALIAS or NAME@VERSION")
    name, at, slash = m.groups()
    check_name(name)
    if slash:
        return name, None, slash
    if at and re.fullmatch(r"v?\d+", at):
        return name, None, at.lstrip("v")
    return name, at or "champion", None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _known_models(client) -> str:
    try:
        names = sorted(m.name for m in client.search_registered_models(max_results=200))
    except Exception:
        return "(could not list them)"
    if not names:
        return "none (the registry is empty)"
    return ", ".join(names[:30]) + (f" ... ({len(names)} in all)" if len(names) > 30 else "")


def _renamed(client, name: str) -> str:
    """For a name of the former naming (CAMPAIGN.FAMILY.REGION) whose region is registered under
    CAMPAIGN.REGION: where to find it now."""
    parts = name.split(".")
    if len(parts) != 3:
        return ""
    new = f"{parts[0]}.{parts[2]}"
    try:
        client.get_registered_model(new)
    except Exception:  # noqa: BLE001 - no such model either: nothing to add
        return ""
    return (f" (models are registered per region now, every family's versions under one name: {new}@champion is "
            f"the region's best; the {parts[1]} versions carry the tag family={parts[1]})")


def _resolve(client, name: str, alias: str | None, version: str | None) -> str:
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
            raise RegistryError(f"no registered model {name!r}{_renamed(client, name)}; registered models: "
                                f"{_known_models(client)}") from None
        raise
    if alias is not None:
        aliases = dict(getattr(model, "aliases", {}) or {})
        if alias not in aliases:
            known = ", ".join(f"@{a} (v{v})" for a, v in sorted(aliases.items())) or "none"
            versions = sorted((int(v.version) for v in client.search_model_versions(f"name = '{name}'")))
            raise RegistryError(f"{name} has no alias @{alias}; its aliases: {known}; versions: "
                                f"{', '.join(map(str, versions)) or 'none'}")
        return str(aliases[alias])
    try:
        client.get_model_version(name, version)
    except MlflowException:
        versions = sorted((int(v.version) for v in client.search_model_versions(f"name = '{name}'")))
        raise RegistryError(f"{name} has no version {version}; versions: {', '.join(map(str, versions)) or 'none'}") \
            from None
    return str(version)


def _download(client, name: str, version: str, dest: Path) -> Path:
    """Fetch version ``version``'s ONNX file into ``dest`` (atomically); return the .onnx path."""
    import mlflow.artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mv = client.get_model_version(name, version)
    tmp = Path(tempfile.mkdtemp(prefix=".pull-", dir=dest.parent))
    try:
        try:
            with fluent_uri(client.tracking_uri):  # models:/ URIs are resolved by the registry URI
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                                 dst_path=str(tmp), tracking_uri=client.tracking_uri))
        except Exception as exc:
            raise RegistryError(f"{name} v{version}: its artifact ({mv.source}) is missing or unreadable: "
                                f"{_first_line(exc)}") from None
        files = sorted(local.rglob("*.onnx"))
        if not files:
            raise RegistryError(f"{name} v{version}: its artifact ({mv.source}) is missing or unreadable: "
                                "no .onnx file in it")
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        onnx_file = dest / "model.onnx"
        shutil.move(str(files[0]), onnx_file)
        (dest / "meta.json").write_text(json.dumps({"name": name, "version": version, "source": mv.source,
                                                    "sha256": _sha256(onnx_file)}, indent=1))
        return onnx_file
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached(dest: Path, source: str | None = None, name: str | None = None) -> Path | None:
    """The cached ONNX file of ``dest`` if it is intact and holds the model ``name`` (and, given
    ``source``, was pulled from that artifact: a store recreated at the same URI, e.g. a rerun demo,
    reuses names and versions)."""
    meta, onnx_file = dest / "meta.json", dest / "model.onnx"
    if not (meta.exists() and onnx_file.exists()):
        return None
    info = json.loads(meta.read_text())
    if name is not None and info.get("name") != name:  # one folder, one name (a case-insensitive disk...)
        log.warning("%s holds %r, not %r: not served for it", dest, info.get("name"), name)
        return None
    if info.get("sha256") != _sha256(onnx_file):
        log.warning("%s: cached model does not match its checksum; pulling it again", onnx_file)
        return None
    if source is not None and info.get("source") != source:
        log.info("%s: the registry's version now points to %s; pulling it again", onnx_file, source)
        return None
    return onnx_file


def _cache_root(name: str) -> Path:
    """The cache folder of a model name: the name itself (so two names never share a folder), always
    a folder directly inside :func:`cache_dir`."""
    base = cache_dir()
    root = base / check_name(name)
    if root.name in ("", ".", "..") or root.resolve().parent != base.resolve():
        raise RegistryError(f"invalid model name {name!r}: it maps outside the model cache {base}")
    return root


def pull(ref: str, *, uri: str | None = None, offline: bool = False, providers=None) -> ShowerGenerator:
    """A :class:`ShowerGenerator` for a registered model (see the module docstring)."""
    name, alias, version = parse_ref(ref)
    root = _cache_root(name)
    aliases_file = root / "aliases.json"
    remembered = json.loads(aliases_file.read_text()) if aliases_file.exists() else {}
    client = None
    if version is not None and _cached(root / f"v{version}", name=name) is not None:
        pass  # a pinned version is immutable: the cache is enough
    elif offline:
        if alias is not None:
            if alias not in remembered:
                raise RegistryError(f"offline and @{alias} of {name} was never pulled here "
                                    f"(cache: {root}); pull it once online")
            version = remembered[alias]
    else:
        client = get_client(uri)
        try:
            with quick_http(retries=0, timeout=5):
                version = _resolve(client, name, alias, version)
        except RegistryError:
            raise
        except Exception as exc:
            fallback = remembered.get(alias) if alias else version
            if fallback is None or _cached(root / f"v{fallback}", name=name) is None:
                raise RegistryError(f"cannot reach the registry at {tracking_uri(uri)} ({_first_line(exc)}) and "
                                    f"{ref} is not in the cache {root}") from None
            log.warning("registry at %s unreachable (%s): using the cached %s v%s", tracking_uri(uri),
                        _first_line(exc), name, fallback)
            version, client = fallback, None
        if alias is not None and client is not None:
            root.mkdir(parents=True, exist_ok=True)
            remembered[alias] = version
            tmp = aliases_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(remembered, indent=1))
            os.replace(tmp, aliases_file)
    dest = root / f"v{version}"
    source = None
    if client is not None:
        try:
            with quick_http(retries=0, timeout=5):
                source = client.get_model_version(name, version).source
        except Exception:  # noqa: BLE001 - the cached copy (if any) is still checked by its checksum
            source = None
    onnx_file = _cached(dest, source, name)
    if onnx_file is None:
        if client is None:
            raise RegistryError(f"{name} v{version} is not in the cache {root} and the registry is not reachable")
        root.mkdir(parents=True, exist_ok=True)
        with quick_http(retries=1, timeout=60):
            onnx_file = _download(client, name, version, dest)
    return ShowerGenerator(onnx_file, name=name, version=str(version), providers=providers)


def list_models(pattern: str | None = None, *, uri: str | None = None, timeout: float = 10.0) -> list[dict]:
    """The registered models (names containing ``pattern``), sorted by name: [{"name", "versions", "champion"
    (its version or None), "family" and "model" (the champion's), "metric" and "value" (what it won on:
    ``val_criterion``, or ``val_chi2_sum`` for a champion registered before the criterion), "families" (of
    all versions), "legacy" (a name of the former CAMPAIGN.FAMILY.REGION naming)}]. A dead, refusing or
    hanging server gives a RegistryError naming the tracking URI within about ``timeout`` seconds per
    request, not a traceback or a wait of minutes."""
    client = get_client(uri)
    try:
        with quick_http(retries=0, timeout=timeout):
            found = client.search_registered_models(max_results=1000)
            rows = []
            for m in sorted(found, key=lambda m: m.name):
                if pattern and pattern not in m.name:
                    continue
                versions = client.search_model_versions(f"name = '{m.name}'")
                champ = dict(getattr(m, "aliases", {}) or {}).get("champion")
                tags = next((v.tags for v in versions if str(v.version) == str(champ)), {})
                metric = next((k for k in ("val_criterion", "val_chi2_sum") if k in tags), None)
                legacy = len(m.name.split(".")) == 3
                family = tags.get("family") or (m.name.split(".")[1] if legacy and champ else None)
                rows.append({"name": m.name, "versions": len(versions), "champion": champ, "family": family,
                             "model": tags.get("model"), "metric": metric and metric[len("val_"):],
                             "value": None if metric is None else float(tags[metric]),
                             "families": sorted({v.tags.get("family") for v in versions if v.tags.get("family")}),
                             "legacy": legacy})
    except Exception as exc:  # noqa: BLE001 - connection refused, timeout, HTTP errors, a broken store
        raise RegistryError(f"cannot list the registered models at {tracking_uri(uri)}: {_first_line(exc)}") from None
    return rows


def session_options(threads: int | None = None):
    """ONNX Runtime session options for generation (the benchmark uses the same): all graph
    optimisations (constant folding, Conv/Gemm + activation fusions and, on x86, the blocked NCHWc
    layout for convolutions), sequential execution (the graphs are one chain: an inter-op pool only
    adds threads that compete with the intra-op ones), ``threads`` intra-op threads (None: ORT's
    default, one per physical core)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    return opts


class ShowerGenerator:
    """Generate showers with an exported calozoo model (an ONNX file with calozoo metadata).

    Energies here are MeV, in and out (``energy_mev``; the ``calozoo`` command takes GeV).

    Attributes: ``name``, ``version``, ``metadata`` (decoded metadata_props), ``readout``,
    ``n_voxels``, ``noise_dim``, ``condition_spec``, ``trained_range``.
    """

    def __init__(self, path, *, name: str = "", version: str = "", providers=None):
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        try:
            proto = onnx.load(str(self.path), load_external_data=False)
            opts = session_options()
            if providers is None:
                available = ort.get_available_providers()
                providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as exc:
            raise RegistryError(f"{self.path}: not a readable ONNX model ({_first_line(exc)}); delete it to pull "
                                "it again") from None
        meta = {}
        for p in proto.metadata_props:
            try:
                meta[p.key] = json.loads(p.value)
            except json.JSONDecodeError:
                meta[p.key] = p.value
        missing = {"noise_dim", "n_voxels", "conditions", "readout"} - set(meta)
        if missing:
            raise RegistryError(f"{self.path}: not a calozoo model (metadata lacks {sorted(missing)})")
        self.metadata = meta
        self.name = name or meta.get("registered_name", self.path.stem)
        self.version = version
        self.readout = Readout.from_dict(meta["readout"])
        self.n_voxels, self.noise_dim = int(meta["n_voxels"]), int(meta["noise_dim"])
        self.condition_spec = ConditionSpec.from_dict(meta["conditions"])
        self.trained_range = meta.get("trained_range", {})
        self.providers = self.session.get_providers()

    def __repr__(self) -> str:
        lo, hi = self.trained_range.get("energy_mev", (float("nan"), float("nan")))
        return (f"ShowerGenerator({self.name!r} v{self.version}, {self.metadata.get('model')}, {self.n_voxels} voxels, "
                f"trained {lo / 1e3:g}-{hi / 1e3:g} GeV, {self.providers[0]})")

    def _check_range(self, values: np.ndarray, key: str, unit: str, scale: float, allow: bool) -> None:
        if key not in self.trained_range or allow:
            return
        lo, hi = self.trained_range[key]
        tol = 1e-6 * max(abs(lo), abs(hi), 1.0)
        bad = (values < lo - tol) | (values > hi + tol)
        if bad.any():
            raise ValueError(f"{self.name} v{self.version}: {key.split('_')[0]} {values[bad].min() / scale:g}-"
                             f"{values[bad].max() / scale:g} {unit} outside the trained range {lo / scale:g}-"
                             f"{hi / scale:g} {unit}; pass allow_extrapolation=True (--allow-extrapolation) to "
                             "extrapolate")

    def encode(self, energy_mev, angle_deg=None, geometry=None, allow_extrapolation: bool = False) -> np.ndarray:
        """Encoded conditions (N, n_cond) float32, refusing conditions outside the trained range."""
        spec = self.condition_spec
        energy = np.asarray(energy_mev, dtype=np.float64).ravel()
        if energy.size == 0 or not np.all(np.isfinite(energy)) or not np.all(energy > 0):
            raise ValueError("incident energies must be finite and > 0 MeV")
        self._check_range(energy, "energy_mev", "GeV", 1e3, allow_extrapolation)
        if angle_deg is not None and not spec.use_angle:
            raise ValueError(f"{self.name} v{self.version} is not conditioned on the angle: drop the angle "
                             f"(--angle {angle_deg}); the showers would not depend on it")
        if geometry is not None and not spec.geometries:
            raise ValueError(f"{self.name} v{self.version} is not conditioned on the geometry: drop the geometry "
                             f"(--geometry {geometry}); the showers would not depend on it")
        if spec.use_angle:
            if angle_deg is None:
                lo, hi = self.trained_range.get("angle_deg", (None, None))
                if lo is None or lo != hi:
                    raise ValueError(f"{self.name} is conditioned on the angle: give angle_deg")
                angle_deg = lo
            angle = np.broadcast_to(np.asarray(angle_deg, dtype=np.float64).ravel(), energy.shape).copy()
            self._check_range(angle, "angle_deg", "deg", 1.0, allow_extrapolation)
        else:
            angle = None
        if spec.geometries:
            if geometry is None:
                if len(spec.geometries) != 1:
                    raise ValueError(f"{self.name} is conditioned on the geometry: give one of {list(spec.geometries)}")
                geometry = spec.geometries[0]
            geometry = [geometry] * energy.size if isinstance(geometry, str) else list(geometry)
            unknown = sorted(set(geometry) - set(spec.geometries))
            if unknown:
                raise ValueError(f"{self.name}: unknown geometry {unknown}; known: {list(spec.geometries)}")
        else:
            geometry = None
        return np.asarray(encode_conditions(energy, angle, geometry, spec=spec), dtype=np.float32)

    def generate(self, energy_mev, angle_deg=None, geometry=None, *, seed: int | None = 0, noise=None,
                 batch_size: int = 10_000, allow_extrapolation: bool = False, progress: bool = False) -> np.ndarray:
        """Showers (N, n_voxels) float32 in MeV per voxel (the model's readout, CaloChallenge order)
        for incident energies ``energy_mev`` (N,) MeV (and angles, geometries when the model has them).

        seed: the noise is drawn from ``numpy.random.default_rng(seed)`` (the same showers for the
        same seed, whatever the batch size); or give ``noise`` (N, noise_dim) yourself.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch size must be a whole number >= 1, got {batch_size!r}")
        cond = self.encode(energy_mev, angle_deg, geometry, allow_extrapolation)
        n = len(cond)
        if noise is not None:
            noise = np.asarray(noise, dtype=np.float32)
            if noise.shape != (n, self.noise_dim):
                raise ValueError(f"noise must have shape {(n, self.noise_dim)}, got {noise.shape}")
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.n_voxels), dtype=np.float32)
        from tqdm.auto import tqdm

        for start in tqdm(range(0, n, batch_size), desc=self.name, unit="batch", disable=not progress):
            stop = min(start + batch_size, n)
            z = noise[start:stop] if noise is not None else rng.standard_normal((stop - start, self.noise_dim),
                                                                                dtype=np.float32)
            out[start:stop] = self.session.run(["showers"], {"noise": z, "conditions": cond[start:stop]})[0]
        return out
