"""The engine manifest (hbi_runtime.engines): keys, round trip, validation, and refusing a mismatched engine."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import replace

import pytest

from hbi_runtime.engines import (MANIFEST_NAME, EngineEntry, EngineSet, HostInfo, TensorProfile, built_precisions,
                                 check_engine, engines_dir, mismatches, profile_covers, read_engine_set,
                                 write_engine_set)
from hbi_runtime.errors import BadInputError, MismatchError, UsageError

SHA_A, SHA_B, SHA_P, SHA_Q = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
PROFILE = {"input_ids": TensorProfile((1, 32), (8, 32), (32, 32)),
           "attention_mask": TensorProfile((1, 32), (8, 32), (32, 32))}


def entry(**changes) -> EngineEntry:
    base = EngineEntry(graph="text_encoder", file="engines/fp16/text_encoder.engine", sha256=SHA_A,
                       onnx_file="text_encoder.onnx", onnx_sha256=SHA_B, tensorrt_version="10.3.0.26",
                       gpu_name="NVIDIA Jetson AGX Orin", compute_capability="8.7", precision="fp16",
                       strongly_typed=False, profiles=(PROFILE,), plugin_library="/opt/hbi/libhbi_trt_plugins.so",
                       plugin_library_sha256=SHA_P, build_args=("--max-batch", "32", "--plugins", "/opt/x y.so"),
                       built="2026-11-27T00:00:00+00:00")
    return replace(base, **changes)


HOST = HostInfo("10.3.0.26", "NVIDIA Jetson AGX Orin", "8.7", SHA_P)


def test_entry_carries_every_build_key_and_round_trips():
    d = entry().to_dict()
    assert {"onnx_sha256", "tensorrt_version", "gpu_name", "compute_capability", "precision", "profiles",
            "plugin_library_sha256"} <= set(d)
    assert d["profiles"] == [{"input_ids": {"min": [1, 32], "opt": [8, 32], "max": [32, 32]},
                              "attention_mask": {"min": [1, 32], "opt": [8, 32], "max": [32, 32]}}]
    assert EngineEntry.from_dict(json.loads(json.dumps(d)), "e") == entry()


def test_reproducer_lines_are_kept_and_older_manifests_still_read():
    lines = {"onnx": "pkg/text_encoder.onnx", "trtexec": "trtexec --onnx=pkg/text_encoder.onnx --fp16",
             "polygraphy": "polygraphy run pkg/text_encoder.onnx --trt --onnxrt"}
    d = entry(reproduce=lines).to_dict()
    assert d["reproduce"] == lines
    assert EngineEntry.from_dict(json.loads(json.dumps(d)), "e").reproduce == lines
    older = {k: v for k, v in d.items() if k != "reproduce"}  # written before the lines were recorded
    assert EngineEntry.from_dict(older, "e").reproduce is None
    with pytest.raises(BadInputError, match=r"e.reproduce: unknown field\(s\) \['nsys'\]"):
        EngineEntry.from_dict({**d, "reproduce": {**lines, "nsys": "x"}}, "e")


def test_malformed_entries_name_the_field():
    d = entry().to_dict()
    with pytest.raises(BadInputError, match=r"e: unknown field\(s\) \['gpu'\]"):
        EngineEntry.from_dict({**d, "gpu": "x"}, "e")
    with pytest.raises(BadInputError, match=r"e.precision: expected one of \['fp32', 'fp16', 'int8'\]"):
        EngineEntry.from_dict({**d, "precision": "bf16"}, "e")
    with pytest.raises(BadInputError, match="e.onnx_sha256: expected a sha256"):
        EngineEntry.from_dict({**d, "onnx_sha256": "abc"}, "e")
    with pytest.raises(BadInputError, match="e.profiles: an engine needs at least one optimization profile"):
        EngineEntry.from_dict({**d, "profiles": []}, "e")
    bad = {**d, "profiles": [{"input_ids": {"min": [1, 32], "opt": [8], "max": [32, 32]}}]}
    with pytest.raises(BadInputError, match="min, opt and max have different ranks"):
        EngineEntry.from_dict(bad, "e")
    with pytest.raises(BadInputError, match="e.file: expected a relative path inside the package"):
        EngineEntry.from_dict({**d, "file": "../elsewhere.engine"}, "e")


def test_unknown_engine_manifest_schema_is_a_mismatch():
    body = EngineSet(package_sha256=SHA_Q, precision="fp16", engines={"text_encoder": entry()}).to_dict()
    with pytest.raises(MismatchError, match="engine manifest schema 'hbi.engines/9'"):
        EngineSet.from_dict({**body, "schema": "hbi.engines/9"})


def test_matching_host_has_no_mismatch():
    assert mismatches(entry(), HOST, onnx_sha256=SHA_B) == []


@pytest.mark.parametrize("host_change, expected", [
    ({"tensorrt_version": "10.7.0.23"}, "built with TensorRT 10.3.0.26, this machine has 10.7.0.23"),
    ({"compute_capability": "9.0"}, "built for compute capability 8.7, this GPU has 9.0"),
    ({"gpu_name": "NVIDIA H100 80GB HBM3"}, "built on a NVIDIA Jetson AGX Orin, this GPU is a NVIDIA H100 80GB HBM3"),
    ({"plugin_library_sha256": None}, "needs the hbi plugin library (sha256 cccccccccccc...), which is not loaded"),
    ({"plugin_library_sha256": SHA_Q}, "built with another hbi plugin library (sha256 cccccccccccc..., here "
                                       "dddddddddddd...)"),
])
def test_each_key_that_differs_is_a_reason(host_change, expected):
    reasons = mismatches(entry(), replace(HOST, **host_change), onnx_sha256=SHA_B)
    assert reasons == [reasons[0]] and expected in reasons[0]


def test_all_reasons_are_listed_together():
    host = HostInfo("10.7.0.23", "NVIDIA H100 80GB HBM3", "9.0", None)
    reasons = mismatches(entry(), host, onnx_sha256=SHA_A)
    assert len(reasons) == 5 and "another export of text_encoder.onnx" in reasons[0]
    assert mismatches(entry(plugin_library_sha256=None, plugin_library=None), replace(HOST)) == [
        "it was built without the hbi plugin library, which is loaded here"]


def _write_engine(pkg, e: EngineEntry, data: bytes = b"serialized engine") -> EngineEntry:
    path = pkg / e.file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return replace(e, sha256=hashlib.sha256(data).hexdigest())


def test_check_engine_accepts_a_matching_engine(tmp_path):
    e = _write_engine(tmp_path, entry())
    assert check_engine(tmp_path, e, HOST, onnx_sha256=SHA_B) == tmp_path / e.file


def test_check_engine_refuses_with_every_reason_and_the_rebuild_command(tmp_path):
    e = _write_engine(tmp_path, entry())
    with pytest.raises(MismatchError) as info:
        check_engine(tmp_path, e, replace(HOST, compute_capability="9.0", gpu_name="NVIDIA H100"), onnx_sha256=SHA_B)
    assert "refusing TensorRT engine" in info.value.message
    assert "compute capability 8.7" in info.value.message and "NVIDIA H100" in info.value.message
    assert info.value.hint == (f"rebuild it on this machine: `hbi-export build-engine {tmp_path} --precision fp16 "
                               "--max-batch 32 --plugins '/opt/x y.so'`")
    assert info.value.exit_code == 4


def test_check_engine_refuses_a_modified_or_missing_file(tmp_path):
    e = _write_engine(tmp_path, entry())
    (tmp_path / e.file).write_bytes(b"tampered")
    with pytest.raises(MismatchError, match=r"the file was modified after the build \(sha256 "):
        check_engine(tmp_path, e, HOST)
    (tmp_path / e.file).unlink()
    with pytest.raises(BadInputError, match="listed in the engine manifest is missing") as info:
        check_engine(tmp_path, e, HOST)
    assert info.value.hint.startswith("rebuild: `hbi-export build-engine")


def test_engine_set_write_read_and_missing_precisions(tmp_path):
    engine_set = EngineSet(package_sha256=SHA_Q, precision="fp16", engines={"text_encoder": entry()})
    assert built_precisions(tmp_path) == []
    path = write_engine_set(tmp_path, engine_set)
    assert path == tmp_path / "engines" / "fp16" / MANIFEST_NAME
    assert json.loads(path.read_text())["schema"] == "hbi.engines/1"
    assert read_engine_set(tmp_path, "fp16") == engine_set
    assert built_precisions(tmp_path) == ["fp16"]
    assert engine_set.entry_for("text_encoder.onnx") == entry() and engine_set.entry_for("other.onnx") is None
    with pytest.raises(BadInputError, match="has no int8 TensorRT engines .*; it has fp16") as info:
        read_engine_set(tmp_path, "int8")
    assert info.value.hint == f"build them on this machine: `hbi-export build-engine {tmp_path} --precision int8`"
    with pytest.raises(UsageError, match="precision must be one of"):
        engines_dir(tmp_path, "fp8")
    path.write_text("{not json")
    with pytest.raises(BadInputError, match=re.escape(f"engine manifest {path} is not valid JSON")):
        read_engine_set(tmp_path, "fp16")


def test_profile_covers_picks_the_first_profile_that_holds_the_shapes():
    small = {"x": TensorProfile((1, 4), (2, 4), (8, 4))}
    large = {"x": TensorProfile((1, 4), (16, 4), (64, 4))}
    assert profile_covers([small, large], {"x": (8, 4)}) == 0
    assert profile_covers([small, large], {"x": (9, 4)}) == 1
    assert profile_covers([small, large], {"x": (65, 4)}) == -1
    assert profile_covers([small], {"x": (2, 5)}) == -1 and profile_covers([small], {"y": (2, 4)}) == -1
