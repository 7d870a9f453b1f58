"""``hbi-export inspect``: text and JSON output, and clean errors with exit code 3."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hbi_export.cli import app

runner = CliRunner()


def _invoke(*args: str):
    return runner.invoke(app, ["inspect", *args])


def test_text_output_on_an_official_checkpoint(official_file):
    result = _invoke(str(official_file))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "format      official-hbi" in out
    assert "vision tower   ViT width 128, 2 layers, 2 heads, patch 16, image 32" in out
    assert "text tower     width 128, 2 layers, 2 heads, context 16, vocabulary 500" in out
    assert "temporal       2 layers, 2 heads, 16 frame positions" in out
    assert "ignored training-only" in out and "training-only Banzhaf estimator" in out
    assert "upcast   5 tensors float16 -> float32" in out


def test_json_output_on_an_official_checkpoint(official_file, ckpt_model):
    result = _invoke(str(official_file), "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == "hbi.inspect/1" and doc["format"] == "official-hbi"
    assert doc["architecture"]["vision"] == {"width": 128, "layers": 2, "heads": 2, "patch_size": 16,
                                             "image_size": 32}
    assert doc["config"] == ckpt_model.config.to_dict()
    params = doc["parameters"]
    assert params["total"] == sum(p.numel() for p in ckpt_model.parameters())
    assert params["total"] == sum(v for k, v in params.items() if k not in ("total", "ignored training-only"))
    assert params["ignored training-only"] == sum(i["numel"] for i in doc["keys"]["ignored"]) > 0
    assert len(doc["keys"]["upcast"]) == 5 and doc["keys"]["initialised"] == []


def test_openai_torchscript_reports_initialised_parts(openai_jit_file):
    result = _invoke(str(openai_jit_file), "--temporal-layers", "1", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["format"] == "openai-clip" and doc["architecture"]["temporal"]["layers"] == 1
    parts = [p["part"] for p in doc["keys"]["initialised"]]
    assert parts[:2] == ["frame_position_embeddings", "transformerClip.resblocks.0"]
    assert {i["key"] for i in doc["keys"]["ignored"]} == {"input_resolution", "context_length", "vocab_size"}
    text = _invoke(str(openai_jit_file), "--temporal-layers", "1")
    assert "initialised  frame_position_embeddings: copied from CLIP positional_embedding" in text.stdout


@pytest.mark.parametrize("content", [b"not a checkpoint\n", b""])
def test_bad_file_exits_3_without_traceback(content, tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(content)
    result = _invoke(str(bad))
    assert result.exit_code == 3
    assert result.stderr.startswith(f"error: {bad} is not a checkpoint")
    assert "hint: " in result.stderr and "Traceback" not in result.output


def test_bad_file_in_json_mode(tmp_path):
    result = _invoke(str(tmp_path / "missing.pt"), "--format", "json")
    assert result.exit_code == 3
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "CheckpointError" and "does not exist" in error["message"] and error["hint"]


def test_debug_shows_the_traceback(tmp_path):
    result = _invoke(str(tmp_path / "missing.pt"), "--debug")
    assert result.exit_code == 3 and "Traceback" in result.stderr


def test_help_has_an_example():
    result = _invoke("--help")
    assert result.exit_code == 0
    assert "hbi-export inspect" in result.stdout and "--format" in result.stdout


def test_unknown_format_is_a_usage_error(official_file):
    assert _invoke(str(official_file), "--format", "yaml").exit_code == 2
