"""Parts of hbi_calibration on their own: the deterministic split, streamed calibration, the fallback steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import hbi_runtime
from hbi_runtime.package import load_package

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime.quantization")

from hbi_calibration import data, quantize  # noqa: E402

DEMO = Path(hbi_runtime.__file__).resolve().parent / "data" / "demo"
SAMPLES = DEMO / "samples"


def test_split_is_deterministic_and_disjoint(tmp_path):
    first = data.plan_split(SAMPLES, samples=64, holdout=0.25)
    again = data.plan_split(SAMPLES, samples=64, holdout=0.25)
    assert first == again
    assert len(first.held_out) == 2 and len(first.calibration) == 6
    assert set(first.held_out).isdisjoint(first.calibration)
    assert set(first.held_out) | set(first.calibration) == {str(p) for p in SAMPLES.glob("*.mp4")}
    capped = data.plan_split(SAMPLES, samples=3, holdout=0.25)
    assert capped.held_out == first.held_out and len(capped.calibration) == 3


def test_held_out_videos_come_from_the_captioned_ones(tmp_path):
    names = sorted(p.name for p in SAMPLES.glob("*.mp4"))
    caps = tmp_path / "c.csv"
    caps.write_text("video,caption\n" + "".join(f"{Path(n).stem},caption {i}\n" for i, n in enumerate(names[:3])))
    split = data.plan_split(SAMPLES, captions=caps, holdout=0.5)
    assert {Path(p).name for p in split.held_out} <= set(names[:3]) and len(split.held_out) == 3
    assert all(len(split.captions[p]) == 1 for p in split.held_out)
    assert len(split.calibration) == 5


def test_a_name_several_videos_share_must_be_given_as_a_relative_path(tmp_path):
    samples = sorted(SAMPLES.glob("*.mp4"))
    for folder, sample in zip(("a", "b", "c"), samples):
        (tmp_path / "videos" / folder).mkdir(parents=True)
        shutil.copy(sample, tmp_path / "videos" / folder / "x.mp4")
    caps = tmp_path / "c.csv"
    caps.write_text("video,caption\nc/x.mp4,the third\nx.mp4,which one?\n")
    with pytest.raises(hbi_runtime.errors.BadInputError, match=r"names the video x.mp4, which is the name of 3 "
                                                               r"videos \(a/x.mp4, b/x.mp4, c/x.mp4\)") as refused:
        data.plan_split(tmp_path / "videos", captions=caps)
    assert "relative" in refused.value.hint and str(caps) in refused.value.message
    caps.write_text("video,caption\nc/x.mp4,the third\na/x.mp4,the first\n")
    split = data.plan_split(tmp_path / "videos", captions=caps, holdout=0.5)
    assert {Path(p).parent.name: c for p, c in split.captions.items()} == {"a": ("the first",), "c": ("the third",)}


def _reader(items):
    class Reader:
        def __init__(self) -> None:
            self.it = iter(items)

        def get_next(self):
            return next(self.it, None)
    return Reader()


@pytest.mark.slow
def test_streamed_calibration_equals_one_pass(tmp_path):
    """Ranges merged over windows of 4 videos equal ORT's ranges over all 6 at once (min/max is exact)."""
    from onnxruntime.quantization.calibrate import create_calibrator, load_tensors_data

    pkg = load_package(DEMO / "package")
    reader = data.make_video_reader(sorted(str(p) for p in SAMPLES.glob("*.mp4"))[:6], pkg.manifest.preprocessing,
                                    workers=1)
    items = [reader.get_next() for _ in range(6)]
    graph = pkg.graph_path("video_encoder")
    quantize.calibrate(graph, _reader(items), "minmax", tmp_path / "ranges.json", tmp_path)
    streamed = load_tensors_data(tmp_path / "ranges.json")
    one = create_calibrator(graph, list(quantize.QUANTIZED_OPS), augmented_model_path=str(tmp_path / "a.onnx"))
    one.collect_data(_reader(items))
    whole = one.compute_data()
    assert set(streamed.data) == set(whole.data) and len(whole.data) > 50
    for name, rng in whole.data.items():
        assert np.array_equal(streamed.data[name].range_value[0], rng.range_value[0]), name
        assert np.array_equal(streamed.data[name].range_value[1], rng.range_value[1]), name
    assert json.loads((tmp_path / "ranges.json").read_text())  # the cache ORT's quantize_static reads


def test_fallback_steps_widen_by_block_then_attention():
    model = onnx.load(str(DEMO / "package" / "video_encoder.onnx"))
    nodes = quantize.quantizable_nodes(model)
    assert len(nodes) == 50  # the demo's video encoder: 4 vision blocks, 1 temporal block, projections
    by_name = {n.name: n for n in nodes}
    steps = quantize.fallback_steps(nodes, set())
    assert [len(s.excluded) for s in steps][0] == 0
    second = steps[1].excluded
    blocks = {by_name[n].block for n in second}
    # the demo: vision tower with 4 blocks (0 and 3 are the first / last), temporal transformer with 1
    assert blocks == {"model.clip.visual.transformer.resblocks.0", "model.clip.visual.transformer.resblocks.3",
                      "model.transformerClip.resblocks.0"}
    assert second == {n.name for n in nodes if n.block in blocks}
    third = steps[2].excluded - second
    assert third and all(by_name[n].kind == "attention" for n in third)
    assert {n.name for n in nodes if n.kind == "attention"} <= steps[2].excluded
    attention = [n for n in model.graph.node if n.name in third]
    inits = {i.name for i in model.graph.initializer}
    assert all(not set(n.input) & inits for n in attention)  # both operands computed


def test_user_exclusions_start_the_first_step():
    nodes = quantize.quantizable_nodes(onnx.load(str(DEMO / "package" / "video_encoder.onnx")))
    excluded = quantize.resolve_excluded(nodes, ["node_MatMul_26", "*transformerClip.resblocks.0"])
    assert "node_MatMul_26" in excluded and len(excluded) == 1 + 6
    steps = quantize.fallback_steps(nodes, excluded)
    assert steps[0].excluded == excluded and all(excluded <= s.excluded for s in steps)


def test_check_options():
    assert quantize.check_options("ort-cpu", "minmax", ["Gemm"]) == ("MatMul",)
    with pytest.raises(hbi_runtime.errors.UsageError, match="--target must be one of"):
        quantize.check_options("cuda", "minmax", [])
    with pytest.raises(hbi_runtime.errors.UsageError, match="nothing would be quantized"):
        quantize.check_options("ort-cpu", "minmax", ["MatMul", "Gemm"])
