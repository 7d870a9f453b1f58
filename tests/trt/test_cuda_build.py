"""The CUDA kernels compile (nvcc), and their C entry point behaves on the host side: version, workspace size,
argument checks, empty batches, and a clean error (no crash) when a launch cannot run. The kernels' numbers are
checked on a GPU only (benchmarks/gpu_kernels.py, and the gpu-marked test at the end). The plugin libraries against
TensorRT headers: tests/trt/test_plugin_harness.py; TokenMerge on adversarial inputs: test_token_merge_kernel_cpu.py."""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hbi_export.trt as trt_pkg

PLUGINS = Path(trt_pkg.__file__).resolve().parent / "plugins"
ROOT = PLUGINS.parents[2]
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA kernels were NOT compiled")
CUDA_ERROR_INVALID_VALUE = 1


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> ctypes.CDLL:
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernels were NOT compiled")
    out = tmp_path_factory.mktemp("cuda") / "libhbi_kernels.so"
    cmd = [NVCC, "-O1", "-std=c++17", "-arch=sm_80", "-shared", "-Xcompiler", "-fPIC", "-Werror", "all-warnings",
           "-o", str(out), str(PLUGINS / "wti_kernel.cu"), str(PLUGINS / "token_merge_kernel.cu")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return _benchmark_module().load_library(out)  # the same ctypes signatures the GPU check uses


def _wti(lib, dtype=0, bt=2, bv=3, lt=4, lv=5, d=8):
    return lib.hbi_wti_forward(dtype, *([None] * 7), bt, bv, lt, lv, d, None)


def _merge(lib, dtype=0, b=2, n=6, c=8, clusters=3, k=3, workspace=None):
    return lib.hbi_token_merge_forward(dtype, None, None, None, None, workspace, b, n, c, clusters, k, None)


@pytest.mark.slow
@needs_nvcc
def test_entry_point_version_and_workspace(kernels):
    assert kernels.hbi_kernels_version() == b"1"
    # per sample: N*N + 3N floats (distances, |x|^2, density, centre score) and 2N ints (centres, assignment)
    assert kernels.hbi_token_merge_workspace_size(3, 10) == 3 * ((100 + 30) * 4 + 20 * 4)
    assert kernels.hbi_token_merge_workspace_size(0, 10) == 0


@pytest.mark.slow
@needs_nvcc
def test_arguments_outside_the_contract_are_refused_before_any_launch(kernels):
    for bad in ({"dtype": 7}, {"lt": 0}, {"lv": 0}, {"d": 0}, {"bt": -1}, {"lt": 200, "lv": 61}, {"bt": 70000}):
        assert _wti(kernels, **bad) == CUDA_ERROR_INVALID_VALUE, bad
    for bad in ({"clusters": 0}, {"clusters": 7}, {"k": 0}, {"k": 17}, {"n": 0}, {"c": 0}):
        assert _merge(kernels, workspace=1, **bad) == CUDA_ERROR_INVALID_VALUE, bad
    assert _merge(kernels, workspace=None) == CUDA_ERROR_INVALID_VALUE  # B > 0 needs a workspace
    assert _merge(kernels, dtype=5, workspace=1) == CUDA_ERROR_INVALID_VALUE


@pytest.mark.slow
@needs_nvcc
def test_empty_batches_do_nothing_and_succeed(kernels):
    assert _wti(kernels, bt=0) == 0 and _wti(kernels, bv=0) == 0
    assert _merge(kernels, b=0) == 0


@pytest.mark.slow
@needs_nvcc
def test_a_launch_without_a_gpu_returns_a_cuda_error(kernels):
    if shutil.which("nvidia-smi") is not None:
        pytest.skip("a GPU driver is present: this test is about machines without one")
    assert _wti(kernels) not in (0, CUDA_ERROR_INVALID_VALUE)  # e.g. 35 insufficient driver / 100 no device
    assert _merge(kernels, workspace=1) not in (0, CUDA_ERROR_INVALID_VALUE)


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("hbi_gpu_kernels_bench", ROOT / "benchmarks" / "gpu_kernels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_imports_without_cuda_and_its_fixtures_fit_the_contract():
    bench = _benchmark_module()
    for case in bench.CHECK_MERGE:
        x, score, mask = bench.merge_inputs(case, 0)
        assert (mask.sum(axis=1) >= case.clusters).all()  # the model never merges into more centres than tokens
        assert (score[mask == 0] == -1e4).all()
    for case in bench.CHECK_WTI:
        tt, tw, tm, vt, vw, vm = bench.wti_inputs(case, 0)
        np.testing.assert_allclose(np.linalg.norm(tt, axis=-1), 1, atol=1e-5)
        np.testing.assert_allclose(tw.sum(axis=1), 1, atol=1e-5)
        assert (tw[tm == 0] == 0).all() and (vw[vm == 0] == 0).all()


@pytest.mark.gpu
def test_kernels_match_the_numpy_reference_on_a_gpu(tmp_path):
    bench = _benchmark_module()
    code = bench.main(["--repeats", "3", "--out", str(tmp_path / "gpu_kernels.json")])
    assert code == 0, (tmp_path / "gpu_kernels.json").read_text() if code == 5 else code
