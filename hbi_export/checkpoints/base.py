"""Types shared by the per-format converters: the caller's options and a converter's result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hbi_export.checkpoints.report import IgnoredKey, InitialisedPart
from hbi_export.model.config import HBIConfig

DEFAULT_RATIOS = (0.25, 0.5)  # official retrieval --t_rate0/1 and --v_rate0/1
DEFAULT_LEVEL_WEIGHTS = (1.0, 0.0, 0.0)  # official retrieval --rate
DEFAULT_TEMPORAL_LAYERS = 4  # official --num_hidden_layers (seqTransf depth) for CLIP-initialised models
DEFAULT_SEED = 0


@dataclass(frozen=True)
class LoadOptions:
    """What the caller decides because the weights do not say it.

    ``None`` ratios / level weights mean: the checkpoint's own (hbi-toolkit format), else the official defaults.
    ``temporal_layers`` and ``seed`` only matter when a CLIP checkpoint initialises the HBI parts.
    """

    text_ratios: tuple[float, float] | None = None
    video_ratios: tuple[float, float] | None = None
    level_weights: tuple[float, float, float] | None = None
    temporal_layers: int = DEFAULT_TEMPORAL_LAYERS
    seed: int = DEFAULT_SEED

    def config_fields(self, base: HBIConfig | None = None) -> dict[str, Any]:
        """``text_ratios`` / ``video_ratios`` / ``level_weights``: given ones, else ``base``'s, else defaults."""
        return {
            "text_ratios": self.text_ratios or (base.text_ratios if base else DEFAULT_RATIOS),
            "video_ratios": self.video_ratios or (base.video_ratios if base else DEFAULT_RATIOS),
            "level_weights": self.level_weights or (base.level_weights if base else DEFAULT_LEVEL_WEIGHTS),
        }


@dataclass
class Converted:
    """A converter's output: the state dict in our layout, its config and what it skipped or created."""

    state_dict: dict[str, torch.Tensor]
    config: HBIConfig
    ignored: list[IgnoredKey] = field(default_factory=list)
    initialised: list[InitialisedPart] = field(default_factory=list)
