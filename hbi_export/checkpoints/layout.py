"""The HBI state-dict layout: expected keys and shapes for a config, the config implied by the weights, and
which model part each key belongs to.

The layout is the official HBI checkpoint minus the training-only Banzhaf modules (``clip.*`` = OpenAI CLIP,
``frame_position_embeddings`` + ``transformerClip`` = seqTransf, ``*_weight_fc*`` = WTI weight heads,
``{t,v}_ctm*`` / ``{t,v}_block*`` = token merge). It is written out here, independent of the model class, so a
checkpoint can be checked and inspected without building a model; a test holds it equal to
``HBIModel(config).state_dict()``.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

import torch

from hbi_export.model.config import HBIConfig, TextConfig, VisionConfig, heads_for
from hbi_runtime.errors import CheckpointError, ConfigError

Shape = tuple[int, ...]

WEIGHT_HEADS = tuple(f"{m}_weight_fc{s}" for s in ("", "0", "1") for m in ("text", "video"))
MERGE_MODULES = tuple(f"{m}_{kind}{lvl}" for m in ("t", "v") for lvl in (0, 1) for kind in ("ctm", "block"))

# Parts for parameter counts (``part_of``): first matching prefix wins.
PART_PREFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("vision tower", ("clip.visual.",)),
    ("text tower", ("clip.",)),  # token/positional embedding, text transformer, ln_final, projection, logit_scale
    ("temporal transformer", ("transformerClip.", "frame_position_embeddings.")),
    ("weight heads", WEIGHT_HEADS),
    ("token merge", MERGE_MODULES),
)
PARTS = tuple(name for name, _ in PART_PREFIXES)


def part_of(key: str) -> str:
    """The model part of a state-dict key (one of :data:`PARTS`), or ``"other"``."""
    for name, prefixes in PART_PREFIXES:
        if key.startswith(prefixes):
            return name
    return "other"


def block_shapes(prefix: str, width: int) -> dict[str, Shape]:
    """Keys of one CLIP residual attention block at ``width`` under ``prefix`` (ending with a dot)."""
    w = width
    return {
        f"{prefix}attn.in_proj_weight": (3 * w, w), f"{prefix}attn.in_proj_bias": (3 * w,),
        f"{prefix}attn.out_proj.weight": (w, w), f"{prefix}attn.out_proj.bias": (w,),
        f"{prefix}ln_1.weight": (w,), f"{prefix}ln_1.bias": (w,),
        f"{prefix}mlp.c_fc.weight": (4 * w, w), f"{prefix}mlp.c_fc.bias": (4 * w,),
        f"{prefix}mlp.c_proj.weight": (w, 4 * w), f"{prefix}mlp.c_proj.bias": (w,),
        f"{prefix}ln_2.weight": (w,), f"{prefix}ln_2.bias": (w,),
    }


def _stack_shapes(prefix: str, width: int, layers: int) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    for i in range(layers):
        shapes.update(block_shapes(f"{prefix}resblocks.{i}.", width))
    return shapes


def clip_shapes(config: HBIConfig) -> dict[str, Shape]:
    """The ``clip.*`` keys (OpenAI CLIP names with the ``clip.`` prefix)."""
    v, t, d = config.vision, config.text, config.embed_dim
    shapes: dict[str, Shape] = {
        "clip.visual.conv1.weight": (v.width, 3, v.patch_size, v.patch_size),
        "clip.visual.class_embedding": (v.width,),
        "clip.visual.positional_embedding": (v.grid * v.grid + 1, v.width),
        "clip.visual.ln_pre.weight": (v.width,), "clip.visual.ln_pre.bias": (v.width,),
    }
    shapes.update(_stack_shapes("clip.visual.transformer.", v.width, v.layers))
    shapes.update({
        "clip.visual.ln_post.weight": (v.width,), "clip.visual.ln_post.bias": (v.width,),
        "clip.visual.proj": (v.width, d),
        "clip.token_embedding.weight": (t.vocab_size, t.width),
        "clip.positional_embedding": (t.context_length, t.width),
    })
    shapes.update(_stack_shapes("clip.transformer.", t.width, t.layers))
    shapes.update({
        "clip.ln_final.weight": (t.width,), "clip.ln_final.bias": (t.width,),
        "clip.text_projection": (t.width, d), "clip.logit_scale": (),
    })
    return shapes


def hbi_head_shapes(config: HBIConfig) -> dict[str, Shape]:
    """The HBI-specific keys: seqTransf, weight heads, CTMs and TCBlocks (all at ``embed_dim``)."""
    d = config.embed_dim
    shapes: dict[str, Shape] = {"frame_position_embeddings.weight": (config.frame_positions, d)}
    shapes.update(_stack_shapes("transformerClip.", d, config.temporal_layers))
    for head in WEIGHT_HEADS:
        shapes.update({f"{head}.0.weight": (2 * d, d), f"{head}.0.bias": (2 * d,),
                       f"{head}.2.weight": (1, 2 * d), f"{head}.2.bias": (1,)})
    for m in ("t", "v"):
        for lvl in (0, 1):
            c, b = f"{m}_ctm{lvl}.", f"{m}_block{lvl}."
            shapes.update({f"{c}conv.conv.weight": (d, d, 3), f"{c}norm.weight": (d,), f"{c}norm.bias": (d,),
                           f"{c}score.weight": (1, d), f"{c}score.bias": (1,)})
            shapes.update({f"{b}norm1.weight": (d,), f"{b}norm1.bias": (d,),
                           f"{b}attn.q.weight": (d, d), f"{b}attn.q.bias": (d,),
                           f"{b}attn.kv.weight": (2 * d, d), f"{b}attn.kv.bias": (2 * d,),
                           f"{b}attn.proj.weight": (d, d), f"{b}attn.proj.bias": (d,)})
    return shapes


def expected_shapes(config: HBIConfig) -> dict[str, Shape]:
    """Every key of ``HBIModel(config).state_dict()`` with its shape."""
    return {**clip_shapes(config), **hbi_head_shapes(config)}


# ---------------------------------------------------------------------------------------------- inference
def count_layers(keys: Sequence[str], prefix: str) -> int:
    """``max(i) + 1`` over keys ``{prefix}resblocks.{i}.*`` (a gap shows up later as missing keys)."""
    pattern = re.compile(re.escape(prefix) + r"resblocks\.(\d+)\.")
    indices = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def _shape(sd: Mapping[str, torch.Tensor], key: str, dims: int, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(
            f"{source}: key {key!r} is missing; it is needed to infer the architecture",
            hint="the file is incomplete or not an HBI / CLIP checkpoint",
        )
    shape = tuple(sd[key].shape)
    if len(shape) != dims:
        raise CheckpointError(f"{source}: {key} has shape {shape}, expected {dims} dimensions",
                              hint="the file is corrupted or not an HBI / CLIP checkpoint")
    return shape


def infer_clip(sd: Mapping[str, torch.Tensor], source: str, *, vision_heads: int | None = None,
               text_heads: int | None = None) -> tuple[VisionConfig, TextConfig, int]:
    """Vision and text configs and ``embed_dim`` from the ``clip.*`` weights.

    Heads are not stored in the weights: CLIP's convention ``heads_for(width)`` unless given.

    Raises:
        CheckpointError: an anchor key is missing or has an impossible shape.
    """
    conv = _shape(sd, "clip.visual.conv1.weight", 4, source)
    rows = _shape(sd, "clip.visual.positional_embedding", 2, source)[0]
    grid = round(math.sqrt(max(rows - 1, 0)))
    if conv[-1] != conv[-2] or grid * grid + 1 != rows:
        raise CheckpointError(
            f"{source}: visual patch {conv[-2]}x{conv[-1]} with {rows} position rows is not a square ViT grid",
            hint="only ViT CLIP backbones are supported")
    vision = VisionConfig(width=conv[0], layers=count_layers(list(sd), "clip.visual.transformer."),
                          heads=vision_heads or heads_for(conv[0]), patch_size=conv[-1],
                          image_size=conv[-1] * grid)
    t_width = _shape(sd, "clip.ln_final.weight", 1, source)[0]
    text = TextConfig(width=t_width, layers=count_layers(list(sd), "clip.transformer."),
                      heads=text_heads or heads_for(t_width),
                      context_length=_shape(sd, "clip.positional_embedding", 2, source)[0],
                      vocab_size=_shape(sd, "clip.token_embedding.weight", 2, source)[0])
    return vision, text, _shape(sd, "clip.text_projection", 2, source)[1]


def make_config(source: str, **fields) -> HBIConfig:
    """``HBIConfig(**fields)``, turning an inconsistent combination into a :class:`CheckpointError`."""
    try:
        return HBIConfig(**fields)
    except ConfigError as exc:
        raise CheckpointError(f"{source}: the weights imply an invalid model: {exc.message}",
                              hint="the checkpoint's tensor shapes are inconsistent") from None


def infer_hbi_config(sd: Mapping[str, torch.Tensor], source: str, **options) -> HBIConfig:
    """The full config of an HBI-layout state dict (``clip.*`` plus the HBI heads).

    Args:
        sd: the state dict in our (= official) key layout.
        source: the path, for messages.
        **options: ``text_ratios``, ``video_ratios``, ``level_weights`` (not stored in the weights).

    Raises:
        CheckpointError: anchor keys missing or inconsistent shapes.
    """
    vision, text, d = infer_clip(sd, source)
    if "frame_position_embeddings.weight" not in sd:
        raise CheckpointError(f"{source}: no frame_position_embeddings / temporal transformer (transformerClip)",
                              hint="only official checkpoints trained with --agg_module seqTransf (the default) "
                              "are supported")
    positions = _shape(sd, "frame_position_embeddings.weight", 2, source)[0]
    return make_config(source, embed_dim=d, vision=vision, text=text,
                       temporal_layers=count_layers(list(sd), "transformerClip."),
                       temporal_heads=heads_for(d), frame_positions=positions,
                       merge_heads=heads_for(d), **options)
