"""The runtime's interaction maps (``hbi_runtime.explain``, numpy) are the ``"textbook"`` Banzhaf labels of
``hbi_training.banzhaf.banzhaf_labels`` (torch) before its final ``scale``: exactly, when both enumerate every
coalition, and within the runtime's standard errors when it samples."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hbi_export.model import HBIConfig, HBIModel
from hbi_runtime.explain.banzhaf import LevelGame, interaction_map
from hbi_training.banzhaf import banzhaf_labels


def _enumerated_coalitions(nt: int, nv: int, text_mask: torch.Tensor, video_mask: torch.Tensor):
    """Every coalition of the other valid players, for every valid cell of one pair, as ``banzhaf_labels`` takes
    them: (num, Nt, Nv, 1, Nt) and (num, Nt, Nv, 1, Nv); padded cells get the empty coalition (their labels are 0)."""
    vt = [int(i) for i in torch.nonzero(text_mask[0]).flatten()]
    vv = [int(j) for j in torch.nonzero(video_mask[0]).flatten()]
    num = 2 ** (len(vt) + len(vv) - 2)
    words = torch.zeros(num, nt, nv, 1, nt, dtype=torch.bool)
    frames = torch.zeros(num, nt, nv, 1, nv, dtype=torch.bool)
    for i in vt:
        for j in vv:
            others = [("t", k) for k in vt if k != i] + [("v", k) for k in vv if k != j]
            for n, bits in enumerate(itertools.product((False, True), repeat=len(others))):
                for (side, k), bit in zip(others, bits):
                    (words if side == "t" else frames)[n, i, j, 0, k] = bit
    return num, (words, frames)


def _game(sim, tm, vm, wt, wv) -> LevelGame:
    """The runtime's game of one pair from the training-side tensors (valid players only)."""
    t, v = tm[0].numpy().astype(bool), vm[0].numpy().astype(bool)
    return LevelGame(sim[0].numpy()[np.ix_(t, v)], wt[0].numpy()[t], wv[0].numpy()[v], text_padded=not t.all(),
                     video_padded=not v.all())


def _pair(seed: int, nt: int, nv: int, valid_t: int, valid_v: int):
    g = torch.Generator().manual_seed(seed)
    tm = (torch.arange(nt) < valid_t).float()[None]
    vm = (torch.arange(nv) < valid_v).float()[None]
    t = torch.nn.functional.normalize(torch.randn(1, nt, 16, generator=g), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(1, nv, 16, generator=g) + 0.5 * t[:, :1], dim=-1)
    sim = (t @ v.transpose(1, 2)) * tm[:, :, None] * vm[:, None, :]
    wt = torch.where(tm > 0, torch.randn(1, nt, generator=g), torch.full_like(tm, -1e4)).softmax(-1)
    wv = torch.where(vm > 0, torch.randn(1, nv, generator=g), torch.full_like(vm, -1e4)).softmax(-1)
    return sim, tm, vm, wt, wv


@pytest.mark.parametrize("nt,nv,valid_t,valid_v", [(6, 5, 4, 4), (5, 4, 5, 4), (4, 4, 2, 3), (3, 6, 3, 5)])
def test_exact_maps_equal_the_textbook_labels(nt, nv, valid_t, valid_v):
    sim, tm, vm, wt, wv = _pair(nt * 10 + nv, nt, nv, valid_t, valid_v)
    num, coalitions = _enumerated_coalitions(nt, nv, tm, vm)
    labels = banzhaf_labels(sim, tm, vm, wt, wv, num=num, variant="textbook", scale=1.0, coalitions=coalitions)
    got = interaction_map(_game(sim, tm, vm, wt, wv), exact=True)
    want = labels[0].numpy()[np.ix_(tm[0].numpy() > 0, vm[0].numpy() > 0)]
    assert got.exact and got.values.shape == want.shape
    np.testing.assert_allclose(got.values, want, atol=2e-6, rtol=0)
    assert np.abs(want).max() > 1e-3  # the comparison is not of zeros


def test_sampled_maps_agree_within_their_standard_errors():
    sim, tm, vm, wt, wv = _pair(3, 7, 6, 6, 5)
    num, coalitions = _enumerated_coalitions(7, 6, tm, vm)  # 2^9 coalitions: the exact labels
    want = banzhaf_labels(sim, tm, vm, wt, wv, num=num, scale=1.0, coalitions=coalitions)[0].numpy()[:6, :5]
    got = interaction_map(_game(sim, tm, vm, wt, wv), exact=False, samples=4096, seed=1)
    z = np.abs(got.values - want) / np.maximum(got.stderr, 1e-12)
    assert not got.exact and got.samples == 4096
    assert np.median(z) < 1.5 and z.max() < 5.0, (np.median(z), z.max())
    # and the torch estimator's own Monte-Carlo labels land on the same values
    mc = banzhaf_labels(sim, tm, vm, wt, wv, num=4096, scale=1.0, generator=torch.Generator().manual_seed(0))
    assert np.abs(mc[0].numpy()[:6, :5] - want).max() < 8 * got.stderr.max() + 1e-4


@pytest.mark.parametrize("level", [0, 1, 2])
def test_the_model_sides_give_the_same_map_at_every_level(level):
    """A tiny HBI model's own sides (entity: masked; action / event: unmasked clusters), both sides exact."""
    torch.manual_seed(0)
    model = HBIModel(HBIConfig.tiny()).eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 49000, (1, 8), generator=g)
    ids[0, 0], ids[0, 4], ids[0, 5:] = 49406, 49407, 0
    tmask = (ids > 0).long()
    frames = torch.randn(1, 4, 3, 32, 32, generator=g)
    fmask = torch.tensor([[1, 1, 1, 0]])
    frames[0, 3] = 0
    with torch.no_grad():
        t, v = model.encode_text(ids, tmask).levels[level], model.encode_video(frames, fmask).levels[level]
        sim = (t.tokens @ v.tokens.transpose(1, 2)) * t.mask[:, :, None] * v.mask[:, None, :]
        level_score = model.score_levels(model.encode_text(ids, tmask), model.encode_video(frames, fmask))[level]
    game = _game(sim, t.mask, v.mask, t.weights, v.weights)
    if game.players > 14:
        pytest.skip("too many players to enumerate here")
    num, coalitions = _enumerated_coalitions(sim.shape[1], sim.shape[2], t.mask, v.mask)
    labels = banzhaf_labels(sim, t.mask, v.mask, t.weights, v.weights, num=num, scale=1.0, coalitions=coalitions)
    want = labels[0].numpy()[np.ix_(t.mask[0].numpy() > 0, v.mask[0].numpy() > 0)]
    got = interaction_map(game, exact=True)
    np.testing.assert_allclose(got.values, want, atol=2e-6, rtol=0)
    assert game.score() == pytest.approx(float(level_score[0, 0]), abs=1e-5)  # v(every player) is the score
