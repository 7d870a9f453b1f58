"""Sides: what a text or a video becomes, and the score of a (text side, video side) pair of batches.

A side holds, per level (entity, action, event), the L2-normalised tokens, their softmaxed weights and the valid
mask. Everything per-modality is done once when the side is made; scoring is only the weighted max interaction.
The same structure exists in numpy in ``hbi_runtime.sides`` (the runtime and the index use that one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hbi_runtime.errors import UsageError

LEVELS = ("entity", "action", "event")


@dataclass(frozen=True)
class SideLevel:
    tokens: torch.Tensor  # (n, N, D) L2-normalised
    weights: torch.Tensor  # (n, N) softmaxed over N; 0 at padded positions
    mask: torch.Tensor  # (n, N) float 0/1; all ones at the action/event levels


@dataclass(frozen=True)
class Side:
    levels: tuple[SideLevel, SideLevel, SideLevel]

    def __len__(self) -> int:
        return self.levels[0].tokens.shape[0]

    def select(self, index: torch.Tensor | slice) -> "Side":
        """The side of a subset of the batch (same type)."""
        return type(self)(tuple(SideLevel(lv.tokens[index], lv.weights[index], lv.mask[index])
                                for lv in self.levels))


class TextSide(Side):
    """Side of a batch of texts."""


class VideoSide(Side):
    """Side of a batch of videos."""


def score_level(t: SideLevel, v: SideLevel, video_chunk: int = 256) -> torch.Tensor:
    """Weighted token-wise interaction of one level: (Bt, Bv).

    S[a,b,i,j] = <t_ai, v_bj> * tmask[a,i] * vmask[b,j] (masked entries are 0, not -inf, so a padded
    position can win the max when all real similarities are negative, exactly as the official entity level);
    score = (sum_i wt[a,i] max_j S + sum_j wv[b,j] max_i S) / 2. Videos are processed in chunks to bound the
    (Bt, chunk, Nt, Nv) intermediate.
    """
    out = []
    for start in range(0, v.tokens.shape[0], video_chunk):
        vt, vw, vm = (x[start:start + video_chunk] for x in (v.tokens, v.weights, v.mask))
        sim = torch.einsum("aid,bjd->abij", t.tokens, vt)  # (Bt, b, Nt, Nv)
        sim = sim * t.mask[:, None, :, None] * vm[None, :, None, :]
        t2v = torch.einsum("abi,ai->ab", sim.max(dim=-1).values, t.weights)
        v2t = torch.einsum("abj,bj->ab", sim.max(dim=-2).values, vw)
        out.append((t2v + v2t) / 2)
    return torch.cat(out, dim=1)


def score_levels(text: TextSide, video: VideoSide) -> torch.Tensor:
    """All three level scores: (3, Bt, Bv)."""
    return torch.stack([score_level(t, v) for t, v in zip(text.levels, video.levels)])


def score(text: TextSide, video: VideoSide, level_weights: tuple[float, float, float]) -> torch.Tensor:
    """sum_l w_l * score_l, (Bt, Bv). Levels of weight 0 are skipped (sides are always finite)."""
    if not isinstance(text, TextSide) or not isinstance(video, VideoSide):
        raise UsageError("score(text_side, video_side): arguments must be a TextSide and a VideoSide, in order")
    ref = text.levels[0].tokens
    total = torch.zeros(len(text), len(video), dtype=ref.dtype, device=ref.device)
    for w, t, v in zip(level_weights, text.levels, video.levels):
        if w != 0.0:
            total = total + w * score_level(t, v)
    return total
