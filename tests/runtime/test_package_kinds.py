"""One package format: the manifest base, the registry of kinds, the one reader, and the forms before package kinds.

The shipped demo packages (hbi_runtime/data/demo/package, qa/package, caption) are in those older forms and are
read as they are; tests that change one work on a copy.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from hbi_runtime.errors import BadInputError, GateFailedError, MismatchError
from hbi_runtime.outputs import ARTIFACT_KINDS
from hbi_runtime.package import (FORMAT_VERSION, HASH_FIELD, MANIFEST_NAME, GraphSpec, Manifest, Package,
                                 PackageManifest, detect_kind, hash_files, load_any, load_package, manifest_field,
                                 manifest_sha256, package_kind, read_package, register_kind, sha256_file,
                                 unregister_kind, update_status, write_manifest)
from hbi_runtime.tasks.caption import CaptionModel, CaptionPackageManifest, load_caption, read_caption_manifest
from hbi_runtime.tasks.qa import QAModelRuntime
from hbi_runtime.tasks.qa_package import QA_MANIFEST, QAManifest, QAPackage, load_qa_package, update_qa_status

DEMO = Path(__file__).resolve().parents[2] / "hbi_runtime" / "data" / "demo"
# (folder, kind, manifest file of the old form, manifest class)
SHIPPED = [("package", "retrieval", MANIFEST_NAME, Manifest), ("qa/package", "qa", QA_MANIFEST, QAManifest),
           ("caption", "caption", MANIFEST_NAME, CaptionPackageManifest)]
ONNX = b"\x08\x08"  # a serialized ONNX ModelProto holding only ir_version 8: all the package layer reads of a graph


def raw_manifest(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def copy_demo(tmp_path: Path) -> Path:
    """The demo's packages, copied with their relative layout (a caption package names ``../package``)."""
    for folder in ("package", "qa/package", "caption"):
        shutil.copytree(DEMO / folder, tmp_path / folder)
    return tmp_path


# --- the forms before package kinds: the shipped demo --------------------------------------------------------------


@pytest.mark.parametrize("folder, kind, name, cls", SHIPPED, ids=[s[1] for s in SHIPPED])
def test_shipped_packages_of_the_old_forms_load_as_written(folder, kind, name, cls):
    root = DEMO / folder
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    raw = raw_manifest(root / name)
    assert "kind" not in raw or raw["kind"] == "hbi-qa"  # (still the old forms: nothing rewrote them)
    package = read_package(root)
    assert type(package.manifest) is cls and package.kind == kind and package.legacy
    assert package.manifest_sha256 == raw[HASH_FIELD] == manifest_sha256(raw)  # the old rule: the body as written
    assert package.manifest.status == raw["status"] and package.manifest.created == raw["created"]
    assert sorted(package.manifest.graphs) == sorted(raw["graphs"])
    assert detect_kind(root) == kind
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before  # reading writes nothing


def test_old_forms_map_onto_the_kinds_fields():
    retrieval = load_package(DEMO / "package").manifest
    assert retrieval.files == retrieval.tokenizer.files and retrieval.calibration is None
    qa = load_qa_package(DEMO / "qa" / "package")
    assert qa.manifest.files == {**qa.manifest.tokenizer.files, "answers.json": qa.manifest.answers["sha256"]}
    assert len(qa.answers) == qa.manifest.answers["count"] == 17
    caption = read_caption_manifest(DEMO / "caption")
    assert caption.manifest.files == {} and caption.manifest.source is None
    assert caption.retrieval_sha256 == load_package(DEMO / "package").manifest_sha256
    assert caption.sha256 == caption.manifest_sha256 and caption.patch_grid == 4 and caption.layers == 2


@pytest.mark.parametrize("folder, kind, name, cls", SHIPPED, ids=[s[1] for s in SHIPPED])
def test_an_edited_old_manifest_is_refused_and_a_resigned_one_reads(tmp_path, folder, kind, name, cls):
    root = copy_demo(tmp_path) / folder
    raw = raw_manifest(root / name)
    raw["created"] = "2030-01-01T00:00:00+00:00"
    (root / name).write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(MismatchError, match="was edited after export"):
        read_package(root)
    raw[HASH_FIELD] = manifest_sha256(raw)  # signed again with the rule it was written with
    (root / name).write_text(json.dumps(raw, indent=3), encoding="utf-8")
    package = read_package(root, kind=kind)
    assert package.legacy and package.manifest.created == "2030-01-01T00:00:00+00:00"


def test_an_old_form_with_another_schema_version_is_refused(tmp_path):
    root = copy_demo(tmp_path) / "qa" / "package"
    raw = raw_manifest(root / QA_MANIFEST)
    raw["schema_version"] = 0
    raw[HASH_FIELD] = manifest_sha256(raw)
    (root / QA_MANIFEST).write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(MismatchError, match=r"QA package manifest schema version 0 is unknown .* \(and 1 in the form "
                                            r"before package kinds\)") as exc:
        load_qa_package(root)
    assert "hbi-export qa-export" in exc.value.hint


def test_update_status_writes_the_current_form(tmp_path):
    """The one sanctioned edit rewrites an old package in the current form: same facts, a kind, one manifest."""
    root = copy_demo(tmp_path)
    for folder, kind, name, _ in SHIPPED:
        old = read_package(root / folder)
        new = update_status(root / folder, "unverified", {"note": "re-checked"}, kind=kind)
        assert new == replace(old.manifest, status="unverified", parity={"note": "re-checked"})
        body = raw_manifest(root / folder / MANIFEST_NAME)
        assert body["kind"] == kind and body["schema_version"] == FORMAT_VERSION
        assert body["files"] == old.manifest.files and "schema" not in body
        assert sorted(p.name for p in (root / folder).glob("*manifest.json")) == [MANIFEST_NAME]
        again = read_package(root / folder, allow_unverified=True)
        assert not again.legacy and again.manifest == new and again.manifest_sha256 == new.sha256
        assert detect_kind(root / folder) == kind
    assert load_qa_package(root / "qa" / "package", allow_unverified=True).answers == \
        load_qa_package(DEMO / "qa" / "package").answers
    with pytest.raises(GateFailedError, match="QA package .* was never parity-checked"):
        load_qa_package(root / "qa" / "package")
    update_qa_status(root / "qa" / "package", "verified", None)
    assert load_qa_package(root / "qa" / "package").manifest.status == "verified"


def test_a_caption_package_keeps_its_retrieval_package_after_a_rewrite(tmp_path):
    root = copy_demo(tmp_path)
    update_status(root / "caption", "verified", {"graphs": {"ok": True}}, kind="caption")  # new form, same reference
    with load_caption(root / "caption") as model:
        assert isinstance(model, CaptionModel) and not model.manifest.legacy
        assert model.manifest.sha256 == raw_manifest(root / "caption" / MANIFEST_NAME)[HASH_FIELD]
    update_status(root / "package", "verified", None)  # the retrieval package's manifest_sha256 changes
    with pytest.raises(MismatchError, match="was trained on the retrieval package with manifest_sha256"):
        load_caption(root / "caption")


# --- one reader, dispatching on kind --------------------------------------------------------------------------------


def test_load_any_opens_each_kind_with_its_loader():
    model = load_any(DEMO / "package", intra_op_threads=1)
    with model:
        assert type(model).__name__ == "Model" and model.package.legacy
        assert {b.intra_op_threads for b in model.backends.values()} == {1}
    with load_any(DEMO / "qa" / "package") as qa:
        assert isinstance(qa, QAModelRuntime) and isinstance(qa.package, QAPackage) and len(qa.answers) == 17
    with load_any(DEMO / "caption") as caption:
        assert isinstance(caption, CaptionModel)
        assert caption.retrieval.package.manifest_sha256 == caption.manifest.retrieval_sha256


@pytest.mark.parametrize("load, folder, match", [
    (load_qa_package, "package", r"holds a model package \(kind 'retrieval'\), not a QA package"),
    (load_package, "qa/package", r"holds a QA package \(kind 'qa'\), not a model package"),
    (read_caption_manifest, "package", r"holds a model package \(kind 'retrieval'\), not a caption package"),
    (load_package, "caption", r"holds a caption package \(kind 'caption'\), not a model package"),
])
def test_a_package_of_another_kind_is_refused_by_name(load, folder, match):
    with pytest.raises(MismatchError, match=match) as exc:
        load(DEMO / folder)
    assert exc.value.exit_code == 4 and exc.value.hint


def _manifest_body(root: Path, **fields) -> None:
    body = {"schema_version": FORMAT_VERSION, "toolkit_version": "0.1.0", "created": "2026-01-01T00:00:00+00:00",
            "graphs": {}, "files": {}, "status": "verified", **fields}
    body[HASH_FIELD] = manifest_sha256(body)
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST_NAME).write_text(json.dumps(body), encoding="utf-8")


def test_unknown_or_missing_kind_is_refused(tmp_path):
    _manifest_body(tmp_path / "new", kind="hologram")
    with pytest.raises(MismatchError, match=r"package kind 'hologram' is unknown .* \['caption', 'qa', "
                                            r"'retrieval'\]") as exc:
        load_any(tmp_path / "new")
    assert "upgrade hbi-toolkit" in exc.value.hint
    assert detect_kind(tmp_path / "new") == "hologram"  # a package, even of a kind this toolkit cannot read
    _manifest_body(tmp_path / "nameless")
    with pytest.raises(BadInputError, match="kind: required field is missing, so this is not a package manifest"):
        read_package(tmp_path / "nameless")
    with pytest.raises(BadInputError, match="package .*nowhere does not exist") as exc:
        load_any(tmp_path / "nowhere")
    assert exc.value.hint.startswith("pass a package folder")


def test_detect_kind_is_the_overwrite_rules_view(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")  # a synthetic data set's manifest: not a package
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "manifest.json").write_text("{not json")
    assert detect_kind(tmp_path / "data") is None and detect_kind(tmp_path / "broken") is None
    assert detect_kind(tmp_path / "nowhere") is None
    root = copy_demo(tmp_path / "demo")
    update_qa_status(root / "qa" / "package", "verified", None)  # the current form of a QA package
    for folder, kind, *_ in SHIPPED:
        assert [k for k, holds in ARTIFACT_KINDS.items() if holds(root / folder)] == \
            [{"retrieval": "model package", "qa": "QA package", "caption": "caption package"}[kind]]


# --- a fourth kind needs only its own fields -----------------------------------------------------------------------


def _greeting(value, path):
    if not isinstance(value, str) or not value.strip():
        raise BadInputError(f"{path}: expected a greeting, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class ToyManifest(PackageManifest):
    KIND = "toy"
    LABEL = "toy package"
    GRAPHS = ("echo",)

    greeting: str = manifest_field(_greeting)
    repeats: int = manifest_field(lambda v, p: v if isinstance(v, int) and v > 0 else _greeting(None, p), default=1)


@pytest.fixture
def toy_kind():
    opened = []
    register_kind(ToyManifest, lambda package, **options: opened.append((package, options)) or "a toy")
    yield opened
    unregister_kind("toy")


def toy_package(root: Path, status: str = "verified", **fields) -> ToyManifest:
    root.mkdir(parents=True, exist_ok=True)
    (root / "echo.onnx").write_bytes(ONNX)
    (root / "notes.txt").write_text("hello again")
    manifest = ToyManifest(graphs={"echo": GraphSpec("echo.onnx", sha256_file(root / "echo.onnx"), 18, "fp32", [], [])},
                           files=hash_files(root, ["notes.txt"]), status=status, parity={"ok": status == "verified"},
                           greeting="hello", **fields)
    write_manifest(root, manifest)
    return manifest


def test_a_fourth_kind_is_read_checked_and_opened_by_the_one_reader(tmp_path, toy_kind):
    written = toy_package(tmp_path / "toy", repeats=3)
    body = raw_manifest(tmp_path / "toy" / MANIFEST_NAME)
    assert body["kind"] == "toy" and body["greeting"] == "hello" and body["repeats"] == 3
    package = read_package(tmp_path / "toy")
    assert type(package) is Package and package.manifest == written and not package.legacy
    assert package.graph_path("echo") == tmp_path / "toy" / "echo.onnx"
    assert load_any(tmp_path / "toy", colour="blue") == "a toy"
    assert toy_kind == [(package, {"allow_unverified": False, "colour": "blue"})]
    assert package_kind("toy").manifest is ToyManifest and detect_kind(tmp_path / "toy") == "toy"
    # the base's checks, with nothing written for the toy kind: the listed file's hash, the status, the kind
    (tmp_path / "toy" / "notes.txt").write_text("changed")
    with pytest.raises(MismatchError, match="notes.txt was modified after export"):
        read_package(tmp_path / "toy")
    toy_package(tmp_path / "new", status="unverified")
    with pytest.raises(GateFailedError, match="toy package .* was never parity-checked"):
        load_any(tmp_path / "new")
    with pytest.raises(MismatchError, match=r"holds a toy package \(kind 'toy'\), not a QA package"):
        load_qa_package(tmp_path / "new")


def test_a_fourth_kinds_fields_are_validated(tmp_path, toy_kind):
    toy_package(tmp_path / "toy")
    path = tmp_path / "toy" / MANIFEST_NAME
    for edit, error, match in [
        (lambda b: b.pop("greeting"), BadInputError, "greeting: required field is missing"),
        (lambda b: b.update(greeting=" "), BadInputError, "greeting: expected a greeting"),
        (lambda b: b.update(colour="blue"), BadInputError, r"unknown field\(s\) \['colour'\]"),
        (lambda b: b["graphs"].pop("echo"), BadInputError, r"graphs: no entry for \['echo'\]; a toy package has"),
        (lambda b: b.update(schema_version=FORMAT_VERSION + 1), MismatchError, "toy package manifest schema version"),
    ]:
        body = raw_manifest(path)
        edit(body)
        body[HASH_FIELD] = manifest_sha256(body)
        (tmp_path / "bad").mkdir(exist_ok=True)
        shutil.copy(tmp_path / "toy" / "echo.onnx", tmp_path / "bad")
        shutil.copy(tmp_path / "toy" / "notes.txt", tmp_path / "bad")
        (tmp_path / "bad" / MANIFEST_NAME).write_text(json.dumps(body))
        with pytest.raises(error, match=match):
            read_package(tmp_path / "bad")
    assert read_package(tmp_path / "toy").manifest.repeats == 1  # optional in the file: the field's default
    unregister_kind("toy")
    with pytest.raises(MismatchError, match="package kind 'toy' is unknown"):
        read_package(tmp_path / "toy")


def test_a_kind_name_belongs_to_one_class():
    @dataclass(frozen=True, kw_only=True)
    class Impostor(PackageManifest):
        KIND = "retrieval"

    with pytest.raises(ValueError, match="already Manifest's"):
        register_kind(Impostor, lambda package, **_: package)
    assert package_kind("retrieval").manifest is Manifest
