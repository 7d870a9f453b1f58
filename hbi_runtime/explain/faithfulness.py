"""Is the interaction map faithful? A deletion test (docs/explain.md, "Faithfulness").

For one matched (caption, video) pair, frames are removed one at a time in some order and the pair's entity-level
score is measured after each removal; the area under that curve (score relative to the full video's, against the
fraction of frames removed, trapezoids; the empty video scores 0 by the model's definition) is small when the
order puts first the frames the match rests on. The orders:

``interaction``
    decreasing total interaction of the frame with the query (the entity map's column sums), ties by time: the
    Banzhaf map's own order, the one the issue asks about;
``value``
    decreasing Banzhaf value of the frame (its main effect, ``E_C[v(C+f) - v(C)]``, from the same coalitions);
``heuristic``
    the current "best frame per token" explanation (``hbi_runtime.scoring.explain``): frames by how many of the
    query's tokens pick them as their best frame, ties by the frame's weighted contribution ``w_v max_i S`` (the
    ``best_frame`` criterion), then by time;
``random``
    uniformly random orders (``random_orders`` of them per video, seeded), averaged.

Two ways of removing a frame, both reported: ``reencode`` (the primary figure) zeroes the frame and clears its bit
in the frame mask before the *video encoder* runs again, exactly as padding, so the temporal transformer and the
weights see the shorter video; ``side`` keeps the encoded side and masks the removed frames' tokens in the
entity-level score (the game's own value function, no re-encoding).

numpy and the runtime only (no torch): the benchmark (``benchmarks/bench_explain.py``) renders the demo's validation
split with ``hbi_training``'s generator first; CI runs the same code on the 8 shipped samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from hbi_runtime.explain.banzhaf import DEFAULT_SAMPLES, DEFAULT_SEED
from hbi_runtime.explain.explainer import level_game, level_map
from hbi_runtime.sides import score_level

ORDERS = ("interaction", "value", "heuristic", "random")
MODES = ("reencode", "side")


def deletion_area(curve: Sequence[float]) -> float:
    """Area under ``curve`` (scores after removing 0, 1, ..., n frames, relative to the first), over the fraction
    of frames removed in [0, 1] (trapezoids)."""
    s = np.asarray(curve, np.float64)
    if len(s) < 2 or s[0] == 0:
        return float("nan")
    y = s / s[0]
    return float(((y[1:] + y[:-1]) / 2).sum() / (len(y) - 1))


def heuristic_order(text_tokens: np.ndarray, text_floor: float, video_tokens: np.ndarray,
                    video_weights: np.ndarray, frames: np.ndarray) -> list[int]:
    """The "best frame per token" order of the valid frame slots ``frames``: votes (tokens whose best frame it
    is), then the weighted contribution ``w_v[j] max_i S[i, j]``, then time."""
    sim = text_tokens @ video_tokens[frames].T  # (valid tokens, valid frames)
    votes = np.bincount(sim.argmax(axis=1), minlength=len(frames))
    contrib = video_weights[frames] * np.maximum(sim.max(axis=0), text_floor)
    order = sorted(range(len(frames)), key=lambda k: (-votes[k], -contrib[k], k))
    return [int(frames[k]) for k in order]


@dataclass(frozen=True)
class PairDeletion:
    """The deletion curves of one pair: per mode and order, the areas (random: their mean over the draws)."""

    video: str
    caption: str
    frames: int
    areas: dict  # {mode: {order: area}}
    curves: dict  # {mode: {order: [scores]}} (random: the first draw)


def _curve_side(text, video, order: Sequence[int]) -> list[float]:
    """Entity scores of the encoded side with the first k frames of ``order`` masked, k = 0 .. n."""
    game = level_game(text, 0, video, 0, 0)
    valid = np.flatnonzero(np.asarray(video.levels[0].mask[0], bool))
    where = {int(j): k for k, j in enumerate(valid)}
    out = []
    present_t = np.ones(game.shape[0], bool)
    present_v = np.ones(game.shape[1], bool)
    out.append(float(game.value(present_t, present_v)))
    for j in order:
        present_v[where[j]] = False
        out.append(float(game.value(present_t, present_v)) if present_v.any() else 0.0)
    return out


def _curves_reencode(model, text, frames: np.ndarray, mask: np.ndarray, orders: Sequence[Sequence[int]]
                     ) -> list[list[float]]:
    """Entity scores after re-encoding the video with the first k frames of each order removed, k = 0 .. n."""
    variants, index = [], []
    for o, order in enumerate(orders):
        for k in range(1, len(order)):  # k = n: no frame left, the model defines the side (and score) as 0
            f, m = frames.copy(), mask.copy()
            f[list(order[:k])] = 0.0
            m[list(order[:k])] = 0
            variants.append((f, m))
            index.append((o, k))
    full = score_level(text.levels[0], model.encode_frames(frames[None], mask[None]).levels[0])[0, 0]
    out = [[float(full)] + [0.0] * (len(order) - 1) + [0.0] for order in orders]
    if variants:
        side = model.encode_frames(np.stack([v[0] for v in variants]), np.stack([v[1] for v in variants]))
        scores = score_level(text.levels[0], side.levels[0])[0]
        for (o, k), s in zip(index, scores):
            out[o][k] = float(s)
    return out


def pair_deletion(model, caption: str, decoded, *, samples: int = DEFAULT_SAMPLES, seed: int = DEFAULT_SEED,
                  random_orders: int = 4, rng: np.random.Generator | None = None, video_name: str = "") -> PairDeletion:
    """The deletion test of one (caption, decoded video) pair (``decoded``: a ``DecodedVideo``)."""
    rng = rng or np.random.default_rng(seed)
    frames, mask = np.asarray(decoded.frames, np.float32), np.asarray(decoded.mask, np.int64)
    text = model.encode_text([caption])
    video = model.encode_frames(frames[None], mask[None])
    words = model.tokenizer.words(caption)
    times = list(range(len(mask)))
    m = level_map(text, video, 0, words=words, max_words=model.manifest.max_words, times=times, samples=samples,
                  seed=seed)
    valid = np.flatnonzero(mask)
    totals, values = m.frame_totals(), m.col_values  # one per valid frame, in slot order
    interaction = [int(valid[k]) for k in sorted(range(len(valid)), key=lambda k: (-totals[k], k))]
    value = [int(valid[k]) for k in sorted(range(len(valid)), key=lambda k: (-values[k], k))]
    t, v = text.levels[0], video.levels[0]
    tm = np.asarray(t.mask[0], bool)
    heuristic = heuristic_order(np.asarray(t.tokens[0], np.float64)[tm], 0.0 if not tm.all() else -np.inf,
                                np.asarray(v.tokens[0], np.float64), np.asarray(v.weights[0], np.float64), valid)
    randoms = [[int(j) for j in rng.permutation(valid)] for _ in range(random_orders)]
    orders = [interaction, value, heuristic, *randoms]
    curves = {"reencode": _curves_reencode(model, text, frames, mask, orders),
              "side": [_curve_side(text, video, o) for o in orders]}
    areas, shown = {}, {}
    for mode, cs in curves.items():
        a = [deletion_area(c) for c in cs]
        fixed = len(ORDERS) - 1
        areas[mode] = {**{o: a[k] for k, o in enumerate(ORDERS[:fixed])},
                       "random": float(np.mean(a[fixed:])) if a[fixed:] else float("nan")}
        shown[mode] = {**{o: cs[k] for k, o in enumerate(ORDERS[:fixed])},
                       "random": cs[fixed] if len(cs) > fixed else []}
    return PairDeletion(video_name, caption, len(valid), areas, shown)


def deletion_test(model, pairs: Sequence[tuple[str, str]], *, samples: int = DEFAULT_SAMPLES,
                  seed: int = DEFAULT_SEED, random_orders: int = 4, workers: int = 1,
                  progress: Callable[[str], None] = lambda _: None) -> dict:
    """The deletion test over ``(caption, video file)`` pairs: per mode and order the mean area (lower: the order
    finds what the match rests on sooner), how often Banzhaf beats the heuristic, and the pairs where it does not.

    Raises:
        BadInputError: a video that cannot be decoded.
    """
    from hbi_runtime.video import VideoDecodeError, VideoDecoder

    rng = np.random.default_rng(seed)
    results: list[PairDeletion] = []
    with VideoDecoder(model.manifest.preprocessing, workers=workers) as pool:  # results come in input order
        decoded_all = pool.decode_many([p for _, p in pairs])
        for k, ((caption, _), (path, decoded)) in enumerate(zip(pairs, decoded_all), start=1):
            if isinstance(decoded, VideoDecodeError):
                raise decoded
            results.append(pair_deletion(model, caption, decoded, samples=samples, seed=seed,
                                         random_orders=random_orders, rng=rng, video_name=str(path)))
            progress(f"deletion: {k}/{len(pairs)} videos")
    summary = {}
    for mode in MODES:
        table = np.array([[r.areas[mode][o] for o in ORDERS] for r in results])  # (pairs, orders)
        ok = np.isfinite(table).all(axis=1)
        table = table[ok]
        col = {o: table[:, i] for i, o in enumerate(ORDERS)}

        def paired(x: str, y: str) -> dict:
            d = col[x] - col[y]
            return {"mean": float(d.mean()), "stderr": float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0,
                    "below": float(np.mean(d < 0)), "equal": float(np.mean(d == 0))}

        kept = [r for r, good in zip(results, ok) if good]
        summary[mode] = {
            "pairs": int(ok.sum()),
            "area": {o: float(col[o].mean()) for o in ORDERS},
            "area_stderr": {o: float(col[o].std(ddof=1) / np.sqrt(len(table))) if len(table) > 1 else 0.0
                            for o in ORDERS},
            "interaction_vs_heuristic": paired("interaction", "heuristic"),
            "interaction_vs_random": paired("interaction", "random"),
            "value_vs_heuristic": paired("value", "heuristic"),
            "value_vs_random": paired("value", "random"),
            "interaction_worse_than_heuristic": [
                {"video": r.video, "caption": r.caption, "interaction": r.areas[mode]["interaction"],
                 "heuristic": r.areas[mode]["heuristic"]}
                for r in kept if r.areas[mode]["interaction"] > r.areas[mode]["heuristic"]],
        }
    return {"schema": "hbi.explain-deletion/1", "model_sha256": model.package.manifest_sha256, "samples": samples,
            "seed": seed, "random_orders": random_orders, "modes": summary,
            "pairs": [{"video": r.video, "caption": r.caption, "frames": r.frames, "areas": r.areas,
                       "curves": r.curves} for r in results]}
