"""End to end on a GPU with TensorRT (marker ``trt``, deselected by default; run with ``-m trt``).

Builds the demo package's engines (fp32, fp16; with the hbi plugin library when $HBI_TRT_PLUGINS names one), runs
them through ``hbi_runtime.model.load(backend="trt")`` and compares with ONNX Runtime on CPU at the tolerances of
``hbi_runtime.compare.TOLERANCES`` (docs/architecture.md; docs/tensorrt.md, "Engine parity"). The queries include
captions shorter than the cluster count (padded cluster centres: the tie-order case of docs/custom_ops.md). Never
run in this project's environments (no GPU): see docs/tensorrt.md, "What is verified where".
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from hbi_export.trt.package import EngineOptions, build_package_engines
from hbi_runtime.compare import compare_scores, compare_tensors, evaluate
from hbi_runtime.engines import AxisRange
from hbi_runtime.model import load

pytestmark = pytest.mark.trt


def _frames(model, n: int, seed: int = 0):
    m = model.manifest
    rng = np.random.default_rng(seed)
    size = m.preprocessing.image_size
    frames = rng.standard_normal((n, m.max_frames, 3, size, size)).astype(np.float32)
    mask = np.ones((n, m.max_frames), dtype=np.int64)
    mask[1:, m.max_frames // 2:] = 0
    frames[mask == 0] = 0
    return frames, mask


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_demo_engines_agree_with_onnxruntime(demo_copy, precision):
    trt = pytest.importorskip("tensorrt")
    pytest.importorskip("polygraphy")
    if precision == "fp16" and int(trt.__version__.split(".")[0]) >= 11:
        pytest.skip("TensorRT 11 builds fp16 engines from an fp16 package only (hbi-export onnx --precision fp16)")
    plugins = os.environ.get("HBI_TRT_PLUGINS")
    options = EngineOptions(precision=precision, batch=AxisRange(1, 4, 8), workspace_mb=1024,
                            plugins=plugins and os.path.abspath(plugins))
    summary = build_package_engines(demo_copy, options)
    if plugins:
        assert all(e["plugin_layers"] > 0 for e in summary["engines"])
    # "a", "red": 3 tokens with start and end, fewer than the 8 clusters of the demo's first text merge
    queries = ["a red square moves left", "a blue circle appears", "a green cross moves up, then stops", "a",
               "red"] * 3
    with load(demo_copy) as ref, load(demo_copy, backend="trt", precision=precision) as got:
        frames, mask = _frames(ref, 11)  # 11 videos > max batch 8: the backend splits the feed
        t_ref, t_got = ref.encode_text(queries), got.encode_text(queries)
        v_ref, v_got = ref.encode_frames(frames, mask), got.encode_frames(frames, mask)
        s_ref, s_got = ref.score(t_ref, v_ref), got.score(t_got, v_got)
    comparisons = [compare_tensors(f"text_tokens_l{i}", a.tokens, b.tokens)
                   for i, (a, b) in enumerate(zip(t_ref.levels, t_got.levels))]
    comparisons += [compare_tensors(f"video_tokens_l{i}", a.tokens, b.tokens)
                    for i, (a, b) in enumerate(zip(v_ref.levels, v_got.levels))]
    comparisons.append(compare_scores("scores", s_ref, s_got))
    result = evaluate(comparisons, precision)
    assert result.ok, "\n".join(result.lines())
