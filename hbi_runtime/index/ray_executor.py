"""Bulk indexing on Ray Data: ``hbi-run index DIR --executor ray`` (docs/scale.md, "Bulk indexing on Ray").

The run is :func:`hbi_runtime.index.update_index`'s (scan, incremental plan, generations, failure model); only the
decoding and encoding of the planned files move to a Ray cluster:

* the driver (this process) turns the plan's files (path, size, mtime, and the job kind decided by the same
  incremental rules) into a Ray Dataset, one row per file;
* ``map_batches`` runs :class:`_EncodeActor`, a callable class: each actor loads the model package once and keeps
  a decoding process pool open; per batch of files it decodes, encodes and writes the finished sides as one
  immutable shard, complete and fsync'ed with its checksums, straight into the index folder's ``tmp/``;
* the driver is the one committer: for each batch that comes back it checks the shard's files against the record,
  moves it into ``shards/`` and adds it with its files' catalog entries in one SQLite transaction
  (:meth:`hbi_runtime.index.update.Committer.adopt`).

Actors therefore need the index folder at the same path as the driver (one machine, or a shared file system).
Ray is imported only here, and only when the executor runs; without it the CLI says how to install it.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from hbi_runtime.errors import BadInputError, HbiError, MissingDependencyError, UsageError
from hbi_runtime.index.catalog import TMP
from hbi_runtime.index.scan import ScanEntry
from hbi_runtime.index.update import FrameInfo, Work, _Job, encode_batches
from hbi_runtime.index.windows import Window

RAY_INSTALL = "pip install 'hbi-toolkit[ray]'"
# Ray's own settings for a driver that starts a local Ray (no --ray-address): no dashboard, a bounded object store
LOCAL_OBJECT_STORE_BYTES = 256 << 20


def import_ray():
    """The ``ray`` module with Ray Data, or :class:`MissingDependencyError` naming the extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is a part of the ray distribution that may be missing)
    except ImportError as exc:
        raise MissingDependencyError(f"--executor ray needs Ray Data, which is not installed ({exc})",
                                     hint=f"{RAY_INSTALL}, or index on this machine with --executor local") from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the actor pool runs.

    ``address``: None starts a Ray on this machine for the run (dashboard off, object store of
    :data:`LOCAL_OBJECT_STORE_BYTES`); ``"auto"`` joins the cluster this machine belongs to; ``host:port`` or
    ``ray://host:port`` a given one. A Ray already initialised in this process is used as it is.
    ``actors``: actor pool size (default: the cluster's CPUs divided by ``cpus_per_actor``).
    ``gpus_per_actor``: ``num_gpus`` of each actor (GPU clusters; the package's backend must use the GPU).
    ``threads``: ONNX Runtime threads per actor (default: ``cpus_per_actor``, at least 1).
    ``load``: keyword arguments of :func:`hbi_runtime.model.load` in each actor (``backend``, backend options).
    """

    address: str | None = None
    actors: int | None = None
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    threads: int | None = None
    load: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)  # custom Ray resources each actor needs (place it on some nodes)

    def check(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise UsageError(f"--actors must be at least 1, got {self.actors}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise UsageError("--gpus-per-actor must be >= 0 and the CPUs per actor > 0")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _EncodeActor:
    """One actor of the pool: the model package loaded once, a decoding pool kept open; called per batch."""

    def __init__(self, package_dir: str, load: dict, workers: int, timeout_s: float, window, stride, dtype: str,
                 batch_size: int, full_hash: bool, staging: str, threads: int) -> None:
        from hbi_runtime.index.windows import WindowDecoder
        from hbi_runtime.model import load as load_model
        from hbi_runtime.video import VideoDecoder

        options = dict(load)
        if options.get("backend", "onnxruntime") == "onnxruntime":
            options.setdefault("intra_op_threads", threads)
        self.model = load_model(package_dir, allow_unverified=True, **options)  # the driver checked the package
        decoder = WindowDecoder if window is not None else VideoDecoder
        self.pool = decoder(self.model.manifest.preprocessing, workers=workers, timeout_s=timeout_s).__enter__()
        self.settings = dict(dtype=dtype, batch_size=batch_size, full_hash=full_hash, window=window, stride=stride,
                             timeout_s=timeout_s)
        self.staging = staging
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        if not Path(staging).parent.is_dir():
            raise BadInputError(f"the index folder {Path(staging).parent.parent} is not reachable from Ray node "
                                f"{os.uname().nodename}",
                                hint="put the index on storage that every node mounts at the same path")

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        jobs = [_Job(ScanEntry(base64.b64decode(r), base64.b64decode(p), int(s), int(m)), str(k))
                for r, p, s, m, k in zip(batch["rel"], batch["path"], batch["size"], batch["mtime_ns"],
                                         batch["kind"])]
        index = {id(job): int(i) for job, i in zip(jobs, batch["i"])}
        # a fresh name per call: a batch retried after a lost node never meets its first attempt's folder
        prefix = Path(f"{self.staging}-{uuid.uuid4().hex[:12]}")
        out = []
        for done, hashes, tmp, rows, files in encode_batches(self.model, self.pool, jobs, prefix, **self.settings):
            out.append(json.dumps({
                "tmp": None if tmp is None else str(tmp), "rows": rows, "files": files, "node": self.node,
                "jobs": [{"i": index[id(j)], "hash": h, "error": j.error, "error_kind": j.error_kind,
                          "stored": j.stored,
                          "windows": [[w.start_s, w.end_s, w.first, w.stop, v.duration, v.fps, v.n_frames,
                                       v.indices] for w, v in j.windows]}
                         for j, h in zip(done, hashes)]}))
        return {"batch": np.array(out, dtype=object)}


def _restore(job: _Job, record: dict) -> None:
    job.error, job.error_kind, job.stored = record["error"], record["error_kind"], record["stored"]
    job.windows = [(Window(s, e, first, stop), FrameInfo(duration, fps, n, indices))
                   for s, e, first, stop, duration, fps, n, indices in record["windows"]]


class RayExecutor:
    """``update_index(..., executor=RayExecutor(options, package_dir))``: decode and encode on Ray, commit here."""

    def __init__(self, options: RayOptions, package_dir: str | os.PathLike) -> None:
        options.check()
        self.options = options
        self.package_dir = str(Path(package_dir).resolve())
        self.ray = import_ray()  # fails before any work, with the install hint
        self.batches_by_node: collections.Counter = collections.Counter()  # committed batches per Ray node id
        self.last_node: str | None = None  # the node of the batch committed last

    def _connect(self) -> None:
        import logging

        ray = self.ray
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the CLI shows its own, fed by the committer
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        if ray.is_initialized():
            return
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if self.options.address is None:
            ray.init(object_store_memory=LOCAL_OBJECT_STORE_BYTES, **kwargs)
        else:
            try:
                ray.init(address=self.options.address, **kwargs)
            except ConnectionError as exc:
                raise BadInputError(f"cannot reach the Ray cluster at {self.options.address} ({exc})",
                                    hint="start it (`ray start --head`) or check --ray-address") from None

    def actors(self) -> int:
        if self.options.actors is not None:
            return self.options.actors
        cpus = float(self.ray.cluster_resources().get("CPU", 1))
        return max(1, int(cpus // self.options.cpus_per_actor))

    def __call__(self, work: Work) -> None:
        self._connect()
        ray = self.ray
        staging = work.committer.writer.dir.resolve() / TMP / f"ray-{uuid.uuid4().hex[:8]}"
        rows = [{"i": i, "rel": _b64(j.entry.rel), "path": _b64(j.entry.path), "size": j.entry.size,
                 "mtime_ns": j.entry.mtime_ns, "kind": j.kind} for i, j in enumerate(work.jobs)]
        size = self.actors()
        blocks = max(1, min(len(rows), -(-len(rows) // work.batch_size)))
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
        threads = self.options.threads or max(1, int(self.options.cpus_per_actor))
        # Ray Data restarts a lost actor and retries its batch (max_restarts / max_task_retries -1 by default)
        out = ds.map_batches(
            _EncodeActor, batch_size=work.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=size), num_cpus=self.options.cpus_per_actor,
            num_gpus=self.options.gpus_per_actor or None, resources=self.options.resources or None,
            fn_constructor_kwargs=dict(package_dir=self.package_dir, load=self.options.load, workers=work.workers,
                                       timeout_s=work.timeout_s, window=work.window, stride=work.stride,
                                       dtype=work.dtype, batch_size=work.batch_size, full_hash=work.full_hash,
                                       staging=str(staging), threads=threads))
        try:
            for row in out.iter_rows():
                self._commit(work, json.loads(row["batch"]))
        except Exception as exc:  # an actor's own error (e.g. the index folder not reachable) says what to do
            cause = _hbi_cause(exc)
            if cause is None:
                raise
            raise cause from None

    def _commit(self, work: Work, payload: dict) -> None:
        """One actor batch: its files' results onto the driver's jobs, then the committer adopts its shard."""
        jobs = [work.jobs[r["i"]] for r in payload["jobs"]]
        for job, record in zip(jobs, payload["jobs"]):
            _restore(job, record)
        self.last_node = payload["node"]
        self.batches_by_node[payload["node"]] += 1
        tmp = None if payload["tmp"] is None else Path(payload["tmp"])
        work.committer.adopt(jobs, [r["hash"] for r in payload["jobs"]], tmp, payload["rows"], payload["files"])


def _hbi_cause(exc: BaseException | None) -> HbiError | None:
    """The toolkit's own error inside a Ray error (Ray wraps what an actor raises), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, HbiError):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


__all__ = ["LOCAL_OBJECT_STORE_BYTES", "RAY_INSTALL", "RayExecutor", "RayOptions", "import_ray"]
