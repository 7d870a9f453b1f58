"""The caption / open-ended QA decoder: a small transformer that cross-attends to the retrieval model's video side.

Our design after the TPAMI paper's description (its layer details are not public; docs/captioning.md):

* **Memory.** The video side of the *retrieval* model (``HBIModel.encode_video`` / the package's
  ``video_encoder.onnx``): per level (entity, action, event) the L2-normalised tokens ``[B, N_l, D]``, their
  weights and valid mask. Each token becomes ``Linear([token, N_l * weight]) + level_embedding[l] +
  slot_embedding[slot]`` (slot: its position in the concatenation, so entity tokens keep their frame order) and
  the three levels are concatenated into ``M = N_0 + N_1 + N_2`` memory tokens; the valid mask becomes an
  additive attention bias. ``levels`` in the config selects which levels the memory uses (ablation switch).
  ``frame_deltas`` adds ``N_0 - 1`` more memory tokens, one per pair of consecutive frames:
  ``Linear(sqrt(D) * (token_k - token_{k-1})) + delta_embedding`` (valid when both frames are), so that what
  *changes* between two frames - the events a caption names - is one token the decoder can attend to, instead
  of a comparison it must assemble from two.
* **Spatial memory** (``patch_grid`` > 0). The side says what each frame shows far better than where (a linear
  probe reads a move's direction from the frame tokens on 65 % of unseen combinations, from patch tokens on 100 %:
  ``benchmarks/probe_motion.py``). :class:`PatchEncoder`, a frozen copy of the retrieval tower's blocks but the
  last, maps the frames to a ``patch_grid`` x ``patch_grid`` map of patch tokens per frame (side tensor 10,
  ``video_patches``); each cell becomes ``Linear(LayerNorm(patch))`` and each cell's change between consecutive
  frames ``Linear'(LayerNorm(p_k) - LayerNorm(p_{k-1}))``: ``(2 N_0 - 1) * patch_grid**2`` more memory tokens.
* **Decoder.** ``layers`` pre-LayerNorm blocks: causal self-attention (with a key/value cache), cross-attention
  to the memory (its keys / values computed once per video), a GELU MLP; learned positions; the output head is
  tied to the token embedding.
* **Vocabulary.** CLIP BPE ids (``hbi_runtime.tokenizer``), SOT starts every sequence and EOT ends it. The
  embedding table holds ``vocab_ids`` (a subset of the 49408 CLIP ids: by default every id of the training
  text, plus SOT / EOT) and one unknown row for prefix tokens outside it; ``vocab_ids=None`` uses all of CLIP's
  (49408 x width parameters: 25 MB at width 128, too large for the demo).
* **Tasks.** Captioning: prefix ``[SOT]``. Open-ended QA: prefix ``[SOT] question-tokens`` (the question ends in
  ``?``), the answer follows, then EOT.

Exported as three graphs (``hbi_export.tasks.caption``): ``caption_memory`` (side -> per-layer cross-attention
keys / values + memory bias), ``decoder_init`` (a prefix, no past -> last-position log-probabilities + the
self-attention cache) and ``decoder_step`` (one token + the cache -> log-probabilities + the longer cache); the
cache has a fixed arity: ``past_key_i`` / ``past_value_i`` per layer, ``[batch, heads, past, head_dim]``. With a
spatial memory, a fourth: ``frame_patches`` (frames -> the patch map).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from hbi_export.model.layers import MASK_NEG
from hbi_runtime.errors import BadInputError
from hbi_runtime.tokenizer import EOT_ID, SOT_ID, VOCAB_SIZE

LEVEL_NAMES = ("entity", "action", "event")


@dataclass(frozen=True)
class DecoderConfig:
    """Everything the decoder's architecture depends on (stored in the caption package and checkpoint)."""

    embed_dim: int = 64  # D of the retrieval model's video side
    tokens_per_level: tuple[int, int, int] = (8, 2, 1)  # video side N_l (entity = frames)
    levels: tuple[int, ...] = (0, 1, 2)  # which levels the memory uses
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    max_positions: int = 48  # prefix + generated tokens
    vocab_ids: tuple[int, ...] | None = None  # CLIP ids the decoder knows (None: all 49408)
    dropout: float = 0.1
    frame_deltas: bool = False  # add consecutive-frame difference tokens to the memory (module docstring)
    patch_grid: int = 0  # > 0: spatial memory of grid x grid pooled patch tokens per frame (module docstring)
    patch_vision: dict | None = None  # the retrieval model's VisionConfig fields (its tower's copy) when patch_grid

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens_per_level", tuple(self.tokens_per_level))
        object.__setattr__(self, "levels", tuple(self.levels))
        if self.vocab_ids is not None:
            ids = tuple(int(i) for i in self.vocab_ids)
            if SOT_ID not in ids or EOT_ID not in ids or len(set(ids)) != len(ids):
                raise BadInputError("decoder vocab_ids must hold SOT and EOT and no id twice")
            object.__setattr__(self, "vocab_ids", ids)
        if self.width % self.heads:
            raise BadInputError(f"decoder width {self.width} is not a multiple of heads {self.heads}")
        if not self.levels or any(lv not in (0, 1, 2) for lv in self.levels):
            raise BadInputError(f"decoder levels must be a non-empty subset of (0, 1, 2), got {self.levels}")
        if self.patch_grid < 0 or (self.patch_grid > 0) != (self.patch_vision is not None):
            raise BadInputError(f"decoder patch_grid {self.patch_grid} needs patch_vision (and 0 none)")
        if self.patch_vision is not None:
            v = dict(self.patch_vision)
            side = v["image_size"] // v["patch_size"]
            if side % self.patch_grid or v["layers"] < 1:
                raise BadInputError(f"decoder patch_grid {self.patch_grid} does not divide the {side} x {side} "
                                    "patch map (or the tower has no layers)")
            object.__setattr__(self, "patch_vision", v)

    @property
    def vocab_size(self) -> int:
        """Output classes (the known CLIP ids); the embedding has one more row (unknown)."""
        return VOCAB_SIZE if self.vocab_ids is None else len(self.vocab_ids)

    @property
    def patch_cells(self) -> int:
        return self.patch_grid * self.patch_grid

    @property
    def memory_tokens(self) -> int:
        frames = self.tokens_per_level[0]
        deltas = frames - 1 if self.frame_deltas else 0
        patches = (2 * frames - 1) * self.patch_cells  # per frame, and per pair of consecutive frames
        return sum(self.tokens_per_level[lv] for lv in self.levels) + deltas + patches

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_level"] = list(self.tokens_per_level)
        d["levels"] = list(self.levels)
        d["vocab_ids"] = None if self.vocab_ids is None else list(self.vocab_ids)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> DecoderConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise BadInputError(f"unknown decoder config fields {sorted(unknown)}")
        return cls(**data)


@dataclass
class VocabMap:
    """CLIP id <-> decoder index (identity for the full vocabulary); unknown CLIP ids map to ``unk``."""

    config: DecoderConfig
    _index: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.config.vocab_ids is not None:
            self._index = {c: i for i, c in enumerate(self.config.vocab_ids)}

    @property
    def unk(self) -> int:
        return self.config.vocab_size

    def to_local(self, ids) -> list[int]:
        if self.config.vocab_ids is None:
            return [int(i) for i in ids]
        return [self._index.get(int(i), self.unk) for i in ids]

    def to_clip(self, local) -> list[int]:
        if self.config.vocab_ids is None:
            return [int(i) for i in local]
        return [self.config.vocab_ids[int(i)] for i in local]

    @property
    def sot(self) -> int:
        return self.to_local([SOT_ID])[0]

    @property
    def eot(self) -> int:
        return self.to_local([EOT_ID])[0]


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        return x.view(b, n, self.heads, w // self.heads).transpose(1, 2)  # (B, h, n, dh)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = logits.softmax(dim=-1) @ v  # (B, h, n, dh)
        b, h, n, dh = out.shape
        return self.out(out.transpose(1, 2).reshape(b, n, h * dh))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        w = config.width
        self.ln_self, self.ln_cross, self.ln_mlp = nn.LayerNorm(w), nn.LayerNorm(w), nn.LayerNorm(w)
        self.self_attn = _Attention(w, config.heads)
        self.cross_attn = _Attention(w, config.heads)
        self.mlp = nn.Sequential(nn.Linear(w, config.mlp_ratio * w), nn.GELU(), nn.Linear(config.mlp_ratio * w, w))
        self.drop = nn.Dropout(config.dropout)

    def cross_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross_attn.split(self.cross_attn.k(memory)), self.cross_attn.split(self.cross_attn.v(memory))

    def forward(self, x, past_k, past_v, self_bias, cross_k, cross_v, memory_bias):
        """x (B, n, W); past_k / past_v (B, h, P, dh) or None; self_bias (n, P + n) or None (no mask needed);
        memory_bias (B, 1, 1, M). Returns x and the present keys / values (B, h, P + n, dh)."""
        h = self.ln_self(x)
        q, k, v = (self.self_attn.split(f(h)) for f in (self.self_attn.q, self.self_attn.k, self.self_attn.v))
        if past_k is not None:
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        x = x + self.drop(self.self_attn.attend(q, k, v, self_bias))
        h = self.ln_cross(x)
        x = x + self.drop(self.cross_attn.attend(self.cross_attn.split(self.cross_attn.q(h)), cross_k, cross_v,
                                                 memory_bias))
        x = x + self.drop(self.mlp(self.ln_mlp(x)))
        return x, k, v


class PatchEncoder(nn.Module):
    """Frames -> where things are: the retrieval vision tower's patch tokens as its last block reads them (the
    output of every block but the last; the CLS attends to them), average-pooled to a ``patch_grid`` x
    ``patch_grid`` map per frame, row-major. Its weights are a frozen copy of the retrieval model's tower
    (:meth:`load_tower`; the same names under ``patch_encoder.``), exported as the caption package's
    ``frame_patches`` graph."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        from hbi_export.model.layers import LayerNorm, Transformer

        v = config.patch_vision
        self.grid, self.side = config.patch_grid, v["image_size"] // v["patch_size"]
        self.conv1 = nn.Conv2d(3, v["width"], kernel_size=v["patch_size"], stride=v["patch_size"], bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(v["width"]))
        self.positional_embedding = nn.Parameter(torch.zeros(self.side * self.side + 1, v["width"]))
        self.ln_pre = LayerNorm(v["width"])
        self.transformer = Transformer(v["width"], v["layers"] - 1, v["heads"])
        self.requires_grad_(False)

    def load_tower(self, tower: nn.Module) -> None:
        """Copy the weights of a retrieval ``VisionTower`` (strict: every tensor this encoder has)."""
        own = self.state_dict()
        src = tower.state_dict()
        missing = [k for k in own if k not in src]
        if missing:
            raise BadInputError(f"the vision tower lacks {missing[:3]}: not the tower this decoder was built for")
        self.load_state_dict({k: src[k] for k in own}, strict=True)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) normalised frames -> (B, T, grid * grid, width)."""
        b, t = frames.shape[:2]
        x = self.conv1(frames.flatten(0, 1)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.transformer(self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)))
        p = x[:, 1:].transpose(1, 2).unflatten(2, (self.side, self.side))
        p = nn.functional.avg_pool2d(p, self.side // self.grid)  # (B*T, width, grid, grid)
        return p.flatten(2).transpose(1, 2).unflatten(0, (b, t))


class CaptionDecoder(nn.Module):
    """The decoder (module docstring). Token inputs are *decoder indices* (:class:`VocabMap`), not CLIP ids."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        w, d = config.width, config.embed_dim
        self.memory_proj = nn.Linear(d + 1, w)
        self.level_embedding = nn.Parameter(torch.zeros(3, w))
        self.slot_embedding = nn.Parameter(torch.zeros(config.memory_tokens, w))
        if config.frame_deltas:
            self.delta_proj = nn.Linear(config.embed_dim, w)
            self.delta_embedding = nn.Parameter(torch.zeros(w))
        if config.patch_grid:
            width = config.patch_vision["width"]
            self.patch_encoder = PatchEncoder(config)
            self.patch_ln = nn.LayerNorm(width, elementwise_affine=False)
            self.patch_proj = nn.Linear(width, w)
            self.patch_delta_proj = nn.Linear(width, w)
        self.memory_ln = nn.LayerNorm(w)
        self.token_embedding = nn.Embedding(config.vocab_size + 1, w)  # + unknown
        self.position_embedding = nn.Parameter(torch.zeros(config.max_positions, w))
        self.blocks = nn.ModuleList(DecoderLayer(config) for _ in range(config.layers))
        self.ln_final = nn.LayerNorm(w)
        for p in (self.level_embedding, self.slot_embedding, self.position_embedding):
            nn.init.normal_(p, std=0.02)
        if config.frame_deltas:
            nn.init.normal_(self.delta_embedding, std=0.02)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    # ------------------------------------------------------------------ memory (once per video)
    def memory(self, side: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """9 side tensors (tokens, weights, mask per level) -> memory (B, M, W), additive bias (B, 1, 1, M)."""
        parts, masks = [], []
        for lv in self.config.levels:
            tokens, weights, mask = side[3 * lv], side[3 * lv + 1], side[3 * lv + 2]
            n = tokens.shape[1]
            x = self.memory_proj(torch.cat([tokens, weights[..., None] * n], dim=-1))
            parts.append(x + self.level_embedding[lv])
            masks.append(mask)
        if self.config.frame_deltas:
            tokens, mask = side[0], side[2]
            both = mask[:, 1:] * mask[:, :-1]
            delta = (tokens[:, 1:] - tokens[:, :-1]) * both[..., None].to(tokens.dtype)
            parts.append(self.delta_proj(delta * self.config.embed_dim ** 0.5) + self.delta_embedding)
            masks.append(both)
        if self.config.patch_grid:
            # side[9]: (B, T, G, width) patch tokens; per frame and cell one token, then per pair of consecutive
            # frames and cell the change (its own projection, so "what moved where" is one token)
            p = self.patch_ln(side[9])
            frame_mask = side[2]
            b, t, g, _ = p.shape
            parts.append(self.patch_proj(p).flatten(1, 2))
            masks.append(frame_mask[:, :, None].expand(b, t, g).flatten(1))
            both = (frame_mask[:, 1:] * frame_mask[:, :-1])[:, :, None]
            parts.append(self.patch_delta_proj((p[:, 1:] - p[:, :-1]) * both[..., None]).flatten(1, 2))
            masks.append(both.expand(b, t - 1, g).flatten(1))
        mem = self.memory_ln(torch.cat(parts, dim=1) + self.slot_embedding)
        mask = torch.cat(masks, dim=1)
        bias = torch.where(mask > 0, torch.zeros_like(mask), torch.full_like(mask, MASK_NEG))
        return mem, bias[:, None, None, :]

    def cross_cache(self, side: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per layer the cross-attention (key, value) flattened [k0, v0, k1, v1, ...], and the memory bias."""
        mem, bias = self.memory(side)
        kv = []
        for block in self.blocks:
            kv.extend(block.cross_kv(mem))
        return kv, bias

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: torch.Tensor, past: list[torch.Tensor] | None, cross: list[torch.Tensor],
               memory_bias: torch.Tensor, all_positions: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ids (B, n) decoder indices after ``past`` (flattened [k0, v0, ...] of (B, h, P, dh), or None).

        Returns log-probabilities (B, V) of the last position (``all_positions``: (B, n, V)) and the present
        cache (B, h, P + n, dh) per layer, flattened."""
        n = ids.shape[1]
        start = 0 if past is None else past[0].shape[2]
        x = self.token_embedding(ids) + self.position_embedding[start:start + n]
        if n > 1:
            # causal bias over [past, new]: new position i sees past and new positions <= i
            i = torch.arange(n, device=x.device)[:, None]
            j = torch.arange(start + n, device=x.device)[None, :]
            self_bias = torch.where(j <= i + start, torch.zeros((), dtype=x.dtype, device=x.device),
                                    torch.full((), MASK_NEG, dtype=x.dtype, device=x.device))
        else:
            self_bias = None
        present = []
        for li, block in enumerate(self.blocks):
            pk = None if past is None else past[2 * li]
            pv = None if past is None else past[2 * li + 1]
            x, k, v = block(x, pk, pv, self_bias, cross[2 * li], cross[2 * li + 1], memory_bias)
            present += [k, v]
        x = self.ln_final(x if all_positions else x[:, -1])
        logits = x @ self.token_embedding.weight[: self.config.vocab_size].t()
        return logits.float().log_softmax(dim=-1), present

    def forward(self, side: tuple[torch.Tensor, ...], ids: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: (B, n) ids -> (B, n, V) log-probabilities of the next token at every position."""
        cross, bias = self.cross_cache(side)
        logp, _ = self.decode(ids, None, cross, bias, all_positions=True)
        return logp


# ---------------------------------------------------------------------------------------------------------------
# checkpoint: model.safetensors + decoder.json (config)

WEIGHTS, CONFIG = "decoder.safetensors", "decoder.json"


def save_decoder(model: CaptionDecoder, out: str | Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps({"config": model.config.to_dict(), **(extra or {})}, indent=1) + "\n")
    return out


def load_decoder(path: str | Path) -> tuple[CaptionDecoder, dict]:
    """A decoder folder (:func:`save_decoder`) -> (model in eval mode, the extra fields of decoder.json)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / WEIGHTS).is_file() or not (path / CONFIG).is_file():
        raise BadInputError(f"{path} is not a caption decoder folder (needs {WEIGHTS} and {CONFIG})",
                            hint="train one with `hbi-train caption --out DIR`")
    meta = json.loads((path / CONFIG).read_text())
    model = CaptionDecoder(DecoderConfig.from_dict(meta.pop("config")))
    model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    return model.eval(), meta
