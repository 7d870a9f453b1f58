"""``hbi-run retrieve`` / ``eval``'s library half: text -> video search over an index, captions for a video,
and the retrieval metrics of the official evaluation.

Scores are the exact HBI score (``hbi_runtime.scoring``); the "why" of each hit comes from the entity level's
interaction: the frame with the largest weighted contribution, and for every query word (the words as written, BPE
pieces grouped back, :meth:`hbi_runtime.tokenizer.ClipTokenizer.words`) its best frame; with ``explain_samples`` also
the entity-level Banzhaf interaction map of the hit (:func:`explain_hit`, ``hbi_runtime.explain``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from hbi_runtime.errors import BadInputError, UsageError
from hbi_runtime.index import Index
from hbi_runtime.index import candidates as cand_stage
from hbi_runtime.index.catalog import DamagedIndexError, repair_hint
from hbi_runtime.names import exact_text, path_b64
from hbi_runtime.scoring import explain, score, topk

RETRIEVE_SCHEMA = "hbi.retrieve/2"  # 2: ``words`` are the query's words as written (1: one entry per BPE piece)
# From this many rows on, ``mode="auto"`` ranks in two stages (the candidate index, then exact HBI scores of the
# candidates), where the candidate kernel is built. Measured with the demo model (docs/candidates.md): at 20,000 real
# encoded videos the two-stage answer keeps recall@10 >= 0.99 against exhaustive scoring (K = 2.5 % of the gallery,
# chosen on the validation split; test 0.992, R@1 unchanged) and is already faster (3.0 vs 4.8 ms); below that
# exhaustive scoring costs a few ms and the recall was not measured on real encodings. (Wider tokens, e.g.
# ViT-B/32's 12 x 512, make exhaustive scoring ~12x costlier per row; the candidate stage costs the same.)
AUTO_MIN_GALLERY: int | None = 20_000
RANKING_MODES = ("auto", "exact", "two-stage")
TOPK_FACTOR = 10  # the candidate stage hands at least this many candidates per result asked for


@dataclass(frozen=True)
class WordFrame:
    word: str  # a word of the query as written (its BPE pieces grouped back)
    time_s: float | None  # timestamp of the word's best-matching frame (its pieces' similarities summed)


@dataclass(frozen=True)
class Hit:
    """One ranked video (or window). ``path`` is relative to the indexed folder and ``abs_path`` opens the file;
    both are exact text when the name is UTF-8 (else escaped, see :mod:`hbi_runtime.names`), and the ``_b64``
    fields hold their raw bytes, lossless whatever the name. ``display`` is the escaped form for terminals."""

    rank: int
    score: float
    path: str
    duration_s: float | None
    start_s: float
    end_s: float
    best_frame_s: float | None  # timestamp of the frame that contributes most to the match
    words: list[WordFrame] = field(default_factory=list)
    abs_path: str = ""
    path_b64: str = ""
    abs_path_b64: str = ""
    display: str = ""
    explanation: dict | None = None  # the entity-level interaction map (explain_hit), when asked for
    video_id: int | None = None  # the video's id in the index catalog (stable across runs; hbi-run serve's media)

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["display"]
        if out["explanation"] is None:
            del out["explanation"]
        return out


@dataclass(frozen=True)
class QueryResult:
    query: str
    truncated: bool
    hits: list[Hit]
    ranking: dict | None = None  # which path answered (:func:`rank_encoded`); the CLI puts it in its JSON header

    def to_dict(self) -> dict:
        return {"query": self.query, "truncated": self.truncated, "hits": [h.to_dict() for h in self.hits]}


def _timestamp(row, frame: int) -> float | None:
    if frame < 0 or frame >= len(row.frames):
        return None
    return round(row.frames[frame] / row.fps, 3)


def _words(words: Sequence, max_words: int, ex, frame_mask: np.ndarray, row) -> list[WordFrame]:
    """Per word of the query (as written) that kept a piece, its best frame: the valid frame that maximises the
    sum of its pieces' similarities (ties: the earlier frame); a one-piece word gets its token's best frame."""
    valid = np.flatnonzero(frame_mask)
    where = {p: k for k, p in enumerate(ex.token_positions)}
    out = []
    for w in words:
        rows = [where[p] for p in w.positions(max_words) if p in where]
        if not rows:
            continue
        if len(valid) == 0 or ex.similarity is None:
            out.append(WordFrame(w.text, None))
            continue
        total = np.asarray(ex.similarity, np.float64)[rows][:, valid].sum(axis=0)
        out.append(WordFrame(w.text, _timestamp(row, int(valid[int(np.argmax(total))]))))
    return out


def explain_hit(model, text, query: int, store, video: int, row, words: Sequence, *, samples: int,
                seed: int = 0) -> dict:
    """The entity-level Banzhaf interaction map of one hit (``retrieve --explain``): query ``query`` of the text
    side ``text`` against video ``video`` of the index's ``store`` (its stored, dequantised tokens: the side the
    score used), words as written x frames with their times; the ``hbi.explain/1`` level object
    (:meth:`hbi_runtime.explain.LevelMap.to_dict`)."""
    from hbi_runtime.explain.explainer import level_map
    from hbi_runtime.sides import Side, SideLevel

    ids = np.asarray([video])
    video_side = Side(tuple(SideLevel(lv.dequantize(ids), np.asarray(lv.weights[ids]), np.asarray(lv.mask[ids]))
                            for lv in store.levels), "video")
    times = [round(t, 3) for t in row.timestamps()]
    length = video_side.levels[0].length
    times += [round((times[-1] if times else -1.0) + 1.0 + k, 3) for k in range(length - len(times))]
    m = level_map(text.select([query]), video_side, 0, words=words, max_words=model.manifest.max_words,
                  times=times, samples=samples, seed=seed)
    return m.to_dict()


def check_queries(queries: Sequence[str]) -> list[str]:
    cleaned = [q for q in queries if q is not None]
    if not cleaned:
        raise UsageError("no query given", hint='pass one or more queries, e.g. hbi-run retrieve "a dog runs"')
    for i, q in enumerate(cleaned):
        if not q.strip():
            raise BadInputError(f"query {i + 1} is empty", hint="remove the empty query")
    return cleaned


def search(model, index: Index, queries: Sequence[str], *, top_k: int = 10,
           level_weights: Sequence[float] | None = None, memory_limit_mb: float = 256,
           explain_samples: int | None = None, explain_seed: int = 0, mode: str = "auto") -> list[QueryResult]:
    """Rank the index's videos for each query (exact HBI score), best first, with the why of each hit.

    ``mode``: ``auto`` (two-stage from :data:`AUTO_MIN_GALLERY` rows on), ``exact`` (every video scored,
    ``retrieve --exact``) or ``two-stage`` (whenever a candidate index can answer); see :func:`rank_encoded`.

    ``explain_samples``: also attach each hit's entity-level interaction map (:func:`explain_hit`, that many
    Monte-Carlo coalitions; ``retrieve --explain``).

    Raises:
        UsageError: no query, ``top_k`` < 1, ``explain_samples`` < 1. BadInputError: an empty query.
        MismatchError: (from Index.open)
    """
    queries = check_queries(queries)
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    if mode not in RANKING_MODES:
        raise UsageError(f"ranking mode must be one of {RANKING_MODES}, got {mode!r}")
    if explain_samples is not None:
        from hbi_runtime.explain.explainer import check_samples

        check_samples(explain_samples)
    return rank_encoded(model, index, queries, model.encode_text(queries), top_k=top_k, level_weights=level_weights,
                        memory_limit_mb=memory_limit_mb, explain_samples=explain_samples, explain_seed=explain_seed,
                        mode=mode)


def rank_encoded(model, index: Index, queries: Sequence[str], text, *, top_k: int = 10,
                 level_weights: Sequence[float] | None = None, memory_limit_mb: float = 256,
                 explain_samples: int | None = None, explain_seed: int = 0, store=None, mode: str = "auto",
                 candidates=None, candidate_k: int | None = None) -> list[QueryResult]:
    """:func:`search` for queries whose text side ``text`` (row ``q`` = ``queries[q]``, with its ``truncated``
    flags) is already encoded: one scoring pass over the index for all of them (the server encodes the queries of
    concurrent requests in one call, then ranks each group of level weights with this). The arguments are checked
    by :func:`search`. ``store``: ``index.video_store()`` when the caller keeps it (the server, once per index
    reload: several shards are otherwise concatenated on every call).

    Two-stage ranking (``mode`` ``two-stage``, or ``auto`` from :data:`AUTO_MIN_GALLERY` rows on where the
    candidate kernel is built): the candidate
    index (``candidates``: a :class:`~hbi_runtime.index.candidates.CandidateIndex` the caller keeps, else loaded
    from the index) proposes ``K`` videos per query (:func:`hbi_runtime.index.candidates.candidate_count` of the
    gallery, or ``max(candidate_k, TOPK_FACTOR * top_k)`` when ``candidate_k`` is given), and those (the union
    over the queries) are scored exactly; the scores and the order are those of exhaustive scoring restricted to
    them. Exact scoring answers instead, and ``ranking["reason"]`` says why, when the candidate index is missing,
    stale or damaged, when the level weights use more than the entity level, or when the candidates would be at
    least half of the gallery. Every result's ``ranking`` says which path answered: ``{"path": "two-stage" |
    "exact", "gallery": N, "candidates": K (two-stage), "reason": ... (exact in place of two-stage)}``.

    Raises:
        BadInputError: the index holds no video. DamagedIndexError: impossible scores (damaged shard bytes).
    """
    if not index.rows:
        raise BadInputError(f"the index {index.dir} holds no video",
                            hint="index a folder that contains videos (hbi-run index VIDEO_DIR)")
    weights = tuple(level_weights) if level_weights is not None else tuple(model.manifest.level_weights)
    words = [model.tokenizer.words(q) for q in queries]
    store = index.video_store() if store is None else store
    ranking, cand = _choose_path(index, store, weights, top_k, mode, candidates, candidate_k)
    if cand is None:
        scores = score(text, store, level_weights=weights, memory_limit_mb=memory_limit_mb)  # (Q, N)
        _check_scores(index, scores, weights)
        best, values = topk(scores, top_k)
    else:
        best, values, rows, scores = two_stage_topk(text, store, cand, top_k, k=ranking["candidates"],
                                                    level_weights=weights, memory_limit_mb=memory_limit_mb)
        _check_scores(index, scores, weights, rows)
    why = explain(text, store, best, level=0)
    results = []
    for q, query in enumerate(queries):
        hits = []
        for rank, (video, value, ex) in enumerate(zip(best[q], values[q], why[q]), start=1):
            row = index.rows[int(video)]
            why_map = (explain_hit(model, text, q, store, int(video), row, words[q], samples=explain_samples,
                                   seed=explain_seed) if explain_samples is not None else None)
            hits.append(Hit(rank, round(float(value), 6), exact_text(row.rel), row.duration, row.start_s, row.end_s,
                            _timestamp(row, ex.best_frame),
                            _words(words[q], model.manifest.max_words, ex, store.levels[0].mask[int(video)], row),
                            abs_path=exact_text(row.abs_bytes), path_b64=path_b64(row.rel),
                            abs_path_b64=path_b64(row.abs_bytes), display=row.display, explanation=why_map,
                            video_id=row.video_id))
        results.append(QueryResult(query, bool(text.truncated[q]), hits, ranking))
    return results


def two_stage_topk(text, store, cand, top_k: int, *, k: int, level_weights: Sequence[float] = (1.0, 0.0, 0.0),
                   memory_limit_mb: float = 256, path: str = "auto"):
    """The two-stage top ``top_k`` of every query: ``(best (Q, top_k) rows, values, candidate rows, their exact
    scores (Q, len(rows)))``: the union of each query's ``k`` candidates (``cand``, a CandidateIndex of ``store``;
    ``path``: its approximate scorer) scored exactly. Rows ascending, so equal scores keep the lower row first, as
    exhaustive scoring orders them."""
    level = text.levels[0]
    weights = store.levels[0].weights
    rows = np.unique(np.concatenate([cand.candidates(level.tokens[q], level.weights[q], level.mask[q], weights, k,
                                                     path=path) for q in range(text.n)]))
    scores = score(text, store, level_weights=level_weights, memory_limit_mb=memory_limit_mb, rows=rows)
    local, values = topk(scores, top_k)
    return rows[local], values, rows, scores


def _choose_path(index: Index, store, weights: tuple, top_k: int, mode: str, candidates,
                 candidate_k: int | None) -> tuple[dict, object]:
    """``(ranking, candidate index or None)``: which path :func:`rank_encoded` takes, and why."""
    n = store.n
    ranking: dict = {"path": "exact", "gallery": n}
    if mode == "exact" or (mode == "auto" and (AUTO_MIN_GALLERY is None or n < AUTO_MIN_GALLERY
                                               or cand_stage.kernel_path() == "numpy")):
        return ranking, None
    if weights[1] != 0 or weights[2] != 0:
        ranking["reason"] = "the candidate stage covers the entity level only (--levels uses action / event)"
        return ranking, None
    k = (cand_stage.candidate_count(n, top_k) if candidate_k is None
         else max(int(candidate_k), TOPK_FACTOR * top_k))
    if 2 * k >= n:
        ranking["reason"] = (f"{k} candidates (the larger of {cand_stage.DEFAULT_MIN_K}, "
                             f"{cand_stage.DEFAULT_FRACTION:.1%} of the gallery and {TOPK_FACTOR} x --top-k {top_k}) "
                             f"would be at least half of the {n} videos")
        return ranking, None
    if candidates is None:
        try:
            candidates = cand_stage.load(index, verify_bytes=index.verified)
        except cand_stage.CandidateIndexUnavailable as exc:
            ranking["reason"] = f"{exc}; {cand_stage.REBUILD_HINT}"
            return ranking, None
    elif candidates.n != n or not np.array_equal(candidates.origin, cand_stage.index_origin(index)):
        ranking["reason"] = "the candidate index given is stale (the index changed after it was built)"
        return ranking, None
    if candidates.codes.shape[1] != store.levels[0].length:
        ranking["reason"] = "the candidate index does not fit the stored frames (damaged); run hbi-run index again"
        return ranking, None
    return {"path": "two-stage", "gallery": n, "candidates": k}, candidates


# Storage rounding moves a score by little: int8 moves a cosine by at most scale / 2 x ||t||_1 <= 0.013 at D = 512
# (fp16 far less); anything past this slack is not rounding.
SCORE_SLACK = 0.05


def _check_scores(index: Index, scores: np.ndarray, weights: Sequence[float], columns: np.ndarray | None = None
                  ) -> None:
    """A score no stored side can produce (non-finite, or beyond the sum of |level weights| with unit tokens and
    softmaxed weights) comes from damaged shard bytes that the cheap checks cannot see: refuse to rank.
    ``columns``: the index rows of the score columns (all rows when None)."""
    bound = float(np.sum(np.abs(weights))) * (1 + SCORE_SLACK)
    bad = ~np.isfinite(scores) | (np.abs(scores) > bound)
    if not bad.any():
        return
    rows = np.unique(np.nonzero(bad)[1])
    if columns is not None:
        rows = columns[rows]
    shards = sorted({index.shard_of_row(int(r)) for r in rows[:100]})
    raise DamagedIndexError(f"index {index.dir} gives impossible scores for {len(rows)} video(s) (shard(s) "
                            f"{', '.join(f'{s:06d}' for s in shards)}): their stored bytes are damaged",
                            hint=repair_hint(index.dir, index.meta) + "; `--verify` checks every byte")


def rank_captions(model, video_path: str, captions: Sequence[str], *, top_k: int | None = None,
                  level_weights: Sequence[float] | None = None) -> list[dict]:
    """Video -> text: the captions ranked for one video (HBI's score is symmetric)."""
    captions = check_queries(captions)
    encoded = model.encode_videos([video_path])
    if encoded.errors:
        raise encoded.errors[0]
    text = model.encode_text(captions)
    scores = model.score(text, encoded.side, level_weights)[:, 0]  # (captions,)
    order = np.lexsort((np.arange(len(scores)), -scores))[: top_k or len(scores)]
    return [{"rank": r, "score": round(float(scores[i]), 6), "caption": captions[i],
             "truncated": bool(text.truncated[i])} for r, i in enumerate(order, start=1)]


# ------------------------------------------------------------------------------------------ evaluation
def _video_key(row_rel: bytes) -> set[str]:
    rel = os.fsdecode(row_rel)
    return {rel, Path(rel).name, Path(rel).stem}


def recall_metrics(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10/50 (%), MdR, MnR from 0-based ranks of the ground truth (official ``compute_metrics``)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {f"R@{k}": round(100.0 * float(np.mean(ranks < k)), 2) for k in (1, 5, 10, 50)}
    out["MdR"] = float(np.median(ranks) + 1)
    out["MnR"] = round(float(np.mean(ranks) + 1), 2)
    return out


def evaluate(model, index: Index, pairs: Sequence[tuple[str, str]], *,
             level_weights: Sequence[float] | None = None) -> dict:
    """Text -> video and video -> text retrieval metrics over the index (one side per video, no windows).

    A video with several captions counts once per caption in t2v; in v2t its rank is that of its best-ranked
    caption. Ties count optimistically (rank = number of strictly better scores), as the official metrics.

    Raises:
        BadInputError: a caption's video is not in the index (lists a few), or the index uses windows.
    """
    lookup: dict[str, int] = {}
    for row in index.rows:
        if row.start_s != 0.0 or (row.duration and row.end_s < row.duration - 1e-6):
            raise BadInputError("the index stores windows of long videos; evaluation needs one side per video",
                                hint="index the folder without --window (use another --index folder)")
        for key in _video_key(row.rel):
            lookup.setdefault(key, row.row)
    missing = sorted({v for v, _ in pairs if v not in lookup})
    if missing:
        raise BadInputError(f"{len(missing)} captioned videos are not in the index, e.g. {missing[:5]}",
                            hint="check --videos (file stems must match the captions' video ids)")
    gt = np.array([lookup[v] for v, _ in pairs])
    text = model.encode_text([c for _, c in pairs])
    store = index.video_store()
    weights = tuple(level_weights) if level_weights is not None else tuple(model.manifest.level_weights)
    sim = score(text, store, level_weights=weights)  # (captions, videos)
    t2v = (sim > sim[np.arange(len(gt)), gt][:, None]).sum(axis=1)
    videos = np.unique(gt)
    v2t = []
    for v in videos:
        column, mine = sim[:, v], gt == v
        best = column[mine].max()
        v2t.append(int((column[~mine] > best).sum()))
    return {"captions": len(pairs), "videos": int(len(videos)), "gallery": int(store.n),
            "t2v": recall_metrics(t2v), "v2t": recall_metrics(np.array(v2t))}
