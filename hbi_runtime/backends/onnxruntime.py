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
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from hbi_runtime.ops import DEFAULT_PATH
from hbi_runtime.ops import ort as ops_ort
from hbi_runtime.backends.base import Backend
from hbi_runtime.errors import BadInputError, MismatchError, MissingDependencyError, UsageError
from hbi_runtime.package import GraphSpec

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
PROVIDER_PRESETS: dict[str, tuple[str, ...]] = {
    "cpu": (CPU,),
    "cuda": (CUDA, CPU),  # nodes CUDA cannot run (the kernel path's PyOps) go to CPU
    "tensorrt": (TENSORRT, CUDA, CPU),
}
GPU_PROVIDERS = (CUDA, TENSORRT)
CUSTOM_OP_PATHS = ("function", "kernel", "auto")
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
GPU_HINT = ("pip install 'hbi-toolkit[gpu]' (onnxruntime-gpu; uninstall the CPU package `onnxruntime` first, both "
            "provide the same module)")


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one; containers often restrict it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def import_onnxruntime():
    """``import onnxruntime``, or MissingDependencyError with the install hint."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(f"onnxruntime is not installed ({exc}); the onnxruntime backend needs it",
                                     hint="pip install onnxruntime (CPU), or pip install 'hbi-toolkit[gpu]' "
                                          "for CUDA / TensorRT") from exc
    return onnxruntime


def _check_threads(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UsageError(f"{name} must be a positive integer or None, got {value!r}")
    return value


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
        custom_ops: ``"function"``, ``"kernel"`` or ``"auto"`` (default), see the module docstring.

    Raises:
        UsageError: an option has a wrong value (here, before anything is loaded).
    """

    name = "onnxruntime"

    def __init__(self, spec: GraphSpec, path: str | os.PathLike, *, providers: str | list[str] = "cpu",
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 optimization: str = "all", custom_ops: str = "auto") -> None:
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
        self._session = None
        self._output_names = [t.name for t in spec.outputs]

    def describe(self) -> dict[str, Any]:
        return {"providers": self.providers, "custom_ops": self.custom_op_path}

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
        options = self._session_options(ort)
        model: str | bytes = str(self.path)
        if self.custom_op_path == "kernel" and self.spec.custom_ops:
            options = ops_ort.session_options_with_kernels(options)
            model = ops_ort.prepare_model_for_kernels(self.path)
        from onnxruntime.capi import onnxruntime_pybind11_state as state

        try:
            session = ort.InferenceSession(model, options, providers=list(providers))
        except (state.Fail, state.InvalidGraph, state.InvalidProtobuf, state.InvalidArgument,
                state.NotImplemented) as exc:
            raise MismatchError(f"onnxruntime {ort.__version__} cannot load {self.path}: {exc}",
                                hint="upgrade onnxruntime, or re-export the package with this toolkit") from exc
        self._check_session(session, providers)
        self._session = session

    def _infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._session.run(self._output_names, dict(feed))
        return dict(zip(self._output_names, outputs))

    def _close(self) -> None:
        self._session = None  # ONNX Runtime frees the session with its last reference

    # ------------------------------------------------------------------ helpers

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
