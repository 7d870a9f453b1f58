"""HBI training losses: per-level InfoNCE, Banzhaf KL against a frozen estimator, and self-distillation.

The total, as the official ``HBI.forward`` (``HBI/models/modeling.py``) computes it, over the levels
l in (entity, action, event):

    loss = sum_l [ InfoNCE(s_l * logit_scale) + skl * BanzhafKL(student_l(S_l), teacher(S_l)) ]
         + kl * sum_{l in (action, event)} [ KL(s_l, s_entity) + KL(s_l^T, s_entity^T) ]

Conventions taken from the official code, on purpose:

* ``KL(p0, p1) = kl_div(log_softmax(p0), softmax(p1), reduction='mean')`` (:func:`kl`): that is
  KL(softmax(p1) || softmax(p0)), the *second* argument being the target, averaged over every element
  ('mean', not 'batchmean').
* Self-distillation compares the raw scores (no logit scale) and does **not** detach the entity level: the entity
  scores also move towards the coarser levels.
* The Banzhaf KL's second ("transposed") term: the official ``banzhaf.T`` on a 3-D (B, Nt, Nv) tensor reverses
  all dims, so its softmax runs over the *batch*. ``transpose="official"`` reproduces that;
  ``transpose="fixed"`` (default) transposes the map, (B, Nv, Nt), so the softmax runs over the words, the
  evident intent (frames-per-word, then words-per-frame). The default is the fix because the official term
  couples unrelated pairs of a batch and changes with the batch size; ``Tensor.T`` on 3-D tensors is also
  deprecated in PyTorch.
* The entity level's student and teacher maps are multiplied by the masks; the action / event levels have no
  masks (their pair mask is all ones), as the official levels.

``kl`` defaults to 2.0, the value of every training command in the official README (the argparse default 0.2
is never used there); ``skl`` to 1.0 (both agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hbi_runtime.errors import UsageError
from hbi_training.banzhaf import BanzhafModule
from hbi_training.levels import LevelOutput

LEVEL_NAMES = ("entity", "action", "event")
TRANSPOSE_MODES = ("fixed", "official")
MAX_LOGIT_SCALE = 100.0


def info_nce(scores: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE of a (B, B) score matrix with matched pairs on the diagonal.

    (CE over videos for each text + CE over texts for each video) / 2, on ``scores * logit_scale``.
    """
    logits = scores * logit_scale
    target = torch.arange(scores.shape[0], device=scores.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def kl(student: torch.Tensor, teacher: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The official KL helper: KL(softmax(teacher) || softmax(student)) along ``dim``, mean over elements."""
    # reduction "none" + mean: the official 'mean' semantics, immune to 'mean' becoming 'batchmean' in PyTorch.
    return F.kl_div(F.log_softmax(student, dim=dim), F.softmax(teacher, dim=dim), reduction="none").mean()


def banzhaf_kl(student: torch.Tensor, teacher: torch.Tensor, transpose: str = "fixed") -> torch.Tensor:
    """KL of (B, Nt, Nv) interaction maps over frames, plus the "transposed" term (see module docstring)."""
    if transpose == "fixed":
        st, tt = student.transpose(1, 2), teacher.transpose(1, 2)  # (B, Nv, Nt): softmax over words
    elif transpose == "official":
        st, tt = student.permute(2, 1, 0), teacher.permute(2, 1, 0)  # x.T on 3-D: (Nv, Nt, B), over the batch
    else:
        raise UsageError(f"unknown Banzhaf KL transpose mode {transpose!r}",
                         hint=f"use one of {', '.join(TRANSPOSE_MODES)}")
    return kl(student, teacher) + kl(st, tt)


def self_distillation(entity: torch.Tensor, coarser: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum over coarser levels of KL towards the entity scores, text-to-video and video-to-text (not detached)."""
    return sum((kl(s, entity) + kl(s.T, entity.T) for s in coarser), entity.new_zeros(()))


@dataclass(frozen=True)
class LossConfig:
    kl: float = 2.0  # self-distillation weight (official README commands; argparse default 0.2)
    skl: float = 1.0  # Banzhaf KL weight
    banzhaf: bool = True  # False: no Banzhaf KL (ablation)
    hierarchy: bool = True  # False: entity level only, no self-distillation (ablation)
    transpose: str = "fixed"  # Banzhaf KL transposed term: "fixed" or "official"
    planes: int = 64  # BanzhafModule width (official 64)

    def __post_init__(self) -> None:
        if self.transpose not in TRANSPOSE_MODES:
            raise UsageError(f"unknown Banzhaf KL transpose mode {self.transpose!r}",
                             hint=f"use one of {', '.join(TRANSPOSE_MODES)}")
        if self.kl < 0 or self.skl < 0:
            raise UsageError(f"loss weights must be >= 0, got kl={self.kl}, skl={self.skl}")

    @property
    def levels(self) -> int:
        return 3 if self.hierarchy else 1


@dataclass
class LossOutput:
    total: torch.Tensor  # scalar, what is back-propagated
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # unweighted named terms, for the log


class HBILoss(nn.Module):
    """The HBI training objective. Holds the trainable Banzhaf students and the frozen teacher.

    Submodule names equal the official ones (``banzhafmodel``, ``banzhafmodel0``, ``banzhafmodel1``,
    ``banzhafteacher``), one student per level. The teacher's parameters never require gradients.
    ``teacher_state`` is the pre-trained estimator (``hbi_training.banzhaf.load_estimator_state``); without it
    the teacher keeps its random initialisation, which is only useful in tests (``hbi-train fit`` refuses it).
    """

    def __init__(self, config: LossConfig | None = None, teacher_state: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.config = config or LossConfig()
        if self.config.banzhaf:
            self.banzhafmodel = BanzhafModule(self.config.planes)
            self.banzhafmodel0 = BanzhafModule(self.config.planes)
            self.banzhafmodel1 = BanzhafModule(self.config.planes)
            self.banzhafteacher = BanzhafModule(self.config.planes)
            if teacher_state is not None:
                self.banzhafteacher.load_state_dict(teacher_state, strict=True)
            self.banzhafteacher.requires_grad_(False)

    def students(self) -> list[BanzhafModule]:
        return [self.banzhafmodel, self.banzhafmodel0, self.banzhafmodel1]

    def forward(self, levels: Sequence[LevelOutput], logit_scale: torch.Tensor) -> LossOutput:
        """levels: entity first (1 or 3 of them, see ``LossConfig.levels``); logit_scale: the exp'd scale."""
        cfg = self.config
        levels = levels[: cfg.levels]
        scale = logit_scale.clamp(max=MAX_LOGIT_SCALE)
        parts: dict[str, torch.Tensor] = {}
        total = scale.new_zeros(())
        for name, level, student in zip(LEVEL_NAMES, levels, self.students() if cfg.banzhaf else [None] * 3):
            parts[f"nce_{name}"] = info_nce(level.scores, scale)
            total = total + parts[f"nce_{name}"]
            if student is not None:
                parts[f"banzhaf_{name}"] = self.banzhaf_term(student, level)
                total = total + cfg.skl * parts[f"banzhaf_{name}"]
        if len(levels) > 1:
            parts["distill"] = self_distillation(levels[0].scores, [lv.scores for lv in levels[1:]])
            total = total + cfg.kl * parts["distill"]
        return LossOutput(total, parts)

    def banzhaf_term(self, student: BanzhafModule, level: LevelOutput) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.banzhafteacher(level.sim.detach()) * level.pair_mask
        return banzhaf_kl(student(level.sim) * level.pair_mask, teacher, self.config.transpose)
