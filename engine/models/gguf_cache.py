"""The cache of converted GGUF files: `<cache_dir>/<file stem>-<key>/`, keyed by content.

The key is `_CACHE_FORMAT` and `gguf_fingerprint` (`engine.models.gguf_fingerprint`: the
file's size, its header and samples of its tensor data), so the same file under another path (a new
virtual environment, a clean clone, a copy) finds the same entry, while a file whose metadata or
weights changed gets a new one. An entry holds no weights of its own (`engine.models.gguf_tensors`:
they are read from the GGUF file at load), so it names the file it reads (`source` in its
`GGUF_TENSORS_FILE`); a hit from another path points it at that path, which holds the same
bytes.

Entries are written to a temporary directory and renamed into place, so a crash never leaves
a half-written one. Once a new entry is written, the entries of the same stem in older formats
are removed, except those in use: every process that resolves or loads an entry holds a shared
`flock` on its `LOCK_FILE` for its lifetime, and an entry is removed only under an exclusive
lock taken without waiting. Entries of formats from before the lock existed are removed only
where no process has a file of theirs open or mapped (`/proc`); where that cannot be read (not
Linux), they are kept. Entries of the current format (other files of the same stem) are kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile

from engine.models.gguf_fingerprint import gguf_fingerprint
from engine.models.gguf_tensors import GGUF_TENSORS_FILE, read_manifest

logger = logging.getLogger(__name__)

_CACHE_FORMAT = "4"  # bump when the conversion changes: older entries are replaced and removed
FORMAT_FILE = "cache-format"
LOCK_FILE = ".in-use"
_held: dict[str, int] = {}  # entry -> the descriptor whose shared lock this process holds


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "lightgate")


def hold_entry(entry: str) -> None:
    """Hold a shared lock on `entry` until this process exits (it reads the entry's files)."""
    if entry in _held:
        return
    try:
        import fcntl

        fd = os.open(os.path.join(entry, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):  # no flock here, or a read-only cache: nothing to hold
        return
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a remover holds it exclusively
    _held[entry] = fd


def _claim(entry: str, gguf_path: str) -> bool:
    """Whether `entry` is a complete cache entry; if so, hold it and point it at `gguf_path`."""
    if not os.path.isfile(os.path.join(entry, "config.json")):
        return False
    hold_entry(entry)
    manifest = read_manifest(entry)
    if manifest is None or not os.path.isfile(os.path.join(entry, "config.json")):
        return False  # removed while we waited for the lock
    if manifest["source"] != gguf_path:  # the same bytes under another path
        import json

        manifest["source"] = gguf_path
        fd, tmp = tempfile.mkstemp(dir=entry, suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(manifest, f)
        os.replace(tmp, os.path.join(entry, GGUF_TENSORS_FILE))  # readers see the old or the new
    return True


def gguf_to_hf_dir(gguf_path: str, cache_dir: str | None = None) -> str:
    """Convert `gguf_path` once into `cache_dir`; later calls return the cached directory at once."""
    gguf_path = os.path.abspath(gguf_path)
    key = f"{_CACHE_FORMAT}|{gguf_fingerprint(gguf_path)}"
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    root = os.path.expanduser(cache_dir or default_cache_dir())
    target = os.path.join(root, f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    if _claim(target, gguf_path):
        # also at a hit: an older version may have written its own entry of this file since
        remove_stale_entries(root, stem, target)
        return target
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{stem}-", dir=root)
    try:
        _convert(gguf_path, tmp)
        with open(os.path.join(tmp, FORMAT_FILE), "w") as f:
            f.write(_CACHE_FORMAT)
        open(os.path.join(tmp, LOCK_FILE), "w").close()  # so that a remover always finds it
        os.chmod(tmp, 0o755)  # mkdtemp creates it private
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise  # not a lost race with another process: a real error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _claim(target, gguf_path):
        raise RuntimeError(f"the cache entry {target} was removed as it was written")
    remove_stale_entries(root, stem, target)
    return target


def _convert(gguf_path: str, out_dir: str) -> None:
    from engine.models import gguf
    from engine.models.gguf_families import GGUF_FAMILY_ARCHITECTURES, convert_family_gguf, gguf_architecture
    from engine.models.gguf_reader import shared_readers

    logger.info("converting %s into %s (once)", gguf_path, out_dir)
    with shared_readers():  # the file's metadata parsed once, not once per reader
        family = gguf_architecture(gguf_path) in GGUF_FAMILY_ARCHITECTURES  # InternLM2, ChatGLM, MiniCPM
        (convert_family_gguf if family else gguf.convert_gguf)(gguf_path, out_dir)


def _entry_format(entry: str) -> str | None:
    try:
        with open(os.path.join(entry, FORMAT_FILE)) as f:
            return f.read().strip()
    except OSError:
        return None  # formats before 4 wrote no such file


def remove_stale_entries(root: str, stem: str, keep: str) -> list[str]:
    """Remove the entries of `stem` in `root` of older formats that no process uses; returns
    the removed ones."""
    pattern = re.compile(rf"{re.escape(stem)}-[0-9a-f]{{16}}")
    removed = []
    for name in sorted(os.listdir(root)):
        entry = os.path.join(root, name)
        if entry == keep or not pattern.fullmatch(name) or _entry_format(entry) == _CACHE_FORMAT:
            continue
        if _remove_unused(entry):
            logger.info("removed the stale cache entry %s", entry)
            removed.append(entry)
    return removed


def _remove_unused(entry: str) -> bool:
    try:
        import fcntl
    except ImportError:
        return False
    lock = os.path.join(entry, LOCK_FILE)
    if not os.path.exists(lock):  # an entry of a format without the lock
        return not _open_by_a_process(entry) and _move_away_and_remove(entry)
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False  # in use
    try:
        return _move_away_and_remove(entry)
    finally:
        os.close(fd)


def _move_away_and_remove(entry: str) -> bool:
    trash = tempfile.mkdtemp(prefix=".removing-", dir=os.path.dirname(entry))
    try:
        os.rename(entry, os.path.join(trash, "entry"))  # atomic: no process sees half an entry
    except OSError:
        os.rmdir(trash)
        return False
    shutil.rmtree(trash, ignore_errors=True)
    return True


def _open_by_a_process(entry: str) -> bool:
    """Whether any process has a file of `entry` open or mapped (True where /proc cannot say)."""
    if not os.path.isdir("/proc/self/fd"):
        return True
    inside = os.path.realpath(entry) + os.sep
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            with open(f"/proc/{pid}/maps") as maps:
                if any(inside in line for line in maps):
                    return True
        except OSError:  # gone, or another user's: it cannot use this user's cache either
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(inside):
                    return True
            except OSError:  # closed since the listing
                continue
    return False
