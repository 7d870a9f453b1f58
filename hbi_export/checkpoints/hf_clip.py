"""Hugging Face ``CLIPModel`` weights (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``).

Mapped to OpenAI CLIP names (names from transformers' ``modeling_clip``): the separate ``q/k/v_proj`` are
concatenated into ``in_proj_weight/bias`` (q, k, v order, as ``nn.MultiheadAttention`` packs them),
``layer_norm1/2`` -> ``ln_1/2``, ``mlp.fc1/fc2`` -> ``mlp.c_fc/c_proj``, the projections are ``nn.Linear`` weights
(transposed to CLIP's ``x @ proj`` matrices). Then the HBI parts are initialised as for OpenAI weights.
"""

from __future__ import annotations

import re

import torch

from hbi_export.checkpoints.base import Converted, LoadOptions
from hbi_export.checkpoints.openai_clip import build_from_clip, clip_config, openai_to_clip
from hbi_export.checkpoints.readers import RawCheckpoint
from hbi_export.checkpoints.report import BUFFER, IgnoredKey
from hbi_runtime.errors import CheckpointError

# Renames outside the encoder layers, HF -> OpenAI; the projections are transposed.
_RENAMES = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: HF's spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection.weight": "text_projection", "visual_projection.weight": "visual.proj"}
_LAYER_RENAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_TOWERS = {"text_model": "transformer", "vision_model": "visual.transformer"}
_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_QKV = ("q_proj", "k_proj", "v_proj")
_HF_PREFIXES = ("text_model.", "vision_model.", "text_projection.", "visual_projection.")
_POSITION_IDS = re.compile(r"^(text_model|vision_model)\.embeddings\.position_ids$")


def _map_layer_key(key: str) -> str | None:
    """HF encoder-layer key -> OpenAI key, or None for q/k/v (packed separately) and unknown names."""
    m = _LAYER.match(key)
    if not m or m.group(3) not in _LAYER_RENAMES:
        return None
    tower, i, name, kind = m.groups()
    return f"{_TOWERS[tower]}.resblocks.{i}.{_LAYER_RENAMES[name]}.{kind}"


def _pack_qkv(tensors: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> set[str]:
    """Concatenate every complete q/k/v triple into ``in_proj_*``; returns the HF keys consumed."""
    used: set[str] = set()
    for key in tensors:
        m = _LAYER.match(key)
        if not m or m.group(3) != "self_attn.q_proj":
            continue
        tower, i, _, kind = m.groups()
        parts = [f"{tower}.encoder.layers.{i}.self_attn.{p}.{kind}" for p in _QKV]
        if all(p in tensors for p in parts):  # an incomplete triple stays unmapped -> reported by the check
            out[f"{_TOWERS[tower]}.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat([tensors[p] for p in parts])
            used.update(parts)
    return used


def hf_to_openai(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[IgnoredKey]]:
    """HF CLIPModel state dict -> OpenAI CLIP state dict. Unknown keys pass through unchanged, so the strict
    check reports them as unexpected; ``position_ids`` buffers (older transformers) are ignored and reported."""
    out: dict[str, torch.Tensor] = {}
    used = _pack_qkv(tensors, out)
    ignored = []
    for key, value in tensors.items():
        if key in used:
            continue
        if _POSITION_IDS.match(key):
            ignored.append(IgnoredKey(key, "position-id buffer (0..n-1); implied by the shapes", BUFFER,
                                      value.numel()))
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        else:
            out[_RENAMES.get(key) or _map_layer_key(key) or key] = value
    return out, ignored


def openai_to_hf(openai_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_openai` (for writing Hugging Face checkpoints and for tests)."""
    back = {v: k for k, v in _RENAMES.items()}
    back_t = {v: k for k, v in _TRANSPOSED.items()}
    towers = {v: k for k, v in _TOWERS.items()}
    layer_back = {v: k for k, v in _LAYER_RENAMES.items()}
    pattern = re.compile(r"^(transformer|visual\.transformer)\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
    out = {}
    for key, value in _fix_in_proj_names(openai_sd).items():
        if key in back_t:
            out[back_t[key]] = value.t().contiguous()
        elif key in back:
            out[back[key]] = value
        elif (m := pattern.match(key)) and m.group(3) in ("attn.in_proj", *layer_back):
            tower, i, name, kind = m.groups()
            prefix = f"{towers[tower]}.encoder.layers.{i}."
            if name == "attn.in_proj":
                for part, chunk in zip(_QKV, value.chunk(3)):
                    out[f"{prefix}self_attn.{part}.{kind}"] = chunk.contiguous()
            else:
                out[f"{prefix}{layer_back[name]}.{kind}"] = value
        else:
            out[key] = value
    return out


def _fix_in_proj_names(openai_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``...attn.in_proj_weight`` -> ``...attn.in_proj.weight`` so one pattern matches every layer key."""
    return {re.sub(r"attn\.in_proj_(weight|bias)$", r"attn.in_proj.\1", k): v for k, v in openai_sd.items()}


def check_hf_config(config: dict | None, source: str) -> dict[str, int | None]:
    """Refuse HF configs the HBI towers cannot reproduce; returns the head counts they state.

    Raises:
        CheckpointError: no config.json, not a CLIP config, an activation other than quick_gelu, or a
            LayerNorm eps other than 1e-5.
    """
    if config is None:
        raise CheckpointError(f"{source}: Hugging Face CLIP weights need their config.json beside them",
                              hint="pass the directory written by `CLIPModel.save_pretrained`")
    if config.get("model_type") != "clip":
        raise CheckpointError(f"{source}: config.json has model_type {config.get('model_type')!r}, expected 'clip'",
                              hint="only Hugging Face CLIPModel checkpoints are supported")
    heads = {}
    for tower in ("text", "vision"):
        sub = config.get(f"{tower}_config") or {}
        act, eps = sub.get("hidden_act", "quick_gelu"), sub.get("layer_norm_eps", 1e-5)
        if act != "quick_gelu":
            raise CheckpointError(f"{source}: {tower} tower uses activation {act!r}; HBI's CLIP towers use "
                                  "quick_gelu (OpenAI CLIP)", hint="use an OpenAI CLIP conversion "
                                  "(e.g. openai/clip-vit-base-patch32)")
        if abs(float(eps) - 1e-5) > 1e-12:
            raise CheckpointError(f"{source}: {tower} tower LayerNorm eps {eps} != 1e-5",
                                  hint="use an OpenAI CLIP conversion (e.g. openai/clip-vit-base-patch32)")
        heads[f"{tower}_heads"] = sub.get("num_attention_heads")
    return heads


def convert_hf(raw: RawCheckpoint, options: LoadOptions) -> Converted:
    """HF CLIPModel -> our layout, HBI parts initialised as the official code does for CLIP weights."""
    heads = check_hf_config(raw.side_config, str(raw.path))
    openai_sd, ignored = hf_to_openai(raw.tensors)
    unmapped = {k: openai_sd.pop(k) for k in list(openai_sd) if k.startswith(_HF_PREFIXES)}
    clip_sd, more = openai_to_clip(openai_sd)
    config = clip_config(clip_sd, str(raw.path), options, vision_heads=heads["vision_heads"],
                         text_heads=heads["text_heads"])
    converted = build_from_clip(clip_sd, config, options, ignored + more)
    converted.state_dict.update(unmapped)  # under their HF names, so the strict check names them as found
    return converted
