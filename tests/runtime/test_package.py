"""hbi_runtime.package: manifest round trips, atomic writing, and every refusal of load_package."""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from hbi_runtime.errors import (EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_MISMATCH, BadInputError, GateFailedError,
                                MismatchError, UsageError)
from hbi_runtime.package import (GRAPH_NAMES, HASH_FIELD, LEVELS, MANIFEST_NAME, SCHEMA_VERSION, GraphSpec,
                                 Manifest, Package, Preprocessing, TensorSpec, TokenizerSpec, hash_files,
                                 load_package, manifest_sha256, sha256_file, update_status, write_derived_package,
                                 write_manifest)
from hbi_runtime.inputs import MAX_JSON_BYTES
from hbi_runtime.package_files import check_package_files, onnx_external_files

VOCAB = "tokenizer/bpe_simple_vocab_16e6.txt.gz"
DEMO = Path(__file__).resolve().parents[2] / "hbi_runtime" / "data" / "demo"
CKPT = "/models/hbi_msrvtt.pth"


def pb(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: a varint field for an int, a length-delimited one for bytes."""
    def varint(n: int) -> bytes:
        out = b""
        while n >= 0x80:
            out, n = out + bytes([n & 0x7F | 0x80]), n >> 7
        return out + bytes([n])
    if isinstance(payload, int):
        return varint(number << 3) + varint(payload)
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def onnx_model(name: str, locations: Sequence[str] = ()) -> bytes:
    """A minimal serialized ONNX model (ModelProto: ir_version, producer, graph) whose graph has one initializer
    per external data ``location`` (data_location EXTERNAL), as ``onnx.save(save_as_external_data=True)`` writes
    them. The package layer reads no more of a graph than that."""
    tensors = b"".join(pb(5, pb(1, 4) + pb(2, 1) + pb(8, f"w{i}".encode())
                          + pb(13, pb(1, b"location") + pb(2, loc.encode())) + pb(13, pb(1, b"offset") + pb(2, b"0"))
                          + pb(14, 1)) for i, loc in enumerate(locations))
    return pb(1, 8) + pb(2, b"hbi-test") + pb(7, pb(2, name.encode()) + tensors)


def graph_spec(pkg: Path, name: str, precision: str = "fp32", locations: Sequence[str] = (),
               file: str | None = None) -> GraphSpec:
    """A graph entry whose file is a minimal ONNX model (reading external data from ``locations``, unlisted)."""
    rel = file or f"{name}.onnx"
    (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
    (pkg / rel).write_bytes(onnx_model(name, locations))
    return GraphSpec(file=rel, sha256=sha256_file(pkg / rel), opset=17, precision=precision,
                     inputs=[TensorSpec("input_ids", "int64", ["text_batch", 32])],
                     outputs=[TensorSpec("entity_tokens", "float32", ["text_batch", 32, 64])],
                     custom_ops=["hbi.TokenMerge"] if name != "interaction" else ["hbi.WeightedTokenInteraction"])


def make_manifest(pkg: Path, status: str = "verified") -> Manifest:
    (pkg / "tokenizer").mkdir(parents=True, exist_ok=True)
    (pkg / VOCAB).write_bytes(gzip.compress(b"#version: 0.2\nh e\n"))
    return Manifest(
        model_config={"embed_dim": 64, "merge_ratios": [0.25, 0.5]}, level_weights=[1, 0, 0], max_words=32,
        max_frames=12, embed_dim=64, tokens_per_level={"text": [32, 8, 4], "video": [12, 3, 2]},
        preprocessing=Preprocessing(max_frames=12, image_size=224),
        tokenizer=TokenizerSpec(max_words=32, files=hash_files(pkg, [VOCAB])),
        graphs={name: graph_spec(pkg, name) for name in GRAPH_NAMES},
        parity={"ok": status == "verified"}, status=status,
        source={"checkpoint": CKPT, "sha256": "a" * 64, "format": "official"})


@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    """A complete, verified package."""
    root = tmp_path / "pkg"
    root.mkdir()
    write_manifest(root, make_manifest(root))
    return root


def read_raw(pkg: Path) -> dict:
    return json.loads((pkg / MANIFEST_NAME).read_text(encoding="utf-8"))


def write_raw(pkg: Path, raw: dict, *, rehash: bool) -> None:
    """Write a manifest by hand; ``rehash`` keeps it self-consistent (to reach checks after the hash check)."""
    if rehash:
        raw[HASH_FIELD] = manifest_sha256(raw)
    (pkg / MANIFEST_NAME).write_text(json.dumps(raw, indent=1), encoding="utf-8")


# --- round trips and writing ------------------------------------------------------------------------------------


def test_manifest_round_trips_through_dict_and_json(tmp_path: Path) -> None:
    m = make_manifest(tmp_path)
    again = Manifest.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m
    assert again.levels == LEVELS and again.schema_version == SCHEMA_VERSION
    assert again.level_weights == (1.0, 0.0, 0.0)
    assert again.graphs["text_encoder"].inputs[0].shape == ("text_batch", 32)
    assert again.preprocessing.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


@pytest.mark.parametrize("cls, obj", [
    (TensorSpec, TensorSpec("frames", "float16", ["video_batch", 12, 3, 224, 224])),
    (Preprocessing, Preprocessing(max_frames=8, image_size=224, frame_rate=2.0)),
    (TokenizerSpec, TokenizerSpec(max_words=77, files={VOCAB: "b" * 64})),
    (GraphSpec, GraphSpec("g/text.onnx", "c" * 64, 17, "fp16", [], [], external_data={"g/text.onnx.data": "d" * 64})),
])
def test_parts_round_trip(cls, obj) -> None:
    assert cls.from_dict(json.loads(json.dumps(obj.to_dict()))) == obj


def test_written_package_loads(pkg: Path) -> None:
    loaded = load_package(pkg)
    assert isinstance(loaded, Package)
    assert loaded.manifest == Manifest.from_dict(read_raw(pkg))
    assert loaded.manifest_sha256 == read_raw(pkg)[HASH_FIELD] == loaded.manifest.sha256
    assert loaded.graph_path("interaction") == pkg / "interaction.onnx"
    assert loaded.tokenizer_path("bpe_simple_vocab_16e6.txt.gz") == pkg / VOCAB
    assert loaded.tokenizer_path(VOCAB) == pkg / VOCAB


def test_unknown_graph_and_tokenizer_names_are_refused(pkg: Path) -> None:
    loaded = load_package(pkg)
    with pytest.raises(MismatchError, match="no graph 'qa_head'.*interaction"):
        loaded.graph_path("qa_head")
    with pytest.raises(MismatchError, match="no tokenizer file.*merges.txt"):
        loaded.tokenizer_path("merges.txt")


def test_write_is_atomic_and_leaves_no_temp_files(pkg: Path) -> None:
    assert sorted(p.name for p in pkg.iterdir()) == sorted([MANIFEST_NAME, "tokenizer"] +
                                                           [f"{g}.onnx" for g in GRAPH_NAMES])


def test_writer_refuses_an_invalid_manifest_and_writes_nothing(tmp_path: Path) -> None:
    m = make_manifest(tmp_path)
    bad = replace(m, max_frames=16)  # preprocessing / tokens_per_level still say 12
    with pytest.raises(BadInputError, match=r"tokens_per_level.video\[0\] = 12 disagrees with max_frames = 16"):
        write_manifest(tmp_path, bad)
    assert not (tmp_path / MANIFEST_NAME).exists()
    assert not list(tmp_path.glob(".manifest.json.*"))


def test_manifest_hash_ignores_formatting_but_not_values(pkg: Path) -> None:
    raw = read_raw(pkg)
    (pkg / MANIFEST_NAME).write_text(json.dumps(raw, indent=8, sort_keys=False), encoding="utf-8")
    load_package(pkg)  # re-formatted, same values: still the same manifest
    assert manifest_sha256({**raw, "max_words": 33}) != raw[HASH_FIELD]


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    import hashlib
    data = bytes(range(256)) * 9000  # > one read chunk
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    assert hash_files(tmp_path, ["blob"]) == {"blob": hashlib.sha256(data).hexdigest()}
    with pytest.raises(BadInputError, match="cannot read .*missing"):
        sha256_file(tmp_path / "missing")


# --- refusals ---------------------------------------------------------------------------------------------------


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="does not exist") as exc:
        load_package(tmp_path / "nope")
    assert exc.value.exit_code == EXIT_BAD_INPUT
    assert "hbi-export onnx --checkpoint CKPT --out" in exc.value.hint


def test_file_instead_of_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(BadInputError, match="is not a directory"):
        load_package(tmp_path / "model.onnx")


def test_folder_without_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="no manifest.json") as exc:
        load_package(tmp_path)
    assert "hbi-export onnx" in exc.value.hint


def test_invalid_json_is_refused(pkg: Path) -> None:
    (pkg / MANIFEST_NAME).write_text('{"schema_version": 1,', encoding="utf-8")
    with pytest.raises(BadInputError, match="manifest.json is not valid JSON"):
        load_package(pkg)


def test_json_that_is_not_an_object_is_refused(pkg: Path) -> None:
    (pkg / MANIFEST_NAME).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(BadInputError, match="not a JSON object"):
        load_package(pkg)


@pytest.mark.parametrize("version, hint", [(SCHEMA_VERSION + 1, "upgrade hbi-toolkit"), (0, "re-export"),
                                           (1, "re-export")])
def test_unknown_schema_is_refused(pkg: Path, version: int, hint: str) -> None:
    raw = read_raw(pkg)
    raw["schema_version"] = version  # (1 is only the form before package kinds, which has no kind)
    write_raw(pkg, raw, rehash=True)
    with pytest.raises(MismatchError, match=f"schema version {version} is unknown.*reads schema version "
                                            f"{SCHEMA_VERSION}") as exc:
        load_package(pkg)
    assert exc.value.exit_code == EXIT_MISMATCH
    assert hint in exc.value.hint


def test_missing_schema_version_is_refused(pkg: Path) -> None:
    raw = read_raw(pkg)
    del raw["schema_version"]
    write_raw(pkg, raw, rehash=True)
    with pytest.raises(BadInputError, match="no integer schema_version"):
        load_package(pkg)


def test_edited_manifest_is_refused(pkg: Path) -> None:
    raw = read_raw(pkg)
    raw["preprocessing"]["image_size"] = 336  # someone "fixes" a number by hand
    write_raw(pkg, raw, rehash=False)
    with pytest.raises(MismatchError, match="manifest.json was edited after export") as exc:
        load_package(pkg)
    assert exc.value.exit_code == EXIT_MISMATCH
    assert f"hbi-export onnx --checkpoint {CKPT}" in exc.value.hint


def test_hand_set_status_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    root.mkdir()
    write_manifest(root, make_manifest(root, status="failed"))
    raw = read_raw(root)
    raw["status"] = "verified"
    write_raw(root, raw, rehash=False)
    with pytest.raises(MismatchError, match="was edited"):
        load_package(root)


def test_manifest_without_hash_is_refused(pkg: Path) -> None:
    raw = read_raw(pkg)
    del raw[HASH_FIELD]
    write_raw(pkg, raw, rehash=False)
    with pytest.raises(MismatchError, match=r"was edited after export \(its manifest_sha256 is missing\)"):
        load_package(pkg)


@pytest.mark.parametrize("graph", GRAPH_NAMES)
def test_modified_onnx_file_is_refused(pkg: Path, graph: str) -> None:
    with open(pkg / f"{graph}.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(MismatchError, match=rf"{graph}.onnx was modified after export") as exc:
        load_package(pkg)
    assert f"--checkpoint {CKPT}" in exc.value.hint
    load_package(pkg, verify_hashes=False)  # the caller may skip hashing files it just checked


def test_modified_tokenizer_file_is_refused(pkg: Path) -> None:
    (pkg / VOCAB).write_bytes(gzip.compress(b"#version: 0.2\nh i\n"))
    with pytest.raises(MismatchError, match="bpe_simple_vocab_16e6.txt.gz was modified after export"):
        load_package(pkg)


def test_missing_graph_file_is_refused(pkg: Path) -> None:
    (pkg / "video_encoder.onnx").unlink()
    with pytest.raises(BadInputError, match="incomplete: graph 'video_encoder' file .*video_encoder.onnx is missing"):
        load_package(pkg)


@pytest.mark.parametrize("status, match", [("failed", "failed its parity check"),
                                           ("unverified", "never parity-checked")])
def test_unverified_packages_are_refused_unless_allowed(tmp_path: Path, status: str, match: str) -> None:
    root = tmp_path / "pkg"
    root.mkdir()
    write_manifest(root, make_manifest(root, status=status))
    with pytest.raises(GateFailedError, match=match) as exc:
        load_package(root)
    assert exc.value.exit_code == EXIT_GATE_FAILED
    assert f"hbi-export parity {root} --checkpoint {CKPT}" in exc.value.hint
    assert "--allow-unverified" in exc.value.hint
    assert load_package(root, allow_unverified=True).manifest.status == status


# --- field validation -------------------------------------------------------------------------------------------


def mutate(raw: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return raw


@pytest.mark.parametrize("path, value, error, match", [
    ("graphs.text_encoder.opset", "17", BadInputError, r"graphs.text_encoder.opset: expected a positive integer, got '17' \(str\)"),
    ("graphs.interaction.precision", "int4", BadInputError, r"graphs.interaction.precision: expected one of"),
    ("graphs.video_encoder.sha256", "abc", BadInputError, r"video_encoder.sha256: expected a sha256"),
    ("graphs.video_encoder.file", "../elsewhere.onnx", BadInputError, r"video_encoder.file: expected a relative"),
    ("graphs.text_encoder.custom_ops", ["TokenMerge"], BadInputError, r"custom_ops\[0\]: expected a custom op"),
    ("graphs.interaction", KeyError, BadInputError, r"graphs: no entry for \['interaction'\]"),
    ("level_weights", [1, 0], BadInputError, r"level_weights: expected a list of 3 items"),
    ("levels", ["entity", "event", "action"], MismatchError, r"levels: .* are not the levels this runtime"),
    ("max_words", True, BadInputError, r"max_words: expected a positive integer, got True"),
    ("embed_dim", KeyError, BadInputError, r"embed_dim: required field is missing"),
    ("status", "great", BadInputError, r"status: expected one of \['verified', 'failed', 'unverified'\]"),
    ("created", "yesterday", BadInputError, r"created: expected an ISO 8601 time"),
    ("preprocessing.mean", [0.5, 0.5], BadInputError, r"preprocessing.mean: expected a list of 3 items"),
    ("preprocessing.frame_rate", 0, BadInputError, r"preprocessing.frame_rate: expected a positive number"),
    ("tokenizer.max_words", 77, BadInputError, r"tokenizer.max_words = 77 disagrees with max_words = 32"),
    ("tokenizer.lowercase", "yes", BadInputError, r"tokenizer.lowercase: expected true or false"),
    ("tokens_per_level.video", [12, 3], BadInputError, r"tokens_per_level.video: expected a list of 3 items"),
    ("source.checkpoint", KeyError, BadInputError, r"source.checkpoint: required field is missing"),
    ("graphs.text_encoder.inputs", [{"name": "x", "dtype": "complex64", "shape": [1]}], BadInputError,
     r"text_encoder.inputs\[0\].dtype: expected one of"),
    ("graphs.text_encoder.outputs", [{"name": "x", "dtype": "float32", "shape": [0]}], BadInputError,
     r"text_encoder.outputs\[0\].shape\[0\]: expected a positive integer"),
    ("parity", [1], BadInputError, r"parity: expected an object"),
    ("colour", "blue", BadInputError, r"unknown field\(s\) \['colour'\]"),
])
def test_malformed_fields_are_refused_with_their_path(pkg: Path, path: str, value, error, match: str) -> None:
    raw = mutate(read_raw(pkg), path, value)
    with pytest.raises(error, match=match):
        Manifest.from_dict(raw)
    write_raw(pkg, raw, rehash=True)  # a consistent manifest with a bad field: load names the file too
    with pytest.raises(error, match=rf"manifest.json: .*{match}"):
        load_package(pkg)


# --- update_status ----------------------------------------------------------------------------------------------


def test_update_status_rewrites_a_loadable_manifest(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    root.mkdir()
    original = make_manifest(root, status="unverified")
    write_manifest(root, original)
    report = {"ok": True, "checks": [{"metric": "max_abs", "value": 3e-6}]}
    new = update_status(root, "verified", report)
    loaded = load_package(root)
    assert loaded.manifest == new == replace(original, status="verified", parity=report)
    assert loaded.manifest.created == original.created
    assert not list(root.glob(".manifest.json.*"))


def test_update_status_refuses_unknown_status_and_modified_packages(pkg: Path) -> None:
    with pytest.raises(UsageError, match="status 'ok' is not one of"):
        update_status(pkg, "ok", None)
    with open(pkg / "text_encoder.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(MismatchError, match="modified after export"):
        update_status(pkg, "verified", {"ok": True})  # a tampered graph cannot be marked verified


# --- the files on disk: symlinks, external data, hostile JSON -----------------------------------------------------


def with_graph(root: Path, manifest: Manifest, spec: GraphSpec, name: str = "text_encoder") -> Manifest:
    """``manifest`` with graph ``name`` replaced by ``spec``, written to ``root``."""
    manifest = replace(manifest, graphs={**manifest.graphs, name: spec})
    write_manifest(root, manifest)
    return manifest


def test_symlinks_may_stay_inside_the_package_but_not_lead_out(pkg: Path, tmp_path: Path) -> None:
    (pkg / "vocab.gz").write_bytes((pkg / VOCAB).read_bytes())
    (pkg / VOCAB).unlink()
    (pkg / VOCAB).symlink_to("../vocab.gz")  # inside: followed, its target hashed
    load_package(pkg)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (pkg / "text_encoder.onnx").rename(outside / "text_encoder.onnx")
    (pkg / "text_encoder.onnx").symlink_to(outside / "text_encoder.onnx")  # same bytes, same sha256
    with pytest.raises(BadInputError, match=r"text_encoder.onnx is a symlink to .*elsewhere.*outside the model "
                                            r"package") as exc:
        load_package(pkg)
    assert exc.value.exit_code == EXIT_BAD_INPUT and "copy" in exc.value.hint
    with pytest.raises(BadInputError, match="outside"):
        load_package(pkg, verify_hashes=False)


def test_a_symlinked_folder_or_unlisted_link_leading_out_is_refused(pkg: Path, tmp_path: Path) -> None:
    (pkg / "README.txt").write_text("unlisted files may stay")
    (pkg / "engines" / "fp16").mkdir(parents=True)
    load_package(pkg)
    (pkg / "engines" / "fp16" / "engines.json").symlink_to(tmp_path / "not-there.json")  # dangling, unlisted
    with pytest.raises(BadInputError, match=r"engines.json is a symlink to .*not-there.json, outside"):
        load_package(pkg)
    (pkg / "engines" / "fp16" / "engines.json").unlink()
    (tmp_path / "tok").mkdir()
    (pkg / VOCAB).rename(tmp_path / "tok" / Path(VOCAB).name)
    (pkg / "tokenizer").rmdir()
    (pkg / "tokenizer").symlink_to(tmp_path / "tok", target_is_directory=True)
    with pytest.raises(BadInputError, match=r"pkg/tokenizer is a symlink to .*tok, outside"):
        load_package(pkg)


def test_external_data_must_be_listed_and_is_hashed(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    root.mkdir()
    manifest = make_manifest(root)
    data = root / "text_encoder.onnx.data"
    data.write_bytes(np.arange(64, dtype=np.float32).tobytes())
    spec = graph_spec(root, "text_encoder", locations=["text_encoder.onnx.data"])
    with_graph(root, manifest, spec)
    with pytest.raises(MismatchError, match=r"graph 'text_encoder' .* external data file .*text_encoder.onnx.data, "
                                            r"which the manifest .* does not list") as exc:
        load_package(root)
    assert exc.value.exit_code == EXIT_MISMATCH and f"--checkpoint {CKPT}" in exc.value.hint
    with_graph(root, manifest, replace(spec, external_data=hash_files(root, [data.name])))
    loaded = load_package(root)
    assert loaded.manifest.graphs["text_encoder"].external_data == {data.name: sha256_file(data)}
    data.write_bytes((2 * np.arange(64, dtype=np.float32)).tobytes())  # doubled weights, same size
    with pytest.raises(MismatchError, match=r"text_encoder.onnx.data was modified after export"):
        load_package(root)
    data.unlink()
    with pytest.raises(BadInputError, match=r"incomplete: graph 'text_encoder' external data file .* is missing"):
        load_package(root)


def test_external_data_is_found_next_to_its_graph(tmp_path: Path) -> None:
    # ONNX Runtime resolves a location against the graph's folder: onnx/w.bin is what onnx/text.onnx reads as w.bin
    root = tmp_path / "pkg"
    root.mkdir()
    manifest = make_manifest(root)
    (root / "onnx").mkdir()
    (root / "onnx" / "w.bin").write_bytes(b"\0" * 16)
    (root / "w.bin").write_bytes(b"\0" * 16)
    spec = graph_spec(root, "text_encoder", locations=["w.bin", "./w.bin"], file="onnx/text.onnx")
    with_graph(root, manifest, replace(spec, external_data=hash_files(root, ["w.bin"])))
    with pytest.raises(MismatchError, match=r"onnx/w.bin, which the manifest .* does not list"):
        load_package(root)
    with_graph(root, manifest, replace(spec, external_data=hash_files(root, ["onnx/w.bin"])))
    load_package(root)


@pytest.mark.parametrize("location", ["../outside.data", "/etc/hostname", "sub\\w.data", "", "a/../../b"])
def test_external_data_outside_the_package_is_refused(tmp_path: Path, location: str) -> None:
    root = tmp_path / "pkg"
    root.mkdir()
    (tmp_path / "outside.data").write_bytes(b"x")
    with_graph(root, make_manifest(root), graph_spec(root, "text_encoder", locations=[location]))
    with pytest.raises(BadInputError, match=r"graph 'text_encoder' .* reads external data from .*, which is not a "
                                            r"relative path inside the model package"):
        load_package(root)


@pytest.mark.parametrize("content, match", [
    (b"not really onnx", "not an ONNX model"),
    (onnx_model("text_encoder", ["w.data"])[:-5], "not an ONNX model"),  # cut inside a field
    (b"", "empty, not an ONNX model"),
], ids=["text", "truncated", "empty"])
def test_a_graph_that_is_not_onnx_is_refused(tmp_path: Path, content: bytes, match: str) -> None:
    root = tmp_path / "pkg"
    root.mkdir()
    manifest = make_manifest(root)
    (root / "text_encoder.onnx").write_bytes(content)
    with_graph(root, manifest, replace(manifest.graphs["text_encoder"], sha256=sha256_file(root / "text_encoder.onnx")))
    with pytest.raises(BadInputError, match=match) as exc:
        load_package(root)
    assert "graph 'text_encoder'" in exc.value.message and f"--checkpoint {CKPT}" in exc.value.hint


def test_onnx_external_files_reads_every_place_a_tensor_can_be(tmp_path: Path) -> None:
    """The protobuf walk against the onnx package's own writer: initializers, Constant attributes, If subgraphs,
    local functions, sparse initializers; the shipped demo graphs keep all weights inline."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import set_external_data

    def tensor(name: str, location: str) -> TensorProto:
        t = numpy_helper.from_array(np.ones(4, np.float32), name)
        set_external_data(t, location=location)
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
        return t

    const = helper.make_node("Constant", [], ["c"], value=tensor("c", "const.bin"))
    branch = helper.make_graph([helper.make_node("Constant", [], ["b"], value=tensor("b", "sub/branch.bin"))],
                               "branch", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])])
    cond = helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)
    func = helper.make_function("local", "F", [], ["f"], [helper.make_node("Constant", [], ["f"],
                                                                          value=tensor("f", "func.bin"))],
                                [helper.make_opsetid("", 17)])
    sparse = helper.make_sparse_tensor(tensor("sv", "sparse.bin"), numpy_helper.from_array(np.arange(4), "si"),
                                       [8])
    graph = helper.make_graph([const, cond, helper.make_node("F", [], ["f"], domain="local")], "g",
                              [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              initializer=[tensor("w", "w.bin"), tensor("w2", "w.bin")],
                              sparse_initializer=[sparse])
    model = helper.make_model(graph, functions=[func], opset_imports=[helper.make_opsetid("", 17),
                                                                      helper.make_opsetid("local", 1)])
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    assert onnx_external_files(tmp_path / "m.onnx") == ["const.bin", "func.bin", "sparse.bin", "sub/branch.bin",
                                                        "w.bin"]
    # what onnx.save writes for a model with its weights outside
    inline = helper.make_model(helper.make_graph([], "g", [], [], initializer=[
        numpy_helper.from_array(np.ones((32, 32), np.float32), "w")]))
    onnx.save_model(inline, str(tmp_path / "e.onnx"), save_as_external_data=True, location="e.onnx.data",
                    size_threshold=0)
    assert onnx_external_files(tmp_path / "e.onnx") == ["e.onnx.data"]
    for graph_file in sorted(DEMO.glob("**/*.onnx")):
        assert onnx_external_files(graph_file) == [], graph_file


def test_derived_package_carries_external_data(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    root.mkdir()
    manifest = make_manifest(root)
    (root / "text_encoder.onnx.data").write_bytes(b"\1" * 32)
    spec = graph_spec(root, "text_encoder", locations=["text_encoder.onnx.data"])
    with_graph(root, manifest, replace(spec, external_data=hash_files(root, ["text_encoder.onnx.data"])))
    new = tmp_path / "new"
    new.mkdir()
    (new / "video_int8.onnx.data").write_bytes(b"\2" * 32)
    (new / "video_int8.onnx").write_bytes(onnx_model("video_encoder", ["video_int8.onnx.data"]))
    out = write_derived_package(load_package(root), tmp_path / "int8",
                                graphs={"video_encoder": (new / "video_int8.onnx", "int8")}, status="verified")
    assert out.manifest.graphs["text_encoder"].external_data == {"text_encoder.onnx.data": sha256_file(
        root / "text_encoder.onnx.data")}
    assert out.manifest.graphs["video_encoder"].external_data == {"video_int8.onnx.data": sha256_file(
        new / "video_int8.onnx.data")}
    assert out.manifest.graphs["video_encoder"].precision == "int8"
    assert (out.dir / "video_int8.onnx.data").read_bytes() == b"\2" * 32


def test_graph_spec_without_external_data_writes_no_such_field(pkg: Path) -> None:
    # so every manifest written before the field existed keeps its manifest_sha256, and loads
    assert all("external_data" not in g for g in read_raw(pkg)["graphs"].values())
    spec = GraphSpec("a.onnx", "c" * 64, 17, "fp32", [], [], external_data={"a.onnx.data": "d" * 64})
    assert spec.to_dict()["external_data"] == {"a.onnx.data": "d" * 64}
    with pytest.raises(BadInputError, match=r"g.external_data \(key\): expected a relative path"):
        GraphSpec.from_dict({**spec.to_dict(), "external_data": {"../a.data": "d" * 64}}, "g")
    for demo in ("package", "qa/package", "caption"):
        for manifest in (DEMO / demo).glob("*manifest.json"):
            graphs = json.loads(manifest.read_text())["graphs"].values()
            assert all("external_data" not in g for g in graphs)


@pytest.mark.parametrize("text, match", [
    ("[" * 100_000, "nests lists / objects too deeply"),  # RecursionError in json
    ('{"schema_version": 1, "parity": ' + "[" * 200 + "]" * 200 + "}", "more than 64 levels deep"),
    ('{"schema_version": 1, "parity": NaN}', "NaN is not JSON"),
    (" " * MAX_JSON_BYTES + "{}", "larger than 16 MiB"),
], ids=["100000-deep", "201-deep", "nan", "17-mib"])
def test_hostile_manifest_json_is_bad_input(pkg: Path, text: str, match: str) -> None:
    (pkg / MANIFEST_NAME).write_text(text, encoding="utf-8")
    with pytest.raises(BadInputError, match=match) as exc:
        load_package(pkg)
    assert exc.value.exit_code == EXIT_BAD_INPUT and "hbi-export onnx" in exc.value.hint


def test_check_package_files_alone(tmp_path: Path) -> None:
    """The shared check, as another loader calls it: plain files as a mapping or pairs, a graph by its spec."""
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "g.onnx").write_bytes(onnx_model("g", ["g.bin"]))
    (tmp_path / "g.bin").write_bytes(b"w")
    graph = GraphSpec("g.onnx", sha256_file(tmp_path / "g.onnx"), 17, "fp32", [], [])
    sha_a = sha256_file(tmp_path / "a.txt")
    check_package_files(tmp_path, {"a.txt": sha_a, "g.bin": sha256_file(tmp_path / "g.bin")}, graphs={"g": graph})
    with pytest.raises(MismatchError, match="g.bin, which the manifest of engine set .* does not list"):
        check_package_files(tmp_path, [("a.txt", sha_a)], graphs={"g": graph}, kind="engine set")
    with pytest.raises(MismatchError, match="lists a.txt twice, with different sha256"):
        check_package_files(tmp_path, [("a.txt", sha_a), ("./a.txt", "0" * 64)])
    with pytest.raises(BadInputError, match=r"lists file '../a.txt', which is not a relative path"):
        check_package_files(tmp_path, {"../a.txt": sha_a}, hint="re-export")
    (tmp_path / "d").mkdir()
    with pytest.raises(BadInputError, match="file .*d is not a regular file"):
        check_package_files(tmp_path, {"d": sha_a})
