"""Shard checksums: what the catalog records of each shard file when it commits the shard, and how it is checked.

Every shard file's size and sha256 are recorded in the same SQLite transaction that makes the shard live
(``shards.files``, a JSON object ``{file name: [size, sha256]}``). Two levels of checking read that record:

* **cheap** (:func:`cheap_check`, on every open by a reader and by the writer): every recorded file exists with
  its recorded size and no unrecorded file sits beside them; ``store.json`` (a few hundred bytes) hashes to its
  record; the ``.npy`` headers parse and their shapes, dtypes and row counts agree with the catalog and the
  index's meta. A stat and a header read per file: microseconds per shard, whatever its size.
* **full** (:func:`full_check`): the sha256 of every byte, about 1.7 GB/s on one core of the reference machine
  (``hbi-run retrieve --verify``, ``hbi-run index --verify``, and a budget of the least recently verified shards
  during every ``hbi-run index`` run; see :data:`hbi_runtime.index.update.VERIFY_BUDGET_BYTES`).

Bytes flipped inside a ``.npy`` body keep the size and the header: only the full check sees them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from hbi_runtime.scoring import VideoStore
from hbi_runtime.scoring.store import HEADER_FILE

_CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def record_files(folder: Path) -> dict[str, list]:
    """``{name: [size, sha256]}`` of every file in a shard folder (what the commit records)."""
    return {p.name: [p.stat().st_size, sha256_of(p)] for p in sorted(Path(folder).iterdir()) if p.is_file()}


def dumps(files: dict[str, list]) -> str:
    return json.dumps(files, sort_keys=True, separators=(",", ":"))


def loads(text: str | None) -> dict[str, list] | None:
    return None if text is None else json.loads(text)


def cheap_check(folder: Path, files: dict[str, list] | None, n_rows: int, meta: dict) -> tuple[VideoStore | None,
                                                                                                  str | None]:
    """Open a shard after the cheap checks: ``(store, None)`` when it passes, else ``(None, reason)``.

    ``files`` is the commit's record (None for a shard written before records existed: then only the store's own
    consistency and the catalog's row count are checked). Raises FileNotFoundError when the folder is gone (the
    caller tells a concurrent compaction from damage).
    """
    if not folder.is_dir():
        raise FileNotFoundError(folder)
    if files is not None:
        present = {p.name for p in folder.iterdir()}
        for name, (size, digest) in sorted(files.items()):
            try:
                actual = (folder / name).stat().st_size
            except FileNotFoundError:
                if not folder.is_dir():
                    raise
                return None, f"{name} is missing"
            if actual != size:
                return None, f"{name} has {actual} bytes, {size} were written"
            if name == HEADER_FILE and sha256_of(folder / name) != digest:
                return None, f"{name} was changed after it was written"
        extra = sorted(present - set(files))
        if extra:
            return None, f"unexpected file(s) {', '.join(extra)}"
    try:
        store = VideoStore.open(folder, mmap=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to read a damaged store is a reason, not a crash
        if not folder.is_dir():
            raise FileNotFoundError(folder) from None
        return None, getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
    if store.n != n_rows:
        return None, f"holds {store.n} rows, the catalog says {n_rows}"
    reason = _shape_mismatch(store, meta)
    return (None, reason) if reason else (store, None)


def _shape_mismatch(store: VideoStore, meta: dict) -> str | None:
    if meta.get("storage_dtype") not in (None, store.dtype):
        return f"holds dtype {store.dtype}, the index stores {meta['storage_dtype']}"
    lengths, dim = meta.get("tokens_per_level"), meta.get("embed_dim")
    for i, level in enumerate(store.levels):
        if lengths is not None and level.length != lengths[i] or dim is not None and level.dim != dim:
            return f"level {i} has (T, D) {(level.length, level.dim)}, the index stores {(lengths[i], dim)}"
    return None


def full_check(folder: Path, files: dict[str, list] | None) -> str | None:
    """None when every recorded file hashes to its record, else the reason (a shard without a record: its
    files are hashed against nothing, so only their presence is checked)."""
    if files is None:
        return None
    for name, (size, digest) in sorted(files.items()):
        try:
            if sha256_of(folder / name) != digest:
                return f"{name}: its bytes changed after it was written (sha256 mismatch)"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as exc:
            return f"{name} cannot be read ({exc.strerror})"
    return None


def recorded_bytes(files: dict[str, list] | None) -> int:
    return sum(size for size, _ in (files or {}).values())
