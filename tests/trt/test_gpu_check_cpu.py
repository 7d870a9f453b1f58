"""benchmarks/gpu_check.py on a machine without a GPU: what can be checked before the GPU run.

The script imports without CUDA; the comparison of the harness' enqueue dump (the format hbi_plugin_harness.cpp
writes: cases.json + raw .bin files) accepts the reference's own numbers and rejects wrong ones; stages whose inputs
are missing say "not run" with the reason instead of passing; the report is valid JSON after every stage. What the
GPU run itself finds is not known here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hbi_runtime.ops.kernels import token_merge, weighted_token_interaction

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("hbi_gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _write_case(dump: Path, name: str, op: str, dtype, inputs, output, clusters: int = 0) -> dict:
    files = []
    for i, a in enumerate(inputs):
        files.append(f"{name}.in{i}.bin")
        a.astype(dtype).tofile(dump / files[-1])
    output.astype(dtype).tofile(dump / f"{name}.out.bin")
    return {"name": name, "op": op, "dtype": np.dtype(dtype).name, "clusters": clusters, "k": 3, "inputs": files,
            "output": f"{name}.out.bin", "shapes": [list(a.shape) for a in (*inputs, output)], "enqueue_status": 0}


@np.errstate(over="ignore")  # the adversarial 1e20 tokens become inf in fp16, as on the GPU
def _dump(tmp_path: Path, gpu_check, perturb: float = 0.0) -> Path:
    bench = gpu_check._bench()
    rng = np.random.default_rng(0)
    wti = [rng.standard_normal((3, 7, 16)).astype(np.float32) * 0.2, rng.random((3, 7)).astype(np.float32),
           np.ones((3, 7), np.float32), rng.standard_normal((5, 4, 16)).astype(np.float32) * 0.2,
           rng.random((5, 4)).astype(np.float32), np.ones((5, 4), np.float32)]
    merge = bench.merge_inputs(bench.MergeCase("m", 4, 12, 32, 4), 1)
    adversarial = bench.adversarial_merge_inputs("huge_token", 4, 12, 32, 12, seed=2)
    cases = []
    for dtype in (np.float32, np.float16):
        rounded = [[a.astype(dtype).astype(np.float32) for a in group] for group in (wti, merge, adversarial)]
        suffix = np.dtype(dtype).name
        cases.append(_write_case(tmp_path, f"wti_{suffix}", "WeightedTokenInteraction", dtype, wti,
                                 weighted_token_interaction(*rounded[0]) + perturb))
        cases.append(_write_case(tmp_path, f"merge_{suffix}", "TokenMerge", dtype, merge,
                                 token_merge(*rounded[1], clusters=4, k=3), clusters=4))
        emulated = bench.emulate_token_merge(*rounded[2], clusters=12, k=3).merged
        cases.append(_write_case(tmp_path, f"merge_adversarial_{suffix}", "TokenMerge", dtype, adversarial, emulated,
                                 clusters=12))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    return tmp_path


def test_the_harness_dump_comparison_accepts_the_reference_and_rejects_a_wrong_output(gpu_check, tmp_path):
    for folder in ("good", "bad"):
        (tmp_path / folder).mkdir()
    good = gpu_check.compare_harness_dump(_dump(tmp_path / "good", gpu_check))
    assert len(good) == 6 and all(row["passed"] for row in good), good
    bad = gpu_check.compare_harness_dump(_dump(tmp_path / "bad", gpu_check, perturb=0.05))
    assert [row["case"] for row in bad if not row["passed"]] == ["wti_float32", "wti_float16"]


def test_stages_without_their_inputs_say_not_run(gpu_check, tmp_path):
    report = gpu_check.Report(tmp_path / "report.json", budget_s=60)
    report.context.update(build={}, compute_sanitizer=None)
    args = SimpleNamespace(work=tmp_path, trt_include=None, cuda_arch=None)
    for stage in (gpu_check.stage_harness(report, args), gpu_check.stage_sanitizer(report, args, "memcheck"),
                  gpu_check.stage_cuda_backend(report, args), gpu_check.stage_kernels(report, args, "checks")):
        assert stage.status == "not run" and stage.reason.startswith("not run: "), stage
        report.add(stage)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["summary"] == {"passed": 0, "failed": 0, "not run": 4}
    assert any("TensorRT parse / build" in line for line in data["unverified"])


def test_tensorrt_headers_are_found_in_the_documented_order(gpu_check, tmp_path, monkeypatch):
    for version in ("10.3", "10.16", "11.1"):
        (tmp_path / version / "include").mkdir(parents=True)
        (tmp_path / version / "include" / "NvInferRuntime.h").write_text("")
    monkeypatch.delenv("HBI_TRT_INCLUDE", raising=False)
    monkeypatch.setenv("HBI_TRT_HEADERS_ROOT", str(tmp_path))
    assert gpu_check.find_trt_include(None) == tmp_path / "11.1" / "include"  # the newest
    monkeypatch.setenv("HBI_TRT_INCLUDE", str(tmp_path / "10.3" / "include"))
    assert gpu_check.find_trt_include(None) == tmp_path / "10.3" / "include"
    assert gpu_check.find_trt_include(str(tmp_path / "10.16" / "include")) == tmp_path / "10.16" / "include"
    assert gpu_check.find_trt_include(str(tmp_path)) is None  # a folder without the headers is not taken
