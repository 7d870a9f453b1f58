"""The official-compatible QA model: official checkpoint keys, strict loading, and the answer computation."""

from __future__ import annotations

import pytest
import torch

from hbi_export.model import HBIConfig
from hbi_export.model.config import TextConfig, VisionConfig
from hbi_export.tasks.qa import QAConfig, QAModel
from hbi_export.tasks.qa_checkpoint import build_qa_model, load_qa_checkpoint, save_qa_model
from hbi_runtime.errors import CheckpointError

W = 64  # 1 head under CLIP's width // 64 rule (what inference from weights assumes)
ANSWERS = 11

# Key names of the answer heads as the official modeling_qa.HBI defines them (read from the release, written out
# here by hand): per level suffix "", "0", "1".
OFFICIAL_HEAD_KEYS = sorted(
    f"{module}{s}.{leaf}"
    for s in ("", "0", "1")
    for module, leaves in (("classifier", ("0.weight", "0.bias", "2.weight", "2.bias")),
                           ("t_weight", ("0.weight", "0.bias", "2.weight", "2.bias")),
                           ("v_weight", ("0.weight", "0.bias", "2.weight", "2.bias")),
                           ("t_proj", ("weight", "bias")), ("v_proj", ("weight", "bias")))
    for leaf in leaves)


def official_config() -> QAConfig:
    model = HBIConfig(embed_dim=W, vision=VisionConfig(width=W, layers=1, heads=1, patch_size=16, image_size=32),
                      text=TextConfig(width=W, layers=1, heads=1, context_length=16, vocab_size=300),
                      temporal_layers=1, temporal_heads=1, frame_positions=16, merge_heads=1,
                      text_ratios=(0.25, 0.125), video_ratios=(0.25, 0.25))
    return QAConfig(model=model, answers=ANSWERS)


def banzhaf() -> dict[str, torch.Tensor]:
    out = {}
    for name in ("banzhafmodel", "banzhafmodel0", "banzhafmodel1", "banzhafteacher"):
        for leaf, shape in (("cnn1.weight", (4, 1, 3, 3)), ("bn.running_mean", (4,)), ("Q", (4, 4))):
            out[f"{name}.{leaf}"] = torch.randn(shape)
    return out


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(model, path) of a fabricated official QA checkpoint: DDP prefix, Banzhaf entries, fp16 CLIP tensors."""
    torch.manual_seed(0)
    model = QAModel(official_config()).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd.update(banzhaf())
    sd["clip.visual.proj"] = sd["clip.visual.proj"].half()
    path = tmp_path_factory.mktemp("official") / "pytorch_model.bin.2"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    return model, path


def test_official_key_names_and_shapes():
    model = QAModel(official_config())
    keys = set(model.state_dict())
    heads = sorted(k for k in keys if k.startswith(("classifier", "t_weight", "v_weight", "t_proj", "v_proj")))
    assert heads == OFFICIAL_HEAD_KEYS
    sd = model.state_dict()
    # official sizes: v_proj Linear(W, 4W); classifier Linear(8W, 16W) -> Linear(16W, answers); t_weight
    # Linear(W, W) -> Linear(W, 1)
    assert sd["v_proj1.weight"].shape == (4 * W, W)
    assert sd["classifier0.0.weight"].shape == (16 * W, 8 * W)
    assert sd["classifier.2.weight"].shape == (ANSWERS, 16 * W)
    assert sd["t_weight.2.weight"].shape == (1, W)
    # the retrieval parts keep their official names too
    assert {"frame_position_embeddings.weight", "text_weight_fc1.2.bias", "t_ctm1.score.weight",
            "v_block0.attn.kv.weight"} <= keys


def test_official_checkpoint_loads_strictly(official):
    model, path = official
    state, config, report = load_qa_checkpoint(path)
    assert config.answers == ANSWERS and config.proj_dim is None and config.hidden_dim is None
    assert config.model.text_ratios == (0.25, 0.125) and config.model.video_ratios == (0.25, 0.25)
    assert config.answer_weights == (0.4, 0.4, 0.2)
    assert report.format == "official-hbi-qa"
    assert sorted(i.key for i in report.ignored) == sorted(banzhaf())
    assert [u.key for u in report.upcast] == ["clip.visual.proj"]
    assert set(state) == set(model.state_dict())
    for key, value in model.state_dict().items():
        expected = value.half().float() if key == "clip.visual.proj" else value
        assert torch.equal(state[key], expected), key


@pytest.mark.parametrize("edit, words", [
    (lambda sd: sd.pop("classifier1.2.bias"), "1 missing key(s): classifier1.2.bias"),
    (lambda sd: sd.update({"t_proj2.weight": torch.zeros(3)}), "1 unexpected key(s): t_proj2.weight"),
    (lambda sd: sd.update({"v_weight0.0.weight": torch.zeros(W, W + 1)}), "v_weight0.0.weight: got"),
])
def test_missing_unexpected_misshaped_keys_refused(tmp_path, edit, words):
    sd = dict(QAModel(official_config()).state_dict())
    edit(sd)
    torch.save(sd, tmp_path / "best.pth")
    with pytest.raises(CheckpointError) as info:
        load_qa_checkpoint(tmp_path / "best.pth")
    assert words in info.value.message
    assert info.value.exit_code == 3


def test_retrieval_checkpoint_is_not_a_qa_checkpoint(tmp_path):
    from hbi_export.model import HBIModel

    torch.save(HBIModel(official_config().model).state_dict(), tmp_path / "best.pth")
    with pytest.raises(CheckpointError, match="not a QA checkpoint"):
        load_qa_checkpoint(tmp_path / "best.pth")


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(3, 16, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, n in enumerate((16, 7, 2)):
        ids[i, :n] = torch.randint(1, 298, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = 298, 299
        mask[i, :n] = 1
    frames = torch.randn(3, 6, 3, 32, 32, generator=g)
    fmask = torch.ones(3, 6, dtype=torch.int64)
    fmask[1, 4:] = 0
    fmask[2, 1:] = 0
    frames[fmask == 0] = 0
    return ids, mask, frames, fmask


def test_answer_logits_follow_the_official_formula(official):
    """Recompute the official get_*_level_output by hand from the model's submodules and compare."""
    model, _ = official
    ids, mask, frames, fmask = _inputs()
    with torch.no_grad():
        got = model(ids, mask, frames, fmask)
        t = model.text_features(ids, mask.float())
        v = model.video_features(frames, fmask.float())
        levels = []
        tx, vx, tm, vm = t, v, mask.float(), fmask.float()
        for s, level in zip(("", "0", "1"), range(3)):
            if level:
                merged, tokens, score = getattr(model, f"t_ctm{level - 1}")(tx, tm if level == 1 else None)
                tx = getattr(model, f"t_block{level - 1}")(merged, tokens, score)
                merged, tokens, score = getattr(model, f"v_ctm{level - 1}")(vx, vm if level == 1 else None)
                vx = getattr(model, f"v_block{level - 1}")(merged, tokens, score)
            # softmax over all positions (padding included), then padded tokens zeroed (entity level only)
            at = torch.softmax(getattr(model, f"t_weight{s}")(tx).squeeze(2), dim=-1)
            av = torch.softmax(getattr(model, f"v_weight{s}")(vx).squeeze(2), dim=-1)
            tt = tx * tm.unsqueeze(-1) if level == 0 else tx
            vv = vx * vm.unsqueeze(-1) if level == 0 else vx
            pt, pv = torch.einsum("atc,at->ac", tt, at), torch.einsum("atc,at->ac", vv, av)
            z = torch.cat([getattr(model, f"v_proj{s}")(pv), getattr(model, f"t_proj{s}")(pt)], dim=1)
            levels.append(getattr(model, f"classifier{s}")(z))
        want = 0.4 * levels[0] + 0.4 * levels[1] + 0.2 * levels[2]
    assert got.shape == (3, ANSWERS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_padding_keeps_softmax_mass_at_entity_level(official):
    """A padded text position's weight logit changes the entity logits (no mask in the official softmax)."""
    model, _ = official
    ids, mask, frames, fmask = _inputs()
    with torch.no_grad():
        a = model.level_logits(model.encode_question(ids, mask), model.encode_video_qa(frames, fmask))[0]
        ids2 = ids.clone()
        ids2[1, 10] = 5  # a different padded token (mask still 0)
        b = model.level_logits(model.encode_question(ids2, mask), model.encode_video_qa(frames, fmask))[0]
    assert not torch.allclose(a[1], b[1])
    torch.testing.assert_close(a[0], b[0])


def test_native_round_trip_and_answer_weights(tmp_path):
    torch.manual_seed(3)
    model = QAModel(QAConfig.tiny(answers=5, proj_dim=8, hidden_dim=16)).eval()
    save_qa_model(model, tmp_path / "qa")
    loaded, config, report = build_qa_model(tmp_path / "qa", answer_weights=(1, 0, 0))
    assert report.format == "hbi-toolkit-qa" and config.answer_weights == (1.0, 0.0, 0.0)
    assert config.replace(answer_weights=model.qa_config.answer_weights) == model.qa_config
    ids, mask, frames, fmask = _inputs()
    ids = ids.clamp(max=49407)
    ids[ids == 298], ids[ids == 299] = 49406, 49407
    frames, fmask = frames[:, :6], fmask[:, :6]
    with torch.no_grad():
        q, v = model.encode_question(ids, mask), model.encode_video_qa(frames, fmask)
        torch.testing.assert_close(loaded.answer_logits(q, v), model.level_logits(q, v)[0])
