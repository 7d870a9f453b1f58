"""Transformer building blocks shared by the CLIP towers and the temporal transformer.

Parameter names follow OpenAI CLIP / the official HBI code (``attn.in_proj_weight``, ``mlp.c_fc`` ...) so that
official checkpoints load by name. Attention is written out (batch-first, additive bias) instead of using
``nn.MultiheadAttention``: the same arithmetic, one fewer layout permute, and an export-friendly graph.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# Additive bias / fill value for masked positions. Finite in fp16 (max 65504), so masks never produce inf or
# NaN in half precision, and still exactly zero weight after softmax or exp: exp(-1e4 + x) underflows to 0 in
# fp32 for any |x| < ~9.9e3 (attention logits and score-head outputs are orders of magnitude smaller).
# The official code uses -inf (CLIP text mask, CTM score), -1e6 (temporal mask) and -9e15 (WTI weights).
MASK_NEG = -1.0e4


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the activation dtype (fp16 export keeps its reductions in fp32; the
    TF-style eps 1e-12 of the temporal transformer underflows in fp16). A no-op cast in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def softmax32(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax computed in fp32, returned in the input dtype (a no-op cast in fp32)."""
    return x.float().softmax(dim=dim).to(x.dtype)


class QuickGELU(nn.Module):
    """CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with CLIP's packed ``in_proj`` parameters and an additive bias."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.normal_(self.in_proj_weight, std=width**-0.5)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, queries: int | None = None) -> torch.Tensor:
        """x: (B, N, W); bias: broadcastable to (B, heads, N, N), added to the logits. ``queries``: only the
        first ``queries`` positions attend (output ``(B, queries, W)``), every position still a key and value."""
        b, n, w = x.shape
        dh = w // self.heads
        if queries is None:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3W)
            qkv = qkv.view(b, n, 3, self.heads, dh).permute(2, 0, 3, 1, 4)  # (3, B, h, N, dh)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q = F.linear(x[:, :queries], self.in_proj_weight[:w], self.in_proj_bias[:w])  # (B, nq, W)
            q = q.view(b, queries, self.heads, dh).transpose(1, 2)  # (B, h, nq, dh)
            kv = F.linear(x, self.in_proj_weight[w:], self.in_proj_bias[w:])  # (B, N, 2W)
            kv = kv.view(b, n, 2, self.heads, dh).permute(2, 0, 3, 1, 4)  # (2, B, h, N, dh)
            k, v = kv[0], kv[1]
        logits = (q * dh ** -0.5) @ k.transpose(-2, -1)  # (B, h, nq, N)
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        out = softmax32(logits) @ v  # (B, h, nq, dh)
        return self.out_proj(out.transpose(1, 2).reshape(b, q.shape[2], w))


class ResidualBlock(nn.Module):
    """Pre-LN residual attention block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, ln_eps: float = 1e-5) -> None:
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width, eps=ln_eps)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                         ("c_proj", nn.Linear(4 * width, width))])
        )
        self.ln_2 = LayerNorm(width, eps=ln_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, queries: int | None = None) -> torch.Tensor:
        """``queries``: compute the block's output for the first ``queries`` positions only (``(B, queries, W)``)."""
        x = (x if queries is None else x[:, :queries]) + self.attn(self.ln_1(x), bias, queries)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`ResidualBlock` under the key prefix ``resblocks.{i}``."""

    def __init__(self, width: int, layers: int, heads: int, ln_eps: float = 1e-5) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, ln_eps) for _ in range(layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, last_queries: int | None = None
                ) -> torch.Tensor:
        """``last_queries``: the last block computes only the first ``last_queries`` positions (the output is
        ``(B, last_queries, W)``); what a caller reads of those positions is unchanged."""
        for i, block in enumerate(self.resblocks):
            x = block(x, bias, last_queries if i == len(self.resblocks) - 1 else None)
        return x


def key_padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) 0/1 key mask -> (B, 1, 1, N) additive bias: 0 where valid, MASK_NEG where padded."""
    zero = torch.zeros((), dtype=torch.float32, device=mask.device)
    neg = torch.full((), MASK_NEG, dtype=torch.float32, device=mask.device)
    return torch.where(mask[:, None, None, :] > 0, zero, neg)
