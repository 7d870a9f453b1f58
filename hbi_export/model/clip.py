"""CLIP towers as HBI uses them: all text positions (not only EOT) and the per-frame CLS feature.

Module and parameter names match OpenAI CLIP under the ``clip.`` prefix of an official HBI checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from hbi_export.model.config import HBIConfig
from hbi_export.model.layers import MASK_NEG, LayerNorm, Transformer


class VisionTower(nn.Module):
    """CLIP ViT. ``forward`` returns the projected CLS token of each image."""

    def __init__(self, config: HBIConfig) -> None:
        super().__init__()
        v = config.vision
        scale = v.width**-0.5
        self.conv1 = nn.Conv2d(3, v.width, kernel_size=v.patch_size, stride=v.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(v.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(v.grid * v.grid + 1, v.width))
        self.ln_pre = LayerNorm(v.width)
        self.transformer = Transformer(v.width, v.layers, v.heads)
        self.ln_post = LayerNorm(v.width)
        self.proj = nn.Parameter(scale * torch.randn(v.width, config.embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) normalised -> (N, D) CLS features (``ln_post(cls) @ proj``)."""
        x = self.conv1(images)  # (N, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (N, g*g, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (N, g*g+1, W)
        # no attention mask: every patch is real. Only the CLS token is read, so the last block computes only it
        # (every patch is still its key and value): about 7% of a ViT-B/32 frame's FLOPs, same CLS output
        x = self.transformer(self.ln_pre(x), last_queries=1)  # (N, 1, W)
        return self.ln_post(x[:, 0]) @ self.proj  # (N, D)


class ClipTowers(nn.Module):
    """The CLIP text transformer plus the vision tower, under the official ``clip.*`` names."""

    def __init__(self, config: HBIConfig) -> None:
        super().__init__()
        t = config.text
        self.visual = VisionTower(config)
        self.transformer = Transformer(t.width, t.layers, t.heads)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))  # log(100); used by training only
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=t.width**-0.5)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: (B, L) -> (B, L, D) features of *all* positions, padding included.

        Each query attends to keys that are both causal (k <= q) and valid. Padded queries therefore see all
        valid keys (which come first) and stay finite; their features feed the token-merge conv later.
        """
        b, length = ids.shape
        x = self.token_embedding(ids) + self.positional_embedding[:length]  # (B, L, Wt)
        pos = torch.arange(length, device=ids.device)
        allowed = (pos[None, :] <= pos[:, None])[None] & (mask[:, None, :] > 0)  # (B, Lq, Lk)
        bias = torch.where(allowed, 0.0, MASK_NEG)[:, None]  # (B, 1, Lq, Lk)
        x = self.transformer(x, bias)
        return self.ln_final(x) @ self.text_projection  # (B, L, D)
