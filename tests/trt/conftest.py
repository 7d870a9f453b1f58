"""A fake ``tensorrt`` module (the builder's seam) and a fake GPU, so the engine-building logic runs on CPU.

The fake records what the builder asks for (flags, layer precisions, profiles, timing cache) and behaves like
TensorRT where the builder depends on it: the parser reads the real ONNX bytes (inputs, layers; an ``hbi`` node
whose model-local function is present is inlined, one without it becomes a plugin layer when the plugin library was
loaded), parser errors and a failed build can be injected. It is not TensorRT: nothing is compiled or run.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from hbi_runtime.backends import tensorrt as trt_backend
from hbi_runtime.backends.cuda import DeviceInfo

DEMO_PACKAGE = Path(trt_backend.__file__).resolve().parents[1] / "data" / "demo" / "package"


class _Enum:
    def __init__(self, *names: str) -> None:
        for i, n in enumerate(names):
            setattr(self, n, _Member(n, i))


class _Member:
    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return self.name


class FakeParserError:
    def __init__(self, node_name: str, op: str, desc: str) -> None:
        self._n, self._op, self._desc = node_name, op, desc

    def node_name(self) -> str:
        return self._n

    def node(self) -> int:
        return 3

    def node_operator(self) -> str:
        return self._op

    def desc(self) -> str:
        return self._desc


class FakeLayer:
    def __init__(self, kind, name: str, outputs: int = 1) -> None:
        self.type, self.name, self.num_outputs = kind, name, outputs
        self.precision = None
        self.output_types: dict[int, object] = {}

    def set_output_type(self, index: int, dtype) -> None:
        self.output_types[index] = dtype


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.layers: list[FakeLayer] = []
        self.input_names: list[str] = []

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> FakeLayer:
        return self.layers[i]

    @property
    def num_inputs(self) -> int:
        return len(self.input_names)

    def get_input(self, i: int):
        return SimpleNamespace(name=self.input_names[i])


class FakeTrt:
    """Enough of the tensorrt module for hbi_export.trt.builder and .package."""

    def __init__(self, version: str = "10.3.0.26") -> None:
        self.__version__ = version
        self.LayerType = _Enum("NORMALIZATION", "SOFTMAX", "MATRIX_MULTIPLY", "ELEMENTWISE", "PLUGIN_V3")
        self.BuilderFlag = _Enum("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "TF32", "PREFER_PRECISION_CONSTRAINTS")
        self.MemoryPoolType = _Enum("WORKSPACE")
        self.NetworkDefinitionCreationFlag = _Enum("STRONGLY_TYPED")
        self.float32 = "float32"
        self.parse_errors: list[FakeParserError] = []
        self.ParserError = FakeParserError  # tests inject errors with fake.ParserError(node, op, desc)
        self.fail_build = False
        self.timing_cache_ok = True
        self.loaded_libraries: list[str] = []
        self.builds: list[dict] = []
        fake = self

        class ILogger:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

            def __init__(self, *args) -> None:
                pass

        self.ILogger = ILogger
        self.Logger = ILogger

        class Registry:
            def load_library(self, path: str):
                if path in fake.loaded_libraries:
                    return None  # TensorRT refuses a library whose plugins are registered already
                fake.loaded_libraries.append(path)
                return object()

        self._registry = Registry()

        class Parser:
            def __init__(self, network: FakeNetwork, logger) -> None:
                self.network, self.errors = network, []

            def parse(self, data: bytes, path: str) -> bool:
                import onnx

                model = onnx.load_from_string(data)
                functions = {(f.domain, f.name) for f in model.functions}
                self.network.input_names = [i.name for i in model.graph.input]
                for node in model.graph.node:
                    if node.domain == "hbi" and (node.domain, node.op_type) not in functions \
                            and fake.loaded_libraries:
                        kind = fake.LayerType.PLUGIN_V3
                    else:
                        kind = {"LayerNormalization": fake.LayerType.NORMALIZATION,
                                "Softmax": fake.LayerType.SOFTMAX,
                                "MatMul": fake.LayerType.MATRIX_MULTIPLY}.get(node.op_type,
                                                                            fake.LayerType.ELEMENTWISE)
                    self.network.layers.append(FakeLayer(kind, node.name or node.op_type))
                self.errors = list(fake.parse_errors)
                return not self.errors

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def get_error(self, i: int) -> FakeParserError:
                return self.errors[i]

        self.OnnxParser = Parser

        class Cache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return b"CACHE[" + self.data + b"]"

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

            def set_memory_pool_limit(self, pool, size: int) -> None:
                self.pools[pool.name] = size

            def set_flag(self, flag) -> None:
                self.flags.add(flag.name)

            def clear_flag(self, flag) -> None:
                self.flags.discard(flag.name)

            def add_optimization_profile(self, profile: Profile) -> int:
                self.profiles.append(profile)
                return len(self.profiles) - 1

            def create_timing_cache(self, data: bytes) -> Cache:
                return Cache(data)

            def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
                self.cache = cache
                return fake.timing_cache_ok

            def get_timing_cache(self) -> Cache:
                return self.cache

        class Builder:
            def __init__(self, logger) -> None:
                self.logger = logger

            def create_network(self, flags: int) -> FakeNetwork:
                return FakeNetwork(flags)

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: FakeNetwork, config: Config):
                fake.builds.append({"network": network, "config": config})
                if fake.fail_build:
                    self.logger.log(ILogger.ERROR, "out of memory while building")
                    return None
                return b"ENGINE:" + ",".join(sorted(config.flags)).encode()

        self.Builder = Builder

    def get_plugin_registry(self):
        return self._registry

    def init_libnvinfer_plugins(self, logger, namespace: str) -> bool:
        return True


FAKE_GPU = DeviceInfo(index=0, name="NVIDIA Fake GPU", compute_capability="9.0", total_memory_bytes=80 << 30,
                      driver_version="12.4", runtime_version="12.4")


@pytest.fixture
def fake_gpu() -> DeviceInfo:
    return FAKE_GPU


@pytest.fixture
def demo_dir() -> Path:
    """The committed demo package (read only)."""
    return DEMO_PACKAGE


@pytest.fixture
def fake_trt() -> FakeTrt:
    return FakeTrt()


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
    """A file standing for the plugin library (only its hash and path matter to the logic under test)."""
    path = tmp_path / "libhbi_trt_plugins.so"
    path.write_bytes(b"\x7fELF fake plugin library")
    return path
