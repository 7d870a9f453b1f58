"""``hbi-export triton``: every config.pbtxt parses as Triton's ModelConfig (the protobuf classes of
tritonclient[grpc], protobuf text format: an unknown field or a wrong enum fails), and says what the manifest says.

What these tests cannot show: that a full tritonserver loads the repository (docs/scale.md, "What remains
unverified"); the tokenizer's model.py runs here against a stand-in for Triton's ``triton_python_backend_utils``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("tritonclient.grpc.model_config_pb2",
                    reason="tritonclient[grpc] is not installed: pip install 'hbi-toolkit[triton]'")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

from hbi_export.triton_repo import Serving, write_repository  # noqa: E402
from hbi_runtime.cli import DEMO_PACKAGE  # noqa: E402
from hbi_runtime.engines import AxisRange, EngineEntry, EngineSet, profile_from_ranges  # noqa: E402
from hbi_runtime.errors import BadInputError, UsageError  # noqa: E402
from hbi_runtime.model import load  # noqa: E402
from hbi_runtime.package import load_package  # noqa: E402

DTYPE = {"float32": mc.TYPE_FP32, "int64": mc.TYPE_INT64}


def parse(path: Path):
    return text_format.Parse(path.read_text(), mc.ModelConfig())


@pytest.fixture(scope="module")
def package():
    return load_package(DEMO_PACKAGE)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("repo") / "triton"
    write_repository(DEMO_PACKAGE, out, serving=Serving(instances=2, queue_delay_us=500))
    return out


def test_every_config_is_a_model_config(repo):
    configs = sorted(repo.glob("*/config.pbtxt"))
    assert [c.parent.name for c in configs] == ["text", "text_encoder", "tokenizer", "video_encoder"]
    for path in configs:
        assert parse(path).name == path.parent.name
    with pytest.raises(text_format.ParseError):  # the check does reject what is not the schema
        text_format.Parse('name: "x"\nmax_batch: 4\n', mc.ModelConfig())


@pytest.mark.parametrize("graph, max_batch", [("text_encoder", 64), ("video_encoder", 16)])
def test_encoders_follow_the_manifest(repo, package, graph, max_batch):
    config, spec = parse(repo / graph / "config.pbtxt"), package.graph(graph)
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == max_batch
    for served, tensors in ((config.input, spec.inputs), (config.output, spec.outputs)):
        assert [(t.name, t.data_type, list(t.dims)) for t in served] == \
            [(t.name, DTYPE[t.dtype], list(t.shape[1:])) for t in tensors]  # the batch axis is Triton's implicit one
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert max_batch in config.dynamic_batching.preferred_batch_size
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    assert config.parameters["hbi_graph_sha256"].string_value == spec.sha256
    model = repo / graph / "1" / "model.onnx"
    assert hashlib.sha256(model.read_bytes()).hexdigest() == spec.sha256  # the package's graph, decompositions in


def test_ensemble_takes_strings_to_the_text_side(repo, package):
    ensemble, tokenizer = parse(repo / "text" / "config.pbtxt"), parse(repo / "tokenizer" / "config.pbtxt")
    text = package.graph("text_encoder")
    assert ensemble.platform == "ensemble" and tokenizer.backend == "python"
    assert [(t.name, t.data_type) for t in ensemble.input] == [("TEXT", mc.TYPE_STRING)]
    assert [t.name for t in ensemble.output] == [t.name for t in text.outputs] + ["truncated"]
    steps = ensemble.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["tokenizer", "text_encoder"]
    produced = {"TEXT"}
    for step in steps:  # every step reads only what exists, and its names are the models' own
        model = parse(repo / step.model_name / "config.pbtxt")
        assert set(step.input_map) == {t.name for t in model.input}
        assert set(step.input_map.values()) <= produced
        assert set(step.output_map) <= {t.name for t in model.output}
        produced |= set(step.output_map.values())
    assert {t.name for t in ensemble.output} <= produced
    assert tokenizer.parameters["max_words"].string_value == str(text.inputs[0].shape[1])


def test_tokenizer_model_gives_the_runtime_ids(repo):
    """model.py against a stand-in of Triton's triton_python_backend_utils (what it calls of it)."""
    stub = types.ModuleType("triton_python_backend_utils")

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def as_numpy(self):
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors=None, error=None):
            self.outputs, self.error = {t.name: t.array for t in output_tensors or []}, error

    stub.Tensor, stub.InferenceResponse, stub.TritonError = Tensor, InferenceResponse, str
    stub.get_input_tensor_by_name = lambda request, name: request[name]
    spec = importlib.util.spec_from_file_location("hbi_tokenizer_model", repo / "tokenizer" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["triton_python_backend_utils"] = stub
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["triton_python_backend_utils"]
    config = json.dumps({"parameters": {"max_words": {"string_value": "32"}}})
    model = module.TritonPythonModel()
    model.initialize({"model_config": config})
    texts = ["a dog runs on the beach", "word " * 40]
    good, bad = model.execute([{"TEXT": Tensor("TEXT", np.array([[t.encode()] for t in texts], dtype=object))},
                               {"TEXT": Tensor("TEXT", np.array([[b"   "]], dtype=object))}])
    with load(DEMO_PACKAGE) as runtime:
        ids, mask, truncated = runtime.tokenizer(texts)
    assert np.array_equal(good.outputs["input_ids"], ids) and np.array_equal(good.outputs["attention_mask"], mask)
    assert good.outputs["truncated"].reshape(-1).tolist() == [False, True] == list(truncated)
    assert bad.error and not bad.outputs  # an empty query is an error response, not a dead model


def test_readme_and_manifest(repo, package):
    readme = (repo / "README.md").read_text()
    assert "tritonserver --model-repository=" in readme and "--backend triton" in readme
    manifest = json.loads((repo / "hbi_repository.json").read_text())
    assert manifest["package_sha256"] == package.manifest_sha256
    assert manifest["graphs"] == {g: package.graph(g).sha256 for g in ("text_encoder", "video_encoder")}


def test_tensorrt_plans_with_the_plugin_library(tmp_path, package):
    engines = tmp_path / "engines" / "fp16"
    engines.mkdir(parents=True)
    entries = {}
    for graph, top in (("text_encoder", 48), ("video_encoder", 12)):
        spec = package.graph(graph)
        plan = engines / f"{graph}.engine"
        plan.write_bytes(graph.encode() * 10)  # bytes only: no TensorRT here, the file is copied, never run
        axis = spec.inputs[0].shape[0]
        entries[graph] = EngineEntry(
            graph=graph, file=f"engines/fp16/{plan.name}", sha256=hashlib.sha256(plan.read_bytes()).hexdigest(),
            onnx_file=spec.file, onnx_sha256=spec.sha256, tensorrt_version="10.13.3", gpu_name="NVIDIA L4",
            compute_capability="8.9", precision="fp16", strongly_typed=False,
            profiles=(profile_from_ranges(spec.inputs, {axis: AxisRange(1, 8, top)}),),
            plugin_library="/opt/hbi/libhbi_trt_plugins.so", plugin_library_sha256="ab" * 32)
    (engines / "engines.json").write_text(json.dumps(EngineSet(
        package_sha256=package.manifest_sha256, precision="fp16", engines=entries).to_dict()))
    out = tmp_path / "repo"
    summary = write_repository(DEMO_PACKAGE, out, engines=engines)
    for graph, top in (("text_encoder", 48), ("video_encoder", 12)):
        config = parse(out / graph / "config.pbtxt")
        assert (config.platform, config.max_batch_size) == ("tensorrt_plan", top)
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        assert (out / graph / "1" / "model.plan").read_bytes() == graph.encode() * 10
    assert parse(out / "text" / "config.pbtxt").max_batch_size == 48
    readme = (out / "README.md").read_text()
    assert "LD_PRELOAD=" in readme and "ab" * 32 in readme
    assert summary["plugin_library"]["sha256"] == "ab" * 32
    entries["video_encoder"] = EngineEntry(**{**entries["video_encoder"].__dict__, "onnx_sha256": "cd" * 32})
    (engines / "engines.json").write_text(json.dumps(EngineSet(
        package_sha256=package.manifest_sha256, precision="fp16", engines=entries).to_dict()))
    with pytest.raises(BadInputError, match="built from another"):
        write_repository(DEMO_PACKAGE, tmp_path / "repo2", engines=engines)


def test_output_folder_rules(tmp_path, repo):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="does not hold a Triton model repository"):
        write_repository(DEMO_PACKAGE, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    out = tmp_path / "repo"
    write_repository(DEMO_PACKAGE, out)
    with pytest.raises(UsageError, match="already exists"):
        write_repository(DEMO_PACKAGE, out)
    write_repository(DEMO_PACKAGE, out, overwrite=True, serving=Serving(kind="gpu"))
    assert parse(out / "video_encoder" / "config.pbtxt").instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    with pytest.raises(UsageError, match="input"):
        write_repository(DEMO_PACKAGE, DEMO_PACKAGE / "triton")


def test_cli(tmp_path):
    from hbi_export.cli import app

    out = tmp_path / "repo"
    result = CliRunner().invoke(app, ["triton", str(DEMO_PACKAGE), str(out), "--max-batch", "video_encoder=8",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["models"]["video_encoder"]["max_batch_size"] == 8 == parse(
        out / "video_encoder" / "config.pbtxt").max_batch_size
    bad = CliRunner().invoke(app, ["triton", str(DEMO_PACKAGE), str(tmp_path / "r2"), "--max-batch", "scores=4"])
    assert bad.exit_code == 2 and "--max-batch takes GRAPH=N" in bad.output
