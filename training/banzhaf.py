"""The Banzhaf interaction estimator and its Monte-Carlo labels (training only; never exported).

HBI treats the words of a caption and the frames of a video as players of a cooperative game whose value is the
WTI score of the (matched) pair. The Banzhaf *interaction* of word i and frame j is

    I(i, j) = E_C [ v(C ∪ {i, j}) - v(C ∪ {i}) - v(C ∪ {j}) + v(C) ],

with C a random coalition of the *other* words and frames, each kept with probability 1/2. Computing it exactly is
exponential, so the official code estimates it by Monte Carlo (:func:`banzhaf_labels`) and trains a small network,
the :class:`BanzhafModule`, to predict it from the pair's token-similarity map; that network is then the frozen
teacher of the Banzhaf KL loss (``hbi_training.losses``).

Two label variants (``variant=``):

``"textbook"`` (default)
    The definition above: a player in a coalition brings its whole row (word) or column (frame) of the similarity
    map, and the WTI weights are the model's weights renormalised over the present tokens (exactly what the
    model's masked softmax gives when only those tokens exist). Default because it is the quantity the paper
    defines, and the one a newly trained estimator should learn.
``"official"``
    What ``HBI/models/banzhaf.py`` computes, to reproduce the released estimator: v(C ∪ {i, j}) re-inserts only
    the single cell (i, j) (not word i's row and frame j's column), and in that term the weights are softmaxed a
    second time (the already-softmaxed coalition weights are masked with -9e15, the input weight is written back
    at i / j, and softmax is applied again); v(C ∪ {i}) switches word i on even when it is padding. Every term
    uses a masked softmax of the input weights (which are themselves softmaxed weights in the official estimator
    script), not a renormalisation.

Both are positively homogeneous in the similarities, so the official "logits x 1000" is applied as a final
``scale`` (default 1000 for both variants: it sets the sharpness of the teacher's softmax in the Banzhaf KL).
The computation is vectorised over samples and cells: for ``num`` samples, all (i, j) cells and the whole batch
at once, in chunks of samples that keep the largest intermediate under ``max_elements``.
"""

from __future__ import annotations

import torch
from torch import nn

from hbi_runtime.errors import UsageError

VARIANTS = ("textbook", "official")
OFFICIAL_FILL = -9e15  # the official masked-softmax fill; only used by the "official" label variant


class BanzhafModule(nn.Module):
    """Predicts the Banzhaf interaction map of a pair from its token-similarity map.

    conv3x3(1 -> planes) -> ReLU -> one-head *unscaled* self-attention over the Nt*Nv positions (Q, K, V each
    planes x planes) + residual -> conv3x3(planes -> 1). Parameter names equal the official ``BanzhafModule``
    (``cnn1``, ``bn``, ``cnn2``, ``Q``, ``K``, ``V``), so official estimator weights load strictly. ``bn`` is
    defined but unused, as in the official module; it is kept only so that those checkpoints load.
    """

    def __init__(self, planes: int = 64) -> None:
        super().__init__()
        self.cnn1 = nn.Conv2d(1, planes, kernel_size=3, stride=1, padding=1)
        self.bn = nn.BatchNorm2d(planes)  # unused (official checkpoint compatibility)
        self.cnn2 = nn.Conv2d(planes, 1, kernel_size=3, stride=1, padding=1)
        self.Q = nn.Parameter(torch.empty(planes, planes))
        self.K = nn.Parameter(torch.empty(planes, planes))
        self.V = nn.Parameter(torch.empty(planes, planes))
        for p in (self.Q, self.K, self.V):
            nn.init.xavier_uniform_(p, gain=1.414)

    def forward(self, sim: torch.Tensor) -> torch.Tensor:
        """sim: (B, Nt, Nv) -> (B, Nt, Nv) predicted interaction map."""
        b, nt, nv = sim.shape
        x = torch.relu(self.cnn1(sim[:, None]))  # (B, P, Nt, Nv)
        seq = x.flatten(2).transpose(1, 2)  # (B, Nt*Nv, P)
        attn = ((seq @ self.Q) @ (seq @ self.K).transpose(1, 2)).softmax(dim=-1)  # (B, Nt*Nv, Nt*Nv), no scale
        out = attn @ (seq @ self.V)  # (B, Nt*Nv, P)
        x = x + out.transpose(1, 2).reshape(b, -1, nt, nv)
        return self.cnn2(x)[:, 0]  # (B, Nt, Nv)


def load_estimator_state(path, planes: int = 64) -> dict[str, torch.Tensor]:
    """Read estimator weights: our ``estimator.safetensors`` or an official ``torch.save`` state dict.

    An official full HBI checkpoint works too: its ``banzhafteacher.*`` tensors are taken.

    Raises:
        CheckpointError: unreadable file, or the keys / shapes are not a ``BanzhafModule(planes)``'s.
    """
    from pathlib import Path

    from hbi_runtime.errors import CheckpointError

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read estimator weights ({exc})",
                              hint="pass a file written by `hbi-train estimator` or an official estimator") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict")
    if any(k.startswith("banzhafteacher.") for k in state):
        state = {k[len("banzhafteacher."):]: v for k, v in state.items() if k.startswith("banzhafteacher.")}
    expected = {k: v.shape for k, v in BanzhafModule(planes).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if set(got) != set(expected) or any(tuple(expected[k]) != got[k] for k in expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise CheckpointError(f"{path}: not BanzhafModule({planes}) weights (missing {missing}, unexpected {extra}"
                              " or mis-shaped tensors)")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


# ---------------------------------------------------------------------------------------------- labels
def sample_coalitions(num: int, batch: int, nt: int, nv: int, *, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random coalitions for ``num`` samples of every cell of every pair, each other player kept with p = 1/2.

    Returns:
        (words (num, Nt, Nv, B, Nt), frames (num, Nt, Nv, B, Nv)) bool; entry [s, i, j, b, k] says whether
        word (frame) k is in sample s's coalition for cell (i, j) of pair b. Word i and frame j never are.
    """
    words = torch.rand((num, nt, nv, batch, nt), generator=generator, device=device) > 0.5
    frames = torch.rand((num, nt, nv, batch, nv), generator=generator, device=device) > 0.5
    eye_t = torch.eye(nt, dtype=torch.bool, device=words.device)
    eye_v = torch.eye(nv, dtype=torch.bool, device=words.device)
    return words & ~eye_t[None, :, None, None, :], frames & ~eye_v[None, None, :, None, :]


def wti(sim: torch.Tensor, wt: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """WTI value of (already masked) maps: sim (..., Nt, Nv), wt (..., Nt), wv (..., Nv) -> (...)."""
    return ((sim.amax(dim=-1) * wt).sum(-1) + (sim.amax(dim=-2) * wv).sum(-1)) / 2


def renormalised(w: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Weights restricted to the present tokens, summing to 1 (all zero for an empty coalition)."""
    w = w * present
    total = w.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, w / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(w))


def masked_softmax(w: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The official ``softmax(masked_fill(w, ~present, -9e15))``."""
    return torch.where(present > 0, w, torch.full_like(w, OFFICIAL_FILL)).softmax(dim=-1)


def banzhaf_labels(sim: torch.Tensor, text_mask: torch.Tensor, video_mask: torch.Tensor, text_weight: torch.Tensor,
                   video_weight: torch.Tensor, *, num: int = 100, variant: str = "textbook", scale: float = 1000.0,
                   generator: torch.Generator | None = None,
                   coalitions: tuple[torch.Tensor, torch.Tensor] | None = None,
                   max_elements: int = 1 << 25) -> torch.Tensor:
    """Monte-Carlo Banzhaf interaction of every (word, frame) cell of matched pairs.

    Args:
        sim: (B, Nt, Nv) token similarities of the matched pairs, already multiplied by the masks.
        text_mask, video_mask: (B, Nt), (B, Nv) 0/1.
        text_weight, video_weight: (B, Nt), (B, Nv) the level's softmaxed token weights.
        num: Monte-Carlo samples per cell (official estimator script: 100).
        variant: ``"textbook"`` or ``"official"`` (module docstring).
        scale: multiplies the labels (official: similarities x 1000).
        generator: draws the coalitions (chunk by chunk) when ``coalitions`` is not given.
        coalitions: explicit :func:`sample_coalitions` output for ``num`` samples (tests, reproducibility).
        max_elements: bound on the largest intermediate, (samples, Nt, Nv, B, Nt, Nv) elements per chunk.

    Returns:
        (B, Nt, Nv) float32 labels, zero at padded words or frames.

    Raises:
        UsageError: unknown ``variant`` or ``coalitions`` of the wrong shape.
    """
    if variant not in VARIANTS:
        raise UsageError(f"unknown Banzhaf label variant {variant!r}", hint=f"use one of {', '.join(VARIANTS)}")
    sim, text_mask, video_mask = sim.float(), text_mask.float(), video_mask.float()
    text_weight, video_weight = text_weight.float(), video_weight.float()
    b, nt, nv = sim.shape
    if coalitions is not None and (coalitions[0].shape != (num, nt, nv, b, nt)
                                   or coalitions[1].shape != (num, nt, nv, b, nv)):
        raise UsageError(f"coalitions must be shaped ({num}, {nt}, {nv}, {b}, {nt}/{nv}), got "
                         f"{tuple(coalitions[0].shape)} and {tuple(coalitions[1].shape)}")
    chunk = max(1, max_elements // (nt * nv * b * nt * nv))
    total = torch.zeros(nt, nv, b, dtype=torch.float32, device=sim.device)
    game = _textbook_chunk if variant == "textbook" else _official_chunk
    for start in range(0, num, chunk):
        n = min(chunk, num - start)
        if coalitions is None:
            words, frames = sample_coalitions(n, b, nt, nv, generator=generator, device=sim.device)
        else:
            words, frames = coalitions[0][start:start + n], coalitions[1][start:start + n]
        ct = words.to(sim.device, torch.float32) * text_mask  # (n, Nt, Nv, B, Nt) coalition ∩ valid
        cv = frames.to(sim.device, torch.float32) * video_mask  # (n, Nt, Nv, B, Nv)
        total += game(sim, ct, cv, text_mask, video_mask, text_weight, video_weight).sum(dim=0)
    labels = total.permute(2, 0, 1) * (scale / num)  # (B, Nt, Nv)
    return labels * text_mask[:, :, None] * video_mask[:, None, :]


def _players(nt: int, nv: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Indicators of word i and frame j for cell (i, j), broadcastable to (n, Nt, Nv, B, Nt|Nv)."""
    word = torch.eye(nt, device=device)[:, None, None, :]  # (Nt, 1, 1, Nt)
    frame = torch.eye(nv, device=device)[None, :, None, :]  # (1, Nv, 1, Nv)
    return word, frame


def _masked(sim: torch.Tensor, tm: torch.Tensor, vm: torch.Tensor) -> torch.Tensor:
    """sim (B, Nt, Nv) * tm (..., B, Nt) * vm (..., B, Nv) -> (..., B, Nt, Nv)."""
    return sim * tm[..., :, None] * vm[..., None, :]


def _textbook_chunk(sim, ct, cv, text_mask, video_mask, wt, wv) -> torch.Tensor:
    """(n, Nt, Nv, B) interaction samples: players bring their whole row / column, weights renormalised."""
    word, frame = _players(sim.shape[1], sim.shape[2], sim.device)
    ti, vj = ct + word * text_mask, cv + frame * video_mask  # coalition plus word i / frame j (if valid)

    def value(tm, vm):
        return wti(_masked(sim, tm, vm), renormalised(wt, tm), renormalised(wv, vm))

    return value(ti, vj) - value(ti, cv) - value(ct, vj) + value(ct, cv)


def _official_chunk(sim, ct, cv, text_mask, video_mask, wt, wv) -> torch.Tensor:
    """(n, Nt, Nv, B) interaction samples computed as ``HBI/models/banzhaf.py`` does (module docstring)."""
    word, frame = _players(sim.shape[1], sim.shape[2], sim.device)
    wt_c, wv_c = masked_softmax(wt, ct), masked_softmax(wv, cv)
    s_c = _masked(sim, ct, cv)  # (n, Nt, Nv, B, Nt, Nv)
    v_c = wti(s_c, wt_c, wv_c)
    # v({i,j} ∪ C): only cell (i, j) re-inserted; weights = softmax(coalition softmax, input weight at i / j).
    cell = word[..., :, None] * frame[..., None, :]  # (Nt, Nv, 1, Nt, Nv)
    wt_ij = torch.where(word > 0, wt, torch.where(ct > 0, wt_c, torch.full_like(wt_c, OFFICIAL_FILL)))
    wv_ij = torch.where(frame > 0, wv, torch.where(cv > 0, wv_c, torch.full_like(wv_c, OFFICIAL_FILL)))
    v_ij = wti(s_c + cell * sim, wt_ij.softmax(dim=-1), wv_ij.softmax(dim=-1))
    ti, vj = ct + word, cv + frame  # official: word i / frame j switched on whatever their validity
    v_i = wti(_masked(sim, ti, cv), masked_softmax(wt, ti), wv_c)
    v_j = wti(_masked(sim, ct, vj), wt_c, masked_softmax(wv, vj))
    return v_ij - v_i - v_j + v_c
