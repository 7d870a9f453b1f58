"""The few CUDA runtime calls the TensorRT backend and ``doctor`` need, through cuda-python (no torch, no pycuda).

cuda-python's runtime bindings return ``(error, value...)`` tuples; :class:`Cuda` checks every error and raises
:class:`CudaError` naming the call. The module is found as ``cuda.bindings.runtime`` (cuda-python >= 12.6) or
``cuda.cudart`` (older); nothing is imported until a :class:`Cuda` is made, so the runtime imports without it.
Tests pass a fake module (the seam is the ``cudart`` argument).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np

from hbi_runtime.errors import HbiError, MissingDependencyError

CUDA_PYTHON_HINT = "pip install cuda-python (the NVIDIA CUDA Python bindings; no torch needed)"


class CudaError(HbiError):
    """A CUDA runtime call failed (no device, out of memory, a kernel fault)."""


def import_cudart() -> Any:
    """The cuda-python runtime module, or MissingDependencyError with the install hint."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6
        except ImportError as exc:
            raise MissingDependencyError(f"cuda-python is not installed ({exc}); the TensorRT backend needs it "
                                         "for streams and device memory", hint=CUDA_PYTHON_HINT) from exc
    return cudart


@dataclass(frozen=True)
class DeviceInfo:
    """One GPU as the engine manifest keys it, plus what doctor shows."""

    index: int
    name: str
    compute_capability: str  # "9.0"
    total_memory_bytes: int
    driver_version: str  # "12.4"
    runtime_version: str

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "compute_capability": self.compute_capability,
                "total_memory_gib": round(self.total_memory_bytes / 2**30, 1),
                "driver_cuda_version": self.driver_version, "runtime_cuda_version": self.runtime_version}


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"  # 12040 -> "12.4"


class Cuda:
    """Checked CUDA runtime calls. ``Cuda()`` imports cuda-python; ``Cuda(fake)`` is the test seam."""

    def __init__(self, cudart: Any = None) -> None:
        self.rt = cudart if cudart is not None else import_cudart()

    def call(self, name: str, *args: Any) -> Any:
        """Run ``cudart.<name>(*args)``; raise CudaError unless it succeeded; return its value(s)."""
        result = getattr(self.rt, name)(*args)
        err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if int(err) != 0:  # cudaSuccess
            raise CudaError(f"CUDA call {name} failed: {getattr(err, 'name', err)}",
                            hint="check the GPU and driver with `hbi-run doctor` (and nvidia-smi)")
        return values[0] if len(values) == 1 else (values or None)

    # ------------------------------------------------------------------ device facts

    def device_count(self) -> int:
        return int(self.call("cudaGetDeviceCount"))

    def device_info(self, index: int = 0) -> DeviceInfo:
        prop = self.call("cudaGetDeviceProperties", index)
        name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
        return DeviceInfo(index=index, name=name, compute_capability=f"{prop.major}.{prop.minor}",
                          total_memory_bytes=int(prop.totalGlobalMem),
                          driver_version=_cuda_version(int(self.call("cudaDriverGetVersion"))),
                          runtime_version=_cuda_version(int(self.call("cudaRuntimeGetVersion"))))

    # ------------------------------------------------------------------ memory and streams

    def stream(self) -> Any:
        return self.call("cudaStreamCreate")

    def malloc(self, nbytes: int) -> int:
        return int(self.call("cudaMalloc", max(int(nbytes), 1)))

    def free(self, ptr: int) -> None:
        self.call("cudaFree", ptr)

    def host_array(self, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]) -> tuple[int, np.ndarray]:
        """Pinned (page-locked) host memory as a numpy array view: ``(pointer, array)``; free with free_host."""
        ptr = int(self.call("cudaMallocHost", max(int(nbytes), 1)))
        raw = (ctypes.c_byte * max(int(nbytes), 1)).from_address(ptr)
        count = int(np.prod(shape, dtype=np.int64))
        return ptr, np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def free_host(self, ptr: int) -> None:
        self.call("cudaFreeHost", ptr)

    def copy_to_device(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self.call("cudaMemcpyAsync", dst, src.ctypes.data, src.nbytes,
                  self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)

    def copy_to_host(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self.call("cudaMemcpyAsync", dst.ctypes.data, src, dst.nbytes,
                  self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)

    def synchronize(self, stream: Any) -> None:
        self.call("cudaStreamSynchronize", stream)

    def destroy_stream(self, stream: Any) -> None:
        self.call("cudaStreamDestroy", stream)

    # ------------------------------------------------------------------ CUDA graphs

    def begin_capture(self, stream: Any) -> None:
        self.call("cudaStreamBeginCapture", stream,
                  self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)

    def end_capture(self, stream: Any) -> Any:
        graph = self.call("cudaStreamEndCapture", stream)
        try:
            return self.call("cudaGraphInstantiate", graph, 0)  # the executable graph
        finally:
            self.call("cudaGraphDestroy", graph)  # the executable graph does not need its template

    def launch_graph(self, graph_exec: Any, stream: Any) -> None:
        self.call("cudaGraphLaunch", graph_exec, stream)

    def destroy_graph(self, graph_exec: Any) -> None:
        self.call("cudaGraphExecDestroy", graph_exec)


def probe_device(cudart: Any = None) -> tuple[list[DeviceInfo], str | None]:
    """Every visible GPU, or ``([], reason)`` when none can be seen (for doctor: never raises)."""
    try:
        cuda = Cuda(cudart)
        return [cuda.device_info(i) for i in range(cuda.device_count())], None
    except HbiError as exc:
        return [], exc.message
    except Exception as exc:  # noqa: BLE001 - a broken driver install is the finding itself
        return [], f"{type(exc).__name__}: {exc}"
