"""Token merging (CTM with DPC-kNN clustering) and the attention-only TCBlock.

Each modality is merged on its own, so merged tokens are computed once per text or video. Deliberate
differences from the official ``cluster.py`` (see docs/architecture.md):

1. Ties in density are broken by token index (the lower index outranks), by an explicit comparison, instead of
   adding ``torch.rand * 1e-6``; ties in the centre score keep the lower index first (a stable sort).
2. Masked distances are filled with the *per-sample* maximum + 1, not the batch maximum, so a video's clusters
   never depend on which other videos share its batch.
3. Masked scores use the finite ``MASK_NEG`` instead of ``-inf`` (fp16-safe; still zero weight after exp).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hbi_export.model.layers import MASK_NEG, LayerNorm, softmax32


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, N, N) Euclidean distances scaled by 1/sqrt(C), as the official DPC-kNN."""
    return torch.cdist(x, x) / (x.shape[-1] ** 0.5)


def dpc_knn(x: torch.Tensor, clusters: int, k: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Density-peak clustering with kNN density. Returns the cluster index of each token, (B, N) int64.

    Cluster ``c`` is centred on the token with the c-th highest centre score; every centre is assigned to its
    own cluster, every other token to its nearest centre (lowest cluster index on equal distance).
    """
    with torch.no_grad():
        b, n, _ = x.shape
        dist = pairwise_distance(x)  # (B, N, N)
        if mask is not None:
            valid = mask > 0  # (B, N)
            fill = dist.flatten(1).max(dim=-1).values + 1.0  # (B,) per-sample, see module docstring
            dist = torch.where(valid[:, None, :], dist, fill[:, None, None])
        nearest = torch.topk(dist, k=min(k, n), dim=-1, largest=False).values  # (B, N, k), self included
        density = torch.exp(-(nearest**2).mean(dim=-1))  # (B, N)
        if mask is not None:
            density = density * valid.to(density.dtype)
        # j outranks i when it is denser, or equally dense with a lower index (deterministic tie-break).
        idx = torch.arange(n, device=x.device)
        d_i, d_j = density[:, :, None], density[:, None, :]  # (B, N, 1), (B, 1, N)
        outranks = (d_j > d_i) | ((d_j == d_i) & (idx[None, None, :] < idx[None, :, None]))  # (B, i, j)
        dist_max = dist.flatten(1).max(dim=-1).values[:, None, None]  # (B, 1, 1)
        parent_dist = torch.where(outranks, dist, dist_max).min(dim=-1).values  # (B, N)
        score = parent_dist * density
        centres = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :clusters]  # (B, C)
        to_centre = torch.gather(dist, 1, centres[:, :, None].expand(b, clusters, n))  # (B, C, N)
        assign = to_centre.argmin(dim=1)  # (B, N), first minimum on ties
        own = torch.arange(clusters, device=x.device).expand(b, clusters)
        return assign.scatter(1, centres, own)


def cluster_assignment(x: torch.Tensor, mask: torch.Tensor | None, clusters: int, k: int) -> torch.Tensor:
    """The cluster of each token, (B, N) int64: what :func:`dpc_knn` returns, computed without any operator whose
    tie order matters, for export next to the ``hbi.TokenMerge`` node (the encoders' optional cluster outputs,
    docs/explain.md).

    Written as the op's decomposition is (``hbi_export/onnx/functions.py``): matmul-form distances made exactly
    symmetric with a zero diagonal; centres by an exact rank (``#{j: s_j > s_i or (s_j == s_i and j < i)}``, a
    strict total order); the nearest centre as the smallest cluster index at the minimum distance, compared
    exactly. ``TopK`` is used for its values only. Same rules as :func:`dpc_knn`, so the same clusters except
    where cdist and the matmul form round a near tie differently.
    """
    with torch.no_grad():
        xf = x.float()
        b, n, c = xf.shape
        sq = (xf * xf).sum(dim=-1, keepdim=True)  # (B, N, 1)
        gram = xf @ xf.transpose(1, 2)
        d2 = sq + sq.transpose(1, 2) - (gram + gram)
        d2 = (d2 + d2.transpose(1, 2)) * 0.5
        idx = torch.arange(n, device=x.device)
        diagonal = idx[None, :] == idx[:, None]  # (N, N)
        dist = torch.where(diagonal, torch.zeros_like(d2), d2.clamp_min(0.0)).sqrt() / (c ** 0.5)
        valid = (torch.ones(b, n, device=x.device) if mask is None else mask.float()) > 0
        fill = dist.amax(dim=(1, 2), keepdim=True) + 1.0  # per sample, as dpc_knn
        dist = torch.where(valid[:, None, :], dist, fill)
        nearest = torch.topk(dist, k=min(k, n), dim=-1, largest=False).values
        density = torch.exp(-(nearest * nearest).mean(dim=-1)) * valid.float()  # (B, N)
        lower = idx[None, :] < idx[:, None]  # [i, j]: j < i
        d_i, d_j = density[:, :, None], density[:, None, :]
        outranks = (d_j > d_i) | ((d_j == d_i) & lower)
        dist_max = dist.amax(dim=(1, 2), keepdim=True)
        parent = torch.where(outranks, dist, dist_max).amin(dim=-1)
        s_i = (parent * density)[:, :, None]  # (B, N, 1)
        s_j = s_i.transpose(1, 2)
        rank = ((s_j > s_i) | ((s_j == s_i) & lower)).sum(dim=-1)  # (B, N), a permutation of 0..N-1
        cluster_ids = torch.arange(clusters, device=x.device)
        is_centre = rank[:, None, :] == cluster_ids[None, :, None]  # (B, K, N): token n has rank c
        centres = (is_centre.long() * idx[None, None, :]).sum(dim=-1)  # (B, K)
        to_centre = torch.gather(dist, 1, centres[:, :, None].expand(b, clusters, n))  # (B, K, N)
        at_min = to_centre == to_centre.amin(dim=1, keepdim=True)
        first = torch.where(at_min, cluster_ids[None, :, None], torch.full_like(at_min, clusters, dtype=torch.long))
        return torch.where(rank < clusters, rank, first.amin(dim=1))


CLUSTER_CHECK_RTOL = 1e-2  # merge_check: rounding is ~1e-7 (fp32), ~1e-3 (fp16, TF32); a wrong token ~1


def merge_check(x: torch.Tensor, score: torch.Tensor, assign: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """How well ``assign`` explains ``merged``: per sample, max |merge(x, assign) - merged| / max |merged|, (B,).

    ~1e-7 (fp32) when ``assign`` is the assignment the merge used; a token in another cluster moves a merged
    token by about its distance to the cluster. The encoders output ``merge_check <= CLUSTER_CHECK_RTOL``.
    """
    with torch.no_grad():
        clusters = merged.shape[1]
        again = merge_tokens(x.float(), assign, score.float().exp(), clusters)
        diff = (again - merged.float()).abs().flatten(1).amax(dim=-1)
        return diff / (merged.float().abs().flatten(1).amax(dim=-1) + 1e-6)


def token_merge(x: torch.Tensor, score: torch.Tensor, mask: torch.Tensor | None, clusters: int,
                k: int) -> torch.Tensor:
    """DPC-kNN clustering + weighted merge (the ``hbi.TokenMerge`` op, docs/custom_ops.md): (B, clusters, C).

    ``score`` is the CTM score (``MASK_NEG`` at padded positions); the merge weights are ``exp(score)``.
    """
    return merge_tokens(x, dpc_knn(x, clusters, k, mask), score.exp(), clusters)


def merge_tokens(x: torch.Tensor, assign: torch.Tensor, weight: torch.Tensor, clusters: int) -> torch.Tensor:
    """Weighted mean per cluster: (B, N, C), (B, N), (B, N) -> (B, clusters, C).

    x_c = sum_{n in c} x_n w_n / (sum_{n in c} w_n + 1e-6), written as a one-hot matmul (no scatter-add).
    A cluster whose members all have weight 0 (padding only) yields the zero vector, as in the official code.
    """
    onehot = (assign[:, None, :] == torch.arange(clusters, device=x.device)[None, :, None]).to(x.dtype)
    norm = onehot @ weight[:, :, None] + 1e-6  # (B, clusters, 1)
    share = weight[:, None, :] / torch.gather(norm, 1, assign[:, :, None]).transpose(1, 2)  # (B, 1, N)
    return (onehot * share) @ x  # (B, clusters, C)


class TokenConv(nn.Module):
    """x + Conv1d(kernel 3, pad 1, no bias) along the token axis; key ``conv.weight``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x.transpose(1, 2)).transpose(1, 2)


class CTM(nn.Module):
    """Cluster-based token merge. Keys: ``conv.conv.weight``, ``norm.*``, ``score.*``."""

    def __init__(self, dim: int, ratio: float, k: int = 3) -> None:
        super().__init__()
        self.ratio = ratio
        self.k = k
        # The merge implementation: export swaps in the torch custom op ``torch.ops.hbi.token_merge`` (same
        # eager code) so that the graph gets one ``hbi.TokenMerge`` node (hbi_export/onnx/torch_ops.py).
        self.merge_fn = token_merge
        self.conv = TokenConv(dim)
        self.norm = LayerNorm(dim)
        self.score = nn.Linear(dim, 1)

    def clusters(self, n_tokens: int) -> int:
        """From the *padded* token count, as the official code (a static shape at export)."""
        return max(math.ceil(n_tokens * self.ratio), 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None):
        """x: (B, N, C), mask: (B, N) or None.

        Returns (merged (B, clusters, C), tokens (B, N, C) after conv+LN, score (B, N)); ``score`` is
        ``MASK_NEG`` at masked positions and serves as the TCBlock's additive attention bias.
        """
        x = self.norm(self.conv(x))
        score = self.score(x).squeeze(-1)  # (B, N)
        if mask is not None:
            score = torch.where(mask > 0, score, torch.full_like(score, MASK_NEG))
        merged = self.merge_fn(x, score, mask, self.clusters(x.shape[1]), self.k)
        return merged, x, score

    def assignment(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The cluster of each of ``forward``'s ``tokens`` (its second output), (B, N) int64."""
        return cluster_assignment(tokens, mask, self.clusters(tokens.shape[1]), self.k)


class TCAttention(nn.Module):
    """Cross attention from merged tokens (queries) to level-input tokens (keys/values)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        b, nq, c = q_in.shape
        dh = c // self.heads
        q = self.q(q_in).view(b, nq, self.heads, dh).transpose(1, 2)  # (B, h, Nq, dh)
        kv = self.kv(kv_in).view(b, -1, 2, self.heads, dh).permute(2, 0, 3, 1, 4)  # (2, B, h, Nk, dh)
        logits = (q * dh**-0.5) @ kv[0].transpose(-2, -1) + key_bias[:, None, None, :]  # (B, h, Nq, Nk)
        out = softmax32(logits) @ kv[1]  # (B, h, Nq, dh)
        return self.proj(out.transpose(1, 2).reshape(b, nq, c))


class TCBlock(nn.Module):
    """merged + proj(attn(LN(merged), LN(tokens), bias=score)); the official MLP is disabled."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = TCAttention(dim, heads)

    def forward(self, merged: torch.Tensor, tokens: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        return merged + self.attn(self.norm1(merged), self.norm1(tokens), score)
