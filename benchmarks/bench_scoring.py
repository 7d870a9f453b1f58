"""Benchmark of exact HBI scoring (``hbi_runtime.scoring``): one query against a large stored collection.

One 10-word query (12 valid tokens incl. SOT/EOT, padded to L=24) against ``--videos`` videos (by default ViT-B/32
size: D=512, T=12 frames, entity level; ``--frames 8 --dim 64`` is the demo model's entity level; random L2-normalised tokens, 10% of the videos padded), for each storage dtype
(float32, float16, int8). For each: median latency over ``--repeats`` runs (the dtypes take turns so that load
from other processes hits them alike), GFLOP/s (``2 * valid tokens * N * T * D``), and the roofline bound
``min(matmul peak, memory bandwidth x arithmetic intensity)`` where the intensity is FLOPs per byte the
scorer streams per video (tokens + weights, + scales for int8). The bounds are measured in the same run and the
way the scorer runs (``--threads`` threads, the native kernel's own thread pool):

* int8 peak: the machine's, not a library's: a loop of independent register-to-register ``vpdpbusd`` (AVX-512
  VNNI) on every thread at once (``NativeLevelKernel.vnni_peak``), and of AMX ``tdpbusd`` where the CPU has AMX
  (reported, no goal). ONNX Runtime's ``MatMulIntegerToFloat`` u8 x s8 2048^2 rate is reported alongside;
* fp32 peak: numpy sgemm 2048^2 in a *subprocess* with ``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` unset
  (they slow numpy's OpenBLAS) and ONNX Runtime ``MatMul`` 2048^2, the best of both;
* memory bandwidth: a read stream over a 1.6 GB array in 8 MB chunks handed to the kernel's threads
  (``NativeLevelKernel.read_bandwidth``: 64-byte loads, as the kernel streams the store), best of a few. The
  one-thread numpy ``sum`` of earlier versions is reported too (``numpy_sum_read_gbps``); it understated the
  bandwidth two threads get, and so overstated the fraction of the bound.

A second table: ``--batch-queries`` queries at once against ``--batch-videos`` videos (int8, the native kernel):
compute-bound, as a fraction of the measured VNNI int8 peak (and of the AMX peak where present).

A third table, robust to sharing the machine: the kernel's rate per CPU-second of one thread on about 1 MB of
videos (160 at 12 x 512, in this core's L2 cache) for 1, 4, 8 and 32 queries, against the ``vpdpbusd`` loop per CPU-second: the efficiency
of the kernel itself (one call per chunk, as ``run`` makes them; the query's preparation, once per ``run``, is
left out), with memory out of the picture.

On a machine shared with other processes every figure is a median over ``--repeats`` runs in which the variants
(and a fresh bandwidth measurement per repeat) take turns; the load average at start and end is printed.

Also: index bytes per video per format, the scores' deviation and top-10 agreement of float16 / int8 storage vs
float32, a chunk-size sweep (through ``memory_limit_mb``), and the numpy fallback backend on float32.

Usage::

    python benchmarks/bench_scoring.py [--videos 100000] [--repeats 9] [--threads 2] \\
        [--out benchmarks/results/scoring.json]

Needs numpy, onnx, onnxruntime (not torch) and the native int8 kernel (x86-64, AVX-512 VNNI) for the int8 peak
and the bandwidth (without it: numpy ``sum`` on one thread, and the ORT u8 x s8 rate, both flagged in the output).
Peak memory is about 5 GB at 100,000 videos.
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
from hbi_runtime.scoring.native import NativeLevelKernel, available_paths, native_available
from hbi_runtime.scoring.score import resolve_backend
from hbi_runtime.sides import SideLevel

DEFAULT_OUT = Path("benchmarks/results/scoring.json")
T, D, L_TEXT, VALID = 12, 512, 24, 12
DEFAULT_FRAMES, DEFAULT_DIM = T, D
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


def make_levels(n: int, seed: int = 0, block: int = 10_000, frames: int = T, dim: int = D) -> dict[str, StoreLevel]:
    """Random L2-normalised video tokens (``frames`` x ``dim`` per video) in every storage dtype, generated block by
    block."""
    T, D = frames, dim  # noqa: N806 (the module's names for the shape)
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


def make_query(seed: int = 1, n: int = 1, dim: int = D) -> SideLevel:
    """``n`` queries of ``VALID`` valid tokens each (padded to ``L_TEXT``)."""
    D = dim  # noqa: N806
    rng = np.random.default_rng(seed)
    tokens = rng.standard_normal((n, L_TEXT, D)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
    mask = np.repeat(np.arange(L_TEXT)[None, :] < VALID, n, axis=0)
    weights = np.where(mask, rng.random((n, L_TEXT)), 0).astype(np.float32)
    weights /= weights.sum(axis=1, keepdims=True)
    return SideLevel(tokens, weights, mask)


def machine_bounds(threads: int) -> dict:
    """int8 peaks (VNNI loop, AMX loop where present) and read bandwidth, measured on ``threads`` threads of the
    native kernel; without the kernel, numpy ``sum`` on one thread and no VNNI peak (``"honest": False``)."""
    if not native_available():
        return {"honest": False, "read_gbps": memory_bandwidth(1.6)["read_gbps"], "vnni_gops": None,
                "amx_gops": None, "threads": 1, "cpu_read_gbps": None, "cpu_vnni_gops": None, "cpu_amx_gops": None}
    kernel = NativeLevelKernel(threads, "avx512")
    amx, vnni, read = kernel.amx_peak(), kernel.vnni_peak(), kernel.read_bandwidth(1.6)
    return {"honest": True, "read_gbps": read["read_gbps"], "vnni_gops": vnni["gops"],
            "amx_gops": None if amx is None else amx["gops"], "threads": threads,
            "cpu_read_gbps": read["per_cpu_second_gbps"], "cpu_vnni_gops": vnni["per_cpu_second_gops"],
            "cpu_amx_gops": None if amx is None else amx["per_cpu_second_gops"]}


def streamed_bytes(level: StoreLevel) -> int:
    """Bytes per video the scorer reads: tokens and weights, + scales for int8 (the mask is never read)."""
    return sum(a[:1].nbytes for k, a in level.arrays().items() if k != "mask")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit-mb", type=float, default=256)
    parser.add_argument("--batch-queries", type=int, default=32)
    parser.add_argument("--batch-videos", type=int, default=10_000)
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                        help="frames per video (T; the demo model: 8)")
    parser.add_argument("--dim", type=int, default=DEFAULT_DIM, help="token dimension (D; the demo model: 64)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    T, D = args.frames, args.dim  # noqa: N806
    load_start = os.getloadavg()

    print("measuring matmul peaks and memory bandwidth ...", flush=True)
    peak_np = numpy_sgemm_peak()  # the machine's default BLAS threads, as numpy runs
    peaks = {"ort_fp32_gflops": ort_matmul_peak(args.threads)["gflops"], "ort_u8s8_gops": ort_u8s8_peak(args.threads)}
    np_bw = memory_bandwidth(1.6)  # one thread: reported for comparison only
    fp32_peak = max(peak_np["gflops"], peaks["ort_fp32_gflops"])
    print(f"  numpy sgemm 2048^2 {peak_np['gflops']:.0f} GFLOP/s, ORT MatMul {peaks['ort_fp32_gflops']:.0f}, "
          f"ORT u8s8 {peaks['ort_u8s8_gops']:.0f} GOP/s; numpy sum (1 thread) {np_bw['read_gbps']:.1f} GB/s",
          flush=True)

    print(f"generating {args.videos} videos x {T} frames x {D} ...", flush=True)
    levels = make_levels(args.videos, frames=T, dim=D)
    query = make_query(dim=D)
    flops = 2.0 * VALID * args.videos * T * D
    # (name, storage dtype, scoring backend): "auto" is what retrieve uses (int8: the native VNNI kernel where it
    # runs); int8 through ONNX Runtime is measured alongside for comparison.
    variants = [(dt, dt, "auto") for dt in STORAGE_DTYPES] + [("int8/ort", "int8", "ort")]
    run = {name: (lambda dt=dt, be=be: score_level(query, levels[dt], threads=args.threads, backend=be,
                                                   memory_limit_mb=args.memory_limit_mb))
           for name, dt, be in variants}
    results = {name: run[name]() for name in run}  # warm-up, and the scores for the accuracy columns
    batch_level = StoreLevel("int8", *(a[:args.batch_videos] for a in (levels["int8"].tokens, levels["int8"].weights,
                                                                        levels["int8"].mask, levels["int8"].scales)))
    batch_query = make_query(2, args.batch_queries, dim=D)
    batch_paths = [p for p in ("avx512", "amx") if p in available_paths()]
    batch_queries = Queries.from_level(batch_query)
    batch_out = np.zeros((args.batch_queries, batch_level.n), dtype=np.float32)
    for path in batch_paths:  # one kernel (and thread pool) per path, as retrieve keeps one
        run[f"batch/{path}"] = (lambda k=NativeLevelKernel(args.threads, path): k.run(batch_queries, batch_level,
                                                                                      4096, batch_out))
        run[f"batch/{path}"]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in run}
    cpu_times: dict[str, list[float]] = {name: [] for name in run}  # process CPU seconds (all threads)
    bounds_runs = []
    for _ in range(args.repeats):
        bounds_runs.append(machine_bounds(args.threads))  # the bounds take turns with the variants too
        for name in run:  # the variants take turns, so that load from other processes hits them alike
            start, cpu = time.perf_counter(), time.process_time()
            run[name]()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu)
    med = lambda key: (statistics.median([b[key] for b in bounds_runs])  # noqa: E731
                       if bounds_runs[0][key] is not None else None)
    bw = {"read_gbps": med("read_gbps"), "threads": bounds_runs[0]["threads"], "honest": bounds_runs[0]["honest"],
          "numpy_sum_read_gbps": np_bw["read_gbps"], "copy_gbps": np_bw["copy_gbps"],
          "runs_read_gbps": [b["read_gbps"] for b in bounds_runs]}
    int8_peak = {"vnni_gops": med("vnni_gops"), "amx_gops": med("amx_gops"),
                 "runs_vnni_gops": [b["vnni_gops"] for b in bounds_runs],
                 "per_cpu_second_vnni_gops": med("cpu_vnni_gops"), "per_cpu_second_amx_gops": med("cpu_amx_gops")}
    bw["per_cpu_second_read_gbps"] = med("cpu_read_gbps")
    print(f"  bounds (median of {args.repeats}, {bw['threads']} threads): read {bw['read_gbps']:.1f} GB/s, VNNI int8 "
          f"peak {int8_peak['vnni_gops'] or float('nan'):.0f} GOP/s"
          + (f", AMX {int8_peak['amx_gops']:.0f} GOP/s" if int8_peak["amx_gops"] else ", no AMX"), flush=True)

    ref_top = set(topk(results["float32"], 10)[0][0].tolist())
    rows = []
    int8_bound_peak = int8_peak["vnni_gops"] or peaks["ort_u8s8_gops"]
    for name, dt, backend in variants:
        median = statistics.median(times[name])
        per_video = streamed_bytes(levels[dt])
        intensity = flops / (per_video * args.videos)
        peak = int8_bound_peak if dt == "int8" else fp32_peak
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
            "median_cpu_s": statistics.median(cpu_times[name]),
            # the same per CPU-second of the process (robust to time slicing on a shared machine): the rate while
            # the threads run, against the bound's rates measured the same way
            "per_cpu_second_fraction_of_bound": (
                flops / statistics.median(cpu_times[name]) / 1e9
                / min(int8_peak["per_cpu_second_vnni_gops"] if dt == "int8" else fp32_peak,
                      bw["per_cpu_second_read_gbps"] * intensity)) if bw["per_cpu_second_read_gbps"] else None,
            "chunk_videos": chunk_videos(levels[dt], queries, args.memory_limit_mb),
            "max_abs_diff_vs_fp32": float(np.abs(results[name] - results["float32"]).max()),
            "top10_overlap_vs_fp32": len(ref_top & set(topk(results[name], 10)[0][0].tolist())) / 10,
        })

    batch_rows = []
    batch_ops = 2.0 * args.batch_queries * VALID * batch_level.n * T * D
    for path in batch_paths:
        median = statistics.median(times[f"batch/{path}"])
        gops = batch_ops / median / 1e9
        cpu_gops = batch_ops / statistics.median(cpu_times[f"batch/{path}"]) / 1e9
        cpu_peak = int8_peak["per_cpu_second_vnni_gops"]
        batch_rows.append({"path": path, "queries": args.batch_queries, "videos": batch_level.n,
                           "median_ms": 1e3 * median, "gops": gops,
                           "per_cpu_second_gops": cpu_gops,
                           "per_cpu_second_fraction_of_vnni_peak": cpu_gops / cpu_peak if cpu_peak else None,
                           "fraction_of_vnni_peak": gops / int8_peak["vnni_gops"],
                           "fraction_of_amx_peak": gops / int8_peak["amx_gops"] if int8_peak["amx_gops"] else None})

    in_cache = []
    if native_available():
        n_small = max(160, (1 << 20) // (T * D))  # about 1 MB: in L2, and enough videos to hide the call's overhead
        small = StoreLevel("int8", *(a[:n_small] for a in (levels["int8"].tokens, levels["int8"].weights,
                                                            levels["int8"].mask, levels["int8"].scales)))
        one = NativeLevelKernel(1, "avx512")
        loop = statistics.median(one.vnni_peak(0.2, 3)["per_cpu_second_gops"] for _ in range(3))
        for n_queries in (1, 4, 8, 32):
            prepared = one.prepare(Queries.from_level(make_query(3, n_queries, dim=D)))
            target = np.zeros((n_queries, small.n), dtype=np.float32)
            one.score_range(prepared, small, 0, small.n, target)  # warm-up
            cpu = []
            calls = max(1, 64 // n_queries)
            for _ in range(args.repeats):  # this thread's CPU time (the kernel runs in it)
                start = time.thread_time()
                for _ in range(calls):
                    one.score_range(prepared, small, 0, small.n, target)
                cpu.append((time.thread_time() - start) / calls)
            gops = 2.0 * n_queries * VALID * small.n * T * D / statistics.median(cpu) / 1e9
            in_cache.append({"queries": n_queries, "videos": small.n, "per_cpu_second_gops": gops,
                             "loop_per_cpu_second_gops": loop, "fraction_of_loop": gops / loop,
                             "us_per_video": 1e6 * statistics.median(cpu) / small.n})

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
          f"{args.threads} threads; bound = min(peak, {bw['read_gbps']:.1f} GB/s x intensity); int8 peak "
          f"{int8_bound_peak:.0f} GOP/s ({'VNNI loop' if int8_peak['vnni_gops'] else 'ORT u8s8: no native kernel'})")
    header = (f"{'dtype':8} {'scorer':>6} {'median ms':>9} {'GFLOP/s':>8} {'B/video':>8} {'FLOP/B':>7} {'bound':>7} {'kind':>7} "
              f"{'of bound':>8} {'per CPU-s':>9} {'max|d| vs fp32':>14} {'top10':>6}")
    print(header)
    for r in rows:
        print(f"{r['dtype']:8} {r['backend']:>6} {r['median_ms']:9.1f} {r['gflops']:8.1f} {r['index_bytes_per_video']:8d} "
              f"{r['intensity_flop_per_byte']:7.2f} {r['bound_gflops']:7.1f} {r['bound_kind']:>7} "
              f"{r['fraction_of_bound']:8.0%} {r['per_cpu_second_fraction_of_bound'] or float('nan'):9.0%} "
              f"{r['max_abs_diff_vs_fp32']:14.2e} {r['top10_overlap_vs_fp32']:6.0%}")
    for r in batch_rows:
        amx = f", {r['fraction_of_amx_peak']:.0%} of the AMX peak" if r["fraction_of_amx_peak"] else ""
        print(f"{r['queries']} queries x {r['videos']} videos, int8, native {r['path']}: {r['median_ms']:.1f} ms, "
              f"{r['gops']:.0f} GOP/s = {r['fraction_of_vnni_peak']:.0%} of the VNNI int8 peak{amx}; per CPU-second "
              f"{r['per_cpu_second_gops']:.0f} GOP/s = {r['per_cpu_second_fraction_of_vnni_peak'] or float('nan'):.0%} "
              f"of the loop's")
    for r in in_cache:
        print(f"in cache, 1 thread, {r['queries']:2d} queries x {r['videos']} videos: {r['us_per_video']:.3f} CPU-us "
              f"per video, {r['per_cpu_second_gops']:.0f} GOP/s per CPU-second = {r['fraction_of_loop']:.0%} of the "
              f"vpdpbusd loop's {r['loop_per_cpu_second_gops']:.0f}")
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
              "int8_peak": int8_peak, "bandwidth": bw, "rows": rows, "batch_rows": batch_rows, "in_cache": in_cache, "chunk_sweep": sweep, "numpy_backend_fp32_ms": numpy_fp32,
              "load_average_start": load_start, "load_average_end": load_end, "times_s": times,
              "cpu_times_s": cpu_times, "bounds_runs": bounds_runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
