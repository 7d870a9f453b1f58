"""The official-compatible video QA model: HBI encoders plus one answer classifier per level.

What the official release computes (jpthu17/HBI ``HBI/models/modeling_qa.py``; reference/hbi-official.md §1.10),
written independently here on top of :class:`hbi_export.model.HBIModel` (CLIP towers, seqTransf, CTM / TCBlock):

* the question alone is the text input; text tokens ``[B, L, D]`` (all positions) and video tokens ``[B, T, D]``;
* per level (entity, action, event) a pooled vector per modality: ``alpha = softmax(w(x))`` over *all* tokens
  (no padding mask in the softmax), ``p = sum alpha * x * mask`` (the entity level zeroes padded tokens after the
  softmax; the merged action / event tokens carry no mask), ``w`` = ``Linear(D, D) -> ReLU -> Linear(D, 1)``;
* ``z = concat(v_proj(p_video), t_proj(p_text))`` (video first), ``logits = Linear(2P, 4P) -> ReLU ->
  Linear(4P, answers)``, with ``P = 4 D`` in the official model (``proj_dim``) and 1500 answers;
* the answer logits are ``0.4 * entity + 0.4 * action + 0.2 * event`` (``answer_weights``).

Module names equal the official checkpoint keys: ``t_weight`` / ``v_weight`` / ``t_proj`` / ``v_proj`` /
``classifier`` for the entity level, suffixes ``0`` / ``1`` for the action / event levels, and the retrieval
parts (``clip.*``, ``transformerClip.*``, ``*_weight_fc*``, ``{t,v}_ctm*``, ``{t,v}_block*``) under their usual
names; the retrieval weight heads are trained by the official QA objective but unused by its answer path.

Every step up to the pooled vectors is per modality, so a question's and a video's pooled vectors are computed
once (:meth:`QAModel.encode_question`, :meth:`QAModel.encode_video_qa`) and only :meth:`QAModel.answer_logits`
runs per (question, video) pair. The QA merge ratios are text 0.25 / 0.125 and video 0.25 / 0.25 (hard-coded in
the official QA model; ``QAConfig.official`` sets them).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hbi_export.model.config import HBIConfig
from hbi_export.model.hbi import HBIModel
from hbi_runtime.errors import ConfigError

LEVEL_SUFFIXES = ("", "0", "1")  # entity, action, event (official key suffixes)
OFFICIAL_ANSWERS = 1500  # main_vqa.py forces num_labels = 1500
OFFICIAL_ANSWER_WEIGHTS = (0.4, 0.4, 0.2)  # main_vqa.py --rate
OFFICIAL_TEXT_RATIOS = (0.25, 0.125)  # modeling_qa.py t_ctm0 / t_ctm1
OFFICIAL_VIDEO_RATIOS = (0.25, 0.25)  # modeling_qa.py v_ctm0 / v_ctm1
OFFICIAL_MAX_WORDS, OFFICIAL_MAX_FRAMES = 32, 12  # README MSRVTT-QA command


@dataclass(frozen=True)
class QAConfig:
    """The QA model: the HBI encoder config plus the answer heads.

    ``proj_dim`` (P) is the width of ``v_proj`` / ``t_proj`` (official: 4 D); the classifier is
    ``Linear(2P, hidden) -> ReLU -> Linear(hidden, answers)`` with ``hidden`` = ``hidden_dim`` (official: 4P = 16 D).
    ``None`` means the official relation. ``answer_weights`` combine the entity / action / event logits.
    """

    model: HBIConfig = field(default_factory=HBIConfig)
    answers: int = OFFICIAL_ANSWERS
    proj_dim: int | None = None
    hidden_dim: int | None = None
    answer_weights: tuple[float, float, float] = OFFICIAL_ANSWER_WEIGHTS

    def __post_init__(self) -> None:
        object.__setattr__(self, "answer_weights", tuple(float(w) for w in self.answer_weights))
        if not isinstance(self.model, HBIConfig):
            raise ConfigError(f"QAConfig.model must be an HBIConfig, got {type(self.model).__name__}")
        if not isinstance(self.answers, int) or self.answers < 1:
            raise ConfigError(f"answers must be a positive integer, got {self.answers!r}")
        for name in ("proj_dim", "hidden_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or null, got {value!r}")
        if len(self.answer_weights) != 3 or not all(math.isfinite(w) for w in self.answer_weights):
            raise ConfigError(f"answer_weights must be three finite numbers, got {list(self.answer_weights)}")

    @property
    def proj(self) -> int:
        return self.proj_dim or 4 * self.model.embed_dim

    @property
    def hidden(self) -> int:
        return self.hidden_dim or 4 * self.proj

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "answers": self.answers, "proj_dim": self.proj_dim,
                "hidden_dim": self.hidden_dim, "answer_weights": list(self.answer_weights)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QAConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        try:
            d = dict(d)
            model = HBIConfig.from_dict(d.pop("model", {}))
            return cls(model=model, **d)
        except TypeError as exc:
            raise ConfigError(f"invalid QA config: {exc}") from None

    def replace(self, **changes: Any) -> "QAConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def official(cls, **overrides: Any) -> "QAConfig":
        """The released MSRVTT-QA model: CLIP ViT-B/16, QA merge ratios, 1500 answers, 0.4 / 0.4 / 0.2."""
        model = HBIConfig.vit_b_16(text_ratios=OFFICIAL_TEXT_RATIOS, video_ratios=OFFICIAL_VIDEO_RATIOS)
        return cls(model=model, **overrides)

    @classmethod
    def tiny(cls, answers: int = 7, **overrides: Any) -> "QAConfig":
        """A test-sized QA model (``HBIConfig.tiny`` with the QA ratios; official head relations)."""
        model = HBIConfig.tiny(text_ratios=OFFICIAL_TEXT_RATIOS, video_ratios=OFFICIAL_VIDEO_RATIOS)
        return cls(model=model, answers=answers, **overrides)


def _pool_head(dim: int) -> nn.Sequential:
    """Linear(D, D) -> ReLU -> Linear(D, 1): the official ``t_weight`` / ``v_weight``."""
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))


def _classifier(in_dim: int, hidden: int, answers: int) -> nn.Sequential:
    """Linear(2P, H) -> ReLU -> Linear(H, answers) (dropout at index 1 in training is the identity at eval)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, answers))


def pool(x: torch.Tensor, head: nn.Module, mask: torch.Tensor | None) -> torch.Tensor:
    """``sum_n softmax_n(head(x)) * x_n * mask_n``: (B, N, D) -> (B, D). The softmax runs over every token."""
    alpha = head(x).squeeze(-1).float().softmax(dim=-1).to(x.dtype)  # (B, N)
    if mask is not None:
        alpha = alpha * mask.to(x.dtype)
    return torch.einsum("bnd,bn->bd", x, alpha)


class QAModel(HBIModel):
    """HBI video QA (classifier over a fixed answer vocabulary). See the module docstring."""

    def __init__(self, config: QAConfig) -> None:
        super().__init__(config.model)
        self.qa_config = config
        d = config.model.embed_dim
        for suffix in LEVEL_SUFFIXES:
            self.add_module(f"t_weight{suffix}", _pool_head(d))
            self.add_module(f"v_weight{suffix}", _pool_head(d))
            self.add_module(f"t_proj{suffix}", nn.Linear(d, config.proj))
            self.add_module(f"v_proj{suffix}", nn.Linear(d, config.proj))
            self.add_module(f"classifier{suffix}", _classifier(2 * config.proj, config.hidden, config.answers))

    # ------------------------------------------------------------------ per modality
    def _levels(self, feats: torch.Tensor, mask: torch.Tensor, prefix: str) -> tuple[torch.Tensor, ...]:
        """Pooled (B, D) vectors at the entity, action and event levels of one modality (``t`` or ``v``)."""
        heads = [getattr(self, f"{prefix}_weight{s}") for s in LEVEL_SUFFIXES]
        pooled = [pool(feats, heads[0], mask)]
        x, level_mask = feats, mask
        for level in (0, 1):
            merged, tokens, score = getattr(self, f"{prefix}_ctm{level}")(x, level_mask)
            x, level_mask = getattr(self, f"{prefix}_block{level}")(merged, tokens, score), None
            pooled.append(pool(x, heads[level + 1], None))
        return tuple(pooled)

    def encode_question(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ids, mask (B, L) -> three pooled question vectors (B, D)."""
        mask = mask.to(torch.float32)
        return self._levels(self.text_features(ids, mask), mask, "t")

    def encode_video_qa(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """frames (B, T, 3, H, W), frame_mask (B, T) -> three pooled video vectors (B, D)."""
        frame_mask = frame_mask.to(torch.float32)
        return self._levels(self.video_features(frames, frame_mask), frame_mask, "v")

    # ------------------------------------------------------------------ per pair
    def level_logits(self, question: tuple[torch.Tensor, ...], video: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Pooled vectors of paired rows -> (3, B, answers) logits of the entity, action and event classifiers."""
        out = []
        for suffix, t, v in zip(LEVEL_SUFFIXES, question, video):
            z = torch.cat([getattr(self, f"v_proj{suffix}")(v), getattr(self, f"t_proj{suffix}")(t)], dim=-1)
            out.append(getattr(self, f"classifier{suffix}")(z))
        return torch.stack(out)

    def answer_logits(self, question, video, answer_weights=None) -> torch.Tensor:
        """(B, answers): ``sum_l w_l * logits_l`` (default weights: the config's, official 0.4 / 0.4 / 0.2)."""
        w = torch.as_tensor(answer_weights if answer_weights is not None else self.qa_config.answer_weights,
                            dtype=torch.float32)
        return torch.einsum("l,lba->ba", w, self.level_logits(question, video))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, frames: torch.Tensor,
                frame_mask: torch.Tensor) -> torch.Tensor:
        """One question per video (paired rows): (B, answers) logits, as the official ``forward`` at eval."""
        return self.answer_logits(self.encode_question(ids, mask), self.encode_video_qa(frames, frame_mask))


__all__ = ["LEVEL_SUFFIXES", "OFFICIAL_ANSWERS", "OFFICIAL_ANSWER_WEIGHTS", "QAConfig", "QAModel",
           "pool"]
