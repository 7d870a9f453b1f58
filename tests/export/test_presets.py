"""hbi_export.presets: the one table of named architectures that every --preset and training recipe reads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hbi_export.model.config import HBIConfig, TextConfig, VisionConfig
from hbi_export.presets import MODEL_PRESETS, preset_config
from hbi_runtime.errors import UsageError


def test_every_preset_is_the_hbi_config_constructor_of_its_name():
    assert MODEL_PRESETS == ("tiny", "demo", "vit-b-32", "vit-b-16")
    for name in MODEL_PRESETS:
        config = preset_config(name)
        assert isinstance(config, HBIConfig)
        assert config == getattr(HBIConfig, name.replace("-", "_"))()
        assert HBIConfig.from_dict(config.to_dict()) == config


def test_the_presets_are_the_architectures_they_name():
    assert preset_config("vit-b-32") == HBIConfig()
    assert preset_config("vit-b-16").vision.patch_size == 16
    assert preset_config("vit-b-16").vision.width == preset_config("vit-b-32").vision.width == 768
    # demo: what hbi_training.runs defined before the registry (the shipped demo checkpoint is checked against it
    # in tests/training/test_demo.py)
    assert preset_config("demo") == HBIConfig.tiny(
        vision=VisionConfig(width=128, layers=4, heads=4, patch_size=4, image_size=32),
        text=TextConfig(width=32, layers=2, heads=2, context_length=32, vocab_size=49408), temporal_layers=1)
    assert HBIConfig.demo(temporal_layers=2).temporal_layers == 2  # overrides, like the other constructors


def test_unknown_preset_is_a_usage_error_listing_the_presets():
    with pytest.raises(UsageError, match=r"^unknown model preset 'huge'$") as exc:
        preset_config("huge")
    assert exc.value.hint == "use one of tiny, demo, vit-b-32, vit-b-16"
    with pytest.raises(UsageError):
        preset_config("vit_b_32")  # the constructor's name is not a preset name


def test_training_reads_the_same_registry():
    runs = pytest.importorskip("hbi_training.runs")
    assert runs.preset_config is preset_config and runs.MODEL_PRESETS is MODEL_PRESETS


def test_the_names_import_without_torch():
    """A command line can list the presets as choices before torch loads."""
    code = ("import sys; import hbi_export.presets as p; assert p.MODEL_PRESETS; "
            "heavy = sorted(m for m in ('torch', 'hbi_export.model') if m in sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
