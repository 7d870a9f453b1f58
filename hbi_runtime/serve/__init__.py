"""``hbi-run serve``: one long-running process that keeps the model and the index hot, batches concurrent
requests and serves a JSON API and a search page (docs/serve.md).

* :mod:`.batching`: the lanes (bounded queue, one worker thread, requests coalesced into one model call).
* :mod:`.state`: the served index (one committed state at a time, reloaded when a run commits, re-verified when
  shard bytes change) and the background index jobs (one writer at a time).
* :mod:`.runtime`: the models and the lanes' work (retrieve, encode text, QA, caption, explain).
* :mod:`.app`: the FastAPI routes, limits, API key, errors as JSON, metrics (:mod:`.metrics`), media
  (:mod:`.media`: range requests, thumbnails cached in the index folder).
* :mod:`.server`: the socket, the address rules, uvicorn, the graceful stop.

fastapi, uvicorn and prometheus-client come with the ``serve`` extra; nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path


def open_runtime(model, index_dir: Path, config, *, qa=None, caption=None, video_dir: Path | None = None):
    """A :class:`~hbi_runtime.serve.runtime.Runtime` over a loaded model and an index folder: the index opened
    (raises what :meth:`hbi_runtime.index.Index.open` raises), its watcher started, the lanes running."""
    from hbi_runtime.serve.metrics import Metrics
    from hbi_runtime.serve.runtime import Runtime
    from hbi_runtime.serve.state import IndexHolder

    metrics = Metrics()
    holder = IndexHolder(Path(index_dir), model.package.manifest_sha256, interval_s=config.reload_interval_s,
                         on_load=metrics.index_loaded)
    holder.load()
    if video_dir is None:
        recorded = holder.current().index.meta.get("video_dir")
        video_dir = Path(recorded) if recorded and Path(recorded).is_dir() else None
    rt = Runtime(model, holder, config, qa=qa, caption=caption, video_dir=video_dir, metrics=metrics)
    rt.warm_up()
    holder.start_watching()
    return rt
