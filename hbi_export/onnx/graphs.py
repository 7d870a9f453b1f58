"""Declarative specs of the three exported graphs and their fixed-arity export wrappers.

| graph | inputs | outputs |
|---|---|---|
| text_encoder | input_ids int64 [text_batch, L], attention_mask int64 [text_batch, L] | per level l: text_tokens_l, text_weights_l, text_mask_l |
| video_encoder | frames float32 [video_batch, T, 3, H, W], frame_mask int64 [video_batch, T] | per level l: video_tokens_l, video_weights_l, video_mask_l |
| interaction | the 9 text and 9 video side tensors, level_weights float32 [3] | scores [text_batch, video_batch], level_scores [3, text_batch, video_batch] |

Encoders output exactly the side (what the index stores); the interaction graph is the only per-pair work.
L and T are fixed (the cluster counts derive from them); only the batch axes are dynamic, one name per tower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from hbi_export.model import HBIConfig, HBIModel
from hbi_export.model.sides import Side

LEVEL_TAGS = ("l0", "l1", "l2")  # entity, action, event
SIDE_PARTS = ("tokens", "weights", "mask")


@dataclass(frozen=True)
class TensorDef:
    name: str
    dtype: str  # numpy-style name: float32, int64
    shape: tuple[int | str, ...]  # str = dynamic axis name


@dataclass(frozen=True)
class GraphDef:
    name: str
    inputs: tuple[TensorDef, ...]
    outputs: tuple[TensorDef, ...]
    wrapper: Callable[[HBIModel], nn.Module]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in self.inputs + self.outputs}


def side_defs(kind: str, counts: tuple[int, int, int], dim: int) -> tuple[TensorDef, ...]:
    """The 9 tensors of a text or video side, in graph order (level-major)."""
    batch = f"{kind}_batch"
    out = []
    for tag, n in zip(LEVEL_TAGS, counts):
        out += [TensorDef(f"{kind}_tokens_{tag}", "float32", (batch, n, dim)),
                TensorDef(f"{kind}_weights_{tag}", "float32", (batch, n)),
                TensorDef(f"{kind}_mask_{tag}", "float32", (batch, n))]
    return tuple(out)


def _flatten(side: Side) -> tuple[torch.Tensor, ...]:
    return tuple(t for lv in side.levels for t in (lv.tokens, lv.weights, lv.mask))


class TextEncoder(nn.Module):
    def __init__(self, model: HBIModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _flatten(self.model.encode_text(input_ids, attention_mask))


class VideoEncoder(nn.Module):
    def __init__(self, model: HBIModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        frames = frames.to(self.model.clip.visual.conv1.weight.dtype)  # fp32 input, fp16 model: cast inside
        return _flatten(self.model.encode_video(frames, frame_mask))


class Interaction(nn.Module):
    """18 side tensors + level weights -> (scores, level_scores). One WTI op per level."""

    def forward(self, t0, tw0, tm0, t1, tw1, tm1, t2, tw2, tm2, v0, vw0, vm0, v1, vw1, vm1, v2, vw2, vm2,
                level_weights) -> tuple[torch.Tensor, torch.Tensor]:
        # fixed arity (torch.export needs named inputs): text then video side, level-major, then the weights
        text = (t0, tw0, tm0, t1, tw1, tm1, t2, tw2, tm2)
        video = (v0, vw0, vm0, v1, vw1, vm1, v2, vw2, vm2)
        levels = torch.stack([
            torch.ops.hbi.weighted_token_interaction(*text[3 * i:3 * i + 3], *video[3 * i:3 * i + 3])
            for i in range(3)])  # (3, Bt, Bv)
        return (levels * level_weights[:, None, None]).sum(dim=0), levels


def graph_defs(config: HBIConfig, max_words: int, max_frames: int) -> dict[str, GraphDef]:
    """The three graphs for fixed L = ``max_words`` and T = ``max_frames``."""
    v, d = config.vision, config.embed_dim
    t_counts = (max_words, *config.cluster_counts(max_words, "text"))
    v_counts = (max_frames, *config.cluster_counts(max_frames, "video"))
    text_side, video_side = side_defs("text", t_counts, d), side_defs("video", v_counts, d)
    return {
        "text_encoder": GraphDef(
            "text_encoder",
            (TensorDef("input_ids", "int64", ("text_batch", max_words)),
             TensorDef("attention_mask", "int64", ("text_batch", max_words))),
            text_side, TextEncoder),
        "video_encoder": GraphDef(
            "video_encoder",
            (TensorDef("frames", "float32", ("video_batch", max_frames, 3, v.image_size, v.image_size)),
             TensorDef("frame_mask", "int64", ("video_batch", max_frames))),
            video_side, VideoEncoder),
        "interaction": GraphDef(
            "interaction",
            text_side + video_side + (TensorDef("level_weights", "float32", (3,)),),
            (TensorDef("scores", "float32", ("text_batch", "video_batch")),
             TensorDef("level_scores", "float32", (3, "text_batch", "video_batch"))),
            lambda model: Interaction()),
    }
