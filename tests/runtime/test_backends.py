"""hbi_runtime.backends: the contract (feed validation in the base, lifetime, registry) and the ONNX Runtime backend.

Torch-free: the graphs are tiny ONNX models built here with ``onnx.helper`` (needs onnx and onnxruntime; the
kernel-path error test needs nothing more). The real package's graphs are exercised in test_model_api.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from hbi_runtime.backends import (BACKENDS, Backend, OrtBackend, TritonBackend, TrtBackend, backend_options,
                                  create_backend, validate_feed)
from hbi_runtime.backends import onnxruntime as ort_backend
from hbi_runtime.errors import BadInputError, MismatchError, MissingDependencyError, UsageError
from hbi_runtime.package import GraphSpec, TensorSpec

FRAMES = TensorSpec("frames", "float32", ("video_batch", 2, 3, 4, 4))
FRAME_MASK = TensorSpec("frame_mask", "int64", ("video_batch", 2))
OUTPUTS = (TensorSpec("doubled", "float32", ("video_batch", 2, 3, 4, 4)),
           TensorSpec("valid", "int64", ("video_batch",)))
SPEC = GraphSpec(file="video.onnx", sha256="0" * 64, opset=17, precision="fp32", inputs=(FRAMES, FRAME_MASK),
                 outputs=OUTPUTS)


def _value(spec: TensorSpec):
    return helper.make_tensor_value_info(spec.name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)),
                                         list(spec.shape))


def write_video_graph(path: Path) -> Path:
    """doubled = 2 * frames; valid = sum(frame_mask, axis=1): a two-input graph with a shared batch axis."""
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Mul", ["frames", "two"], ["doubled"]),
             helper.make_node("ReduceSum", ["frame_mask", "axes"], ["valid"], keepdims=0)]
    graph = helper.make_graph(nodes, "video", [_value(FRAMES), _value(FRAME_MASK)], [_value(t) for t in OUTPUTS],
                              initializer=[two, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def graph_path(tmp_path_factory) -> Path:
    return write_video_graph(tmp_path_factory.mktemp("graphs") / "video.onnx")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    """Each test its own cache of optimized graphs (a session's options differ when it comes from the cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(ort_backend.ORT_CACHE_ENV, raising=False)
    return tmp_path / "cache" / "hbi-toolkit" / "ort"


def good_feed(batch: int = 2) -> dict[str, np.ndarray]:
    frames = np.arange(batch * 2 * 3 * 4 * 4, dtype=np.float32).reshape(batch, 2, 3, 4, 4)
    mask = np.ones((batch, 2), dtype=np.int64)
    mask[-1, 1] = 0
    return {"frames": frames, "frame_mask": mask}


class RecordingBackend(Backend):
    """A backend without any runtime: records what reaches ``_infer`` (so the base's checks are seen alone)."""

    name = "recording"

    def __init__(self, spec, path) -> None:
        super().__init__(spec, path)
        self.calls: list[dict] = []
        self.loads = self.closes = 0

    def _load(self) -> None:
        self.loads += 1

    def _infer(self, feed):
        self.calls.append(dict(feed))
        return {t.name: np.zeros(1) for t in self.output_specs}

    def _close(self) -> None:
        self.closes += 1


# ---------------------------------------------------------------------------------------------------------------
# Feed validation (in the base)
# ---------------------------------------------------------------------------------------------------------------

EXPECTED = "Note: Expected a shape compatible with: (video_batch, 2, 3, 4, 4)"
BAD_FEEDS = {
    "missing": (lambda f: {"frames": f["frames"]},
                "Input tensor: frame_mask | Missing from the feed. Note: Expected inputs: ['frames', 'frame_mask']"),
    "extra": (lambda f: {**f, "frame_count": f["frame_mask"]},
              "Input tensor: frame_count | Not an input of this graph. Note: Expected inputs: "
              "['frames', 'frame_mask']"),
    "dtype": (lambda f: {**f, "frame_mask": f["frame_mask"].astype(np.int32)},
              "Input tensor: frame_mask | Received unexpected dtype: int32. Note: Expected type: int64"),
    "float64 frames": (lambda f: {**f, "frames": f["frames"].astype(np.float64)},
                       "Input tensor: frames | Received unexpected dtype: float64. Note: Expected type: float32"),
    "rank": (lambda f: {**f, "frames": f["frames"][..., 0]},
             f"Input tensor: frames | Received incompatible shape: (2, 2, 3, 4). {EXPECTED}"),
    "static dim": (lambda f: {**f, "frames": f["frames"][:, :, :, :3]},
                   f"Input tensor: frames | Received incompatible shape: (2, 2, 3, 3, 4). {EXPECTED}"),
    "batch across inputs": (lambda f: {**f, "frame_mask": f["frame_mask"][:1]},
                            "Input tensor: frame_mask | Received incompatible shape: (1, 2). Note: Expected a shape "
                            "compatible with: (video_batch, 2), where video_batch = 2 (from input frames)"),
    "empty batch": (lambda f: {"frames": f["frames"][:0], "frame_mask": f["frame_mask"][:0]},
                    f"Input tensor: frames | Received incompatible shape: (0, 2, 3, 4, 4). {EXPECTED}, "
                    "with video_batch >= 1"),
    "not an array": (lambda f: {**f, "frame_mask": [[1, 1], [1, 0]]},
                     "Input tensor: frame_mask | Received list. Note: Expected a numpy.ndarray of dtype int64"),
    "not a dict": (lambda f: list(f.values()),
                   "Feed | Received list. Note: Expected a dict of input name -> numpy array"),
}


@pytest.mark.parametrize("case", BAD_FEEDS, ids=list(BAD_FEEDS))
def test_base_refuses_a_bad_feed_before_the_backend_sees_it(case):
    make, message = BAD_FEEDS[case]
    backend = RecordingBackend(SPEC, "video.onnx").load()
    with pytest.raises(BadInputError) as exc:
        backend.infer(make(good_feed()))
    assert str(exc.value) == message
    assert backend.calls == []


def test_validate_feed_reports_the_brief_example_shape():
    spec = TensorSpec("frames", "float32", ("video_batch", 12, 3, 224, 224))
    with pytest.raises(BadInputError) as exc:
        validate_feed([spec], {"frames": np.zeros((2, 8, 3, 224), np.float32)})
    assert str(exc.value) == ("Input tensor: frames | Received incompatible shape: (2, 8, 3, 224). Note: Expected a "
                              "shape compatible with: (video_batch, 12, 3, 224, 224)")


def test_one_dimensional_shapes_are_written_as_python_tuples():
    spec = TensorSpec("level_weights", "float32", (3,))
    with pytest.raises(BadInputError, match=r"Received incompatible shape: \(4,\)\. Note: Expected a shape "
                                            r"compatible with: \(3,\)$"):
        validate_feed([spec], {"level_weights": np.ones(4, np.float32)})


def test_a_good_feed_reaches_the_backend_unchanged():
    backend = RecordingBackend(SPEC, "video.onnx").load()
    feed = good_feed(3)
    out = backend.infer(feed)
    assert list(out) == ["doubled", "valid"]
    assert backend.calls[0].keys() == feed.keys() and backend.calls[0]["frames"] is feed["frames"]


# ---------------------------------------------------------------------------------------------------------------
# Lifetime
# ---------------------------------------------------------------------------------------------------------------

def test_infer_before_load_is_a_usage_error():
    with pytest.raises(UsageError, match="is not loaded") as exc:
        RecordingBackend(SPEC, "video.onnx").infer(good_feed())
    assert "with" in exc.value.hint


def test_context_manager_loads_and_closes_once():
    backend = RecordingBackend(SPEC, "video.onnx")
    with backend as active:
        assert active is backend and backend.is_active
        backend.load()  # idempotent
    assert not backend.is_active and (backend.loads, backend.closes) == (1, 1)
    backend.close()  # idempotent
    assert backend.closes == 1
    with pytest.raises(UsageError, match="is not loaded"):
        backend.infer(good_feed())


def test_constructor_needs_a_graph_spec():
    with pytest.raises(UsageError, match="needs a GraphSpec, got dict"):
        RecordingBackend({"inputs": []}, "video.onnx")


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------

def test_registry_is_an_explicit_dict():
    assert BACKENDS == {"onnxruntime": OrtBackend, "trt": TrtBackend, "triton": TritonBackend}
    assert backend_options("onnxruntime") == ("providers", "intra_op_threads", "inter_op_threads", "optimization",
                                              "custom_ops", "tensorrt", "spinning")


@pytest.mark.parametrize("name", ["tensorrt", "ORT", None])
def test_unknown_backend_lists_the_known_ones(name, graph_path):
    with pytest.raises(UsageError) as exc:
        create_backend(name, SPEC, graph_path)
    assert str(exc.value) == f"unknown backend {name!r}; known backends: ['onnxruntime', 'triton', 'trt']"


def test_unknown_option_lists_the_backend_options(graph_path):
    with pytest.raises(UsageError) as exc:
        create_backend("onnxruntime", SPEC, graph_path, provider="cuda")
    assert str(exc.value) == ("backend 'onnxruntime' has no option(s) ['provider']; its options are ['providers', "
                              "'intra_op_threads', 'inter_op_threads', 'optimization', 'custom_ops', 'tensorrt', "
                              "'spinning']")


@pytest.mark.parametrize("options, message", [
    ({"providers": "rocm"}, "unknown providers 'rocm'; choose one of ['cpu', 'cuda', 'tensorrt']"),
    ({"providers": []}, "providers must be one of ['cpu', 'cuda', 'tensorrt'] or a non-empty list"),
    ({"intra_op_threads": 0}, "intra_op_threads must be a positive integer or None, got 0"),
    ({"inter_op_threads": True}, "inter_op_threads must be a positive integer or None, got True"),
    ({"optimization": "max"}, "optimization must be one of ['disable', 'basic', 'extended', 'all'], got 'max'"),
    ({"custom_ops": "fast"}, "custom_ops must be one of ['function', 'kernel', 'auto'], got 'fast'"),
])
def test_bad_option_values_fail_at_construction(options, message, graph_path):
    with pytest.raises(UsageError) as exc:
        create_backend("onnxruntime", SPEC, graph_path, **options)
    assert str(exc.value).startswith(message)


# ---------------------------------------------------------------------------------------------------------------
# ONNX Runtime backend
# ---------------------------------------------------------------------------------------------------------------

def test_ort_backend_runs_the_graph(graph_path):
    feed = good_feed()
    with create_backend("onnxruntime", SPEC, graph_path) as backend:
        out = backend.infer(feed)
    assert list(out) == ["doubled", "valid"]
    np.testing.assert_array_equal(out["doubled"], 2 * feed["frames"])
    np.testing.assert_array_equal(out["valid"], [2, 1])
    assert repr(backend) == f"OrtBackend({str(graph_path)!r}, providers='cpu', custom_ops='function', not loaded)"


def test_ort_backend_validates_through_the_base(graph_path):
    with OrtBackend(SPEC, graph_path) as backend:
        with pytest.raises(BadInputError, match=r"^Input tensor: frame_mask \| Received unexpected dtype: float64"):
            backend.infer({**good_feed(), "frame_mask": np.ones((2, 2))})


def test_session_options_follow_the_options(graph_path):
    with OrtBackend(SPEC, graph_path) as backend:
        options = backend._session.get_session_options()
        assert options.intra_op_num_threads == ort_backend.default_threads()
        assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    with OrtBackend(SPEC, graph_path, intra_op_threads=1, inter_op_threads=2, optimization="disable") as backend:
        options = backend._session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 2)
        assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        assert backend._session.get_providers() == ["CPUExecutionProvider"]


def test_missing_onnxruntime_names_the_install(monkeypatch, graph_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(MissingDependencyError, match="onnxruntime is not installed") as exc:
        OrtBackend(SPEC, graph_path).load()
    assert "pip install onnxruntime" in exc.value.hint


@pytest.mark.parametrize("providers", ["cuda", "tensorrt", ["CUDAExecutionProvider", "CPUExecutionProvider"]])
def test_unavailable_gpu_provider_names_the_gpu_extra(monkeypatch, graph_path, providers):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    backend = OrtBackend(SPEC, graph_path, providers=providers)
    with pytest.raises(MissingDependencyError, match=r"this onnxruntime \(.*\) has no (TensorrtExecutionProvider, )?"
                                                        r"CUDAExecutionProvider;") as exc:
        backend.load()
    assert "pip install 'hbi-toolkit[gpu-cu12]' --extra-index-url https://pypi.nvidia.com" in exc.value.hint
    assert not backend.is_active


def test_unknown_provider_name_is_a_usage_error(graph_path):
    with pytest.raises(UsageError, match=r"unknown ONNX Runtime execution provider\(s\) \['FooExecutionProvider'\]"):
        OrtBackend(SPEC, graph_path, providers=["FooExecutionProvider"]).load()


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_a_provider_dropped_by_onnxruntime_is_refused(monkeypatch, graph_path):
    # This onnxruntime has no CUDA: when told it has, the session falls back to CPU (with a log line only).
    available = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" in available:
        pytest.skip("onnxruntime-gpu with a working CUDA: nothing is dropped here")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [*available, "CUDAExecutionProvider"])
    with pytest.raises(MissingDependencyError, match="could not initialise CUDAExecutionProvider"):
        OrtBackend(SPEC, graph_path, providers="cuda").load()


def test_missing_graph_file(tmp_path):
    with pytest.raises(BadInputError, match=r"graph file .*nowhere\.onnx does not exist"):
        OrtBackend(SPEC, tmp_path / "nowhere.onnx").load()


def test_unloadable_graph_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(MismatchError, match=r"onnxruntime .* cannot load .*broken\.onnx"):
        OrtBackend(SPEC, path).load()


def test_graph_that_does_not_match_its_spec(graph_path):
    other = GraphSpec(file="video.onnx", sha256="0" * 64, opset=17, precision="fp32",
                      inputs=(FRAMES, TensorSpec("mask", "int64", ("video_batch", 2))), outputs=OUTPUTS)
    with pytest.raises(MismatchError, match=r"has inputs \['frames', 'frame_mask'\] .* spec says inputs "
                                            r"\['frames', 'mask'\]"):
        OrtBackend(other, graph_path).load()


def test_kernel_path_without_extensions_is_a_clear_error(monkeypatch, graph_path):
    spec = GraphSpec(file="video.onnx", sha256="0" * 64, opset=17, precision="fp32", inputs=SPEC.inputs,
                     outputs=SPEC.outputs, custom_ops=("hbi.TokenMerge",))
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)
    with pytest.raises(MissingDependencyError, match="onnxruntime-extensions is not installed") as exc:
        OrtBackend(spec, graph_path, custom_ops="kernel").load()
    assert "pip install onnxruntime-extensions" in exc.value.hint
    # "auto" never needs the extensions: without them it takes the functions
    monkeypatch.setattr(ort_backend, "DEFAULT_PATH", {"TokenMerge": "kernel"})
    assert OrtBackend(spec, graph_path, custom_ops="auto").custom_op_path == "function"


def test_auto_custom_ops_follow_default_path(monkeypatch, graph_path):
    spec = GraphSpec(file="video.onnx", sha256="0" * 64, opset=17, precision="fp32", inputs=SPEC.inputs,
                     outputs=SPEC.outputs, custom_ops=("hbi.TokenMerge", "hbi.WeightedTokenInteraction"))
    assert OrtBackend(spec, graph_path).custom_op_path == "function"  # today's DEFAULT_PATH
    monkeypatch.setattr(ort_backend, "DEFAULT_PATH", {"TokenMerge": "kernel", "WeightedTokenInteraction": "kernel"})
    monkeypatch.setattr(ort_backend.ops_ort, "kernel_available", lambda: True)
    assert OrtBackend(spec, graph_path).custom_op_path == "kernel"
    monkeypatch.setattr(ort_backend, "DEFAULT_PATH", {"TokenMerge": "kernel", "WeightedTokenInteraction": "function"})
    assert OrtBackend(spec, graph_path).custom_op_path == "function"  # one rewrite serves all ops: all or none


def test_importing_backends_and_model_does_not_import_onnxruntime(repo_root):
    code = ("import sys, hbi_runtime.backends, hbi_runtime.model; "
            "assert 'onnxruntime' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=repo_root, check=True)


# ---------------------------------------------------------------------------------------- optimized-graph cache

DEMO = Path(__file__).resolve().parents[2] / "hbi_runtime" / "data" / "demo" / "package"


def _demo_outputs(**options) -> dict[str, np.ndarray]:
    """Every output of the demo's text and video encoders (fresh sessions) on a fixed text and random frames."""
    from hbi_runtime.model import load

    rng = np.random.default_rng(0)
    with load(DEMO, **options) as model:
        ids, mask = model.tokenizer(["a red circle moves left, then a blue square appears"])[:2]
        text = model.backends["text_encoder"].load().infer({"input_ids": ids, "attention_mask": mask})
        spec = {t.name: t for t in model.package.graph("video_encoder").inputs}
        frames_shape = [2 if isinstance(d, str) else d for d in spec["frames"].shape]
        video = model.backends["video_encoder"].load().infer({
            "frames": rng.standard_normal(frames_shape).astype(np.float32),
            "frame_mask": np.ones(frames_shape[:2], np.int64)})
    return {**text, **video}


def test_cached_optimized_graphs_give_the_same_outputs_bit_for_bit(private_cache, monkeypatch):
    monkeypatch.setenv(ort_backend.ORT_CACHE_ENV, "0")
    reference = _demo_outputs()
    assert not private_cache.exists()
    monkeypatch.delenv(ort_backend.ORT_CACHE_ENV)
    first = _demo_outputs()  # optimizes and writes the cache
    cached = sorted(private_cache.glob("*.onnx"))
    assert len(cached) == 2 and not list(private_cache.glob("*.tmp"))
    second = _demo_outputs()  # loads the cached graphs, optimizations off
    for out in (first, second):
        assert sorted(out) == sorted(reference)
        for name, value in reference.items():
            assert out[name].dtype == value.dtype and out[name].tobytes() == value.tobytes(), name


def test_a_session_from_the_cache_runs_the_saved_graph_unoptimized(graph_path, private_cache):
    with OrtBackend(SPEC, graph_path) as backend:
        assert backend._session.get_session_options().graph_optimization_level == \
            onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    with OrtBackend(SPEC, graph_path) as backend:
        assert backend._session.get_session_options().graph_optimization_level == \
            onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        np.testing.assert_array_equal(backend.infer(good_feed())["doubled"], 2 * good_feed()["frames"])
    assert len(list(private_cache.glob("*.onnx"))) == 1


def test_a_damaged_cached_graph_is_rebuilt(graph_path, private_cache):
    OrtBackend(SPEC, graph_path).load().close()
    (cached,) = private_cache.glob("*.onnx")
    good = cached.read_bytes()
    cached.write_bytes(b"not a graph")
    with OrtBackend(SPEC, graph_path) as backend:
        np.testing.assert_array_equal(backend.infer(good_feed())["valid"], [2, 1])
    assert cached.read_bytes() == good


@pytest.mark.parametrize("optimization", ["disable", "basic", "extended"])
def test_the_cache_applies_at_the_default_optimization_only(graph_path, private_cache, optimization):
    OrtBackend(SPEC, graph_path, optimization=optimization).load().close()
    assert not private_cache.exists()


def test_an_unwritable_cache_only_costs_the_optimization(graph_path, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    with OrtBackend(SPEC, graph_path) as backend:
        np.testing.assert_array_equal(backend.infer(good_feed())["valid"], [2, 1])


def test_spinning_is_an_option_with_the_same_outputs(graph_path):
    with pytest.raises(UsageError, match="spinning must be True or False"):
        OrtBackend(SPEC, graph_path, spinning="no")
    with OrtBackend(SPEC, graph_path, spinning=False) as backend:
        config = backend._session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        assert config == "0"
        np.testing.assert_array_equal(backend.infer(good_feed())["doubled"], 2 * good_feed()["frames"])
