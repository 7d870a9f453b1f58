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
