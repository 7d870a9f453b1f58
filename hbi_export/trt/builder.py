"""Build TensorRT engines from a model package (``hbi-export build-engine``). Needs tensorrt and onnx, never torch.

Three steps, each testable on its own:

1. :func:`plan_build` (pure): from the installed TensorRT version, the wanted precision, the package graph's
   precision and whether it carries Q/DQ nodes, decide the network mode and builder flags:

   * TensorRT 11: networks are always strongly typed (the FP16 / INT8 builder flags are gone), so the ONNX types
     decide: fp16 needs an fp16 package (``hbi-export onnx --precision fp16``), int8 a Q/DQ package.
   * TensorRT 10 (>= 10.3), weakly typed (default): fp16 sets ``FP16`` and pins LayerNorm and softmax layers to
     fp32 (layer precision + output type, honoured through ``OBEY_PRECISION_CONSTRAINTS``); int8 sets ``INT8``
     and needs a Q/DQ package (never implicit calibration); fp32 clears ``TF32`` so that fp32 parity holds.
   * TensorRT 10 with ``--strongly-typed``: as TensorRT 11.

2. :func:`prepare_onnx`: the hbi plugin ops. TensorRT's ONNX parser before 10.7 inlines a model-local function
   in preference to a plugin (DESIGN.md, "How TensorRT's ONNX parser resolves a node"), so when the plugin library
   is loaded on such a version the functions of the plugin ops are dropped before parsing.

3. :func:`build_serialized`: parse (every parser error reported with its node), configure (workspace, flags,
   fp32 pins, one optimization profile, timing cache) and build (a None result is an error with TensorRT's log).

The ``trt`` argument is the seam: the ``tensorrt`` module in production, a fake in tests.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from hbi_runtime.engines import TensorProfile
from hbi_runtime.backends.tensorrt import TRT_HINT
from hbi_runtime.errors import HbiError, MismatchError, UsageError
from hbi_runtime.fileio import write_atomic

PLUGIN_DOMAIN = "hbi"
PLUGIN_OPS = ("WeightedTokenInteraction", "TokenMerge")
PLUGIN_VERSION = "1"
MIN_TRT = (10, 3)
PARSER_PREFERS_PLUGINS = (10, 7)  # from here the ONNX parser picks a registered plugin over a local function
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX")  # trt.LayerType names pinned to fp32 in weakly typed fp16
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def parse_version(text: str) -> tuple[int, int, int]:
    """``"10.3.0.26"`` -> ``(10, 3, 0)``."""
    numbers = [int(n) for n in re.findall(r"\d+", str(text))[:3]]
    if len(numbers) < 2:
        raise UsageError(f"cannot read a TensorRT version from {text!r}")
    return tuple((numbers + [0])[:3])  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# 1. The plan


@dataclass(frozen=True)
class BuildPlan:
    """How one graph is built: network mode, builder flags to set / clear, fp32 pins, function dropping."""

    trt_version: tuple[int, int, int]
    precision: str
    strongly_typed: bool
    flags: tuple[str, ...] = ()  # trt.BuilderFlag names to set
    clear_flags: tuple[str, ...] = ()  # trt.BuilderFlag names to clear
    pin_fp32: bool = False
    drop_plugin_functions: bool = False
    notes: tuple[str, ...] = field(default=())


def plan_build(trt_version: tuple[int, int, int], precision: str, *, graph_precision: str, has_qdq: bool,
               strongly_typed: bool = False, plugins_loaded: bool = False) -> BuildPlan:
    """Decide how to build one graph (see the module docstring).

    Args:
        trt_version: the installed TensorRT, ``(major, minor, patch)``.
        precision: ``fp32``, ``fp16`` or ``int8``, the engine wanted.
        graph_precision: the package graph's precision from its manifest (``fp32``, ``fp16``, or ``int8`` for the
            Q/DQ graphs of ``hbi-export calibrate``).
        has_qdq: the graph carries QuantizeLinear / DequantizeLinear nodes.
        strongly_typed: ``--strongly-typed`` (TensorRT 10; always so from TensorRT 11).
        plugins_loaded: the hbi plugin library is loaded for this build.
    Raises:
        UsageError: a TensorRT older than 10.3, an unknown precision, or a package that cannot give that
            precision (with the command that makes one that can).
    """
    if precision not in ("fp32", "fp16", "int8"):
        raise UsageError(f"--precision must be fp32, fp16 or int8, got {precision!r}")
    if tuple(trt_version[:2]) < MIN_TRT:
        raise UsageError(f"TensorRT {'.'.join(map(str, trt_version))} is too old; hbi engines need TensorRT >= "
                         f"{'.'.join(map(str, MIN_TRT))} (JetPack 6 has 10.3)", hint=TRT_HINT)
    typed = strongly_typed or trt_version[0] >= 11
    notes = []
    if precision == "int8" and not has_qdq:
        # hbi-export calibrate quantizes the video encoder only; the other graphs keep their float precision (the
        # package-level check that some graph is quantized is require_qdq).
        plan = plan_build(trt_version, "fp16" if graph_precision == "fp16" else "fp32", graph_precision=graph_precision,
                          has_qdq=False, strongly_typed=strongly_typed, plugins_loaded=plugins_loaded)
        return replace(plan, notes=(f"no Q/DQ nodes in this graph: built as {plan.precision}", *plan.notes))
    if precision != "int8" and has_qdq:
        raise UsageError(f"this package is quantized (it has Q/DQ nodes); build it with --precision int8, not "
                         f"{precision}", hint="or build from the unquantized package")
    if typed and precision == "fp16" and graph_precision != "fp16":
        why = "TensorRT 11 networks are strongly typed" if trt_version[0] >= 11 else "--strongly-typed was given"
        raise UsageError(f"{why}: an fp16 engine takes its types from the ONNX graph, and this package is "
                         f"{graph_precision}", hint="export an fp16 package: `hbi-export onnx --checkpoint CKPT "
                                                   "--out PKG --precision fp16`, and build from it")
    if typed and precision == "fp32" and graph_precision != "fp32":
        raise UsageError("an fp32 engine from an fp16 package is not possible in a strongly typed network",
                         hint="build --precision fp16, or export an fp32 package")
    flags: tuple[str, ...] = ()
    clear: tuple[str, ...] = ()
    pin = False
    if not typed:
        if precision == "fp16":
            flags, pin = ("FP16", "OBEY_PRECISION_CONSTRAINTS"), True
            notes.append("fp16 with LayerNorm and softmax layers pinned to fp32")
        elif precision == "int8":
            flags = ("INT8", "FP16") if graph_precision == "fp16" else ("INT8",)
        if precision == "fp32" or (precision == "int8" and graph_precision != "fp16"):
            clear = ("TF32",)  # TF32 is on by default and breaks fp32 parity (1e-4)
    drop = plugins_loaded and tuple(trt_version[:2]) < PARSER_PREFERS_PLUGINS
    if drop:
        notes.append("model-local functions of the plugin ops dropped so that the parser picks the plugins")
    if not plugins_loaded:
        notes.append("no hbi plugin library: the custom ops run as their standard-op decompositions")
    return BuildPlan(tuple(trt_version), precision, typed, flags, clear, pin, drop, tuple(notes))


def require_qdq(precision: str, quantized: Mapping[str, bool]) -> None:
    """An int8 build needs at least one quantized (Q/DQ) graph: implicit INT8 calibration is not supported.

    Args:
        precision: the engine precision asked for.
        quantized: graph name -> whether it has Q/DQ nodes.
    """
    if precision == "int8" and not any(quantized.values()):
        raise UsageError("--precision int8 needs a quantized (Q/DQ) package; no graph of this one has "
                         "QuantizeLinear / DequantizeLinear nodes (implicit INT8 calibration is not supported)",
                         hint="make one with `hbi-export calibrate`, then build the engines from that package")


# ----------------------------------------------------------------------------------------------------------------
# 2. The ONNX graph


def has_qdq(model: Any) -> bool:
    """Whether an ``onnx.ModelProto`` has Q/DQ nodes (in the graph or a local function)."""
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    return any(n.op_type in QDQ_OPS and n.domain in ("", "ai.onnx") for n in nodes)


def prepare_onnx(model: Any, *, drop_plugin_functions: bool) -> tuple[Any, list[str]]:
    """Make the hbi nodes resolvable by TensorRT: plugin attributes present; functions dropped when asked.

    Args:
        model: an ``onnx.ModelProto`` (modified in place).
        drop_plugin_functions: remove the model-local functions of PLUGIN_OPS (TensorRT < 10.7 with plugins).
    Returns:
        The model and the names of the functions dropped.
    Raises:
        MismatchError: a node names another plugin namespace or version (nodes without the attributes get them).
    """
    import onnx

    for node in model.graph.node:
        if node.domain != PLUGIN_DOMAIN or node.op_type not in PLUGIN_OPS:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for name, want in (("plugin_namespace", PLUGIN_DOMAIN), ("plugin_version", PLUGIN_VERSION)):
            got = attrs.get(name)
            if got is None:
                node.attribute.append(onnx.helper.make_attribute(name, want))
            elif (got.decode() if isinstance(got, bytes) else str(got)) != want:
                raise MismatchError(f"node {node.name or node.op_type} has {name}={got!r}; the hbi plugins are "
                                    f"{name}={want!r}", hint="re-export the package with this toolkit")
    dropped = []
    if drop_plugin_functions:
        keep = [f for f in model.functions if not (f.domain == PLUGIN_DOMAIN and f.name in PLUGIN_OPS)]
        dropped = sorted(f.name for f in model.functions if f not in keep)
        del model.functions[:]
        model.functions.extend(keep)
    return model, dropped


# ----------------------------------------------------------------------------------------------------------------
# 3. Parse, configure, build


def make_logger(trt: Any, verbose: bool = False) -> Any:
    """A ``trt.ILogger`` that keeps errors (for the build's error message) and prints warnings to stderr."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
                sys.stderr.write(f"[TensorRT] error: {msg}\n")
            elif severity == trt.ILogger.WARNING or verbose:
                sys.stderr.write(f"[TensorRT] {msg}\n")

    return _Logger()


def parser_errors(parser: Any) -> list[str]:
    """Every error of an ``OnnxParser``, with the node it is about."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = err.node_name() or (f"node #{err.node()}" if err.node() >= 0 else "the model")
        op = err.node_operator()
        lines.append(f"{where}{f' ({op})' if op else ''}: {err.desc()}")
    return lines


@dataclass
class BuildResult:
    """A serialized engine and what the build did."""

    engine: bytes
    plugin_layers: int
    pinned_layers: int
    timing_cache_written: bool


def _pin_fp32(trt: Any, network: Any) -> int:
    pinned_types = {getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES}
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in pinned_types:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            count += 1
    return count


def _count_plugin_layers(trt: Any, network: Any) -> int:
    kinds = {getattr(trt.LayerType, n) for n in ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN") if hasattr(trt.LayerType, n)}
    return sum(network.get_layer(i).type in kinds for i in range(network.num_layers))


def _set_profile(builder: Any, config: Any, network: Any, profile: Mapping[str, TensorProfile]) -> None:
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(inputs) != sorted(profile):
        raise MismatchError(f"the parsed network has inputs {inputs}, the package manifest says {sorted(profile)}",
                            hint="re-export the package; a graph must match its manifest entry")
    opt = builder.create_optimization_profile()
    for name, shapes in profile.items():
        opt.set_shape(name, shapes.min, shapes.opt, shapes.max)
    if config.add_optimization_profile(opt) < 0:
        raise UsageError(f"TensorRT refused the optimization profile {{{', '.join(profile)}}}")


def _load_timing_cache(config: Any, path: Path | None) -> None:
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise MismatchError(f"timing cache {path} was made by another TensorRT version or GPU",
                            hint="delete it or pass another --timing-cache; it is rebuilt automatically")


def _save_timing_cache(config: Any, path: Path) -> bool:
    write_atomic(path, bytes(config.get_timing_cache().serialize()))
    return True


def build_serialized(trt: Any, onnx_bytes: bytes, onnx_path: Path, plan: BuildPlan,
                     profile: Mapping[str, TensorProfile], *, workspace_mb: int, timing_cache: Path | None = None,
                     logger: Any = None) -> BuildResult:
    """Parse one ONNX graph and build its engine as ``plan`` says.

    The hbi plugin library, if any, is loaded once per process beforehand
    (:func:`hbi_runtime.backends.tensorrt.load_plugin_library`).

    Raises:
        MismatchError: the parser rejected the graph (every error with its node), the network's inputs are not the
            manifest's, or the timing cache does not fit. HbiError: the build returned nothing (TensorRT's errors
            in the message).
    """
    logger = logger or make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed and plan.trt_version[0] < 11:  # deprecated and ignored from 11: always typed
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes, str(onnx_path)) or parser.num_errors:
        errors = parser_errors(parser) or logger.errors or ["the parser gave no reason"]
        raise MismatchError(f"TensorRT {'.'.join(map(str, plan.trt_version))} cannot parse {onnx_path}: "
                            + "; ".join(errors),
                            hint=f"see which ops this TensorRT lacks: `hbi-export check {onnx_path.parent}`")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for name in plan.flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    pinned = _pin_fp32(trt, network) if plan.pin_fp32 else 0
    _set_profile(builder, config, network, profile)
    _load_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise HbiError(f"TensorRT could not build an engine from {onnx_path}: "
                       f"{'; '.join(logger.errors) or 'no reason given'}",
                       hint="re-run with --debug; a larger --workspace helps when tactics ran out of memory")
    written = _save_timing_cache(config, timing_cache) if timing_cache is not None else False
    return BuildResult(bytes(serialized), _count_plugin_layers(trt, network), pinned, written)
