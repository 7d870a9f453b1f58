"""Deterministic weights and inputs for the tiny official-compatible HBI golden fixture.

Pure numpy (no torch).  ``official_state_dict(seed)`` returns a complete checkpoint in the
*official* HBI key layout (github jpthu17/HBI, commit b261e9c, ``HBI.models.modeling.HBI``) for
the tiny configuration ``TINY_OFFICIAL``; ``golden_inputs(seed)`` returns the inputs the
expected values in ``golden.npz`` were computed on.  See README.md in this folder.

Every tensor is drawn from its own generator, seeded by ``(seed, crc32(key))``, so a tensor's
values do not depend on the order or presence of other keys.
"""
from __future__ import annotations

import math
import zlib

import numpy as np

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
TINY_OFFICIAL = dict(
    # joint embedding / text tower (official CTM/TCBlock are hard-coded to 512 dims)
    embed_dim=512,
    text_width=512,
    text_layers=1,
    text_heads=8,
    context_length=16,
    vocab_size=1000,
    # vision tower (ViT): width 64 -> 64 // 64 = 1 head; 32 / 16 = grid 2 -> 5 tokens
    vision_width=64,
    vision_layers=1,
    vision_heads=1,
    vision_patch=16,
    image_size=32,
    # temporal transformer (seqTransf), TF-style LayerNorm eps 1e-12
    temporal_layers=2,
    temporal_heads=8,
    # token merge (CTM/TCBlock) ratios and kNN k
    t_rate0=0.25,
    t_rate1=0.5,
    v_rate0=0.25,
    v_rate1=0.5,
    k=3,
    banzhaf_planes=64,
    # inputs (golden_inputs)
    num_texts=5,
    max_words=16,
    num_videos=5,
    max_frames=12,  # official level-2 DPC-kNN needs >= k=3 level-1 tokens: ceil(T*0.25) >= 3
    text_lengths=(16, 11, 6, 3, 2),
    frame_counts=(12, 6, 3, 2, 1),
    sot_id=998,
    eot_id=999,
    # token counts per level (entity -> action -> event), from ceil(N * ratio) on padded N
    text_tokens_per_level=(16, 4, 2),
    video_tokens_per_level=(12, 3, 2),
)


def _specs(cfg: dict = TINY_OFFICIAL) -> list[tuple[str, tuple, str, float]]:
    """(key, shape, kind, scale) for every entry of the official state dict.

    kinds: 'normal' (N(0, scale^2)), 'ln_w' (1 + N(0, scale^2)), 'bias' (N(0, scale^2)),
    'const' (filled with scale), 'var' (uniform(0.5, 1.5)), 'count' (int64 scalar = scale).
    """
    D = cfg["embed_dim"]
    W = cfg["text_width"]
    VW = cfg["vision_width"]
    P = cfg["vision_patch"]
    grid = cfg["image_size"] // P
    ctx = cfg["context_length"]
    out: list[tuple[str, tuple, str, float]] = []

    def ln(prefix, width):
        out.append((f"{prefix}.weight", (width,), "ln_w", 0.05))
        out.append((f"{prefix}.bias", (width,), "bias", 0.02))

    def resblock(prefix, width):
        out.append((f"{prefix}.attn.in_proj_weight", (3 * width, width), "normal", width ** -0.5))
        out.append((f"{prefix}.attn.in_proj_bias", (3 * width,), "bias", 0.02))
        out.append((f"{prefix}.attn.out_proj.weight", (width, width), "normal", width ** -0.5))
        out.append((f"{prefix}.attn.out_proj.bias", (width,), "bias", 0.02))
        ln(f"{prefix}.ln_1", width)
        out.append((f"{prefix}.mlp.c_fc.weight", (4 * width, width), "normal", width ** -0.5))
        out.append((f"{prefix}.mlp.c_fc.bias", (4 * width,), "bias", 0.02))
        out.append((f"{prefix}.mlp.c_proj.weight", (width, 4 * width), "normal", (4 * width) ** -0.5))
        out.append((f"{prefix}.mlp.c_proj.bias", (width,), "bias", 0.02))
        ln(f"{prefix}.ln_2", width)

    # ---- CLIP ----
    out.append(("clip.positional_embedding", (ctx, W), "normal", 0.01))
    out.append(("clip.text_projection", (W, D), "normal", W ** -0.5))
    out.append(("clip.logit_scale", (), "const", math.log(1 / 0.07)))
    out.append(("clip.visual.class_embedding", (VW,), "normal", 0.1))
    out.append(("clip.visual.positional_embedding", (grid * grid + 1, VW), "normal", 0.1))
    out.append(("clip.visual.proj", (VW, D), "normal", VW ** -0.5))
    out.append(("clip.visual.conv1.weight", (VW, 3, P, P), "normal", (3 * P * P) ** -0.5))
    ln("clip.visual.ln_pre", VW)
    for i in range(cfg["vision_layers"]):
        resblock(f"clip.visual.transformer.resblocks.{i}", VW)
    ln("clip.visual.ln_post", VW)
    for i in range(cfg["text_layers"]):
        resblock(f"clip.transformer.resblocks.{i}", W)
    out.append(("clip.token_embedding.weight", (cfg["vocab_size"], W), "normal", 0.02))
    ln("clip.ln_final", W)

    # ---- WTI weight heads: Linear(W, 2W) -> ReLU -> Linear(2W, 1) ----
    for name in ["text_weight_fc", "video_weight_fc", "text_weight_fc0", "video_weight_fc0",
                 "text_weight_fc1", "video_weight_fc1"]:
        out.append((f"{name}.0.weight", (2 * W, W), "normal", W ** -0.5))
        out.append((f"{name}.0.bias", (2 * W,), "bias", 0.02))
        out.append((f"{name}.2.weight", (1, 2 * W), "normal", 2.0 * (2 * W) ** -0.5))
        out.append((f"{name}.2.bias", (1,), "bias", 0.02))

    # ---- temporal transformer ----
    out.append(("frame_position_embeddings.weight", (ctx, W), "normal", 0.01))
    for i in range(cfg["temporal_layers"]):
        resblock(f"transformerClip.resblocks.{i}", W)

    # ---- Banzhaf modules (training only) ----
    pl = cfg["banzhaf_planes"]
    for name in ["banzhafmodel", "banzhafmodel0", "banzhafmodel1", "banzhafteacher"]:
        out.append((f"{name}.Q", (pl, pl), "normal", pl ** -0.5))
        out.append((f"{name}.K", (pl, pl), "normal", pl ** -0.5))
        out.append((f"{name}.V", (pl, pl), "normal", pl ** -0.5))
        out.append((f"{name}.cnn1.weight", (pl, 1, 3, 3), "normal", 1.0 / 3.0))
        out.append((f"{name}.cnn1.bias", (pl,), "bias", 0.02))
        out.append((f"{name}.bn.weight", (pl,), "ln_w", 0.05))
        out.append((f"{name}.bn.bias", (pl,), "bias", 0.02))
        out.append((f"{name}.bn.running_mean", (pl,), "bias", 0.1))
        out.append((f"{name}.bn.running_var", (pl,), "var", 0.0))
        out.append((f"{name}.bn.num_batches_tracked", (), "count", 100))
        out.append((f"{name}.cnn2.weight", (1, pl, 3, 3), "normal", (9 * pl) ** -0.5))
        out.append((f"{name}.cnn2.bias", (1,), "bias", 0.02))

    # ---- token merge: CTM + TCBlock, per modality and level ----
    for m in ["t", "v"]:
        for lvl in ["0", "1"]:
            c = f"{m}_ctm{lvl}"
            out.append((f"{c}.conv.conv.weight", (D, D, 3), "normal", (3 * D) ** -0.5))
            ln(f"{c}.norm", D)
            out.append((f"{c}.score.weight", (1, D), "normal", 1.5 * D ** -0.5))
            out.append((f"{c}.score.bias", (1,), "bias", 0.02))
            b = f"{m}_block{lvl}"
            ln(f"{b}.norm1", D)
            out.append((f"{b}.attn.q.weight", (D, D), "normal", D ** -0.5))
            out.append((f"{b}.attn.q.bias", (D,), "bias", 0.02))
            out.append((f"{b}.attn.kv.weight", (2 * D, D), "normal", D ** -0.5))
            out.append((f"{b}.attn.kv.bias", (2 * D,), "bias", 0.02))
            out.append((f"{b}.attn.proj.weight", (D, D), "normal", D ** -0.5))
            out.append((f"{b}.attn.proj.bias", (D,), "bias", 0.02))
    return out


def official_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Full official-format HBI checkpoint for TINY_OFFICIAL, float32 (num_batches_tracked: int64)."""
    sd: dict[str, np.ndarray] = {}
    for key, shape, kind, scale in _specs():
        rng = np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])
        if kind == "normal" or kind == "bias":
            arr = rng.standard_normal(shape) * scale
        elif kind == "ln_w":
            arr = 1.0 + rng.standard_normal(shape) * scale
        elif kind == "const":
            arr = np.full(shape, scale)
        elif kind == "var":
            arr = rng.uniform(0.5, 1.5, size=shape)
        elif kind == "count":
            sd[key] = np.array(int(scale), dtype=np.int64).reshape(shape)
            continue
        else:  # pragma: no cover
            raise ValueError(kind)
        sd[key] = np.asarray(arr, dtype=np.float32)
    return sd


def clip_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """The CLIP part of official_state_dict with the 'clip.' prefix removed (OpenAI CLIP key names)."""
    return {k[len("clip."):]: v for k, v in official_state_dict(seed).items() if k.startswith("clip.")}


def golden_inputs(seed: int = 1) -> dict[str, np.ndarray]:
    """Deterministic golden inputs.

    text_ids [5, 16] int64: 998 = start, words in [1, 997], 999 = end (the largest id, so argmax
    finds it), zero padded; text_mask [5, 16] int64.
    video [5, 12, 3, 32, 32] float32 N(0, 1), padded frames all zeros; video_mask [5, 12] int64.
    """
    cfg = TINY_OFFICIAL
    rng = np.random.default_rng(seed)
    bt, L = cfg["num_texts"], cfg["max_words"]
    text_ids = np.zeros((bt, L), dtype=np.int64)
    text_mask = np.zeros((bt, L), dtype=np.int64)
    for i, n in enumerate(cfg["text_lengths"]):
        text_ids[i, 0] = cfg["sot_id"]
        text_ids[i, 1:n - 1] = rng.integers(1, 998, size=n - 2)
        text_ids[i, n - 1] = cfg["eot_id"]
        text_mask[i, :n] = 1
    bv, T, S = cfg["num_videos"], cfg["max_frames"], cfg["image_size"]
    video = np.zeros((bv, T, 3, S, S), dtype=np.float32)
    video_mask = np.zeros((bv, T), dtype=np.int64)
    for j, n in enumerate(cfg["frame_counts"]):
        video[j, :n] = rng.standard_normal((n, 3, S, S)).astype(np.float32)
        video_mask[j, :n] = 1
    return dict(text_ids=text_ids, text_mask=text_mask, video=video, video_mask=video_mask)
