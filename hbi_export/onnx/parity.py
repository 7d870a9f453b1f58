"""PyTorch vs ONNX Runtime parity of a model package (``hbi-export parity``, and the end of ``hbi-export onnx``).

Deterministic inputs with padding, short videos (1 and 2 valid frames) and texts down to start + end tokens; the
encoders run in ONNX Runtime at several batch sizes (1, 2, the rest) and the rows are compared with the PyTorch
reference encoded in one batch. Scores are compared end to end (ONNX sides into the ONNX interaction graph) per
level and combined: max abs / rel error and cosine, plus top-1 / top-5 agreement and Spearman rank correlation.
Tolerances come from ``hbi_runtime.compare.TOLERANCES`` (the table in docs/architecture.md). A failure marks the
package ``failed`` in its manifest; the runtime then refuses it unless told otherwise.

:func:`compare_engines` runs the same comparison with the graphs on another runtime backend (``"trt"``: the
TensorRT engines of ``hbi-export build-engine``), judged by the tolerance of the engine's precision: fp16 by feature
cosine, top-5 agreement and Spearman rank correlation; int8 by top-1 agreement (the captions-based R@1 gate lives in
calibration); fp32 as ONNX Runtime. Engine parity reports only: it never changes the package's status.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hbi_export.model import HBIModel
from hbi_runtime.backends import create_backend
from hbi_runtime.compare import TOLERANCES, ParityResult, compare_scores, compare_tensors, evaluate
from hbi_runtime.errors import MismatchError
from hbi_runtime.package import Package, load_package, update_status

BATCH_SPLITS = (1, 2)  # encoder batches 1, 2, then the rest: several batch sizes in one comparison
LEVEL_NAMES = ("entity", "action", "event")


def parity_inputs(model: HBIModel, max_words: int, max_frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Texts of lengths L .. 2 (start + end only) and videos of T .. 1 valid frames, padded as the loaders do."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text.vocab_size
    sot, eot = min(49406, vocab - 2), min(49407, vocab - 1)
    lengths = sorted({max_words, max(max_words - 1, 2), max(max_words // 2, 2), min(5, max_words), 3, 2},
                     reverse=True)
    ids = torch.zeros(len(lengths), max_words, dtype=torch.int64)
    text_mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, sot, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = sot, eot
        text_mask[i, :n] = 1
    counts = sorted({max_frames, max(max_frames - 3, 1), max(max_frames // 2, 1), min(2, max_frames), 1},
                    reverse=True)
    size = model.config.vision.image_size
    frames = torch.randn(len(counts), max_frames, 3, size, size, generator=g)
    frame_mask = torch.zeros(len(counts), max_frames, dtype=torch.int64)
    for i, n in enumerate(counts):
        frame_mask[i, :n] = 1
        frames[i, n:] = 0
    return {"input_ids": ids, "attention_mask": text_mask, "frames": frames, "frame_mask": frame_mask}


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_split(session, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run an encoder on row slices of sizes 1, 2, rest and concatenate the outputs."""
    n = len(next(iter(feeds.values())))
    edges = [0]
    for size in BATCH_SPLITS:
        edges.append(min(edges[-1] + size, n))
    edges.append(n)
    parts = [session.run(None, {k: v[a:b] for k, v in feeds.items()}) for a, b in zip(edges, edges[1:]) if b > a]
    return [np.concatenate(outs) for outs in zip(*parts)]


def _check_same_model(pkg: Package, model: HBIModel) -> None:
    stored = dict(pkg.manifest.model_config)
    ours = model.config.to_dict()
    stored.pop("level_weights", None), ours.pop("level_weights", None)
    if stored != ours:
        diff = sorted(k for k in set(stored) | set(ours) if stored.get(k) != ours.get(k))
        raise MismatchError(f"{pkg.dir} was exported from a different model (config differs in: {', '.join(diff)})",
                            hint="pass the checkpoint the package was exported from")


class BackendSession:
    """A runtime backend behind ONNX Runtime's ``run(None, feeds) -> [outputs]`` call (so parity runs it alike)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend.load()
        self._names = [t.name for t in backend.output_specs]

    def run(self, _output_names: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.backend.infer(feeds)
        return [out[n] for n in self._names]


def compare_package(pkg: Package, model: HBIModel, seed: int = 0, *,
                    open_graph: Callable[[str], Any] | None = None, tolerance: str | None = None,
                    progress: Callable[[str], None] = lambda _: None) -> ParityResult:
    """Run the comparisons (no manifest change). Tolerance: the encoders' precision unless ``tolerance`` names one.

    Args:
        open_graph: graph name -> an object with ONNX Runtime's ``run(None, feeds)``; default: a CPU session.
        progress: hears each step before it starts (the PyTorch reference, then each graph).
    """
    open_graph = open_graph or (lambda name: _session(pkg.graph_path(name)))
    _check_same_model(pkg, model)
    m = pkg.manifest
    x = parity_inputs(model, m.max_words, m.max_frames, seed)
    progress("parity: PyTorch reference")
    with torch.no_grad():
        t_ref, v_ref = model.encode_text(x["input_ids"], x["attention_mask"]), model.encode_video(
            x["frames"], x["frame_mask"])
        levels_ref = model.score_levels(t_ref, v_ref).numpy()
    progress("parity: text_encoder")
    text = _run_split(open_graph("text_encoder"),
                      {"input_ids": x["input_ids"].numpy(), "attention_mask": x["attention_mask"].numpy()})
    progress("parity: video_encoder")
    video = _run_split(open_graph("video_encoder"),
                       {"frames": x["frames"].numpy(), "frame_mask": x["frame_mask"].numpy()})
    progress("parity: interaction")
    interaction = open_graph("interaction")
    names = [t.name for t in pkg.graph("interaction").inputs]
    weights = np.asarray(m.level_weights, np.float32)
    scores, levels = interaction.run(None, dict(zip(names, [*text, *video, weights])))
    comparisons = []
    for kind, ref_side, got in (("text", t_ref, text), ("video", v_ref, video)):
        ref = [t.numpy() for lv in ref_side.levels for t in (lv.tokens, lv.weights, lv.mask)]
        outputs = pkg.graph(f"{kind}_encoder").outputs
        comparisons += [compare_tensors(o.name, r, g) for o, r, g in zip(outputs, ref, got)]
    comparisons += [compare_scores(f"score_{name}", levels_ref[i], levels[i]) for i, name in enumerate(LEVEL_NAMES)]
    combined_ref = np.tensordot(weights, levels_ref, axes=1)
    comparisons.append(compare_scores("scores", combined_ref, scores))
    return evaluate(comparisons, tolerance or _package_tolerance(pkg))


def _package_tolerance(pkg: Package) -> str:
    """The tolerance row a package is judged by: its loosest graph precision (an INT8 video encoder makes the
    whole package an INT8 package, judged by the INT8 row, not by the text encoder's fp32 row)."""
    precisions = {g.precision for g in pkg.manifest.graphs.values()}
    return next((p for p in ("int8", "fp16") if p in precisions), pkg.graph("text_encoder").precision)


def compare_engines(pkg_dir: str | Path, model: HBIModel, precision: str, *, seed: int = 0, backend: str = "trt",
                    progress: Callable[[str], None] = lambda _: None, **backend_options: Any) -> ParityResult:
    """PyTorch vs the package's engines of ``precision``, run by ``backend`` (see the module docstring).

    Raises:
        UsageError / MissingDependencyError: no such backend here (TensorRT needs a GPU). BadInputError,
        MismatchError: no engines of that precision, or engines built for another machine (with the rebuild
        command).
    """
    if precision not in TOLERANCES or precision == "custom_op":
        raise MismatchError(f"no tolerance for engine precision {precision!r}")
    pkg = load_package(pkg_dir, allow_unverified=True)
    options = {"precision": precision, **backend_options} if backend == "trt" else dict(backend_options)
    opened: list[BackendSession] = []

    def open_graph(name: str) -> BackendSession:
        opened.append(BackendSession(create_backend(backend, pkg.graph(name), pkg.graph_path(name), **options)))
        return opened[-1]

    try:
        return compare_package(pkg, model, seed, open_graph=open_graph, tolerance=precision, progress=progress)
    finally:
        for session in opened:
            session.backend.close()


def check_package(pkg_dir: str | Path, model: HBIModel, *, seed: int = 0,
                  progress: Callable[[str], None] = lambda _: None) -> ParityResult:
    """Compare, then record the verdict in the manifest (``verified`` / ``failed``) with the full report.
    ``progress`` hears each step before it starts (the verdict is the result's)."""
    pkg = load_package(pkg_dir, allow_unverified=True)
    result = compare_package(pkg, model, seed, progress=progress)
    update_status(pkg_dir, "verified" if result.ok else "failed", result.to_dict())
    return result
