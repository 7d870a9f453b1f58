"""``hbi-export init`` and ``hbi-export convert``: models written in our format load back exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from hbi_export.checkpoints import build_model, load_checkpoint
from hbi_export.cli import app
from hbi_export.presets import preset_config
from hbi_runtime.errors import EXIT_USAGE

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
    assert again.exit_code == 2 and "already exists and holds a checkpoint folder" in again.stderr
    assert "--overwrite" in again.stderr
    assert runner.invoke(app, ["init", str(tmp_path / "m"), "--preset", "tiny", "--overwrite"]).exit_code == 0
    bad = runner.invoke(app, ["init", str(tmp_path / "x"), "--preset", "huge"])
    assert bad.exit_code == 2 and "unknown model preset 'huge'" in bad.stderr and "Traceback" not in bad.output
    assert "tiny, demo, vit-b-32, vit-b-16" in bad.stderr  # the hint lists hbi_export.presets


def test_init_takes_every_small_preset_of_the_registry(tmp_path):
    """``demo`` was missing from init's own table: init reads hbi_export.presets now (vit-b-* are too big here)."""
    result = runner.invoke(app, ["init", str(tmp_path / "m"), "--preset", "demo", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert build_model(tmp_path / "m")[0].config == preset_config("demo")


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


# ---------------------------------------------------------------------------------------------------------------
# OUT and --overwrite (hbi_runtime.outputs.prepare_output_dir): never the source, never a folder of other files,
# a previous checkpoint folder replaced only as a whole and only once the new one is complete


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.fixture
def source(tmp_path) -> Path:
    """An hbi-toolkit checkpoint folder (the input of `convert`)."""
    assert runner.invoke(app, ["init", str(tmp_path / "models" / "src"), "--preset", "tiny", "--seed", "1"]) \
        .exit_code == 0
    return tmp_path / "models" / "src"


@pytest.fixture
def user_files(tmp_path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    (folder / "data.bin").write_bytes(b"\x00\x01")
    return folder


@pytest.mark.parametrize("where", ["the source", "a folder holding it", "a symlink to it"])
def test_convert_refuses_to_write_over_its_source(source, where):
    before = _tree(source)
    out = {"the source": source, "a folder holding it": source.parent, "a symlink to it": source.parent / "link"}[where]
    if where == "a symlink to it":
        os.symlink(source, out)
    result = runner.invoke(app, ["convert", str(source), str(out), "--overwrite", "--text-ratios", "0.25", "0.125"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "the input" in result.stderr and "hint:" in result.stderr and "Traceback" not in result.output
    assert _tree(source) == before


@pytest.mark.parametrize("command", ["convert", "init"])
def test_a_folder_of_other_files_is_refused_even_with_overwrite(source, user_files, command):
    before = _tree(user_files)
    args = ["convert", str(source), str(user_files)] if command == "convert" else \
        ["init", str(user_files), "--preset", "tiny"]
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == EXIT_USAGE, result.output
    assert "does not hold a checkpoint folder" in result.stderr and "even with --overwrite" in result.stderr
    assert _tree(user_files) == before


@pytest.mark.parametrize("command", ["convert", "init"])
def test_overwrite_replaces_a_previous_checkpoint_folder_as_a_whole(source, tmp_path, command):
    previous = tmp_path / "prev"
    assert runner.invoke(app, ["init", str(previous), "--preset", "tiny", "--seed", "7"]).exit_code == 0
    (previous / "optimizer.pt").write_bytes(b"of the old model")
    args = ["convert", str(source), str(previous)] if command == "convert" else \
        ["init", str(previous), "--preset", "tiny", "--seed", "1"]
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert sorted(_tree(previous)) == ["config.json", "model.safetensors"]  # nothing of the old folder stays
    for (key, a), (_, b) in zip(build_model(previous)[0].state_dict().items(), build_model(source)[0].state_dict()
                                .items()):
        assert torch.equal(a, b), key  # the seed-1 weights of `source`, not the seed-7 ones
    assert _siblings(previous) == ["models", "prev"]  # no temporary or old folder left


@pytest.mark.parametrize("command", ["convert", "init"])
def test_a_write_that_fails_midway_leaves_the_previous_checkpoint(source, tmp_path, monkeypatch, command):
    from hbi_export.checkpoints import native

    previous = tmp_path / "prev"
    assert runner.invoke(app, ["init", str(previous), "--preset", "tiny", "--seed", "7"]).exit_code == 0
    before = _tree(previous)
    real_write = native._atomic_write

    def write(target, fn):
        if target.name == native.CONFIG_NAME:  # the weights are written, then the config fails
            raise OSError(28, "No space left on device")
        real_write(target, fn)

    monkeypatch.setattr(native, "_atomic_write", write)
    args = ["convert", str(source), str(previous)] if command == "convert" else \
        ["init", str(previous), "--preset", "tiny", "--seed", "1"]
    result = runner.invoke(app, [*args, "--overwrite"])
    assert result.exit_code == 3 and "the disk is full (No space left" in result.stderr, result.output
    assert _tree(previous) == before
    assert _siblings(previous) == ["models", "prev"]
