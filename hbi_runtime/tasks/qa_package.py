"""The QA model package: what ``export_qa_package`` writes and :mod:`hbi_runtime.tasks.qa` reads (torch-free).

A QA package is a folder of its own, separate from a retrieval package (its weights are another checkpoint)::

    manifest.json         this module's :class:`QAManifest` (kind ``qa``), plus ``manifest_sha256``
    question_encoder.onnx input_ids, attention_mask [text_batch, L] -> question_l0..l2 [text_batch, D]
    video_encoder.onnx    frames [video_batch, T, 3, S, S], frame_mask [video_batch, T] -> video_l0..l2 [video_batch, D]
    answer_head.onnx      question_l0..l2, video_l0..l2 [text_batch, D] (row i: question i and its video),
                          answer_weights [3] -> logits [text_batch, A], level_logits [3, text_batch, A]
    answers.json          the answer vocabulary, ``{"answer": id}`` with ids 0..A-1 (official train_ans2label.json)
    tokenizer/...         the CLIP BPE vocabulary

The pooled vectors (``*_l0..l2``: entity, action, event) are per modality, so a video is encoded once for any
number of questions. The manifest is a :class:`hbi_runtime.package.PackageManifest` like every package kind's (its
graphs and files with their sha256, status and parity, read and checked by :func:`hbi_runtime.package.read_package`)
and reuses the retrieval package's parts (:class:`Preprocessing`, :class:`TokenizerSpec`). A QA package written
before package kinds keeps its ``qa_manifest.json`` (``kind: hbi-qa``, schema version 1) and loads as it is
(:data:`hbi_runtime.package.LEGACY_FORMS`), like the shipped demo's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from hbi_runtime.errors import BadInputError
from hbi_runtime.inputs import read_json
from hbi_runtime.package import (FORMAT_VERSION, HASH_FIELD, STATUSES, Package, PackageManifest, Preprocessing,
                                 TokenizerSpec, _Fields, _float, _list_of, _object, _pos_int, _relpath, _sha256,
                                 manifest_field, read_package, register_kind, update_status, write_manifest)

QA_MANIFEST = "qa_manifest.json"  # the manifest's name before package kinds (a new QA package has manifest.json)
QA_KIND = "qa"
QA_SCHEMA_VERSION = FORMAT_VERSION
QA_GRAPHS = ("question_encoder", "video_encoder", "answer_head")
ANSWERS_FILE = "answers.json"
LEVEL_TAGS = ("l0", "l1", "l2")

__all__ = ["ANSWERS_FILE", "HASH_FIELD", "LEVEL_TAGS", "QA_GRAPHS", "QA_KIND", "QA_MANIFEST", "QA_SCHEMA_VERSION",
           "STATUSES", "QAManifest", "QAPackage", "export_hint", "load_qa_package", "read_answers", "update_qa_status",
           "write_qa_manifest"]


def export_hint(root: Path | str) -> str:
    return f"re-export it: `hbi-export qa-export --checkpoint CKPT --out {root}` (docs/qa.md)"


def read_answers(path: str | os.PathLike) -> list[str]:
    """An answer vocabulary file ``{"answer": id}`` (ids exactly 0..A-1) -> answers in id order.

    Raises:
        BadInputError: unreadable, not JSON (or too large / deeply nested, see
            :func:`~hbi_runtime.inputs.read_json`), not an object, ids not integers 0..A-1, or
            duplicated.
    """
    path = Path(path)
    data = read_json(path, what="answer vocabulary",
                             hint='it must be a JSON object {"answer": id, ...} like train_ans2label.json')
    if not isinstance(data, dict) or not data:
        raise BadInputError(f"{path}: expected a non-empty JSON object {{\"answer\": id}}")
    ids = list(data.values())
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids) or sorted(ids) != list(range(len(ids))):
        raise BadInputError(f"{path}: the answer ids must be the integers 0..{len(ids) - 1}, each once")
    answers = [""] * len(ids)
    for answer, i in data.items():
        answers[i] = answer
    return answers


@dataclass(frozen=True)
class QAPackage(Package):
    """A loaded, checked QA package: the answer vocabulary is read (and counted) with it."""

    answers: tuple[str, ...] = ()

    @classmethod
    def opened(cls, root: Path, manifest: QAManifest, digest: str, legacy: bool) -> QAPackage:
        path = root / manifest.answers["file"]
        answers = read_answers(path)
        if len(answers) != manifest.answers["count"]:
            raise BadInputError(f"{path} has {len(answers)} answers, the manifest says {manifest.answers['count']}",
                                hint=export_hint(root))
        return cls(root, manifest, digest, legacy, tuple(answers))


def _answers(value: Any, path: str) -> dict:
    f = _Fields(value, path, ("file", "sha256", "count"))
    return {"file": f.get("file", _relpath), "sha256": f.get("sha256", _sha256), "count": f.get("count", _pos_int)}


@dataclass(frozen=True, kw_only=True)
class QAManifest(PackageManifest):
    """Everything the QA runtime needs; ``answers`` = ``{"file", "sha256", "count"}`` of the answer vocabulary."""

    KIND = QA_KIND
    LABEL = "QA package"
    GRAPHS = QA_GRAPHS
    PACKAGE = QAPackage

    model_config: dict = manifest_field(_object)
    answer_weights: tuple[float, float, float] = manifest_field(_list_of(_float, 3))
    answers: dict = manifest_field(_answers)
    max_words: int = manifest_field(_pos_int)
    max_frames: int = manifest_field(_pos_int)
    embed_dim: int = manifest_field(_pos_int)
    preprocessing: Preprocessing = manifest_field(Preprocessing.from_dict)
    tokenizer: TokenizerSpec = manifest_field(TokenizerSpec.from_dict)

    def part_files(self) -> Iterable[tuple[str, str]]:
        return (*self.tokenizer.files.items(), (self.answers["file"], self.answers["sha256"]))

    def check(self) -> None:
        if self.tokenizer.max_words != self.max_words or self.preprocessing.max_frames != self.max_frames:
            raise BadInputError("tokenizer.max_words / preprocessing.max_frames disagree with max_words / max_frames")
        super().check()

    @classmethod
    def export_hint(cls, root: Path, source: Any = None) -> str:
        return export_hint(root)


def write_qa_manifest(root: str | os.PathLike, manifest: QAManifest) -> Path:
    """Validate and write the manifest with its ``manifest_sha256`` (:func:`hbi_runtime.package.write_manifest`)."""
    return write_manifest(root, manifest)


def load_qa_package(pkg_dir: str | os.PathLike, *, allow_unverified: bool = False) -> QAPackage:
    """Read and check a QA package (:func:`hbi_runtime.package.read_package` with ``kind="qa"``: manifest hash,
    every file's sha256, parity status) and its answer vocabulary.

    Raises:
        BadInputError: no folder / manifest, unreadable / oversized / too deeply nested manifest, malformed field,
            missing file, a symlink leading out of the package, an answer vocabulary that does not match (exit 3).
        MismatchError: another kind of package, unknown schema, edited manifest or file, external data the manifest
            does not list (exit 4).
        GateFailedError: parity failed or never ran, without ``allow_unverified`` (exit 5).
    """
    return read_package(pkg_dir, kind=QA_KIND, allow_unverified=allow_unverified)


def update_qa_status(pkg_dir: str | os.PathLike, status: str, parity: dict | None) -> QAManifest:
    """Record a parity verdict (the only sanctioned manifest edit); integrity is checked first."""
    return update_status(pkg_dir, status, parity, kind=QA_KIND)


register_kind(QAManifest, "hbi_runtime.tasks.qa:open_qa")
