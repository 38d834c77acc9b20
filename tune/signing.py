"""Signed sweep folders: a sweep resumes only the pickles that this user's calozoo wrote.

Resuming a sweep hands its ``tune/`` folder to Ray Tune's ``Tuner.restore``, which unpickles
``tuner.pkl``, the experiment state (JSON with pickles inside), the searcher's state and any trial's
``error.pkl``; unpickling runs whatever code the pickle names. Owning the folder is not enough (a
sweep folder copied from a colleague, a shared disk or an archive is yours once copied), so every
pickle a sweep writes is signed, and a folder is resumed only if each of them carries a valid
signature.

The mechanism: HMAC-SHA256 (Python's ``hmac``) with a secret key of this user, 32 random bytes
created on first use in ``$CALOZOO_CONFIG_DIR`` (else ``$XDG_CONFIG_HOME/calozoo``, else
``~/.config/calozoo``) as ``sweep-signing.key``, mode 600 in a folder of mode 700, and refused if
anyone else could read or replace it. The tags, one per file over its path in the folder and its
bytes, are kept in ``OUT/signatures.json`` (outside ``tune/``, which Ray reads). Why this and not
something else:

- a keyed MAC, because the signer and the verifier are the same user: only someone who can read the
  key can make a tag, and a forged or edited pickle, a file renamed onto another's name, or a folder
  signed with another user's key fails; public-key signatures would add a dependency and key
  management for no gain here;
- the standard library only (``hmac``, ``hashlib``, ``secrets``), checked with
  ``hmac.compare_digest``;
- signing Ray's files as they are, rather than replacing Tune's resume with one that reads no pickle:
  Tune's restore (trial states, the searcher, ASHA's rungs) is not ours to rewrite.

A sweep signs while it runs (:class:`Signer`: a thread that signs each pickle Ray writes or
rewrites, within half a second, and once more when the sweep ends, also after Ctrl-C). A driver killed
(SIGKILL, a power cut) in the instant between Ray writing its state and the signer seeing it leaves
a folder that is refused: it is then started afresh from its ``sweep.json``
(``calozoo tune --from OUT/sweep.json``), which is plain JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import threading
from pathlib import Path

__all__ = ["KEY_FILE", "SIGNATURES", "Signer", "config_dir", "key_path", "pickle_files", "sign_folder",
           "unsigned_pickles"]

KEY_FILE = "sweep-signing.key"
#: the tags of a sweep folder's pickles, beside its ``tune/`` folder
SIGNATURES = "signatures.json"
_DOMAIN = b"calozoo sweep pickle v1\0"
#: tags kept per file: the newest, and a few before it (Ray copies its state into tune/ while a
#: signer may be reading it; a file whole in either version verifies)
_KEEP = 4


def config_dir() -> Path:
    """calozoo's configuration folder: ``$CALOZOO_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/calozoo``, else
    ``~/.config/calozoo``."""
    if os.environ.get("CALOZOO_CONFIG_DIR"):
        return Path(os.environ["CALOZOO_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "calozoo"


def key_path() -> Path:
    return config_dir() / KEY_FILE


def _check_private(path: Path, st) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path}: the sweep signing key is not a regular file (a symbolic link?); remove it and "
                         "a new key is made on the next sweep")
    if st.st_uid != os.geteuid():
        raise ValueError(f"{path}: the sweep signing key is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})")
    if st.st_mode & 0o077:
        raise ValueError(f"{path}: the sweep signing key can be read or written by others (mode "
                         f"{stat.filemode(st.st_mode)}): `chmod 600 {path}`, and treat the sweeps it signed as "
                         "untrusted")


def _load_key(create: bool) -> bytes | None:
    """This user's key (made on first use when ``create``); None when there is none and not ``create``."""
    path = key_path()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:  # another sweep made it first: use that one
            return _load_key(create=False)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        st = os.lstat(path)
    _check_private(path, st)
    key = path.read_bytes()
    if len(key) < 32:
        raise ValueError(f"{path}: the sweep signing key is {len(key)} bytes, not 32 (damaged?): remove it, and "
                         "start the sweeps it signed afresh")
    return key


def _tag(key: bytes, rel: str, path: Path) -> str:
    mac = hmac.new(key, _DOMAIN + rel.encode() + b"\0", hashlib.sha256)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            mac.update(block)
    return mac.hexdigest()


def pickle_files(tune_dir: Path) -> list[str]:
    """The files of a Tune experiment folder that Ray may unpickle on a restore, relative to it: every
    ``*.pkl`` at any depth and every ``*.json`` at the top (the experiment and searcher states; Ray
    copies these top-level files to its staging folder and reads them by pattern)."""
    found = []
    for root, dirs, files in os.walk(tune_dir):
        dirs.sort()
        top = Path(root) == tune_dir
        for name in sorted(files):
            if name.endswith(".pkl") or (top and name.endswith(".json")):
                found.append(str((Path(root) / name).relative_to(tune_dir)))
    return found


def _read_signatures(out: Path) -> dict:
    path = out / SIGNATURES
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}
    files = saved.get("files") if isinstance(saved, dict) else None
    return {k: [t for t in v if isinstance(t, str)] for k, v in files.items()
            if isinstance(k, str) and isinstance(v, list)} if isinstance(files, dict) else {}


def sign_folder(out, _cache: dict | None = None, _key: bytes | None = None) -> int:
    """Sign the pickles of the sweep folder ``out`` (its ``tune/``) with this user's key (made on first
    use); returns how many tags were added. ``_cache`` ({path: (size, mtime)}) skips unchanged files."""
    out = Path(out)
    key = _key or _load_key(create=True)
    tune_dir = out / "tune"
    if not tune_dir.is_dir():
        return 0
    tags = _read_signatures(out)
    added = 0
    for rel in pickle_files(tune_dir):
        path = tune_dir / rel
        try:
            st = os.stat(path)
        except FileNotFoundError:  # replaced meanwhile: the next round signs it
            continue
        if _cache is not None and _cache.get(rel) == (st.st_size, st.st_mtime_ns):
            continue
        tag = _tag(key, rel, path)
        known = tags.setdefault(rel, [])
        if tag not in known:
            known.append(tag)
            del known[:-_KEEP]
            added += 1
        if _cache is not None:
            _cache[rel] = (st.st_size, st.st_mtime_ns)
    if added:
        tmp = out / f".{SIGNATURES}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"version": 1, "files": tags}, indent=1))
        os.replace(tmp, out / SIGNATURES)
    return added


def unsigned_pickles(out) -> list[str]:
    """The pickles under ``out/tune`` without a valid tag of this user's key (all of them when there is
    no key, or no ``signatures.json``); reads no pickle."""
    out = Path(out)
    files = pickle_files(out / "tune")
    key = _load_key(create=False)
    if key is None:
        return files
    tags = _read_signatures(out)
    bad = []
    for rel in files:
        tag = _tag(key, rel, out / "tune" / rel)
        if not any(hmac.compare_digest(tag, known) for known in tags.get(rel, [])):
            bad.append(rel)
    return bad


class Signer:
    """Sign a sweep folder while Ray writes it: once on entry, every ``every`` seconds in a thread
    (each new or rewritten pickle), and once on exit, however the block ends."""

    def __init__(self, out, every: float = 0.5):
        self.out, self.every = Path(out), every
        self._cache: dict = {}
        self._key: bytes | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="calozoo-sweep-signer", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                sign_folder(self.out, self._cache, self._key)
            except OSError:  # a file replaced under our feet: the next round, or the last one, signs it
                pass

    def __enter__(self) -> Signer:
        self._key = _load_key(create=True)  # made, or refused, before Ray starts writing
        sign_folder(self.out, self._cache, self._key)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        sign_folder(self.out, self._cache, self._key)
        return False
