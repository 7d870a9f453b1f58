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

from hbi_runtime.index.catalog import SCHEMA_VERSION, DamagedIndexError
from hbi_runtime.index.index import Index, IndexRow, ShardView, compact, index_status, published_state
from hbi_runtime.index.scan import DEFAULT_EXTENSIONS, ScanEntry, ScanResult, fast_hash, scan
from hbi_runtime.index.update import FailedFile, IndexSummary, default_index_dir, update_index
from hbi_runtime.index.windows import Window, plan_windows

__all__ = ["DEFAULT_EXTENSIONS", "SCHEMA_VERSION", "DamagedIndexError", "FailedFile", "Index", "IndexRow",
           "IndexSummary", "ScanEntry", "ScanResult", "ShardView", "Window", "compact", "default_index_dir",
           "fast_hash", "index_status", "plan_windows", "published_state", "scan", "update_index"]
