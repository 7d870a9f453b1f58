"""Video question answering in the torch-free runtime: ``hbi_runtime.tasks.qa.load_qa(pkg_dir)``.

::

    from hbi_runtime.tasks.qa import load_qa, read_questions

    with load_qa("qa_pkg/") as qa:
        result = qa.ask([("clip.mp4", "what colour is the square?")], top_k=5)
        for row in result.rows:
            print(row.question, row.answers[0])           # (answer, probability), best first

Each distinct video is decoded once (worker processes, :class:`hbi_runtime.video.VideoDecoder`, the package's
preprocessing) and encoded once; each question once; only the small answer head runs per (question, video) row.
Probabilities are the softmax of the combined logits (``answer_weights``, official 0.4 / 0.4 / 0.2). A file that
cannot be decoded fails its rows only (``QAResult.failed``), never the run.

Accuracy (:func:`accuracy`) follows the official MSRVTT-QA protocol: rows whose reference answer is not in the
package's answer vocabulary are left out (and counted); top-1 and top-5 over the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from hbi_runtime.backends import create_backend
from hbi_runtime.errors import BadInputError, UsageError
from hbi_runtime.tasks.qa_package import LEVEL_TAGS, QA_GRAPHS, QAPackage, load_qa_package
from hbi_runtime.tokenizer import ClipTokenizer

QUESTION_BATCH = 64
VIDEO_BATCH = 16


@dataclass(frozen=True)
class QARow:
    """One answered (video, question) row; ``answers`` = top-k ``(answer, probability)``, best first."""

    video: str
    question: str
    answers: tuple[tuple[str, float], ...]
    truncated: bool = False
    expected: str | None = None

    @property
    def correct(self) -> bool | None:
        return None if self.expected is None else bool(self.answers and self.answers[0][0] == self.expected)

    def to_dict(self) -> dict:
        out = {"video": self.video, "question": self.question, "truncated": self.truncated,
               "answer": self.answers[0][0] if self.answers else None,
               "answers": [{"rank": i + 1, "answer": a, "probability": round(p, 6)}
                           for i, (a, p) in enumerate(self.answers)]}
        if self.expected is not None:
            out.update(expected=self.expected, correct=self.correct)
        return out


@dataclass
class QAResult:
    rows: list[QARow] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # {"video", "question", "reason"} per row whose video failed


def read_questions(path: str | os.PathLike) -> list[tuple[str, str, str | None]]:
    """A question file: CSV with a header ``video,question[,answer]`` -> ``(video, question, answer or None)``.

    Relative video paths are resolved against the CSV file's folder.

    Raises:
        BadInputError: unreadable, no header with ``video`` and ``question`` columns, no rows, or an empty cell.
    """
    from hbi_runtime.inputs import read_csv

    path = Path(path)
    hint = "the file is CSV with a header line: video,question[,answer]"
    rows = read_csv(path, "question")
    columns = {name.lower(): name for name in rows[0][1]}
    if "video" not in columns or "question" not in columns:
        raise BadInputError(f"question file {path}: the header {list(rows[0][1])} has no 'video' and 'question' "
                            "columns", hint=hint)
    out = []
    for line, row in rows:
        video, question = row[columns["video"]].strip(), row[columns["question"]].strip()
        answer = row[columns["answer"]].strip() if "answer" in columns else None
        if not video or not question or ("answer" in columns and not answer):
            raise BadInputError(f"question file {path}, line {line}: empty video, question or answer", hint=hint)
        resolved = Path(video) if Path(video).is_absolute() else path.parent / video
        out.append((str(resolved), question, answer))
    if not out:
        raise BadInputError(f"question file {path} has a header but no rows", hint=hint)
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float64 (stable), returned as float64."""
    x = logits.astype(np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def load_qa(pkg_dir: str | os.PathLike, *, backend: str = "onnxruntime", allow_unverified: bool = False,
            **backend_options) -> QAModelRuntime:
    """Load a QA package (see :func:`hbi_runtime.tasks.qa_package.load_qa_package` for its checks)."""
    return open_qa(load_qa_package(pkg_dir, allow_unverified=allow_unverified), backend=backend, **backend_options)


def open_qa(package: QAPackage, *, backend: str = "onnxruntime", allow_unverified: bool = False,
            **backend_options) -> QAModelRuntime:
    """The runtime of a loaded, checked QA package (what :func:`hbi_runtime.package.load_any` returns for one)."""
    backends = {name: create_backend(backend, package.graph(name), package.graph_path(name), **backend_options)
                for name in QA_GRAPHS}
    return QAModelRuntime(package, backends)


class QAModelRuntime:
    """Question encoder, video encoder and answer head of one QA package (graphs load on first use)."""

    def __init__(self, package: QAPackage, backends: dict) -> None:
        self.package = package
        self._backends = backends

    @property
    def answers(self) -> tuple[str, ...]:
        return self.package.answers

    @cached_property
    def tokenizer(self) -> ClipTokenizer:
        spec = self.package.manifest.tokenizer
        return ClipTokenizer(self.package.dir / next(iter(spec.files)), max_words=spec.max_words)

    def _run(self, graph: str, feed: dict[str, np.ndarray], batch: int) -> list[np.ndarray]:
        backend = self._backends[graph].load()
        n = len(next(iter(feed.values())))
        names = [t.name for t in backend.output_specs]
        parts = [backend.infer({k: v[s:s + batch] for k, v in feed.items()}) for s in range(0, n, batch)]
        return [np.concatenate([p[name] for p in parts]) for name in names]

    def encode_questions(self, questions: Sequence[str]) -> tuple[list[np.ndarray], list[bool]]:
        """Questions -> (three pooled vectors [n, D], truncated flags)."""
        ids, mask, truncated = self.tokenizer(list(questions))
        return self._run("question_encoder", {"input_ids": ids, "attention_mask": mask}, QUESTION_BATCH), truncated

    def encode_frames(self, frames: np.ndarray, frame_mask: np.ndarray) -> list[np.ndarray]:
        """Preprocessed videos ``[B, T, 3, S, S]``, mask ``[B, T]`` -> three pooled vectors [B, D]."""
        return self._run("video_encoder", {"frames": frames, "frame_mask": frame_mask}, VIDEO_BATCH)

    def encode_videos(self, paths: Iterable[str], *, workers: int = 2, timeout_s: float = 120.0
                      ) -> tuple[dict[str, list[np.ndarray]], dict[str, str]]:
        """Decode and encode files -> ({path: three [D] vectors}, {path: reason} for files that failed)."""
        from hbi_runtime.video import VideoDecodeError, VideoDecoder

        vectors: dict[str, list[np.ndarray]] = {}
        failed: dict[str, str] = {}
        pending: list = []

        def flush() -> None:
            out = self.encode_frames(np.stack([d.frames for _, d in pending]), np.stack([d.mask for _, d in pending]))
            for i, (p, _) in enumerate(pending):
                vectors[p] = [level[i] for level in out]
            pending.clear()

        with VideoDecoder(self.package.manifest.preprocessing, workers=workers, timeout_s=timeout_s) as pool:
            for path, result in pool.decode_many(list(paths)):
                if isinstance(result, VideoDecodeError):
                    failed[path] = result.reason
                    continue
                pending.append((path, result))
                if len(pending) == VIDEO_BATCH:
                    flush()
        if pending:
            flush()
        return vectors, failed

    def logits(self, questions: list[np.ndarray], videos: list[np.ndarray],
               answer_weights: Sequence[float] | None = None) -> np.ndarray:
        """Paired rows of pooled vectors -> combined logits [n, A] through the answer head."""
        weights = np.asarray(answer_weights if answer_weights is not None
                             else self.package.manifest.answer_weights, dtype=np.float32)
        if weights.shape != (3,) or not np.isfinite(weights).all():
            raise UsageError(f"answer weights must be three finite numbers, got {weights.tolist()}")
        feed = {f"question_{t}": q.astype(np.float32) for t, q in zip(LEVEL_TAGS, questions)}
        feed.update({f"video_{t}": v.astype(np.float32) for t, v in zip(LEVEL_TAGS, videos)})
        backend = self._backends["answer_head"].load()
        n, parts = len(questions[0]), []
        for s in range(0, n, QUESTION_BATCH):
            parts.append(backend.infer({**{k: v[s:s + QUESTION_BATCH] for k, v in feed.items()},
                                        "answer_weights": weights})["logits"])
        return np.concatenate(parts)

    def ask(self, rows: Sequence[tuple], *, top_k: int = 5, workers: int = 2,
            answer_weights: Sequence[float] | None = None) -> QAResult:
        """Answer ``(video, question[, expected answer])`` rows; videos decoded and encoded once each."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise UsageError(f"--top-k must be a positive integer, got {top_k!r}")
        rows = [(str(r[0]), r[1], r[2] if len(r) > 2 else None) for r in rows]
        if not rows:
            raise UsageError("no questions given")
        videos, failed = self.encode_videos(dict.fromkeys(r[0] for r in rows), workers=workers)
        result = QAResult(failed=[{"video": v, "question": q, "reason": failed[v]} for v, q, _ in rows
                                  if v in failed])
        good = [r for r in rows if r[0] in videos]
        if not good:
            return result
        q_vecs, truncated = self.encode_questions([q for _, q, _ in good])
        v_vecs = [np.stack([videos[v][level] for v, _, _ in good]) for level in range(len(LEVEL_TAGS))]
        probs = softmax(self.logits(q_vecs, v_vecs, answer_weights))
        k = min(top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        for i, (v, q, expected) in enumerate(good):
            answers = tuple((self.answers[j], float(probs[i, j])) for j in order[i])
            result.rows.append(QARow(v, q, answers, bool(truncated[i]), expected))
        return result

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()

    def __enter__(self) -> QAModelRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def accuracy(rows: Sequence[QARow], vocabulary: Sequence[str]) -> dict | None:
    """Top-1 / top-5 accuracy over rows with a reference answer in ``vocabulary`` (official protocol).

    Returns None when no row has a reference answer. ``top5`` counts a row correct when the reference is among
    its returned answers (so it needs ``top_k >= 5`` to mean top-5).
    """
    scored = [r for r in rows if r.expected is not None]
    if not scored:
        return None
    known = set(vocabulary)
    counted = [r for r in scored if r.expected in known]
    top1 = sum(r.correct for r in counted)
    top5 = sum(r.expected in [a for a, _ in r.answers[:5]] for r in counted)
    n = len(counted)
    return {"questions": n, "out_of_vocabulary": len(scored) - n, "top1": top1 / n if n else None,
            "top5": top5 / n if n else None, "top1_correct": top1}


__all__ = ["QARow", "QAResult", "QAModelRuntime", "accuracy", "load_qa", "read_questions", "softmax"]
