"""``hbi-export onnx``'s library half: a checkpoint becomes a model package (docs/architecture.md).

The package is written into a temporary sibling folder, parity-checked there (its verdict recorded in the manifest),
and renamed into place at the end, so an interrupted or failed export never leaves a half-written package behind
and never loses the package it replaces (``hbi_runtime.fileio``'s output-folder rules).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Callable, Sequence

from hbi_export.checkpoints import build_model
from hbi_export.model import HBIModel
from hbi_export.onnx.export import DEFAULT_OPSET, MIN_OPSET, export_graph
from hbi_export.onnx.graphs import GraphDef, graph_defs
from hbi_export.onnx.precision import PRECISIONS, for_precision
from hbi_runtime import __version__
from hbi_runtime.errors import UsageError
from hbi_runtime.outputs import prepare_output_dir, staged_output_dir
from hbi_runtime.names import display_path
from hbi_runtime.package import (GraphSpec, Manifest, Preprocessing, TensorSpec, TokenizerSpec, hash_files,
                                 sha256_file, write_manifest)
from hbi_runtime.tokenizer import DEFAULT_VOCAB_PATH

TOKENIZER_DIR = "tokenizer"
Progress = Callable[[str], None]


def _check_options(model: HBIModel, max_words: int, max_frames: int, opset: int, precision: str) -> None:
    c = model.config
    if not 3 <= max_words <= c.text.context_length:
        raise UsageError(f"--max-words {max_words} is outside 3..{c.text.context_length} (the model's context length)")
    if not 1 <= max_frames <= c.frame_positions:
        raise UsageError(f"--max-frames {max_frames} is outside 1..{c.frame_positions} (the frame position table)")
    if opset < MIN_OPSET:
        raise UsageError(f"--opset {opset} is too old: LayerNormalization needs opset >= {MIN_OPSET}")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def _graph_spec(gdef: GraphDef, root: Path, opset: int, precision: str, custom_ops: Sequence[str]) -> GraphSpec:
    tensors = lambda defs: tuple(TensorSpec(t.name, t.dtype, t.shape) for t in defs)  # noqa: E731
    file = f"{gdef.name}.onnx"
    return GraphSpec(file, sha256_file(root / file), opset, precision, tensors(gdef.inputs), tensors(gdef.outputs),
                     tuple(custom_ops))


def _source(checkpoint: Path, fmt: str) -> dict:
    digest = None
    if checkpoint.is_file():
        h = hashlib.sha256()
        with open(checkpoint, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digest = h.hexdigest()
    return {"checkpoint": display_path(checkpoint), "format": fmt, "sha256": digest}


def write_package(model: HBIModel, root: Path, *, source: dict, max_words: int, max_frames: int,
                  opset: int = DEFAULT_OPSET, precision: str = "fp32", progress: Progress = lambda _: None) -> Manifest:
    """Export the three graphs of ``model`` into ``root`` (an existing empty folder) and write the manifest.

    The encoders are exported at ``precision``; the interaction graph is always fp32 (it is small, and its inputs,
    the sides, are fp32 in every package). The manifest's status is ``unverified`` until parity runs.
    """
    _check_options(model, max_words, max_frames, opset, precision)
    defs = graph_defs(model.config, max_words, max_frames)
    exported = {"text_encoder": for_precision(model, precision)}
    exported["video_encoder"] = exported["text_encoder"]
    exported["interaction"] = model
    graphs = {}
    for name, gdef in defs.items():
        graph_precision = "fp32" if name == "interaction" else precision
        progress(f"exporting {name} ({graph_precision})")  # then "checking {name}" (export_graph)
        proto = export_graph(gdef, exported[name], root / f"{name}.onnx", opset, progress=progress)
        custom = sorted({f"{n.domain}.{n.op_type}" for n in proto.graph.node if n.domain})
        graphs[name] = _graph_spec(gdef, root, opset, graph_precision, custom)
    (root / TOKENIZER_DIR).mkdir()
    vocab = f"{TOKENIZER_DIR}/{DEFAULT_VOCAB_PATH.name}"
    shutil.copyfile(DEFAULT_VOCAB_PATH, root / vocab)
    c = model.config
    manifest = Manifest(
        model_config=c.to_dict(), level_weights=c.level_weights, max_words=max_words, max_frames=max_frames,
        embed_dim=c.embed_dim, tokens_per_level={"text": [t.shape[1] for t in defs["text_encoder"].outputs[:9:3]],
                                                 "video": [t.shape[1] for t in defs["video_encoder"].outputs[:9:3]]},
        preprocessing=Preprocessing(max_frames=max_frames, image_size=c.vision.image_size),
        tokenizer=TokenizerSpec(max_words=max_words, files=hash_files(root, [vocab])),
        graphs=graphs, source=source, toolkit_version=__version__)
    write_manifest(root, manifest)
    return manifest


def export_package(checkpoint: str | Path, out: str | Path, *, level_weights: Sequence[float] | None = None,
                   max_words: int = 32, max_frames: int = 12, opset: int = DEFAULT_OPSET, precision: str = "fp32",
                   overwrite: bool = False, parity: bool = True,
                   progress: Progress = lambda _: None) -> tuple[Manifest, object]:
    """Checkpoint -> model package at ``out``; then parity (unless ``parity=False``).

    ``out`` follows the rules of :func:`hbi_runtime.outputs.prepare_output_dir` (kind ``model package``; never the
    checkpoint, never a folder of other files). The package is written and parity-checked in a temporary sibling
    folder, which replaces ``out`` only when complete: an export that fails leaves a previous package as it was.

    Returns:
        (manifest, parity result or None). The parity verdict is also in the manifest (status, report).

    Raises:
        CheckpointError: the checkpoint cannot be loaded. UsageError: bad options, or ``out`` may not be written
        (see above). ExportError: the exporter failed.
    """
    from hbi_export.onnx.parity import check_package  # parity needs onnxruntime; import it only here
    from hbi_runtime.package import load_package

    out, checkpoint = Path(out), Path(checkpoint)
    prepare_output_dir(out, kind="model package", inputs=[checkpoint], overwrite=overwrite)
    progress(f"loading checkpoint {display_path(checkpoint)}")
    model, report = build_model(checkpoint, level_weights=level_weights)
    with staged_output_dir(out) as tmp:
        write_package(model, tmp, source=_source(checkpoint, report.format), max_words=max_words,
                      max_frames=max_frames, opset=opset, precision=precision, progress=progress)
        result = check_package(tmp, model, progress=progress) if parity else None
    return load_package(out, allow_unverified=True).manifest, result
