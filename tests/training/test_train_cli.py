"""The ``hbi-train`` command line: help, usage errors, and estimator -> fit -> resume on a tiny synthetic set."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from hbi_training.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    pytest.importorskip("imageio_ffmpeg")
    pytest.importorskip("PIL")
    from hbi_training.data import generate

    return generate(tmp_path_factory.mktemp("synthetic") / "set", 12, 4, 0, size=32).root


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_help_names_commands_and_examples():
    top = _invoke("--help")
    assert top.exit_code == 0 and "fit" in top.output and "estimator" in top.output
    for command in ("fit", "estimator"):
        result = _invoke(command, "--help")
        assert result.exit_code == 0 and "Examples" in result.output and "hbi-train" in result.output


def test_fit_without_an_estimator_is_a_usage_error(tmp_path):
    result = _invoke("fit", tmp_path, "--out", tmp_path / "run", "--steps", 1)
    assert result.exit_code == 2
    assert "needs a trained estimator" in result.output and "--no-banzhaf" in result.output


def test_not_a_data_folder_and_steps_with_epochs_are_usage_errors(tmp_path, data_dir):
    result = _invoke("fit", tmp_path, "--out", tmp_path / "run", "--steps", 1, "--no-banzhaf")
    assert result.exit_code == 2 and "no manifest.json" in result.output
    result = _invoke("fit", data_dir, "--out", tmp_path / "run", "--steps", 1, "--epochs", 1, "--no-banzhaf",
                     "--batch-size", 4, "--no-progress")
    assert result.exit_code == 2 and "exactly one of --steps and --epochs" in result.output


@pytest.mark.slow
def test_estimator_then_fit_then_resume(tmp_path, data_dir):
    from hbi_export.checkpoints import build_model

    common = ("--batch-size", 4, "--no-progress", "--device", "cpu", "--format", "json")
    est = _invoke("estimator", data_dir, "--out", tmp_path / "est", "--steps", 2, "--samples", 4, *common)
    assert est.exit_code == 0, est.output
    assert json.loads(est.output)["schema"] == "hbi.train-estimator/1"
    assert (tmp_path / "est" / "final" / "estimator.safetensors").is_file()

    fit = _invoke("fit", data_dir, "--out", tmp_path / "hbi", "--estimator", tmp_path / "est", "--steps", 2,
                  *common)
    assert fit.exit_code == 0, fit.output
    summary = json.loads(fit.output)
    assert summary["schema"] == "hbi.train-fit/1" and summary["recipe"] == "scratch"
    assert 0.0 <= summary["validation"]["t2v_r1"] <= 100.0 and summary["validation"]["texts"] == 4
    build_model(tmp_path / "hbi" / "final")

    more = _invoke("fit", data_dir, "--out", tmp_path / "hbi", "--estimator", tmp_path / "est", "--steps", 3,
                   "--resume", tmp_path / "hbi", *common)
    assert more.exit_code == 0, more.output
    steps = [json.loads(line)["step"] for line in (tmp_path / "hbi" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [2, 3]  # log_every 10: the last step of each run is logged


def test_caption_joint_scratch_excludes_init_and_a_missing_gpu_is_a_usage_error(tmp_path, data_dir):
    both = _invoke("caption-joint", "--data", data_dir, "--out", tmp_path / "a", "--scratch", "--init", tmp_path)
    assert both.exit_code == 2 and "--scratch and --init exclude each other" in both.output
    import torch

    if not torch.cuda.is_available():
        gpu = _invoke("caption-joint", "--data", data_dir, "--out", tmp_path / "b", "--scratch", "--device", "cuda",
                      "--steps", 1, "--batch-size", 4)
        assert gpu.exit_code == 2 and "no CUDA GPU" in gpu.output and "--device cpu" in gpu.output


def test_caption_patch_grid_needs_the_packages_checkpoint(tmp_path, data_dir):
    """--patch-grid with another --model and no --checkpoint is refused before training; a checkpoint that is
    not the package's (the demo's with its patch embedding perturbed) is refused by comparing their video sides."""
    import shutil

    from safetensors.torch import load_file, save_file

    from hbi_training.caption_cli import _demo_checkpoint, _demo_package

    alone = _invoke("caption", "--data", data_dir, "--out", tmp_path / "a", "--patch-grid", 2,
                    "--model", _demo_package())
    assert alone.exit_code == 2 and "--checkpoint" in alone.output
    assert not (tmp_path / "a").exists()
    shutil.copytree(_demo_checkpoint(), tmp_path / "rand")
    weights = load_file(str(tmp_path / "rand" / "model.safetensors"))
    weights["clip.visual.conv1.weight"] = weights["clip.visual.conv1.weight"] * 1.5
    save_file(weights, str(tmp_path / "rand" / "model.safetensors"))
    wrong = _invoke("caption", "--data", data_dir, "--out", tmp_path / "b", "--patch-grid", 2, "--steps", 1,
                    "--checkpoint", tmp_path / "rand")
    assert wrong.exit_code == 2 and "is not the checkpoint" in wrong.output
    odd = _invoke("caption", "--data", data_dir, "--out", tmp_path / "c", "--patch-grid", 3, "--steps", 1)
    assert odd.exit_code == 2 and "does not divide the 8 x 8 patch map" in odd.output and "1, 2, 4, 8" in odd.output
    assert not (tmp_path / "c" / "cache").exists()  # refused before any feature was computed
