"""Every path of the native int8 scoring kernel against the numpy scorer, and the run-time dispatch between them.

The kernel has four AVX-512 paths (one query of up to 16 rows: transposed frames for T <= 8 and D <= 64, else
row-major tiles scored in registers; row-major tiles for up to 48 query rows; the packed VNNI-interleaved query
above, in 6-, 4-, 2- and 1-block groups) and an AMX path; the shapes below reach each of them, with T and D off
their block sizes. AMX tests skip with a reason where the CPU lacks AMX (then only the dispatch's refusal is
tested).
"""

from __future__ import annotations

import numpy as np
import pytest

from hbi_runtime.errors import MissingDependencyError, UsageError
from hbi_runtime.scoring.engine import Queries, numpy_level
from hbi_runtime.scoring.native import (ISA_ENV, NativeLevelKernel, amx_status, available_paths, native_available,
                                        resolve_path)
from hbi_runtime.scoring.store import StoreLevel
from hbi_runtime.sides import SideLevel

needs_native = pytest.mark.skipif(not native_available(), reason="the native int8 kernel needs x86-64 with "
                                  "AVX-512 VNNI and a built extension")
AMX_REASON = f"this CPU or OS does not run AMX (status: {amx_status()}); the AMX numerics are untested here"
needs_amx = pytest.mark.skipif("amx" not in available_paths(), reason=AMX_REASON)


def _level(rng: np.random.Generator, n: int, length: int, dim: int, valid_min: int) -> SideLevel:
    valid = rng.integers(valid_min, length + 1, n)
    mask = np.arange(length)[None, :] < valid[:, None]
    tokens = rng.standard_normal((n, length, dim)).astype(np.float32)
    tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
    logits = np.where(mask, rng.standard_normal((n, length)), -np.inf)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True, initial=-1e30))
    weights = np.where(mask, weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-30), 0)
    return SideLevel(tokens, weights.astype(np.float32), mask)


def _case(seed: int, n_videos: int, frames: int, dim: int, n_queries: int, text_len: int):
    rng = np.random.default_rng(seed)
    video = StoreLevel.from_side_level(_level(rng, n_videos, frames, dim, 1), "int8")
    queries = Queries.from_level(_level(rng, n_queries, text_len, dim, 0))  # 0: an empty query may occur
    expected = np.zeros((n_queries, n_videos), dtype=np.float32)
    numpy_level(queries, video, 64, expected)
    return video, queries, expected


# (videos, T, D, queries, text length): the rows microkernel (<= 48 query rows) and the packed one (> 48 rows;
# 4-block groups, then 2- and 1-block rest), T around the 4/6/12-frame blocks, D off 4 and 64
SHAPES = [
    (37, 12, 512, 1, 12),  # one query: the retrieve case
    (13, 20, 96, 1, 16),  # one query of 16 rows, T > 16 (AMX takes T <= 16 only)
    (29, 7, 67, 3, 9),  # D % 4 != 0, T off every block
    (23, 13, 100, 5, 16),  # 80 rows: packed, 4 blocks + 1
    (19, 25, 64, 7, 14),  # T > 2 x 12 frames, 98 rows: 4 + 2 blocks
    (11, 1, 30, 40, 12),  # single frame, D % 4 != 0, 480 rows: 4-block groups only... plus remainder
    (16, 16, 512, 32, 12),  # the 32-query benchmark shape, T = 16 (AMX's largest)
]


def _run(path: str, video: StoreLevel, queries: Queries, threads: int = 2, chunk: int = 5) -> np.ndarray:
    out = np.zeros((queries.bt, video.n), dtype=np.float32)
    NativeLevelKernel(threads, path).run(queries, video, chunk, out)
    return out


@needs_native
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-T{}-D{}-q{}-L{}".format(*s))
def test_avx512_path_equals_the_numpy_scorer(shape):
    video, queries, expected = _case(1, *shape)
    got = _run("avx512", video, queries)
    # the same exact int32 products; only the float scaling and summation order may round differently
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


@needs_native
@pytest.mark.parametrize("frames,dim", [(7, 67), (7, 512), (8, 64), (5, 30), (1, 4), (8, 1)])
def test_one_query_of_every_length_up_to_16_rows(frames, dim):
    # one query (the retrieve case): every row count up to 16, the empty query (one zero row, floor 0); the
    # row-major tiles with a D % 64 tail and T off the 4-frame tile, and the transposed-frames path (T <= 8,
    # D <= 64: the demo's 8 x 64, fewer frames, D % 4 != 0); 21 videos in chunks of 4: an odd last video
    rng = np.random.default_rng(dim)
    video = StoreLevel.from_side_level(_level(rng, 21, frames, dim, 1), "int8")
    for length in range(0, 17):
        text = _level(rng, 1, max(length, 1), dim, length)  # exactly `length` valid tokens
        queries = Queries.from_level(text)
        expected = np.zeros((1, video.n), dtype=np.float32)
        numpy_level(queries, video, 64, expected)
        np.testing.assert_allclose(_run("avx512", video, queries, chunk=4), expected, rtol=0, atol=2e-6,
                                   err_msg=f"{length} valid tokens")


@needs_native
@needs_amx
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}-T{}-D{}-q{}-L{}".format(*s))
def test_amx_path_equals_the_numpy_scorer_and_the_avx512_path(shape):
    video, queries, expected = _case(2, *shape)
    got = _run("amx", video, queries)  # shapes AMX does not take (T > 16, D % 64) run the AVX-512 path
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)
    np.testing.assert_allclose(got, _run("avx512", video, queries), rtol=0, atol=2e-6)


@needs_native
def test_auto_takes_amx_where_it_runs_and_avx512_can_always_be_forced(monkeypatch):
    monkeypatch.delenv(ISA_ENV, raising=False)
    assert resolve_path("auto") == ("amx" if "amx" in available_paths() else "avx512")
    assert NativeLevelKernel(1, "avx512").path == "avx512"  # forced, also on AMX machines
    monkeypatch.setenv(ISA_ENV, "avx512")
    assert NativeLevelKernel(1).path == "avx512"
    monkeypatch.setenv(ISA_ENV, "sse2")
    with pytest.raises(UsageError, match="path must be one of"):
        NativeLevelKernel(1)


@needs_native
@pytest.mark.skipif("amx" in available_paths(), reason="AMX runs here: the refusal cannot happen")
def test_amx_is_refused_with_the_reason_where_it_does_not_run(monkeypatch):
    assert amx_status() in ("no-cpu", "refused")
    with pytest.raises(MissingDependencyError, match="AMX") as err:
        NativeLevelKernel(1, "amx")
    assert "avx512" in err.value.hint
    monkeypatch.setenv(ISA_ENV, "amx")
    with pytest.raises(MissingDependencyError, match="AMX"):
        NativeLevelKernel(1)


@needs_native
def test_bound_loops_measure_something_plausible():
    kernel = NativeLevelKernel(1, "avx512")
    peak = kernel.vnni_peak(seconds=0.02, repeats=1)
    # one vpdpbusd (128 ops) per cycle at 0.5-6 GHz bounds one thread's rate on any AVX-512 VNNI CPU we know of
    assert 10 < peak["per_thread_gops"] < 2 * 128 * 6
    bandwidth = kernel.read_bandwidth(gigabytes=0.05, repeats=1)
    assert 0.5 < bandwidth["read_gbps"] < 2000
    assert (kernel.amx_peak(seconds=0.02, repeats=1) is None) == ("amx" not in available_paths())


def test_doctor_reports_the_kernel_paths_and_why_amx_does_not_run():
    from hbi_runtime.doctor import probe_scoring

    report = probe_scoring()
    assert report["native_int8"] == native_available()
    assert report["paths"] == list(available_paths())
    assert report["amx"] == ("ok" if "amx" in available_paths() else amx_status() if native_available() else "no-cpu")


@needs_native
@pytest.mark.parametrize("n,frames,dim", [(100_000, 12, 512), (1_000_000, 8, 64), (21, 7, 67), (1, 1, 4)])
def test_video_ranges_cover_the_store_in_order_and_shrink_at_the_end(n, frames, dim):
    # the ranges handed to the threads: contiguous, in order, every video once; never more than a quarter of a
    # thread's share (so both threads get work), and the last ones no larger than the first (guided)
    codes = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), (n, frames, dim), (0, 0, 0))  # no memory
    per_frame = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (n, frames), (0, 0))
    level = StoreLevel("int8", codes, per_frame, np.ones((n, frames), bool), per_frame)
    kernel = NativeLevelKernel(2, "avx512")
    parts = kernel.parts(level, 4096)
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
    sizes = [stop - start for start, stop in parts]
    assert min(sizes) >= 1 and max(sizes) <= max(1, -(-n // 8))
    assert sizes[-1] <= sizes[0]
    if n >= 100_000:  # large stores: several MB per call, and a finer tail than head
        assert sizes[0] * frames * dim >= 2 << 20 and sizes[-2] < sizes[0]
