"""The native int8 scoring kernel (``_vnni.c``, AVX-512 VNNI), used through ctypes.

On int8 storage, ONNX Runtime's ``MatMulIntegerToFloat`` with one query (``Bt * L`` of about 12 columns) reaches
a fifth of the u8 x s8 peak: its kernels are blocked for wide right-hand sides, and every chunk's codes are
re-packed. ``_vnni.c`` reads the stored ``(videos * T, D)`` codes as they lie, four frames against four query
rows per step, and fuses every reduction of the level score (max over frames, max over each query's rows, both
weighted sums), so only the scores leave the kernel. Same arithmetic as the ORT graph (exact int32 products, then
the query and video scales), so the two agree to float rounding.

Available when the extension was built (x86-64 with a C compiler at install time) and the CPU has AVX-512 VNNI;
otherwise :func:`native_available` is False and scoring uses ONNX Runtime. The call releases the GIL
(ctypes); :class:`NativeLevelKernel` hands chunks of videos to its threads, one call per chunk.
"""

from __future__ import annotations

import ctypes
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

import numpy as np

from hbi_runtime.errors import MissingDependencyError
from hbi_runtime.scoring.store import INT8_ZERO_POINT, StoreLevel, quantize_int8, signed_codes

_MODULE = "hbi_runtime.scoring._vnni"
_P = ctypes.c_void_p
_ERRORS = {1: "this CPU lacks AVX-512 VNNI", 2: "bad sizes", 3: "out of memory"}


@lru_cache(maxsize=1)
def _library() -> Any | None:
    """The loaded kernel library, or None (not built here, or the CPU lacks AVX-512 VNNI)."""
    try:
        spec = importlib.util.find_spec(_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    lib.hbi_vnni_supported.restype = ctypes.c_int
    lib.hbi_score_u8s8.restype = ctypes.c_int
    lib.hbi_score_u8s8.argtypes = [_P, _P, _P, ctypes.c_int64, ctypes.c_int, ctypes.c_int, _P, _P, _P, _P, _P,
                                   ctypes.c_int, ctypes.c_int, _P, ctypes.c_int64]
    return lib if lib.hbi_vnni_supported() == 1 else None


def native_available() -> bool:
    """True when the int8 kernel is built and this CPU runs it."""
    return _library() is not None


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


class NativeLevelKernel:
    """int8 level scores with the native kernel; same contract as ``OrtLevelKernel.run``."""

    def __init__(self, threads: int) -> None:
        lib = _library()
        if lib is None:
            raise MissingDependencyError("the native int8 scoring kernel is not available here (not built, or "
                                         "the CPU lacks AVX-512 VNNI)", hint="use backend='ort' or 'auto'")
        self._lib = lib
        self.threads = max(1, int(threads))
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def run(self, queries: Any, level: StoreLevel, chunk: int, out: np.ndarray) -> None:
        """Write the ``(Bt, N)`` level scores into ``out`` (float32), ``chunk`` videos per step."""
        if level.dtype != "int8":
            raise MissingDependencyError(f"the native scoring kernel reads int8 stores, not {level.dtype}",
                                         hint="use backend='ort' or 'auto'")
        codes, q_scales = quantize_int8(queries.tokens)  # (BtL, D) u8 with zero point 128, (BtL,)
        q = np.ascontiguousarray(signed_codes(codes))  # (BtL, D)
        q_offset = (INT8_ZERO_POINT * q.astype(np.int32).sum(axis=1)).astype(np.int32)
        q_scales = np.ascontiguousarray(q_scales, dtype=np.float32)
        bt_l, length = q.shape[0], queries.length
        q_weights = np.ascontiguousarray(queries.weights, dtype=np.float32).reshape(-1)  # (Bt * L,)
        q_floor = np.ascontiguousarray(queries.floor, dtype=np.float32)  # (Bt,)
        t, d = level.length, level.dim
        if not (out.flags.c_contiguous and out.dtype == np.float32):
            raise MissingDependencyError("the native scoring kernel writes into a C-contiguous float32 array",
                                         hint="use backend='ort'")

        def work(start: int, stop: int) -> int:
            """One chunk on one thread: the kernel writes the chunk's scores straight into ``out[:, start:stop]``."""
            video = np.ascontiguousarray(level.tokens[start:stop])  # (c, T, D) u8; a memory map stays a view
            scales = np.ascontiguousarray(level.scales[start:stop], dtype=np.float32)  # (c, T)
            weights = np.ascontiguousarray(level.weights[start:stop], dtype=np.float32)  # (c, T)
            return self._lib.hbi_score_u8s8(_ptr(video), _ptr(scales), _ptr(weights), stop - start, t, d, _ptr(q),
                                            _ptr(q_offset), _ptr(q_scales), _ptr(q_weights), _ptr(q_floor), bt_l,
                                            length, _ptr(out) + 4 * start, out.shape[1])

        # Chunks go to the threads as each becomes free (no barrier per chunk: on a shared machine one late thread
        # would stall the other at every chunk); small enough that the last ones balance the threads.
        chunk = max(1, min(chunk, -(-level.n // (4 * self.threads))))
        parts = [(start, min(start + chunk, level.n)) for start in range(0, level.n, chunk)]
        codes_rc = list(self._pool.map(lambda p: work(*p), parts)) if self._pool else [work(*p) for p in parts]
        bad = [rc for rc in codes_rc if rc != 0]
        if bad:
            raise MissingDependencyError(f"the native scoring kernel failed: {_ERRORS.get(bad[0], bad[0])}",
                                         hint="use backend='ort'")
