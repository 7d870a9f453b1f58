"""hbi_runtime.package: manifest round trips, atomic writing, and every refusal of load_package."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import pytest

from hbi_runtime.errors import (EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_MISMATCH, BadInputError, GateFailedError,
                                MismatchError, UsageError)
from hbi_runtime.package import (GRAPH_NAMES, HASH_FIELD, LEVELS, MANIFEST_NAME, SCHEMA_VERSION, GraphSpec,
                                 Manifest, Package, Preprocessing, TensorSpec, TokenizerSpec, hash_files,
                                 load_package, manifest_sha256, sha256_file, update_status, write_manifest)

VOCAB = "tokenizer/bpe_simple_vocab_16e6.txt.gz"
CKPT = "/models/hbi_msrvtt.pth"


def graph_spec(pkg: Path, name: str, precision: str = "fp32") -> GraphSpec:
    """A graph entry whose file holds placeholder bytes (the package layer never parses ONNX)."""
    rel = f"{name}.onnx"
    (pkg / rel).write_bytes(f"not really onnx: {name}".encode())
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


@pytest.mark.parametrize("version, hint", [(2, "upgrade hbi-toolkit"), (0, "re-export")])
def test_unknown_schema_is_refused(pkg: Path, version: int, hint: str) -> None:
    raw = read_raw(pkg)
    raw["schema_version"] = version
    write_raw(pkg, raw, rehash=True)
    with pytest.raises(MismatchError, match=f"schema version {version} is unknown.*reads schema version 1") as exc:
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
