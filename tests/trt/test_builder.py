"""Engine building behind the seam (hbi_export.trt.builder / .package), with the fake tensorrt of conftest.py.

Nothing here runs TensorRT. Three kinds of test:

* the plan and ``--precision auto`` (pure);
* the Polygraphy chain as data (:func:`chain_config`, pure) and the reproducer lines (pure);
* the chain *run*: Polygraphy's own loaders (``NetworkFromOnnxBytes``, ``PostprocessNetwork``, ``CreateConfig``,
  ``EngineBytesFromNetwork``) driving the version-faithful fake ``tensorrt`` (10.3, 10.16, 11.1). These need
  polygraphy (skipped without it); what they verify is how our arguments reach TensorRT's API through
  Polygraphy, and that the fake refuses what the real API refuses, not TensorRT's behaviour.
"""

from __future__ import annotations

import json

import onnx
import pytest

from hbi_export.trt.builder import (BuildPlan, build_serialized, chain_config, has_qdq, parse_version, plan_build,
                                    prepare_onnx, reproducer_lines, require_qdq, resolve_precision)
from hbi_export.trt.package import EngineOptions, build_package_engines
from hbi_export.trt.profiles import derive_profile
from hbi_runtime.engines import AxisRange, HostInfo, check_engine, read_engine_set
from hbi_runtime.errors import HbiError, MismatchError, UsageError
from hbi_runtime.package import load_package, sha256_file

TRT_VERSIONS = ("10.3.0.26", "10.16.0.72", "11.1.0.5")  # the fake's versions (conftest.py)
PKG = {"text_encoder": "fp32", "video_encoder": "fp32", "interaction": "fp32"}
NOT_QUANTIZED = {"text_encoder": False, "video_encoder": False, "interaction": False}


# ------------------------------------------------------------------------------------------------ plan_build

def test_trt10_fp16_sets_fp16_and_pins_layernorm_softmax():
    plan = plan_build((10, 3, 0), "fp16", graph_precision="fp32", has_qdq=False)
    assert (plan.strongly_typed, plan.flags, plan.clear_flags, plan.pin_fp32, plan.tf32) == (
        False, ("FP16", "OBEY_PRECISION_CONSTRAINTS"), (), True, True)
    assert plan.precision_constraints == "obey"


@pytest.mark.parametrize("version, typed", [((10, 8, 0), False), ((10, 3, 0), True), ((11, 1, 0), False)])
def test_every_fp32_build_clears_tf32(version, typed):
    """Issue 3: TF32 was cleared in the weakly typed branch only; fp32 engines must pass the fp32 gate."""
    plan = plan_build(version, "fp32", graph_precision="fp32", has_qdq=False, strongly_typed=typed)
    assert (plan.flags, plan.clear_flags, plan.tf32, plan.pin_fp32) == ((), ("TF32",), False, False)
    assert plan.strongly_typed == (typed or version[0] >= 11)
    int8 = plan_build(version, "int8", graph_precision="fp32", has_qdq=True, strongly_typed=typed)
    assert not int8.tf32  # the unquantized layers of an int8 engine from an fp32 graph are fp32
    fp16 = plan_build(version, "fp16", graph_precision="fp16", has_qdq=False, strongly_typed=True)
    assert fp16.tf32  # fp16 engines keep TensorRT's default


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
    assert plan_build((10, 3, 0), "int8", graph_precision="fp16", has_qdq=True).flags == ("FP16", "INT8")
    calibrated = plan_build((10, 3, 0), "int8", graph_precision="int8", has_qdq=True)  # hbi-export calibrate's
    assert (calibrated.flags, calibrated.clear_flags) == (("INT8",), ("TF32",))
    with pytest.raises(UsageError, match="this package is quantized"):
        plan_build((10, 3, 0), "fp16", graph_precision="fp32", has_qdq=True)


def test_trt11_is_always_strongly_typed_and_takes_types_from_the_graph():
    plan = plan_build((11, 1, 0), "fp16", graph_precision="fp16", has_qdq=False)
    assert (plan.strongly_typed, plan.flags, plan.clear_flags, plan.pin_fp32) == (True, (), (), False)
    with pytest.raises(UsageError, match="TensorRT 11 networks are strongly typed") as info:
        plan_build((11, 0, 0), "fp16", graph_precision="fp32", has_qdq=False)
    assert "--precision fp16" in info.value.hint and "--precision auto" in info.value.hint
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
    with pytest.raises(UsageError, match="--precision must be one of auto, fp32, fp16, int8"):
        resolve_precision("bf16", (10, 3, 0), strongly_typed=False, graph_precisions=PKG, quantized=NOT_QUANTIZED)
    assert parse_version("10.3.0.26") == (10, 3, 0) and parse_version("11.1") == (11, 1, 0)
    with pytest.raises(UsageError, match="cannot read a TensorRT version"):
        parse_version("unknown")


# ------------------------------------------------------------------------------------------------ --precision auto

@pytest.mark.parametrize("version, typed, graphs, quantized, want", [
    ((10, 3, 0), False, PKG, NOT_QUANTIZED, "fp16"),  # weak typing allows fp16
    ((10, 16, 0), True, PKG, NOT_QUANTIZED, "fp32"),  # --strongly-typed: the package's own
    ((11, 1, 0), False, PKG, NOT_QUANTIZED, "fp32"),  # TensorRT 11, an fp32 package: fp32 (issue 2)
    ((11, 1, 0), False, dict.fromkeys(PKG, "fp16"), NOT_QUANTIZED, "fp16"),
    ((11, 1, 0), False, {**PKG, "video_encoder": "int8"}, {**NOT_QUANTIZED, "video_encoder": True}, "int8"),
    ((10, 3, 0), False, PKG, {**NOT_QUANTIZED, "video_encoder": True}, "int8"),
])
def test_auto_precision(version, typed, graphs, quantized, want):
    got, note = resolve_precision("auto", version, strongly_typed=typed, graph_precisions=graphs,
                                  quantized=quantized)
    assert got == want and note.startswith(f"--precision auto: {want}")
    for graph, precision in graphs.items():  # what auto resolves to is always buildable
        plan_build(version, got, graph_precision=precision, has_qdq=quantized[graph], strongly_typed=typed)
    assert resolve_precision("fp32", version, strongly_typed=typed, graph_precisions=graphs,
                             quantized=quantized) == ("fp32", None)


def test_auto_on_trt11_names_the_way_to_fp16_engines():
    _, note = resolve_precision("auto", (11, 1, 0), strongly_typed=False, graph_precisions=PKG,
                                quantized=NOT_QUANTIZED)
    assert "strongly typed" in note and "hbi-export onnx --precision fp16" in note


# ------------------------------------------------------------------------------------------------ the chain, as data

def _profile(demo_dir, graph="text_encoder", batch=AxisRange(1, 4, 16)):
    return derive_profile(load_package(demo_dir).graph(graph), batch)


def test_chain_config_weakly_typed_fp16(demo_dir, tmp_path):
    plan = plan_build((10, 3, 0), "fp16", graph_precision="fp32", has_qdq=False)
    chain = chain_config(plan, _profile(demo_dir), workspace_mb=64, timing_cache=tmp_path / "t.cache")
    assert chain.network == {"strongly_typed": False} and chain.pin_fp32
    assert chain.config == {"tf32": True, "fp16": True, "int8": False, "precision_constraints": "obey",
                            "profiles": [{"input_ids": ((1, 32), (4, 32), (16, 32)),
                                          "attention_mask": ((1, 32), (4, 32), (16, 32))}],
                            "memory_pool_limits": {"WORKSPACE": 64 << 20},
                            "load_timing_cache": str(tmp_path / "t.cache")}
    assert chain.save_timing_cache == str(tmp_path / "t.cache")


@pytest.mark.parametrize("version, typed, network_flag", [((10, 3, 0), True, True), ((11, 1, 0), False, False),
                                                          ((11, 1, 0), True, False)])
def test_chain_config_strongly_typed_fp32(demo_dir, version, typed, network_flag):
    plan = plan_build(version, "fp32", graph_precision="fp32", has_qdq=False, strongly_typed=typed)
    chain = chain_config(plan, _profile(demo_dir), workspace_mb=64)
    assert chain.network == {"strongly_typed": network_flag}  # the creation flag is ignored from TensorRT 11
    assert (chain.config["tf32"], chain.config["fp16"], chain.config["int8"],
            chain.config["precision_constraints"], chain.config["load_timing_cache"]) == (
        False, False, False, None, None)
    assert not chain.pin_fp32 and chain.save_timing_cache is None


# ------------------------------------------------------------------------------------------------ reproducer lines

def test_reproducer_lines_weakly_typed_fp16(demo_dir):
    plan = plan_build((10, 3, 0), "fp16", graph_precision="fp32", has_qdq=False, plugins_loaded=True)
    lines = reproducer_lines(plan, _profile(demo_dir), onnx="p/engines/fp16/text_encoder.parsed.onnx",
                             package_onnx="p/text_encoder.onnx", workspace_mb=256, timing_cache="t.cache",
                             plugins="build/libhbi_trt_plugins.so", pinned=[("ln_0", 1), ("sm_1", 1)])
    assert lines["onnx"] == "p/engines/fp16/text_encoder.parsed.onnx"
    assert lines["trtexec"] == (
        "trtexec --onnx=p/engines/fp16/text_encoder.parsed.onnx "
        "--minShapes=input_ids:1x32,attention_mask:1x32 --optShapes=input_ids:4x32,attention_mask:4x32 "
        "--maxShapes=input_ids:16x32,attention_mask:16x32 --memPoolSize=workspace:256M --fp16 "
        "--precisionConstraints=obey --layerPrecisions=ln_0:fp32,sm_1:fp32 --layerOutputTypes=ln_0:fp32,sm_1:fp32 "
        "--timingCacheFile=t.cache --dynamicPlugins=build/libhbi_trt_plugins.so")
    first, second = lines["polygraphy"].split(" && ")
    # ONNX Runtime cannot run the graph without its functions: its outputs come from the package's graph
    assert first.startswith("polygraphy run p/text_encoder.onnx --onnxrt --input-shapes 'input_ids:[4,32]' "
                            "'attention_mask:[4,32]' --save-outputs p/engines/fp16/text_encoder.parsed.onnxrt-")
    assert second.startswith("polygraphy run p/engines/fp16/text_encoder.parsed.onnx --trt --trt-min-shapes "
                             "'input_ids:[1,32]' 'attention_mask:[1,32]' --trt-opt-shapes")
    for part in ("--pool-limit workspace:256M", "--fp16 --tf32", "--precision-constraints obey --trt-npps ",
                 "builder.py:polygraphy_pin_fp32", "--load-timing-cache t.cache --save-timing-cache t.cache",
                 "--plugins build/libhbi_trt_plugins_dlopen.so", "--load-outputs",
                 "--atol 1e-2 --rtol 1e-2 --check-error-stat median"):
        assert part in second, part


@pytest.mark.parametrize("version, typed", [((11, 1, 0), False), ((10, 3, 0), True)])
def test_reproducer_lines_strongly_typed_fp32(demo_dir, version, typed):
    plan = plan_build(version, "fp32", graph_precision="fp32", has_qdq=False, strongly_typed=typed)
    lines = reproducer_lines(plan, _profile(demo_dir), onnx="p/t.onnx", package_onnx="p/t.onnx", workspace_mb=64)
    trtexec, polygraphy = lines["trtexec"], lines["polygraphy"]
    assert "--noTF32" in trtexec and "--fp16" not in trtexec and "--int8" not in trtexec
    assert ("--stronglyTyped" in trtexec) == (version[0] < 11)  # a deprecated no-op in trtexec 11
    assert " && " not in polygraphy and " --trt " in polygraphy and " --onnxrt " in polygraphy
    assert "--tf32" not in polygraphy  # Polygraphy leaves TF32 off unless asked
    assert ("--strongly-typed" in polygraphy) == (version[0] < 11)
    assert "--atol 1e-4 --rtol 1e-4 --check-error-stat max" in polygraphy


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


# ------------------------------------------------------------------------------------------------ the chain, run

def _text_graph(demo_dir):
    pkg = load_package(demo_dir)
    return pkg, onnx.load(str(demo_dir / "text_encoder.onnx")), pkg.graph_path("text_encoder")


def _plan(version=(10, 3, 0), **kw) -> BuildPlan:
    return plan_build(version, kw.pop("precision", "fp16"), graph_precision="fp32", has_qdq=False, **kw)


def test_build_pins_layernorm_and_softmax_and_sets_flags_profile_workspace(polygraphy_trt, fake_trt, demo_dir,
                                                                           tmp_path, capsys):
    pkg, model, path = _text_graph(demo_dir)
    profile = derive_profile(pkg.graph("text_encoder"), AxisRange(1, 4, 16))
    cache = tmp_path / "trt.cache"
    result = build_serialized(fake_trt, model.SerializeToString(), path, _plan(), profile, workspace_mb=64,
                              timing_cache=cache)
    build = fake_trt.builds[-1]
    config, network = build["config"], build["network"]
    assert config.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS", "TF32"}  # through Polygraphy's CreateConfig
    assert config.pools == {"WORKSPACE": 64 << 20}
    assert config.profiles[0].shapes["input_ids"] == ((1, 32), (4, 32), (16, 32))
    pinned = [layer for layer in network.layers if layer.precision_is_set]
    lt = fake_trt.LayerType
    assert pinned and {layer.type for layer in pinned} == {lt.NORMALIZATION, lt.SOFTMAX}
    assert all(layer.precision == fake_trt.float32 for layer in pinned)
    assert all(layer.output_types == {0: fake_trt.float32} for layer in pinned)
    n_norm = sum(n.op_type in ("LayerNormalization", "Softmax") for n in model.graph.node)
    assert result.pinned_layers == n_norm == len(pinned) == len(result.pinned)
    assert result.plugin_layers == 0 and network.flags == 0 and not network.strongly_typed
    assert bytes(result.engine).startswith(b"FAKETRT-PLAN") and result.timing_cache_written
    assert cache.read_bytes() == f"FAKETRT-CACHE:{fake_trt.__version__}:1".encode()
    build_serialized(fake_trt, model.SerializeToString(), path, _plan(), profile, workspace_mb=64,
                     timing_cache=cache)
    assert cache.read_bytes() == f"FAKETRT-CACHE:{fake_trt.__version__}:2".encode()  # read, extended, written
    assert capsys.readouterr().out == ""  # Polygraphy's log never reaches stdout (--format json)


@pytest.mark.parametrize("version", TRT_VERSIONS)
@pytest.mark.parametrize("typed", [False, True])
def test_fp32_builds_clear_tf32_on_every_version(polygraphy_trt, make_trt, demo_dir, version, typed):
    """Issue 3 end to end: whatever the network mode, the fp32 config the builder gets has TF32 cleared."""
    fake = make_trt(version)
    pkg, model, path = _text_graph(demo_dir)
    plan = plan_build(parse_version(version), "fp32", graph_precision="fp32", has_qdq=False, strongly_typed=typed)
    build_serialized(fake, model.SerializeToString(), path, plan, derive_profile(pkg.graph("text_encoder")),
                     workspace_mb=64)
    build = fake.builds[-1]
    assert build["config"].flags == set()
    assert build["network"].strongly_typed == (typed or version.startswith("11"))
    # the creation flag: STRONGLY_TYPED is bit 1 in TensorRT 10 (not asked for on 11: deprecated, ignored)
    assert build["network"].flags == (1 << 1 if typed and version.startswith("10") else 0)


def test_trt11_fake_rejects_what_trt11_removed(polygraphy_trt, make_trt, demo_dir):
    """The fake is as strict as TensorRT 11: no FP16 flag, no layer precisions; a TensorRT 10 plan fails there."""
    fake = make_trt("11.1.0.5")
    pkg, model, path = _text_graph(demo_dir)
    weak = plan_build((10, 3, 0), "fp16", graph_precision="fp32", has_qdq=False)  # a TensorRT 10 plan, forced
    with pytest.raises(AttributeError, match="object has no attribute 'precision'"):  # as pybind11's
        build_serialized(fake, model.SerializeToString(), path, weak, derive_profile(pkg.graph("text_encoder")),
                         workspace_mb=64)
    assert not hasattr(fake.BuilderFlag, "FP16") and not hasattr(fake.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS")
    no_pins = BuildPlan((10, 3, 0), "fp16", False, fp16=True)
    with pytest.raises(HbiError, match="fp16 in CreateConfig is not available on TensorRT version 11.1.0.5"):
        build_serialized(fake, model.SerializeToString(), path, no_pins, derive_profile(pkg.graph("text_encoder")),
                         workspace_mb=64)


def test_trt10_fake_rejects_precisions_in_a_strongly_typed_network(polygraphy_trt, make_trt, demo_dir):
    fake = make_trt("10.16.0.72")
    pkg, model, path = _text_graph(demo_dir)
    profile = derive_profile(pkg.graph("text_encoder"))
    pins_in_typed = BuildPlan((10, 16, 0), "fp16", True, pin_fp32=True)
    with pytest.raises(HbiError, match="strongly typed networks reject layer precisions"):
        build_serialized(fake, model.SerializeToString(), path, pins_in_typed, profile, workspace_mb=64)
    flags_in_typed = BuildPlan((10, 16, 0), "fp16", True, fp16=True)
    with pytest.raises(HbiError, match=r"precision flags \['FP16'\] are not allowed in a strongly typed network"):
        build_serialized(fake, model.SerializeToString(), path, flags_in_typed, profile, workspace_mb=64)


def test_parser_errors_are_reported_with_their_nodes(polygraphy_trt, fake_trt, demo_dir):
    pkg, model, path = _text_graph(demo_dir)
    fake_trt.parse_errors = [fake_trt.ParserError("merge_1", "TokenMerge", "Plugin not found"),
                             fake_trt.ParserError("", "Gather", "unsupported dtype", node=9)]
    with pytest.raises(MismatchError) as info:
        build_serialized(fake_trt, model.SerializeToString(), path, _plan(), derive_profile(pkg.graph("text_encoder")),
                         workspace_mb=64)
    assert info.value.message == (
        f"TensorRT 10.3.0 cannot parse {path}: In node 3 with name: merge_1 and operator: TokenMerge (parseNode): "
        "UNSUPPORTED_NODE: Plugin not found; In node 9 with name:  and operator: Gather (parseNode): "
        "UNSUPPORTED_NODE: unsupported dtype")
    assert info.value.hint == f"see which ops this TensorRT lacks: `hbi-export check {path.parent}`"
    assert fake_trt.builds == []  # nothing was built


def test_an_hbi_node_without_function_or_plugin_does_not_parse(polygraphy_trt, fake_trt, demo_dir):
    """As the real parser: functions dropped but no plugin library registered is a parse error on every node."""
    pkg, model, path = _text_graph(demo_dir)
    prepared, _ = prepare_onnx(model, drop_plugin_functions=True)
    with pytest.raises(MismatchError, match="operator: TokenMerge .*Plugin not found"):
        build_serialized(fake_trt, prepared.SerializeToString(), path, _plan(),
                         derive_profile(pkg.graph("text_encoder")), workspace_mb=64)


def test_failed_build_and_bad_timing_cache_are_errors(polygraphy_trt, fake_trt, demo_dir, tmp_path):
    pkg, model, path = _text_graph(demo_dir)
    profile = derive_profile(pkg.graph("text_encoder"))
    fake_trt.fail_build = True
    with pytest.raises(HbiError, match="TensorRT could not build an engine from .*: out of memory while building"):
        build_serialized(fake_trt, model.SerializeToString(), path, _plan(), profile, workspace_mb=64)
    fake_trt.fail_build = False
    cache = tmp_path / "stale.cache"
    cache.write_bytes(b"FAKETRT-CACHE:10.2.0.19:40")  # another TensorRT's cache
    with pytest.raises(MismatchError, match="timing cache .* was made by another TensorRT version or GPU"):
        build_serialized(fake_trt, model.SerializeToString(), path, _plan(), profile, workspace_mb=64,
                         timing_cache=cache)
    assert cache.read_bytes() == b"FAKETRT-CACHE:10.2.0.19:40"  # untouched


def test_network_inputs_must_match_the_manifest(polygraphy_trt, fake_trt, demo_dir):
    pkg, model, path = _text_graph(demo_dir)
    profile = derive_profile(pkg.graph("video_encoder"))  # the wrong graph's inputs
    with pytest.raises(MismatchError, match="the parsed network has inputs"):
        build_serialized(fake_trt, model.SerializeToString(), path, _plan(), profile, workspace_mb=64)


# ------------------------------------------------------------------------------------------------ whole package

def test_build_package_writes_engines_and_a_manifest_the_runtime_accepts(polygraphy_trt, fake_trt, fake_gpu,
                                                                         demo_copy, plugin_lib):
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
    assert by_graph["text_encoder"]["tf32"] and by_graph["text_encoder"]["pinned_fp32_layers"] > 0

    engine_set = read_engine_set(demo_copy, "fp16")
    pkg = load_package(demo_copy)
    assert engine_set.package_sha256 == pkg.manifest_sha256
    host = HostInfo(fake_trt.__version__, fake_gpu.name, fake_gpu.compute_capability, sha256_file(plugin_lib))
    for name, entry in engine_set.engines.items():
        assert entry.onnx_sha256 == pkg.graph(name).sha256 and entry.gpu_name == "NVIDIA Fake GPU"
        assert entry.compute_capability == "9.0" and entry.tensorrt_version == "10.3.0.26"
        assert check_engine(demo_copy, entry, host, onnx_sha256=pkg.graph(name).sha256).is_file()
        # the reproducers use the graph TensorRT parsed: the package's, without the plugin ops' functions
        parsed = demo_copy / "engines" / "fp16" / f"{name}.parsed.onnx"
        assert entry.reproduce["onnx"] == str(parsed) and parsed.is_file()
        assert not [f for f in onnx.load(str(parsed)).functions if f.domain == "hbi"]
        assert entry.reproduce["trtexec"].startswith(f"trtexec --onnx={parsed} ")
        assert f"--dynamicPlugins={plugin_lib}" in entry.reproduce["trtexec"]
        assert entry.reproduce == by_graph[name]["reproduce"]
    rebuild = engine_set.engines["interaction"].rebuild_command(demo_copy)
    assert rebuild.endswith(f"--precision fp16 --min-batch 1 --opt-batch 4 --max-batch 16 --workspace 256 "
                            f"--axis video_batch=1:8:64 --plugins {plugin_lib}")


def test_trt_10_16_parser_prefers_the_plugin_so_the_graph_is_kept(polygraphy_trt, make_trt, fake_gpu, demo_copy,
                                                                  plugin_lib):
    fake = make_trt("10.16.0.72")
    summary = build_package_engines(demo_copy, EngineOptions(precision="fp16", plugins=plugin_lib), trt=fake,
                                    device=fake_gpu)
    text = next(e for e in summary["engines"] if e["graph"] == "text_encoder")
    assert text["functions_dropped"] == [] and text["plugin_layers"] == 2
    assert text["reproduce"]["onnx"] == str(demo_copy / "text_encoder.onnx")  # the package's own file
    assert " && " not in text["reproduce"]["polygraphy"]


def test_build_package_without_plugins_keeps_the_functions(polygraphy_trt, fake_trt, fake_gpu, demo_copy):
    summary = build_package_engines(demo_copy, EngineOptions(precision="fp32"), trt=fake_trt, device=fake_gpu)
    text = next(e for e in summary["engines"] if e["graph"] == "text_encoder")
    assert text["functions_dropped"] == [] and text["plugin_layers"] == 0 and not text["tf32"]
    assert text["cleared_flags"] == ["TF32"]
    assert any("standard-op decompositions" in n for n in text["notes"])
    manifest = json.loads((demo_copy / "engines" / "fp32" / "engines.json").read_text())
    assert manifest["engines"]["text_encoder"]["plugin_library_sha256"] is None
    assert "--noTF32" in manifest["engines"]["text_encoder"]["reproduce"]["trtexec"]


@pytest.mark.parametrize("version, want", [("10.3.0.26", "fp16"), ("11.1.0.5", "fp32")])
def test_default_build_works_on_every_version(polygraphy_trt, make_trt, fake_gpu, demo_copy, version, want):
    """Issue 2: the default (--precision auto) builds the fp32 demo package on TensorRT 11 too."""
    fake = make_trt(version)
    summary = build_package_engines(demo_copy, EngineOptions(), trt=fake, device=fake_gpu)
    assert summary["precision"] == want and summary["requested_precision"] == "auto"
    assert summary["notes"][0].startswith(f"--precision auto: {want}")
    assert read_engine_set(demo_copy, want).engines["video_encoder"].precision == want
    if want == "fp32":
        assert all(not e["tf32"] and e["strongly_typed"] for e in summary["engines"])


def test_build_package_refuses_before_building(polygraphy_trt, fake_trt, fake_gpu, demo_copy):
    with pytest.raises(UsageError, match="needs a quantized"):
        build_package_engines(demo_copy, EngineOptions(precision="int8"), trt=fake_trt, device=fake_gpu)
    with pytest.raises(UsageError, match="--axis names"):
        build_package_engines(demo_copy, EngineOptions(axes={"frames": AxisRange(1, 1, 1)}), trt=fake_trt,
                              device=fake_gpu)
    assert fake_trt.builds == [] and not (demo_copy / "engines").exists()


def test_build_package_without_polygraphy_says_what_to_install(fake_trt, fake_gpu, demo_copy, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "polygraphy", None)
    monkeypatch.setitem(__import__("sys").modules, "polygraphy.backend", None)
    with pytest.raises(UsageError, match="polygraphy is not installed") as info:
        build_package_engines(demo_copy, EngineOptions(), trt=fake_trt, device=fake_gpu)
    assert "polygraphy>=0.50.3" in info.value.hint and info.value.exit_code == 2


def test_polygraphy_too_old_for_the_code_or_for_tensorrt_11(monkeypatch):
    pytest.importorskip("polygraphy")
    import polygraphy

    from hbi_export.trt.builder import import_polygraphy

    monkeypatch.setattr(polygraphy, "__version__", "0.49.20")
    assert import_polygraphy((10, 3, 0))  # enough for TensorRT 10
    with pytest.raises(UsageError, match="polygraphy 0.49.20 is too old with TensorRT 11.1.0; hbi needs >= 0.50.3"):
        import_polygraphy((11, 1, 0))
    monkeypatch.setattr(polygraphy, "__version__", "0.49.9")
    with pytest.raises(UsageError, match="polygraphy 0.49.9 is too old; hbi needs >= 0.49.14"):
        import_polygraphy()
