"""Checkpoint loading: every format gives the same model, round trips are exact, bad files fail clearly."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch

from hbi_export.checkpoints import (HF, NATIVE, OFFICIAL, OPENAI, LoadReport, build_model, expected_shapes,
                                    load_checkpoint, parameter_counts, save_model, to_hf_clip_state_dict,
                                    to_openai_clip_state_dict)
from hbi_export.checkpoints.native import CONFIG_NAME
from hbi_export.checkpoints.readers import WRAPPER_KEYS
from hbi_export.model import HBIConfig, HBIModel
from hbi_export.model.config import TextConfig
from hbi_runtime.errors import CheckpointError, UsageError

TOL = 1e-6


@torch.no_grad()
def _outputs(model: HBIModel, x: dict) -> dict[str, torch.Tensor]:
    text = model.encode_text(x["ids"], x["text_mask"])
    video = model.encode_video(x["frames"], x["frame_mask"])
    return {
        "text_features": model.text_features(x["ids"], x["text_mask"]),
        "frame_features": model.frame_features(x["frames"]),
        "video_features": model.video_features(x["frames"], x["frame_mask"]),
        "score_levels": model.score_levels(text, video),
    }


def _assert_same(a: dict, b: dict, keys=None, tol: float = 0.0) -> None:
    for key in keys or a:
        diff = (a[key] - b[key]).abs().max().item()
        assert diff <= tol, f"{key} differs by {diff}"


def _reference(official: dict, config: HBIConfig) -> HBIModel:
    """The model the official file describes: its non-training tensors, upcast, loaded directly."""
    model = HBIModel(config)
    model.load_state_dict({k: v.float() for k, v in official.items() if not k.startswith("banzhaf")})
    return model.eval()


def _clip_only(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.startswith("clip.")}


# ------------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("preset", ["tiny", "vit_b_32", "vit_b_16"])
def test_expected_shapes_equal_the_model_state_dict(preset):
    config = getattr(HBIConfig, preset)()
    with torch.device("meta"):  # no memory for the full-size presets
        model = HBIModel(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected_shapes(config)


def test_parameter_counts_match_the_official_b32_numbers():
    shapes = expected_shapes(HBIConfig.vit_b_32())
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    counts = parameter_counts(state, LoadReport("x", "x", HBIConfig()))
    assert counts["vision tower"] == 87_849_216 and counts["text tower"] == 63_428_097
    assert counts["temporal transformer"] == 12_609_536 + 39_424
    assert counts["weight heads"] == 6 * 526_337 and counts["token merge"] == 4 * (787_969 + 1_051_648)


# ------------------------------------------------------------------------------------------------ official
def test_official_checkpoint_loads_exactly_and_reports(official_file, official_sd, ckpt_config, ckpt_inputs):
    model, report = build_model(official_file)
    assert report.format == OFFICIAL and not model.training
    assert model.config == ckpt_config
    assert {i.key for i in report.ignored} == {k for k in official_sd if k.startswith("banzhaf")}
    assert any(i.key == "banzhafteacher.bn.num_batches_tracked" for i in report.ignored)
    assert {u.key for u in report.upcast} == {k for k, v in official_sd.items() if v.dtype == torch.float16}
    assert all(u.from_dtype == "float16" for u in report.upcast) and report.initialised == []
    assert report.loaded_keys == len(expected_shapes(ckpt_config))
    _assert_same(_outputs(model, ckpt_inputs), _outputs(_reference(official_sd, ckpt_config), ckpt_inputs))


def test_save_load_round_trip_is_identical(official_file, ckpt_inputs, tmp_path):
    model, _ = build_model(official_file, level_weights=(0.5, 0.3, 0.2), text_ratios=(0.5, 0.5))
    save_model(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())["format_version"] == 1
    for path in (tmp_path / "ours", tmp_path / "ours" / "model.safetensors", tmp_path / "ours" / CONFIG_NAME):
        again, report = build_model(path)
        assert report.format == NATIVE and again.config == model.config
        assert again.config.level_weights == (0.5, 0.3, 0.2) and again.config.text_ratios == (0.5, 0.5)
        _assert_same(_outputs(model, ckpt_inputs), _outputs(again, ckpt_inputs))


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module.", "legacy", "best.pth"])
def test_official_wrappers_and_ddp_prefix(wrap, official_sd, tmp_path):
    obj = official_sd
    if wrap == "module.":
        obj = {f"module.{k}": v for k, v in official_sd.items()}
    elif wrap in WRAPPER_KEYS:
        obj = {wrap: official_sd, "epoch": 3}
    torch.save(obj, tmp_path / wrap, _use_new_zipfile_serialization=wrap != "legacy")  # legacy: pre-1.6 torch
    state, _, report = load_checkpoint(tmp_path / wrap)
    assert report.format == OFFICIAL
    assert all(torch.equal(state[k], official_sd[k].float()) for k in state)


def test_caller_ratios_and_level_weights_reach_the_config(official_file):
    _, config, _ = load_checkpoint(official_file, text_ratios=[0.5, 0.25], video_ratios=(1.0, 0.5),
                                   level_weights=[0.2, 0.3, 0.5])
    assert config.text_ratios == (0.5, 0.25) and config.video_ratios == (1.0, 0.5)
    assert config.level_weights == (0.2, 0.3, 0.5)


# ------------------------------------------------------------------------------------------------ CLIP
def test_openai_dict_and_torchscript_give_identical_models(openai_sd, openai_jit_file, ckpt_model, ckpt_inputs,
                                                           tmp_path):
    torch.save(openai_sd, tmp_path / "ViT-plain.pt")
    plain, plain_report = build_model(tmp_path / "ViT-plain.pt", temporal_layers=1)
    jit, jit_report = build_model(openai_jit_file, temporal_layers=1)
    assert plain_report.format == jit_report.format == OPENAI
    assert {i.key for i in jit_report.ignored} == {"input_resolution", "context_length", "vocab_size"}
    for a, b in zip(plain.state_dict().items(), jit.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    ref = _outputs(ckpt_model, ckpt_inputs)
    _assert_same(_outputs(jit, ckpt_inputs), ref, ["text_features", "frame_features"], TOL)


def test_openai_init_follows_the_official_trick(openai_sd, tmp_path):
    torch.save(openai_sd, tmp_path / "clip.pt")
    state, config, report = load_checkpoint(tmp_path / "clip.pt", temporal_layers=3, seed=5)
    assert config.frame_positions == config.text.context_length and config.temporal_layers == 3
    assert torch.equal(state["frame_position_embeddings.weight"], openai_sd["positional_embedding"])
    for key in ("attn.in_proj_weight", "mlp.c_proj.bias", "ln_2.weight"):
        assert torch.equal(state[f"transformerClip.resblocks.1.{key}"], openai_sd[f"transformer.resblocks.1.{key}"])
    parts = {p.part: p for p in report.initialised}
    assert "transformerClip.resblocks.2" in parts and "random (seed 5)" in parts["transformerClip.resblocks.2"].method
    assert report.loaded_keys + sum(p.keys for p in report.initialised) == len(state)
    again, _, _ = load_checkpoint(tmp_path / "clip.pt", temporal_layers=3, seed=5)
    other, _, _ = load_checkpoint(tmp_path / "clip.pt", temporal_layers=3, seed=6)
    assert all(torch.equal(state[k], again[k]) for k in state)  # seeded: reproducible
    assert not torch.equal(state["t_block0.attn.q.weight"], other["t_block0.attn.q.weight"])
    assert torch.all(state["t_ctm0.norm.weight"] == 1) and torch.all(state["text_weight_fc.0.bias"] == 0)


def test_hf_clip_matches_openai_and_transformers(hf_clip_dir, openai_jit_file, ckpt_model, ckpt_inputs):
    from transformers import CLIPModel

    hf_state, _, hf_report = load_checkpoint(hf_clip_dir, temporal_layers=1)
    jit_state, _, _ = load_checkpoint(openai_jit_file, temporal_layers=1)
    assert hf_report.format == HF
    assert hf_state.keys() == jit_state.keys() and all(torch.equal(hf_state[k], jit_state[k]) for k in hf_state)
    model, _ = build_model(hf_clip_dir / "model.safetensors", temporal_layers=1)
    ours = _outputs(model, ckpt_inputs)
    _assert_same(ours, _outputs(ckpt_model, ckpt_inputs), ["text_features", "frame_features"], TOL)
    hf = CLIPModel.from_pretrained(hf_clip_dir).eval()  # the conversion means the same computation
    x = ckpt_inputs
    with torch.no_grad():
        cls = hf.visual_projection(hf.vision_model(pixel_values=x["frames"].flatten(0, 1)).pooler_output)
        text = hf.text_projection(hf.text_model(input_ids=x["ids"], attention_mask=x["text_mask"].long())
                                  .last_hidden_state)
    assert torch.allclose(cls.view_as(ours["frame_features"]), ours["frame_features"], atol=1e-5)
    assert torch.allclose(text, ours["text_features"], atol=1e-5)


def test_hf_pytorch_model_bin_and_position_ids(ckpt_model, make_hf_config, tmp_path):
    from transformers import CLIPModel

    hf = CLIPModel(make_hf_config(ckpt_model.config))
    state = to_hf_clip_state_dict(ckpt_model.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(16)[None]  # older transformers saved it
    hf.save_pretrained(tmp_path, safe_serialization=False)
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded, _, report = load_checkpoint(tmp_path / "pytorch_model.bin", temporal_layers=1)
    assert report.format == HF and [i.key for i in report.ignored] == ["text_model.embeddings.position_ids"]
    assert all(torch.equal(loaded[k], v) for k, v in ckpt_model.state_dict().items() if k.startswith("clip."))


def test_to_openai_and_back(ckpt_model):
    sd = ckpt_model.state_dict()
    openai = to_openai_clip_state_dict(sd)
    assert "visual.conv1.weight" in openai and "transformer.resblocks.0.attn.in_proj_weight" in openai
    assert len(openai) == len(_clip_only(sd))


# ------------------------------------------------------------------------------------------------ errors
def _save(obj, path):
    torch.save(obj, path)
    return path


def test_missing_key(official_sd, tmp_path):
    del official_sd["text_weight_fc.0.bias"]
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): text_weight_fc\.0\.bias") as info:
        load_checkpoint(_save(official_sd, tmp_path / "m.bin"))
    assert info.value.hint and info.value.exit_code == 3


def test_unexpected_key(official_sd, tmp_path):
    official_sd["clip.visual.extra_token"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\): clip\.visual\.extra_token"):
        load_checkpoint(_save(official_sd, tmp_path / "u.bin"))


def test_mis_shaped_key(official_sd, tmp_path):
    official_sd["t_ctm0.score.weight"] = torch.zeros(1, 7)
    with pytest.raises(CheckpointError, match=r"mis-shaped key\(s\): t_ctm0\.score\.weight: got \(1, 7\), "
                       r"expected \(1, 128\)"):
        load_checkpoint(_save(official_sd, tmp_path / "s.bin"))


def test_long_key_lists_are_truncated(official_sd, tmp_path):
    for key in [k for k in official_sd if k.startswith("clip.visual.transformer.")]:
        del official_sd[key]  # consistent (0 visual layers), so only the junk keys are reported
    official_sd.update({f"junk.{i}": torch.zeros(1) for i in range(25)})
    with pytest.raises(CheckpointError, match=r"25 unexpected key\(s\): .*\.\.\. \(and 5 more\)"):
        load_checkpoint(_save(official_sd, tmp_path / "t.bin"))


def test_layer_gap_is_reported_missing(official_sd, tmp_path):
    for key in [k for k in official_sd if k.startswith("clip.transformer.resblocks.0.")]:
        del official_sd[key]
    with pytest.raises(CheckpointError, match=r"12 missing key\(s\): clip\.transformer\.resblocks\.0\."):
        load_checkpoint(_save(official_sd, tmp_path / "g.bin"))


def test_official_without_temporal_transformer(official_sd, tmp_path):
    for key in [k for k in official_sd if k.startswith(("frame_position", "transformerClip."))]:
        del official_sd[key]
    with pytest.raises(CheckpointError, match=r"no frame_position_embeddings") as info:
        load_checkpoint(_save(official_sd, tmp_path / "meanP.bin"))
    assert "seqTransf" in info.value.hint


def test_official_text_width_must_equal_embed_dim(fresh_model, tiny, tmp_path):
    config = tiny(text=TextConfig(width=64, layers=1, heads=1, context_length=16, vocab_size=500))
    sd = fresh_model(config).state_dict()
    with pytest.raises(CheckpointError, match=r"text width 64 != embed_dim 128"):
        load_checkpoint(_save(sd, tmp_path / "w.bin"))


@pytest.mark.parametrize("content, match", [
    (b"hello, I am a text file\n", r"not a checkpoint: not a torch\.save file, TorchScript archive or "
                                    r"safetensors file \(KeyError"),
    (b"", r"not a checkpoint: the file is empty"),
    (bytes(range(256)) * 4, r"not a checkpoint"),
])
def test_not_a_checkpoint(content, match, tmp_path):
    (tmp_path / "f.bin").write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path / "f.bin")


def test_truncated_file(official_file, tmp_path):
    data = official_file.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"not a checkpoint: not a torch\.save file.*RuntimeError"):
        load_checkpoint(tmp_path / "cut.bin")


def test_truncated_safetensors(official_file, tmp_path):
    model, _ = build_model(official_file)
    save_model(model, tmp_path / "ours")
    weights = tmp_path / "ours" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"cannot read safetensors"):
        load_checkpoint(tmp_path / "ours")


class Opaque:  # a pickled object of a class: weights_only refuses it instead of running code
    pass


@pytest.mark.parametrize("obj, match", [
    ([1, 2, 3], r"it holds list, not a state dict"),
    ({}, r"it holds an empty dict"),
    ({"a": torch.zeros(1), "b": 3}, r"entries that are not named tensors: b"),
    ({"epoch": torch.zeros(1)}, r"match no known layout \(first keys: epoch\)"),
])
def test_pickles_of_something_else(obj, match, tmp_path):
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(_save(obj, tmp_path / "p.bin"))


def test_unsafe_pickle_is_refused(tmp_path):
    torch.save(Opaque(), tmp_path / "evil.pkl")
    with pytest.raises(CheckpointError, match=r"holds Python objects other than tensors.*weights_only=True"):
        load_checkpoint(tmp_path / "evil.pkl")


def test_zip_that_is_not_torch(tmp_path):
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("hello.txt", "hi")
    with pytest.raises(CheckpointError, match=r"not a checkpoint"):
        load_checkpoint(tmp_path / "a.zip")


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_checkpoint(tmp_path / "nope.bin")
    with pytest.raises(CheckpointError, match=r"directory without model\.safetensors or pytorch_model\.bin"):
        load_checkpoint(tmp_path)


def test_hf_needs_quick_gelu(ckpt_model, make_hf_config, tmp_path):
    from transformers import CLIPModel

    hf = CLIPModel(make_hf_config(ckpt_model.config, act="gelu"))
    hf.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"text tower uses activation 'gelu'.*quick_gelu"):
        load_checkpoint(tmp_path)


def test_hf_weights_without_config(hf_clip_dir, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((hf_clip_dir / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"need their config\.json"):
        load_checkpoint(tmp_path / "model.safetensors")


def test_hf_incomplete_qkv_is_reported(hf_clip_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(hf_clip_dir / "model.safetensors")
    del state["vision_model.encoder.layers.1.self_attn.k_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((hf_clip_dir / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"missing key\(s\): clip\.visual\.transformer\.resblocks\.1\.attn"
                       r"\.in_proj_weight.*unexpected key\(s\): vision_model\.encoder\.layers\.1\.self_attn\.q_proj"):
        load_checkpoint(tmp_path)


def test_native_format_version_and_config_are_checked(official_file, tmp_path):
    model, _ = build_model(official_file)
    save_model(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(CheckpointError, match=r"format_version 2 is not supported"):
        load_checkpoint(tmp_path)
    meta["config"]["vision"]["heads"] = 3
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"invalid model config: vision width 128 is not divisible"):
        load_checkpoint(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"cannot read .*config\.json"):
        load_checkpoint(tmp_path)


def test_resnet_clip_is_refused(openai_sd, tmp_path):
    openai_sd["visual.layer1.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"ResNet CLIP"):
        load_checkpoint(_save(openai_sd, tmp_path / "rn50.pt"))


def test_save_model_needs_a_config(tmp_path):
    with pytest.raises(UsageError, match=r"has no HBIConfig"):
        save_model(torch.nn.Linear(2, 2), tmp_path)
