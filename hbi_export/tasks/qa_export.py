"""QA checkpoint -> QA model package (three ONNX graphs, answer vocabulary, manifest), then parity.

Reuses the retrieval export machinery: :func:`hbi_export.onnx.export.export_graph` (dynamo exporter, ``hbi``
custom ops as model-local functions, full checker) on declarative :class:`GraphDef` specs, and the parity inputs
and metrics of :mod:`hbi_export.onnx.parity` / :mod:`hbi_runtime.compare`. The package format is
:mod:`hbi_runtime.tasks.qa_package`. Graphs are fp32 (the parity criterion is the fp32 row of the tolerance table:
max abs <= 1e-4 on every output, identical top-1 answer per question).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from hbi_export.onnx.export import DEFAULT_OPSET, export_graph
from hbi_export.onnx.graphs import GraphDef, TensorDef
from hbi_export.onnx.parity import _run_split, _session, parity_inputs
from hbi_export.tasks.qa import QAModel
from hbi_export.tasks.qa_checkpoint import build_qa_model
from hbi_runtime.compare import Check, ParityResult, compare_tensors, evaluate, top1_agreement_rows
from hbi_runtime.errors import UsageError
from hbi_runtime.outputs import prepare_output_dir, staged_output_dir
from hbi_runtime.names import display_path
from hbi_runtime.package import GraphSpec, Preprocessing, TensorSpec, TokenizerSpec, hash_files, sha256_file
from hbi_runtime.tasks.qa_package import (ANSWERS_FILE, LEVEL_TAGS, QA_MANIFEST, QAManifest, load_qa_package,
                                          read_answers, update_qa_status, write_qa_manifest)
from hbi_runtime.tokenizer import DEFAULT_VOCAB_PATH

Progress = Callable[[str], None]


def _names(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}_{tag}" for tag in LEVEL_TAGS)


class QuestionEncoder(nn.Module):
    def __init__(self, model: QAModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.encode_question(input_ids, attention_mask)


class QAVideoEncoder(nn.Module):
    def __init__(self, model: QAModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames, frame_mask):
        return self.model.encode_video_qa(frames, frame_mask)


class AnswerHead(nn.Module):
    def __init__(self, model: QAModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, q0, q1, q2, v0, v1, v2, answer_weights):
        levels = self.model.level_logits((q0, q1, q2), (v0, v1, v2))  # (3, B, A)
        return (levels * answer_weights[:, None, None]).sum(dim=0), levels


def qa_graph_defs(model: QAModel, max_words: int, max_frames: int) -> dict[str, GraphDef]:
    """The three QA graphs at fixed L and T (the head's batch axis is the question batch, ``text_batch``)."""
    c = model.qa_config
    d, size, a = c.model.embed_dim, c.model.vision.image_size, c.answers
    question = tuple(TensorDef(n, "float32", ("text_batch", d)) for n in _names("question"))
    video = tuple(TensorDef(n, "float32", ("video_batch", d)) for n in _names("video"))
    paired = tuple(TensorDef(n, "float32", ("text_batch", d)) for n in _names("video"))
    return {
        "question_encoder": GraphDef(
            "question_encoder", (TensorDef("input_ids", "int64", ("text_batch", max_words)),
                                 TensorDef("attention_mask", "int64", ("text_batch", max_words))),
            question, QuestionEncoder),
        "video_encoder": GraphDef(
            "video_encoder", (TensorDef("frames", "float32", ("video_batch", max_frames, 3, size, size)),
                              TensorDef("frame_mask", "int64", ("video_batch", max_frames))),
            video, QAVideoEncoder),
        "answer_head": GraphDef(
            "answer_head", question + paired + (TensorDef("answer_weights", "float32", (3,)),),
            (TensorDef("logits", "float32", ("text_batch", a)),
             TensorDef("level_logits", "float32", (3, "text_batch", a))), AnswerHead),
    }


def default_answers(n: int) -> list[str]:
    """Placeholder names ``answer_0`` ... for a model without a vocabulary file (tests, random models)."""
    return [f"answer_{i}" for i in range(n)]


def write_answers(path: Path, answers: Sequence[str]) -> None:
    """``{"answer": id}`` in id order, the official train_ans2label.json layout."""
    if len(set(answers)) != len(answers):
        raise UsageError("the answer vocabulary has duplicate answers")
    path.write_text(json.dumps({a: i for i, a in enumerate(answers)}, indent=1, ensure_ascii=False) + "\n")


def write_qa_package(model: QAModel, root: Path, *, answers: Sequence[str], source: dict, max_words: int,
                     max_frames: int, opset: int = DEFAULT_OPSET, progress: Progress = lambda _: None) -> QAManifest:
    """Export the QA graphs of ``model`` into the empty folder ``root`` and write the (unverified) manifest."""
    c = model.qa_config
    if len(answers) != c.answers:
        raise UsageError(f"the answer vocabulary has {len(answers)} answers, the model's classifier {c.answers}",
                         hint="pass the train_ans2label.json the model was trained with")
    if not 3 <= max_words <= c.model.text.context_length:
        raise UsageError(f"max_words {max_words} is outside 3..{c.model.text.context_length}")
    if not 1 <= max_frames <= c.model.frame_positions:
        raise UsageError(f"max_frames {max_frames} is outside 1..{c.model.frame_positions}")
    graphs = {}
    for name, gdef in qa_graph_defs(model, max_words, max_frames).items():
        progress(f"exporting {name}")
        proto = export_graph(gdef, model, root / f"{name}.onnx", opset, progress=progress)
        custom = sorted({f"{n.domain}.{n.op_type}" for n in proto.graph.node if n.domain})
        graphs[name] = GraphSpec(f"{name}.onnx", sha256_file(root / f"{name}.onnx"), opset, "fp32",
                                 tuple(TensorSpec(t.name, t.dtype, t.shape) for t in gdef.inputs),
                                 tuple(TensorSpec(t.name, t.dtype, t.shape) for t in gdef.outputs), tuple(custom))
    write_answers(root / ANSWERS_FILE, answers)
    (root / "tokenizer").mkdir()
    vocab = f"tokenizer/{DEFAULT_VOCAB_PATH.name}"
    shutil.copyfile(DEFAULT_VOCAB_PATH, root / vocab)
    manifest = QAManifest(
        model_config=c.to_dict(), answer_weights=c.answer_weights,
        answers={"file": ANSWERS_FILE, "sha256": sha256_file(root / ANSWERS_FILE), "count": c.answers},
        max_words=max_words, max_frames=max_frames, embed_dim=c.model.embed_dim,
        preprocessing=Preprocessing(max_frames=max_frames, image_size=c.model.vision.image_size),
        tokenizer=TokenizerSpec(max_words=max_words, files=hash_files(root, [vocab])), graphs=graphs,
        source=source)
    write_qa_manifest(root, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------- parity

def compare_qa_package(pkg_dir: str | Path, model: QAModel, seed: int = 0) -> ParityResult:
    """PyTorch vs ONNX Runtime on padded questions (L .. 2 tokens) and videos (T .. 1 frames), encoders at batch
    sizes 1, 2 and the rest; the head on every question paired with video ``i % videos``. fp32 tolerance plus
    identical top-1 answer per question."""
    pkg = load_qa_package(pkg_dir, allow_unverified=True)
    m = pkg.manifest
    if m.model_config != model.qa_config.to_dict():
        raise UsageError(f"{pkg_dir} was exported from a different QA model (its model_config differs)",
                         hint="pass the checkpoint the package was exported from")
    x = parity_inputs(model, m.max_words, m.max_frames, seed)
    n_q, n_v = len(x["input_ids"]), len(x["frames"])
    pair = torch.arange(n_q) % n_v
    weights = torch.tensor(m.answer_weights, dtype=torch.float32)
    with torch.no_grad():
        q_ref = model.encode_question(x["input_ids"], x["attention_mask"])
        v_ref = model.encode_video_qa(x["frames"], x["frame_mask"])
        lv_ref = model.level_logits(q_ref, tuple(v[pair] for v in v_ref))
        logits_ref = model.answer_logits(q_ref, tuple(v[pair] for v in v_ref), weights)
    q = _run_split(_session(pkg.graph_path("question_encoder")),
                   {"input_ids": x["input_ids"].numpy(), "attention_mask": x["attention_mask"].numpy()})
    v = _run_split(_session(pkg.graph_path("video_encoder")),
                   {"frames": x["frames"].numpy(), "frame_mask": x["frame_mask"].numpy()})
    head = _session(pkg.graph_path("answer_head"))
    feed = dict(zip(_names("question") + _names("video"), [*q, *(a[pair.numpy()] for a in v)]))
    logits, levels = head.run(None, {**feed, "answer_weights": weights.numpy()})
    comparisons = [compare_tensors(n, r.numpy(), g) for n, r, g in zip(_names("question"), q_ref, q)]
    comparisons += [compare_tensors(n, r.numpy(), g) for n, r, g in zip(_names("video"), v_ref, v)]
    comparisons += [compare_tensors(f"logits_{lvl}", lv_ref[i].numpy(), levels[i])
                    for i, lvl in enumerate(("entity", "action", "event"))]
    comparisons.append(compare_tensors("logits", logits_ref.numpy(), logits))
    result = evaluate(comparisons, "fp32")
    agree = float(top1_agreement_rows(logits_ref.numpy().astype(np.float64), logits.astype(np.float64)).mean())
    top1 = Check("logits", "top1[answer]", agree, ">=", 1.0, agree >= 1.0)
    return ParityResult(result.tolerance, result.comparisons, result.checks + (top1,))


def _source(checkpoint: Path, fmt: str) -> dict:
    digest = None
    if checkpoint.is_file():
        digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    return {"checkpoint": display_path(checkpoint), "format": fmt, "sha256": digest}


def export_qa_model(model: QAModel, out: str | Path, *, answers: Sequence[str] | None = None,
                    source: Mapping | None = None, max_words: int = 32, max_frames: int = 12,
                    opset: int = DEFAULT_OPSET, overwrite: bool = False, parity: bool = True,
                    inputs: Sequence[str | Path | None] = (),
                    progress: Progress = lambda _: None) -> tuple[QAManifest, ParityResult | None]:
    """An in-memory QA model -> QA package at ``out``, then parity.

    ``out`` follows :func:`hbi_runtime.outputs.prepare_output_dir` (kind ``QA package``; never one of ``inputs``, the
    files the model came from): the package is written and parity-checked in a temporary sibling folder that
    replaces ``out`` only when complete, so a failed export leaves a previous package as it was.

    Raises:
        UsageError: ``out`` may not be written (see above) or bad options. ExportError: the exporter failed.
    """
    out = prepare_output_dir(out, kind="QA package", inputs=inputs, overwrite=overwrite)
    answers = list(answers) if answers is not None else default_answers(model.qa_config.answers)
    model = model.eval()
    result = None
    with staged_output_dir(out) as tmp:
        write_qa_package(model, tmp, answers=answers, max_words=max_words, max_frames=max_frames, opset=opset,
                         source=dict(source or {"checkpoint": "(in memory)", "format": "hbi-toolkit-qa",
                                                "sha256": None}), progress=progress)
        if parity:
            progress("parity: comparing with PyTorch")
            result = compare_qa_package(tmp, model)
            update_qa_status(tmp, "verified" if result.ok else "failed", result.to_dict())
    return load_qa_package(out, allow_unverified=True).manifest, result


def export_qa_package(checkpoint: str | Path, out: str | Path, *, answers_file: str | Path | None = None,
                      answer_weights: Sequence[float] | None = None, overwrite: bool = False,
                      **options) -> tuple[QAManifest, object]:
    """QA checkpoint (official ``main_vqa.py`` or hbi-toolkit QA folder) -> QA package; see :func:`export_qa_model`.

    ``answers_file``: the ``train_ans2label.json`` of the model (``{"answer": id}``); default: the checkpoint
    folder's ``answers.json`` when present, else placeholder names ``answer_<id>``. ``out`` is checked before the
    checkpoint is loaded: never the checkpoint or the answers file (``hbi_runtime.outputs.prepare_output_dir``).
    """
    checkpoint = Path(checkpoint)
    inputs = [checkpoint, answers_file]
    prepare_output_dir(out, kind="QA package", inputs=inputs, overwrite=overwrite)  # before the (slow) load
    model, config, report = build_qa_model(checkpoint, answer_weights=answer_weights)
    if answers_file is None and checkpoint.is_dir() and (checkpoint / ANSWERS_FILE).is_file():
        answers_file = checkpoint / ANSWERS_FILE
    answers = read_answers(answers_file) if answers_file is not None else None
    return export_qa_model(model, out, answers=answers, source=_source(checkpoint, report.format), inputs=inputs,
                           overwrite=overwrite, **options)


__all__ = ["AnswerHead", "QAVideoEncoder", "QuestionEncoder", "compare_qa_package", "export_qa_model",
           "export_qa_package", "qa_graph_defs", "write_qa_package", "QA_MANIFEST"]
