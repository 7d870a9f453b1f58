"""What the losses need from the model: per level, the score matrix of a batch and the matched pairs' maps.

Built only from the model's public parts (``encode_text`` / ``encode_video`` give the sides, ``score_level`` the
WTI score), so training scores exactly what inference scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hbi_export.model.sides import SideLevel, TextSide, VideoSide, score_level


@dataclass(frozen=True)
class LevelOutput:
    """One level (entity, action or event) of a batch of B matched (text, video) pairs."""

    scores: torch.Tensor  # (B, B) WTI score of text a with video b; matched pairs on the diagonal
    sim: torch.Tensor  # (B, Nt, Nv) token similarities of the matched pairs, times pair_mask
    pair_mask: torch.Tensor  # (B, Nt, Nv) text mask x video mask (all ones at the action / event levels)
    text_weight: torch.Tensor  # (B, Nt) the text tokens' softmaxed weights
    video_weight: torch.Tensor  # (B, Nv)


def level_output(t: SideLevel, v: SideLevel) -> LevelOutput:
    """The :class:`LevelOutput` of one level of matched text and video sides (same batch size B)."""
    pair_mask = t.mask[:, :, None] * v.mask[:, None, :]  # (B, Nt, Nv)
    sim = torch.einsum("bid,bjd->bij", t.tokens, v.tokens) * pair_mask  # (B, Nt, Nv)
    return LevelOutput(score_level(t, v), sim, pair_mask, t.weights, v.weights)


def level_outputs(text: TextSide, video: VideoSide, levels: int = 3) -> list[LevelOutput]:
    """The first ``levels`` levels (1 = entity only), in fp32 whatever autocast is active."""
    with torch.autocast(text.levels[0].tokens.device.type, enabled=False):
        return [level_output(t, v) for t, v in zip(text.levels[:levels], video.levels[:levels])]
