"""ONNX Runtime backend: one ``InferenceSession`` per graph, CPU by default.

``onnxruntime`` is imported in :meth:`OrtBackend.load`, not at module import, so that the runtime imports on a
box without it (the error then says what to install). CUDA and TensorRT execution providers come with
onnxruntime-gpu (the ``gpu`` extra); asking for one that this onnxruntime lacks is an error, never a silent
fall-back to CPU, and so is a session that was created but dropped the provider (ONNX Runtime only logs that).

Custom ops (``hbi.TokenMerge``, ``hbi.WeightedTokenInteraction``, docs/custom_ops.md): ``"function"`` runs the
graph's model-local functions (standard ops, no extra dependency); ``"kernel"`` rewrites the graph so that the numpy
kernels of :mod:`hbi_runtime.ops` run through onnxruntime-extensions; ``"auto"`` takes the kernel path only when
:data:`hbi_runtime.ops.DEFAULT_PATH` says ``"kernel"`` for every custom op of the graph and the extensions are
installed, otherwise the functions (with today's defaults: always the functions).

ONNX Runtime's TensorRT execution provider (``providers="tensorrt"``, ``hbi-run ... --device tensorrt``): TensorRT
builds engines inside ONNX Runtime from the package's graphs, configured by the ``tensorrt`` option
(:func:`tensorrt_provider_options`): an engine cache and a timing cache (default: per graph under
``~/.cache/hbi/ort-tensorrt``), fp16 (``precision="fp16"``), INT8 from the Q/DQ graphs of ``hbi-export calibrate``
(explicit quantization: no calibration table), the hbi plugin library (``trt_extra_plugin_lib_paths``, default
``$HBI_TRT_PLUGINS``), one optimization profile over the batch axes, the workspace. It is the documented
alternative to the ``trt`` backend's own engines (docs/tensorrt.md, "ONNX Runtime's TensorRT execution provider").

Optimized graphs are cached (CPU sessions at the default optimization level, function path, graphs without
external data up to :data:`OPTIMIZED_CACHE_MAX_BYTES`): the first session saves the graph ONNX Runtime optimized
to ``$XDG_CACHE_HOME/hbi-toolkit/ort/``, named by the graph's sha256, its size and mtime, the onnxruntime version
and this CPU (the optimized graph may hold CPU-specific layouts); later sessions load that graph with the
optimizations off. Same nodes, same kernels, same outputs bit for bit (tests/runtime/test_backends.py), and a
session of the demo's text encoder starts in about a quarter of the CPU time (docs/bench.md, "Cold start").
``HBI_ORT_CACHE=0`` turns it off; a cached graph that does not load is rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hbi_runtime.ops import DEFAULT_PATH
from hbi_runtime.ops import ort as ops_ort
from hbi_runtime.backends.base import Backend
from hbi_runtime.engines import AxisRange, profile_from_ranges, shape_spec
from hbi_runtime.errors import BadInputError, MismatchError, MissingDependencyError, UsageError
from hbi_runtime.fileio import user_cache_dir
from hbi_runtime.package import GraphSpec

logger = logging.getLogger(__name__)

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
PROVIDER_PRESETS: dict[str, tuple[str, ...]] = {
    "cpu": (CPU,),
    "cuda": (CUDA, CPU),  # nodes CUDA cannot run (the kernel path's PyOps) go to CPU
    "tensorrt": (TENSORRT, CUDA, CPU),
}
GPU_PROVIDERS = (CUDA, TENSORRT)
CUSTOM_OP_PATHS = ("function", "kernel", "auto")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
GPU_HINT = ("pip install 'hbi-toolkit[gpu-cu12]' --extra-index-url https://pypi.nvidia.com (onnxruntime-gpu and "
            "its CUDA libraries; [gpu-cu13] for driver >= 580; on Jetson NVIDIA's Jetson wheel); uninstall the CPU "
            "package `onnxruntime` first, both provide the same module")


ORT_CACHE_ENV = "HBI_ORT_CACHE"  # "0": no cache of optimized graphs
OPTIMIZED_CACHE_MAX_BYTES = 256 << 20  # larger graphs are not copied into the cache
OPTIMIZED_CACHE_FORMAT = 1

TENSORRT_OPTIONS = ("precision", "engine_cache", "timing_cache", "plugins", "batch", "workspace_mb", "device_id")
TENSORRT_BATCH = AxisRange(1, 8, 32)  # the profile of every batch axis unless `batch` says otherwise
PLUGINS_ENV = "HBI_TRT_PLUGINS"


def default_tensorrt_cache(spec: GraphSpec) -> Path:
    """Where ONNX Runtime's TensorRT provider keeps this graph's engines and timing cache by default:
    ``$XDG_CACHE_HOME/hbi/ort-tensorrt/<graph sha256 prefix>`` (ONNX Runtime keys its files on the rest)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "hbi" / "ort-tensorrt" / spec.sha256[:16]


def tensorrt_provider_options(spec: GraphSpec, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """ONNX Runtime's ``TensorrtExecutionProvider`` options for one graph, from ours (pure).

    Args:
        spec: the graph's spec (its precision: ``int8`` for the Q/DQ graphs of ``hbi-export calibrate``).
        options: ``precision`` (``fp32`` / ``fp16`` / ``int8``; default: the graph's own), ``engine_cache`` and
            ``timing_cache`` (folders; default :func:`default_tensorrt_cache`), ``plugins`` (the hbi plugin
            library; default ``$HBI_TRT_PLUGINS``), ``batch`` (min, opt, max of every batch axis), ``workspace_mb``,
            ``device_id``.
    Raises:
        UsageError: an unknown option or value, or a precision this graph cannot give.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(TENSORRT_OPTIONS))
    if unknown:
        raise UsageError(f"unknown TensorRT provider option(s) {unknown}; known: {list(TENSORRT_OPTIONS)}")
    precision = options.get("precision") or spec.precision
    if precision not in ("fp32", "fp16", "int8"):
        raise UsageError(f"TensorRT provider precision must be fp32, fp16 or int8, got {precision!r}")
    quantized = spec.precision == "int8"
    if quantized and precision != "int8":
        raise UsageError(f"graph {spec.file} is quantized (Q/DQ); its TensorRT precision is int8, not {precision}")
    if precision == "fp32" and spec.precision == "fp16":
        raise UsageError(f"graph {spec.file} is fp16; an fp32 TensorRT engine needs the fp32 package")
    batch = options.get("batch") or TENSORRT_BATCH
    batch = batch if isinstance(batch, AxisRange) else AxisRange(*batch)
    axes = {a for t in spec.inputs for a in t.shape if isinstance(a, str)}
    profile = profile_from_ranges(spec.inputs, dict.fromkeys(axes, batch))
    cache = Path(options.get("engine_cache") or default_tensorrt_cache(spec))
    timing = Path(options.get("timing_cache") or cache)
    out: dict[str, Any] = {
        "device_id": int(options.get("device_id") or 0),
        # fp16 also for the float layers of an int8 graph exported in fp16 (none today: calibrate keeps fp32)
        "trt_fp16_enable": precision == "fp16",
        "trt_int8_enable": quantized,  # explicit Q/DQ: TensorRT takes the scales from the graph
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(timing),
        "trt_max_workspace_size": int(options.get("workspace_mb") or 4096) << 20,
        "trt_profile_min_shapes": shape_spec(profile, "min"), "trt_profile_opt_shapes": shape_spec(profile, "opt"),
        "trt_profile_max_shapes": shape_spec(profile, "max"),
    }
    plugins = options.get("plugins") or os.environ.get(PLUGINS_ENV)
    if plugins:
        out["trt_extra_plugin_lib_paths"] = str(plugins)
    return out


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one; containers often restrict it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def optimized_cache_dir() -> Path:
    """Where optimized graphs are kept: ``$XDG_CACHE_HOME/hbi-toolkit/ort`` (module docstring)."""
    return user_cache_dir("ort")


_CPU_ID: list[str] = []


def _cpu_identity() -> str:
    """This CPU as an optimized graph depends on it: model and feature flags (Linux: the first processor of
    ``/proc/cpuinfo``), else what :mod:`platform` says. Once per process."""
    if not _CPU_ID:
        wanted = ("vendor_id", "model name", "flags", "Features", "CPU implementer", "CPU part")
        lines = []
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if not line.strip():
                        break  # the first processor is enough
                    if line.split(":", 1)[0].strip() in wanted:
                        lines.append(line.strip())
        except OSError:
            pass
        _CPU_ID.append("\n".join([platform.machine(), *lines] if lines else [platform.machine(), platform.processor()]))
    return _CPU_ID[0]


def import_onnxruntime():
    """``import onnxruntime``, or MissingDependencyError with the install hint."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(f"onnxruntime is not installed ({exc}); the onnxruntime backend needs it",
                                     hint="pip install onnxruntime (CPU), or pip install 'hbi-toolkit[gpu-cu12]' "
                                          "--extra-index-url https://pypi.nvidia.com for CUDA / TensorRT") from exc
    return onnxruntime


def _check_threads(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UsageError(f"{name} must be a positive integer or None, got {value!r}")
    return value


_PRELOADED: list[bool] = []


def _preload_gpu_libraries(ort) -> None:
    """Load the CUDA / cuDNN libraries of the ``nvidia-*`` wheels (the ``gpu-cu12`` / ``gpu-cu13`` extras) before
    a GPU session: onnxruntime-gpu's provider library names ``libcudart.so.12`` etc. without a search path, and
    ONNX Runtime does not look in those wheels by itself (``onnxruntime.preload_dlls``, onnxruntime-gpu >= 1.21).
    Once per process; where it is missing or fails (a system CUDA install, JetPack), the session's own check says
    what is missing. Not yet run on a GPU machine (docs/tensorrt.md, "Installing")."""
    if _PRELOADED or not hasattr(ort, "preload_dlls"):
        return
    _PRELOADED.append(True)
    try:
        ort.preload_dlls()
    except Exception:  # noqa: BLE001 - best effort: the provider check below reports what did not load
        pass


def _check_providers(value: Any) -> str | tuple[str, ...]:
    if isinstance(value, str):
        if value not in PROVIDER_PRESETS:
            raise UsageError(f"unknown providers {value!r}; choose one of {list(PROVIDER_PRESETS)} or give a list "
                             "of ONNX Runtime execution provider names")
        return value
    if (isinstance(value, (list, tuple)) and value
            and all(isinstance(p, str) and p for p in value)):
        return tuple(value)
    raise UsageError(f"providers must be one of {list(PROVIDER_PRESETS)} or a non-empty list of execution "
                     f"provider names, got {value!r}")


class OrtBackend(Backend):
    """A graph run by ONNX Runtime.

    Args:
        spec: the graph's spec from the manifest.
        path: the ``.onnx`` file.
        providers: ``"cpu"`` (default), ``"cuda"``, ``"tensorrt"``, or an explicit list of execution provider
            names (``["CUDAExecutionProvider", "CPUExecutionProvider"]``), in priority order.
        intra_op_threads: threads inside one operator; default: every core this process may use.
        inter_op_threads: threads across independent operators; default: ONNX Runtime's.
        optimization: graph optimization level, one of ``disable``, ``basic``, ``extended``, ``all`` (default).
        spinning: whether idle intra-op threads spin waiting for work (ONNX Runtime's default, True: lower
            latency between the operators of a long run); False for a process that runs a graph a few times and
            exits (``hbi-run retrieve --index``: about 25 ms less CPU to create the session), same outputs.
        custom_ops: ``"function"``, ``"kernel"`` or ``"auto"`` (default), see the module docstring.
        tensorrt: options of the TensorRT execution provider (:func:`tensorrt_provider_options`); only with a
            ``providers`` that has it (``"tensorrt"``).

    Raises:
        UsageError: an option has a wrong value (here, before anything is loaded).
    """

    name = "onnxruntime"

    def __init__(self, spec: GraphSpec, path: str | os.PathLike, *, providers: str | list[str] = "cpu",
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 optimization: str = "all", custom_ops: str = "auto",
                 tensorrt: Mapping[str, Any] | None = None, spinning: bool = True) -> None:
        super().__init__(spec, path)
        self.providers = _check_providers(providers)
        self.intra_op_threads = _check_threads("intra_op_threads", intra_op_threads)
        self.inter_op_threads = _check_threads("inter_op_threads", inter_op_threads)
        if optimization not in OPTIMIZATION_LEVELS:
            raise UsageError(f"optimization must be one of {list(OPTIMIZATION_LEVELS)}, got {optimization!r}")
        self.optimization = optimization
        if custom_ops not in CUSTOM_OP_PATHS:
            raise UsageError(f"custom_ops must be one of {list(CUSTOM_OP_PATHS)}, got {custom_ops!r}")
        self.custom_ops = custom_ops
        if not isinstance(spinning, bool):
            raise UsageError(f"spinning must be True or False, got {spinning!r}")
        self.spinning = spinning
        wanted = PROVIDER_PRESETS[self.providers] if isinstance(self.providers, str) else self.providers
        if tensorrt is not None and TENSORRT not in wanted:
            raise UsageError("tensorrt options go with ONNX Runtime's TensorRT execution provider (providers="
                             "'tensorrt', or a list with TensorrtExecutionProvider)")
        self.tensorrt = dict(tensorrt or {})
        self._trt_options = tensorrt_provider_options(spec, self.tensorrt) if TENSORRT in wanted else None
        self._session = None
        self._output_names = [t.name for t in spec.outputs]

    def describe(self) -> dict[str, Any]:
        described = {"providers": self.providers, "custom_ops": self.custom_op_path}
        if self._trt_options is not None:
            described["tensorrt"] = {"fp16": self._trt_options["trt_fp16_enable"],
                                     "int8": self._trt_options["trt_int8_enable"]}
        return described

    @property
    def custom_op_path(self) -> str:
        """The path this graph's custom ops take: ``"function"`` or ``"kernel"`` (``"auto"`` resolved)."""
        if self.custom_ops != "auto":
            return self.custom_ops
        names = [op.split(".", 1)[1] for op in self.spec.custom_ops]
        if names and all(DEFAULT_PATH.get(n) == "kernel" for n in names) and ops_ort.kernel_available():
            return "kernel"
        return "function"

    # ------------------------------------------------------------------ Backend

    def _load(self) -> None:
        ort = import_onnxruntime()
        if not self.path.is_file():
            raise BadInputError(f"graph file {self.path} does not exist")
        providers = self._resolve_providers(ort)
        if any(p != "CPUExecutionProvider" for p in providers):
            _preload_gpu_libraries(ort)
        options = self._session_options(ort)
        model: str | bytes = str(self.path)
        if self.custom_op_path == "kernel" and self.spec.custom_ops:
            options = ops_ort.session_options_with_kernels(options)
            model = ops_ort.prepare_model_for_kernels(self.path)
        cached = self._optimized_cache_path(ort, providers)
        session = self._load_cached(ort, cached, providers) if cached is not None else None
        if session is None:
            tmp = self._prepare_cache_write(cached) if cached is not None else None
            if tmp is not None:
                options.optimized_model_filepath = str(tmp)
            from onnxruntime.capi import onnxruntime_pybind11_state as state

            try:
                session = ort.InferenceSession(model, options, providers=self._provider_list(providers))
            except (state.Fail, state.InvalidGraph, state.InvalidProtobuf, state.InvalidArgument,
                    state.NotImplemented) as exc:
                _remove_quietly(tmp)
                raise MismatchError(f"onnxruntime {ort.__version__} cannot load {self.path}: {exc}",
                                    hint="upgrade onnxruntime, or re-export the package with this toolkit") from exc
            if tmp is not None:
                self._commit_cache(tmp, cached)
        self._check_session(session, providers)
        self._session = session

    def _optimized_cache_path(self, ort, providers: tuple[str, ...]) -> Path | None:
        """The cache file of this graph's optimized form, or None where the cache does not apply (module
        docstring)."""
        if (os.environ.get(ORT_CACHE_ENV, "1") == "0" or tuple(providers) != (CPU,) or self.optimization != "all"
                or self.custom_op_path != "function" or getattr(self.spec, "external_data", None)):
            return None
        try:
            info = self.path.stat()
        except OSError:
            return None
        if info.st_size > OPTIMIZED_CACHE_MAX_BYTES:
            return None
        key = "\n".join([str(OPTIMIZED_CACHE_FORMAT), ort.__version__, str(self.spec.sha256), str(info.st_size),
                         str(info.st_mtime_ns), _cpu_identity()])
        return optimized_cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.onnx"

    def _load_cached(self, ort, cached: Path, providers: tuple[str, ...]):
        """A session of the cached optimized graph with the optimizations off, or None (absent or not loadable:
        then it is rebuilt)."""
        if not cached.is_file():
            return None
        options = self._session_options(ort)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(cached), options, providers=self._provider_list(providers))
        except Exception as exc:  # noqa: BLE001 - our own derived file: whatever is wrong with it, rebuild it
            logger.debug("cached optimized graph %s not loaded (%s); rebuilding it", cached, exc)
            return None

    @staticmethod
    def _prepare_cache_write(cached: Path) -> Path | None:
        """A writable temporary path next to ``cached`` for ONNX Runtime to save the optimized graph to, or None
        (a cache that cannot be written only costs the optimization at every start)."""
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # one per writer
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp.touch()
        except OSError as exc:
            logger.debug("optimized graph not cached at %s: %s", cached, exc)
            return None
        return tmp

    @staticmethod
    def _commit_cache(tmp: Path, cached: Path) -> None:
        try:
            if tmp.stat().st_size > 0:
                os.replace(tmp, cached)
                return
        except OSError as exc:
            logger.debug("optimized graph not cached at %s: %s", cached, exc)
        _remove_quietly(tmp)

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._session.run(self._output_names, dict(feed))
        return dict(zip(self._output_names, outputs))

    def _close(self) -> None:
        self._session = None  # ONNX Runtime frees the session with its last reference

    # ------------------------------------------------------------------ helpers

    def _provider_list(self, providers: tuple[str, ...]) -> list:
        """The providers as ONNX Runtime takes them: the TensorRT one with its options (its cache folders made)."""
        if self._trt_options is None:
            return list(providers)
        for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
            Path(self._trt_options[key]).mkdir(parents=True, exist_ok=True)
        return [(p, dict(self._trt_options)) if p == TENSORRT else p for p in providers]

    def _resolve_providers(self, ort) -> tuple[str, ...]:
        wanted = PROVIDER_PRESETS[self.providers] if isinstance(self.providers, str) else self.providers
        known, available = set(ort.get_all_providers()), set(ort.get_available_providers())
        unknown = [p for p in wanted if p not in known]
        if unknown:
            raise UsageError(f"unknown ONNX Runtime execution provider(s) {unknown}; available here: "
                             f"{sorted(available)}")
        missing = [p for p in wanted if p not in available]
        if missing:
            gpu = any(p in GPU_PROVIDERS for p in missing)
            raise MissingDependencyError(
                f"this onnxruntime ({ort.__version__}) has no {', '.join(missing)}; available here: "
                f"{sorted(available)}",
                hint=GPU_HINT if gpu else "install an onnxruntime build with that execution provider")
        return wanted

    def _session_options(self, ort):
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads or default_threads()
        if self.inter_op_threads is not None:
            options.inter_op_num_threads = self.inter_op_threads
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        options.graph_optimization_level = levels[self.optimization]
        if not self.spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return options

    def _check_session(self, session, providers: tuple[str, ...]) -> None:
        # ONNX Runtime drops a provider that fails to initialise (missing CUDA / cuDNN libraries) with a log line
        # only; running on CPU instead of the asked-for GPU must not pass silently.
        dropped = [p for p in providers if p not in session.get_providers()]
        if dropped:
            raise MissingDependencyError(
                f"onnxruntime could not initialise {', '.join(dropped)} for {self.path} (it runs "
                f"{session.get_providers()})", hint="check the CUDA / cuDNN / TensorRT libraries that "
                                                    "onnxruntime-gpu needs (`hbi-run doctor`)")
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        want_in, want_out = [t.name for t in self.spec.inputs], [t.name for t in self.spec.outputs]
        if sorted(got_in) != sorted(want_in) or sorted(got_out) != sorted(want_out):
            raise MismatchError(f"{self.path} has inputs {got_in} and outputs {got_out}; its spec says inputs "
                                f"{want_in} and outputs {want_out}",
                                hint="re-export the package; a graph file must match its manifest entry")


def _remove_quietly(path: Path | None) -> None:
    if path is not None:
        try:
            path.unlink()
        except OSError:
            pass
