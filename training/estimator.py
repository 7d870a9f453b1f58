"""Pre-training the Banzhaf interaction estimator (official ``banzhaf_estimator.py``).

The HBI model is frozen (the official script freezes CLIP, the temporal transformer and the entity weight heads;
nothing else takes part in the estimator's loss): per batch it gives the matched pairs' entity-level similarity
maps and token weights, :func:`~hbi_training.banzhaf.banzhaf_labels` turns them into Monte-Carlo interaction
labels, and the :class:`~hbi_training.banzhaf.BanzhafModule` learns them with MSE, its prediction multiplied by the
masks as in the official code. The result, ``estimator.safetensors``, is the frozen teacher of ``hbi-train fit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hbi_training.banzhaf import VARIANTS, BanzhafModule, banzhaf_labels, load_estimator_state
from hbi_training.levels import level_output
from hbi_training.losses import LossOutput
from hbi_training.tasks import Batch
from hbi_runtime.errors import UsageError

ESTIMATOR_NAME = "estimator.safetensors"


@dataclass(frozen=True)
class EstimatorConfig:
    samples: int = 100  # Monte-Carlo samples per cell (official estimator script: 100)
    variant: str = "textbook"  # label variant, see hbi_training.banzhaf
    scale: float = 1000.0  # label scale (official: similarities x 1000)
    planes: int = 64
    seed: int = 0  # seeds the coalition generator

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise UsageError(f"unknown Banzhaf label variant {self.variant!r}", hint=f"use one of {VARIANTS}")
        if self.samples < 1:
            raise UsageError(f"samples must be >= 1, got {self.samples}")


class EstimatorTask:
    """Trains a :class:`BanzhafModule` on labels from a frozen HBI model."""

    name = "estimator"

    def __init__(self, model: nn.Module, config: EstimatorConfig | None = None,
                 estimator: BanzhafModule | None = None) -> None:
        self.config = config or EstimatorConfig()
        self.model = model.eval().requires_grad_(False)
        self.estimator = estimator or BanzhafModule(self.config.planes)
        self.generator = torch.Generator().manual_seed(self.config.seed)

    def to(self, device: torch.device) -> "EstimatorTask":
        self.model.to(device)
        self.estimator.to(device)
        state = self.generator.get_state()
        self.generator = torch.Generator(device=device)
        if torch.device(device).type == "cpu":
            self.generator.set_state(state)
        else:
            self.generator.manual_seed(self.config.seed)
        return self

    def train(self, mode: bool = True) -> None:
        self.estimator.train(mode)  # the frozen model stays in eval mode

    def named_trainable(self) -> Iterator[tuple[str, nn.Parameter]]:
        return (("banzhafteacher." + n, p) for n, p in self.estimator.named_parameters())

    def loss(self, batch: Batch) -> LossOutput:
        ids, tmask, frames, fmask, _ = batch
        with torch.no_grad():
            text, video = self.model.encode_text(ids, tmask), self.model.encode_video(frames, fmask)
            with torch.autocast(ids.device.type, enabled=False):
                lv = level_output(text.levels[0], video.levels[0])
                t, v = text.levels[0], video.levels[0]
                labels = banzhaf_labels(lv.sim, t.mask, v.mask, t.weights, v.weights, num=self.config.samples,
                                        variant=self.config.variant, scale=self.config.scale,
                                        generator=self.generator)
        with torch.autocast(ids.device.type, enabled=False):
            mse = F.mse_loss(self.estimator(lv.sim) * lv.pair_mask, labels)
        return LossOutput(mse, {"mse": mse})

    def after_step(self) -> None:
        pass

    def save_weights(self, directory: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.estimator.state_dict().items()}
        save_file(state, str(Path(directory) / ESTIMATOR_NAME), metadata={"format": "hbi-toolkit-estimator"})

    def load_weights(self, directory: Path) -> None:
        self.estimator.load_state_dict(load_estimator_state(Path(directory) / ESTIMATOR_NAME, self.config.planes))

    def extra_state(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def validate(self, dataset, batch_size: int, device: torch.device) -> dict[str, float]:
        return {}
