"""OpenAI CLIP weights (``ViT-B-32.pt`` TorchScript archives or plain state dicts) -> an HBI model to fine-tune.

The towers map one to one under ``clip.``. The HBI-specific parts are initialised as the official ``HBI.__init__``
does: ``frame_position_embeddings`` from CLIP's text ``positional_embedding``, ``transformerClip.resblocks.i``
from the first ``temporal_layers`` text blocks, everything else randomly (official initialisers, fixed seed).
"""

from __future__ import annotations

import math
import re

import torch

from hbi_export.checkpoints.base import Converted, LoadOptions
from hbi_export.checkpoints.layout import (MERGE_MODULES, WEIGHT_HEADS, block_shapes, hbi_head_shapes,
                                           infer_clip, make_config)
from hbi_export.checkpoints.readers import RawCheckpoint
from hbi_export.checkpoints.report import METADATA, IgnoredKey, InitialisedPart
from hbi_export.model.config import HBIConfig, heads_for
from hbi_runtime.errors import CheckpointError

JIT_SCALARS = ("input_resolution", "context_length", "vocab_size")  # TorchScript-only metadata entries
RESNET_MARKERS = ("visual.layer1.", "visual.attnpool.", "visual.bn1.")


def clip_to_openai(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ``clip.*`` keys -> an OpenAI CLIP state dict (the inverse of the import mapping)."""
    return {k[len("clip."):]: v for k, v in state_dict.items() if k.startswith("clip.")}


def openai_to_clip(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[IgnoredKey]]:
    """OpenAI CLIP state dict -> ``clip.*`` keys; the JIT metadata scalars are ignored and reported.

    Raises:
        CheckpointError: a ResNet CLIP backbone (only ViT towers exist in HBI).
    """
    if any(k.startswith(RESNET_MARKERS) for k in tensors):
        raise CheckpointError("this is a ResNet CLIP checkpoint; HBI uses a ViT image tower",
                              hint="use ViT-B-32.pt or ViT-B-16.pt")
    ignored = [IgnoredKey(k, "TorchScript metadata scalar; implied by the weights", METADATA, tensors[k].numel())
               for k in JIT_SCALARS if k in tensors]
    return {f"clip.{k}": v for k, v in tensors.items() if k not in JIT_SCALARS}, ignored


# ---------------------------------------------------------------------------------------- HBI-part init
def _normal(shape, gen, std=0.02):
    return torch.randn(shape, generator=gen) * std


def _uniform(shape, gen, bound):
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


# (key pattern, initialiser(shape, generator, embed_dim)); first match wins. Mirrors the official initialisers:
# HBI.init_weights (Linear/Embedding normal(0.02), zero bias, LayerNorm 1/0) for the weight heads and temporal
# blocks; nn.MultiheadAttention's xavier-uniform in_proj; PyTorch defaults in CTM (created after init_weights:
# uniform +-1/sqrt(fan_in) for the conv and the score Linear, its bias included); trunc-normal(0.02) Linear
# weights in TCBlock (the truncation at +-2 never triggers at std 0.02).
_INIT_RULES = [
    (r".*(ln_\d|norm\d?)\.weight$", lambda s, g, d: torch.ones(s)),
    (r".*ctm\d\.conv\.conv\.weight$", lambda s, g, d: _uniform(s, g, 1 / math.sqrt(d * 3))),
    (r".*ctm\d\.score\.(weight|bias)$", lambda s, g, d: _uniform(s, g, 1 / math.sqrt(d))),
    (r".*[._]bias$", lambda s, g, d: torch.zeros(s)),
    (r".*in_proj_weight$", lambda s, g, d: _uniform(s, g, math.sqrt(6 / (s[0] + s[1])))),
    (r".*\.weight$", lambda s, g, d: _normal(s, g)),
]


def _init_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator, embed_dim: int) -> torch.Tensor:
    for pattern, init in _INIT_RULES:
        if re.match(pattern, key):
            return init(shape, gen, embed_dim)
    raise RuntimeError(f"no initialiser for {key}")  # a bug: every HBI key ends in weight or bias


def init_hbi_parts(clip_sd: dict[str, torch.Tensor], config: HBIConfig, seed: int
                   ) -> tuple[dict[str, torch.Tensor], list[InitialisedPart]]:
    """The HBI-specific tensors for a CLIP-initialised model, and a description of each part.

    Args:
        clip_sd: the ``clip.*`` tensors.
        config: the target config (``frame_positions`` = CLIP context length, ``embed_dim`` = text width).
        seed: seeds the random initialisation, so the same inputs always give the same model.
    """
    shapes = hbi_head_shapes(config)
    copied = min(config.temporal_layers, config.text.layers)
    out = {"frame_position_embeddings.weight": clip_sd["clip.positional_embedding"].clone()}
    for i in range(copied):
        for key in block_shapes(f"transformerClip.resblocks.{i}.", config.embed_dim):
            source = clip_sd.get(key.replace("transformerClip.", "clip.transformer.", 1))
            if source is not None:  # an absent text key is reported as missing by the strict check
                out[key] = source.clone()
    gen = torch.Generator().manual_seed(seed)
    for key, shape in shapes.items():  # dict order is fixed, so the random stream is reproducible
        if key not in out:
            out[key] = _init_tensor(key, shape, gen, config.embed_dim)
    return out, _describe_init(config, copied, seed)


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def _describe_init(config: HBIConfig, copied: int, seed: int) -> list[InitialisedPart]:
    def count(prefixes):
        return sum(1 for k in hbi_head_shapes(config) if k.startswith(prefixes))

    parts = [InitialisedPart("frame_position_embeddings", "copied from CLIP positional_embedding "
                             f"({config.frame_positions} rows)", 1)]
    if copied:
        span = _span(0, copied - 1)
        parts.append(InitialisedPart(f"transformerClip.resblocks.{span}",
                                     f"copied from CLIP text transformer.resblocks.{span}", copied * 12))
    if config.temporal_layers > copied:
        parts.append(InitialisedPart(
            f"transformerClip.resblocks.{_span(copied, config.temporal_layers - 1)}",
            f"random (seed {seed}): normal(0, 0.02) Linear, xavier in_proj, zero bias; CLIP has only {copied} "
            "text blocks", (config.temporal_layers - copied) * 12))
    parts.append(InitialisedPart("weight heads (" + ", ".join(WEIGHT_HEADS) + ")",
                                 f"random (seed {seed}): normal(0, 0.02) weights, zero bias", count(WEIGHT_HEADS)))
    parts.append(InitialisedPart("token merge CTM (t/v_ctm0-1)",
                                 f"random (seed {seed}): PyTorch default uniform conv/score, LayerNorm 1/0",
                                 count(tuple(m for m in MERGE_MODULES if "ctm" in m))))
    parts.append(InitialisedPart("token merge TCBlock (t/v_block0-1)",
                                 f"random (seed {seed}): normal(0, 0.02) Linear, zero bias, LayerNorm 1/0",
                                 count(tuple(m for m in MERGE_MODULES if "block" in m))))
    return parts


def clip_config(clip_sd: dict[str, torch.Tensor], source: str, options: LoadOptions,
                **heads: int | None) -> HBIConfig:
    """The HBI config for a CLIP-initialised model (official: seqTransf at the text width, 77 positions).

    Raises:
        CheckpointError: text width != embed_dim (the official init copies text blocks into the temporal
            transformer, which runs at embed_dim).
    """
    vision, text, d = infer_clip(clip_sd, source, **heads)
    if text.width != d:
        raise CheckpointError(
            f"{source}: CLIP text width {text.width} != embed dim {d}; HBI initialises its temporal transformer "
            "from the text blocks, which needs them equal", hint="use a CLIP model whose text width equals its "
            "projection dim (ViT-B/32, ViT-B/16)")
    return make_config(source, embed_dim=d, vision=vision, text=text, temporal_layers=options.temporal_layers,
                       temporal_heads=heads_for(d), frame_positions=text.context_length, merge_heads=heads_for(d),
                       **options.config_fields())


def build_from_clip(clip_sd: dict[str, torch.Tensor], config: HBIConfig, options: LoadOptions,
                    ignored: list[IgnoredKey]) -> Converted:
    """``clip.*`` tensors + config -> a complete HBI state dict with the HBI parts initialised."""
    heads, initialised = init_hbi_parts(clip_sd, config, options.seed)
    return Converted({**clip_sd, **heads}, config, ignored, initialised)


def convert_openai(raw: RawCheckpoint, options: LoadOptions) -> Converted:
    """OpenAI CLIP state dict -> our layout, HBI parts initialised as the official code does."""
    clip_sd, ignored = openai_to_clip(raw.tensors)
    config = clip_config(clip_sd, str(raw.path), options)
    return build_from_clip(clip_sd, config, options, ignored)
