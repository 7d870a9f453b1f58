"""``hbi-run retrieve`` / ``eval``'s library half: text -> video search over an index, captions for a video,
and the retrieval metrics of the official evaluation.

Scores are the exact HBI score (``hbi_runtime.scoring``); the "why" of each hit comes from the entity level's
interaction: the frame with the largest weighted contribution, and for every query word its best frame.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from hbi_runtime.errors import BadInputError, UsageError
from hbi_runtime.index import Index
from hbi_runtime.index.catalog import DamagedIndexError, repair_hint
from hbi_runtime.names import exact_text, path_b64
from hbi_runtime.scoring import explain, score, topk

SPECIAL_IDS = (49406, 49407)


@dataclass(frozen=True)
class WordFrame:
    word: str
    time_s: float | None  # timestamp of the word's best-matching frame


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

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["display"]
        return out


@dataclass(frozen=True)
class QueryResult:
    query: str
    truncated: bool
    hits: list[Hit]

    def to_dict(self) -> dict:
        return {"query": self.query, "truncated": self.truncated, "hits": [h.to_dict() for h in self.hits]}


def _timestamp(row, frame: int) -> float | None:
    if frame < 0 or frame >= len(row.frames):
        return None
    return round(row.frames[frame] / row.fps, 3)


def _words(model, ids: np.ndarray, positions: Sequence[int], frames: Sequence[int], row) -> list[WordFrame]:
    out = []
    for pos, frame in zip(positions, frames):
        token = int(ids[pos])
        if token in SPECIAL_IDS or token == 0:
            continue
        out.append(WordFrame(model.tokenizer.decode([token]).strip(), _timestamp(row, frame)))
    return out


def check_queries(queries: Sequence[str]) -> list[str]:
    cleaned = [q for q in queries if q is not None]
    if not cleaned:
        raise UsageError("no query given", hint='pass one or more queries, e.g. hbi-run retrieve "a dog runs"')
    for i, q in enumerate(cleaned):
        if not q.strip():
            raise BadInputError(f"query {i + 1} is empty", hint="remove the empty query")
    return cleaned


def search(model, index: Index, queries: Sequence[str], *, top_k: int = 10,
           level_weights: Sequence[float] | None = None, memory_limit_mb: float = 256) -> list[QueryResult]:
    """Rank the index's videos for each query (exact HBI score), best first, with the why of each hit.

    Raises:
        UsageError: no query, ``top_k`` < 1. BadInputError: an empty query. MismatchError: (from Index.open)
    """
    queries = check_queries(queries)
    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    if not index.rows:
        raise BadInputError(f"the index {index.dir} holds no video",
                            hint="index a folder that contains videos (hbi-run index VIDEO_DIR)")
    weights = tuple(level_weights) if level_weights is not None else tuple(model.manifest.level_weights)
    text = model.encode_text(queries)
    ids, _, _ = model.tokenizer(queries)
    store = index.video_store()
    scores = score(text, store, level_weights=weights, memory_limit_mb=memory_limit_mb)  # (Q, N)
    _check_scores(index, scores, weights)
    best, values = topk(scores, top_k)
    why = explain(text, store, best, level=0)
    results = []
    for q, query in enumerate(queries):
        hits = []
        for rank, (video, value, ex) in enumerate(zip(best[q], values[q], why[q]), start=1):
            row = index.rows[int(video)]
            hits.append(Hit(rank, round(float(value), 6), exact_text(row.rel), row.duration, row.start_s, row.end_s,
                            _timestamp(row, ex.best_frame),
                            _words(model, ids[q], ex.token_positions, ex.per_token_best_frame, row),
                            abs_path=exact_text(row.abs_bytes), path_b64=path_b64(row.rel),
                            abs_path_b64=path_b64(row.abs_bytes), display=row.display))
        results.append(QueryResult(query, bool(text.truncated[q]), hits))
    return results


# Storage rounding moves a score by little: int8 moves a cosine by at most scale / 2 x ||t||_1 <= 0.013 at D = 512
# (fp16 far less); anything past this slack is not rounding.
SCORE_SLACK = 0.05


def _check_scores(index: Index, scores: np.ndarray, weights: Sequence[float]) -> None:
    """A score no stored side can produce (non-finite, or beyond the sum of |level weights| with unit tokens and
    softmaxed weights) comes from damaged shard bytes that the cheap checks cannot see: refuse to rank."""
    bound = float(np.sum(np.abs(weights))) * (1 + SCORE_SLACK)
    bad = ~np.isfinite(scores) | (np.abs(scores) > bound)
    if not bad.any():
        return
    rows = np.unique(np.nonzero(bad)[1])
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
