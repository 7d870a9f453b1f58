"""The Banzhaf estimator module, its weights loader and the Monte-Carlo labels (vectorised vs a direct loop)."""

from __future__ import annotations

import pytest
import torch

from hbi_runtime.errors import CheckpointError, UsageError
from hbi_training.banzhaf import BanzhafModule, banzhaf_labels, load_estimator_state, sample_coalitions

OFFICIAL_KEYS = {"cnn1.weight", "cnn1.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                 "bn.num_batches_tracked", "cnn2.weight", "cnn2.bias", "Q", "K", "V"}


# ------------------------------------------------------------------ direct (loop) reference implementations
def _wti(sim, wt, wv):
    """Masked (Nt, Nv) map, weights (Nt,), (Nv,) -> scalar, written out."""
    t2v = sum(wt[i] * sim[i].max() for i in range(sim.shape[0]))
    v2t = sum(wv[j] * sim[:, j].max() for j in range(sim.shape[1]))
    return (t2v + v2t) / 2


def _masked_softmax(w, present):
    return torch.where(present > 0, w, torch.full_like(w, -9e15)).softmax(-1)


def _renorm(w, present):
    w = w * present
    return w / w.sum() if w.sum() > 0 else torch.zeros_like(w)


def _loop_labels(sim, tmask, vmask, wt, wv, words, frames, variant):
    """One pair, one cell, one sample at a time: the definitions of hbi_training.banzhaf, written directly."""
    num, nt, nv, b = words.shape[:4]
    out = torch.zeros(b, nt, nv)
    for p in range(b):
        s, tm, vm = sim[p], tmask[p], vmask[p]
        for i in range(nt):
            for j in range(nv):
                acc = 0.0
                for n in range(num):
                    ct = words[n, i, j, p].float() * tm
                    cv = frames[n, i, j, p].float() * vm
                    if variant == "textbook":
                        ti, vj = ct.clone(), cv.clone()
                        ti[i], vj[j] = tm[i], vm[j]

                        def v(a, c):
                            return _wti(s * a[:, None] * c[None, :], _renorm(wt[p], a), _renorm(wv[p], c))

                        acc += v(ti, vj) - v(ti, cv) - v(ct, vj) + v(ct, cv)
                    else:  # as HBI/models/banzhaf.py
                        wt_c, wv_c = _masked_softmax(wt[p], ct), _masked_softmax(wv[p], cv)
                        s_c = s * ct[:, None] * cv[None, :]
                        v4 = _wti(s_c, wt_c, wv_c)
                        s1 = s_c.clone()
                        s1[i, j] = s[i, j]
                        lt = torch.where(ct > 0, wt_c, torch.full_like(wt_c, -9e15))
                        lt[i] = wt[p, i]
                        lv = torch.where(cv > 0, wv_c, torch.full_like(wv_c, -9e15))
                        lv[j] = wv[p, j]
                        v1 = _wti(s1, lt.softmax(-1), lv.softmax(-1))
                        ti = ct.clone()
                        ti[i] = 1
                        v2 = _wti(s * ti[:, None] * cv[None, :], _masked_softmax(wt[p], ti), wv_c)
                        vj = cv.clone()
                        vj[j] = 1
                        v3 = _wti(s * ct[:, None] * vj[None, :], wt_c, _masked_softmax(wv[p], vj))
                        acc += v1 - v2 - v3 + v4
                out[p, i, j] = acc / num * tm[i] * vm[j]
    return out


def _case(seed=0, b=2, nt=4, nv=3):
    g = torch.Generator().manual_seed(seed)
    tmask = torch.ones(b, nt)
    vmask = torch.ones(b, nv)
    tmask[1, -1] = 0  # padding in the second pair
    vmask[1, -1] = 0
    sim = (torch.rand(b, nt, nv, generator=g) * 2 - 1) * tmask[:, :, None] * vmask[:, None, :]
    wt = torch.where(tmask > 0, torch.randn(b, nt, generator=g), torch.full((b, nt), -1e4)).softmax(-1)
    wv = torch.where(vmask > 0, torch.randn(b, nv, generator=g), torch.full((b, nv), -1e4)).softmax(-1)
    return sim, tmask, vmask, wt, wv


# ------------------------------------------------------------------ labels
@pytest.mark.parametrize("variant", ["textbook", "official"])
@pytest.mark.parametrize("max_elements", [1, 1 << 25])  # one sample per chunk, and all samples in one chunk
def test_vectorised_labels_equal_the_loop(variant, max_elements):
    sim, tmask, vmask, wt, wv = _case()
    num = 6
    coal = sample_coalitions(num, 2, 4, 3, generator=torch.Generator().manual_seed(7))
    fast = banzhaf_labels(sim, tmask, vmask, wt, wv, num=num, variant=variant, scale=1.0, coalitions=coal,
                          max_elements=max_elements)
    slow = _loop_labels(sim, tmask, vmask, wt, wv, *coal, variant)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    assert fast.abs().sum() > 0  # not trivially zero


def test_generator_draws_the_same_coalitions_as_sample_coalitions():
    sim, tmask, vmask, wt, wv = _case()
    drawn = banzhaf_labels(sim, tmask, vmask, wt, wv, num=5, generator=torch.Generator().manual_seed(3))
    given = banzhaf_labels(sim, tmask, vmask, wt, wv, num=5,
                           coalitions=sample_coalitions(5, 2, 4, 3, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(drawn, given)


def test_coalitions_never_hold_the_cell_players():
    words, frames = sample_coalitions(20, 2, 4, 3, generator=torch.Generator().manual_seed(0))
    for i in range(4):
        assert not words[:, i, :, :, i].any()
    for j in range(3):
        assert not frames[:, :, j, :, j].any()
    assert 0.3 < words.float().mean() < 0.5  # p = 1/2 over the 3 other words: 3/8 on average


def test_labels_scale_linearly_and_vanish_on_padding():
    sim, tmask, vmask, wt, wv = _case()
    coal = sample_coalitions(4, 2, 4, 3, generator=torch.Generator().manual_seed(1))
    for variant in ("textbook", "official"):
        one = banzhaf_labels(sim, tmask, vmask, wt, wv, num=4, variant=variant, scale=1.0, coalitions=coal)
        big = banzhaf_labels(sim, tmask, vmask, wt, wv, num=4, variant=variant, coalitions=coal)  # x1000
        torch.testing.assert_close(big, one * 1000.0, rtol=1e-5, atol=1e-4)
        assert (one[1, -1] == 0).all() and (one[1, :, -1] == 0).all()


def test_textbook_interaction_of_a_lone_pair_is_its_similarity_share():
    """One word, one frame: I = v({i, j}) - v({i}) - v({j}) + v({}) = (s + s)/2 - 0 - 0 + 0 = s."""
    sim = torch.tensor([[[0.4]]])
    ones = torch.ones(1, 1)
    labels = banzhaf_labels(sim, ones, ones, ones, ones, num=3, scale=1.0, generator=torch.Generator())
    torch.testing.assert_close(labels, sim)


def test_unknown_variant_and_bad_coalitions_are_usage_errors():
    sim, tmask, vmask, wt, wv = _case()
    with pytest.raises(UsageError, match="variant"):
        banzhaf_labels(sim, tmask, vmask, wt, wv, variant="exact")
    with pytest.raises(UsageError, match="coalitions"):
        banzhaf_labels(sim, tmask, vmask, wt, wv, num=3, coalitions=sample_coalitions(2, 2, 4, 3))


# ------------------------------------------------------------------ module and weights
def test_module_keeps_official_names_and_shapes():
    module = BanzhafModule(64)
    assert set(module.state_dict()) == OFFICIAL_KEYS
    # cnn1 640 + bn 128 (unused) + cnn2 577 + Q, K, V 3 x 4096: the official "about 13.6k"
    assert sum(p.numel() for p in module.parameters()) == 13_633
    out = module(torch.randn(3, 5, 4))
    assert out.shape == (3, 5, 4)


def test_module_attention_is_unscaled_single_head():
    module = BanzhafModule(4)
    x = torch.randn(2, 3, 2)
    h = torch.relu(module.cnn1(x[:, None]))  # (B, P, Nt, Nv)
    seq = h.flatten(2).transpose(1, 2)
    attn = torch.softmax(seq @ module.Q @ (seq @ module.K).transpose(1, 2), dim=-1)
    expected = module.cnn2(h + (attn @ seq @ module.V).transpose(1, 2).reshape(h.shape))[:, 0]
    torch.testing.assert_close(module(x), expected)


def test_estimator_weights_load_from_safetensors_official_files_and_full_checkpoints(tmp_path):
    from safetensors.torch import save_file

    state = BanzhafModule(64).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "estimator.safetensors"))
    torch.save(state, tmp_path / "pytorch_model.bin.5")
    torch.save({f"banzhafteacher.{k}": v for k, v in state.items()} | {"clip.x": torch.zeros(1)},
               tmp_path / "best.pth")
    for name in ("estimator.safetensors", "pytorch_model.bin.5", "best.pth"):
        loaded = load_estimator_state(tmp_path / name)
        BanzhafModule(64).load_state_dict(loaded, strict=True)
        torch.testing.assert_close(loaded["Q"], state["Q"])


def test_estimator_loader_names_missing_keys(tmp_path):
    torch.save({"Q": torch.zeros(64, 64)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing"):
        load_estimator_state(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_estimator_state(tmp_path / "absent.pt")
