"""Benchmark of exact HBI scoring (``hbi_runtime.scoring``): one query against a large stored collection.

One 10-word query (12 valid tokens incl. SOT/EOT, padded to L=24) against ``--videos`` videos (ViT-B/32 size:
D=512, T=12 frames, entity level; random L2-normalised tokens, 10% of the videos padded), for each storage dtype
(float32, float16, int8). For each: median latency over ``--repeats`` runs (the dtypes take turns so that load
from other processes hits them alike), GFLOP/s (``2 * valid tokens * N * T * D``), and the roofline bound
``min(matmul peak, memory bandwidth x arithmetic intensity)`` where the intensity is FLOPs per byte the
scorer streams per video (tokens + weights, + scales for int8). Measured in the same run:

* matmul peak: numpy sgemm 2048^2 in a *subprocess* with ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` unset
  (they slow numpy's OpenBLAS), ONNX Runtime ``MatMul`` 2048^2 (fp32 peak = the best of both) and ORT
  ``MatMulIntegerToFloat`` u8 x s8 2048^2 (the int8 peak, used for the int8 bound);
* memory bandwidth: numpy ``sum`` over a 1.6 GB float32 array (a read stream, as scoring is), best of a few.

Also: index bytes per video per format, the scores' deviation and top-10 agreement of float16 / int8 storage vs
float32, a chunk-size sweep (through ``memory_limit_mb``), and the numpy fallback backend on float32.

Usage::

    python benchmarks/bench_scoring.py [--videos 100000] [--repeats 9] [--threads 2] \\
        [--out benchmarks/results/scoring.json]

Needs numpy, onnx, onnxruntime (not torch). Peak memory is about 5 GB at 100,000 videos.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from hbi_runtime.bench.peak import best_seconds, memory_bandwidth, numpy_sgemm_peak, ort_matmul_peak
from hbi_runtime.scoring import STORAGE_DTYPES, StoreLevel, quantize_int8, score_level, topk
from hbi_runtime.scoring.engine import Queries, chunk_videos
from hbi_runtime.scoring.score import resolve_backend
from hbi_runtime.sides import SideLevel

DEFAULT_OUT = Path("benchmarks/results/scoring.json")
T, D, L_TEXT, VALID = 12, 512, 24, 12
def ort_session(nodes: list, inputs: list, inits: list, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "peak", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_u8s8_peak(threads: int, n: int = 2048) -> float:
    """ONNX Runtime ``MatMulIntegerToFloat`` u8 x s8 (n x n) in GOP/s: the int8 peak of the int8 bound."""
    rng = np.random.default_rng(0)
    vi = helper.make_tensor_value_info
    i8 = ort_session([helper.make_node("MatMulIntegerToFloat", ["A", "B", "one", "one", "zp"], ["Y"],
                                       domain="com.microsoft")],
                     [vi("A", TensorProto.UINT8, [n, n]), vi("B", TensorProto.INT8, [n, n])],
                     [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
                      helper.make_tensor("zp", TensorProto.UINT8, [], [128])], threads)
    au = rng.integers(0, 256, (n, n), dtype=np.uint8)
    bs = rng.integers(-127, 128, (n, n), dtype=np.int8)
    return 2 * n ** 3 / best_seconds(lambda: i8.run(None, {"A": au, "B": bs}), 10) / 1e9


def make_levels(n: int, seed: int = 0, block: int = 10_000) -> dict[str, StoreLevel]:
    """Random L2-normalised video tokens in every storage dtype, generated block by block."""
    rng = np.random.default_rng(seed)
    tokens = np.empty((n, T, D), dtype=np.float32)
    mask = np.ones((n, T), dtype=bool)
    padded = rng.random(n) < 0.1
    mask[padded] = np.arange(T)[None, :] < rng.integers(4, T, padded.sum())[:, None]
    for start in range(0, n, block):
        stop = min(start + block, n)
        x = rng.standard_normal((stop - start, T, D), dtype=np.float32)
        x /= np.linalg.norm(x, axis=-1, keepdims=True)
        x *= mask[start:stop, :, None]
        tokens[start:stop] = x
    logits = np.where(mask, rng.standard_normal((n, T)), -np.inf)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    levels = {"float32": StoreLevel("float32", tokens, weights, mask),
              "float16": StoreLevel("float16", tokens.astype(np.float16), weights, mask)}
    codes = np.empty((n, T, D), dtype=np.uint8)
    scales = np.empty((n, T), dtype=np.float32)
    for start in range(0, n, block):
        codes[start:start + block], scales[start:start + block] = quantize_int8(tokens[start:start + block])
    levels["int8"] = StoreLevel("int8", codes, weights, mask, scales)
    return levels


def make_query(seed: int = 1) -> SideLevel:
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((1, L_TEXT, D)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
    mask = np.arange(L_TEXT)[None, :] < VALID
    weights = np.where(mask, rng.random((1, L_TEXT)), 0).astype(np.float32)
    weights /= weights.sum()
    return SideLevel(tokens, weights, mask)


def streamed_bytes(level: StoreLevel) -> int:
    """Bytes per video the scorer reads: tokens and weights, + scales for int8 (the mask is never read)."""
    return sum(a[:1].nbytes for k, a in level.arrays().items() if k != "mask")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit-mb", type=float, default=256)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    load_start = os.getloadavg()

    print("measuring matmul peak and memory bandwidth ...", flush=True)
    peak_np = numpy_sgemm_peak()  # the machine's default BLAS threads, as numpy runs
    peaks = {"ort_fp32_gflops": ort_matmul_peak(args.threads)["gflops"], "ort_u8s8_gops": ort_u8s8_peak(args.threads)}
    bw = memory_bandwidth(1.6)
    fp32_peak = max(peak_np["gflops"], peaks["ort_fp32_gflops"])
    print(f"  numpy sgemm 2048^2 {peak_np['gflops']:.0f} GFLOP/s, ORT MatMul {peaks['ort_fp32_gflops']:.0f}, "
          f"ORT u8s8 {peaks['ort_u8s8_gops']:.0f} GOP/s; read bandwidth {bw['read_gbps']:.1f} GB/s, "
          f"copy {bw['copy_gbps']:.1f} GB/s", flush=True)

    print(f"generating {args.videos} videos x {T} frames x {D} ...", flush=True)
    levels = make_levels(args.videos)
    query = make_query()
    flops = 2.0 * VALID * args.videos * T * D
    # (name, storage dtype, scoring backend): "auto" is what retrieve uses (int8: the native VNNI kernel where it
    # runs); int8 through ONNX Runtime is measured alongside for comparison.
    variants = [(dt, dt, "auto") for dt in STORAGE_DTYPES] + [("int8/ort", "int8", "ort")]
    run = {name: (lambda dt=dt, be=be: score_level(query, levels[dt], threads=args.threads, backend=be,
                                                   memory_limit_mb=args.memory_limit_mb))
           for name, dt, be in variants}
    results = {name: run[name]() for name in run}  # warm-up, and the scores for the accuracy columns
    times: dict[str, list[float]] = {name: [] for name in run}
    for _ in range(args.repeats):
        for name in run:  # the variants take turns, so that load from other processes hits them alike
            start = time.perf_counter()
            run[name]()
            times[name].append(time.perf_counter() - start)

    ref_top = set(topk(results["float32"], 10)[0][0].tolist())
    rows = []
    for name, dt, backend in variants:
        median = statistics.median(times[name])
        per_video = streamed_bytes(levels[dt])
        intensity = flops / (per_video * args.videos)
        peak = peaks["ort_u8s8_gops"] if dt == "int8" else fp32_peak
        bound = min(peak, bw["read_gbps"] * intensity)
        achieved = flops / median / 1e9
        queries = Queries.from_level(query)
        rows.append({
            "dtype": name, "storage": dt, "backend": resolve_backend(backend, dt), "median_ms": 1e3 * median,
            "min_ms": 1e3 * min(times[name]), "gflops": achieved,
            "streamed_bytes_per_video": per_video,
            "index_bytes_per_video": sum(a[:1].nbytes for a in levels[dt].arrays().values()),
            "intensity_flop_per_byte": intensity, "peak_used_gflops": peak, "bound_gflops": bound,
            "bound_kind": "compute" if peak <= bw["read_gbps"] * intensity else "memory",
            "fraction_of_bound": achieved / bound, "videos_per_s": args.videos / median,
            "chunk_videos": chunk_videos(levels[dt], queries, args.memory_limit_mb),
            "max_abs_diff_vs_fp32": float(np.abs(results[name] - results["float32"]).max()),
            "top10_overlap_vs_fp32": len(ref_top & set(topk(results[name], 10)[0][0].tolist())) / 10,
        })

    sweep = []
    for limit in (4, 16, 64, 256, 1024):
        for dt in STORAGE_DTYPES:
            fn = lambda dt=dt, limit=limit: score_level(query, levels[dt], threads=args.threads,  # noqa: E731
                                                        memory_limit_mb=limit)
            sweep.append({"dtype": dt, "memory_limit_mb": limit,
                          "chunk_videos": chunk_videos(levels[dt], Queries.from_level(query), limit),
                          "best_ms": 1e3 * best_seconds(fn, 3)})
    numpy_fp32 = 1e3 * best_seconds(lambda: score_level(query, levels["float32"], backend="numpy",
                                                     memory_limit_mb=args.memory_limit_mb), 2)

    print(f"\n1 query ({VALID} valid tokens) x {args.videos} videos x T={T} x D={D}, entity level, "
          f"{args.threads} ORT threads; bound = min(peak, {bw['read_gbps']:.1f} GB/s x intensity)")
    header = (f"{'dtype':8} {'scorer':>6} {'median ms':>9} {'GFLOP/s':>8} {'B/video':>8} {'FLOP/B':>7} {'bound':>7} {'kind':>7} "
              f"{'of bound':>8} {'max|d| vs fp32':>14} {'top10':>6}")
    print(header)
    for r in rows:
        print(f"{r['dtype']:8} {r['backend']:>6} {r['median_ms']:9.1f} {r['gflops']:8.1f} {r['index_bytes_per_video']:8d} "
              f"{r['intensity_flop_per_byte']:7.2f} {r['bound_gflops']:7.1f} {r['bound_kind']:>7} "
              f"{r['fraction_of_bound']:8.0%} {r['max_abs_diff_vs_fp32']:14.2e} {r['top10_overlap_vs_fp32']:6.0%}")
    print("\nchunk sweep (best of 3, ms): " + "; ".join(
        f"{s['dtype']} {s['memory_limit_mb']}MB/{s['chunk_videos']}v {s['best_ms']:.0f}" for s in sweep))
    print(f"numpy backend, float32: {numpy_fp32:.0f} ms (best of 2)")
    load_end = os.getloadavg()
    print(f"load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f} (2 cores; other processes share them)")

    report = {"schema": "hbi.bench_scoring/1", "python": platform.python_version(), "numpy": np.__version__,
              "onnxruntime": ort.__version__, "onnx": onnx.__version__, "cpu_count": os.cpu_count(),
              "threads": args.threads, "videos": args.videos, "frames": T, "dim": D, "query_valid_tokens": VALID,
              "query_length": L_TEXT, "repeats": args.repeats, "memory_limit_mb": args.memory_limit_mb,
              "flops_per_query": flops, "numpy_sgemm_peak": peak_np, **peaks, "fp32_peak_gflops": fp32_peak,
              "bandwidth": bw, "rows": rows, "chunk_sweep": sweep, "numpy_backend_fp32_ms": numpy_fp32,
              "load_average_start": load_start, "load_average_end": load_end, "times_s": times}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
