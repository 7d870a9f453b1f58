"""``hbi-export init`` and ``hbi-export convert``: models written in our format load back exactly."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from hbi_export.checkpoints import build_model, load_checkpoint
from hbi_export.cli import app

runner = CliRunner()


def test_init_writes_a_loadable_random_model(tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path / "m"), "--preset", "tiny", "--seed", "3",
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "hbi.init/1" and doc["preset"] == "tiny"
    model, report = build_model(tmp_path / "m")
    assert report.format == "hbi-toolkit"
    assert doc["parameters"] == sum(p.numel() for p in model.parameters())
    again = runner.invoke(app, ["init", str(tmp_path / "m2"), "--preset", "tiny", "--seed", "3"])
    assert again.exit_code == 0, again.output
    for (k, a), (_, b) in zip(model.state_dict().items(), build_model(tmp_path / "m2")[0].state_dict().items()):
        assert torch.equal(a, b), k  # same seed, same weights


def test_init_refuses_to_overwrite_and_unknown_presets(tmp_path):
    assert runner.invoke(app, ["init", str(tmp_path / "m"), "--preset", "tiny"]).exit_code == 0
    again = runner.invoke(app, ["init", str(tmp_path / "m"), "--preset", "tiny"])
    assert again.exit_code == 2 and "already holds a model" in again.stderr and "--overwrite" in again.stderr
    assert runner.invoke(app, ["init", str(tmp_path / "m"), "--preset", "tiny", "--overwrite"]).exit_code == 0
    bad = runner.invoke(app, ["init", str(tmp_path / "x"), "--preset", "huge"])
    assert bad.exit_code == 2 and "unknown preset 'huge'" in bad.stderr and "Traceback" not in bad.output


def test_convert_official_checkpoint_keeps_weights(official_file, tmp_path):
    out = tmp_path / "converted"
    result = runner.invoke(app, ["convert", str(official_file), str(out), "--text-ratios", "0.25", "0.125",
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "hbi.convert/1" and doc["format"] == "official-hbi" and doc["output"] == str(out)
    _, config, report = load_checkpoint(out)
    assert report.format == "hbi-toolkit" and config.text_ratios == (0.25, 0.125)
    converted, original = build_model(out)[0].state_dict(), build_model(official_file)[0].state_dict()
    assert converted.keys() == original.keys()
    for key, value in original.items():  # the fixture's fp16 tensors come back as the same upcast values
        assert torch.equal(converted[key], value), key
    # a second conversion without ratio options keeps the stored ratios
    assert runner.invoke(app, ["convert", str(out), str(tmp_path / "again")]).exit_code == 0
    assert load_checkpoint(tmp_path / "again")[1].text_ratios == (0.25, 0.125)


def test_convert_missing_source_exits_3(tmp_path):
    result = runner.invoke(app, ["convert", str(tmp_path / "nothing.bin"), str(tmp_path / "out")])
    assert result.exit_code == 3 and "does not exist" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
