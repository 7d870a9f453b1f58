"""Optimiser and learning-rate schedule: the official fine-tuning recipe, and a from-scratch preset.

Official (``main_retrieval.py`` ``prep_optimizer`` + ``optimization.py`` ``BertAdam``): four parameter groups,
CLIP (names under ``clip.``) at ``lr * coef_lr`` (1e-4 * 1e-3) and everything else at ``lr``, each with and without
weight decay 0.2; betas (0.9, 0.98), eps 1e-6; warmup-cosine over the run with 10 % warmup. We use
``torch.optim.AdamW`` (decoupled decay, the same ``p -= lr * wd * p`` as BertAdam) with two documented
differences: AdamW applies Adam's bias correction (BertAdam has none, which mostly matters in the first few
hundred steps), and clipping is one global norm in the loop (BertAdam additionally clips each tensor to norm 1).

No-decay rule: ``"ndim"`` (default) exempts every parameter with fewer than 2 dimensions: biases, LayerNorm /
BatchNorm gains, ``logit_scale`` and the ViT class embedding (open_clip's convention; "no decay for bias and
LayerNorm", whatever the module is called). ``"official"`` is the official substring rule
(``bias``, ``LayerNorm.bias``, ``LayerNorm.weight`` in the name); CLIP's norms are named ``ln_*``, so in practice it
exempts only biases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable

import torch
from torch import nn

from hbi_runtime.errors import UsageError

NO_DECAY_RULES = ("ndim", "official")
OFFICIAL_NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4  # official --lr
    clip_lr_coef: float = 1e-3  # official --coef_lr: CLIP towers learn 1000x slower than the new parts
    weight_decay: float = 0.2  # official --weight_decay
    warmup: float = 0.1  # fraction of the run (official --warmup_proportion)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    no_decay: str = "ndim"

    def __post_init__(self) -> None:
        if self.no_decay not in NO_DECAY_RULES:
            raise UsageError(f"unknown no-decay rule {self.no_decay!r}", hint=f"use one of {NO_DECAY_RULES}")
        if not (0.0 <= self.warmup < 1.0) or self.lr <= 0 or self.clip_lr_coef < 0 or self.weight_decay < 0:
            raise UsageError(f"invalid optimiser settings: lr={self.lr}, clip_lr_coef={self.clip_lr_coef}, "
                             f"weight_decay={self.weight_decay}, warmup={self.warmup} (warmup must be in [0, 1))")


# "finetune": the official recipe, starting from CLIP / HBI weights. "scratch": for a randomly initialised model
# (the synthetic-data demo): the CLIP towers have learnt nothing, so they train at the full rate, with a higher
# base rate and lighter decay suited to a small model and short runs.
PRESETS: dict[str, OptimConfig] = {
    "finetune": OptimConfig(),
    "scratch": OptimConfig(lr=5e-4, clip_lr_coef=1.0, weight_decay=0.05),
}


def preset(name: str, **overrides) -> OptimConfig:
    """A named preset with some fields replaced (``None`` values are ignored)."""
    if name not in PRESETS:
        raise UsageError(f"unknown optimiser preset {name!r}", hint=f"use one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def is_clip(name: str) -> bool:
    """CLIP tower parameters (our and the official naming: the ``clip.`` prefix)."""
    return name.startswith("clip.")


def decays(name: str, param: torch.Tensor, rule: str) -> bool:
    if rule == "official":
        return not any(nd in name for nd in OFFICIAL_NO_DECAY)
    return param.ndim >= 2


def param_groups(named: Iterable[tuple[str, nn.Parameter]], config: OptimConfig) -> list[dict]:
    """The official four groups (CLIP or not x decay or not), without empty or frozen ones.

    Each group carries a ``name`` (e.g. ``"clip/decay"``) for the metrics log.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in named:
        if p.requires_grad:
            groups.setdefault((is_clip(name), decays(name, p, config.no_decay)), []).append(p)
    out = []
    for (clip, decay), params in sorted(groups.items(), reverse=True):
        out.append({"params": params, "name": f"{'clip' if clip else 'new'}/{'decay' if decay else 'no_decay'}",
                    "lr": config.lr * (config.clip_lr_coef if clip else 1.0),
                    "weight_decay": config.weight_decay if decay else 0.0})
    return out


def build_optimizer(named: Iterable[tuple[str, nn.Parameter]], config: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(named, config)
    if not groups:
        raise UsageError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def warmup_cosine(progress: float, warmup: float) -> float:
    """The official schedule: linear warmup to 1 over ``warmup``, then 0.5 (1 + cos(pi * progress)).

    As in the official code the cosine runs over the whole run (it is not restarted after warmup), so it starts
    at cos(pi * warmup) rather than 1, and the very first step has rate 0.
    """
    if progress < warmup:
        return progress / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float):
    """Per-step LambdaLR of :func:`warmup_cosine` over ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step / max(total_steps, 1), warmup))
