"""The hbi CUDA kernels on a GPU: build (nvcc -> .so), check against the numpy reference, time against the bounds.

One prepared script for a machine with a CUDA GPU and the CUDA toolkit (or a prebuilt ``--lib``):

    python benchmarks/gpu_kernels.py --out gpu_kernels.json            # build, check, time
    python benchmarks/gpu_kernels.py --lib build/libhbi_kernels.so     # use a library built by the CMake tree
    python benchmarks/gpu_kernels.py --only checks                     # no timings (e.g. under compute-sanitizer)

1. Build: ``nvcc -shared`` of hbi_export/trt/plugins/{wti_kernel,token_merge_kernel}.cu for this GPU's compute
   capability (the C entry point of hbi_kernels.h; no TensorRT involved).
2. Check (fixtures seeded, without near-ties): every kernel against :mod:`hbi_runtime.ops.kernels` (the numpy
   reference that the ONNX Runtime kernels and the PyTorch model agree with to 1e-5): fp32 max abs <= 1e-5 on
   WeightedTokenInteraction, <= 1e-5 on TokenMerge (docs/custom_ops.md); fp16 inputs against the reference run on the
   same fp16-rounded inputs, max abs <= 2e-3 (fp16 output rounding of values up to ~1). Then TokenMerge on
   adversarial inputs (NaN / inf / overflowing tokens, all masked, duplicates, NaN scores and masks) against
   :func:`emulate_token_merge`, the kernel's own steps in numpy: centres and assignments read back from the
   workspace must lie inside the sample, be distinct and equal the emulation's; merged values must match it.
3. Time (CUDA events, after warm-up) at the model's sizes, and compare with the bounds measured / known in the same
   run: the memory bound (the bytes a kernel must move at least / device-to-device copy bandwidth measured here; also
   against the HBM's nominal peak from the device's memory clock and bus width, where the driver reports them) and
   the arithmetic it does (reported as achieved TFLOP/s; the similarity of every pair is GEMM-like work, so the
   interaction kernel is compute-bound at large batches and its memory-bound fraction is small by nature).

Everything CUDA happens through ctypes on libcudart (the one the kernel library links): no torch, CuPy or
cuda-python needed. Importable without CUDA (nothing runs at import). Exit code 0 when every check passed, 5 when
one failed, 2 when no GPU / toolkit is available.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "hbi_export" / "trt" / "plugins"
SOURCES = ("wti_kernel.cu", "token_merge_kernel.cu")
HBI_FLOAT32, HBI_FLOAT16 = 0, 1
H2D, D2H, D2D = 1, 2, 3
ATTR_CC_MAJOR, ATTR_CC_MINOR = 75, 76  # cudaDevAttrComputeCapabilityMajor / Minor
ATTR_MEMORY_CLOCK_KHZ, ATTR_MEMORY_BUS_BITS = 36, 37  # cudaDevAttrMemoryClockRate / GlobalMemoryBusWidth
TOL_FP32, TOL_FP16 = 1e-5, 2e-3


class CudaUnavailable(RuntimeError):
    """No GPU, driver or toolkit: the script cannot run here (exit 2)."""


# ----------------------------------------------------------------------------------------------------------------
# Build and load


def build_library(out_dir: Path, arch: str) -> Path:
    """nvcc the kernels into ``out_dir/libhbi_kernels.so`` for ``arch`` (``sm_90``)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise CudaUnavailable("nvcc is not on PATH; pass --lib with a library built by the CMake tree")
    target = out_dir / "libhbi_kernels.so"
    # -cudart shared: nvcc links the static runtime by default, and this script's ctypes calls must share the
    # kernels' CUDA runtime (it finds it in /proc/self/maps).
    cmd = [nvcc, "-O3", "-std=c++17", f"-arch={arch}", "-shared", "-cudart", "shared", "-Xcompiler", "-fPIC", "-o",
           str(target),
           *(str(PLUGIN_DIR / s) for s in SOURCES)]
    subprocess.run(cmd, check=True)
    return target


def _loaded_cudart_path() -> str:
    """The libcudart the kernel library pulled into this process (so both share one CUDA runtime)."""
    with open("/proc/self/maps", encoding="utf-8") as fh:
        for line in fh:
            if "libcudart" in line:
                return line.split()[-1]
    raise CudaUnavailable("libcudart is not loaded (the kernel library should have linked it)")


class Cuda:
    """The handful of CUDA runtime calls this script needs, checked."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.rt = ctypes.CDLL(_loaded_cudart_path())
        self.rt.cudaGetErrorString.restype = ctypes.c_char_p
        count = ctypes.c_int(0)
        if self.rt.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value == 0:
            raise CudaUnavailable("no CUDA device is visible")
        self._ptrs: list[int] = []

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed: {self.rt.cudaGetErrorString(status).decode()}")

    def compute_capability(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.rt.cudaDeviceGetAttribute(ctypes.byref(major), ATTR_CC_MAJOR, 0), "cudaDeviceGetAttribute")
        self.check(self.rt.cudaDeviceGetAttribute(ctypes.byref(minor), ATTR_CC_MINOR, 0), "cudaDeviceGetAttribute")
        return major.value, minor.value

    def hbm_peak_gbs(self) -> float | None:
        """The memory's nominal peak (clock x bus width x 2 for double data rate), or None where the driver does not
        report it: the bound no kernel can beat (the copy bandwidth measured below is what one can reach)."""
        clock, bits = ctypes.c_int(), ctypes.c_int()
        if self.rt.cudaDeviceGetAttribute(ctypes.byref(clock), ATTR_MEMORY_CLOCK_KHZ, 0) != 0 \
                or self.rt.cudaDeviceGetAttribute(ctypes.byref(bits), ATTR_MEMORY_BUS_BITS, 0) != 0 \
                or clock.value <= 0 or bits.value <= 0:
            return None
        return clock.value * 1e3 * 2 * bits.value / 8 / 1e9

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.rt.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc")
        self._ptrs.append(ptr.value)
        return ptr.value

    def upload(self, array: np.ndarray) -> int:
        array = np.ascontiguousarray(array)
        ptr = self.alloc(array.nbytes)
        self.check(self.rt.cudaMemcpy(ctypes.c_void_p(ptr), array.ctypes.data_as(ctypes.c_void_p),
                                      ctypes.c_size_t(array.nbytes), H2D), "cudaMemcpy H2D")
        return ptr

    def download(self, ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        self.check(self.rt.cudaMemcpy(out.ctypes.data_as(ctypes.c_void_p), ctypes.c_void_p(ptr),
                                      ctypes.c_size_t(out.nbytes), D2H), "cudaMemcpy D2H")
        return out

    def synchronize(self) -> None:
        self.check(self.rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def time_ms(self, fn, repeats: int, warmup: int = 3) -> float:
        """Median milliseconds of ``fn()`` (each run bracketed by CUDA events on the default stream)."""
        for _ in range(warmup):
            fn()
        self.synchronize()
        start, end = ctypes.c_void_p(), ctypes.c_void_p()
        self.check(self.rt.cudaEventCreate(ctypes.byref(start)), "cudaEventCreate")
        self.check(self.rt.cudaEventCreate(ctypes.byref(end)), "cudaEventCreate")
        times = []
        for _ in range(repeats):
            self.check(self.rt.cudaEventRecord(start, None), "cudaEventRecord")
            fn()
            self.check(self.rt.cudaEventRecord(end, None), "cudaEventRecord")
            self.check(self.rt.cudaEventSynchronize(end), "cudaEventSynchronize")
            ms = ctypes.c_float()
            self.check(self.rt.cudaEventElapsedTime(ctypes.byref(ms), start, end), "cudaEventElapsedTime")
            times.append(ms.value)
        self.rt.cudaEventDestroy(start)
        self.rt.cudaEventDestroy(end)
        return float(np.median(times))

    def copy_bandwidth_gbs(self, nbytes: int = 1 << 30, repeats: int = 10) -> float:
        """Device-to-device copy bandwidth (bytes read + written per second), the memory bound's denominator."""
        src, dst = self.alloc(nbytes), self.alloc(nbytes)

        def copy() -> None:
            self.check(self.rt.cudaMemcpy(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), D2D),
                       "cudaMemcpy D2D")

        ms = self.time_ms(copy, repeats)
        return 2 * nbytes / (ms * 1e-3) / 1e9

    def free_all(self) -> None:
        for ptr in self._ptrs:
            self.rt.cudaFree(ctypes.c_void_p(ptr))
        self._ptrs.clear()


def load_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.hbi_kernels_version.restype = ctypes.c_char_p
    lib.hbi_token_merge_workspace_size.restype = ctypes.c_size_t
    lib.hbi_token_merge_workspace_size.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.hbi_wti_forward.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 7 + [ctypes.c_int] * 5 + [ctypes.c_void_p]
    lib.hbi_token_merge_forward.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int] * 5
                                            + [ctypes.c_void_p])
    return lib


# ----------------------------------------------------------------------------------------------------------------
# Fixtures and the reference


@dataclass(frozen=True)
class WtiCase:
    name: str
    bt: int
    bv: int
    lt: int
    lv: int
    d: int


@dataclass(frozen=True)
class MergeCase:
    name: str
    b: int
    n: int
    c: int
    clusters: int
    k: int = 3


CHECK_WTI = (WtiCase("small", 3, 5, 7, 4, 16), WtiCase("entity-b32", 8, 16, 32, 12, 512),
             WtiCase("odd", 5, 3, 33, 1, 70))
CHECK_MERGE = (MergeCase("small", 2, 9, 16, 3), MergeCase("text-action", 4, 32, 512, 8),
               MergeCase("video-event", 4, 12, 512, 1), MergeCase("all-centres", 2, 6, 8, 6))
# Each with every ADVERSARIAL_KINDS input; clusters == N is where a NaN centre score left a slot unwritten.
CHECK_ADVERSARIAL = (MergeCase("adversarial-all-centres", 16, 12, 16, 12), MergeCase("adversarial", 16, 12, 16, 4))
TIME_WTI = (WtiCase("entity-b32 64x1024", 64, 1024, 32, 12, 512), WtiCase("action 64x1024", 64, 1024, 8, 3, 512))
TIME_MERGE = (MergeCase("text-action 256", 256, 32, 512, 8), MergeCase("video-frames 1024", 1024, 12, 512, 3))


def unit_rows(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def padded_mask(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """1 for the first 1..n tokens of each row (every row keeps at least one), 0 after: padding as the loaders do."""
    lengths = rng.integers(1, n + 1, size=b)
    lengths[0] = n  # one full row
    return (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)


def softmax_weights(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    logits = np.where(mask > 0, rng.standard_normal(mask.shape), -np.inf)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


def wti_inputs(case: WtiCase, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    tm, vm = padded_mask(rng, case.bt, case.lt), padded_mask(rng, case.bv, case.lv)
    return [unit_rows(rng, (case.bt, case.lt, case.d)), softmax_weights(rng, tm), tm,
            unit_rows(rng, (case.bv, case.lv, case.d)), softmax_weights(rng, vm), vm]


def merge_inputs(case: MergeCase, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((case.b, case.n, case.c)).astype(np.float32)
    mask = padded_mask(rng, case.b, case.n)
    mask[:, :case.clusters] = 1  # at least `clusters` valid tokens, as the model guarantees
    score = np.where(mask > 0, rng.standard_normal((case.b, case.n)), -1e4).astype(np.float32)
    return [x, score, mask]


# ----------------------------------------------------------------------------------------------------------------
# TokenMerge: a numpy emulation of the CUDA kernel, step by step, with the kernel's float32 and NaN rules
#
# The reference (hbi_runtime.ops.kernels.token_merge) states the contract; this mirrors what the kernel *does*, so
# that inputs outside the contract (NaN, inf, |x|^2 overflowing float32, every token masked, duplicates) can be
# judged: which centre slots get written, which indices are read. ``fixed=False`` is the kernel before the fix
# (NaN centre scores ranked as they come, slots not initialised, indices not clamped).

STALE_SLOT = -(2**30)  # what an unwritten centre slot holds in the emulation: an index far outside [0, N)


@dataclass
class CentreSelection:
    centres: np.ndarray  # (B, clusters) int64: the slots as the assignment step reads them
    unwritten: np.ndarray  # (B, clusters) bool: slots no thread wrote (the kernel reads stale workspace there)
    shared_rank: np.ndarray  # (B,) bool: two tokens wrote the same slot (a write race)


@dataclass
class MergeEmulation:
    centre_score: np.ndarray  # (B, N) float32, as stored in the workspace (after the NaN mapping when fixed)
    selection: CentreSelection
    out_of_bounds: np.ndarray  # (B,) bool: the assignment step would index dist outside this sample's rows
    assign: np.ndarray  # (B, N) int64
    merged: np.ndarray  # (B, clusters, C) float32


def select_centres(centre_score: np.ndarray, clusters: int, fixed: bool = True) -> CentreSelection:
    """The kernel's "rank by counting": rank_i = #{j : s_j > s_i or (s_j == s_i and j < i)}; slot rank_i = i.

    ``fixed``: NaN scores become -inf first (a total order: ranks are a permutation, every slot is written once)
    and every slot starts as its own index. Before the fix a NaN compares false with everything, so the NaN token
    and the best finite one share a rank and some slot is never written."""
    s = centre_score.astype(np.float32, copy=True)  # (B, N)
    if fixed:
        s[np.isnan(s)] = -np.inf
    b, n = s.shape
    idx = np.arange(n)
    s_i, s_j = s[:, :, None], s[:, None, :]  # (B, i, 1), (B, 1, j)
    rank = ((s_j > s_i) | ((s_j == s_i) & (idx[None, None, :] < idx[None, :, None]))).sum(axis=-1)  # (B, N)
    centres = np.tile(np.arange(clusters), (b, 1)) if fixed else np.full((b, clusters), STALE_SLOT)
    written = np.zeros((b, clusters), dtype=np.int64)
    rows, tokens = np.nonzero(rank < clusters)
    slots = rank[rows, tokens]
    centres[rows, slots] = tokens  # on a shared slot numpy keeps the last write: one outcome of the race
    np.add.at(written, (rows, slots), 1)
    return CentreSelection(centres=centres, unwritten=written == 0, shared_rank=(written > 1).any(axis=1))


def emulate_token_merge(x, score, mask, clusters: int, k: int = 3, fixed: bool = True) -> MergeEmulation:
    """Every step of token_merge_kernel.cu on float32 inputs ``x (B, N, C)``, ``score``, ``mask (B, N)``."""
    x = np.asarray(x, dtype=np.float32)
    score, mask = np.asarray(score, dtype=np.float32), np.asarray(mask, dtype=np.float32)
    b, n, c = x.shape
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        gram = np.einsum("bnc,bmc->bnm", x, x)  # (B, N, N); one loop order for every pair, like the warp sums
        sq = np.einsum("bnn->bn", gram)  # |x_i|^2 from the same products: duplicates get d2 == 0 exactly
        d2 = (sq[:, :, None] + sq[:, None, :]) - np.float32(2) * gram
        dist = np.sqrt(np.fmax(d2, np.float32(0))) * np.float32(1 / np.sqrt(c))  # fmaxf: a NaN d2 becomes 0
        dist[:, np.arange(n), np.arange(n)] = 0
        valid = mask > 0  # (B, N); a NaN mask is "not > 0": padded
        fill = np.fmax.reduce(dist.reshape(b, -1), axis=1, initial=0) + np.float32(1)  # (B,)
        dist = np.where(valid[:, None, :], dist, fill[:, None, None]).astype(np.float32)
        dist_max = np.fmax.reduce(dist.reshape(b, -1), axis=1, initial=0)  # (B,) after the fill
        kk = min(k, n)
        nearest = np.sort(dist, axis=-1)[..., :kk]  # the kernel's insertion list (dist is never NaN here)
        total = np.zeros((b, n), dtype=np.float32)
        for q in range(kk):  # the kernel's summation order
            total += nearest[..., q] * nearest[..., q]
        density = np.where(valid, np.exp(-(total / np.float32(kk))), np.float32(0)).astype(np.float32)
        d_i, d_j = density[:, :, None], density[:, None, :]
        idx = np.arange(n)
        outranks = (d_j > d_i) | ((d_j == d_i) & (idx[None, None, :] < idx[None, :, None]))  # (B, i, j)
        parent = np.where(outranks, dist, np.inf).min(axis=-1)
        parent = np.where(outranks.any(axis=-1), parent, dist_max[:, None]).astype(np.float32)
        centre_score = (parent * density).astype(np.float32)  # inf * 0 -> NaN: the adversarial case
    if fixed:
        centre_score = np.where(np.isnan(centre_score), np.float32(-np.inf), centre_score)
    selection = select_centres(centre_score, clusters, fixed)
    read = selection.centres
    out_of_bounds = ((read < 0) | (read >= n)).any(axis=1)
    assign = assign_tokens(dist, np.clip(read, 0, n - 1))  # past an out-of-bounds read nothing is defined
    merged = _merge(x, score, assign, clusters)
    return MergeEmulation(centre_score, selection, out_of_bounds, assign, merged)


def assign_tokens(dist: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """assign[t] = the first nearest centre (strict <), then every centre owns its cluster (the last slot wins)."""
    b, clusters = centres.shape
    to_centre = np.take_along_axis(dist, centres[:, :, None], axis=1)  # (B, clusters, N)
    assign = to_centre.argmin(axis=1)  # first minimum; all-inf columns -> 0, as the kernel's bestC
    rows = np.repeat(np.arange(b), clusters)
    assign[rows, centres.reshape(-1)] = np.tile(np.arange(clusters), b)  # ascending q: the last write wins
    return assign


def _merge(x: np.ndarray, score: np.ndarray, assign: np.ndarray, clusters: int) -> np.ndarray:
    """merged[q] = sum over the tokens of q only (the kernel skips the others: no 0 * inf from an inf token)."""
    b, n, c = x.shape
    merged = np.empty((b, clusters, c), dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        weight = np.exp(score)  # (B, N)
        for q in range(clusters):
            member = assign == q  # (B, N)
            num = np.where(member[:, :, None], weight[:, :, None] * x, np.float32(0)).sum(axis=1, dtype=np.float32)
            den = np.where(member, weight, np.float32(0)).sum(axis=1, dtype=np.float32)
            merged[:, q] = num / (den[:, None] + np.float32(1e-6))
    return merged


ADVERSARIAL_KINDS = ("clean", "nan_token", "inf_token", "huge_token", "huge_all", "all_masked", "duplicates",
                     "nan_score", "nan_mask", "huge_padded")


def adversarial_merge_inputs(kind: str, b: int, n: int, c: int, clusters: int, seed: int) -> list[np.ndarray]:
    """Inputs outside the model's contract that the kernel must survive: ``[x, score, mask]`` float32.

    huge_*: finite tokens (1e20) whose |x|^2 overflows float32 -> inf distances -> NaN centre scores (inf * 0);
    padded tokens then score NaN too (density 0, parent = the inf fill)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, n, c)).astype(np.float32)
    mask = padded_mask(rng, b, n)
    mask[:, :clusters] = 1
    score = rng.standard_normal((b, n)).astype(np.float32)
    rows, token = np.arange(b), rng.integers(0, n, size=b)
    if kind == "nan_token":
        x[rows, token, rng.integers(0, c, size=b)] = np.nan
    elif kind == "inf_token":
        x[rows, token, rng.integers(0, c, size=b)] = np.inf
    elif kind in ("huge_token", "huge_padded"):
        x[rows, token] *= np.float32(1e20)
        if kind == "huge_padded":
            mask = padded_mask(rng, b, n)
    elif kind == "huge_all":
        x *= np.float32(1e20)
    elif kind == "all_masked":
        mask[:] = 0
    elif kind == "duplicates":
        x[:, 1::2] = x[:, 0::2][:, : n // 2]
    elif kind == "nan_score":
        score[rows, token] = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype=np.float32), size=b)
    elif kind == "nan_mask":
        mask[rows, token] = np.nan
    score = np.where(mask > 0, score, np.float32(-1e4)).astype(np.float32) if kind != "nan_score" else score
    return [x, score, mask]


def reference():
    sys.path.insert(0, str(ROOT))
    from hbi_runtime.ops.kernels import token_merge, weighted_token_interaction

    return weighted_token_interaction, token_merge


# ----------------------------------------------------------------------------------------------------------------
# Run one case


def run_wti(lib, cuda: Cuda, case: WtiCase, inputs: list[np.ndarray], dtype) -> tuple[np.ndarray, callable]:
    code = HBI_FLOAT16 if dtype == np.float16 else HBI_FLOAT32
    ptrs = [cuda.upload(a.astype(dtype)) for a in inputs]
    out = cuda.alloc(case.bt * case.bv * np.dtype(dtype).itemsize)

    def call() -> None:
        cuda.check(lib.hbi_wti_forward(code, *ptrs, out, case.bt, case.bv, case.lt, case.lv, case.d, None),
                   "hbi_wti_forward")

    call()
    cuda.synchronize()
    return cuda.download(out, (case.bt, case.bv), dtype), call


def run_merge(lib, cuda: Cuda, case: MergeCase, inputs: list[np.ndarray], dtype,
              workspace_out: list | None = None) -> tuple[np.ndarray, callable]:
    """Run TokenMerge once; ``workspace_out`` (a list) receives the workspace pointer for workspace_indices."""
    code = HBI_FLOAT16 if dtype == np.float16 else HBI_FLOAT32
    ptrs = [cuda.upload(a.astype(dtype)) for a in inputs]
    out = cuda.alloc(case.b * case.clusters * case.c * np.dtype(dtype).itemsize)
    workspace = cuda.alloc(lib.hbi_token_merge_workspace_size(case.b, case.n))
    if workspace_out is not None:
        workspace_out.append(workspace)

    def call() -> None:
        cuda.check(lib.hbi_token_merge_forward(code, *ptrs, out, workspace, case.b, case.n, case.c, case.clusters,
                                               case.k, None), "hbi_token_merge_forward")

    call()
    cuda.synchronize()
    return cuda.download(out, (case.b, case.clusters, case.c), dtype), call


def workspace_indices(cuda: Cuda, workspace: int, b: int, n: int, clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """(centres (B, clusters), assign (B, N)) as the kernel left them in its workspace (token_merge_kernel.cu:
    per sample N*N + 3N floats, then N ints of centres, then N ints of assignments)."""
    per_sample = (n * n + 3 * n) * 4 + 2 * n * 4
    raw = cuda.download(workspace, (b, per_sample), np.uint8)
    ints = raw[:, (n * n + 3 * n) * 4:].copy().view(np.int32)  # (B, 2N)
    return ints[:, :clusters].astype(np.int64), ints[:, n:].astype(np.int64)


@np.errstate(over="ignore")  # the 1e20 tokens become inf in fp16: the kernel sees the same
def check_adversarial(lib, cuda: Cuda) -> list[dict]:
    """TokenMerge on inputs outside the contract, against the emulation: indices inside the sample, the same
    centres and assignments, the same merged values (NaN where the emulation has NaN)."""
    results = []
    for number, (kind, case) in enumerate((kind, case) for kind in ADVERSARIAL_KINDS for case in CHECK_ADVERSARIAL):
        inputs = adversarial_merge_inputs(kind, case.b, case.n, case.c, case.clusters, 1000 + number)
        for dtype, tol in ((np.float32, TOL_FP32), (np.float16, TOL_FP16 * 4)):
            rounded = [a.astype(dtype).astype(np.float32) for a in inputs]
            want = emulate_token_merge(*rounded, clusters=case.clusters, k=case.k)
            workspace: list[int] = []
            got, _ = run_merge(lib, cuda, case, inputs, dtype, workspace_out=workspace)
            centres, assign = workspace_indices(cuda, workspace[0], case.b, case.n, case.clusters)
            inside = bool(((centres >= 0) & (centres < case.n)).all()
                          and ((assign >= 0) & (assign < case.clusters)).all())
            distinct = all(len(set(row)) == case.clusters for row in centres.tolist())
            same = bool((centres == want.selection.centres).all() and (assign == want.assign).all())
            close = bool(np.allclose(got.astype(np.float32), want.merged, rtol=1e-5, atol=tol, equal_nan=True))
            results.append({"op": "TokenMerge", "case": f"{case.name}-{kind}", "dtype": np.dtype(dtype).name,
                            "indices_inside": inside, "centres_distinct": distinct, "indices_match_emulation": same,
                            "merged_matches_emulation": close, "tolerance": tol,
                            "passed": inside and distinct and same and close})
        cuda.free_all()
    return results


def check_all(lib, cuda: Cuda) -> list[dict]:
    wti_ref, merge_ref = reference()
    results = []
    for seed, case in enumerate(CHECK_WTI):
        inputs = wti_inputs(case, seed)
        for dtype, tol in ((np.float32, TOL_FP32), (np.float16, TOL_FP16)):
            rounded = [a.astype(dtype).astype(np.float32) for a in inputs]
            want = wti_ref(*rounded)
            got, _ = run_wti(lib, cuda, case, inputs, dtype)
            err = float(np.abs(got.astype(np.float32) - want).max())
            results.append({"op": "WeightedTokenInteraction", "case": case.name, "dtype": np.dtype(dtype).name,
                            "max_abs": err, "tolerance": tol, "passed": err <= tol})
    for seed, case in enumerate(CHECK_MERGE):
        inputs = merge_inputs(case, 100 + seed)
        for dtype, tol in ((np.float32, TOL_FP32), (np.float16, TOL_FP16 * 4)):
            rounded = [a.astype(dtype).astype(np.float32) for a in inputs]
            want = merge_ref(*rounded, clusters=case.clusters, k=case.k)
            got, _ = run_merge(lib, cuda, case, inputs, dtype)
            err = float(np.abs(got.astype(np.float32) - want).max())
            results.append({"op": "TokenMerge", "case": case.name, "dtype": np.dtype(dtype).name, "max_abs": err,
                            "tolerance": tol, "passed": err <= tol})
        cuda.free_all()
    return results


def wti_cost(case: WtiCase, itemsize: int) -> tuple[int, float]:
    """(least bytes moved: tokens, weights and masks read once, scores written; flops of every pair's similarity)"""
    moved = (case.bt * case.lt * (case.d + 2) + case.bv * case.lv * (case.d + 2) + case.bt * case.bv) * itemsize
    return moved, 2.0 * case.bt * case.bv * case.lt * case.lv * case.d


def merge_cost(case: MergeCase, itemsize: int) -> tuple[int, float]:
    """(least bytes moved: x, score, mask read once, merged written; flops of the Gram matrix and the merge)"""
    moved = (case.b * case.n * (case.c + 2) + case.b * case.clusters * case.c) * itemsize
    return moved, 2.0 * case.b * case.n * case.n * case.c + 2.0 * case.b * case.n * case.c


def time_all(lib, cuda: Cuda, bandwidth_gbs: float, repeats: int, hbm_gbs: float | None = None) -> list[dict]:
    rows = []
    plans = (("WeightedTokenInteraction", TIME_WTI, wti_inputs, run_wti, wti_cost),
             ("TokenMerge", TIME_MERGE, merge_inputs, run_merge, merge_cost))
    for op, cases, make_inputs, runner, cost in plans:
        for case in cases:
            inputs = make_inputs(case, 7)
            for dtype in (np.float32, np.float16):
                _, call = runner(lib, cuda, case, inputs, dtype)
                moved, flops = cost(case, np.dtype(dtype).itemsize)
                row = _timing(op, case.name, dtype, cuda.time_ms(call, repeats), moved, flops, bandwidth_gbs)
                if hbm_gbs:
                    row["hbm_bound_ms"] = round(moved / (hbm_gbs * 1e9) * 1e3, 5)
                    row["fraction_of_hbm_bound"] = round(row["hbm_bound_ms"] / row["median_ms"], 4)
                rows.append(row)
            cuda.free_all()
    return rows


def _timing(op: str, case: str, dtype, ms: float, moved: int, flops: float, bandwidth_gbs: float) -> dict:
    """One timing row: the copy-bandwidth bound (what a device copy of the least bytes takes here) and its fraction."""
    bound_ms = moved / (bandwidth_gbs * 1e9) * 1e3
    return {"op": op, "case": case, "dtype": np.dtype(dtype).name, "median_ms": round(ms, 4),
            "min_bytes": moved, "memory_bound_ms": round(bound_ms, 5),
            "fraction_of_memory_bound": round(bound_ms / ms, 4) if ms > 0 else None,
            "achieved_tflops": round(flops / (ms * 1e-3) / 1e12, 3) if ms > 0 else None}


# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib", type=Path, help="a prebuilt libhbi_kernels.so (default: build with nvcc)")
    parser.add_argument("--arch", help="nvcc -arch (default: this GPU's sm_XY)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, help="write the JSON report here (default: stdout only)")
    parser.add_argument("--only", choices=("checks", "timings"),
                        help="run only the checks (small shapes, e.g. under compute-sanitizer) or only the timings")
    args = parser.parse_args(argv)
    try:
        report = run(args)
    except CudaUnavailable as exc:
        print(f"gpu_kernels: cannot run here: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(c["passed"] for c in report["checks"]) else 5


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = args.lib
        if path is None:
            if shutil.which("nvcc") is None:
                raise CudaUnavailable("nvcc is not on PATH; pass --lib with a library built by the CMake tree")
            probe = _probe_cc()
            path = build_library(Path(tmp), args.arch or f"sm_{probe[0]}{probe[1]}")
        lib = load_library(path)
        cuda = Cuda(lib)
        cc = cuda.compute_capability()
        started = time.time()
        checks, timings, bandwidth, hbm = [], [], None, cuda.hbm_peak_gbs()
        if args.only != "timings":
            checks = check_all(lib, cuda) + check_adversarial(lib, cuda)
        if args.only != "checks":
            bandwidth = cuda.copy_bandwidth_gbs()
            cuda.free_all()
            timings = time_all(lib, cuda, bandwidth, args.repeats, hbm)
        return {"schema": "hbi.gpu-kernels/1", "kernels_version": lib.hbi_kernels_version().decode(),
                "compute_capability": f"{cc[0]}.{cc[1]}",
                "copy_bandwidth_gbs": round(bandwidth, 1) if bandwidth is not None else None,
                "hbm_peak_gbs": round(hbm, 1) if hbm else None,
                "checks": checks, "timings": timings, "seconds": round(time.time() - started, 1)}


def _probe_cc() -> tuple[int, int]:
    """This GPU's compute capability before the kernels exist (nvidia-smi, else sm_80)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        raise CudaUnavailable("nvidia-smi not found: no NVIDIA driver here")
    out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        raise CudaUnavailable(f"nvidia-smi found no GPU: {out.stderr.strip()}")
    major, minor = out.stdout.split()[0].split(".")
    return int(major), int(minor)


if __name__ == "__main__":
    sys.exit(main())
