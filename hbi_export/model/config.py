"""Model configuration: one frozen dataclass per part, validated where it comes in.

The sizes mirror the official HBI model (see docs/architecture.md, "Reference model"). Everything after the
CLIP projection (temporal transformer, weight heads, token merging) runs at ``embed_dim``; the official code
hard-codes 512 there and therefore needs ``text.width == embed_dim``; we allow any width and let the checkpoint
loaders enforce what a given format implies.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from hbi_runtime.errors import ConfigError

HEAD_WIDTH = 64  # CLIP's convention: heads = width // 64 (used when inferring from weights)


def heads_for(width: int) -> int:
    """CLIP's head-count convention, at least one head for tiny test widths."""
    return max(1, width // HEAD_WIDTH)


@dataclass(frozen=True)
class VisionConfig:
    width: int = 768  # ViT width; 768 for B/32 and B/16
    layers: int = 12
    heads: int = 12
    patch_size: int = 32  # 32 for B/32, 16 for B/16
    image_size: int = 224  # input resolution; grid = image_size // patch_size

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    width: int = 512
    layers: int = 12
    heads: int = 8
    context_length: int = 77  # rows of the positional table; max_words must not exceed it
    vocab_size: int = 49408  # CLIP BPE; EOT = 49407 is the largest id


@dataclass(frozen=True)
class HBIConfig:
    """Everything needed to build :class:`hbi_export.model.HBIModel`.

    ``text_ratios`` / ``video_ratios`` are the (action, event) merge ratios: clusters = max(ceil(N * r), 1)
    with N the *padded* token count, as in the official code. ``level_weights`` combine the entity, action
    and event scores; the official retrieval evaluation uses [1, 0, 0].
    """

    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    temporal_layers: int = 4  # seqTransf depth (official --num_hidden_layers)
    temporal_heads: int = 8
    frame_positions: int = 77  # rows of frame_position_embeddings (official: = text context length)
    merge_heads: int = 8  # TCBlock heads (official: 8 at 512)
    text_ratios: tuple[float, float] = (0.25, 0.5)
    video_ratios: tuple[float, float] = (0.25, 0.5)
    knn_k: int = 3
    level_weights: tuple[float, float, float] = (1.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_ratios", tuple(float(r) for r in self.text_ratios))
        object.__setattr__(self, "video_ratios", tuple(float(r) for r in self.video_ratios))
        object.__setattr__(self, "level_weights", tuple(float(w) for w in self.level_weights))
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first inconsistent field."""
        for name, width, heads in (
            ("vision", self.vision.width, self.vision.heads),
            ("text", self.text.width, self.text.heads),
            ("temporal", self.embed_dim, self.temporal_heads),
            ("merge", self.embed_dim, self.merge_heads),
        ):
            if width <= 0 or heads <= 0 or width % heads:
                raise ConfigError(f"{name} width {width} is not divisible into {heads} heads")
        if self.vision.image_size % self.vision.patch_size:
            raise ConfigError(
                f"image_size {self.vision.image_size} is not a multiple of patch_size {self.vision.patch_size}"
            )
        for name, ratios in (("text_ratios", self.text_ratios), ("video_ratios", self.video_ratios)):
            if len(ratios) != 2 or not all(0.0 < r <= 1.0 for r in ratios):
                raise ConfigError(f"{name} must be two ratios in (0, 1], got {list(ratios)}")
        if len(self.level_weights) != 3 or not all(math.isfinite(w) for w in self.level_weights):
            raise ConfigError(f"level_weights must be three finite numbers, got {list(self.level_weights)}")
        if self.knn_k < 1:
            raise ConfigError(f"knn_k must be >= 1, got {self.knn_k}")
        if min(self.temporal_layers, self.text.layers, self.vision.layers) < 0:
            raise ConfigError("layer counts must be >= 0")

    def cluster_counts(self, n_tokens: int, modality: str) -> tuple[int, int]:
        """Token counts after the action and event merges for a padded length ``n_tokens``."""
        r0, r1 = self.text_ratios if modality == "text" else self.video_ratios
        c1 = max(math.ceil(n_tokens * r0), 1)
        return c1, max(math.ceil(c1 * r1), 1)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("text_ratios", "video_ratios", "level_weights"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HBIConfig":
        """Build from :meth:`to_dict` output; unknown keys are an error, not silently dropped."""
        try:
            d = dict(d)
            vision = VisionConfig(**d.pop("vision", {}))
            text = TextConfig(**d.pop("text", {}))
            return cls(vision=vision, text=text, **d)
        except TypeError as exc:  # unknown or missing field names
            raise ConfigError(f"invalid model config: {exc}") from None

    # ------------------------------------------------------------------ presets
    @classmethod
    def vit_b_32(cls, **overrides: Any) -> "HBIConfig":
        """The official retrieval model (CLIP ViT-B/32)."""
        return cls(**overrides)

    @classmethod
    def vit_b_16(cls, **overrides: Any) -> "HBIConfig":
        """CLIP ViT-B/16 backbone (the official QA model's)."""
        return cls(vision=VisionConfig(patch_size=16), **overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> "HBIConfig":
        """A few-hundred-thousand-parameter model for tests: 2 heads everywhere, 32x32 frames."""
        base: dict[str, Any] = dict(
            embed_dim=64,
            vision=VisionConfig(width=64, layers=2, heads=2, patch_size=16, image_size=32),
            text=TextConfig(width=64, layers=2, heads=2, context_length=32, vocab_size=49408),
            temporal_layers=2,
            temporal_heads=2,
            frame_positions=32,
            merge_heads=2,
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def demo(cls, **overrides: Any) -> "HBIConfig":
        """The synthetic-data demo's model (``hbi_training.demo``, the shipped demo package): :meth:`tiny` with a
        vision tower of 4-pixel patches (64 per frame), width 128, 4 layers and 4 heads (the 8-pixel, 2-layer,
        64-wide tower before it could not tell the small shapes apart, docs/captioning.md), one temporal layer and
        a 32-wide text tower; ~3.0 M parameters, 1.6 M of them the CLIP token-embedding table (49408 x 32), so that
        the fp32 checkpoint and fp32 package together stay under 24 MB."""
        base: dict[str, Any] = dict(
            vision=VisionConfig(width=128, layers=4, heads=4, patch_size=4, image_size=32),
            text=TextConfig(width=32, layers=2, heads=2, context_length=32, vocab_size=49408),
            temporal_layers=1,
        )
        base.update(overrides)
        return cls.tiny(**base)
