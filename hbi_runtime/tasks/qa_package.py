"""The QA model package: what ``export_qa_package`` writes and :mod:`hbi_runtime.tasks.qa` reads (torch-free).

A QA package is a folder of its own, separate from a retrieval package (its weights are another checkpoint)::

    qa_manifest.json      this module's :class:`QAManifest`, plus ``manifest_sha256`` (same canonical hash rule
                          as the retrieval manifest, :func:`hbi_runtime.package.manifest_sha256`)
    question_encoder.onnx input_ids, attention_mask [text_batch, L] -> question_l0..l2 [text_batch, D]
    video_encoder.onnx    frames [video_batch, T, 3, S, S], frame_mask [video_batch, T] -> video_l0..l2 [video_batch, D]
    answer_head.onnx      question_l0..l2, video_l0..l2 [text_batch, D] (row i: question i and its video),
                          answer_weights [3] -> logits [text_batch, A], level_logits [3, text_batch, A]
    answers.json          the answer vocabulary, ``{"answer": id}`` with ids 0..A-1 (official train_ans2label.json)
    tokenizer/...         the CLIP BPE vocabulary

The pooled vectors (``*_l0..l2``: entity, action, event) are per modality, so a video is encoded once for any
number of questions. The manifest reuses the retrieval package's parts (:class:`GraphSpec`,
:class:`Preprocessing`, :class:`TokenizerSpec`) and its integrity rules: every file listed with its sha256 (a graph's
external data files in its ``external_data``), the manifest hashed, an unknown schema, an edited file, a symlink
leading out of the folder or a failed / missing parity check refused. The files are checked by the check every
package kind shares, :func:`hbi_runtime.package_files.check_package_files` (docs/packages.md).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from hbi_runtime import __version__
from hbi_runtime.errors import BadInputError, GateFailedError, MismatchError
from hbi_runtime.fileio import write_atomic
from hbi_runtime.package import GraphSpec, Preprocessing, TokenizerSpec, manifest_sha256
from hbi_runtime.inputs import read_json
from hbi_runtime.package_files import check_package_files

QA_MANIFEST = "qa_manifest.json"
QA_KIND = "hbi-qa"
QA_SCHEMA_VERSION = 1
HASH_FIELD = "manifest_sha256"
QA_GRAPHS = ("question_encoder", "video_encoder", "answer_head")
ANSWERS_FILE = "answers.json"
LEVEL_TAGS = ("l0", "l1", "l2")
STATUSES = ("verified", "failed", "unverified")
_FIELDS = ("kind", "schema_version", "toolkit_version", "created", "model_config", "answer_weights", "answers",
           "max_words", "max_frames", "embed_dim", "preprocessing", "tokenizer", "graphs", "parity", "status",
           "source")


def export_hint(root: Path | str) -> str:
    return f"re-export it: `hbi-train qa export --checkpoint CKPT --out {root}` (docs/qa.md)"


@dataclass(frozen=True, kw_only=True)
class QAManifest:
    """Everything the QA runtime needs; ``answers`` = ``{"file", "sha256", "count"}`` of the answer vocabulary."""

    kind: str = QA_KIND
    schema_version: int = QA_SCHEMA_VERSION
    toolkit_version: str = __version__
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    model_config: dict
    answer_weights: tuple[float, float, float]
    answers: dict
    max_words: int
    max_frames: int
    embed_dim: int
    preprocessing: Preprocessing
    tokenizer: TokenizerSpec
    graphs: dict[str, GraphSpec]
    parity: dict | None = None
    status: str = "unverified"
    source: dict

    def to_dict(self) -> dict:
        return {"kind": self.kind, "schema_version": self.schema_version, "toolkit_version": self.toolkit_version,
                "created": self.created, "model_config": self.model_config,
                "answer_weights": list(self.answer_weights), "answers": dict(self.answers),
                "max_words": self.max_words, "max_frames": self.max_frames, "embed_dim": self.embed_dim,
                "preprocessing": self.preprocessing.to_dict(), "tokenizer": self.tokenizer.to_dict(),
                "graphs": {k: g.to_dict() for k, g in self.graphs.items()}, "parity": self.parity,
                "status": self.status, "source": self.source}

    @classmethod
    def from_dict(cls, data: Any, where: str = QA_MANIFEST) -> QAManifest:
        """Validate a manifest body (``manifest_sha256`` accepted, checked by :func:`load_qa_package`).

        Raises:
            BadInputError: a field is missing, unknown or malformed. MismatchError: unknown kind / schema version.
        """
        if not isinstance(data, Mapping):
            raise BadInputError(f"{where}: expected a JSON object")
        if data.get("kind") != QA_KIND:
            raise MismatchError(f"{where}: kind {data.get('kind')!r} is not a QA package ({QA_KIND!r})")
        if data.get("schema_version") != QA_SCHEMA_VERSION:
            raise MismatchError(f"{where}: QA package schema version {data.get('schema_version')!r} is unknown to "
                                f"hbi-toolkit {__version__} (it reads version {QA_SCHEMA_VERSION})",
                                hint="use the hbi-toolkit version that exported it, or re-export the package")
        unknown = sorted(set(data) - set(_FIELDS) - {HASH_FIELD})
        missing = [k for k in _FIELDS if k not in data and k != "parity"]
        if unknown or missing:
            raise BadInputError(f"{where}: " + "; ".join(
                part for part in (f"unknown field(s) {unknown}" if unknown else "",
                                  f"missing field(s) {missing}" if missing else "") if part))
        try:
            graphs = {name: GraphSpec.from_dict(g, f"graphs.{name}") for name, g in dict(data["graphs"]).items()}
            weights = tuple(float(w) for w in data["answer_weights"])
            answers = dict(data["answers"])
            manifest = cls(
                toolkit_version=str(data["toolkit_version"]), created=str(data["created"]),
                model_config=dict(data["model_config"]), answer_weights=weights, answers=answers,
                max_words=int(data["max_words"]), max_frames=int(data["max_frames"]),
                embed_dim=int(data["embed_dim"]),
                preprocessing=Preprocessing.from_dict(data["preprocessing"]),
                tokenizer=TokenizerSpec.from_dict(data["tokenizer"]), graphs=graphs, parity=data.get("parity"),
                status=str(data["status"]), source=dict(data["source"]))
        except (TypeError, ValueError, AttributeError) as exc:
            raise BadInputError(f"{where}: malformed field ({exc})") from None
        _check(manifest, where)
        return manifest


def _check(m: QAManifest, where: str) -> None:
    problems = []
    if len(m.answer_weights) != 3:
        problems.append(f"answer_weights has {len(m.answer_weights)} values, expected 3")
    if sorted(m.graphs) != sorted(QA_GRAPHS):
        problems.append(f"graphs are {sorted(m.graphs)}, expected {sorted(QA_GRAPHS)}")
    if m.status not in STATUSES:
        problems.append(f"status {m.status!r} is not one of {list(STATUSES)}")
    if set(m.answers) != {"file", "sha256", "count"}:
        problems.append("answers must have file, sha256 and count")
    if m.tokenizer.max_words != m.max_words or m.preprocessing.max_frames != m.max_frames:
        problems.append("tokenizer.max_words / preprocessing.max_frames disagree with max_words / max_frames")
    if problems:
        raise BadInputError(f"{where}: " + "; ".join(problems))


def write_qa_manifest(root: str | os.PathLike, manifest: QAManifest) -> Path:
    """Validate and write ``qa_manifest.json`` with its ``manifest_sha256`` (temporary file + rename)."""
    root = Path(root)
    body = QAManifest.from_dict(manifest.to_dict()).to_dict()
    body[HASH_FIELD] = manifest_sha256(body)
    return write_atomic(root / QA_MANIFEST,
                        json.dumps(body, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n")


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
class QAPackage:
    dir: Path
    manifest: QAManifest
    manifest_sha256: str
    answers: tuple[str, ...]

    def graph_path(self, name: str) -> Path:
        return self.dir / self.manifest.graphs[name].file


def load_qa_package(pkg_dir: str | os.PathLike, *, allow_unverified: bool = False) -> QAPackage:
    """Read and check a QA package (manifest hash, every file's sha256, parity status, answer vocabulary).

    Raises:
        BadInputError: no folder / manifest, unreadable / oversized / too deeply nested manifest, malformed field,
            missing file, a symlink leading out of the package (exit 3).
        MismatchError: a retrieval package, unknown schema, edited manifest or file, external data the manifest
            does not list (exit 4).
        GateFailedError: parity failed or never ran, without ``allow_unverified`` (exit 5).
    """
    root = Path(pkg_dir)
    path = root / QA_MANIFEST
    if not root.is_dir():
        raise BadInputError(f"QA package {root} does not exist or is not a folder", hint=export_hint(root))
    if not path.is_file():
        if (root / "manifest.json").is_file():
            raise MismatchError(f"{root} is a retrieval model package, not a QA package (no {QA_MANIFEST})",
                                hint="pass a QA package (--model), e.g. the demo's hbi_runtime/data/demo/qa/package")
        raise BadInputError(f"{root} is not a QA package: it has no {QA_MANIFEST}", hint=export_hint(root))
    raw = read_json(path, what="QA package manifest", hint=export_hint(root))
    manifest = QAManifest.from_dict(raw, str(path))
    stored = raw.get(HASH_FIELD)
    if stored != manifest_sha256(raw):
        raise MismatchError(f"{path} was edited after export (its {HASH_FIELD} does not match)",
                            hint=export_hint(root))
    listed = [*manifest.tokenizer.files.items(), (manifest.answers["file"], manifest.answers["sha256"])]
    check_package_files(root, listed, graphs=manifest.graphs, kind="QA package", hint=export_hint(root))
    if not allow_unverified and manifest.status != "verified":
        raise GateFailedError(f"QA package {root} has parity status {manifest.status!r}; refusing to use it",
                              hint="re-export it (parity runs at export), or pass --allow-unverified")
    answers = read_answers(root / manifest.answers["file"])
    if len(answers) != manifest.answers["count"]:
        raise BadInputError(f"{root / manifest.answers['file']} has {len(answers)} answers, the manifest says "
                            f"{manifest.answers['count']}", hint=export_hint(root))
    return QAPackage(root, manifest, stored, tuple(answers))


def update_qa_status(pkg_dir: str | os.PathLike, status: str, parity: dict | None) -> QAManifest:
    """Record a parity verdict (the only sanctioned manifest edit); integrity is checked first."""
    package = load_qa_package(pkg_dir, allow_unverified=True)
    manifest = replace(package.manifest, status=status, parity=parity)
    write_qa_manifest(pkg_dir, manifest)
    return manifest
