"""The TensorRT backend's logic on CPU: options, the registry, feed splitting beyond the profile, refusing engines
built for another machine (with fakes for tensorrt and CUDA), and the CLIs without TensorRT."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hbi_export.cli import app as export_app
from hbi_export.trt import cli as trt_cli
from hbi_export.trt.package import EngineOptions, build_package_engines
from hbi_runtime import cli as run_cli
from hbi_runtime.backends import BACKENDS, backend_options, create_backend
from hbi_runtime.backends import tensorrt as trt_backend
from hbi_runtime.backends.cuda import DeviceInfo
from hbi_runtime.backends.tensorrt import TrtBackend, axis_limits, package_root, resolve_precision, split_feed
from hbi_runtime.engines import AxisRange, TensorProfile
from hbi_runtime.errors import BadInputError, MismatchError, MissingDependencyError, UsageError
from hbi_runtime.package import load_package


def test_registered_as_trt_with_its_options():
    assert BACKENDS["trt"] is TrtBackend
    assert backend_options("trt") == ("precision", "plugins", "cuda_graph", "device")


def test_options_are_checked_without_importing_tensorrt(demo_dir):
    pkg = load_package(demo_dir)
    spec, path = pkg.graph("text_encoder"), pkg.graph_path("text_encoder")
    with pytest.raises(UsageError, match="precision must be one of"):
        create_backend("trt", spec, path, precision="bf16")
    with pytest.raises(UsageError, match="cuda_graph must be true or false"):
        create_backend("trt", spec, path, cuda_graph="yes")
    with pytest.raises(UsageError, match="device must be a CUDA device index"):
        create_backend("trt", spec, path, device=-1)
    backend = create_backend("trt", spec, path, precision="fp16", cuda_graph=True)
    assert repr(backend).endswith("precision='fp16', cuda_graph=True, not loaded)")
    assert package_root(spec, path) == demo_dir


def test_load_without_tensorrt_says_what_to_install(demo_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # import fails even where it is installed
    pkg = load_package(demo_dir)
    with pytest.raises(MissingDependencyError, match="TensorRT is not installed") as info:
        create_backend("trt", pkg.graph("interaction"), pkg.graph_path("interaction")).load()
    assert "tensorrt >= 10.3" in info.value.hint and info.value.exit_code == 2


def test_precision_is_the_only_one_built_or_must_be_named(demo_copy, fake_trt, fake_gpu):
    with pytest.raises(BadInputError, match="has no TensorRT engines"):
        resolve_precision(demo_copy, None)
    build_package_engines(demo_copy, EngineOptions(precision="fp16"), trt=fake_trt, device=fake_gpu)
    assert resolve_precision(demo_copy, None) == "fp16"
    build_package_engines(demo_copy, EngineOptions(precision="fp32"), trt=fake_trt, device=fake_gpu)
    with pytest.raises(UsageError, match=r"engines in several precisions \(fp32, fp16\); say which"):
        resolve_precision(demo_copy, None)
    assert resolve_precision(demo_copy, "fp32") == "fp32"


def test_feed_beyond_the_profile_is_split_and_reassembled(demo_dir):
    """Interaction feeds of 5 texts x 7 videos through a profile of max 2 texts, 3 videos: 3 x 3 chunks, same
    result as one call (ONNX Runtime stands in for the engine)."""
    import onnxruntime as ort

    pkg = load_package(demo_dir)
    spec = pkg.graph("interaction")
    session = ort.InferenceSession(str(pkg.graph_path("interaction")), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    sizes = {"text_batch": 5, "video_batch": 7}
    feed = {}
    for t in spec.inputs:
        shape = tuple(sizes.get(a, a) if isinstance(a, str) else a for a in t.shape)
        value = rng.standard_normal(shape).astype(np.float32)
        feed[t.name] = (value > -0.5).astype(np.float32) if "mask" in t.name else value
    profile = {t.name: TensorProfile(tuple(1 if isinstance(a, str) else a for a in t.shape),
                                     tuple(1 if isinstance(a, str) else a for a in t.shape),
                                     tuple({"text_batch": 2, "video_batch": 3}.get(a, a) if isinstance(a, str)
                                           else a for a in t.shape)) for t in spec.inputs}
    limits = axis_limits(spec.inputs, profile)
    assert limits == {"text_batch": 2, "video_batch": 3}
    chunks = list(split_feed(spec.inputs, feed, limits))
    assert len(chunks) == 9 and all(c[1]["text_tokens_l0"].shape[0] <= 2 and c[1]["video_mask_l2"].shape[0] <= 3
                                    for c in chunks)

    backend = TrtBackend(spec, pkg.graph_path("interaction"))
    calls = []

    def run(sub):  # the engine call, on one chunk
        calls.append({k: v.shape for k, v in sub.items()})
        out = session.run(None, sub)
        return dict(zip([o.name for o in spec.outputs], out))

    backend._run, backend._limits, backend._active = run, limits, True
    got = backend.infer(feed)
    want = dict(zip([o.name for o in spec.outputs], session.run(None, feed)))
    assert len(calls) == 9
    np.testing.assert_allclose(got["scores"], want["scores"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["level_scores"], want["level_scores"], rtol=0, atol=1e-6)


class FakeCuda:
    """Stands for hbi_runtime.backends.cuda.Cuda: one GPU, whose facts the test chooses."""

    device = DeviceInfo(0, "NVIDIA Fake GPU", "9.0", 80 << 30, "12.4", "12.4")

    def __init__(self, cudart=None) -> None:
        pass

    def call(self, name, *args):
        return None

    def device_info(self, index=0):
        return self.device


def _patch_runtime(monkeypatch, fake_trt, device: DeviceInfo) -> None:
    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, data: bytes):
            return None  # what TensorRT returns for a plan it cannot read

    fake_trt.Runtime = Runtime
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(FakeCuda, "device", device)
    monkeypatch.setattr(trt_backend, "Cuda", FakeCuda)


def test_engine_for_another_gpu_is_refused_with_the_rebuild_command(demo_copy, fake_trt, fake_gpu, monkeypatch):
    build_package_engines(demo_copy, EngineOptions(precision="fp16", batch=AxisRange(1, 2, 4)), trt=fake_trt,
                          device=fake_gpu)
    orin = DeviceInfo(0, "NVIDIA Jetson AGX Orin", "8.7", 32 << 30, "12.2", "12.2")
    _patch_runtime(monkeypatch, fake_trt, orin)
    pkg = load_package(demo_copy)
    backend = create_backend("trt", pkg.graph("text_encoder"), pkg.graph_path("text_encoder"))
    with pytest.raises(MismatchError) as info:
        backend.load()
    assert "built for compute capability 9.0, this GPU has 8.7" in info.value.message
    assert "built on a NVIDIA Fake GPU, this GPU is a NVIDIA Jetson AGX Orin" in info.value.message
    assert info.value.hint == (f"rebuild it on this machine: `hbi-export build-engine {demo_copy} --precision fp16 "
                               "--min-batch 1 --opt-batch 2 --max-batch 4 --workspace 4096`")
    assert not backend.is_active


def test_engine_that_matches_reaches_deserialization(demo_copy, fake_trt, fake_gpu, monkeypatch):
    build_package_engines(demo_copy, EngineOptions(precision="fp16"), trt=fake_trt, device=fake_gpu)
    _patch_runtime(monkeypatch, fake_trt, fake_gpu)
    pkg = load_package(demo_copy)
    with pytest.raises(MismatchError, match="could not deserialize .*text_encoder.engine"):
        create_backend("trt", pkg.graph("text_encoder"), pkg.graph_path("text_encoder")).load()


def test_engine_built_with_plugins_is_refused_without_them(demo_copy, fake_trt, fake_gpu, plugin_lib, monkeypatch):
    build_package_engines(demo_copy, EngineOptions(precision="fp16", plugins=plugin_lib), trt=fake_trt,
                          device=fake_gpu)
    _patch_runtime(monkeypatch, fake_trt, fake_gpu)
    monkeypatch.delenv("HBI_TRT_PLUGINS", raising=False)
    pkg = load_package(demo_copy)
    with pytest.raises(MismatchError, match="it needs the hbi plugin library .*which is not loaded here"):
        create_backend("trt", pkg.graph("video_encoder"), pkg.graph_path("video_encoder")).load()


# ------------------------------------------------------------------------------------------------ CLIs

@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)


@pytest.mark.parametrize("args", [
    ["demo", "--backend", "trt"],
    ["retrieve", "a red square", "--index", "nowhere", "--backend", "trt"],
    ["index", "nowhere", "--backend", "trt"],
    ["eval", "--captions", "c.csv", "--videos", "v", "--backend", "trt"],
])
def test_hbi_run_backend_trt_without_tensorrt_is_a_clear_error(args, no_tensorrt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.csv").write_text("video,caption\nv1,a red square moves left\n")
    result = CliRunner().invoke(run_cli.app, args, prog_name="hbi-run")
    assert result.exit_code == 2, result.output
    assert "error: TensorRT is not installed" in result.stderr and "Traceback" not in result.output
    assert "hint: pip install 'hbi-toolkit[gpu]'" in result.stderr


def test_hbi_run_precision_needs_backend_trt():
    for flag in ("--precision", "--engine-precision"):  # the second: the deprecated spelling, still understood
        result = CliRunner().invoke(run_cli.app, ["demo", flag, "fp16", "--format", "json"])
        assert result.exit_code == 2, result.output
        assert json.loads(result.stdout)["error"]["message"] == "--precision goes with --backend trt"


def test_build_engine_without_tensorrt_is_a_clear_error(demo_copy, no_tensorrt):
    result = CliRunner().invoke(export_app, ["build-engine", str(demo_copy), "--format", "json"])
    assert result.exit_code == 2, result.output
    err = json.loads(result.stdout)["error"]
    assert err["type"] == "MissingDependencyError" and "TensorRT is not installed" in err["message"]


class _StepsRecorder:
    """Stands for hbi_runtime.cli_options.Steps: ``said`` gets ``enabled``, then every step message."""

    def __init__(self, enabled: bool, said: list) -> None:
        self.said = said
        said.append(enabled)

    def __enter__(self):
        return self

    def __call__(self, message: str) -> None:
        self.said.append(message)

    def __exit__(self, *exc) -> None:
        pass


def test_build_engine_cli_with_fakes(demo_copy, fake_trt, fake_gpu, monkeypatch, tmp_path):
    import hbi_export.trt.package as package_mod

    monkeypatch.setattr(package_mod, "import_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(FakeCuda, "device", fake_gpu)
    monkeypatch.setattr(package_mod, "Cuda", FakeCuda)
    monkeypatch.delenv("HBI_TRT_PLUGINS", raising=False)
    cache = tmp_path / "t.cache"
    result = CliRunner().invoke(export_app, ["build-engine", str(demo_copy), "--precision", "fp32", "--max-batch",
                                             "8", "--axis", "video_batch=1:2:4", "--timing-cache", str(cache),
                                             "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["schema"] == "hbi.build-engine/1" and summary["gpu"]["compute_capability"] == "9.0"
    assert summary["package_sha256"] == load_package(demo_copy).manifest_sha256 and cache.is_file()
    assert result.stderr == ""  # no progress in JSON mode (nor off a terminal)
    said: list = []
    monkeypatch.setattr(trt_cli, "Steps", lambda enabled: _StepsRecorder(enabled, said))
    text = CliRunner().invoke(export_app, ["build-engine", str(demo_copy), "--precision", "fp32"])
    assert text.exit_code == 0 and "engine manifest:" in text.stdout
    assert said[0] is True and [m.split(" (")[0] for m in said[1:]] == [  # each build said before it starts
        "building text_encoder", "building video_encoder", "building interaction"]
    bad = CliRunner().invoke(export_app, ["build-engine", str(demo_copy), "--axis", "video_batch=4"])
    assert bad.exit_code == 2 and "--axis takes NAME=MIN:OPT:MAX" in bad.stderr


# ------------------------------------------------------------------------------------------------ buffer plumbing

class FakeDevice:
    """Stands for Cuda with 'device memory' in host bytearrays, and CUDA-graph capture that records, not runs."""

    def __init__(self) -> None:
        self.mem: dict[int, bytearray] = {}
        self.capturing: list | None = None
        self.launches = self.captures = 0

    def _new(self, nbytes: int) -> int:
        ptr = 0x1000 * (len(self.mem) + 1)
        self.mem[ptr] = bytearray(nbytes)
        return ptr

    def malloc(self, nbytes: int) -> int:
        return self._new(nbytes)

    def host_array(self, nbytes: int, dtype, shape):
        return self._new(0), np.zeros(shape, dtype=dtype)

    def copy_to_device(self, dst: int, src: np.ndarray, stream) -> None:
        assert src.flags.c_contiguous and src.nbytes <= len(self.mem[dst])
        self.mem[dst][:src.nbytes] = src.tobytes()

    def copy_to_host(self, dst: np.ndarray, src: int, stream) -> None:
        dst[...] = np.frombuffer(bytes(self.mem[src][:dst.nbytes]), dtype=dst.dtype).reshape(dst.shape)

    def stream(self) -> int:
        return 7

    def synchronize(self, stream) -> None:
        pass

    def begin_capture(self, stream) -> None:
        self.capturing = []

    def end_capture(self, stream):
        work, self.capturing = self.capturing, None
        self.captures += 1
        return work

    def launch_graph(self, graph, stream) -> None:
        self.launches += 1
        for fn in graph:
            fn()

    def destroy_graph(self, graph) -> None:
        pass

    def free(self, ptr) -> None:
        del self.mem[ptr]

    def free_host(self, ptr) -> None:
        self.mem.pop(ptr, None)

    def destroy_stream(self, stream) -> None:
        pass


class FakeEngine:
    """An 'engine' that runs the ONNX graph with ONNX Runtime on the bytes at the bound addresses."""

    def __init__(self, spec, path, device: FakeDevice) -> None:
        import onnxruntime as ort

        self.spec, self.device = spec, device
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.names = [t.name for t in (*spec.inputs, *spec.outputs)]
        self.dtypes = {t.name: np.dtype(t.dtype) for t in (*spec.inputs, *spec.outputs)}

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self):
        engine = self

        class Context:
            def __init__(self) -> None:
                self.addresses, self.shapes = {}, {}

            def set_tensor_address(self, name, ptr):
                self.addresses[name] = ptr

            def set_input_shape(self, name, shape):
                self.shapes[name] = tuple(shape)
                return True

            def get_tensor_shape(self, name):
                return self.shapes[name]

            def _run(self):
                feed = {t.name: np.frombuffer(bytes(engine.device.mem[self.addresses[t.name]]), dtype=t.dtype)[
                    :int(np.prod(self.shapes[t.name]))].reshape(self.shapes[t.name]) for t in engine.spec.inputs}
                outs = engine.session.run(None, feed)
                for t, value in zip(engine.spec.outputs, outs):
                    self.shapes[t.name] = value.shape
                    engine.device.mem[self.addresses[t.name]][:value.nbytes] = value.astype(t.dtype).tobytes()

            def execute_async_v3(self, stream):
                assert stream == 7
                if engine.device.capturing is not None:
                    engine.device.capturing.append(self._run)  # captured, not run
                else:
                    self._run()
                return True

        return Context()


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_buffers_bindings_and_cuda_graphs_round_trip(demo_copy, fake_trt, fake_gpu, cuda_graph):
    """Pinned staging, device buffers at the profile's max, set_input_shape / set_tensor_address, output shapes,
    splitting, and CUDA-graph replay, with a fake device whose 'engine' is ONNX Runtime on the bound bytes."""
    import onnxruntime as ort

    build_package_engines(demo_copy, EngineOptions(precision="fp32", batch=AxisRange(1, 2, 3)), trt=fake_trt,
                          device=fake_gpu)
    pkg = load_package(demo_copy)
    spec, path = pkg.graph("interaction"), pkg.graph_path("interaction")
    device = FakeDevice()
    fake_trt.Runtime = lambda logger: type("R", (), {"deserialize_cuda_engine":
                                                     lambda self, data: FakeEngine(spec, path, device)})()
    fake_trt.nptype = np.dtype
    backend = TrtBackend(spec, path, cuda_graph=cuda_graph)
    entry = trt_backend.read_engine_set(demo_copy, "fp32").entry_for(spec.file)
    backend._activate(fake_trt, device, entry, demo_copy / entry.file)
    backend._active = True
    rng = np.random.default_rng(1)
    feed = {}
    for t in spec.inputs:
        shape = tuple({"text_batch": 4, "video_batch": 5}.get(a, a) if isinstance(a, str) else a for a in t.shape)
        feed[t.name] = rng.random(shape).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in spec.outputs], session.run(None, feed)))
    for _ in range(2):  # the second pass replays the captured graphs
        got = backend.infer(feed)
        np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-6)
        np.testing.assert_allclose(got["level_scores"], want["level_scores"], atol=1e-6)
    # 4 texts x 5 videos through max 3 x 3: chunks (3|1) x (3|2) = 4 distinct shape sets
    assert (device.captures, device.launches) == ((4, 4) if cuda_graph else (0, 0))
    backend.close()
    assert device.mem == {} and not backend.is_active
