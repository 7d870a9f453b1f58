"""The work behind the routes: the models, the served index, the lanes that batch requests, the index jobs.

Lanes (one :class:`~hbi_runtime.serve.batching.Batcher` and worker thread each):

* ``text``: retrieve and encode-text. The queries of every request in a batch are encoded in **one** text-encoder
  call; the batch's retrieve requests are then ranked with one scoring pass over the index per distinct
  (level weights, explain) group (:func:`hbi_runtime.search.rank_encoded`), all from one committed state.
* ``qa``: questions about indexed videos, one ``QAModelRuntime.ask`` call per batch (each video decoded once).
* ``caption``: captions (or open questions), one ``caption_videos`` call per batch and search setting.
* ``pair``: explain and video->captions, one request at a time (each decodes its video and does its own work).

A request that fails alone (an empty query, an undecodable video) fails alone: a batch whose text encoding fails
is encoded again request by request, so one bad request never fails the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hbi_runtime.errors import BadInputError, HbiError, UsageError
from hbi_runtime.index import DamagedIndexError
from hbi_runtime.serve.batching import Batcher
from hbi_runtime.serve.state import IndexHolder, IndexJobs, Served


class NotServedError(UsageError):
    """The server was started without what this route needs (a QA or caption package, a video folder)."""


class NotFoundError(BadInputError):
    """What the request names does not exist here (HTTP 404)."""


class UnknownVideoError(NotFoundError):
    """No video with this id in the served index."""


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching; every field has a ``hbi-run serve`` option."""

    max_batch: int = 32  # queries (text lane) or videos (qa, caption) per model call
    max_delay_ms: float = 5.0
    queue_size: int = 256  # waiting requests per lane
    request_timeout_s: float = 30.0
    max_body_bytes: int = 1 << 20
    max_queries: int = 64  # per request
    max_query_chars: int = 1000
    max_top_k: int = 1000
    max_explain_samples: int = 16384
    api_key: str | None = field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()
    reload_interval_s: float = 2.0
    workers: int = 2  # decoding processes of index jobs
    batch_size: int = 16  # videos per encoder call of index jobs
    ranking: str = "auto"  # hbi_runtime.search.RANKING_MODES: "two-stage" with --two-stage, "exact" with --exact


# ------------------------------------------------------------------------------------------- lane payloads
@dataclass(frozen=True)
class TextWork:
    kind: str  # "retrieve" or "encode"
    queries: tuple[str, ...]
    top_k: int = 10
    levels: tuple[float, ...] | None = None
    explain_samples: int | None = None


@dataclass(frozen=True)
class TextAnswer:
    results: list | None = None  # retrieve: list[QueryResult]
    side: Any = None  # encode: the TextSide of the queries
    served: Served | None = None


@dataclass(frozen=True)
class VideoWork:
    path: str
    question: str | None
    options: Any = None  # qa: (top_k, answer_weights); caption: SearchOptions


class Runtime:
    """Everything a running server holds. ``close`` stops the lanes (finishing queued work) and the models."""

    def __init__(self, model, holder: IndexHolder, config: ServeConfig, *, qa=None, caption=None,
                 video_dir: Path | None = None, metrics=None) -> None:
        self.model, self.holder, self.config = model, holder, config
        self.qa, self.caption, self.video_dir = qa, caption, video_dir
        self.metrics = metrics
        self.started = time.time()
        delay = config.max_delay_ms / 1000.0

        def lane(name: str, handler, max_batch: int) -> Batcher:
            observe = metrics.batch_observer(name) if metrics is not None else None
            return Batcher(name, handler, max_batch=max_batch, max_delay_s=delay, queue_size=config.queue_size,
                           on_batch=observe)

        self.lanes = {"text": lane("text", self._text_lane, config.max_batch),
                      "qa": lane("qa", self._qa_lane, config.max_batch),
                      "caption": lane("caption", self._caption_lane, config.max_batch),
                      "pair": lane("pair", self._pair_lane, 1)}
        self.jobs = IndexJobs(self._index_run, lambda: holder.check(force=True))
        self._cand, self._cand_token = None, None

    # ------------------------------------------------------------------ text lane
    def _encode_each(self, payloads: Sequence[TextWork]) -> list:
        """Encode request by request (after a batch encode failed): a TextSide, or the request's error."""
        out = []
        for p in payloads:
            try:
                out.append(self.model.encode_text(list(p.queries)))
            except HbiError as exc:
                out.append(exc)
        return out

    def _text_lane(self, payloads: Sequence[TextWork]) -> list:
        from hbi_runtime.search import rank_encoded

        queries = [q for p in payloads for q in p.queries]
        try:
            side = self.model.encode_text(queries)
            sides = []
            start = 0
            for p in payloads:
                sides.append((side, np.arange(start, start + len(p.queries))))
                start += len(p.queries)
        except HbiError:
            sides = [(s, np.arange(len(p.queries))) if not isinstance(s, Exception) else s
                     for s, p in zip(self._encode_each(payloads), payloads)]
        results: list[Any] = [None] * len(payloads)
        groups: dict[tuple, list[int]] = {}
        for i, (p, s) in enumerate(zip(payloads, sides)):
            if isinstance(s, Exception):
                results[i] = s
            elif p.kind == "encode":
                results[i] = TextAnswer(side=s[0].select(s[1]))
            else:
                groups.setdefault((p.levels, p.explain_samples), []).append(i)
        if not groups:
            return results
        try:
            served = self.holder.current()
        except HbiError as exc:
            for members in groups.values():
                for i in members:
                    results[i] = exc
            return results
        for (levels, samples), members in groups.items():
            if all(sides[i][0] is sides[members[0]][0] for i in members):  # one batch encode: one select
                text = sides[members[0]][0].select(np.concatenate([sides[i][1] for i in members]))
            else:  # encoded request by request after a failed batch
                text = _concat_text([sides[i][0].select(sides[i][1]) for i in members])
            qs = [q for i in members for q in payloads[i].queries]
            k = max(payloads[i].top_k for i in members)
            try:
                ranked = rank_encoded(self.model, served.index, qs, text, top_k=k, level_weights=levels,
                                      explain_samples=samples, store=served.store, mode=self.config.ranking,
                                      candidates=self._candidates(served))
            except DamagedIndexError as exc:
                self.holder.report_damage(exc, served)
                for i in members:
                    results[i] = exc
                continue
            except HbiError as exc:
                for i in members:
                    results[i] = exc
                continue
            at = 0
            for i in members:
                n, top = len(payloads[i].queries), payloads[i].top_k
                mine = [_trim(r, top) for r in ranked[at:at + n]]
                at += n
                results[i] = TextAnswer(results=mine, served=served)
        return results

    def _candidates(self, served: Served):
        """The served state's candidate index, loaded once per state (not with exact ranking); None: let
        rank_encoded say why there is none (or, below its gallery threshold, rank exhaustively)."""
        if self.config.ranking == "exact" or served.store is None:
            return None
        if self._cand_token != served.token:
            from hbi_runtime.index import candidates as cand_stage

            try:
                self._cand = cand_stage.load(served.index)
            except cand_stage.CandidateIndexUnavailable:
                self._cand = None
            self._cand_token = served.token
        return self._cand

    # ------------------------------------------------------------------ video lanes
    def _qa_lane(self, payloads: Sequence[VideoWork]) -> list:
        results: list[Any] = [None] * len(payloads)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(payloads):
            groups.setdefault(p.options, []).append(i)
        for (top_k, weights), members in groups.items():
            rows = [(payloads[i].path, payloads[i].question, None) for i in members]
            try:
                answered = self.qa.ask(rows, top_k=top_k, workers=1, answer_weights=weights)
            except HbiError as exc:
                for i in members:
                    results[i] = exc
                continue
            done = _by_key(answered.rows, lambda r: (r.video, r.question))
            failed = _by_key(answered.failed, lambda f: (f["video"], f["question"]))
            for i in members:
                key = (payloads[i].path, payloads[i].question)
                if done.get(key):
                    results[i] = done[key].pop(0)
                elif failed.get(key):
                    results[i] = BadInputError(failed[key].pop(0)["reason"])
                else:
                    results[i] = BadInputError("the video could not be answered")
        return results

    def _caption_lane(self, payloads: Sequence[VideoWork]) -> list:
        results: list[Any] = [None] * len(payloads)
        groups: dict[Any, list[int]] = {}
        for i, p in enumerate(payloads):
            groups.setdefault(p.options, []).append(i)
        for options, members in groups.items():
            paths = [payloads[i].path for i in members]
            questions = [payloads[i].question for i in members]
            try:
                done, errors = self.caption.caption_videos(paths, questions, options, workers=1)
            except HbiError as exc:
                for i in members:
                    results[i] = exc
                continue
            by = _by_key(done, lambda r: (str(r.path), r.question))
            errs = _by_key(errors, lambda e: str(getattr(e, "path", "")))
            for i in members:
                key = (payloads[i].path, payloads[i].question)
                if by.get(key):
                    results[i] = by[key].pop(0)
                elif errs.get(payloads[i].path):
                    results[i] = errs[payloads[i].path].pop(0)
                else:
                    results[i] = BadInputError("the video could not be captioned")
        return results

    def _pair_lane(self, payloads: Sequence) -> list:
        out = []
        for fn in payloads:
            try:
                out.append(fn())
            except HbiError as exc:
                out.append(exc)
        return out

    # ------------------------------------------------------------------ index jobs
    def _index_run(self, progress) -> dict:
        from hbi_runtime.index import update_index

        if self.video_dir is None:
            raise NotServedError("this server does not know the folder of videos it serves",
                                 hint="the index records none; restart it with --videos DIR")
        from hbi_runtime.index.catalog import open_catalog, read_view

        conn = open_catalog(self.holder.dir)  # the index's own storage and window policy, as its last run left them
        try:
            meta = read_view(conn, self.holder.dir).meta
        finally:
            conn.close()
        policy = meta.get("window") or {}
        summary = update_index(self.model, self.video_dir, self.holder.dir, workers=self.config.workers,
                               batch_size=self.config.batch_size, progress=progress,
                               dtype=meta.get("storage_dtype", "int8"), window=policy.get("window"),
                               stride=policy.get("stride"))
        return summary.to_dict(self.model.package.manifest_sha256)

    # ------------------------------------------------------------------ lifecycle
    def warm_up(self) -> None:
        """One query through the text lane before the first client: ONNX Runtime's first run of a session (and
        the first pass over a memory-mapped index) is much slower than the next ones; ``/readyz`` says ready
        only after it."""
        if self.holder.ready and len(self.holder.current().index.rows):
            self.lanes["text"].submit(TextWork("retrieve", ("warm up",), 1), 1).result()

    def close(self) -> None:
        for lane in self.lanes.values():
            lane.stop(timeout=self.config.request_timeout_s + 5)
        self.holder.stop()
        for m in (self.model, self.qa, self.caption):
            if m is not None:
                m.close()


def _by_key(items, key) -> dict:
    out: dict = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return out


def _trim(result, top: int):
    from hbi_runtime.search import QueryResult

    return result if len(result.hits) <= top else QueryResult(result.query, result.truncated, result.hits[:top],
                                                              result.ranking)


def _concat_text(texts: list):
    from hbi_runtime.model import TextSide
    from hbi_runtime.sides import SideLevel

    levels = tuple(SideLevel(np.concatenate([t.levels[k].tokens for t in texts]),
                             np.concatenate([t.levels[k].weights for t in texts]),
                             np.concatenate([t.levels[k].mask for t in texts])) for k in range(len(texts[0].levels)))
    clusters = None
    if all(t.clusters is not None for t in texts):
        from hbi_runtime.model import Clusters

        clusters = Clusters(np.concatenate([t.clusters.l1 for t in texts]),
                            np.concatenate([t.clusters.l2 for t in texts]),
                            np.concatenate([t.clusters.ok for t in texts]))
    return TextSide(levels, truncated=tuple(f for t in texts for f in t.truncated), clusters=clusters)
