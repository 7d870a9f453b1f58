"""Exact level score of a batch of queries against a :class:`~hbi_runtime.scoring.store.StoreLevel`, in chunks.

Only the *valid* text tokens are computed: the queries' valid tokens are gathered into one ``Q (Bt * L, D)``
matrix (:class:`Queries`: per query its valid tokens, and copies up to the longest query; a query with padding
keeps a zero *floor* instead of its padded rows). Per chunk of ``c`` videos, one matrix product ``S = V @ Q^T (c, T, Bt * L)``
and the segmented reductions:

* t2v: max over the ``T`` frames -> ``(c, Bt * L)``, then the per-query weighted sum over its ``L`` rows (a
  reshape to ``(c, Bt, L)`` and an einsum with the ``(Bt, L)`` token weights) -> ``(c, Bt)``. A padded video frame holds a zero token (store invariant), so its
  ``S`` is exactly 0 and the max includes the official zero floor without any masking work.
* v2t: max over each query's ``L`` rows -> ``(c, T, Bt)``, raised to the query's floor (0 for a query with
  padding: its padded positions of ``S`` are 0 in the reference), times the frame weights (0 at padding), summed
  over frames -> ``(c, Bt)``.

Three backends compute the same thing: ``native`` (int8 storage only: the AVX-512 VNNI kernel of
:mod:`hbi_runtime.scoring.native`, fused product and reductions; ``auto`` takes it for int8 where it runs), ``ort`` (one small ONNX Runtime graph per storage dtype, built once with
``onnx.helper``; the product, the casts and the reductions all run on ORT's intra-op threads) and ``numpy``
(the fallback without onnxruntime; slower: its skinny products and small-axis reductions are single-threaded or
poorly blocked). int8 is ``MatMulIntegerToFloat`` (video codes u8, zero point 128, x query s8, VNNI kernels).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from hbi_runtime.errors import BadInputError, MissingDependencyError, UsageError
from hbi_runtime.scoring.store import INT8_ZERO_POINT, StoreLevel, quantize_int8, signed_codes
from hbi_runtime.sides import SideLevel

BACKENDS = ("auto", "native", "ort", "numpy")
MAX_CHUNK_VIDEOS = 4096  # larger chunks gain nothing measurable and keep more intermediates alive


@dataclass(frozen=True)
class Queries:
    """The valid text tokens of ``Bt`` queries at one level, as ``Bt`` equal groups of ``L`` rows.

    Query ``a`` owns rows ``a*L .. a*L+L-1``: its valid tokens in order, then copies of its last row up to ``L``
    (a copy never changes a max; its weight is 0). Its padded positions are all 0 in the reference's ``S``; they
    are not computed: ``floor[a]`` (0 for a query with padding, -inf without) raises its max over text tokens
    to the same zero floor. A query without valid tokens is one zero row of weight 0 with floor 0: it scores 0.
    With one query, or queries of equal length, nothing is copied. Equal groups let the per-query max over text
    tokens be a reshape plus one reduction instead of a gather: ONNX Runtime's ``Gather`` on the last axis cost
    about 40% of the fp32 matrix product per chunk (1 query), while copied rows cost products only in batches of
    queries of different lengths (at most ``L / mean length`` more).

    Attributes:
        tokens: ``(Bt * L, D)`` float32.
        length: ``L``, rows per query.
        weights: ``(Bt, L)`` float32, each row's token weight (0 for the copies).
        floor: ``(Bt,)`` float32, the least value of each query's max over its rows (0 or -inf).
    """

    tokens: np.ndarray
    length: int
    weights: np.ndarray
    floor: np.ndarray

    @property
    def bt(self) -> int:
        return self.weights.shape[0]

    def t2v(self, t_max: np.ndarray) -> np.ndarray:
        """The per-query weighted sum of ``t_max (c, Bt * L)`` (each row's max over frames) -> ``(c, Bt)``."""
        return np.einsum("cbl,bl->cb", t_max.reshape(len(t_max), self.bt, self.length), self.weights)

    def v2t(self, v_max: np.ndarray, frame_weights: np.ndarray) -> np.ndarray:
        """``v_max (c, T, Bt)`` (each frame's max over a query's rows) raised to the floors, weighted by
        ``frame_weights (c, T)`` and summed over frames -> ``(c, Bt)``."""
        return np.einsum("ctb,ct->cb", np.maximum(v_max, self.floor), frame_weights)

    @classmethod
    def from_level(cls, level: SideLevel) -> Queries:
        mask = level.mask  # (Bt, Lt) bool
        counts = mask.sum(axis=1)
        length = int(max(1, counts.max(initial=0)))
        rows = np.zeros((level.n, length, level.dim), dtype=np.float32)  # (Bt, L, D)
        weights = np.zeros((level.n, length), dtype=np.float32)
        for a in range(level.n):
            pos = np.flatnonzero(mask[a])
            used = max(1, len(pos))  # an empty query keeps one zero row
            rows[a, :len(pos)] = level.tokens[a, pos]
            rows[a, used:] = rows[a, used - 1]
            weights[a, :len(pos)] = level.weights[a, pos]
        if not np.isfinite(rows).all():
            raise BadInputError("text side | Received non-finite tokens at valid positions. Note: Expected finite, "
                                "L2-normalised tokens")
        floor = np.where(counts < level.length, 0.0, -np.inf).astype(np.float32)
        return cls(rows.reshape(-1, level.dim), length, weights, floor)


def _import_ort() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(f"the 'ort' scoring backend needs onnx and onnxruntime ({exc})",
                                     hint="pip install onnx onnxruntime, or pass backend='numpy'") from exc
    return onnx, onnxruntime


def ort_available() -> bool:
    try:
        _import_ort()
    except MissingDependencyError:
        return False
    return True


def _build_graph(onnx: Any, dtype: str) -> bytes:
    """The chunk graph of one storage dtype (see the module docstring); fed by :class:`OrtLevelKernel`.

    ``shape4`` is ``(0, 0, Bt, L)``. Outputs ``t_max (c, Bt * L)``, the max over frames (the weighted sum over
    each query's rows follows in numpy: :meth:`Queries.t2v`), and ``v_max (c, T, Bt)``, the max over each query's
    rows (int8: before the video scale). int8: ``MatMulIntegerToFloat`` (com.microsoft, fused int32 -> float with the
    query scales; zero point 128 on the video codes) measured about 2x faster than ``MatMulInteger`` + ``Sub`` +
    ``Cast``; the video scale is applied to the t2v path in full and, being >= 0, after the max on the v2t path.
    """
    h, tp = onnx.helper, onnx.TensorProto
    storage = {"float32": tp.FLOAT, "float16": tp.FLOAT16, "int8": tp.UINT8}[dtype]
    inputs = [h.make_tensor_value_info("video", storage, ["c", "T", "D"]),  # (c, T, D)
              h.make_tensor_value_info("query_t", tp.INT8 if dtype == "int8" else tp.FLOAT, ["D", "BtL"]),
              h.make_tensor_value_info("shape4", tp.INT64, [4])]
    inits = []
    if dtype == "int8":
        inputs += [h.make_tensor_value_info("vscales", tp.FLOAT, ["c", "T", 1]),
                   h.make_tensor_value_info("qscales", tp.FLOAT, ["BtL"])]
        inits += [h.make_tensor("one", tp.FLOAT, [], [1.0]), h.make_tensor("zp", tp.UINT8, [], [INT8_ZERO_POINT])]
        nodes = [h.make_node("MatMulIntegerToFloat", ["video", "query_t", "one", "qscales", "zp"], ["S_q"],
                             domain="com.microsoft"),  # (c, T, BtL): (codes - 128) . q8 * q_scale
                 h.make_node("Mul", ["S_q", "vscales"], ["S_t"])]  # exact S, for the max over frames
        s_t, s_v = "S_t", "S_q"  # v2t: the video scale (>= 0) is applied after the max, with the weights
    else:
        nodes = [h.make_node("Cast", ["video"], ["video_f32"], to=tp.FLOAT)] if dtype == "float16" else []
        nodes += [h.make_node("MatMul", ["video_f32" if dtype == "float16" else "video", "query_t"], ["S"])]
        s_t = s_v = "S"
    nodes += [h.make_node("ReduceMax", [s_t], ["t_max"], axes=[1], keepdims=0),  # (c, BtL): max over frames
              h.make_node("Reshape", [s_v, "shape4"], ["S4"]),  # (c, T, Bt, L)
              h.make_node("ReduceMax", ["S4"], ["v_max"], axes=[3], keepdims=0)]  # (c, T, Bt)
    outputs = [h.make_tensor_value_info("t_max", tp.FLOAT, ["c", "BtL"]),
               h.make_tensor_value_info("v_max", tp.FLOAT, ["c", "T", "Bt"])]
    graph = h.make_graph(nodes, f"hbi_score_chunk_{dtype}", inputs, outputs, initializer=inits)
    opsets = [h.make_opsetid("", 17), h.make_opsetid("com.microsoft", 1)]
    model = h.make_model(graph, opset_imports=opsets, producer_name="hbi_runtime.scoring")
    model.ir_version = 8  # readable by every onnxruntime this project supports (>= 1.18)
    return model.SerializeToString()


class OrtLevelKernel:
    """ONNX Runtime sessions of the chunk graph, one per storage dtype, built on first use (thread-safe)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _session(self, dtype: str) -> Any:
        with self._lock:
            if dtype not in self._sessions:
                onnx, ort = _import_ort()
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
                # no busy-waiting between the chunk's nodes: retrieve shares the CPU with decoding / other
                # processes, and on the shared 2-core machine spinning threads made scoring 1.3-1.7x slower
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                self._sessions[dtype] = ort.InferenceSession(_build_graph(onnx, dtype), opts,
                                                             providers=["CPUExecutionProvider"])
            return self._sessions[dtype]

    def run(self, queries: Queries, level: StoreLevel, chunk: int, out: np.ndarray) -> None:
        """Write the ``(Bt, N)`` level scores into ``out`` (float32), ``chunk`` videos per ORT run."""
        session = self._session(level.dtype)
        feed = _query_feed(queries, level.dtype)
        for start in range(0, level.n, chunk):
            part = slice(start, min(start + chunk, level.n))
            feed["video"] = np.ascontiguousarray(level.tokens[part])
            v_weights = level.weights[part]  # (c, T)
            if level.dtype == "int8":
                feed["vscales"] = np.ascontiguousarray(level.scales[part])[..., None]
                v_weights = v_weights * level.scales[part]
            t_max, v_max = session.run(["t_max", "v_max"], feed)  # (c, Bt * L), (c, T, Bt)
            t2v = queries.t2v(t_max)  # (c, Bt)
            # the weighted sum over frames in numpy: ORT's ReduceSum over the middle axis cost ~15x more here
            v2t = queries.v2t(v_max, v_weights)  # (c, Bt)
            out[:, part] = (np.float32(0.5) * (t2v + v2t)).T  # (Bt, c)


def _query_feed(queries: Queries, dtype: str) -> dict[str, np.ndarray]:
    feed = {"shape4": np.array([0, 0, queries.bt, queries.length], dtype=np.int64)}
    if dtype == "int8":
        codes, scales = quantize_int8(queries.tokens)  # (BtL, D) u8 with zero point 128, (BtL,)
        feed["query_t"] = np.ascontiguousarray(signed_codes(codes).T)
        feed["qscales"] = scales
    else:
        feed["query_t"] = np.ascontiguousarray(queries.tokens.T)  # (D, BtL)
    return feed


def numpy_level(queries: Queries, level: StoreLevel, chunk: int, out: np.ndarray) -> None:
    """The numpy twin of :class:`OrtLevelKernel`, with the same arithmetic (int8: quantised query too)."""
    int8 = level.dtype == "int8"
    if int8:  # codes x codes is exact in float32 (|sum| <= D * 127 * 127 < 2**24), as ORT's int32
        codes, q_scales = quantize_int8(queries.tokens)
        q_t = np.ascontiguousarray((codes.astype(np.float32) - np.float32(INT8_ZERO_POINT)).T)  # (D, BtL)
    else:
        q_t = np.ascontiguousarray(queries.tokens.T)  # (D, BtL)
    for start in range(0, level.n, chunk):
        part = slice(start, min(start + chunk, level.n))
        video = level.tokens[part].astype(np.float32)  # (c, T, D)
        if int8:
            video -= np.float32(INT8_ZERO_POINT)
        c, t, d = video.shape
        sim = (video.reshape(c * t, d) @ q_t).reshape(c, t, -1)  # (c, T, BtL)
        if int8:
            sim *= q_scales
            sim *= level.scales[part][..., None]
        t2v = queries.t2v(sim.max(axis=1))  # (c, Bt)
        v_max = sim.reshape(c, t, queries.bt, queries.length).max(axis=3)  # (c, T, Bt)
        v2t = queries.v2t(v_max, level.weights[part])  # (c, Bt)
        out[:, part] = (np.float32(0.5) * (t2v + v2t)).T


def chunk_videos(level: StoreLevel, queries: Queries, memory_limit_mb: float) -> int:
    """Videos per chunk so that one chunk's intermediates stay within ``memory_limit_mb``.

    Per video: the video tokens as float32 (the fp16 cast, the numpy backend's conversion) and about four
    ``(T, Bt * L)`` float32 blocks (the product, its scaled copy, the reductions' temporaries).
    """
    if not (isinstance(memory_limit_mb, (int, float)) and memory_limit_mb > 0):
        raise UsageError(f"memory_limit_mb must be a positive number, got {memory_limit_mb!r}")
    per_video = 4 * level.length * (level.dim + 4 * len(queries.tokens))
    return int(max(1, min(MAX_CHUNK_VIDEOS, memory_limit_mb * 2**20 // per_video)))


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
