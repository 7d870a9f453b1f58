"""The hbi custom ops (domain ``hbi`` v1, docs/custom_ops.md) on CPU: numpy kernels and their ONNX Runtime hookup.

* :mod:`hbi_runtime.ops.kernels`: ``weighted_token_interaction`` and ``token_merge`` in numpy (float32
  accumulation, fp16 in -> fp16 out); torch-free.
* :mod:`hbi_runtime.ops.ort`: rewrite an exported model so that ONNX Runtime runs those kernels (as
  onnxruntime-extensions PyOps) instead of the graph's standard-op functions.

Which path ONNX Runtime should take, per op (:data:`DEFAULT_PATH`)
------------------------------------------------------------------
``"function"`` for both ops: the graph's model-local functions, inlined by ONNX Runtime, no extra dependency.
Measured with ``python benchmarks/bench_custom_ops.py --repeats 21`` (2-core AMD EPYC VM, shared with other jobs,
ORT 1.32.0, onnxruntime-extensions 0.15.2, numpy 2.4 / OpenBLAS; ORT intra-op threads = BLAS threads = 2; median
ms of 21 interleaved runs; two runs, the spread shows the load from other processes)::

    op / shape                                       function    kernel     numpy (direct call, no ORT)
    WTI  Bt=1,  Bv=1000, Lt=24, Lv=12, D=512  fp32   24 - 35     40 - 53    40 - 48
    WTI  Bt=32, Bv=1000, Lt=24, Lv=12, D=512  fp32   248 - 264   213 - 230  194 - 197
    WTI  Bt=32, Bv=1000, Lt=24, Lv=12, D=512  fp16   131 - 161   145 - 170  115 - 126
    TokenMerge B=128, N=24, C=512, clusters=6   fp32   2.7 - 4.3   28 - 41    3.9 - 6.1
    TokenMerge B=128, N=12, C=512, clusters=6   fp32   1.2 - 1.9   23 - 39    1.7 - 2.8
    TokenMerge B=128, N=64, C=512, clusters=16  fp32   13 - 16     77 - 132   17 - 22
    TokenMerge B=128, N=24, C=512, clusters=6   fp16   4.6 - 17    28 - 85    8.3 - 19

* TokenMerge: the function path is 6-20x faster than the kernel path, and even faster than the bare numpy
  call. The kernel path is dominated by the PyOp bridge, which copies the inputs into Python and returns the
  output as a Python list (``tolist``, ~80 ns per element: 20-60 ms here).
* WeightedTokenInteraction: the function path wins the retrieval case (one text against many videos, ~1.6x);
  the kernel path wins only large text batches (~10-20% at Bt=32, fp32) and loses in fp16. For batch scoring
  outside a graph, ``hbi_runtime.sides.score`` (the same numpy code, no bridge) is the faster choice anyway.
* Besides speed: an exception raised inside a PyOp terminates the process (onnxruntime-extensions 0.15.2), and
  the kernel path needs onnxruntime-extensions. The kernel path remains available for parity checks.
"""

from __future__ import annotations

from hbi_runtime.ops.kernels import token_merge, weighted_token_interaction

PATHS = ("function", "kernel")
DEFAULT_PATH: dict[str, str] = {"WeightedTokenInteraction": "function", "TokenMerge": "function"}

__all__ = ["DEFAULT_PATH", "PATHS", "token_merge", "weighted_token_interaction"]
