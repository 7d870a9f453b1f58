"""Model presets in training: ``hbi_training.runs`` builds every preset of hbi_export.presets, the one registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hbi_export.presets import MODEL_PRESETS, preset_config
from hbi_runtime.errors import UsageError
from hbi_training.cli import app
from hbi_training.runs import FitSettings, build_start_model


def test_fit_builds_the_demo_preset(tmp_path):
    model = build_start_model(FitSettings(data_dir=tmp_path, out_dir=tmp_path / "run", model_preset="demo"))
    assert model.config == preset_config("demo")


def test_fit_refuses_an_unknown_preset(tmp_path):
    with pytest.raises(UsageError, match="unknown model preset 'huge'"):
        build_start_model(FitSettings(data_dir=tmp_path, out_dir=Path("run"), model_preset="huge"))


@pytest.mark.parametrize("preset", MODEL_PRESETS)
@pytest.mark.parametrize("command, next_check", [("fit", "needs a trained estimator"),
                                                 ("estimator", "is not a generated data folder")])
def test_cli_takes_every_preset(tmp_path, command, next_check, preset):
    """``hbi-train fit --preset demo`` / ``vit-b-16``: every registry name is accepted wherever a preset is (the run
    then stops at its next check, before any model is built)."""
    result = CliRunner().invoke(app, [command, str(tmp_path), "--out", str(tmp_path / "run"), "--steps", "1",
                                      "--preset", preset])
    assert result.exit_code == 2 and next_check in result.output, result.output
