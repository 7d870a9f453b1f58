"""The video index: a folder of stored video sides that ``hbi-run retrieve`` scores queries against.

::

    from hbi_runtime.model import load
    from hbi_runtime.index import Index, update_index

    with load("pkg/") as model:
        summary = update_index(model, "videos/", "my-index/", workers=4)   # incremental, crash-safe
    index = Index.open("my-index/", model_sha256=model.package.manifest_sha256)
    store = index.video_store()        # hbi_runtime.scoring.VideoStore, row i = index.rows[i]
    index.rows[i].display, index.rows[i].start_s, index.rows[i].timestamps()

* :mod:`.scan`: find video files (bytes names, symlink loops / outside links / unreadable entries reported).
* :mod:`.catalog`: the folder layout, the SQLite catalog and the one writer; crash-safety and the published
  generation readers see live there.
* :mod:`.verify`: the checksums of shard files and the cheap / full checks.
* :mod:`.update`: :func:`update_index` (new / unchanged / reindexed / recovered / removed / failed; repairs of
  damaged shards), the window policy.
* :mod:`.windows`: long videos as windows of ``window`` seconds, decoded in the video worker pool.
* :mod:`.index`: :class:`Index` (read-only: rows, stores, stats), :func:`index_status` and :func:`compact`.
"""

import importlib

from hbi_runtime.index.catalog import SCHEMA_VERSION, DamagedIndexError
from hbi_runtime.index.index import Index, IndexRow, ShardView, compact, index_status, published_state
from hbi_runtime.index.scan import DEFAULT_EXTENSIONS, ScanEntry, ScanResult, fast_hash, scan

# Imported on first use: the writer's side (video decoding, the worker pool, multiprocessing) is about 15 ms that a
# query (`hbi-run retrieve --index`) never needs (docs/bench.md, "Cold start").
_LAZY = {"FailedFile": "update", "IndexSummary": "update", "default_index_dir": "update", "update_index": "update",
         "Window": "windows", "plan_windows": "windows"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"hbi_runtime.index.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hbi_runtime.index' has no attribute {name!r}")


__all__ = ["DEFAULT_EXTENSIONS", "SCHEMA_VERSION", "DamagedIndexError", "FailedFile", "Index", "IndexRow",
           "IndexSummary", "ScanEntry", "ScanResult", "ShardView", "Window", "compact", "default_index_dir",
           "fast_hash", "index_status", "plan_windows", "published_state", "scan", "update_index"]
