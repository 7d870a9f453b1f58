"""Training tasks: what the loop optimises. The loop (``hbi_training.loop``) owns optimiser, schedule, AMP, data
order, checkpoints and logs; a task owns its modules, its loss, and how its weights are saved and restored.

:class:`HBITask` trains the retrieval model with :class:`~hbi_training.losses.HBILoss`;
``hbi_training.estimator.EstimatorTask`` trains the Banzhaf estimator.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from hbi_runtime.errors import CheckpointError
from hbi_training.levels import level_outputs
from hbi_training.losses import MAX_LOGIT_SCALE, HBILoss, LossOutput

Batch = tuple  # (input_ids, text_mask, frames, frame_mask, video_ids)


class Task(Protocol):
    name: str

    def to(self, device: torch.device) -> "Task": ...
    def train(self, mode: bool = True) -> None: ...
    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]: ...
    def loss(self, batch: Batch) -> LossOutput: ...
    def after_step(self) -> None: ...
    def save_weights(self, directory: Path) -> None: ...
    def load_weights(self, directory: Path) -> None: ...
    def extra_state(self) -> dict[str, Any]: ...
    def load_extra_state(self, state: dict[str, Any]) -> None: ...
    def validate(self, dataset, batch_size: int, device: torch.device) -> dict[str, float]: ...


def to_device(batch: Batch, device: torch.device) -> Batch:
    ids, tmask, frames, fmask, vids = batch
    nb = device.type == "cuda"
    return (ids.to(device, non_blocking=nb), tmask.to(device, non_blocking=nb),
            frames.to(device, non_blocking=nb), fmask.to(device, non_blocking=nb), vids)


class HBITask:
    """The HBI model plus its loss (Banzhaf students and teacher included)."""

    name = "hbi"

    def __init__(self, model: nn.Module, loss: HBILoss) -> None:
        self.model, self.criterion = model, loss

    def to(self, device: torch.device) -> "HBITask":
        self.model.to(device)
        self.criterion.to(device)
        return self

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        self.criterion.train(mode)

    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Model parameters under their own names (``clip.*`` = CLIP), then the students (``banzhafmodel*``)."""
        return itertools.chain(self.model.named_parameters(), self.criterion.named_parameters())

    def loss(self, batch: Batch) -> LossOutput:
        ids, tmask, frames, fmask, _ = batch
        text = self.model.encode_text(ids, tmask)
        video = self.model.encode_video(frames, fmask)
        levels = level_outputs(text, video, self.criterion.config.levels)
        with torch.autocast(ids.device.type, enabled=False):
            return self.criterion(levels, self.model.clip.logit_scale.float().exp())

    @torch.no_grad()
    def after_step(self) -> None:
        """Clamp the temperature as the official loop does after every step: logit_scale <= log(100)."""
        self.model.clip.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))

    def save_weights(self, directory: Path) -> None:
        from hbi_export.checkpoints import save_model

        save_model(self.model, directory)

    def load_weights(self, directory: Path) -> None:
        from hbi_export.checkpoints import load_checkpoint

        state, config, _ = load_checkpoint(directory)
        if config.to_dict() != self.model.config.to_dict():
            raise CheckpointError(f"{directory}: the checkpoint's model config differs from this run's",
                                  hint="resume with the same --preset / --init as the original run")
        self.model.load_state_dict(state, strict=True)

    def extra_state(self) -> dict[str, Any]:
        return {"criterion": self.criterion.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.criterion.load_state_dict(state["criterion"], strict=True)

    def validate(self, dataset, batch_size: int, device: torch.device) -> dict[str, float]:
        from hbi_training.evaluate import retrieval_recall

        return retrieval_recall(self.model, dataset, batch_size=batch_size, device=device)
