"""Optimization profiles derived from the manifest's named axes (hbi_export.trt.profiles)."""

from __future__ import annotations

import pytest

from hbi_export.trt.profiles import (check_overrides_known, derive_profile, dynamic_axes, graph_overrides,
                                     parse_axis_override)
from hbi_runtime.engines import AxisRange
from hbi_runtime.errors import UsageError
from hbi_runtime.package import load_package


@pytest.fixture
def package(demo_dir):
    return load_package(demo_dir)


def test_dynamic_axes_of_each_graph(package):
    assert dynamic_axes(package.graph("text_encoder")) == ["text_batch"]
    assert dynamic_axes(package.graph("video_encoder")) == ["video_batch"]
    assert dynamic_axes(package.graph("interaction")) == ["text_batch", "video_batch"]


def test_profile_replaces_named_axes_and_keeps_static_ones(package):
    profile = derive_profile(package.graph("video_encoder"), AxisRange(1, 4, 16))
    # demo video encoder: frames [video_batch, 8, 3, 32, 32], frame_mask [video_batch, 8]
    assert profile["frames"].to_dict() == {"min": [1, 8, 3, 32, 32], "opt": [4, 8, 3, 32, 32],
                                           "max": [16, 8, 3, 32, 32]}
    assert profile["frame_mask"].to_dict() == {"min": [1, 8], "opt": [4, 8], "max": [16, 8]}


def test_interaction_profile_takes_one_range_per_axis(package):
    spec = package.graph("interaction")
    profile = derive_profile(spec, AxisRange(1, 8, 32), {"video_batch": AxisRange(2, 64, 256)})
    assert profile["text_tokens_l0"].max == (32, 32, 64)  # text_batch max 32, L=32, D=64
    assert profile["video_tokens_l0"].min == (2, 8, 64) and profile["video_tokens_l0"].max == (256, 8, 64)
    assert profile["level_weights"].to_dict() == {"min": [3], "opt": [3], "max": [3]}  # static input
    assert set(profile) == {t.name for t in spec.inputs}


def test_axis_override_parsing():
    assert parse_axis_override("video_batch=1:16:64") == ("video_batch", AxisRange(1, 16, 64))
    for bad in ("video_batch", "video_batch=1:16", "=1:2:3", "video_batch=a:b:c", "video_batch=1:2:3:4"):
        with pytest.raises(UsageError, match="--axis takes NAME=MIN:OPT:MAX"):
            parse_axis_override(bad)
    with pytest.raises(UsageError, match="1 <= min <= opt <= max"):
        parse_axis_override("video_batch=8:4:16")
    with pytest.raises(UsageError, match="1 <= min <= opt <= max"):
        parse_axis_override("video_batch=0:4:16")


def test_unknown_axes_are_refused(package):
    with pytest.raises(UsageError, match=r"graph inputs have no axis \['video_batch'\]"):
        derive_profile(package.graph("text_encoder"), overrides={"video_batch": AxisRange(1, 2, 3)})
    specs = [package.graph(g) for g in ("text_encoder", "video_encoder", "interaction")]
    with pytest.raises(UsageError, match=r"--axis names \['vidoe_batch'\], which no graph has"):
        check_overrides_known(specs, {"vidoe_batch": AxisRange(1, 2, 3)})
    overrides = {"video_batch": AxisRange(1, 2, 3), "text_batch": AxisRange(1, 1, 1)}
    assert graph_overrides(package.graph("video_encoder"), overrides) == {"video_batch": AxisRange(1, 2, 3)}
