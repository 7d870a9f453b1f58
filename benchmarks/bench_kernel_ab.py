"""The native int8 scoring kernel of this checkout against the one of an earlier revision, alternating in one run.

    python benchmarks/bench_kernel_ab.py --baseline-rev 5b0f72c [--videos 100000] [--queries 1] [--repeats 9] \
        [--frames 12 --dim 512]

Compiles ``hbi_runtime/scoring/_vnni.c`` of ``--baseline-rev`` (``git show``; needs git and a C compiler) into a
temporary library, then scores the same random int8 store (``bench_scoring.make_levels``) with both kernels through
:class:`~hbi_runtime.scoring.native.NativeLevelKernel` (``--threads`` threads, the AVX-512 path), the two taking
turns ``--repeats`` times, each turn after a fresh read-bandwidth measurement on the kernel's threads (the
streaming bound of ``bench_scoring``). Prints the median wall and process-CPU milliseconds of each, each median as
a fraction of the median bound (and per CPU-second: against the read stream's bytes per CPU-second of its threads),
and the largest score difference between them. On a shared machine the CPU time
is the steadier figure; both runs see the same load.
The baseline's ``hbi_score_u8s8`` may lack the last (path) argument of the current one: it is called without it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np

from hbi_runtime.scoring.engine import Queries
from hbi_runtime.scoring.native import NativeLevelKernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scoring import make_levels, make_query, streamed_bytes  # noqa: E402

_P = ctypes.c_void_p
_ARGS = [_P, _P, _P, ctypes.c_int64, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P, _P, ctypes.c_int, ctypes.c_int, _P,
         ctypes.c_int64]


def build_baseline(rev: str, folder: Path) -> ctypes.CDLL:
    source = subprocess.run(["git", "show", f"{rev}:hbi_runtime/scoring/_vnni.c"], check=True, capture_output=True,
                            text=True).stdout
    c_file, lib_file = folder / "baseline_vnni.c", folder / "baseline_vnni.so"
    c_file.write_text(source)
    subprocess.run([os.environ.get("CC", "cc"), "-O3", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
                    str(c_file), "-o", str(lib_file)], check=True)
    lib = ctypes.CDLL(str(lib_file))
    takes_path = "int path" in source.split("HBI_EXPORT int hbi_score_u8s8", 1)[1].split(")", 1)[0]
    lib.hbi_score_u8s8.argtypes = _ARGS + ([ctypes.c_int] if takes_path else [])
    lib.takes_path = takes_path
    return lib


class _Baseline:
    """The library object NativeLevelKernel calls, with the baseline's signature."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib

    def hbi_score_u8s8(self, *args):
        return self._lib.hbi_score_u8s8(*(args if self._lib.takes_path else args[:-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-rev", required=True)
    parser.add_argument("--videos", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=12, help="frames per video (the demo model: 8)")
    parser.add_argument("--dim", type=int, default=512, help="token dimension (the demo model: 64)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        baseline = NativeLevelKernel(args.threads, "avx512")
        baseline._lib = _Baseline(build_baseline(args.baseline_rev, Path(tmp)))
        kernels = {args.baseline_rev: baseline, "this checkout": NativeLevelKernel(args.threads, "avx512")}
        level = make_levels(args.videos, frames=args.frames, dim=args.dim)["int8"]
        queries = Queries.from_level(make_query(1, args.queries, dim=args.dim))
        outs = {name: np.zeros((args.queries, level.n), dtype=np.float32) for name in kernels}
        wall: dict[str, list[float]] = {name: [] for name in kernels}
        cpu: dict[str, list[float]] = {name: [] for name in kernels}
        for name, kernel in kernels.items():  # warm-up
            kernel.run(queries, level, 4096, outs[name])
        bandwidth, cpu_bandwidth = [], []
        for _ in range(args.repeats):
            # the honest streaming bound of this turn: a read stream on the kernel's own threads (bench_scoring's)
            read = kernels["this checkout"].read_bandwidth(1.6, 1)
            bandwidth.append(read["read_gbps"])
            cpu_bandwidth.append(read["per_cpu_second_gbps"])
            for name, kernel in kernels.items():
                w, c = time.perf_counter(), time.process_time()
                kernel.run(queries, level, 4096, outs[name])
                wall[name].append(time.perf_counter() - w)
                cpu[name].append(time.process_time() - c)
    print(f"{args.queries} queries x {args.videos} videos x T={args.frames} x D={args.dim}, {args.threads} threads, "
          f"{args.repeats} turns each, "
          f"load average {os.getloadavg()[0]:.2f}")
    read_gbps = statistics.median(bandwidth)
    bound_s = streamed_bytes(level) * level.n / (read_gbps * 1e9)
    print(f"  streaming bound: {streamed_bytes(level)} B per video at {read_gbps:.1f} GB/s (median of the turns' read "
          f"streams, {min(bandwidth):.1f}-{max(bandwidth):.1f}) = {1e3 * bound_s:.1f} ms")
    # the same per CPU-second of the process (the read stream's bytes per CPU-second of its threads): robust to time
    # slicing on a shared machine, not to memory contention
    cpu_bound_s = streamed_bytes(level) * level.n / (statistics.median(cpu_bandwidth) * 1e9)
    for name in kernels:
        print(f"  {name:>14}: wall median {1e3 * statistics.median(wall[name]):8.1f} ms (min "
              f"{1e3 * min(wall[name]):.1f}) = {bound_s / statistics.median(wall[name]):.0%} of the bound, CPU median "
              f"{1e3 * statistics.median(cpu[name]):8.1f} ms = {cpu_bound_s / statistics.median(cpu[name]):.0%} of the "
              f"bound per CPU-second")
    a, b = outs.values()
    print(f"  largest score difference {float(np.abs(a - b).max()):.2e}, {int((a != b).sum())} of {a.size} scores differ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
