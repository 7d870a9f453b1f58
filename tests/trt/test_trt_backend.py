"""The TensorRT backend's logic on CPU: options, the registry, feed splitting beyond the profile, refusing engines
built for another machine, its error paths (out-of-profile shapes, a failed execution, an engine whose tensors are
not the spec's, a plugin library TensorRT refuses), the buffer plumbing on an *asynchronous* fake GPU, and the CLIs
without TensorRT. The fakes (conftest.py) are strict where TensorRT and CUDA are: nothing here runs TensorRT."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hbi_export.cli import app as export_app
from hbi_export.trt import cli as trt_cli
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


def test_precision_is_the_only_one_built_or_must_be_named(demo_copy, engines):
    with pytest.raises(BadInputError, match="has no TensorRT engines"):
        resolve_precision(demo_copy, None)
    engines(demo_copy, "fp16")
    assert resolve_precision(demo_copy, None) == "fp16"
    engines(demo_copy, "fp32")
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


def _patch_runtime(monkeypatch, fake_trt, device, info: DeviceInfo | None = None):
    """The backend gets the fake tensorrt and the fake GPU (``info``: which GPU it reports)."""
    if info is not None:
        device.info = info
    fake_trt.device = device
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(trt_backend, "Cuda", lambda: device)
    monkeypatch.delenv("HBI_TRT_PLUGINS", raising=False)
    return device


def _backend(pkg_dir, graph="text_encoder", **options):
    pkg = load_package(pkg_dir)
    return create_backend("trt", pkg.graph(graph), pkg.graph_path(graph), **options)


def test_engine_for_another_gpu_is_refused_with_the_rebuild_command(demo_copy, fake_trt, engines, device,
                                                                      monkeypatch):
    engines(demo_copy, "fp16", batch=AxisRange(1, 2, 4))
    orin = DeviceInfo(0, "NVIDIA Jetson AGX Orin", "8.7", 32 << 30, "12.2", "12.2")
    _patch_runtime(monkeypatch, fake_trt, device, orin)
    backend = _backend(demo_copy)
    with pytest.raises(MismatchError) as info:
        backend.load()
    assert "built for compute capability 9.0, this GPU has 8.7" in info.value.message
    assert "built on a NVIDIA Fake GPU, this GPU is a NVIDIA Jetson AGX Orin" in info.value.message
    assert info.value.hint == (f"rebuild it on this machine: `hbi-export build-engine {demo_copy} --precision fp16 "
                               "--min-batch 1 --opt-batch 2 --max-batch 4 --workspace 4096`")
    assert not backend.is_active and device.mem == {}


def test_engine_from_another_tensorrt_does_not_deserialize(demo_copy, fake_trt, engines, device, monkeypatch,
                                                            make_trt):
    engines(demo_copy, "fp16")
    newer = make_trt("10.16.0.72")  # same version string in the manifest check is bypassed below
    _patch_runtime(monkeypatch, newer, device)
    monkeypatch.setattr(trt_backend, "check_engine", lambda root, entry, host, **kw: root / entry.file)
    with pytest.raises(MismatchError, match="could not deserialize .*text_encoder.engine") as info:
        _backend(demo_copy).load()
    assert info.value.hint.startswith("rebuild it: `hbi-export build-engine")
    assert device.mem == {} and not device.pinned


def test_engine_built_with_plugins_is_refused_without_them(demo_copy, fake_trt, engines, plugin_lib, device,
                                                           monkeypatch):
    engines(demo_copy, "fp16", plugins=plugin_lib)
    _patch_runtime(monkeypatch, fake_trt, device)
    with pytest.raises(MismatchError, match="it needs the hbi plugin library .*which is not loaded here"):
        _backend(demo_copy, "video_encoder").load()


def test_plugin_library_tensorrt_refuses_is_a_usage_error(demo_copy, fake_trt, engines, device, monkeypatch,
                                                          tmp_path):
    engines(demo_copy, "fp32")
    _patch_runtime(monkeypatch, fake_trt, device)
    not_a_library = tmp_path / "libhbi_trt_plugins.so"
    not_a_library.write_bytes(b"#!/bin/sh\n")  # not a shared object with getCreators
    with pytest.raises(UsageError, match="TensorRT could not load the plugin library") as info:
        _backend(demo_copy, plugins=not_a_library).load()
    assert "rebuild the library on this machine" in info.value.hint
    with pytest.raises(BadInputError, match="does not exist"):
        _backend(demo_copy, plugins=tmp_path / "missing.so").load()
    assert device.mem == {}


def test_engine_whose_tensors_are_not_the_specs_is_refused(demo_copy, fake_trt, engines, device, monkeypatch):
    engines(demo_copy, "fp32")
    _patch_runtime(monkeypatch, fake_trt, device)
    fake_trt.tensor_renames = {"input_ids": "ids"}
    backend = _backend(demo_copy)
    with pytest.raises(MismatchError, match=r"has tensors \['ids', .*the graph's spec has \['input_ids'") as info:
        backend.load()
    assert info.value.hint == "rebuild the engines from this package"
    assert not backend.is_active and device.mem == {} and not device.pinned  # nothing leaked


def _text_feed(batch: int) -> dict:
    ids = np.zeros((batch, 32), np.int64)
    ids[:, 0], ids[:, 1] = 1, 2
    mask = np.zeros((batch, 32), np.int64)
    mask[:, :2] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_shape_outside_the_profile_is_refused(demo_copy, fake_trt, engines, device, monkeypatch):
    """Larger batches are split; a batch below the profile's min cannot be, and TensorRT refuses its shape."""
    engines(demo_copy, "fp32", batch=AxisRange(2, 2, 4))
    _patch_runtime(monkeypatch, fake_trt, device)
    with _backend(demo_copy) as backend:
        assert backend.infer(_text_feed(7))["text_tokens_l0"].shape == (7, 32, 64)  # 4 + 3
        with pytest.raises(BadInputError,
                           match=r"Input tensor: input_ids \| Received shape \(1, 32\), outside") as info:
            backend.infer(_text_feed(1))
        assert "--max-batch" in info.value.hint or "--min-batch" in info.value.hint
    assert any("outside the profile" in msg for _, msg in fake_trt.logged)


def test_failed_execution_is_an_error(demo_copy, fake_trt, engines, device, monkeypatch):
    engines(demo_copy, "fp32")
    _patch_runtime(monkeypatch, fake_trt, device)
    with _backend(demo_copy) as backend:
        fake_trt.fail_execute = True
        with pytest.raises(MismatchError, match="TensorRT failed to run engines/fp32/text_encoder.engine") as info:
            backend.infer(_text_feed(2))
        assert "hbi-run doctor" in info.value.hint
        fake_trt.fail_execute = False
        assert backend.infer(_text_feed(2))["text_tokens_l0"].shape == (2, 32, 64)  # the context still works


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
    assert "hint: pip install 'hbi-toolkit[gpu-cu12]' --extra-index-url https://pypi.nvidia.com" in result.stderr


def test_hbi_run_precision_needs_backend_trt():
    for flag in ("--precision", "--engine-precision"):  # the second: the deprecated spelling, still understood
        result = CliRunner().invoke(run_cli.app, ["demo", flag, "fp16", "--format", "json"])
        assert result.exit_code == 2, result.output
        assert json.loads(result.stdout)["error"]["message"].startswith(
            "--precision goes with --backend trt (engines) or --device tensorrt")


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


def test_build_engine_cli_with_fakes(polygraphy_trt, demo_copy, fake_trt, device, monkeypatch, tmp_path):
    import hbi_export.trt.package as package_mod

    monkeypatch.setattr(package_mod, "import_tensorrt", lambda: fake_trt)
    monkeypatch.setattr(package_mod, "Cuda", lambda: device)
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
    text = CliRunner().invoke(export_app, ["build-engine", str(demo_copy)])  # --precision auto: fp16 on 10.3
    assert text.exit_code == 0 and "engine manifest:" in text.stdout
    assert "note: --precision auto: fp16" in text.stdout
    assert "trtexec:    trtexec --onnx=" in text.stdout and "polygraphy: polygraphy run " in text.stdout
    assert said[0] is True and [m.split(" (")[0] for m in said[1:]] == [  # each build said before it starts
        "building text_encoder", "building video_encoder", "building interaction"]
    bad = CliRunner().invoke(export_app, ["build-engine", str(demo_copy), "--axis", "video_batch=4"])
    assert bad.exit_code == 2 and "--axis takes NAME=MIN:OPT:MAX" in bad.stderr


# ------------------------------------------------------------------------------------------------ buffer plumbing

@pytest.mark.parametrize("cuda_graph", [False, True])
def test_buffers_bindings_and_cuda_graphs_round_trip(demo_copy, fake_trt, engines, device, monkeypatch, cuda_graph):
    """Pinned staging, device buffers at the profile's max, set_input_shape / set_tensor_address, output shapes,
    splitting, and CUDA-graph replay, on an asynchronous fake GPU whose 'engine' is ONNX Runtime on the bound
    bytes: results are only right if the backend synchronizes its stream before reading the outputs."""
    import onnxruntime as ort

    engines(demo_copy, "fp32", batch=AxisRange(1, 2, 3))
    _patch_runtime(monkeypatch, fake_trt, device)
    pkg = load_package(demo_copy)
    spec, path = pkg.graph("interaction"), pkg.graph_path("interaction")
    backend = TrtBackend(spec, path, cuda_graph=cuda_graph).load()
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
    assert device.syncs == 8 and all(not q for q in device.queues.values())
    backend.close()
    assert device.mem == {} and not device.pinned and not device.queues and not backend.is_active


def test_without_synchronize_the_outputs_are_not_there(demo_copy, fake_trt, engines, device, monkeypatch):
    """The fake GPU is asynchronous: a backend that skipped cudaStreamSynchronize would read stale outputs
    (what makes the round-trip test above meaningful)."""
    engines(demo_copy, "fp32")
    _patch_runtime(monkeypatch, fake_trt, device)
    backend = _backend(demo_copy).load()
    device.synchronize = lambda stream: None  # a backend without cudaStreamSynchronize
    out = backend.infer(_text_feed(2))
    assert not np.any(out["text_tokens_l0"])  # still the zeros of the fresh pinned buffer
    del device.synchronize
    backend.close()
    assert not device.queues


# ---------------------------------------------------------------------------------------- ONNX Runtime's TensorRT EP

def test_tensorrt_provider_options_from_ours(demo_dir, tmp_path, monkeypatch):
    from hbi_runtime.backends.onnxruntime import tensorrt_provider_options

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HBI_TRT_PLUGINS", "/opt/hbi/libhbi_trt_plugins.so")
    spec = load_package(demo_dir).graph("text_encoder")
    opts = tensorrt_provider_options(spec, {"precision": "fp16", "batch": (1, 4, 16), "workspace_mb": 256})
    cache = tmp_path / "hbi" / "ort-tensorrt" / spec.sha256[:16]
    assert opts == {
        "device_id": 0, "trt_fp16_enable": True, "trt_int8_enable": False,
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
        "trt_max_workspace_size": 256 << 20,
        "trt_profile_min_shapes": "input_ids:1x32,attention_mask:1x32",
        "trt_profile_opt_shapes": "input_ids:4x32,attention_mask:4x32",
        "trt_profile_max_shapes": "input_ids:16x32,attention_mask:16x32",
        "trt_extra_plugin_lib_paths": "/opt/hbi/libhbi_trt_plugins.so"}
    fp32 = tensorrt_provider_options(spec, {"engine_cache": tmp_path / "e", "timing_cache": tmp_path / "t"})
    assert (fp32["trt_fp16_enable"], fp32["trt_int8_enable"]) == (False, False)  # the graph's own: fp32
    assert (fp32["trt_engine_cache_path"], fp32["trt_timing_cache_path"]) == (str(tmp_path / "e"), str(tmp_path / "t"))
    interaction = tensorrt_provider_options(load_package(demo_dir).graph("interaction"))
    assert interaction["trt_profile_max_shapes"].startswith("text_tokens_l0:32x32x64,")
    assert "video_tokens_l0:32x8x64" in interaction["trt_profile_max_shapes"]
    with pytest.raises(UsageError, match="unknown TensorRT provider option"):
        tensorrt_provider_options(spec, {"fp16": True})
    with pytest.raises(UsageError, match="precision must be fp32, fp16 or int8"):
        tensorrt_provider_options(spec, {"precision": "bf16"})


def test_int8_through_the_tensorrt_provider_takes_the_qdq_graph(demo_dir):
    import dataclasses

    from hbi_runtime.backends.onnxruntime import tensorrt_provider_options

    spec = dataclasses.replace(load_package(demo_dir).graph("video_encoder"), precision="int8")  # calibrate's
    opts = tensorrt_provider_options(spec)
    assert (opts["trt_int8_enable"], opts["trt_fp16_enable"]) == (True, False)
    assert "trt_int8_calibration_table_name" not in opts  # explicit Q/DQ: no calibration table
    with pytest.raises(UsageError, match="is quantized \\(Q/DQ\\); its TensorRT precision is int8, not fp16"):
        tensorrt_provider_options(spec, {"precision": "fp16"})


def test_ort_backend_passes_the_tensorrt_options_to_onnxruntime(demo_dir, tmp_path, monkeypatch):
    from hbi_runtime.backends import onnxruntime as ort_backend

    pkg = load_package(demo_dir)
    spec, path = pkg.graph("text_encoder"), pkg.graph_path("text_encoder")
    with pytest.raises(UsageError, match="tensorrt options go with ONNX Runtime's TensorRT execution provider"):
        create_backend("onnxruntime", spec, path, providers="cuda", tensorrt={"precision": "fp16"})
    backend = create_backend("onnxruntime", spec, path, providers="tensorrt",
                             tensorrt={"precision": "fp16", "engine_cache": tmp_path / "cache"})
    assert backend.describe()["tensorrt"] == {"fp16": True, "int8": False}
    providers = backend._provider_list(ort_backend.PROVIDER_PRESETS["tensorrt"])
    assert providers[0][0] == "TensorrtExecutionProvider" and providers[0][1]["trt_fp16_enable"] is True
    assert providers[1:] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert (tmp_path / "cache").is_dir()  # made for ONNX Runtime, which does not make it


@pytest.mark.parametrize("args", [
    ["demo", "--device", "tensorrt"],
    ["demo", "--device", "tensorrt", "--precision", "fp16"],
    ["retrieve", "a red square", "--index", "nowhere", "--device", "tensorrt"],
])
def test_hbi_run_device_tensorrt_without_the_provider(args):
    ort = pytest.importorskip("onnxruntime")
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the TensorRT provider: the error path needs a build without it")
    result = CliRunner().invoke(run_cli.app, [*args, "--format", "json"], prog_name="hbi-run")
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)["error"]
    assert "--device tensorrt: this onnxruntime" in error["message"] and "TensorrtExecutionProvider" in (
        error["message"])


def test_hbi_run_backend_trt_takes_cuda_only():
    result = CliRunner().invoke(run_cli.app, ["demo", "--backend", "trt", "--device", "tensorrt", "--format", "json"])
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)["error"]
    assert error["message"] == "--backend trt runs its engines on --device cuda, not tensorrt"
    assert "--backend onnxruntime" in error["hint"]


def test_bench_maps_device_tensorrt_to_the_provider(monkeypatch):
    from hbi_runtime.bench import run

    checked = []
    monkeypatch.setattr(run, "check_ort_provider", checked.append)
    assert run.backend_options_for("onnxruntime", "tensorrt", None, "fp16") == {
        "providers": "tensorrt", "tensorrt": {"precision": "fp16"}}
    assert run.backend_options_for("onnxruntime", "tensorrt", 2, None) == {"providers": "tensorrt",
                                                                           "intra_op_threads": 2}
    assert checked == ["tensorrt", "tensorrt"]
    with pytest.raises(UsageError, match="runs the package's own precision"):
        run.backend_options_for("onnxruntime", "cuda", None, "fp16")
    with pytest.raises(UsageError, match="runs on CUDA GPUs only, not on tensorrt") as info:
        run.backend_options_for("trt", "tensorrt", None, None)
    assert "--backend onnxruntime" in info.value.hint
