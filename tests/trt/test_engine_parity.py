"""``hbi-export parity --engine``: the engine comparison path (hbi_export.onnx.parity.compare_engines).

TensorRT cannot run here, so the comparison machinery is exercised with ONNX Runtime standing in for the engine
backend (the same ``Backend`` contract), and with a backend that degrades its outputs, which must fail the gate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hbi_export.checkpoints import build_model
from hbi_export.cli import app
from hbi_export.onnx.parity import compare_engines
from hbi_runtime.backends import BACKENDS, OrtBackend

pytestmark = pytest.mark.slow  # three PyTorch-vs-backend comparisons of the demo model (~15 s on 2 cores)


@pytest.fixture(scope="module")
def demo_model(request):
    from pathlib import Path

    import hbi_runtime

    ckpt = Path(hbi_runtime.__file__).resolve().parent / "data" / "demo" / "checkpoint"
    model, _ = build_model(ckpt)
    return ckpt, model


def test_engine_parity_passes_for_a_faithful_backend(demo_dir, demo_model):
    _, model = demo_model
    result = compare_engines(demo_dir, model, "fp16", backend="onnxruntime")
    assert result.ok and result.tolerance.name == "fp16", "\n".join(result.lines())
    metrics = {c.metric for c in result.checks}
    assert {"cosine", "top5[t2v]", "spearman[v2t]"} <= metrics  # fp16: cosine, top-5, rank correlation


class NoisyBackend(OrtBackend):
    """ONNX Runtime whose float outputs get noise, as a bad fp16 engine would."""

    name = "noisy"

    def _infer(self, feed):
        out = super()._infer(feed)
        rng = np.random.default_rng(0)
        return {k: (v + rng.normal(0, 0.5, v.shape).astype(v.dtype)) if v.dtype == np.float32 else v
                for k, v in out.items()}


def test_engine_parity_fails_for_a_degraded_backend(demo_dir, demo_model, monkeypatch):
    _, model = demo_model
    monkeypatch.setitem(BACKENDS, "noisy", NoisyBackend)
    result = compare_engines(demo_dir, model, "fp16", backend="noisy")
    assert not result.ok
    assert any(c.metric == "cosine" and not c.passed for c in result.checks)


def test_parity_engine_cli_without_tensorrt(demo_copy, demo_model, monkeypatch):
    ckpt, _ = demo_model
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    runner = CliRunner()
    result = runner.invoke(app, ["parity", str(demo_copy), "--checkpoint", str(ckpt), "--engine", "fp16",
                                 "--format", "json"])
    assert result.exit_code == 2, result.output
    assert "TensorRT is not installed" in json.loads(result.stdout)["error"]["message"]
    bad = runner.invoke(app, ["parity", str(demo_copy), "--checkpoint", str(ckpt), "--plugins", "x.so"])
    assert bad.exit_code == 2 and "--plugins goes with --engine" in bad.output
    bad = runner.invoke(app, ["parity", str(demo_copy), "--checkpoint", str(ckpt), "--engine", "bf16"])
    assert bad.exit_code == 2 and "--engine must be fp32, fp16 or int8" in bad.output


# ------------------------------------------------------------------------------------------------ per tensor

def _runners(pkg, backend_cls_name="onnxruntime"):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from hbi_export.onnx.parity import backend_runner
    from hbi_runtime.backends import create_backend

    return {g: [OnnxrtRunner(SessionFromOnnx(str(pkg.graph_path(g)), providers=["cpu"]), name="onnxruntime-cpu"),
                backend_runner(create_backend(backend_cls_name, pkg.graph(g), pkg.graph_path(g)), "hbi-backend")]
            for g in ("text_encoder", "video_encoder", "interaction")}


def test_polygraphy_compares_every_output_tensor(demo_dir, demo_model, monkeypatch):
    """Polygraphy's Comparator over ONNX Runtime and one of our backends (as a Polygraphy runner), every output of
    every graph, on the parity inputs cut to an engine profile's limits. fp32 gates on Polygraphy's verdict."""
    pytest.importorskip("polygraphy")
    from hbi_export.onnx.parity import graph_feeds, parity_inputs, polygraphy_tensor_checks
    from hbi_runtime.package import load_package

    _, model = demo_model
    pkg = load_package(demo_dir)
    x = parity_inputs(model, pkg.manifest.max_words, pkg.manifest.max_frames)
    feeds = graph_feeds(pkg, x, {"text_encoder": {"text_batch": 2}, "video_encoder": {"video_batch": 3},
                                 "interaction": {"text_batch": 4, "video_batch": 2}})
    assert all(f["input_ids"].shape[0] <= 2 for f in feeds["text_encoder"]) and len(feeds["text_encoder"]) >= 3
    checks = polygraphy_tensor_checks(_runners(pkg), feeds, "fp32")
    outputs = {c.output.split(" [")[0] for c in checks}
    assert {f"text_encoder:{t.name}" for t in pkg.graph("text_encoder").outputs} <= outputs
    assert "interaction:scores" in outputs and all(c.passed for c in checks), [c.line() for c in checks]
    assert all(c.metric == "polygraphy max abs" and c.value <= 1e-6 for c in checks)

    monkeypatch.setitem(BACKENDS, "noisy", NoisyBackend)
    noisy = polygraphy_tensor_checks(_runners(pkg, "noisy"), feeds, "fp32")
    assert any(not c.passed for c in noisy)
    reported = polygraphy_tensor_checks(_runners(pkg, "noisy"), feeds, "fp16")
    assert all(c.passed for c in reported) and all("not gated" in c.metric for c in reported)


def test_engine_parity_adds_polygraphy_checks_under_the_task_metrics(demo_dir, demo_model):
    pytest.importorskip("polygraphy")
    _, model = demo_model
    result = compare_engines(demo_dir, model, "fp32", backend="onnxruntime")
    metrics = {c.metric for c in result.checks}
    assert "max_abs" in metrics and "polygraphy max abs" in metrics and result.ok, "\n".join(result.lines())
