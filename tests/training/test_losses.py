"""Loss functions on hand-made inputs, and the combined HBILoss on a tiny model's level outputs."""

from __future__ import annotations

import math

import pytest
import torch

from hbi_runtime.errors import UsageError
from hbi_training.levels import level_outputs
from hbi_training.losses import HBILoss, LossConfig, banzhaf_kl, info_nce, kl, self_distillation


def _softmax_kl(p_logits, q_logits, dim=-1):
    """Elementwise-mean KL(softmax(p) || softmax(q)), written out."""
    p, q = p_logits.softmax(dim), q_logits.softmax(dim)
    return (p * (p.log() - q.log())).mean()


# ------------------------------------------------------------------ InfoNCE
def test_info_nce_prefers_a_perfect_diagonal():
    perfect = torch.eye(6) * 0.9
    random = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) * 0.9
    assert info_nce(perfect, 100.0) < 0.01 < info_nce(random, 100.0)


def test_info_nce_is_the_mean_of_both_directions():
    s = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    rows = -torch.log_softmax(s * 10, dim=1).diagonal().mean()
    cols = -torch.log_softmax(s * 10, dim=0).diagonal().mean()
    torch.testing.assert_close(info_nce(s, 10.0), (rows + cols) / 2)
    assert not torch.allclose(rows, cols)  # the score matrix is not symmetric: both directions matter


# ------------------------------------------------------------------ KL helper
def test_kl_is_zero_for_identical_inputs():
    x = torch.randn(4, 7)
    assert kl(x, x).abs() < 1e-7
    assert banzhaf_kl(x[None].expand(3, 4, 7), x[None].expand(3, 4, 7)).abs() < 1e-7


def test_kl_direction_is_teacher_to_student_with_elementwise_mean():
    student = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    teacher = torch.randn(3, 5, generator=torch.Generator().manual_seed(3)) * 3
    torch.testing.assert_close(kl(student, teacher), _softmax_kl(teacher, student))  # KL(teacher || student)
    assert not torch.allclose(kl(student, teacher), kl(teacher, student))
    assert kl(student, teacher) > 0


def test_banzhaf_kl_transposed_term_fixed_and_official():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    first = _softmax_kl(t, s)
    fixed = first + _softmax_kl(t.transpose(1, 2), s.transpose(1, 2))  # over words
    official = first + _softmax_kl(t.permute(2, 1, 0), s.permute(2, 1, 0))  # x.T on 3-D: over the batch
    torch.testing.assert_close(banzhaf_kl(s, t), fixed)
    torch.testing.assert_close(banzhaf_kl(s, t, "official"), official)
    assert not torch.allclose(fixed, official)
    with pytest.raises(UsageError, match="transpose"):
        banzhaf_kl(s, t, "T")


def test_self_distillation_pulls_both_directions_and_keeps_entity_gradients():
    g = torch.Generator().manual_seed(5)
    entity = torch.randn(4, 4, generator=g).requires_grad_()
    action, event = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    loss = self_distillation(entity, [action, event])
    expected = sum(_softmax_kl(entity, a) + _softmax_kl(entity.T, a.T) for a in (action, event))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert entity.grad.abs().sum() > 0  # the entity level is not detached (official)
    assert self_distillation(entity.detach(), [entity.detach()]).abs() < 1e-7


# ------------------------------------------------------------------ HBILoss
@pytest.fixture
def levels(make_model, pairs):
    model = make_model()
    batch = [pairs[k] for k in range(6)]
    ids, tmask, frames, fmask = (torch.stack([b[i] for b in batch]) for i in range(4))
    return model, level_outputs(model.encode_text(ids, tmask), model.encode_video(frames, fmask))


def test_hbi_loss_total_is_the_weighted_sum_of_its_parts(levels):
    model, outs = levels
    loss = HBILoss(LossConfig(kl=2.0, skl=0.5))
    out = loss(outs, model.clip.logit_scale.exp())
    assert set(out.parts) == {"nce_entity", "nce_action", "nce_event", "banzhaf_entity", "banzhaf_action",
                              "banzhaf_event", "distill"}
    p = out.parts
    expected = (sum(p[f"nce_{n}"] + 0.5 * p[f"banzhaf_{n}"] for n in ("entity", "action", "event"))
                + 2.0 * p["distill"])
    torch.testing.assert_close(out.total, expected)
    out.total.backward()
    assert all(q.grad is None for q in loss.banzhafteacher.parameters())  # frozen teacher
    assert loss.banzhafmodel.Q.grad is not None and model.clip.logit_scale.grad is not None


def test_hbi_loss_ablations(levels):
    model, outs = levels
    scale = model.clip.logit_scale.exp()
    plain = HBILoss(LossConfig(banzhaf=False, hierarchy=False))(outs, scale)
    assert set(plain.parts) == {"nce_entity"}
    torch.testing.assert_close(plain.total, info_nce(outs[0].scores, scale.clamp(max=100)))
    no_banzhaf = HBILoss(LossConfig(banzhaf=False))(outs, scale)
    assert set(no_banzhaf.parts) == {"nce_entity", "nce_action", "nce_event", "distill"}
    flat = HBILoss(LossConfig(hierarchy=False))(outs[:1], scale)
    assert set(flat.parts) == {"nce_entity", "banzhaf_entity"}


def test_hbi_loss_clamps_the_logit_scale_at_100(levels):
    _, outs = levels
    loss = HBILoss(LossConfig(banzhaf=False, hierarchy=False))
    torch.testing.assert_close(loss(outs, torch.tensor(1e4)).total, loss(outs, torch.tensor(100.0)).total)


def test_teacher_weights_load_and_bad_settings_are_refused():
    from hbi_training.banzhaf import BanzhafModule

    state = BanzhafModule(64).state_dict()
    loss = HBILoss(LossConfig(), teacher_state=state)
    torch.testing.assert_close(loss.banzhafteacher.Q, state["Q"])
    with pytest.raises(UsageError, match="transpose"):
        LossConfig(transpose="T")
    with pytest.raises(UsageError, match=">= 0"):
        LossConfig(kl=-1)
    assert math.isclose(LossConfig().kl, 2.0) and math.isclose(LossConfig().skl, 1.0)
