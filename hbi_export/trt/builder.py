"""Build TensorRT engines from a model package (``hbi-export build-engine``). Needs tensorrt, polygraphy and onnx,
never torch.

The engine is built through NVIDIA's Polygraphy loaders (``polygraphy.backend.trt``): ``NetworkFromOnnxBytes``
(builder, network, ONNX parser, TensorRT's own plugins), ``PostprocessNetwork`` (our network steps below),
``CreateConfig`` (precision flags, TF32, precision constraints, the optimization profile, workspace, timing cache)
and ``EngineBytesFromNetwork`` (the build, the timing cache written back). This module decides what to ask them
for and does what they do not:

1. :func:`plan_build` (pure): from the installed TensorRT version, the wanted precision, the package graph's
   precision and whether it carries Q/DQ nodes, decide the network mode, precisions and TF32:

   * TensorRT 11: networks are always strongly typed (the FP16 / INT8 builder flags, layer precisions and output
     types are gone), so the ONNX types decide: fp16 needs an fp16 package (``hbi-export onnx --precision fp16``),
     int8 a Q/DQ package.
   * TensorRT 10 (>= 10.3), weakly typed (default): fp16 sets ``FP16`` and pins LayerNorm and softmax layers to
     fp32 (layer precision + output type, honoured through ``OBEY_PRECISION_CONSTRAINTS``); int8 sets ``INT8``
     and needs a Q/DQ package (never implicit calibration).
   * TensorRT 10 with ``--strongly-typed``: as TensorRT 11.
   * TF32 (on by default in TensorRT) is cleared for every build that computes in fp32 (fp32 engines, int8
     engines of fp32 graphs), typed or not: fp32 engines are judged by the fp32 gate (1e-4).

   :func:`resolve_precision` turns ``--precision auto`` into one of them: the package's precision under strong
   typing, fp16 where weak typing allows, int8 for a quantized package.

2. :func:`prepare_onnx`: the hbi plugin ops. TensorRT's ONNX parser before 10.7 inlines a model-local function
   in preference to a plugin (docs/tensorrt.md, "Plugins and the ONNX parser"), so when the plugin library is
   loaded on such a version the functions of the plugin ops are dropped before parsing.

3. :func:`build_serialized`: runs the Polygraphy chain that :func:`chain_config` describes (pure data, tested on
   CPU) and :func:`make_loaders` turns into Polygraphy loader objects. Our own code, where Polygraphy has no
   equivalent (docs/tensorrt.md, "Polygraphy and our own code"):

   * the plugin library is registered with ``IPluginRegistry::loadLibrary`` (its ``getCreators`` entry point;
     Polygraphy's ``LoadPlugins`` only ``dlopen``s, which registers nothing in this library): done once per
     process by :func:`hbi_runtime.backends.tensorrt.load_plugin_library` before the chain runs;
   * the fp32 pins select layers by *type* and set layer precision and output types (:func:`pin_fp32_layers`;
     Polygraphy's ``SetLayerPrecisions`` takes layer names and sets the compute precision only): run inside the
     chain by ``PostprocessNetwork``, with the check that the parsed network's inputs are the manifest's;
   * a timing cache from another TensorRT / GPU is refused (:func:`check_timing_cache`; ``CreateConfig`` ignores
     ``set_timing_cache``'s result and would build without it);
   * parser and builder errors come back as our errors naming every failing node (Polygraphy logs them and raises
     a generic exception): :func:`polygraphy_log` collects them.

4. :func:`reproducer_lines`: the ``trtexec`` and ``polygraphy run`` command lines equivalent to the build, stored
   in the engine manifest and printed, to reproduce a problem with NVIDIA's tools.

The ``trt`` argument is the seam: the ``tensorrt`` module in production, a fake in tests (Polygraphy imports
``tensorrt`` itself, so tests put the fake in ``sys.modules``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from hbi_runtime.backends.tensorrt import TRT_HINT
from hbi_runtime.engines import TensorProfile, shape_spec
from hbi_runtime.errors import HbiError, MismatchError, MissingDependencyError, UsageError

PLUGIN_DOMAIN = "hbi"
PLUGIN_OPS = ("WeightedTokenInteraction", "TokenMerge")
PLUGIN_VERSION = "1"
MIN_TRT = (10, 3)
TYPED_ONLY = 11  # from this major version networks are always strongly typed
PARSER_PREFERS_PLUGINS = (10, 7)  # from here the ONNX parser picks a registered plugin over a local function
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX")  # trt.LayerType names pinned to fp32 in weakly typed fp16
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
PRECISIONS = ("fp32", "fp16", "int8")
PRECISION_CHOICES = ("auto", *PRECISIONS)
POLYGRAPHY_MIN = (0, 49, 14)  # Polygraphy's Python-logging switch (polygraphy_log)
POLYGRAPHY_MIN_TRT11 = (0, 50, 3)  # older CreateConfig reads layer precisions, which TensorRT 11 removed
POLYGRAPHY_HINT = ("pip install 'polygraphy>=0.50.3' (NVIDIA's TensorRT toolkit; the GPU extras of hbi-toolkit bring "
                   "it: docs/tensorrt.md, \"Installing\")")
# per-tensor tolerances of the `polygraphy run` reproducer (TensorRT vs ONNX Runtime, --atol / --rtol and the error
# statistic): fp32 as the fp32 gate; fp16 / int8 elementwise tolerances only flag gross differences, the gate is
# the task-level one (hbi-export parity --engine)
REPRO_TOLERANCE = {"fp32": ("1e-4", "1e-4", "max"), "fp16": ("1e-2", "1e-2", "median"),
                   "int8": ("1e-1", "1e-1", "median")}


def parse_version(text: str) -> tuple[int, int, int]:
    """``"10.3.0.26"`` -> ``(10, 3, 0)``."""
    numbers = [int(n) for n in re.findall(r"\d+", str(text))[:3]]
    if len(numbers) < 2:
        raise UsageError(f"cannot read a TensorRT version from {text!r}")
    return tuple((numbers + [0])[:3])  # type: ignore[return-value]


def _dotted(version: Sequence[int]) -> str:
    return ".".join(map(str, version))


# ----------------------------------------------------------------------------------------------------------------
# 1. The plan


@dataclass(frozen=True)
class BuildPlan:
    """How one graph is built: network mode, precisions, TF32, fp32 pins, function dropping."""

    trt_version: tuple[int, int, int]
    precision: str
    strongly_typed: bool
    fp16: bool = False  # BuilderFlag.FP16 (weakly typed only)
    int8: bool = False  # BuilderFlag.INT8 (weakly typed only)
    tf32: bool = True  # TensorRT's default; False for every build that computes in fp32
    pin_fp32: bool = False  # LayerNorm / softmax pinned to fp32, OBEY_PRECISION_CONSTRAINTS
    drop_plugin_functions: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def precision_constraints(self) -> str | None:
        """Polygraphy's ``precision_constraints``: ``"obey"`` with fp32 pins, else None."""
        return "obey" if self.pin_fp32 else None

    @property
    def flags(self) -> tuple[str, ...]:
        """The ``trt.BuilderFlag`` names set (TF32 aside: see :attr:`clear_flags`)."""
        return tuple(n for n, on in (("FP16", self.fp16), ("INT8", self.int8),
                                     ("OBEY_PRECISION_CONSTRAINTS", self.pin_fp32)) if on)

    @property
    def clear_flags(self) -> tuple[str, ...]:
        """The ``trt.BuilderFlag`` names cleared (TF32 is on by default)."""
        return () if self.tf32 else ("TF32",)


def _typed(trt_version: Sequence[int], strongly_typed: bool) -> bool:
    return strongly_typed or trt_version[0] >= TYPED_ONLY


def resolve_precision(requested: str, trt_version: tuple[int, int, int], *, strongly_typed: bool,
                      graph_precisions: Mapping[str, str], quantized: Mapping[str, bool]) -> tuple[str, str | None]:
    """The engine precision for ``--precision`` (``auto`` resolved) and a note saying how ``auto`` was read.

    ``auto``: int8 for a quantized (Q/DQ) package; otherwise, in a strongly typed network (TensorRT 11,
    ``--strongly-typed``), the package's own precision (its loosest graph: fp16 if any graph is fp16), since the
    ONNX types decide there; in a weakly typed one (TensorRT 10), fp16.

    Raises:
        UsageError: not one of ``auto``, ``fp32``, ``fp16``, ``int8``.
    """
    if requested not in PRECISION_CHOICES:
        raise UsageError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return requested, None
    if any(quantized.values()) or "int8" in graph_precisions.values():
        return "int8", "--precision auto: int8 (the package is quantized)"
    if _typed(trt_version, strongly_typed):
        own = "fp16" if "fp16" in graph_precisions.values() else "fp32"
        why = (f"TensorRT {_dotted(trt_version[:2])} networks are strongly typed"
               if trt_version[0] >= TYPED_ONLY else "--strongly-typed")
        more = "" if own == "fp16" else "; `hbi-export onnx --precision fp16` makes a package for fp16 engines"
        return own, f"--precision auto: {own} ({why}: the package's types{more})"
    return "fp16", "--precision auto: fp16 (weakly typed: LayerNorm and softmax pinned to fp32)"


def plan_build(trt_version: tuple[int, int, int], precision: str, *, graph_precision: str, has_qdq: bool,
               strongly_typed: bool = False, plugins_loaded: bool = False) -> BuildPlan:
    """Decide how to build one graph (see the module docstring).

    Args:
        trt_version: the installed TensorRT, ``(major, minor, patch)``.
        precision: ``fp32``, ``fp16`` or ``int8``, the engine wanted (``auto`` is :func:`resolve_precision`'s).
        graph_precision: the package graph's precision from its manifest (``fp32``, ``fp16``, or ``int8`` for the
            Q/DQ graphs of ``hbi-export calibrate``).
        has_qdq: the graph carries QuantizeLinear / DequantizeLinear nodes.
        strongly_typed: ``--strongly-typed`` (TensorRT 10; always so from TensorRT 11).
        plugins_loaded: the hbi plugin library is loaded for this build.
    Raises:
        UsageError: a TensorRT older than 10.3, an unknown precision, or a package that cannot give that
            precision (with the command that makes one that can).
    """
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be fp32, fp16 or int8, got {precision!r}")
    if tuple(trt_version[:2]) < MIN_TRT:
        raise UsageError(f"TensorRT {_dotted(trt_version)} is too old; hbi engines need TensorRT >= "
                         f"{_dotted(MIN_TRT)} (JetPack 6 has 10.3)", hint=TRT_HINT)
    typed = _typed(trt_version, strongly_typed)
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
        why = (f"TensorRT {trt_version[0]} networks are strongly typed" if trt_version[0] >= TYPED_ONLY
               else "--strongly-typed was given")
        raise UsageError(f"{why}: an fp16 engine takes its types from the ONNX graph, and this package is "
                         f"{graph_precision}", hint="export an fp16 package: `hbi-export onnx --checkpoint CKPT "
                                                   "--out PKG --precision fp16`, and build from it (or build "
                                                   "--precision auto: this package's own precision)")
    if typed and precision == "fp32" and graph_precision != "fp32":
        raise UsageError("an fp32 engine from an fp16 package is not possible in a strongly typed network",
                         hint="build --precision fp16 (or auto), or export an fp32 package")
    fp32_compute = precision == "fp32" or (precision == "int8" and graph_precision != "fp16")
    fp16 = not typed and (precision == "fp16" or (precision == "int8" and graph_precision == "fp16"))
    int8 = not typed and precision == "int8"
    pin = not typed and precision == "fp16"
    if pin:
        notes.append("fp16 with LayerNorm and softmax layers pinned to fp32")
    drop = plugins_loaded and tuple(trt_version[:2]) < PARSER_PREFERS_PLUGINS
    if drop:
        notes.append("model-local functions of the plugin ops dropped so that the parser picks the plugins")
    if not plugins_loaded:
        notes.append("no hbi plugin library: the custom ops run as their standard-op decompositions")
    return BuildPlan(tuple(trt_version), precision, typed, fp16=fp16, int8=int8, tf32=not fp32_compute,
                     pin_fp32=pin, drop_plugin_functions=drop, notes=tuple(notes))


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
# 3. The Polygraphy chain


def import_polygraphy(trt_version: Sequence[int] | None = None) -> Any:
    """``polygraphy.backend.trt``, or MissingDependencyError with the install hint (also for a Polygraphy too old
    for this code, or for TensorRT 11 when ``trt_version`` says so)."""
    try:
        import polygraphy
        from polygraphy.backend import trt as polygraphy_trt
    except ImportError as exc:
        raise MissingDependencyError(f"polygraphy is not installed ({exc}); building engines needs it",
                                     hint=POLYGRAPHY_HINT) from exc
    have = parse_version(getattr(polygraphy, "__version__", "0.0.0"))
    need = POLYGRAPHY_MIN_TRT11 if trt_version is not None and trt_version[0] >= TYPED_ONLY else POLYGRAPHY_MIN
    if have < need:
        what = f" with TensorRT {_dotted(trt_version)}" if need == POLYGRAPHY_MIN_TRT11 else ""
        raise MissingDependencyError(f"polygraphy {_dotted(have)} is too old{what}; hbi needs >= {_dotted(need)}",
                                     hint=POLYGRAPHY_HINT)
    return polygraphy_trt


@dataclass(frozen=True)
class ChainConfig:
    """The Polygraphy loader chain of one build, as data (names, not TensorRT objects):

    ``NetworkFromOnnxBytes(onnx, **network)`` -> ``PostprocessNetwork(hbi network steps)`` ->
    ``EngineBytesFromNetwork(network, CreateConfig(**config), save_timing_cache=save_timing_cache)``.

    ``config["memory_pool_limits"]`` maps ``trt.MemoryPoolType`` names to bytes; ``config["profiles"]`` is a list
    of ``{input: (min, opt, max)}``.
    """

    network: dict
    config: dict
    save_timing_cache: str | None
    pin_fp32: bool


def chain_config(plan: BuildPlan, profile: Mapping[str, TensorProfile], *, workspace_mb: int,
                 timing_cache: Path | None = None) -> ChainConfig:
    """What the Polygraphy loaders are asked for to build as ``plan`` says (pure; see :class:`ChainConfig`)."""
    cache = str(timing_cache) if timing_cache is not None else None
    # the strongly-typed creation flag is deprecated and ignored from TensorRT 11 (always typed): not asked for there
    typed_flag = plan.strongly_typed and plan.trt_version[0] < TYPED_ONLY
    return ChainConfig(
        network={"strongly_typed": typed_flag},
        config={"tf32": plan.tf32, "fp16": plan.fp16, "int8": plan.int8,
                "precision_constraints": plan.precision_constraints,
                "profiles": [{name: (p.min, p.opt, p.max) for name, p in profile.items()}],
                "memory_pool_limits": {"WORKSPACE": int(workspace_mb) << 20},
                "load_timing_cache": cache},
        save_timing_cache=cache, pin_fp32=plan.pin_fp32)


def pin_fp32_layers(trt: Any, network: Any) -> list[tuple[str, int]]:
    """Pin every LayerNorm and softmax layer to fp32: layer precision and every output type. Returns the
    ``(name, number of outputs)`` of each layer pinned (for the reproducer lines)."""
    pinned_types = {getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES}
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in pinned_types:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned.append((layer.name, layer.num_outputs))
    return pinned


def polygraphy_pin_fp32(network: Any) -> None:
    """The fp32 pins as a Polygraphy network post-processing script (``polygraphy run --trt-npps
    .../builder.py:polygraphy_pin_fp32``): the reproducer lines run exactly our pinning."""
    import tensorrt

    pin_fp32_layers(tensorrt, network)


def count_plugin_layers(trt: Any, network: Any) -> int:
    kinds = {getattr(trt.LayerType, n) for n in ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN") if hasattr(trt.LayerType, n)}
    return sum(network.get_layer(i).type in kinds for i in range(network.num_layers))


@dataclass
class NetworkFacts:
    """What the hbi network steps saw (filled when the chain runs)."""

    inputs: list[str] = field(default_factory=list)
    pinned: list[tuple[str, int]] = field(default_factory=list)
    plugin_layers: int = 0


def network_steps(trt: Any, chain: ChainConfig, expected_inputs: Sequence[str],
                  facts: NetworkFacts) -> Callable[..., None]:
    """Our step of the chain, run by Polygraphy's ``PostprocessNetwork`` on the parsed network: check its inputs
    against the manifest, pin fp32 layers when asked, count plugin layers."""

    def hbi_network_steps(network: Any) -> None:
        facts.inputs = [network.get_input(i).name for i in range(network.num_inputs)]
        if sorted(facts.inputs) != sorted(expected_inputs):
            raise MismatchError(f"the parsed network has inputs {facts.inputs}, the package manifest says "
                                f"{sorted(expected_inputs)}",
                                hint="re-export the package; a graph must match its manifest entry")
        if chain.pin_fp32:
            facts.pinned = pin_fp32_layers(trt, network)
        facts.plugin_layers = count_plugin_layers(trt, network)

    return hbi_network_steps


@dataclass
class Loaders:
    """The Polygraphy loader objects of one build: ``network()`` parses, ``engine(network)`` builds."""

    network: Any
    config: Any
    engine: Callable[[Any], Any]
    facts: NetworkFacts


def make_loaders(trt: Any, chain: ChainConfig, onnx_bytes: bytes, expected_inputs: Sequence[str]) -> Loaders:
    """Polygraphy's loaders for ``chain`` (``trt`` names the pools and must be the module Polygraphy imports)."""
    ptrt = import_polygraphy()
    facts = NetworkFacts()
    parsed = ptrt.NetworkFromOnnxBytes(onnx_bytes, **chain.network)
    network = ptrt.PostprocessNetwork(parsed, func=network_steps(trt, chain, expected_inputs, facts),
                                      name="hbi network steps")
    config_args = dict(chain.config)
    profiles = []
    for shapes in config_args.pop("profiles"):
        profile = ptrt.Profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.add(name, min=list(lo), opt=list(opt), max=list(hi))
        profiles.append(profile)
    pools = {getattr(trt.MemoryPoolType, name): size for name, size in config_args.pop("memory_pool_limits").items()}
    config = ptrt.CreateConfig(profiles=profiles, memory_pool_limits=pools, **config_args)

    def engine(built_network: Any) -> Any:
        return ptrt.EngineBytesFromNetwork(built_network, config=config, save_timing_cache=chain.save_timing_cache)()

    return Loaders(network, config, engine, facts)


class _Collect(logging.Handler):
    """Polygraphy's log during a build (TensorRT's own messages included): errors kept for the error message,
    warnings for the build report; everything from INFO on echoed to stderr when verbose."""

    PREFIX = re.compile(r"^\s*\[[A-Z!]\]\s*")

    def __init__(self, verbose: bool) -> None:
        super().__init__(logging.INFO if verbose else logging.WARNING)
        self.verbose = verbose
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = self.PREFIX.sub("", record.getMessage()).strip()
        kept = self.errors if record.levelno >= logging.ERROR else self.warnings
        # CRITICAL is Polygraphy's own summary, raised as its exception; the errors before it are the reasons
        backtrace = text.startswith(("File \"", "Traceback"))  # G_LOGGER.backtrace() before a critical
        if logging.WARNING <= record.levelno < logging.CRITICAL and text and not backtrace and text not in kept:
            kept.append(text)
        if self.verbose:
            sys.stderr.write(f"[polygraphy] {text}\n")


@contextlib.contextmanager
def polygraphy_log(verbose: bool = False) -> Iterator[_Collect]:
    """Route Polygraphy's log (stdout by default: it would corrupt ``--format json``) through Python logging to
    stderr for the duration, and collect its errors (parser errors, TensorRT's own errors)."""
    from polygraphy.logger import G_LOGGER

    handler = _Collect(verbose)
    logger = logging.getLogger("Polygraphy")
    before = (G_LOGGER.use_python_logging_system, logger.level, logger.propagate, G_LOGGER.colors)
    G_LOGGER.use_python_logging_system = True
    G_LOGGER.colors = False  # else it prints a note about the 'colored' module to stdout
    logger.setLevel(handler.level)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        G_LOGGER.use_python_logging_system = before[0]
        logger.setLevel(before[1])
        logger.propagate = before[2]
        G_LOGGER.colors = before[3]


def check_timing_cache(trt: Any, path: Path | None) -> None:
    """Refuse a timing cache made by another TensorRT version or GPU (``CreateConfig`` would ignore it silently).

    Raises:
        MismatchError: TensorRT cannot read it or will not use it here.
    """
    if path is None or not Path(path).is_file():
        return
    from polygraphy.backend.trt import util as trt_util

    builder = trt.Builder(trt_util.get_trt_logger())
    config = builder.create_builder_config()
    cache = config.create_timing_cache(Path(path).read_bytes())
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise MismatchError(f"timing cache {path} was made by another TensorRT version or GPU",
                            hint="delete it or pass another --timing-cache; it is rebuilt automatically")


@dataclass
class BuildResult:
    """A serialized engine and what the build did."""

    engine: bytes
    plugin_layers: int
    pinned_layers: int
    timing_cache_written: bool
    pinned: list[tuple[str, int]] = field(default_factory=list)
    chain: ChainConfig | None = None
    warnings: list[str] = field(default_factory=list)


def build_serialized(trt: Any, onnx_bytes: bytes, onnx_path: Path, plan: BuildPlan,
                     profile: Mapping[str, TensorProfile], *, workspace_mb: int, timing_cache: Path | None = None,
                     verbose: bool = False) -> BuildResult:
    """Parse one ONNX graph and build its engine as ``plan`` says, through the Polygraphy chain.

    The hbi plugin library, if any, is loaded once per process beforehand
    (:func:`hbi_runtime.backends.tensorrt.load_plugin_library`).

    Raises:
        MissingDependencyError: no polygraphy. MismatchError: the parser rejected the graph (every error with its
        node), the network's inputs are not the manifest's, or the timing cache does not fit. HbiError: the build
        returned nothing (TensorRT's errors in the message).
    """
    chain = chain_config(plan, profile, workspace_mb=workspace_mb, timing_cache=timing_cache)
    import_polygraphy()
    from polygraphy.exception import PolygraphyException

    version = _dotted(plan.trt_version)
    with polygraphy_log(verbose) as log:  # the loaders log from their constructors on
        loaders = make_loaders(trt, chain, onnx_bytes, list(profile))
        try:
            network = loaders.network()
        except PolygraphyException as exc:
            raise MismatchError(f"TensorRT {version} cannot parse {onnx_path}: "
                                + "; ".join(log.errors or [str(exc)]),
                                hint=f"see which ops this TensorRT lacks: `hbi-export check {onnx_path.parent}`"
                                ) from None
        check_timing_cache(trt, timing_cache)
        try:
            serialized = loaders.engine(network)
        except PolygraphyException as exc:
            reasons = log.errors or [str(exc)]
            raise HbiError(f"TensorRT could not build an engine from {onnx_path}: {'; '.join(reasons)}",
                           hint="re-run with --debug; a larger --workspace helps when tactics ran out of memory"
                           ) from None
    return BuildResult(bytes(serialized), loaders.facts.plugin_layers, len(loaders.facts.pinned),
                       timing_cache is not None, list(loaders.facts.pinned), chain, list(log.warnings))


# ----------------------------------------------------------------------------------------------------------------
# 4. The same build with NVIDIA's tools


def _polygraphy_shapes(profile: Mapping[str, TensorProfile], which: str) -> list[str]:
    return [f"{name}:[{','.join(str(d) for d in getattr(p, which))}]" for name, p in profile.items()]


def dlopen_variant(plugins: str) -> str:
    """The plugin library that registers itself when dlopened (``libhbi_trt_plugins_dlopen.so``, from the same
    build: docs/tensorrt.md, "Plugin libraries per host"), for hosts such as ``polygraphy run --plugins``, next to the
    ``loadLibrary`` one the build used."""
    path = Path(plugins)
    if path.name.endswith("_dlopen.so"):
        return plugins
    stem = path.name[:-3] if path.name.endswith(".so") else path.name
    return str(path.with_name(f"{stem}_dlopen.so"))


def reproducer_lines(plan: BuildPlan, profile: Mapping[str, TensorProfile], *, onnx: str, package_onnx: str,
                     workspace_mb: int, timing_cache: str | None = None, plugins: str | None = None,
                     pinned: Sequence[tuple[str, int]] = ()) -> dict[str, str]:
    """The ``trtexec`` and ``polygraphy run`` command lines that build the same engine (pure).

    Args:
        plan: the build plan.
        profile: the optimization profile.
        onnx: the graph as TensorRT parsed it (the package's file, or the prepared copy when functions were
            dropped).
        package_onnx: the package's graph (ONNX Runtime's side of the polygraphy comparison).
        workspace_mb: the builder workspace.
        timing_cache: the timing cache file, if any.
        plugins: the hbi plugin library, if any (``polygraphy run`` gets its dlopen variant).
        pinned: ``(layer name, outputs)`` of the layers pinned to fp32.
    Returns:
        ``{"onnx": onnx, "trtexec": ..., "polygraphy": ...}``.
    """
    q = shlex.quote
    weak_10 = not plan.strongly_typed
    trtexec = ["trtexec", f"--onnx={onnx}", f"--minShapes={shape_spec(profile, 'min')}",
               f"--optShapes={shape_spec(profile, 'opt')}", f"--maxShapes={shape_spec(profile, 'max')}",
               f"--memPoolSize=workspace:{int(workspace_mb)}M"]
    if plan.strongly_typed and plan.trt_version[0] < TYPED_ONLY:
        trtexec.append("--stronglyTyped")
    if weak_10 and plan.fp16:
        trtexec.append("--fp16")
    if weak_10 and plan.int8:
        trtexec.append("--int8")
    if not plan.tf32:
        trtexec.append("--noTF32")
    if plan.pin_fp32 and pinned:
        trtexec += ["--precisionConstraints=obey", "--layerPrecisions=" + ",".join(f"{n}:fp32" for n, _ in pinned),
                    "--layerOutputTypes=" + ",".join(f"{n}:{'+'.join(['fp32'] * max(k, 1))}" for n, k in pinned)]
    if timing_cache:
        trtexec.append(f"--timingCacheFile={timing_cache}")
    if plugins:
        trtexec.append(f"--dynamicPlugins={plugins}")

    atol, rtol, stat = REPRO_TOLERANCE[plan.precision]
    shapes = ["--input-shapes", *_polygraphy_shapes(profile, "opt")]
    trt_side = ["--trt", "--trt-min-shapes", *_polygraphy_shapes(profile, "min"),
                "--trt-opt-shapes", *_polygraphy_shapes(profile, "opt"),
                "--trt-max-shapes", *_polygraphy_shapes(profile, "max"),
                "--pool-limit", f"workspace:{int(workspace_mb)}M"]
    if plan.strongly_typed and plan.trt_version[0] < TYPED_ONLY:
        trt_side.append("--strongly-typed")
    trt_side += [f for f, on in (("--fp16", plan.fp16), ("--int8", plan.int8), ("--tf32", plan.tf32)) if on]
    if plan.pin_fp32:
        trt_side += ["--precision-constraints", "obey", "--trt-npps",
                     f"{Path(__file__).resolve()}:polygraphy_pin_fp32"]
    if timing_cache:
        trt_side += ["--load-timing-cache", timing_cache, "--save-timing-cache", timing_cache]
    if plugins:  # Polygraphy dlopens plugin libraries: the variant that registers itself on load
        trt_side += ["--plugins", dlopen_variant(plugins)]
    compare = ["--atol", atol, "--rtol", rtol, "--check-error-stat", stat]
    if onnx == package_onnx:
        polygraphy = [["polygraphy", "run", onnx, *trt_side, "--onnxrt", *shapes, *compare]]
    else:  # ONNX Runtime cannot run the graph without its functions: compare against its saved outputs
        outputs = str(Path(onnx).with_suffix(".onnxrt-outputs.json"))
        polygraphy = [["polygraphy", "run", package_onnx, "--onnxrt", *shapes, "--save-outputs", outputs],
                      ["polygraphy", "run", onnx, *trt_side, *shapes, "--load-outputs", outputs, *compare]]
    return {"onnx": onnx, "trtexec": " ".join(q(a) for a in trtexec),
            "polygraphy": " && ".join(" ".join(q(a) for a in cmd) for cmd in polygraphy)}
