"""Engine building behind the seam (hbi_export.trt.builder / .package), with the fake tensorrt of conftest.py.

Nothing here runs TensorRT: these tests hold the decisions the builder makes (flags, fp32 pins, strongly typed
networks, Q/DQ requirements, plugin-function dropping, profiles, timing cache, error reporting) and the engine
manifest it writes.
"""

from __future__ import annotations

import json

import onnx
import pytest

from hbi_export.trt.builder import (BuildPlan, build_serialized, has_qdq, parse_version, plan_build,
                                    prepare_onnx, require_qdq)
from hbi_export.trt.package import EngineOptions, build_package_engines
from hbi_export.trt.profiles import derive_profile
from hbi_runtime.engines import AxisRange, HostInfo, check_engine, read_engine_set
from hbi_runtime.errors import HbiError, MismatchError, UsageError
from hbi_runtime.package import load_package, sha256_file


# ------------------------------------------------------------------------------------------------ plan_build

def test_trt10_fp16_sets_fp16_and_pins_layernorm_softmax():
    plan = plan_build((10, 3, 0), "fp16", graph_precision="fp32", has_qdq=False)
    assert (plan.strongly_typed, plan.flags, plan.clear_flags, plan.pin_fp32) == (
        False, ("FP16", "OBEY_PRECISION_CONSTRAINTS"), (), True)


def test_trt10_fp32_clears_tf32():
    plan = plan_build((10, 8, 0), "fp32", graph_precision="fp32", has_qdq=False)
    assert (plan.flags, plan.clear_flags, plan.pin_fp32) == ((), ("TF32",), False)


def test_int8_needs_qdq_and_never_calibrates():
    with pytest.raises(UsageError, match="needs a quantized \\(Q/DQ\\) package") as info:
        require_qdq("int8", {"text_encoder": False, "video_encoder": False})
    assert "hbi-export calibrate" in info.value.hint
    require_qdq("int8", {"text_encoder": False, "video_encoder": True})  # calibrate quantizes the video encoder
    require_qdq("fp16", {"text_encoder": False})
    # the graphs calibrate leaves in float are built at their own precision
    plain = plan_build((10, 3, 0), "int8", graph_precision="fp32", has_qdq=False)
    assert (plain.precision, plain.flags, plain.clear_flags) == ("fp32", (), ("TF32",))
    assert plain.notes[0] == "no Q/DQ nodes in this graph: built as fp32"
    assert plan_build((10, 3, 0), "int8", graph_precision="fp16", has_qdq=False).flags == (
        "FP16", "OBEY_PRECISION_CONSTRAINTS")
    plan = plan_build((10, 3, 0), "int8", graph_precision="fp32", has_qdq=True)
    assert (plan.flags, plan.clear_flags) == (("INT8",), ("TF32",))
    assert plan_build((10, 3, 0), "int8", graph_precision="fp16", has_qdq=True).flags == ("INT8", "FP16")
    calibrated = plan_build((10, 3, 0), "int8", graph_precision="int8", has_qdq=True)  # hbi-export calibrate's
    assert (calibrated.flags, calibrated.clear_flags) == (("INT8",), ("TF32",))
    with pytest.raises(UsageError, match="this package is quantized"):
        plan_build((10, 3, 0), "fp16", graph_precision="fp32", has_qdq=True)


def test_trt11_is_always_strongly_typed_and_takes_types_from_the_graph():
    plan = plan_build((11, 1, 0), "fp16", graph_precision="fp16", has_qdq=False)
    assert (plan.strongly_typed, plan.flags, plan.clear_flags, plan.pin_fp32) == (True, (), (), False)
    with pytest.raises(UsageError, match="TensorRT 11 networks are strongly typed") as info:
        plan_build((11, 0, 0), "fp16", graph_precision="fp32", has_qdq=False)
    assert "--precision fp16" in info.value.hint
    assert plan_build((11, 0, 0), "int8", graph_precision="fp32", has_qdq=True).flags == ()


def test_trt10_strongly_typed_on_request():
    plan = plan_build((10, 3, 0), "fp16", graph_precision="fp16", has_qdq=False, strongly_typed=True)
    assert plan.strongly_typed and plan.flags == () and not plan.pin_fp32
    with pytest.raises(UsageError, match="--strongly-typed was given"):
        plan_build((10, 3, 0), "fp16", graph_precision="fp32", has_qdq=False, strongly_typed=True)
    with pytest.raises(UsageError, match="fp32 engine from an fp16 package"):
        plan_build((10, 3, 0), "fp32", graph_precision="fp16", has_qdq=False, strongly_typed=True)


@pytest.mark.parametrize("version, drop", [((10, 3, 0), True), ((10, 6, 1), True), ((10, 7, 0), False),
                                           ((11, 0, 0), False)])
def test_plugin_functions_dropped_only_where_the_parser_prefers_them(version, drop):
    plan = plan_build(version, "fp16", graph_precision="fp16", has_qdq=False, plugins_loaded=True)
    assert plan.drop_plugin_functions is drop
    assert not plan_build(version, "fp16", graph_precision="fp16", has_qdq=False).drop_plugin_functions


def test_old_tensorrt_and_bad_precision_are_refused():
    with pytest.raises(UsageError, match="TensorRT 8.6.1 is too old; hbi engines need TensorRT >= 10.3"):
        plan_build((8, 6, 1), "fp16", graph_precision="fp32", has_qdq=False)
    with pytest.raises(UsageError, match="--precision must be fp32, fp16 or int8"):
        plan_build((10, 3, 0), "bf16", graph_precision="fp32", has_qdq=False)
    assert parse_version("10.3.0.26") == (10, 3, 0) and parse_version("11.1") == (11, 1, 0)
    with pytest.raises(UsageError, match="cannot read a TensorRT version"):
        parse_version("unknown")


# ------------------------------------------------------------------------------------------------ ONNX

def test_prepare_onnx_drops_only_the_plugin_functions(demo_dir):
    model = onnx.load(str(demo_dir / "text_encoder.onnx"))
    assert [f.name for f in model.functions] == ["TokenMerge"]
    kept, dropped = prepare_onnx(model, drop_plugin_functions=False)
    assert dropped == [] and [f.name for f in kept.functions] == ["TokenMerge"]
    model.functions.append(onnx.helper.make_function("other", "Helper", ["x"], ["y"],
                                                     [onnx.helper.make_node("Identity", ["x"], ["y"])],
                                                     [onnx.helper.make_opsetid("", 18)]))
    prepared, dropped = prepare_onnx(model, drop_plugin_functions=True)
    assert dropped == ["TokenMerge"] and [f.name for f in prepared.functions] == ["Helper"]
    assert not has_qdq(prepared)


def test_prepare_onnx_adds_missing_plugin_attributes_and_refuses_foreign_ones(demo_dir):
    model = onnx.load(str(demo_dir / "interaction.onnx"))
    nodes = [n for n in model.graph.node if n.domain == "hbi"]
    assert nodes
    for n in nodes:
        keep = [a for a in n.attribute if a.name not in ("plugin_namespace", "plugin_version")]
        del n.attribute[:]
        n.attribute.extend(keep)
    prepare_onnx(model, drop_plugin_functions=False)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["plugin_namespace"] == b"hbi" and attrs["plugin_version"] == b"1"
    nodes[0].attribute[-1].s = b"2"  # plugin_version
    with pytest.raises(MismatchError, match="plugin_version=b'2'; the hbi plugins are plugin_version='1'"):
        prepare_onnx(model, drop_plugin_functions=False)


def test_has_qdq_sees_quantize_nodes():
    node = onnx.helper.make_node("QuantizeLinear", ["x", "s"], ["q"])
    graph = onnx.helper.make_graph([node], "g", [], [])
    assert has_qdq(onnx.helper.make_model(graph))


# ------------------------------------------------------------------------------------------------ build_serialized

def _plan(**kw) -> BuildPlan:
    return plan_build((10, 3, 0), kw.pop("precision", "fp16"), graph_precision="fp32", has_qdq=False, **kw)


def _text_graph(demo_dir):
    pkg = load_package(demo_dir)
    return pkg, onnx.load(str(demo_dir / "text_encoder.onnx")), pkg.graph_path("text_encoder")


def test_build_pins_layernorm_and_softmax_and_sets_flags_profile_workspace(fake_trt, demo_dir, tmp_path):
    pkg, model, path = _text_graph(demo_dir)
    profile = derive_profile(pkg.graph("text_encoder"), AxisRange(1, 4, 16))
    cache = tmp_path / "trt.cache"
    result = build_serialized(fake_trt, model.SerializeToString(), path, _plan(), profile, workspace_mb=64,
                              timing_cache=cache)
    build = fake_trt.builds[-1]
    config, network = build["config"], build["network"]
    assert config.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS", "TF32"}
    assert config.pools == {"WORKSPACE": 64 << 20}
    assert config.profiles[0].shapes["input_ids"] == ((1, 32), (4, 32), (16, 32))
    pinned = [layer for layer in network.layers if layer.precision == "float32"]
    lt = fake_trt.LayerType
    assert pinned and {layer.type for layer in pinned} == {lt.NORMALIZATION, lt.SOFTMAX}
    assert all(layer.output_types == {0: "float32"} for layer in pinned)
    n_norm = sum(n.op_type in ("LayerNormalization", "Softmax") for n in model.graph.node)
    assert result.pinned_layers == n_norm == len(pinned)
    assert result.plugin_layers == 0 and network.flags == 0
    assert result.engine.startswith(b"ENGINE:") and cache.read_bytes() == b"CACHE[]" and result.timing_cache_written
    build_serialized(fake_trt, model.SerializeToString(), path, _plan(), profile, workspace_mb=64,
                     timing_cache=cache)
    assert cache.read_bytes() == b"CACHE[CACHE[]]"  # the previous cache was read and extended


def test_strongly_typed_network_flag_on_trt10_only(fake_trt, demo_dir):
    pkg, model, path = _text_graph(demo_dir)
    profile = derive_profile(pkg.graph("text_encoder"))
    plan = plan_build((10, 3, 0), "fp32", graph_precision="fp32", has_qdq=False, strongly_typed=True)
    build_serialized(fake_trt, model.SerializeToString(), path, plan, profile, workspace_mb=64)
    assert fake_trt.builds[-1]["network"].flags == 1 << 0
    plan11 = plan_build((11, 0, 0), "fp32", graph_precision="fp32", has_qdq=False)
    build_serialized(fake_trt, model.SerializeToString(), path, plan11, profile, workspace_mb=64)
    assert fake_trt.builds[-1]["network"].flags == 0  # deprecated and ignored in 11


def test_parser_errors_are_reported_with_their_nodes(fake_trt, demo_dir):
    pkg, model, path = _text_graph(demo_dir)
    fake_trt.parse_errors = [fake_trt.ParserError("merge_1", "TokenMerge", "Plugin not found"),
                             fake_trt.ParserError("", "Gather", "unsupported dtype")]
    with pytest.raises(MismatchError) as info:
        build_serialized(fake_trt, model.SerializeToString(), path, _plan(), derive_profile(pkg.graph("text_encoder")),
                         workspace_mb=64)
    assert info.value.message == (f"TensorRT 10.3.0 cannot parse {path}: merge_1 (TokenMerge): Plugin not found; "
                                  "node #3 (Gather): unsupported dtype")
    assert info.value.hint == f"see which ops this TensorRT lacks: `hbi-export check {path.parent}`"
    assert fake_trt.builds == []  # nothing was built


def test_failed_build_and_bad_timing_cache_are_errors(fake_trt, demo_dir, tmp_path):
    pkg, model, path = _text_graph(demo_dir)
    profile = derive_profile(pkg.graph("text_encoder"))
    fake_trt.fail_build = True
    with pytest.raises(HbiError, match="TensorRT could not build an engine from .*: out of memory while building"):
        build_serialized(fake_trt, model.SerializeToString(), path, _plan(), profile, workspace_mb=64)
    fake_trt.fail_build, fake_trt.timing_cache_ok = False, False
    cache = tmp_path / "stale.cache"
    cache.write_bytes(b"from another GPU")
    with pytest.raises(MismatchError, match="timing cache .* was made by another TensorRT version or GPU"):
        build_serialized(fake_trt, model.SerializeToString(), path, _plan(), profile, workspace_mb=64,
                         timing_cache=cache)


def test_network_inputs_must_match_the_manifest(fake_trt, demo_dir):
    pkg, model, path = _text_graph(demo_dir)
    profile = derive_profile(pkg.graph("video_encoder"))  # the wrong graph's inputs
    with pytest.raises(MismatchError, match="the parsed network has inputs"):
        build_serialized(fake_trt, model.SerializeToString(), path, _plan(), profile, workspace_mb=64)


# ------------------------------------------------------------------------------------------------ whole package

def test_build_package_writes_engines_and_a_manifest_the_runtime_accepts(fake_trt, fake_gpu, demo_copy, plugin_lib):
    options = EngineOptions(precision="fp16", batch=AxisRange(1, 4, 16), axes={"video_batch": AxisRange(1, 8, 64)},
                            workspace_mb=256, plugins=plugin_lib)
    summary = build_package_engines(demo_copy, options, trt=fake_trt, device=fake_gpu)
    assert summary["schema"] == "hbi.build-engine/1" and summary["precision"] == "fp16"
    assert fake_trt.loaded_libraries == [str(plugin_lib.resolve())]
    by_graph = {e["graph"]: e for e in summary["engines"]}
    assert set(by_graph) == {"text_encoder", "video_encoder", "interaction"}
    # TensorRT 10.3 + plugins: the functions are dropped, so the parser makes plugin layers of the hbi nodes
    assert by_graph["text_encoder"]["functions_dropped"] == ["TokenMerge"]
    assert by_graph["text_encoder"]["plugin_layers"] == 2 and by_graph["interaction"]["plugin_layers"] >= 1
    assert by_graph["interaction"]["profile"]["video_tokens_l0"]["max"][0] == 64
    assert by_graph["interaction"]["profile"]["text_tokens_l0"]["max"][0] == 16

    engine_set = read_engine_set(demo_copy, "fp16")
    pkg = load_package(demo_copy)
    assert engine_set.package_sha256 == pkg.manifest_sha256
    host = HostInfo(fake_trt.__version__, fake_gpu.name, fake_gpu.compute_capability, sha256_file(plugin_lib))
    for name, entry in engine_set.engines.items():
        assert entry.onnx_sha256 == pkg.graph(name).sha256 and entry.gpu_name == "NVIDIA Fake GPU"
        assert entry.compute_capability == "9.0" and entry.tensorrt_version == "10.3.0.26"
        assert check_engine(demo_copy, entry, host, onnx_sha256=pkg.graph(name).sha256).is_file()
    rebuild = engine_set.engines["interaction"].rebuild_command(demo_copy)
    assert rebuild.endswith(f"--precision fp16 --min-batch 1 --opt-batch 4 --max-batch 16 --workspace 256 "
                            f"--axis video_batch=1:8:64 --plugins {plugin_lib}")


def test_build_package_without_plugins_keeps_the_functions(fake_trt, fake_gpu, demo_copy):
    summary = build_package_engines(demo_copy, EngineOptions(precision="fp32"), trt=fake_trt, device=fake_gpu)
    text = next(e for e in summary["engines"] if e["graph"] == "text_encoder")
    assert text["functions_dropped"] == [] and text["plugin_layers"] == 0
    assert any("standard-op decompositions" in n for n in text["notes"])
    manifest = json.loads((demo_copy / "engines" / "fp32" / "engines.json").read_text())
    assert manifest["engines"]["text_encoder"]["plugin_library_sha256"] is None


def test_build_package_refuses_before_building(fake_trt, fake_gpu, demo_copy):
    with pytest.raises(UsageError, match="needs a quantized"):
        build_package_engines(demo_copy, EngineOptions(precision="int8"), trt=fake_trt, device=fake_gpu)
    with pytest.raises(UsageError, match="--axis names"):
        build_package_engines(demo_copy, EngineOptions(axes={"frames": AxisRange(1, 1, 1)}), trt=fake_trt,
                              device=fake_gpu)
    assert fake_trt.builds == [] and not (demo_copy / "engines").exists()
