"""The physical limits a benchmark is compared against, measured in the same run: fp32 GEMM peak and memory
bandwidth.

* :func:`numpy_sgemm_peak`: numpy ``A @ B`` (n x n float32) in a **subprocess** whose environment lacks
  ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE``: on the reference machine these variables are set machine-wide and
  halve OpenBLAS' sgemm (about 211 vs 444 GFLOP/s); unsetting them for this measurement only leaves the
  benchmark's own process as the user runs it. The thread count is passed through ``OPENBLAS_NUM_THREADS`` /
  ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS``.
* :func:`ort_matmul_peak`: ONNX Runtime's ``MatMul`` on the same shape, ``intra_op_num_threads`` threads (the
  kernel our graphs actually run; needs ``onnx`` to build the one-node graph).
* :func:`gemm_peak`: both, and ``peak_gflops`` = the best of them: the fp32 bound of "fraction of peak" figures.
* :func:`memory_bandwidth`: a read stream (``numpy.sum``) and a copy over an array far larger than the caches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable

import numpy as np

from hbi_runtime.errors import MissingDependencyError

UNSET_FOR_PEAK = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
_SGEMM_SCRIPT = r"""
import json, sys, time
import numpy as np
n, repeats = int(sys.argv[1]), int(sys.argv[2])
a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
b = a.T.copy()
a @ b
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - t0)
best = min(times)
print(json.dumps({"gflops": 2 * n ** 3 / best / 1e9, "best_s": best}))
"""


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def numpy_sgemm_peak(threads: int | None = None, n: int = 2048, repeats: int = 10) -> dict:
    """numpy float32 GEMM rate in a clean subprocess (see the module docstring): ``{"gflops", "best_s",
    "unset", "threads"}``. ``unset`` lists the variables that were set here and removed for the child."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET_FOR_PEAK}
    if threads is not None:
        env.update({k: str(threads) for k in THREAD_VARS})
    done = subprocess.run([sys.executable, "-c", _SGEMM_SCRIPT, str(n), str(repeats)], env=env,
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(n=n, threads=threads, unset=[k for k in UNSET_FOR_PEAK if k in os.environ])
    return result


def ort_matmul_peak(threads: int | None = None, n: int = 2048, repeats: int = 10) -> dict:
    """ONNX Runtime CPU ``MatMul`` (n x n float32) rate: ``{"gflops", "best_s", "threads"}``.

    Raises:
        MissingDependencyError: onnx or onnxruntime is not installed.
    """
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError as exc:
        raise MissingDependencyError(f"the ONNX Runtime GEMM peak needs onnx and onnxruntime ({exc})",
                                     hint="pip install 'hbi-toolkit[runtime]'") from exc
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["Y"])], "gemm_peak",
                              [vi("A", TensorProto.FLOAT, [n, n]), vi("B", TensorProto.FLOAT, [n, n])],
                              [vi("Y", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    best = best_seconds(lambda: session.run(None, {"A": a, "B": a}), repeats)
    return {"gflops": 2 * n ** 3 / best / 1e9, "best_s": best, "n": n, "threads": threads}


def gemm_peak(threads: int | None = None, n: int = 2048, repeats: int = 10) -> dict:
    """``{"numpy": ..., "onnxruntime": ..., "peak_gflops": best of both}`` (fp32, CPU)."""
    numpy_part = numpy_sgemm_peak(threads, n, repeats)
    ort_part = ort_matmul_peak(threads, n, repeats)
    return {"numpy": numpy_part, "onnxruntime": ort_part,
            "peak_gflops": max(numpy_part["gflops"], ort_part["gflops"])}


def memory_bandwidth(gigabytes: float = 1.0, repeats: int = 4) -> dict:
    """Read (``sum``) and copy bandwidth in GB/s over a float32 array of ``gigabytes`` (copy counts both ways)."""
    x = np.ones(int(gigabytes * 1e9) // 4, dtype=np.float32)
    read = best_seconds(x.sum, repeats)
    y = np.empty_like(x)
    copy = best_seconds(lambda: np.copyto(y, x), max(1, repeats - 1))
    return {"array_gb": x.nbytes / 1e9, "read_gbps": x.nbytes / read / 1e9, "copy_gbps": 2 * x.nbytes / copy / 1e9}
