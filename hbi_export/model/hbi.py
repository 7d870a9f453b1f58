"""The reference HBI retrieval model: encode texts and videos into sides once, score any pair of batches.

Computes what the official HBI model (jpthu17/HBI, ``models/modeling.py``) computes at inference, with three
deliberate differences documented in docs/architecture.md: index tie-break instead of random noise, per-sample
masked fill in DPC-kNN, and fp16-safe finite masks with a defined result for inputs with no valid position.
"""

from __future__ import annotations

import torch
from torch import nn

from hbi_export.model.clip import ClipTowers
from hbi_export.model.config import HBIConfig
from hbi_export.model.layers import MASK_NEG, Transformer, key_padding_bias
from hbi_export.model.merge import CLUSTER_CHECK_RTOL, CTM, TCBlock, merge_check
from hbi_export.model.sides import SideLevel, TextSide, VideoSide, score, score_levels
from hbi_runtime.errors import BadInputError


def _weight_head(dim: int) -> nn.Sequential:
    """Linear(D, 2D) -> ReLU -> Linear(2D, 1): one token-weight logit per token."""
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, 1))


class HBIModel(nn.Module):
    """HBI retrieval model. Submodule names equal the official checkpoint keys (minus training-only parts)."""

    def __init__(self, config: HBIConfig) -> None:
        super().__init__()
        self.config = config
        d, k = config.embed_dim, config.knn_k
        self.clip = ClipTowers(config)
        self.frame_position_embeddings = nn.Embedding(config.frame_positions, d)
        # seqTransf: TF-style LayerNorm with eps 1e-12, as the official module_cross.Transformer.
        self.transformerClip = Transformer(d, config.temporal_layers, config.temporal_heads, ln_eps=1e-12)
        for name in ("text_weight_fc", "video_weight_fc", "text_weight_fc0", "video_weight_fc0",
                     "text_weight_fc1", "video_weight_fc1"):
            self.add_module(name, _weight_head(d))
        for prefix, ratios in (("t", config.text_ratios), ("v", config.video_ratios)):
            for level, ratio in enumerate(ratios):
                self.add_module(f"{prefix}_ctm{level}", CTM(d, ratio, k))
                self.add_module(f"{prefix}_block{level}", TCBlock(d, config.merge_heads))

    # ------------------------------------------------------------------ features
    def text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: (Bt, L) -> (Bt, L, D) token features, padding positions included."""
        _check_lengths("text", ids.shape[-1], self.config.text.context_length, "context length")
        return self.clip.encode_text(ids, mask)

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: (Bv, T, 3, H, W) -> (Bv, T, D) CLS features. Zero (padding) frames are encoded too."""
        if frames.dim() != 5:
            raise BadInputError(f"frames must be (videos, T, 3, H, W), got shape {tuple(frames.shape)}")
        b, t = frames.shape[:2]
        return self.clip.visual(frames.flatten(0, 1)).view(b, t, -1)

    def temporal(self, cls: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """seqTransf: transformer(cls + pos, key mask) + cls (the residual skips the position embedding)."""
        _check_lengths("video", cls.shape[1], self.config.frame_positions, "frame position table")
        x = cls + self.frame_position_embeddings.weight[: cls.shape[1]]
        return self.transformerClip(x, key_padding_bias(frame_mask)) + cls

    def video_features(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """frames (Bv, T, 3, H, W), frame_mask (Bv, T) -> (Bv, T, D)."""
        return self.temporal(self.frame_features(frames), frame_mask)

    # ------------------------------------------------------------------ sides
    def text_side(self, feats: torch.Tensor, mask: torch.Tensor, clusters: list | None = None) -> TextSide:
        """(Bt, L, D) features + (Bt, L) mask -> TextSide (``clusters``: see :func:`_make_levels`)."""
        heads = (self.text_weight_fc, self.text_weight_fc0, self.text_weight_fc1)
        merges = ((self.t_ctm0, self.t_block0), (self.t_ctm1, self.t_block1))
        return TextSide(_make_levels(feats, mask, heads, merges, clusters))

    def video_side(self, feats: torch.Tensor, mask: torch.Tensor, clusters: list | None = None) -> VideoSide:
        """(Bv, T, D) features + (Bv, T) mask -> VideoSide (``clusters``: see :func:`_make_levels`)."""
        heads = (self.video_weight_fc, self.video_weight_fc0, self.video_weight_fc1)
        merges = ((self.v_ctm0, self.v_block0), (self.v_ctm1, self.v_block1))
        return VideoSide(_make_levels(feats, mask, heads, merges, clusters))

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> TextSide:
        mask = mask.to(torch.float32)
        return self.text_side(self.text_features(ids, mask), mask)

    def encode_video(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> VideoSide:
        frame_mask = frame_mask.to(torch.float32)
        return self.video_side(self.video_features(frames, frame_mask), frame_mask)

    def encode_text_clusters(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[TextSide, Clusters]:
        """:meth:`encode_text` and which tokens each merged token merged (:data:`Clusters`)."""
        mask = mask.to(torch.float32)
        found: list = []
        side = self.text_side(self.text_features(ids, mask), mask, found)
        return side, _clusters(found)

    def encode_video_clusters(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[VideoSide, Clusters]:
        """:meth:`encode_video` and which frames each merged token merged (:data:`Clusters`)."""
        frame_mask = frame_mask.to(torch.float32)
        found: list = []
        side = self.video_side(self.video_features(frames, frame_mask), frame_mask, found)
        return side, _clusters(found)

    # ------------------------------------------------------------------ scores
    def score(self, text: TextSide, video: VideoSide,
              level_weights: tuple[float, float, float] | None = None) -> torch.Tensor:
        """(Bt, Bv) combined score; ``level_weights`` defaults to the config's (official eval: [1, 0, 0])."""
        return score(text, video, level_weights or self.config.level_weights)

    def score_levels(self, text: TextSide, video: VideoSide) -> torch.Tensor:
        """(3, Bt, Bv): entity, action and event scores."""
        return score_levels(text, video)


# Which tokens each merged token merged: (level-1 cluster of each level-0 token (B, N0), level-2 cluster of each
# level-1 token (B, N1), per merge 1.0 when the assignment reproduces the merged tokens, i.e. merge_check <=
# CLUSTER_CHECK_RTOL, else 0.0 (B, 2)), all float32 (the indices are exact small integers).
Clusters = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _clusters(found: list) -> Clusters:
    (a1, c1), (a2, c2) = found
    return a1.float(), a2.float(), (torch.stack([c1, c2], dim=1) <= CLUSTER_CHECK_RTOL).float()


def _make_levels(feats, mask, heads, merges, clusters: list | None = None) -> tuple[SideLevel, SideLevel, SideLevel]:
    """The three levels of one modality (``clusters``: a list that receives, per merge, the assignment of the
    merge's input tokens and its :func:`~hbi_export.model.merge.merge_check`).

    Entity: weights softmaxed over valid positions only; similarities later multiplied by the mask.
    Action / event: CTM + TCBlock merges (level-1 CTM masked, level-2 unmasked), plain softmax weights over
    all clusters, including empty ones, and no mask, exactly as the official action/event levels.
    An input with no valid position gets zero tokens, zero weights and a zero mask at every level, so each of
    its scores is exactly 0 (the official code yields NaN there).
    """
    nonempty = mask.sum(dim=-1) > 0  # (B,)
    logits = heads[0](feats).squeeze(-1)  # (B, N) from un-normalised features
    weights = torch.where(mask > 0, logits, torch.full_like(logits, MASK_NEG)).float().softmax(dim=-1)
    levels = [_level(feats, weights, mask, nonempty)]
    x, level_mask = feats, mask
    for head, (ctm, block) in zip(heads[1:], merges):
        merged, tokens, token_score = ctm(x, level_mask)
        if clusters is not None:
            assign = ctm.assignment(tokens, level_mask)
            clusters.append((assign, merge_check(tokens, token_score, assign, merged)))
        x, level_mask = block(merged, tokens, token_score), None
        ones = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
        levels.append(_level(x, head(x).squeeze(-1).float().softmax(dim=-1), ones, nonempty))
    return tuple(levels)


def _level(x: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor, nonempty: torch.Tensor) -> SideLevel:
    """A side level, always in fp32 (normalisation and weights computed in fp32 also for an fp16 model)."""
    keep = nonempty.float()[:, None]
    tokens = nn.functional.normalize(x.float(), dim=-1, eps=1e-6) * keep[:, :, None]  # eps finite in fp16
    return SideLevel(tokens, weights.float() * keep, mask.float() * keep)


def _check_lengths(kind: str, n: int, limit: int, what: str) -> None:
    if n > limit:
        raise BadInputError(f"{kind} length {n} exceeds the model's {what} ({limit})",
                            hint=f"use at most {limit} {'tokens' if kind == 'text' else 'frames'}")
