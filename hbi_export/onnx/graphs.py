"""Declarative specs of the three exported graphs and their fixed-arity export wrappers.

| graph | inputs | outputs |
|---|---|---|
| text_encoder | input_ids int64 [text_batch, L], attention_mask int64 [text_batch, L] | per level l: text_tokens_l, text_weights_l, text_mask_l; then text_clusters_l1, text_clusters_l2, text_clusters_ok |
| video_encoder | frames float32 [video_batch, T, 3, H, W], frame_mask int64 [video_batch, T] | per level l: video_tokens_l, video_weights_l, video_mask_l; then video_clusters_l1, video_clusters_l2, video_clusters_ok |
| interaction | the 9 text and 9 video side tensors, level_weights float32 [3] | scores [text_batch, video_batch], level_scores [3, text_batch, video_batch] |

Encoders output the side (what the index stores), then which tokens each merged token merged (``cluster_defs``:
the level-1 cluster of each level-0 token, the level-2 cluster of each level-1 token, as float32 integers, and per
merge 1.0 when that assignment reproduces the merge op's tokens (``merge_check``), else 0.0; ``hbi-run explain`` shows action / event clusters with their frames and words from
them; packages exported before these outputs existed have none, and the runtime reads them as optional). The
interaction graph is the only per-pair work. L and T are fixed (the cluster counts derive from them); only the
batch axes are dynamic, one name per tower.
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


def cluster_defs(kind: str, counts: tuple[int, int, int]) -> tuple[TensorDef, ...]:
    """The 3 cluster tensors of an encoder: level-1 cluster per level-0 token, level-2 cluster per level-1 token
    (float32 holding exact integers: one output type for every backend and precision), per merge whether the
    assignment reproduces the merged tokens (1.0 / 0.0)."""
    batch = f"{kind}_batch"
    return (TensorDef(f"{kind}_clusters_l1", "float32", (batch, counts[0])),
            TensorDef(f"{kind}_clusters_l2", "float32", (batch, counts[1])),
            TensorDef(f"{kind}_clusters_ok", "float32", (batch, 2)))


def _flatten(side: Side) -> tuple[torch.Tensor, ...]:
    return tuple(t for lv in side.levels for t in (lv.tokens, lv.weights, lv.mask))


class TextEncoder(nn.Module):
    def __init__(self, model: HBIModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        side, clusters = self.model.encode_text_clusters(input_ids, attention_mask)
        return _flatten(side) + clusters


class VideoEncoder(nn.Module):
    def __init__(self, model: HBIModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        frames = frames.to(self.model.clip.visual.conv1.weight.dtype)  # fp32 input, fp16 model: cast inside
        side, clusters = self.model.encode_video_clusters(frames, frame_mask)
        return _flatten(side) + clusters


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
    text_out, video_out = text_side + cluster_defs("text", t_counts), video_side + cluster_defs("video", v_counts)
    return {
        "text_encoder": GraphDef(
            "text_encoder",
            (TensorDef("input_ids", "int64", ("text_batch", max_words)),
             TensorDef("attention_mask", "int64", ("text_batch", max_words))),
            text_out, TextEncoder),
        "video_encoder": GraphDef(
            "video_encoder",
            (TensorDef("frames", "float32", ("video_batch", max_frames, 3, v.image_size, v.image_size)),
             TensorDef("frame_mask", "int64", ("video_batch", max_frames))),
            video_out, VideoEncoder),
        "interaction": GraphDef(
            "interaction",
            text_side + video_side + (TensorDef("level_weights", "float32", (3,)),),
            (TensorDef("scores", "float32", ("text_batch", "video_batch")),
             TensorDef("level_scores", "float32", (3, "text_batch", "video_batch"))),
            lambda model: Interaction()),
    }
