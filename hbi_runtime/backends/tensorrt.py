"""TensorRT backend: one deserialized engine per graph, run with the name-based TensorRT 10 API.

Engines come from ``hbi-export build-engine`` (``PKG/engines/<precision>/``, :mod:`hbi_runtime.engines`). On
:meth:`TrtBackend.load` the engine's manifest entry is checked against this machine (ONNX hash, TensorRT version,
GPU name and compute capability, plugin library hash); any difference is refused with the rebuild command.

Execution: device buffers and pinned host buffers sized for the profile's max shapes are allocated once;
each call sets the input shapes by name (``set_input_shape``), binds addresses (``set_tensor_address``), copies in,
runs ``execute_async_v3`` on the backend's CUDA stream (or replays a CUDA graph captured for that shape set when
``cuda_graph=True``), copies out and synchronizes. A feed whose batch exceeds the profile's max is split along
its named axes and the outputs reassembled (:func:`split_feed`), so callers need not know the profile.

``tensorrt`` and cuda-python are imported in ``load()``; this module imports without them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np

from hbi_runtime.backends.base import Backend
from hbi_runtime.backends.cuda import Cuda
from hbi_runtime.engines import (ENGINE_PRECISIONS, EngineEntry, HostInfo, TensorProfile, built_precisions,
                                 check_engine, read_engine_set)
from hbi_runtime.errors import BadInputError, MismatchError, MissingDependencyError, UsageError
from hbi_runtime.package import GraphSpec, TensorSpec, sha256_file

PLUGINS_ENV = "HBI_TRT_PLUGINS"
TRT_HINT = ("pip install 'hbi-toolkit[gpu-cu12]' --extra-index-url https://pypi.nvidia.com (tensorrt >= 10.3) on a "
            "machine with an NVIDIA GPU (driver >= 535; [gpu-cu13] for driver >= 580); on Jetson JetPack's TensorRT "
            "and the [jetson] extra (docs/tensorrt.md, \"Installing\")")
_PLUGIN_HANDLES: dict[str, tuple[Any, str]] = {}  # resolved path -> (registry handle, sha256): once per process


def import_tensorrt() -> Any:
    """``import tensorrt``, or MissingDependencyError with the install hint."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(f"TensorRT is not installed ({exc}); building and running engines needs it",
                                     hint=TRT_HINT) from exc
    return tensorrt


def default_plugin_library() -> Path | None:
    """The hbi plugin library named by ``$HBI_TRT_PLUGINS``, if set."""
    value = os.environ.get(PLUGINS_ENV)
    return Path(value) if value else None


def load_plugin_library(trt: Any, path: str | os.PathLike) -> str:
    """Register the hbi plugin library with TensorRT (once per process); return its sha256.

    Raises:
        BadInputError: no such file. UsageError: TensorRT refused to load it.
    """
    resolved = str(Path(path).resolve())
    if resolved in _PLUGIN_HANDLES:
        return _PLUGIN_HANDLES[resolved][1]
    if not Path(resolved).is_file():
        raise BadInputError(f"plugin library {path} does not exist",
                            hint="build it: see docs/tensorrt.md (cmake in hbi_export/trt/plugins)")
    digest = sha256_file(resolved)
    handle = trt.get_plugin_registry().load_library(resolved)
    if handle is None:
        raise UsageError(f"TensorRT could not load the plugin library {path} (built for another TensorRT / CUDA, "
                         "or its plugins are registered already)",
                         hint="rebuild the library on this machine (docs/tensorrt.md)")
    _PLUGIN_HANDLES[resolved] = (handle, digest)
    return digest


def package_root(spec: GraphSpec, graph_path: Path) -> Path:
    """The package folder of a graph file (its manifest path ``spec.file`` removed from the end)."""
    root = Path(graph_path)
    for _ in PurePosixPath(spec.file).parts:
        root = root.parent
    return root


def resolve_precision(root: Path, precision: str | None) -> str:
    """The engine precision to run: the one asked for, else the only one built."""
    if precision is not None:
        if precision not in ENGINE_PRECISIONS:
            raise UsageError(f"engine precision must be one of {list(ENGINE_PRECISIONS)}, got {precision!r}")
        return precision
    built = built_precisions(root)
    if len(built) == 1:
        return built[0]
    if not built:
        raise BadInputError(f"model package {root} has no TensorRT engines",
                            hint=f"build them on this machine: `hbi-export build-engine {root}`")
    raise UsageError(f"model package {root} has engines in several precisions ({', '.join(built)}); say which",
                     hint="pass --engine-precision (hbi-run) or precision= (API)")


# ----------------------------------------------------------------------------------------------------------------
# Splitting a feed that exceeds the profile


def axis_limits(specs: tuple[TensorSpec, ...], profile: Mapping[str, TensorProfile]) -> dict[str, int]:
    """The max size of each named axis in ``profile`` (the smallest over the inputs that carry it)."""
    limits: dict[str, int] = {}
    for spec in specs:
        for pos, axis in enumerate(spec.shape):
            if isinstance(axis, str) and spec.name in profile:
                limits[axis] = min(limits.get(axis, sys.maxsize), profile[spec.name].max[pos])
    return limits


def split_feed(inputs: tuple[TensorSpec, ...], feed: Mapping[str, np.ndarray],
               limits: Mapping[str, int]) -> Iterator[tuple[dict[str, slice], dict[str, np.ndarray]]]:
    """Chunks of ``feed`` with every named axis within ``limits``: ``(slice per axis name, sub-feed)`` pairs.

    Chunks cover the product of the per-axis ranges (the interaction graph splits texts and videos both).
    """
    sizes: dict[str, int] = {}
    for spec in inputs:
        for pos, axis in enumerate(spec.shape):
            if isinstance(axis, str):
                sizes[axis] = feed[spec.name].shape[pos]
    names = list(sizes)
    ranges = [[slice(s, min(s + limits.get(a, sizes[a]), sizes[a])) for s in range(0, sizes[a],
                                                                                 limits.get(a, sizes[a]))]
              for a in names]
    for combo in itertools.product(*ranges):
        cut = dict(zip(names, combo))
        sub = {}
        for spec in inputs:
            index = tuple(cut[a] if isinstance(a, str) else slice(None) for a in spec.shape)
            sub[spec.name] = feed[spec.name][index]
        yield cut, sub


def output_shape(spec: TensorSpec, sizes: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(sizes[a] if isinstance(a, str) else a for a in spec.shape)


# ----------------------------------------------------------------------------------------------------------------


class TrtBackend(Backend):
    """A graph run as a TensorRT engine built by ``hbi-export build-engine``.

    Args:
        spec: the graph's spec from the manifest.
        path: the graph's ``.onnx`` file in the package (the engine is found through the package's engine manifest).
        precision: which engines to run (``fp32``, ``fp16``, ``int8``); default: the only precision built.
        plugins: the hbi plugin library (``libhbi_trt_plugins.so``); default ``$HBI_TRT_PLUGINS``.
        cuda_graph: capture each new shape set into a CUDA graph and replay it (fewer launch overheads).
        device: the CUDA device index.
    """

    name = "trt"

    def __init__(self, spec: GraphSpec, path: str | os.PathLike, *, precision: str | None = None,
                 plugins: str | os.PathLike | None = None, cuda_graph: bool = False, device: int = 0) -> None:
        super().__init__(spec, path)
        if precision is not None and precision not in ENGINE_PRECISIONS:
            raise UsageError(f"precision must be one of {list(ENGINE_PRECISIONS)} or None, got {precision!r}")
        if not isinstance(cuda_graph, bool):
            raise UsageError(f"cuda_graph must be true or false, got {cuda_graph!r}")
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise UsageError(f"device must be a CUDA device index >= 0, got {device!r}")
        self.precision, self.cuda_graph, self.device = precision, cuda_graph, device
        self.plugins = Path(plugins) if plugins is not None else default_plugin_library()
        self.entry: EngineEntry | None = None
        self._reset()

    def _reset(self) -> None:
        self._trt = self._cuda = self._runtime = self._engine = self._context = self._stream = None
        self._device_ptrs: dict[str, int] = {}
        self._host: dict[str, tuple[int, np.ndarray]] = {}
        self._graphs: dict[tuple, Any] = {}
        self._limits: dict[str, int] = {}

    def describe(self) -> dict[str, Any]:
        return {"precision": self.precision, "cuda_graph": self.cuda_graph}

    # ------------------------------------------------------------------ Backend

    def _load(self) -> None:
        trt = import_tensorrt()
        cuda = Cuda()
        cuda.call("cudaSetDevice", self.device)
        root = package_root(self.spec, self.path)
        engine_set = read_engine_set(root, resolve_precision(root, self.precision))
        entry = engine_set.entry_for(self.spec.file)
        if entry is None:
            raise BadInputError(f"the {engine_set.precision} engines of {root} include none for {self.spec.file}",
                                hint=f"rebuild them: `hbi-export build-engine {root} --precision "
                                     f"{engine_set.precision}`")
        plugin_sha = load_plugin_library(trt, self.plugins) if self.plugins is not None else None
        dev = cuda.device_info(self.device)
        host = HostInfo(str(trt.__version__), dev.name, dev.compute_capability, plugin_sha)
        engine_path = check_engine(root, entry, host, onnx_sha256=self.spec.sha256)
        try:
            self._activate(trt, cuda, entry, engine_path)
        except BaseException:
            self._close()  # free what was allocated before the failure
            raise

    def _activate(self, trt: Any, cuda: Cuda, entry: EngineEntry, engine_path: Path) -> None:
        """Deserialize the engine, check its I/O names, allocate max-profile buffers, create the stream."""
        self._trt, self._cuda, self.entry = trt, cuda, entry
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            raise MismatchError(f"TensorRT {trt.__version__} could not deserialize {engine_path}",
                                hint=f"rebuild it: `{entry.rebuild_command(package_root(self.spec, self.path))}`")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        want = [t.name for t in (*self.input_specs, *self.output_specs)]
        if sorted(names) != sorted(want):
            raise MismatchError(f"engine {engine_path} has tensors {names}; the graph's spec has {want}",
                                hint="rebuild the engines from this package")
        self._engine, self._context = engine, engine.create_execution_context()
        self._stream = cuda.stream()
        profile = entry.profiles[0]
        self._limits = axis_limits(self.input_specs, profile)
        for spec in (*self.input_specs, *self.output_specs):  # buffers for the profile's max shapes, bound once
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(spec.name)))
            shape = output_shape(spec, self._limits)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            self._device_ptrs[spec.name] = cuda.malloc(nbytes)
            self._host[spec.name] = cuda.host_array(nbytes, dtype, shape)
            if self._context.set_tensor_address(spec.name, self._device_ptrs[spec.name]) is False:
                raise MismatchError(f"TensorRT refused the buffer of tensor {spec.name} of {engine_path}",
                                    hint="rebuild the engines from this package")

    def _run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One engine call on a feed within the profile: pinned copies, execute_async_v3 (or a graph), sync.

        On any failure the stream is drained first, so that no copy queued for this call is still pending when the
        caller goes on (or closes the backend and frees the buffers those copies use)."""
        try:
            return self._run_queued(feed)
        except BaseException:
            self._drain()
            raise

    def _drain(self) -> None:
        if self._cuda is not None and self._stream is not None:
            with contextlib.suppress(Exception):  # the original error is the one to report
                self._cuda.synchronize(self._stream)

    def _run_queued(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, context, stream = self._cuda, self._context, self._stream
        for spec in self.input_specs:
            value = feed[spec.name]
            host = self._host[spec.name][1].reshape(-1)[:value.size].reshape(value.shape)
            if not context.set_input_shape(spec.name, value.shape):
                profile = self.entry.profiles[0][spec.name] if self.entry else None
                bounds = f" (min {list(profile.min)}, max {list(profile.max)})" if profile else ""
                raise BadInputError(f"Input tensor: {spec.name} | Received shape {value.shape}, outside the engine's "
                                    f"optimization profile{bounds}",
                                    hint="rebuild the engine with a --min-batch / --max-batch range that holds it")
            np.copyto(host, value, casting="unsafe")  # engine I/O dtype (int64 ids may be int32 in an engine)
            cuda.copy_to_device(self._device_ptrs[spec.name], host, stream)
        key = tuple(feed[s.name].shape for s in self.input_specs)
        if self.cuda_graph and key in self._graphs:
            cuda.launch_graph(self._graphs[key], stream)
        else:
            self._execute(context, stream)
            if self.cuda_graph:  # a first run after a shape change does TensorRT's setup; capture the next one
                cuda.begin_capture(stream)
                self._execute(context, stream)
                self._graphs[key] = cuda.end_capture(stream)
        outputs = {}
        for spec in self.output_specs:
            shape = tuple(context.get_tensor_shape(spec.name))
            count = int(np.prod(shape, dtype=np.int64))
            host = self._host[spec.name][1].reshape(-1)[:count].reshape(shape)
            cuda.copy_to_host(host, self._device_ptrs[spec.name], stream)
            outputs[spec.name] = host
        cuda.synchronize(stream)
        return {spec.name: outputs[spec.name].astype(spec.dtype, copy=True) for spec in self.output_specs}

    def _execute(self, context: Any, stream: Any) -> None:
        if not context.execute_async_v3(int(stream)):
            raise MismatchError(f"TensorRT failed to run {self.entry.file if self.entry else self.path}",
                                hint="re-run with --debug; check `hbi-run doctor`")

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        sizes = {a: feed[s.name].shape[p] for s in self.input_specs for p, a in enumerate(s.shape)
                 if isinstance(a, str)}
        out = {s.name: np.empty(output_shape(s, sizes), dtype=s.dtype) for s in self.output_specs}
        for cut, sub in split_feed(self.input_specs, feed, self._limits):
            part = self._run(sub)
            for spec in self.output_specs:
                index = tuple(cut[a] if isinstance(a, str) else slice(None) for a in spec.shape)
                out[spec.name][index] = part[spec.name]
        return out

    def _close(self) -> None:
        cuda = self._cuda
        if cuda is not None:
            self._drain()  # no queued copy may outlive the buffers freed below
            for graph in self._graphs.values():
                cuda.destroy_graph(graph)
            for ptr in self._device_ptrs.values():
                cuda.free(ptr)
            for ptr, _ in self._host.values():
                cuda.free_host(ptr)
            if self._stream is not None:
                cuda.destroy_stream(self._stream)
        self._reset()
