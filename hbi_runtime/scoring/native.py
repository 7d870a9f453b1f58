"""The native int8 scoring kernels (``_vnni.c``: AVX-512 VNNI, and AMX where the CPU has it), used through ctypes.

On int8 storage, ONNX Runtime's ``MatMulIntegerToFloat`` with one query (``Bt * L`` of about 12 columns) reaches
a fifth of the u8 x s8 peak: its kernels are blocked for wide right-hand sides, and every chunk's codes are
re-packed. ``_vnni.c`` reads the stored ``(videos * T, D)`` codes as they lie. One query of up to 16 rows (retrieve)
has two paths of its own (videos of T <= 8 frames and D <= 64 transposed in registers, other shapes by tiles with
the score kept in registers; both prefetch the stream); up to 48 query rows it multiplies tiles of 4 frames x 4
query rows as stored; above, it packs the *query* into the VNNI-interleaved layout (16 query rows per 64-byte
vector), so each product instruction finishes dot products of one frame with 16 query rows without any reduction
across lanes, 4 frames x 96 query rows per pass (GEMM-style blocking); see the C file's header for why and the
measurements. It fuses every reduction of the level score (max over frames, max over each query's rows, both
weighted sums), so only the scores leave the kernel. Same arithmetic as the ORT graph (exact int32 products, then
the query and video scales), so the two agree to float rounding.

Paths (:data:`PATHS`), chosen at run time: ``amx`` (Intel AMX tiles, ``tdpbusd``; Linux asks the kernel for the
tile state with ``arch_prctl(ARCH_REQ_XCOMP_PERM)`` on first use; needs ``T <= 16`` and ``D % 64 == 0``, else the
AVX-512 path runs) and ``avx512`` (AVX-512 VNNI). ``auto`` takes AMX where it runs. ``HBI_SCORING_ISA=avx512``
in the environment forces the AVX-512 path (``amx`` demands AMX) for the whole process.

Available when the extension was built (x86-64 with a C compiler at install time) and the CPU has AVX-512 VNNI;
otherwise :func:`native_available` is False and scoring uses ONNX Runtime. The call releases the GIL
(ctypes); :class:`NativeLevelKernel` hands chunks of videos to its threads, one call per chunk.

Also here: the loops the benchmarks measure the machine's bounds with (``NativeLevelKernel.vnni_peak``,
``amx_peak``, ``read_bandwidth``), run on the kernel's own thread pool so that the bound is measured the way it
runs.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np

from hbi_runtime.errors import MissingDependencyError, UsageError
from hbi_runtime.scoring.store import INT8_ZERO_POINT, StoreLevel, quantize_int8, signed_codes

_MODULE = "hbi_runtime.scoring._vnni"
_P = ctypes.c_void_p
_ERRORS = {1: "this CPU lacks the instructions of that path", 2: "bad sizes", 3: "out of memory",
           4: "the operating system refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)",
           5: "the AMX path needs T <= 16 frames and D % 64 == 0"}
PATHS = ("auto", "avx512", "amx")
_PATH_CODE = {"avx512": 1, "amx": 2}
ISA_ENV = "HBI_SCORING_ISA"
# Least bytes of stored codes per call: the kernel keeps no per-video intermediates, so the memory limit's chunk
# does not bind it, while each call from Python costs about 15 us (4096 videos of the demo's 8 x 64 are 2 MB, and
# that overhead was 7 % of the one-query scan).
CALL_BYTES = 8 << 20


def extension_library(module: str) -> Any | None:
    """The shared library of an optional C extension ``module`` (built by the install, used through ctypes), or
    None where it was not built or cannot be loaded."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        return ctypes.CDLL(spec.origin)
    except OSError:
        return None


@lru_cache(maxsize=1)
def _library() -> Any | None:
    """The loaded kernel library, or None (not built here, or the CPU lacks AVX-512 VNNI)."""
    lib = extension_library(_MODULE)
    if lib is None:
        return None
    lib.hbi_vnni_supported.restype = ctypes.c_int
    lib.hbi_score_u8s8.restype = ctypes.c_int
    lib.hbi_score_u8s8.argtypes = [_P, _P, _P, ctypes.c_int64, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P, _P,
                                   ctypes.c_int, ctypes.c_int, _P, ctypes.c_int64, ctypes.c_int]
    lib.hbi_paths_supported.restype = ctypes.c_int
    lib.hbi_amx_status.restype = ctypes.c_int
    for name in ("hbi_vnni_loop", "hbi_amx_loop"):
        getattr(lib, name).restype = ctypes.c_int64
        getattr(lib, name).argtypes = [ctypes.c_int64]
    lib.hbi_read_stream.restype = ctypes.c_int64
    lib.hbi_read_stream.argtypes = [_P, ctypes.c_int64]
    return lib if lib.hbi_vnni_supported() == 1 else None


def amx_status() -> str:
    """``"ok"``, ``"no-cpu"`` (no AMX-TILE / AMX-INT8, or the kernel is not built) or ``"refused"`` (the OS
    refused the tile state). The first call asks Linux for the permission."""
    lib = _library()
    if lib is None:
        return "no-cpu"
    return {1: "ok", -1: "no-cpu", -2: "refused"}.get(lib.hbi_amx_status(), "no-cpu")


def available_paths() -> tuple[str, ...]:
    """The kernel paths this machine runs, best first (``()`` without the native kernel)."""
    lib = _library()
    if lib is None:
        return ()
    bits = lib.hbi_paths_supported()
    return tuple(name for name, code in (("amx", 2), ("avx512", 1)) if bits & code)


def resolve_path(path: str = "auto") -> str:
    """The path a kernel with ``path`` runs: ``auto`` -> the environment's ``HBI_SCORING_ISA`` if set, else AMX
    where it runs, else AVX-512.

    Raises:
        UsageError: an unknown path.
        MissingDependencyError: the path does not run here (says why).
    """
    if path == "auto":
        path = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    if path not in PATHS:
        raise UsageError(f"scoring kernel path must be one of {PATHS}, got {path!r}",
                         hint=f"unset {ISA_ENV} or set it to avx512 or amx")
    paths = available_paths()
    if not paths:
        raise MissingDependencyError("the native int8 scoring kernel is not available here (not built, or the CPU "
                                     "lacks AVX-512 VNNI)", hint="use backend='ort' or 'auto'")
    if path == "auto":
        return paths[0]
    if path not in paths:
        why = {"no-cpu": "this CPU lacks AMX-TILE / AMX-INT8",
               "refused": "the operating system refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)"}
        raise MissingDependencyError(f"the {path} scoring path does not run here: {why.get(amx_status(), '?')}",
                                     hint=f"use path 'avx512' or 'auto' (environment: {ISA_ENV})")
    return path


def native_available() -> bool:
    """True when the int8 kernel is built and this CPU runs it."""
    return _library() is not None


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


class NativeLevelKernel:
    """int8 level scores with the native kernel; same contract as ``OrtLevelKernel.run``."""

    def __init__(self, threads: int, path: str = "auto") -> None:
        self.path = resolve_path(path)  # raises when the native kernel (or the path asked for) does not run here
        self._lib = _library()
        self.threads = max(1, int(threads))
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def _map(self, fn: Any, parts: list) -> list:
        return list(self._pool.map(fn, parts)) if self._pool else [fn(p) for p in parts]

    def run(self, queries: Any, level: StoreLevel, chunk: int, out: np.ndarray) -> None:
        """Write the ``(Bt, N)`` level scores into ``out`` (float32), ``chunk`` videos per step."""
        prepared = self.prepare(queries)
        parts = self.parts(level, chunk)
        codes_rc = self._map(lambda p: self.score_range(prepared, level, p[0], p[1], out), parts)
        bad = [rc for rc in codes_rc if rc != 0]
        if bad:
            raise MissingDependencyError(f"the native scoring kernel failed: {_ERRORS.get(bad[0], bad[0])}",
                                         hint="use backend='ort'")

    def parts(self, level: StoreLevel, chunk: int) -> list[tuple[int, int]]:
        """The ``(start, stop)`` video ranges of one :meth:`run`, in order. They go to the threads as each becomes
        free (no barrier per chunk: on a shared machine one late thread would stall the other at every chunk): at
        least ``CALL_BYTES`` of codes each (``chunk`` if larger), at most a quarter of each thread's share, and
        shrinking to a quarter of ``CALL_BYTES`` over the last ``2 * threads`` of them (guided), so that the threads
        finish together."""
        video_bytes = max(1, level.length * level.dim)
        big = max(1, min(max(chunk, CALL_BYTES // video_bytes), -(-level.n // (4 * self.threads))))
        least = max(1, min(big, CALL_BYTES // 4 // video_bytes))
        out, start = [], 0
        while start < level.n:
            size = max(least, min(big, (level.n - start) // (2 * self.threads)))
            out.append((start, min(start + size, level.n)))
            start += size
        return out

    @staticmethod
    def prepare(queries: Any) -> dict[str, Any]:
        """The query operands of the kernel (int8 codes, offsets, scales, weights, floors), computed once per run."""
        codes, q_scales = quantize_int8(queries.tokens)  # (BtL, D) u8 with zero point 128, (BtL,)
        q = np.ascontiguousarray(signed_codes(codes))  # (BtL, D)
        return {"q": q, "offset": (INT8_ZERO_POINT * q.astype(np.int32).sum(axis=1)).astype(np.int32),
                "scales": np.ascontiguousarray(q_scales, dtype=np.float32),
                "weights": np.ascontiguousarray(queries.weights, dtype=np.float32).reshape(-1),  # (Bt * L,)
                "floor": np.ascontiguousarray(queries.floor, dtype=np.float32), "length": queries.length}

    def score_range(self, prepared: dict[str, Any], level: StoreLevel, start: int, stop: int,
                    out: np.ndarray) -> int:
        """One call of the kernel on the videos ``start:stop`` (on this thread): their scores go straight into
        ``out[:, start:stop]``. Returns the kernel's code (0: done; see ``_ERRORS``)."""
        if level.dtype != "int8":
            raise MissingDependencyError(f"the native scoring kernel reads int8 stores, not {level.dtype}",
                                         hint="use backend='ort' or 'auto'")
        if not (out.flags.c_contiguous and out.dtype == np.float32):
            raise MissingDependencyError("the native scoring kernel writes into a C-contiguous float32 array",
                                         hint="use backend='ort'")
        t, d = level.length, level.dim
        path = self.path
        if path == "amx" and (t > 16 or d % 64):  # the AMX path's shapes; the AVX-512 path takes any
            path = "avx512"
        video = np.ascontiguousarray(level.tokens[start:stop])  # (c, T, D) u8; a memory map stays a view
        scales = np.ascontiguousarray(level.scales[start:stop], dtype=np.float32)  # (c, T)
        weights = np.ascontiguousarray(level.weights[start:stop], dtype=np.float32)  # (c, T)
        q = prepared["q"]
        return self._lib.hbi_score_u8s8(_ptr(video), _ptr(scales), _ptr(weights), stop - start, t, d, _ptr(q),
                                        _ptr(prepared["offset"]), _ptr(prepared["scales"]),
                                        _ptr(prepared["weights"]), _ptr(prepared["floor"]), q.shape[0],
                                        prepared["length"], _ptr(out) + 4 * start, out.shape[1], _PATH_CODE[path])

    def vnni_peak(self, seconds: float = 0.3, repeats: int = 5) -> dict:
        """The u8 x s8 peak of this CPU's vpdpbusd (register operands, 24 independent chains), all threads at once:
        ``{"gops", "per_thread_gops", "threads"}`` (an op = a multiply or an add; 128 per instruction)."""
        return self._peak(self._lib.hbi_vnni_loop, 24 * 64 * 2, seconds, repeats)

    def amx_peak(self, seconds: float = 0.3, repeats: int = 5) -> dict | None:
        """The same with AMX ``tdpbusd`` (16 x 16 x 64 products each); None where AMX does not run."""
        if amx_status() != "ok":
            return None
        return self._peak(self._lib.hbi_amx_loop, 4 * 16 * 16 * 64 * 2, seconds, repeats)

    def _peak(self, loop: Any, ops_per_iter: int, seconds: float, repeats: int) -> dict:
        iters = 1000
        while True:  # calibrate: iterations that take about `seconds` on one thread
            start = time.perf_counter()
            loop(iters)
            took = time.perf_counter() - start
            if took > seconds / 4:
                break
            iters *= 4
        iters = max(1, int(iters * seconds / took))
        best = best_cpu = float("inf")
        for _ in range(repeats):
            start, cpu = time.perf_counter(), time.process_time()
            self._map(loop, [iters] * self.threads)
            best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - cpu)
        ops = self.threads * iters * ops_per_iter
        gops = ops / best / 1e9
        # per CPU-second of the threads: what a thread does while it runs, unaffected by time slicing on a
        # shared machine (the process's CPU time: all threads)
        return {"gops": gops, "per_thread_gops": gops / self.threads, "threads": self.threads, "best_s": best,
                "per_cpu_second_gops": ops / best_cpu / 1e9}

    def read_bandwidth(self, gigabytes: float = 1.6, repeats: int = 5) -> dict:
        """Read bandwidth of a stream over a ``gigabytes`` array far larger than the caches, in chunks handed to
        this kernel's threads as :meth:`run` hands out videos: ``{"read_gbps", "threads", "array_gb"}``."""
        n = int(gigabytes * 1e9) // 256 * 256
        data = np.ones(n, dtype=np.uint8)
        chunk = 8 << 20  # 8 MB per call, as a chunk of 1,300 videos
        parts = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
        base = _ptr(data)
        read = self._lib.hbi_read_stream
        best = best_cpu = float("inf")
        for _ in range(repeats + 1):
            start, cpu = time.perf_counter(), time.process_time()
            self._map(lambda p: read(base + p[0], p[1] - p[0]), parts)
            best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - cpu)
        return {"read_gbps": n / best / 1e9, "threads": self.threads, "array_gb": n / 1e9, "best_s": best,
                "per_cpu_second_gbps": n / best_cpu / 1e9}
