"""The accuracy gate: an INT8 video encoder against the fp32 (or fp16) one on held-out videos.

Measured every attempt (metrics from :mod:`hbi_runtime.compare`, recall from :mod:`hbi_runtime.search`):

- feature agreement: per level, the worst per-video cosine and the max abs difference of the video tokens;
- with captions: the text -> video score matrix (the package's interaction graph, fp32 text side) of the reference
  and the INT8 video sides: top-1 / top-5 / top-10 agreement and Spearman per direction, and R@1/5/10 of both;
  **the gate: R@1 drops by at most ``max_r1_drop`` points (default 1)**;
- without captions there is no text to rank, so the score matrix is video -> video (each held-out video against
  the others, HBI's score with the package's level weights, self excluded): top-1 / top-5 agreement and
  Spearman; **the gate: top-1 agreement at least ``min_top1`` (default 0.95, ``TOLERANCES["int8"]``)**.

Any non-finite output fails every gate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hbi_runtime.compare import (TOLERANCES, compare_scores, compare_tensors, spearman_rows, top1_agreement_rows,
                                 topk_overlap_rows)
from hbi_runtime.errors import UsageError
from hbi_runtime.search import recall_metrics
from hbi_runtime.sides import score_level

DEFAULT_MAX_R1_DROP = 1.0  # points of R@1 (docs/calibration.md, "The accuracy gate")
DEFAULT_MIN_TOP1 = TOLERANCES["int8"].top1  # 0.95


@dataclass(frozen=True)
class Criteria:
    """The gate's thresholds (``max_r1_drop`` in R@1 points; ``min_top1`` a fraction)."""

    max_r1_drop: float = DEFAULT_MAX_R1_DROP
    min_top1: float = DEFAULT_MIN_TOP1

    def __post_init__(self) -> None:
        if not np.isfinite(self.max_r1_drop) or not np.isfinite(self.min_top1):
            raise UsageError("--max-r1-drop and --min-top1 must be finite numbers")

    def describe(self, captions: bool) -> str:
        return (f"t2v R@1 drop <= {self.max_r1_drop:g} points" if captions
                else f"video->video top-1 agreement >= {self.min_top1:g}")


@dataclass
class Reference:
    """What the reference package computed on the held-out videos (computed once, reused by every attempt)."""

    video: object  # VideoSide
    text: object | None  # TextSide of the captions, or None
    truth: np.ndarray | None  # per caption, the held-out row of its video
    level_weights: np.ndarray

    @property
    def captions(self) -> bool:
        return self.text is not None


def make_reference(model, frames: np.ndarray, mask: np.ndarray, captions: list[list[str]] | None) -> Reference:
    """Encode the held-out videos (and their captions, one list per video) with the reference ``model``."""
    video = model.encode_frames(frames, mask, batch_size=4)
    text = truth = None
    if captions:
        flat = [(row, c) for row, caps in enumerate(captions) for c in caps]
        text = model.encode_text([c for _, c in flat])
        truth = np.array([row for row, _ in flat])
    return Reference(video, text, truth, np.asarray(model.manifest.level_weights, dtype=np.float32))


def _video_video(side, weights: np.ndarray) -> np.ndarray:
    """``(n, n - 1)``: each video's HBI score against every other video (the diagonal, itself, removed)."""
    n = side.n
    s = sum(w * score_level(lv, lv) for w, lv in zip(weights, side.levels) if w)  # (n, n)
    return s[~np.eye(n, dtype=bool)].reshape(n, n - 1)


def _t2v_ranks(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """0-based rank of each caption's own video (ties optimistic, as the official metrics and hbi-run eval)."""
    return (scores > scores[np.arange(len(truth)), truth][:, None]).sum(axis=1)


def measure(model, ref: Reference, test_video) -> dict:
    """Every metric of one attempt (``model`` scores the sides with the reference package's interaction graph)."""
    features = {}
    for i, (a, b) in enumerate(zip(ref.video.levels, test_video.levels)):
        c = compare_tensors(f"video_tokens_l{i}", a.tokens, b.tokens)
        features[c.name] = {"cosine_min": c.cosine_min, "max_abs": c.max_abs, "finite": c.failure is None}
    out = {"held_out_videos": ref.video.n, "features": features}
    if ref.captions:
        s_ref, s_test = model.score(ref.text, ref.video), model.score(ref.text, test_video)
        cmp = compare_scores("scores", s_ref, s_test, ks=(1, 5, 10))
        r_ref, r_test = recall_metrics(_t2v_ranks(s_ref, ref.truth)), recall_metrics(_t2v_ranks(s_test, ref.truth))
        out["scores"] = {"kind": "text->video", "captions": int(ref.text.n), "t2v": cmp.t2v.to_dict(),
                         "v2t": cmp.v2t.to_dict(), "finite": cmp.failure is None}
        out["recall"] = {"reference": {k: r_ref[k] for k in ("R@1", "R@5", "R@10")},
                         "int8": {k: r_test[k] for k in ("R@1", "R@5", "R@10")},
                         "r1_drop": round(r_ref["R@1"] - r_test["R@1"], 2)}
    else:
        a, b = (_video_video(side, ref.level_weights).astype(np.float64) for side in (ref.video, test_video))
        finite = bool(np.isfinite(b).all())
        out["scores"] = {"kind": "video->video (self excluded)", "top1": float(top1_agreement_rows(a, b).mean()),
                         "top5": float(topk_overlap_rows(a, b, 5).mean()),
                         "spearman": float(spearman_rows(a, b).mean()) if finite else float("nan"),
                         "finite": finite}
    return out


def decide(metrics: dict, criteria: Criteria) -> tuple[bool, list[str]]:
    """(passed, one PASS / FAIL line per check) for one attempt's metrics."""
    lines, ok = [], True

    def check(passed: bool, text: str) -> None:
        nonlocal ok
        ok &= passed
        lines.append(f"{'PASS' if passed else 'FAIL'} {text}")

    finite = metrics["scores"]["finite"] and all(f["finite"] for f in metrics["features"].values())
    check(finite, "all outputs finite")
    if "recall" in metrics:
        drop = metrics["recall"]["r1_drop"]
        check(finite and drop <= criteria.max_r1_drop,
              f"t2v R@1 {metrics['recall']['reference']['R@1']:.2f} -> {metrics['recall']['int8']['R@1']:.2f} "
              f"(drop {drop:.2f} points, needs <= {criteria.max_r1_drop:g})")
    else:
        top1 = metrics["scores"]["top1"]
        check(finite and top1 >= criteria.min_top1,
              f"video->video top-1 agreement {top1:.4f} (needs >= {criteria.min_top1:g})")
    return ok, lines
