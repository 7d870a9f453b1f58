"""Benchmark of the hbi custom ops on CPU: ONNX Runtime with the standard-op functions vs ONNX Runtime with the
numpy kernels (onnxruntime-extensions PyOps) vs the plain numpy kernel call.

Each case is a one-node graph (``hbi.WeightedTokenInteraction`` or ``hbi.TokenMerge``) carrying the production
decomposition (``hbi_export.onnx.functions.attach_functions``), run three ways on the same random inputs:

* ``function``: ``onnxruntime.InferenceSession`` on the model as exported (ORT inlines the function);
* ``kernel``: the model rewritten by ``hbi_runtime.ops.ort.prepare_model_for_kernels``, run with the kernels
  registered (``session_options_with_kernels``);
* ``numpy``: ``hbi_runtime.ops.kernels`` called directly (what the kernel path costs without ORT's PyOp bridge).

Reports the median and minimum of ``--repeats`` timed runs after warm-up (the three paths take turns,
so that load from other processes hits them alike), and the largest absolute difference
of the kernel / numpy outputs from the function output. ORT uses ``--threads`` intra-op threads; numpy's BLAS
uses ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS``, which this script sets to 2 unless they are set already.

Usage::

    python benchmarks/bench_custom_ops.py [--out benchmarks/results/custom_ops.json] [--repeats 15] [--threads 2]

Needs onnx, onnxscript, onnxruntime and onnxruntime-extensions (not torch).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads its BLAS
    os.environ.setdefault(_var, "2")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

from hbi_export.onnx.functions import attach_functions  # noqa: E402
from hbi_runtime.ops import kernels  # noqa: E402
from hbi_runtime.ops.ort import prepare_model_for_kernels, session_options_with_kernels  # noqa: E402

DEFAULT_OUT = Path("benchmarks/results/custom_ops.json")
PLUGIN = {"plugin_namespace": "hbi", "plugin_version": "1"}
ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
WTI_CASES = [  # (Bt, Bv, Lt, Lv, D, dtype)
    (1, 1000, 24, 12, 512, "float32"),
    (32, 1000, 24, 12, 512, "float32"),
    (32, 1000, 24, 12, 512, "float16"),
]
MERGE_CASES = [  # (B, N, C, clusters, dtype); clusters = ceil(N * ratio), ratios 0.25 / 0.5 as in HBIConfig
    (128, 24, 512, 6, "float32"),
    (128, 12, 512, 6, "float32"),
    (128, 64, 512, 16, "float32"),
    (128, 24, 512, 6, "float16"),
]
PATHS = ("function", "kernel", "numpy")


@dataclass
class Case:
    op: str
    shape: dict
    dtype: str
    ms_median: dict = field(default_factory=dict)
    ms_min: dict = field(default_factory=dict)
    max_abs_diff_vs_function: dict = field(default_factory=dict)
    fastest: str = ""


def one_node_model(op_type: str, inputs: dict[str, tuple], output: tuple[str, tuple], dtype: np.dtype,
                   **attrs) -> bytes:
    """A graph with a single ``hbi`` node and the production decomposition attached."""
    elem = ONNX_TYPE[np.dtype(dtype)]
    node = helper.make_node(op_type, list(inputs), [output[0]], domain="hbi", **attrs, **PLUGIN)
    graph = helper.make_graph([node], op_type, [helper.make_tensor_value_info(n, elem, s) for n, s in inputs.items()],
                              [helper.make_tensor_value_info(output[0], elem, output[1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    return attach_functions(model).SerializeToString()


def wti_inputs(rng: np.random.Generator, bt: int, bv: int, lt: int, lv: int, d: int, dtype) -> dict:
    """Normalised tokens, softmaxed weights, texts padded to random lengths, videos all valid except a few."""
    def side(n, length, min_valid):
        tokens = rng.standard_normal((n, length, d)).astype(np.float32)
        tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
        mask = np.arange(length)[None, :] < rng.integers(min_valid, length + 1, n)[:, None]  # (n, L)
        logits = np.where(mask, rng.standard_normal((n, length)), -np.inf)
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        return tokens.astype(dtype), weights.astype(dtype), mask.astype(dtype)

    (tt, tw, tm), (vt, vw, vm) = side(bt, lt, 1), side(bv, lv, lv - 2)
    return {"text_tokens": tt, "text_weights": tw, "text_mask": tm,
            "video_tokens": vt, "video_weights": vw, "video_mask": vm}


def merge_inputs(rng: np.random.Generator, b: int, n: int, c: int, dtype) -> dict:
    x = rng.standard_normal((b, n, c)).astype(np.float32)
    x = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)  # LayerNorm-like, as the CTM feeds it
    # at least 3 valid tokens: with exactly 2, the two densities tie in exact arithmetic and the matmul-form
    # distances break the tie by rounding noise, differently in each implementation (see hbi_runtime.ops)
    mask = np.arange(n)[None, :] < rng.integers(min(3, n), n + 1, b)[:, None]  # (B, N)
    score = np.where(mask, rng.standard_normal((b, n)), -1e4)
    return {"x": x.astype(dtype), "score": score.astype(dtype), "mask": mask.astype(dtype)}


def wti_model(lt: int, lv: int, d: int, dtype) -> bytes:
    t, v = ("text_batch", lt), ("video_batch", lv)
    inputs = {"text_tokens": (*t, d), "text_weights": t, "text_mask": t,
              "video_tokens": (*v, d), "video_weights": v, "video_mask": v}
    return one_node_model("WeightedTokenInteraction", inputs, ("scores", ("text_batch", "video_batch")), dtype)


def merge_model(n: int, c: int, clusters: int, dtype) -> bytes:
    inputs = {"x": ("batch", n, c), "score": ("batch", n), "mask": ("batch", n)}
    return one_node_model("TokenMerge", inputs, ("merged", ("batch", clusters, c)), dtype, clusters=clusters, k=3)


def session(model: bytes, path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if path == "kernel":
        model = prepare_model_for_kernels(model)
        session_options_with_kernels(so)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def timed(fns: dict[str, Callable[[], np.ndarray]], repeats: int, warmup: int = 2) -> tuple[dict, dict]:
    """Times of each callable, interleaved (one call of each per round), so load from other processes hits all
    paths alike. Returns ({name: [ms, ...]}, {name: last output})."""
    outputs = {name: fn() for _ in range(warmup) for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times, outputs


def run_case(case: Case, model: bytes, feeds: dict, numpy_call: Callable[[], np.ndarray], repeats: int,
             threads: int) -> Case:
    sessions = {path: session(model, path, threads) for path in ("function", "kernel")}
    fns = {path: (lambda s: lambda: s.run(None, feeds)[0])(sess) for path, sess in sessions.items()}
    times, outputs = timed({**fns, "numpy": numpy_call}, repeats)
    for path in PATHS:
        case.ms_median[path] = round(statistics.median(times[path]), 3)
        case.ms_min[path] = round(min(times[path]), 3)
    ref = outputs["function"].astype(np.float32)
    for path in ("kernel", "numpy"):
        case.max_abs_diff_vs_function[path] = float(np.abs(outputs[path].astype(np.float32) - ref).max())
    case.fastest = min(("function", "kernel"), key=lambda p: case.ms_median[p])
    return case


def run_all(repeats: int, threads: int, seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = []
    for bt, bv, lt, lv, d, dtype in WTI_CASES:
        feeds = wti_inputs(rng, bt, bv, lt, lv, d, dtype)
        case = Case("WeightedTokenInteraction", {"Bt": bt, "Bv": bv, "Lt": lt, "Lv": lv, "D": d}, dtype)
        cases.append(run_case(case, wti_model(lt, lv, d, dtype), feeds,
                              lambda f=feeds: kernels.weighted_token_interaction(*f.values()), repeats, threads))
        print_row(cases[-1])
    for b, n, c, clusters, dtype in MERGE_CASES:
        feeds = merge_inputs(rng, b, n, c, dtype)
        case = Case("TokenMerge", {"B": b, "N": n, "C": c, "clusters": clusters}, dtype)
        cases.append(run_case(case, merge_model(n, c, clusters, dtype), feeds,
                              lambda f=feeds, k=clusters: kernels.token_merge(*f.values(), k, 3), repeats, threads))
        print_row(cases[-1])
    return cases


def default_paths(cases: list[Case]) -> dict[str, str]:
    """Per op, ``"kernel"`` only if the kernel path is faster in *every* case of that op, else ``"function"``.

    The kernel path costs an extra dependency (onnxruntime-extensions) and an exception inside a PyOp aborts the
    process, so it has to win everywhere to be the default.
    """
    return {op: "kernel" if all(c.fastest == "kernel" for c in cases if c.op == op) else "function"
            for op in sorted({c.op for c in cases})}


HEADER = f"{'op':<26}{'shape':<34}{'dtype':<9}" + "".join(f"{p + ' ms':>13}" for p in PATHS) + \
    f"{'max|k-f|':>11}{'fastest':>10}"


def print_row(case: Case) -> None:
    shape = ",".join(f"{k}={v}" for k, v in case.shape.items())
    print(f"{case.op:<26}{shape:<34}{case.dtype:<9}" + "".join(f"{case.ms_median[p]:>13.2f}" for p in PATHS)
          + f"{case.max_abs_diff_vs_function['kernel']:>11.1e}{case.fastest:>10}", flush=True)


def environment(threads: int, repeats: int) -> dict:
    import onnxruntime_extensions

    return {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "numpy": np.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "onnxruntime_extensions": onnxruntime_extensions.__version__, "ort_intra_op_threads": threads,
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "repeats": repeats}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per path (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default: %(default)s)")
    args = parser.parse_args(argv)
    print(HEADER)
    cases = run_all(args.repeats, args.threads)
    result = {"environment": environment(args.threads, args.repeats), "cases": [asdict(c) for c in cases],
              "default_path": default_paths(cases)}
    print("default path per op (kernel only where it wins every case):", result["default_path"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
