"""The reference model: separable API vs naive pairwise scoring, determinism, padding behaviours."""

from __future__ import annotations

import math

import pytest
import torch

from hbi_export.model import HBIConfig, HBIModel, TextSide, VideoSide, score_levels
from hbi_export.model.layers import MASK_NEG
from hbi_export.model.merge import TCBlock, dpc_knn
from hbi_runtime.errors import BadInputError, UsageError

TEXT_VALID = (12, 7, 3, 2)  # tokens incl. start/end; L = 12
VIDEO_VALID = (8, 5, 2, 1)  # frames; T = 8


@pytest.fixture(scope="module")
def model() -> HBIModel:
    torch.manual_seed(0)
    return HBIModel(HBIConfig.tiny()).eval()


def _texts(seed: int = 1, valid=TEXT_VALID, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 49000, (len(valid), length), generator=g)
    mask = torch.zeros(len(valid), length)
    for i, n in enumerate(valid):
        mask[i, :n] = 1
        ids[i, 0], ids[i, n - 1] = 49406, 49407
        ids[i, n:] = 0
    return ids, mask


def _videos(seed: int = 2, valid=VIDEO_VALID, frames: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(valid), frames, 3, 32, 32, generator=g)
    mask = torch.zeros(len(valid), frames)
    for i, n in enumerate(valid):
        mask[i, :n] = 1
        x[i, n:] = 0  # padding frames are zero in the normalised space
    return x, mask


# --------------------------------------------------------------------------- naive pairwise reference
def _naive_level(tf, vf, tm, vm, fc_t, fc_v, masked: bool) -> torch.Tensor:
    """One pair, written like the official entity/action/event_level (-9e15 fill, x / ||x||)."""
    wt, wv = fc_t(tf).squeeze(-1), fc_v(vf).squeeze(-1)
    if masked:
        wt = wt.masked_fill(tm == 0, -9e15)
        wv = wv.masked_fill(vm == 0, -9e15)
    wt, wv = wt.softmax(-1), wv.softmax(-1)
    s = torch.einsum("atd,bvd->abtv", tf / tf.norm(dim=-1, keepdim=True), vf / vf.norm(dim=-1, keepdim=True))
    if masked:
        s = s * tm[:, None, :, None] * vm[None, :, None, :]
    t2v = torch.einsum("abt,at->ab", s.max(-1).values, wt)
    v2t = torch.einsum("abv,bv->ab", s.max(-2).values, wv)
    return ((t2v + v2t) / 2)[0, 0]


def _naive_pair(m: HBIModel, tf, tm, vf, vm) -> list[torch.Tensor]:
    """Score one (text, video) pair from features, redoing every merge for the pair (batch of one)."""
    out = [_naive_level(tf, vf, tm, vm, m.text_weight_fc, m.video_weight_fc, True)]
    t_x, v_x, t_m, v_m = tf, vf, tm, vm
    for lvl in range(2):
        t_ctm, t_blk = getattr(m, f"t_ctm{lvl}"), getattr(m, f"t_block{lvl}")
        v_ctm, v_blk = getattr(m, f"v_ctm{lvl}"), getattr(m, f"v_block{lvl}")
        t_x = t_blk(*t_ctm(t_x, t_m))
        v_x = v_blk(*v_ctm(v_x, v_m))
        t_m = v_m = None
        out.append(_naive_level(t_x, v_x, None, None, getattr(m, f"text_weight_fc{lvl}"),
                                getattr(m, f"video_weight_fc{lvl}"), False))
    return out


def test_precomputed_sides_equal_naive_pairwise(model):
    ids, tmask = _texts()
    frames, vmask = _videos()
    with torch.no_grad():
        tf, vf = model.text_features(ids, tmask), model.video_features(frames, vmask)
        levels = score_levels(model.text_side(tf, tmask), model.video_side(vf, vmask))
        naive = torch.zeros_like(levels)
        for a in range(len(TEXT_VALID)):
            for b in range(len(VIDEO_VALID)):
                pair = _naive_pair(model, tf[a:a + 1], tmask[a:a + 1], vf[b:b + 1], vmask[b:b + 1])
                naive[:, a, b] = torch.stack(pair)
    assert torch.isfinite(levels).all()
    assert levels.abs().max() > 1e-3  # not a degenerate all-zero comparison
    for lvl in range(3):
        torch.testing.assert_close(levels[lvl], naive[lvl], atol=1e-5, rtol=0)
    for weights in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.3, 0.2)):
        with torch.no_grad():
            combined = model.score(model.text_side(tf, tmask), model.video_side(vf, vmask), weights)
        expected = sum(w * naive[i] for i, w in enumerate(weights))
        torch.testing.assert_close(combined, expected, atol=1e-5, rtol=0)


def test_default_level_weights_are_official_entity_only(model):
    ids, tmask = _texts()
    frames, vmask = _videos()
    with torch.no_grad():
        t, v = model.encode_text(ids, tmask), model.encode_video(frames, vmask)
        assert model.config.level_weights == (1.0, 0.0, 0.0)
        torch.testing.assert_close(model.score(t, v), model.score_levels(t, v)[0], atol=0, rtol=0)


def test_same_outputs_twice(model):
    frames, vmask = _videos()
    with torch.no_grad():
        a, b = model.encode_video(frames, vmask), model.encode_video(frames, vmask)
    for la, lb in zip(a.levels, b.levels):
        assert torch.equal(la.tokens, lb.tokens) and torch.equal(la.weights, lb.weights)


def test_video_alone_equals_video_in_batch(model):
    """Per-sample fill: a short video's clusters do not depend on its batch mates (official: they can)."""
    frames, vmask = _videos()
    loud = frames.clone()
    loud[0] *= 50.0  # a batch mate with a much larger distance scale (the official batch-wide max changes)
    with torch.no_grad():
        vf_batch = model.video_features(loud, vmask)
        batch = model.video_side(vf_batch, vmask)
        for i in range(1, len(VIDEO_VALID)):
            alone = model.video_side(vf_batch[i:i + 1], vmask[i:i + 1])
            for lb, la in zip(batch.levels, alone.levels):
                torch.testing.assert_close(lb.tokens[i:i + 1], la.tokens, atol=1e-6, rtol=0)
                torch.testing.assert_close(lb.weights[i:i + 1], la.weights, atol=1e-6, rtol=0)
            # identical cluster assignments at the masked level
            ctm = model.v_ctm0
            x_b = ctm.norm(ctm.conv(vf_batch))
            x_a = ctm.norm(ctm.conv(vf_batch[i:i + 1]))
            n = ctm.clusters(vf_batch.shape[1])
            assert torch.equal(dpc_knn(x_b, n, 3, vmask)[i:i + 1], dpc_knn(x_a, n, 3, vmask[i:i + 1]))


def test_encoding_alone_equals_batch_end_to_end(model):
    frames, vmask = _videos()
    with torch.no_grad():
        batch = model.encode_video(frames, vmask)
        for i in range(len(VIDEO_VALID)):
            alone = model.encode_video(frames[i:i + 1], vmask[i:i + 1])
            for lb, la in zip(batch.levels, alone.levels):
                torch.testing.assert_close(lb.tokens[i:i + 1], la.tokens, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- padding behaviours
def test_padded_text_positions_leak_into_merges_but_not_entity(model):
    """Padded positions are computed and reach the CTM conv; the entity level masks them out."""
    ids, tmask = _texts()
    other = ids.clone()
    other[1, 7:] = 123  # different token ids at padded positions of text 1
    frames, vmask = _videos()
    with torch.no_grad():
        v = model.encode_video(frames, vmask)
        a = model.score_levels(model.encode_text(ids, tmask), v)
        b = model.score_levels(model.encode_text(other, tmask), v)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    assert (a[1, 1] - b[1, 1]).abs().max() > 1e-6  # action level sees the padded features through the conv


def test_padded_weights_are_exactly_zero_and_masks_fp16_finite(model):
    ids, tmask = _texts()
    with torch.no_grad():
        t = model.encode_text(ids, tmask)
    assert torch.all(t.levels[0].weights[tmask == 0] == 0)
    torch.testing.assert_close(t.levels[0].weights.sum(-1), torch.ones(len(TEXT_VALID)))
    assert math.isfinite(torch.tensor(MASK_NEG, dtype=torch.float16).item())
    assert torch.exp(torch.tensor(MASK_NEG + 50.0)) == 0  # exp underflows to exactly 0 in fp32


def test_masked_similarity_is_zero_not_minus_inf():
    """When every real similarity is negative, a padded position wins the max with 0 (official quirk)."""
    d = 4
    t = torch.nn.functional.normalize(torch.tensor([[[1.0, 0, 0, 0], [0.0, 1, 0, 0]]]), dim=-1)
    v = -t.clone()  # all real similarities <= 0
    tw = torch.tensor([[1.0, 0.0]])  # second text token padded
    vw = torch.tensor([[0.5, 0.5]])
    from hbi_export.model.sides import SideLevel, score_level
    ts = SideLevel(t, tw, torch.tensor([[1.0, 0.0]]))
    vs = SideLevel(v.reshape(1, 2, d), vw, torch.tensor([[1.0, 1.0]]))
    # t2v: token 0's best real similarity is max(-1, 0) = 0; v2t: each video token's max over text tokens
    # includes the padded text row (0), so both directions are 0 instead of negative.
    assert score_level(ts, vs).item() == 0.0


def test_action_event_levels_are_unmasked_and_use_padded_length(model):
    frames, vmask = _videos()
    with torch.no_grad():
        v = model.encode_video(frames, vmask)
    c1, c2 = model.config.cluster_counts(frames.shape[1], "video")
    assert v.levels[1].tokens.shape[1] == c1 == math.ceil(8 * 0.25)
    assert v.levels[2].tokens.shape[1] == c2 == math.ceil(c1 * 0.5)
    # the 1-frame video has more clusters than valid frames: the empty cluster still gets weight
    assert torch.all(v.levels[1].weights[3] > 0)
    assert torch.all(v.levels[1].mask == 1) and torch.all(v.levels[2].mask == 1)


def test_empty_input_scores_exactly_zero(model):
    ids, tmask = _texts()
    frames, vmask = _videos()
    vmask[2] = 0
    frames[2] = 0
    tmask[3] = 0
    with torch.no_grad():
        levels = model.score_levels(model.encode_text(ids, tmask), model.encode_video(frames, vmask))
    assert torch.isfinite(levels).all()
    assert torch.all(levels[:, :, 2] == 0) and torch.all(levels[:, 3, :] == 0)
    assert levels[:, :3, [0, 1, 3]].abs().max() > 1e-4


def test_tcblock_ignores_masked_keys():
    torch.manual_seed(3)
    block = TCBlock(16, 2).eval()
    merged, tokens = torch.randn(1, 2, 16), torch.randn(1, 5, 16)
    score = torch.tensor([[0.3, -0.2, 0.1, MASK_NEG, MASK_NEG]])
    changed = tokens.clone()
    changed[0, 3:] = torch.randn(2, 16) * 10
    with torch.no_grad():
        torch.testing.assert_close(block(merged, tokens, score), block(merged, changed, score), atol=0, rtol=0)


def test_tie_break_by_index_on_identical_tokens():
    """All densities and scores tie: token 0 outranks, centres are taken in index order, nearest = first."""
    x = torch.ones(1, 4, 8)
    assign = dpc_knn(x, clusters=2, k=3, mask=None)
    assert assign.tolist() == [[0, 1, 0, 0]]


def test_duplicate_frames_are_deterministic(model):
    frames, vmask = _videos()
    frames[0, 1] = frames[0, 0]  # a duplicated frame: a density tie the official code breaks at random
    frames[0, 2] = frames[0, 0]
    with torch.no_grad():
        runs = [model.encode_video(frames, vmask) for _ in range(3)]
    for other in runs[1:]:
        for la, lb in zip(runs[0].levels, other.levels):
            assert torch.equal(la.tokens, lb.tokens)


def test_score_argument_order_is_checked(model):
    ids, tmask = _texts()
    frames, vmask = _videos()
    with torch.no_grad():
        t, v = model.encode_text(ids, tmask), model.encode_video(frames, vmask)
    assert isinstance(t, TextSide) and isinstance(v, VideoSide)
    with pytest.raises(UsageError, match="TextSide and a VideoSide"):
        model.score(v, t)


def test_too_long_inputs_are_refused(model):
    ids, tmask = _texts(length=40)
    with pytest.raises(BadInputError, match="context length"):
        model.encode_text(ids, tmask)
    with pytest.raises(BadInputError, match="frame position"):
        model.encode_video(*_videos(frames=40))
    with pytest.raises(BadInputError, match="frames must be"):
        model.frame_features(torch.zeros(2, 3, 32, 32))


def test_vit_b_32_forward_smoke():
    """A full ViT-B/32-size model builds and runs (random weights, one 12-frame video, one text)."""
    torch.manual_seed(0)
    model = HBIModel(HBIConfig.vit_b_32()).eval()
    n_params = sum(p.numel() for p in model.parameters())
    # CLIP B/32 (151,277,313) + HBI parts used at inference (23,165,450), from the reference document
    assert n_params == 151_277_313 + 23_165_450
    ids, tmask = _texts(valid=(24, 9), length=24)
    frames = torch.randn(1, 12, 3, 224, 224)
    with torch.no_grad():
        s = model.score_levels(model.encode_text(ids, tmask), model.encode_video(frames, torch.ones(1, 12)))
    assert s.shape == (3, 2, 1) and torch.isfinite(s).all()
