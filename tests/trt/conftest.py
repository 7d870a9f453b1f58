"""A fake ``tensorrt`` module and a fake GPU, as strict as the real ones where our code depends on them.

The fake is *version-faithful*: ``FakeTrt("10.3.0.26")``, ``FakeTrt("10.16.0.1")`` and ``FakeTrt("11.1.0.5")``
offer the API of TensorRT's public headers for that version (``$HBI_TRT_HEADERS_ROOT/<version>/include``) and
reject what the real one rejects:

=============================================  ===========  ===========  =====================================
                                               10.3         10.16        11.1
=============================================  ===========  ===========  =====================================
``BuilderFlag.FP16 / INT8 / BF16 / FP8``       yes          yes (depr.)  absent
``BuilderFlag.OBEY / PREFER_PRECISION_...``    yes          yes (depr.)  absent
``BuilderFlag.TF32`` (value), default on       6, on        6, on        6, on
``NetworkDefinitionCreationFlag``              EXPLICIT_    + PREFER_    STRONGLY_TYPED=0 (deprecated,
                                               BATCH=0,     JIT/AOT_     ignored: always typed), PREFER_JIT=1,
                                               STRONGLY_    PYTHON_      PREFER_AOT=2; no EXPLICIT_BATCH
                                               TYPED=1      PLUGINS=2,3
``layer.precision`` / ``precision_is_set`` /   yes; errors  yes (depr.)  absent (``get_output_type`` only)
``set_output_type``                            on a typed
                                               network
precision flags on a strongly typed network    build fails  build fails  (no such flags)
``config.int8_calibrator``                     yes          yes          absent
ONNX parser: hbi node with a local function    inlines the  plugin if    plugin if registered, else inlines
                                               function     registered,
                                                            else inlines
ONNX parser: hbi node, no function, no plugin  error        error        error
=============================================  ===========  ===========  =====================================

Also strict where the real one is: ``load_library`` refuses a file that is not a plugin library (ELF with
``getCreators``) and a second load of the same library; ``set_input_shape`` refuses shapes outside the engine's
profile (or of another rank / static size) and returns False; ``execute_async_v3`` refuses an incompletely
specified context; a build without a profile for dynamic inputs, or with a profile outside min <= opt <= max,
fails; a timing cache from another version is not used (``set_timing_cache`` returns False); a plan from another
TensorRT version, or one with plugin layers when the plugin library is not loaded, does not deserialize.

The fake GPU (:class:`FakeDevice`, standing for ``hbi_runtime.backends.cuda.Cuda``) is *asynchronous* like CUDA:
copies and engine executions are queued on their stream and run only at ``synchronize`` (a captured CUDA graph
is queued when launched), so host buffers read before a synchronize hold stale data.

It is not TensorRT: nothing is compiled; a "built engine" runs its ONNX graph with ONNX Runtime (plugin layers
through the op's model-local function). Polygraphy's loaders run unchanged on this fake (they import
``tensorrt``: the ``polygraphy_trt`` fixture puts the fake in ``sys.modules``).
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from hbi_runtime.backends import tensorrt as trt_backend
from hbi_runtime.backends.cuda import DeviceInfo

DEMO_PACKAGE = Path(trt_backend.__file__).resolve().parents[1] / "data" / "demo" / "package"
ENGINE_MAGIC = b"FAKETRT-PLAN\n"
CACHE_MAGIC = b"FAKETRT-CACHE:"

_BUILDER_FLAGS_10 = ["FP16", "INT8", "DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32",
                     "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS",
                     "DIRECT_IO", "REJECT_EMPTY_ALGORITHMS", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME", "FP8",
                     "ERROR_ON_TIMING_CACHE_MISS", "BF16", "DISABLE_COMPILATION_CACHE", "STRIP_PLAN",
                     "REFIT_IDENTICAL", "WEIGHT_STREAMING", "INT4", "REFIT_INDIVIDUAL"]
BUILDER_FLAGS = {  # name -> value, from NvInfer.h of each version
    (10, 3): {n: i for i, n in enumerate(_BUILDER_FLAGS_10)},
    (10, 16): {**{n: i for i, n in enumerate(_BUILDER_FLAGS_10)}, "STRICT_NANS": 24, "MONITOR_MEMORY": 25,
               "FP4": 26, "EDITABLE_TIMING_CACHE": 27, "DISTRIBUTIVE_INDEPENDENCE": 28},
    (11, 1): {"DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4, "DISABLE_TIMING_CACHE": 5, "TF32": 6, "SPARSE_WEIGHTS": 7,
              "SAFETY_SCOPE": 8, "DIRECT_IO": 11, "VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13,
              "ERROR_ON_TIMING_CACHE_MISS": 15, "DISABLE_COMPILATION_CACHE": 17, "STRIP_PLAN": 18,
              "REFIT_IDENTICAL": 19, "WEIGHT_STREAMING": 20, "REFIT_INDIVIDUAL": 22, "STRICT_NANS": 23,
              "MONITOR_MEMORY": 24, "EDITABLE_TIMING_CACHE": 26, "DISTRIBUTIVE_INDEPENDENCE": 27},
}
NETWORK_FLAGS = {
    (10, 3): {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1},
    (10, 16): {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2,
               "PREFER_AOT_PYTHON_PLUGINS": 3},
    (11, 1): {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2},
}
PRECISION_FLAGS = ("FP16", "INT8", "BF16", "FP8", "INT4", "FP4")
LAYER_TYPES = ["CONVOLUTION", "CAST", "ACTIVATION", "POOLING", "LRN", "SCALE", "SOFTMAX", "DECONVOLUTION",
               "CONCATENATION", "ELEMENTWISE", "PLUGIN", "UNARY", "PADDING", "SHUFFLE", "REDUCE", "TOPK", "GATHER",
               "MATRIX_MULTIPLY", "RAGGED_SOFTMAX", "CONSTANT", "IDENTITY", "PLUGIN_V2", "SLICE", "SHAPE",
               "PARAMETRIC_RELU", "RESIZE", "TRIP_LIMIT", "RECURRENCE", "ITERATOR", "LOOP_OUTPUT", "SELECT", "FILL",
               "QUANTIZE", "DEQUANTIZE", "CONDITION", "CONDITIONAL_INPUT", "CONDITIONAL_OUTPUT", "SCATTER",
               "EINSUM", "ASSERTION", "ONE_HOT", "NON_ZERO", "GRID_SAMPLE", "NMS", "REVERSE_SEQUENCE",
               "NORMALIZATION", "PLUGIN_V3"]
ONNX_LAYER = {"LayerNormalization": "NORMALIZATION", "Softmax": "SOFTMAX", "MatMul": "MATRIX_MULTIPLY",
              "Gemm": "MATRIX_MULTIPLY", "QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE",
              "TopK": "TOPK", "Gather": "GATHER", "Cast": "CAST", "Constant": "CONSTANT", "Shape": "SHAPE",
              "Reshape": "SHUFFLE", "Transpose": "SHUFFLE", "ReduceSum": "REDUCE", "ReduceMax": "REDUCE",
              "ReduceMean": "REDUCE", "ReduceMin": "REDUCE", "Where": "SELECT", "Conv": "CONVOLUTION"}
DATA_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
              "UINT8": np.uint8, "INT64": np.int64}
ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 3: "INT8", 6: "INT32", 9: "BOOL", 2: "UINT8", 7: "INT64"}


class _Member:
    def __init__(self, enum: str, name: str, value: int) -> None:
        self.enum, self.name, self.value = enum, name, value

    def __int__(self) -> int:
        return self.value

    def __index__(self) -> int:
        return self.value

    def __eq__(self, other) -> bool:
        return isinstance(other, _Member) and (other.enum, other.value) == (self.enum, self.value)

    def __hash__(self) -> int:
        return hash((self.enum, self.value))

    def __repr__(self) -> str:
        return f"{self.enum}.{self.name}"


class _Enum:
    """A pybind11-like enum: members as attributes, ``__members__``; a missing member is an AttributeError."""

    def __init__(self, enum: str, members: dict[str, int] | list[str]) -> None:
        items = members.items() if isinstance(members, dict) else ((n, i) for i, n in enumerate(members))
        self.__members__ = {n: _Member(enum, n, v) for n, v in items}
        for n, m in self.__members__.items():
            setattr(self, n, m)


class FakeParserError:
    """``trt.ParserError``: its accessors and the string form Polygraphy logs."""

    def __init__(self, node_name: str, op: str, desc: str, node: int = 3,
                 code: str = "UNSUPPORTED_NODE") -> None:
        self._n, self._op, self._desc, self._node, self._code = node_name, op, desc, node, code

    def node_name(self) -> str:
        return self._n

    def node(self) -> int:
        return self._node

    def node_operator(self) -> str:
        return self._op

    def desc(self) -> str:
        return self._desc

    def __str__(self) -> str:
        return (f"In node {self._node} with name: {self._n} and operator: {self._op} (parseNode): "
                f"{self._code}: {self._desc}")


class FakeTensor:
    def __init__(self, name: str, shape: tuple, dtype) -> None:
        self.name, self.shape, self.dtype = name, tuple(shape), dtype
        self.is_shape_tensor = False


class FakeLayer:
    """``trt.ILayer``: precision / output types on TensorRT 10 only (``__slots__``: assigning an attribute the
    version lacks is an AttributeError, as on a pybind11 object)."""

    __slots__ = ("_trt", "_network", "type", "name", "num_outputs", "_precision", "output_types")

    def __init__(self, trt, network, kind, name: str, outputs: int = 1) -> None:
        self._trt, self._network = trt, network
        self.type, self.name, self.num_outputs = kind, name, outputs
        self._precision = None
        self.output_types: dict[int, object] = {}

    def _api10(self, what: str) -> None:
        if self._trt.major >= 11:
            raise AttributeError(f"'tensorrt.ILayer' object has no attribute '{what}' (TensorRT "
                                 f"{self._trt.__version__})")
        if self._network.strongly_typed:
            self._network.errors.append(f"{what}: strongly typed networks reject layer precisions and output "
                                        f"types (layer {self.name})")

    @property
    def precision(self):
        if self._trt.major >= 11:
            raise AttributeError("'tensorrt.ILayer' object has no attribute 'precision'")
        return self._precision if self._precision is not None else self._trt.float32

    @precision.setter
    def precision(self, dtype) -> None:
        self._api10("precision")
        self._precision = dtype

    @property
    def precision_is_set(self) -> bool:
        if self._trt.major >= 11:
            raise AttributeError("'tensorrt.ILayer' object has no attribute 'precision_is_set'")
        return self._precision is not None

    def set_output_type(self, index: int, dtype) -> None:
        self._api10("set_output_type")
        if not 0 <= index < self.num_outputs:
            raise IndexError(index)
        self.output_types[index] = dtype

    def get_output_type(self, index: int):
        return self.output_types.get(index, self._trt.float32)


class FakeNetwork:
    def __init__(self, trt, flags: int) -> None:
        self.trt, self.flags = trt, flags
        known = sum(1 << m.value for m in trt.NetworkDefinitionCreationFlag.__members__.values())
        if flags & ~known:
            raise ValueError(f"unknown network creation flags {flags:#x} for TensorRT {trt.__version__}")
        typed_bit = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        self.strongly_typed = trt.major >= 11 or bool(flags & typed_bit)
        self.layers: list[FakeLayer] = []
        self.inputs: list[FakeTensor] = []
        self.outputs: list[FakeTensor] = []
        self.errors: list[str] = []
        self.onnx: bytes | None = None

    def get_flag(self, flag) -> bool:
        return bool(self.flags & (1 << int(flag)))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> FakeLayer:
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> FakeTensor:
        return self.inputs[i]

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_output(self, i: int) -> FakeTensor:
        return self.outputs[i]


class HostMemory(bytes):
    """``trt.IHostMemory``: a buffer (file.write takes it), truthy when not empty, a context manager."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    @property
    def nbytes(self) -> int:
        return len(self)


class FakeTrt:
    """The ``tensorrt`` module of one version (see the module docstring)."""

    def __init__(self, version: str = "10.3.0.26") -> None:
        self.__version__ = version
        parts = [int(p) for p in version.split(".")[:2]]
        self.major, self.minor = parts
        key = (10, 3) if (self.major, self.minor) < (10, 16) else ((10, 16) if self.major == 10 else (11, 1))
        self.BuilderFlag = _Enum("BuilderFlag", BUILDER_FLAGS[key])
        self.NetworkDefinitionCreationFlag = _Enum("NetworkDefinitionCreationFlag", NETWORK_FLAGS[key])
        self.LayerType = _Enum("LayerType", LAYER_TYPES)
        self.MemoryPoolType = _Enum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1, "DLA_LOCAL_DRAM": 2,
                                                       "DLA_GLOBAL_DRAM": 3, "TACTIC_DRAM": 4,
                                                       "TACTIC_SHARED_MEMORY": 5})
        self.DeviceType = _Enum("DeviceType", ["GPU", "DLA"])
        self.OnnxParserFlag = _Enum("OnnxParserFlag", ["NATIVE_INSTANCENORM",
                                                       "ENABLE_UINT8_AND_ASYMMETRIC_QUANTIZATION_DLA",
                                                       "REPORT_CAPABILITY_DLA", "ENABLE_PLUGIN_OVERRIDE",
                                                       "ADJUST_FOR_DLA"])
        self.TensorIOMode = _Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
        self.DataType = _Enum("DataType", ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "FP8", "BF16",
                                           "INT64", "INT4"])
        self.float32, self.float16 = self.DataType.FLOAT, self.DataType.HALF
        self.int8, self.int32, self.int64, self.bool = (self.DataType.INT8, self.DataType.INT32,
                                                        self.DataType.INT64, self.DataType.BOOL)
        # test controls
        self.parse_errors: list[FakeParserError] = []
        self.ParserError = FakeParserError  # tests inject errors with fake.ParserError(node, op, desc)
        self.fail_build = False
        self.fail_execute = False
        self.tensor_renames: dict[str, str] = {}  # engines deserialize with these I/O names instead
        self.loaded_libraries: list[str] = []
        self.builds: list[dict] = []
        self.logged: list[tuple[int, str]] = []
        self.device = None  # the FakeDevice engines run on (tests set it)
        fake = self

        class ILogger:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

            def __init__(self, *args) -> None:
                pass

            def log(self, severity, msg) -> None:
                pass

        class Logger(ILogger):
            def __init__(self, min_severity=ILogger.WARNING) -> None:
                super().__init__()
                self.min_severity = min_severity

        self.ILogger, self.Logger = ILogger, Logger

        def log(logger, severity: int, msg: str) -> None:
            fake.logged.append((severity, msg))
            if logger is not None:
                logger.log(severity, msg)

        self._log = log

        class Registry:
            def __init__(self) -> None:
                self.creators: set[tuple[str, str, str]] = set()

            def load_library(self, path: str):
                data = Path(path).read_bytes() if Path(path).is_file() else b""
                if not data.startswith(b"\x7fELF") or b"getCreators" not in data:
                    log(None, ILogger.ERROR, f"{path}: not a plugin library (no getCreators)")
                    return None
                if path in fake.loaded_libraries:
                    log(None, ILogger.ERROR, f"{path}: its plugin creators are registered already")
                    return None
                fake.loaded_libraries.append(path)
                self.creators |= {(op, "1", "hbi") for op in ("WeightedTokenInteraction", "TokenMerge")}
                return object()

        self._registry = Registry()

        class Parser:
            def __init__(self, network: FakeNetwork, logger) -> None:
                self.network, self.logger, self.errors = network, logger, []
                self.flags = 1 << int(fake.OnnxParserFlag.NATIVE_INSTANCENORM)

            def clear_flag(self, flag) -> None:
                self.flags &= ~(1 << int(flag))

            def _plugin_for(self, node) -> bool:
                import onnx

                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                key = (node.op_type, attrs.get("plugin_version", b"1").decode(),
                       attrs.get("plugin_namespace", b"").decode())
                return key in fake._registry.creators

            def parse(self, data: bytes, path: str | None = None) -> bool:
                import onnx

                model = onnx.load_from_string(bytes(data))
                functions = {(f.domain, f.name) for f in model.functions}
                net = self.network
                net.onnx = bytes(data)
                for value in model.graph.input:
                    dims = tuple(d.dim_value if d.HasField("dim_value") else -1
                                 for d in value.type.tensor_type.shape.dim)
                    dtype = getattr(fake.DataType, ONNX_TO_TRT[value.type.tensor_type.elem_type])
                    net.inputs.append(FakeTensor(value.name, dims, dtype))
                for value in model.graph.output:
                    dims = tuple(d.dim_value if d.HasField("dim_value") else -1
                                 for d in value.type.tensor_type.shape.dim)
                    net.outputs.append(FakeTensor(value.name, dims,
                                                  getattr(fake.DataType,
                                                          ONNX_TO_TRT[value.type.tensor_type.elem_type])))
                self.errors = list(fake.parse_errors)
                prefers_plugins = (fake.major, fake.minor) >= (10, 7)
                for i, node in enumerate(model.graph.node):
                    kind = fake.LayerType.ELEMENTWISE
                    if node.domain == "hbi":
                        has_function = (node.domain, node.op_type) in functions
                        plugin = self._plugin_for(node)
                        if plugin and (prefers_plugins or not has_function):
                            kind = fake.LayerType.PLUGIN_V3
                        elif not has_function:
                            self.errors.append(FakeParserError(
                                node.name, node.op_type, 'Assertion failed: creator && "Plugin not found, are the '
                                'plugin name, version, and namespace correct?"', node=i))
                            continue
                    else:
                        kind = getattr(fake.LayerType, ONNX_LAYER.get(node.op_type, "ELEMENTWISE"))
                    net.layers.append(FakeLayer(fake, net, kind, node.name or f"{node.op_type}_{i}",
                                                max(len([o for o in node.output if o]), 1)))
                for e in self.errors:
                    log(self.logger, ILogger.ERROR, str(e))
                return not self.errors

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def get_error(self, i: int) -> FakeParserError:
                return self.errors[i]

        self.OnnxParser = Parser

        class TimingCache:
            def __init__(self, tag: str, entries: int) -> None:
                self.tag, self.entries = tag, entries

            def serialize(self) -> HostMemory:
                return HostMemory(CACHE_MAGIC + f"{self.tag}:{self.entries}".encode())

            def combine(self, other: TimingCache, ignore_mismatch: bool) -> bool:
                if other.tag != self.tag and not ignore_mismatch:
                    return False
                if other.tag == self.tag:
                    self.entries = max(self.entries, other.entries)
                return True

        class Profile:
            def __init__(self) -> None:
                self.shapes: dict[str, tuple] = {}

            def set_shape(self, name, lo, opt, hi) -> None:
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Config:
            def __init__(self) -> None:
                self.flags: set[str] = {"TF32"}  # on by default, as in TensorRT
                self.pools: dict[str, int] = {}
                self.profiles: list[Profile] = []
                self.cache = None
                self.DLA_core = -1
                self.default_device_type = fake.DeviceType.GPU
                self.profiling_verbosity = None
                if fake.major < 11:
                    self.int8_calibrator = None

            def set_memory_pool_limit(self, pool, size: int) -> None:
                self.pools[pool.name] = size

            def get_memory_pool_limit(self, pool) -> int:
                return self.pools.get(pool.name, 0)

            def set_flag(self, flag) -> None:
                assert flag.enum == "BuilderFlag", flag
                self.flags.add(flag.name)

            def clear_flag(self, flag) -> None:
                assert flag.enum == "BuilderFlag", flag
                self.flags.discard(flag.name)

            def get_flag(self, flag) -> bool:
                return flag.name in self.flags

            def add_optimization_profile(self, profile: Profile) -> int:
                self.profiles.append(profile)
                return len(self.profiles) - 1

            @property
            def num_optimization_profiles(self) -> int:
                return len(self.profiles)

            def create_timing_cache(self, data: bytes):
                data = bytes(data)
                if not data:
                    return TimingCache(fake.__version__, 0)
                if not data.startswith(CACHE_MAGIC):
                    log(None, ILogger.ERROR, "the timing cache is corrupted")
                    return None
                tag, _, entries = data[len(CACHE_MAGIC):].decode().rpartition(":")
                return TimingCache(tag, int(entries))

            def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
                if cache.tag != fake.__version__ and not ignore_mismatch:
                    log(None, ILogger.ERROR, "the timing cache was made by another TensorRT or GPU")
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

        class Builder:
            def __init__(self, logger) -> None:
                self.logger = logger

            def create_network(self, flags: int = 0) -> FakeNetwork:
                return FakeNetwork(fake, flags)

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def _refuse(self, msg: str):
                log(self.logger, ILogger.ERROR, msg)
                return None

            def build_serialized_network(self, network: FakeNetwork, config: Config):
                fake.builds.append({"network": network, "config": config})
                if fake.fail_build:
                    return self._refuse("out of memory while building")
                if network.errors:
                    return self._refuse("; ".join(network.errors))
                if network.strongly_typed:
                    bad = sorted(config.flags & set(PRECISION_FLAGS))
                    if bad:
                        return self._refuse(f"precision flags {bad} are not allowed in a strongly typed network")
                dynamic = [t for t in network.inputs if -1 in t.shape]
                if dynamic and not config.profiles:
                    return self._refuse("Network has dynamic or shape inputs, but no optimization profile has "
                                        "been defined.")
                for profile in config.profiles:
                    for t in network.inputs:
                        if t.name not in profile.shapes:
                            return self._refuse(f"optimization profile is missing values for input {t.name}")
                        lo, opt, hi = profile.shapes[t.name]
                        ok = (len(lo) == len(opt) == len(hi) == len(t.shape)
                              and all(a <= b <= c for a, b, c in zip(lo, opt, hi))
                              and all(d == -1 or a == d == c for d, a, c in zip(t.shape, lo, hi)))
                        if not ok:
                            return self._refuse(f"invalid profile for {t.name}: {profile.shapes[t.name]}")
                if config.cache is not None:
                    config.cache.entries += 1
                header = {"version": fake.__version__, "flags": sorted(config.flags),
                          "strongly_typed": network.strongly_typed,
                          "plugins": sum(layer.type == fake.LayerType.PLUGIN_V3 for layer in network.layers),
                          "inputs": {t.name: [list(t.shape), t.dtype.name] for t in network.inputs},
                          "outputs": {t.name: [list(t.shape), t.dtype.name] for t in network.outputs},
                          "profile": {n: [list(s) for s in v] for n, v in config.profiles[0].shapes.items()}
                          if config.profiles else {},
                          "onnx": base64.b64encode(network.onnx or b"").decode()}
                return HostMemory(ENGINE_MAGIC + json.dumps(header).encode())

        self.Builder = Builder

        class Runtime:
            def __init__(self, logger) -> None:
                self.logger = logger

            def deserialize_cuda_engine(self, data: bytes):
                data = bytes(data)
                if not data.startswith(ENGINE_MAGIC):
                    log(self.logger, ILogger.ERROR, "not a serialized engine")
                    return None
                header = json.loads(data[len(ENGINE_MAGIC):])
                if header["version"] != fake.__version__:
                    log(self.logger, ILogger.ERROR, f"the engine plan was built with TensorRT {header['version']}")
                    return None
                if header["plugins"] and not fake._registry.creators:
                    log(self.logger, ILogger.ERROR, "plugin creator not found: the plan has plugin layers")
                    return None
                return FakeEngine(fake, header)

        self.Runtime = Runtime

    def get_plugin_registry(self):
        return self._registry

    def init_libnvinfer_plugins(self, logger, namespace: str) -> bool:
        return True

    def nptype(self, dtype):
        return DATA_TYPES[dtype.name]


class FakeEngine:
    """A deserialized fake plan: name-based I/O, one profile, and execution by ONNX Runtime on the fake device."""

    def __init__(self, trt: FakeTrt, header: dict) -> None:
        self.trt, self.header = trt, header
        rename = trt.tensor_renames
        self.inputs = {rename.get(n, n): v for n, v in header["inputs"].items()}
        self.outputs = {rename.get(n, n): v for n, v in header["outputs"].items()}
        self.names = [*self.inputs, *self.outputs]
        self.profile = {rename.get(n, n): v for n, v in header["profile"].items()}
        self._session = None

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str):
        return self.trt.TensorIOMode.INPUT if name in self.inputs else self.trt.TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str):
        shape_dtype = self.inputs.get(name) or self.outputs[name]
        return getattr(self.trt.DataType, shape_dtype[1])

    def get_tensor_shape(self, name: str) -> tuple:
        return tuple((self.inputs.get(name) or self.outputs[name])[0])

    def get_tensor_profile_shape(self, name: str, index: int):
        return [tuple(s) for s in self.profile[name]]

    def session(self):
        if self._session is None:
            import onnx
            import onnxruntime as ort

            from hbi_export.onnx.functions import attach_functions

            model = onnx.load_from_string(base64.b64decode(self.header["onnx"]))
            if any(n.domain == "hbi" for n in model.graph.node):
                model = attach_functions(model)  # the "plugin layers" compute with the op's decomposition
            self._session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return self._session

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    """``IExecutionContext``: shapes checked against the profile, output shapes inferred from the input shapes
    (not from a run), execution queued on the device stream."""

    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.addresses: dict[str, int] = {}
        self.shapes: dict[str, tuple] = {}

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in self.engine.names:
            return False
        self.addresses[name] = int(ptr)
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(d) for d in shape)
        if name not in self.engine.inputs:
            return False
        lo, _, hi = self.engine.profile[name]
        if len(shape) != len(lo) or not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
            self.engine.trt.logged.append((1, f"set_input_shape: {name} {shape} is outside the profile "
                                              f"[{lo}, {hi}]"))
            return False
        self.shapes[name] = shape
        return True

    def _axis_sizes(self) -> tuple[dict[str, int], object]:
        import onnx

        model = onnx.load_from_string(base64.b64decode(self.engine.header["onnx"]))
        sizes = {}
        for value in model.graph.input:
            name = self.engine.trt.tensor_renames.get(value.name, value.name)
            for pos, d in enumerate(value.type.tensor_type.shape.dim):
                if d.dim_param and name in self.shapes:
                    sizes[d.dim_param] = self.shapes[name][pos]
        return sizes, model

    def get_tensor_shape(self, name: str) -> tuple:
        if name in self.engine.inputs:
            return self.shapes.get(name, self.engine.get_tensor_shape(name))
        sizes, model = self._axis_sizes()
        value = next(v for v in model.graph.output
                     if self.engine.trt.tensor_renames.get(v.name, v.name) == name)
        return tuple(sizes.get(d.dim_param, -1) if d.dim_param else d.dim_value
                     for d in value.type.tensor_type.shape.dim)

    def execute_async_v3(self, stream) -> bool:
        trt, device = self.engine.trt, self.engine.trt.device
        if trt.fail_execute:
            trt.logged.append((1, "execute_async_v3: an illegal memory access was encountered"))
            return False
        missing = [n for n in self.engine.inputs if n not in self.shapes]
        unbound = [n for n in self.engine.names if n not in self.addresses]
        if missing or unbound:
            trt.logged.append((1, f"execute_async_v3: shapes missing {missing}, addresses missing {unbound}"))
            return False
        shapes = dict(self.shapes)
        out_shapes = {n: self.get_tensor_shape(n) for n in self.engine.outputs}
        addresses = dict(self.addresses)

        def run() -> None:  # on the stream: reads the device memory as it is when the stream gets here
            session = self.engine.session()
            feed = {}
            for value in session.get_inputs():
                name = trt.tensor_renames.get(value.name, value.name)
                dtype = np.dtype(DATA_TYPES[self.engine.inputs[name][1]])
                count = int(np.prod(shapes[name]))
                feed[value.name] = np.frombuffer(bytes(device.mem[addresses[name]][:count * dtype.itemsize]),
                                                 dtype=dtype).reshape(shapes[name])
            names = [o.name for o in session.get_outputs()]
            for oname, result in zip(names, session.run(None, feed)):
                name = trt.tensor_renames.get(oname, oname)
                assert tuple(result.shape) == out_shapes[name], (name, result.shape, out_shapes[name])
                dtype = np.dtype(DATA_TYPES[self.engine.outputs[name][1]])
                raw = result.astype(dtype).tobytes()
                device.mem[addresses[name]][:len(raw)] = raw

        device.enqueue(int(stream), run)
        return True


class FakeDevice:
    """Stands for ``hbi_runtime.backends.cuda.Cuda``: one GPU whose facts the test chooses, "device memory" in
    host bytearrays, and CUDA's asynchrony: copies, engine runs and graph launches wait on their stream until
    ``synchronize``; CUDA-graph capture records the work instead of queueing it."""

    def __init__(self, info: DeviceInfo | None = None) -> None:
        self.info = info or FAKE_GPU
        self.mem: dict[int, bytearray] = {}
        self.pinned: set[int] = set()
        self.queues: dict[int, list] = {}
        self.capturing: list | None = None
        self.launches = self.captures = self.syncs = 0
        self.calls: list[tuple] = []

    # facts and checked calls
    def call(self, name, *args):
        self.calls.append((name, *args))
        return None

    def device_info(self, index: int = 0) -> DeviceInfo:
        return self.info

    # memory and streams
    def _new(self, nbytes: int) -> int:
        ptr = 0x1000 * (len(self.mem) + len(self.pinned) + 1)
        while ptr in self.mem or ptr in self.pinned:
            ptr += 0x1000
        self.mem[ptr] = bytearray(max(int(nbytes), 1))
        return ptr

    def malloc(self, nbytes: int) -> int:
        return self._new(nbytes)

    def free(self, ptr: int) -> None:
        del self.mem[ptr]

    def host_array(self, nbytes: int, dtype, shape):
        ptr = 0x7000_0000 + 0x1000 * len(self.pinned)
        self.pinned.add(ptr)
        return ptr, np.zeros(shape, dtype=dtype)

    def free_host(self, ptr: int) -> None:
        self.pinned.discard(ptr)

    def stream(self) -> int:
        handle = 7 + len(self.queues)
        self.queues[handle] = []
        return handle

    def destroy_stream(self, stream) -> None:
        assert not self.queues.pop(int(stream)), "stream destroyed with work still queued"

    def enqueue(self, stream: int, work) -> None:
        if stream not in self.queues:
            raise AssertionError(f"work queued on unknown stream {stream}")
        if self.capturing is not None:
            self.capturing.append(work)
        else:
            self.queues[stream].append(work)

    def copy_to_device(self, dst: int, src: np.ndarray, stream) -> None:
        assert src.flags.c_contiguous and src.nbytes <= len(self.mem[dst])

        def copy() -> None:  # reads the host buffer when the stream gets here, as cudaMemcpyAsync does
            self.mem[dst][:src.nbytes] = src.tobytes()

        self.enqueue(int(stream), copy)

    def copy_to_host(self, dst: np.ndarray, src: int, stream) -> None:
        def copy() -> None:
            dst[...] = np.frombuffer(bytes(self.mem[src][:dst.nbytes]), dtype=dst.dtype).reshape(dst.shape)

        self.enqueue(int(stream), copy)

    def synchronize(self, stream) -> None:
        self.syncs += 1
        queue = self.queues[int(stream)]
        while queue:
            queue.pop(0)()

    # CUDA graphs
    def begin_capture(self, stream) -> None:
        self.capturing = []

    def end_capture(self, stream):
        work, self.capturing = self.capturing, None
        self.captures += 1
        return work

    def launch_graph(self, graph, stream) -> None:
        self.launches += 1
        for work in graph:
            self.enqueue(int(stream), work)

    def destroy_graph(self, graph) -> None:
        pass


FAKE_GPU = DeviceInfo(index=0, name="NVIDIA Fake GPU", compute_capability="9.0", total_memory_bytes=80 << 30,
                      driver_version="12.4", runtime_version="12.4")
TRT_VERSIONS = ("10.3.0.26", "10.16.0.72", "11.1.0.5")


@pytest.fixture
def fake_gpu() -> DeviceInfo:
    return FAKE_GPU


@pytest.fixture
def demo_dir() -> Path:
    """The committed demo package (read only)."""
    return DEMO_PACKAGE


def _reset_polygraphy() -> None:
    """Polygraphy imports tensorrt lazily, once per module: forget the module (and its logger) it bound."""
    if sys.modules.get("polygraphy") is None or sys.modules.get("polygraphy.mod.importer") is None:
        return
    from polygraphy.mod import importer

    for name, module in list(sys.modules.items()):
        if name.startswith("polygraphy.") and module is not None:
            for value in list(vars(module).values()):
                if type(value).__name__ == "LazyModule" and type(value).__module__ == importer.__name__:
                    object.__setattr__(value, "module", None)
    util = sys.modules.get("polygraphy.backend.trt.util")
    if util is not None:
        util.TRT_LOGGER = None


@pytest.fixture
def make_trt(monkeypatch):
    """``make_trt(version)``: a FakeTrt of that version, installed as ``tensorrt`` (for Polygraphy)."""

    def make(version: str = "10.3.0.26") -> FakeTrt:
        polygraphy = sys.modules.get("polygraphy")
        if version.startswith("11") and polygraphy is not None:
            from hbi_export.trt.builder import POLYGRAPHY_MIN_TRT11, parse_version

            if parse_version(polygraphy.__version__) < POLYGRAPHY_MIN_TRT11:
                pytest.skip(f"polygraphy {polygraphy.__version__} does not support TensorRT 11 (needs >= 0.50.3)")
        fake = FakeTrt(version)
        monkeypatch.setitem(sys.modules, "tensorrt", fake)
        _reset_polygraphy()
        return fake

    yield make
    _reset_polygraphy()


@pytest.fixture
def fake_trt(make_trt) -> FakeTrt:
    return make_trt("10.3.0.26")


@pytest.fixture
def polygraphy_trt():
    """Polygraphy's TensorRT backend; the engine-building tests need it (the ``gpu`` extra installs it)."""
    return pytest.importorskip("polygraphy.backend.trt", reason="polygraphy is not installed (the gpu extra)")


@pytest.fixture(autouse=True)
def _fresh_plugin_handles(monkeypatch):
    """Plugin libraries are loaded once per process; each test starts with none loaded."""
    monkeypatch.setattr(trt_backend, "_PLUGIN_HANDLES", {})


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    """A writable copy of the committed demo package."""
    return Path(shutil.copytree(DEMO_PACKAGE, tmp_path / "pkg"))


@pytest.fixture
def plugin_lib(tmp_path) -> Path:
    """A file standing for the plugin library: an ELF header and the getCreators entry point's name, which is what
    the fake registry checks (its hash and path are what the logic under test records)."""
    path = tmp_path / "libhbi_trt_plugins.so"
    path.write_bytes(b"\x7fELF fake plugin library: getCreators setLoggerFinder")
    return path


@pytest.fixture
def device() -> FakeDevice:
    return FakeDevice()


__all__ = ["FAKE_GPU", "TRT_VERSIONS", "FakeDevice", "FakeParserError", "FakeTrt", "SimpleNamespace"]


def write_fake_engines(pkg_dir: Path, trt: FakeTrt, gpu: DeviceInfo, precision: str = "fp32", *,
                       batch=None, plugins: Path | None = None, min_batch: int | None = None) -> None:
    """Engines and their manifest as ``hbi-export build-engine`` writes them, built by the fake's own builder
    without Polygraphy (the runtime tests need engines, not the build chain)."""
    import hashlib

    from hbi_export.trt.profiles import DEFAULT_BATCH, derive_profile
    from hbi_runtime.engines import AxisRange, EngineEntry, EngineSet, write_engine_set
    from hbi_runtime.package import GRAPH_NAMES, load_package

    batch = batch or DEFAULT_BATCH
    if min_batch is not None:
        batch = AxisRange(min_batch, max(batch.opt, min_batch), max(batch.max, min_batch))
    package = load_package(pkg_dir)
    plugin_sha = None
    if plugins is not None:
        plugin_sha = trt_backend.load_plugin_library(trt, plugins)
    entries = {}
    for name in GRAPH_NAMES:
        spec = package.graph(name)
        profile = derive_profile(spec, batch)
        builder = trt.Builder(trt.Logger())
        network = builder.create_network(0)
        assert trt.OnnxParser(network, None).parse(package.graph_path(name).read_bytes())
        config = builder.create_builder_config()
        opt = builder.create_optimization_profile()
        for tensor, p in profile.items():
            opt.set_shape(tensor, p.min, p.opt, p.max)
        config.add_optimization_profile(opt)
        if precision == "fp32":
            config.clear_flag(trt.BuilderFlag.TF32)
        plan = bytes(builder.build_serialized_network(network, config))
        rel = f"engines/{precision}/{name}.engine"
        (pkg_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg_dir / rel).write_bytes(plan)
        entries[name] = EngineEntry(
            graph=name, file=rel, sha256=hashlib.sha256(plan).hexdigest(), onnx_file=spec.file,
            onnx_sha256=spec.sha256, tensorrt_version=trt.__version__, gpu_name=gpu.name,
            compute_capability=gpu.compute_capability, precision=precision, strongly_typed=False,
            profiles=(profile,), plugin_library=str(plugins) if plugins else None,
            plugin_library_sha256=plugin_sha,
            build_args=("--min-batch", str(batch.min), "--opt-batch", str(batch.opt), "--max-batch",
                        str(batch.max), "--workspace", "4096"))
    write_engine_set(pkg_dir, EngineSet(package_sha256=package.manifest_sha256, precision=precision,
                                        engines=entries))


@pytest.fixture
def engines(fake_trt, fake_gpu):
    """``engines(pkg_dir, precision="fp32", batch=None, plugins=None, min_batch=None)`` with the 10.3 fake."""
    return lambda pkg_dir, precision="fp32", **kw: write_fake_engines(pkg_dir, fake_trt, fake_gpu, precision, **kw)
