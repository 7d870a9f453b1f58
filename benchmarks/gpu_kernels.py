"""The hbi CUDA kernels on a GPU: build (nvcc -> .so), check against the numpy reference, time against the bounds.

One prepared script for a machine with a CUDA GPU and the CUDA toolkit (or a prebuilt ``--lib``):

    python benchmarks/gpu_kernels.py --out gpu_kernels.json            # build, check, time
    python benchmarks/gpu_kernels.py --lib build/libhbi_kernels.so     # use a library built by the CMake tree

1. Build: ``nvcc -shared`` of hbi_export/trt/plugins/{wti_kernel,token_merge_kernel}.cu for this GPU's compute
   capability (the C entry point of hbi_kernels.h; no TensorRT involved).
2. Check (fixtures seeded, without near-ties): every kernel against :mod:`hbi_runtime.ops.kernels` (the numpy
   reference that the ONNX Runtime kernels and the PyTorch model agree with to 1e-5): fp32 max abs <= 1e-5 on
   WeightedTokenInteraction, <= 1e-5 on TokenMerge (docs/custom_ops.md); fp16 inputs against the reference run on the
   same fp16-rounded inputs, max abs <= 2e-3 (fp16 output rounding of values up to ~1).
3. Time (CUDA events, after warm-up) at the model's sizes, and compare with two bounds measured / known in the same
   run: the memory bound (the bytes a kernel must move at least / device-to-device copy bandwidth measured here) and
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
    cmd = [nvcc, "-O3", "-std=c++17", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC", "-o", str(target),
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


def run_merge(lib, cuda: Cuda, case: MergeCase, inputs: list[np.ndarray], dtype) -> tuple[np.ndarray, callable]:
    code = HBI_FLOAT16 if dtype == np.float16 else HBI_FLOAT32
    ptrs = [cuda.upload(a.astype(dtype)) for a in inputs]
    out = cuda.alloc(case.b * case.clusters * case.c * np.dtype(dtype).itemsize)
    workspace = cuda.alloc(lib.hbi_token_merge_workspace_size(case.b, case.n))

    def call() -> None:
        cuda.check(lib.hbi_token_merge_forward(code, *ptrs, out, workspace, case.b, case.n, case.c, case.clusters,
                                               case.k, None), "hbi_token_merge_forward")

    call()
    cuda.synchronize()
    return cuda.download(out, (case.b, case.clusters, case.c), dtype), call


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


def time_all(lib, cuda: Cuda, bandwidth_gbs: float, repeats: int) -> list[dict]:
    rows = []
    plans = (("WeightedTokenInteraction", TIME_WTI, wti_inputs, run_wti, wti_cost),
             ("TokenMerge", TIME_MERGE, merge_inputs, run_merge, merge_cost))
    for op, cases, make_inputs, runner, cost in plans:
        for case in cases:
            inputs = make_inputs(case, 7)
            for dtype in (np.float32, np.float16):
                _, call = runner(lib, cuda, case, inputs, dtype)
                moved, flops = cost(case, np.dtype(dtype).itemsize)
                rows.append(_timing(op, case.name, dtype, cuda.time_ms(call, repeats), moved, flops, bandwidth_gbs))
            cuda.free_all()
    return rows


def _timing(op: str, case: str, dtype, ms: float, moved: int, flops: float, bandwidth_gbs: float) -> dict:
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
        checks = check_all(lib, cuda)
        bandwidth = cuda.copy_bandwidth_gbs()
        cuda.free_all()
        timings = time_all(lib, cuda, bandwidth, args.repeats)
        return {"schema": "hbi.gpu-kernels/1", "kernels_version": lib.hbi_kernels_version().decode(),
                "compute_capability": f"{cc[0]}.{cc[1]}", "copy_bandwidth_gbs": round(bandwidth, 1),
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
