"""PyTorch vs ONNX Runtime parity of a model package (``hbi-export parity``, and the end of ``hbi-export onnx``).

Deterministic inputs with padding, short videos (1 and 2 valid frames) and texts down to start + end tokens; the
encoders run in ONNX Runtime at several batch sizes (1, 2, the rest) and the rows are compared with the PyTorch
reference encoded in one batch. Scores are compared end to end (ONNX sides into the ONNX interaction graph) per
level and combined: max abs / rel error and cosine, plus top-1 / top-5 agreement and Spearman rank correlation.
Tolerances come from ``hbi_runtime.compare.TOLERANCES`` (the table in docs/architecture.md). A failure marks the
package ``failed`` in its manifest; the runtime then refuses it unless told otherwise.

:func:`compare_engines` runs the same comparison with the graphs on another runtime backend (``"trt"``: the
TensorRT engines of ``hbi-export build-engine``; ``"onnxruntime"`` with ``providers="tensorrt"``: ONNX Runtime's
TensorRT execution provider), judged by the tolerance of the engine's precision: fp16 by feature cosine, top-5
agreement and Spearman rank correlation; int8 by top-1 agreement (the captions-based ΔR@1 gate lives in
calibration); fp32 as ONNX Runtime. Under these task-level metrics, every output tensor of every graph is compared
by NVIDIA's Polygraphy (:func:`polygraphy_tensor_checks`: its ``Comparator`` over ONNX Runtime on the CPU, our
backend, and for engines Polygraphy's own ``TrtRunner``), with the per-tensor tolerances of
:data:`TENSOR_TOLERANCE` (they gate fp32; for fp16 and int8 elementwise errors are reported, the task-level metrics
gate). Engine parity reports only: it never changes the package's status.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hbi_export.model import HBIModel
from hbi_runtime.backends import create_backend
from hbi_runtime.compare import TOLERANCES, Check, ParityResult, compare_scores, compare_tensors, evaluate
from hbi_runtime.errors import MismatchError, MissingDependencyError
from hbi_runtime.package import Package, load_package, update_status

BATCH_SPLITS = (1, 2)  # encoder batches 1, 2, then the rest: several batch sizes in one comparison
LEVEL_NAMES = ("entity", "action", "event")


def parity_inputs(model: HBIModel, max_words: int, max_frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Texts of lengths L .. 2 (start + end only) and videos of T .. 1 valid frames, padded as the loaders do.

    Every set holds captions and videos with fewer valid tokens than the first merge's cluster count, so that
    padded tokens become cluster centres: the case where an implementation that depends on tie order (TopK,
    ArgMin among equal padded scores) would differ (``hbi_export.onnx.functions``, "Tie order").
    """
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.text.vocab_size
    sot, eot = min(49406, vocab - 2), min(49407, vocab - 1)
    text_clusters = model.config.cluster_counts(max_words, "text")[0]
    video_clusters = model.config.cluster_counts(max_frames, "video")[0]
    lengths = sorted({max_words, max(max_words - 1, 2), max(max_words // 2, 2), min(5, max_words), 3, 2,
                      max(min(text_clusters - 1, max_words), 2)}, reverse=True)
    ids = torch.zeros(len(lengths), max_words, dtype=torch.int64)
    text_mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, sot, (n,), generator=g)
        ids[i, 0], ids[i, n - 1] = sot, eot
        text_mask[i, :n] = 1
    counts = sorted({max_frames, max(max_frames - 3, 1), max(max_frames // 2, 1), min(2, max_frames), 1,
                     max(min(video_clusters - 1, max_frames), 1)}, reverse=True)
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
        (t_ref, t_clusters), (v_ref, v_clusters) = (model.encode_text_clusters(x["input_ids"], x["attention_mask"]),
                                                    model.encode_video_clusters(x["frames"], x["frame_mask"]))
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
    scores, levels = interaction.run(None, _interaction_feed(pkg, names, text, video, weights))
    comparisons = []
    for kind, ref_side, clusters, got in (("text", t_ref, t_clusters, text), ("video", v_ref, v_clusters, video)):
        ref = [t.numpy() for lv in ref_side.levels for t in (lv.tokens, lv.weights, lv.mask)]
        outputs = pkg.graph(f"{kind}_encoder").outputs
        ref += [c.numpy() for c in clusters][:len(outputs) - len(ref)]  # the optional cluster outputs
        comparisons += [compare_tensors(o.name, r, g) for o, r, g in zip(outputs, ref, got)]
    comparisons += [compare_scores(f"score_{name}", levels_ref[i], levels[i]) for i, name in enumerate(LEVEL_NAMES)]
    combined_ref = np.tensordot(weights, levels_ref, axes=1)
    comparisons.append(compare_scores("scores", combined_ref, scores))
    return evaluate(comparisons, tolerance or _package_tolerance(pkg))


def _interaction_feed(pkg: Package, names: list[str], text: list, video: list, weights: np.ndarray) -> dict:
    """The interaction graph's feed from the encoders' outputs, by name (encoders may add cluster outputs)."""
    outs = {**{o.name: a for o, a in zip(pkg.graph("text_encoder").outputs, text)},
            **{o.name: a for o, a in zip(pkg.graph("video_encoder").outputs, video)}}
    return {n: weights if n == "level_weights" else outs[n] for n in names}


def _package_tolerance(pkg: Package) -> str:
    """The tolerance row a package is judged by: its loosest graph precision (an INT8 video encoder makes the
    whole package an INT8 package, judged by the INT8 row, not by the text encoder's fp32 row)."""
    precisions = {g.precision for g in pkg.manifest.graphs.values()}
    return next((p for p in ("int8", "fp16") if p in precisions), pkg.graph("text_encoder").precision)


# per-tensor comparison by Polygraphy: (atol, rtol, error statistic, gates); see the module docstring
TENSOR_TOLERANCE = {"fp32": (1e-4, 1e-4, "max", True), "fp16": (1e-2, 1e-2, "median", False),
                    "int8": (1e-1, 1e-1, "median", False)}


def backend_runner(backend: Any, name: str) -> Any:
    """One of our backends as a Polygraphy runner (``polygraphy.backend.base.BaseRunner``), so that Polygraphy's
    ``Comparator`` compares it tensor by tensor with its own runners."""
    import time
    from collections import OrderedDict

    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata
    from polygraphy.datatype import DataType

    class HbiBackendRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name)

        def activate_impl(self) -> None:
            backend.load()

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for spec in backend.input_specs:
                meta.add(spec.name, dtype=DataType.from_dtype(np.dtype(spec.dtype)),
                         shape=[None if isinstance(a, str) else a for a in spec.shape])
            return meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            out = backend.infer(dict(feed_dict))
            self.inference_time = time.perf_counter() - start
            return OrderedDict((spec.name, out[spec.name]) for spec in backend.output_specs)

        def deactivate_impl(self) -> None:
            backend.close()

    return HbiBackendRunner()


def _chunks(inputs, feed: dict[str, np.ndarray], limits: dict[str, int]) -> list[dict[str, np.ndarray]]:
    from hbi_runtime.backends.tensorrt import split_feed

    return [{k: np.ascontiguousarray(v) for k, v in sub.items()} for _, sub in split_feed(inputs, feed, limits)]


def graph_feeds(pkg: Package, x: dict[str, torch.Tensor], limits: dict[str, dict[str, int]] | None = None
                ) -> dict[str, list[dict[str, np.ndarray]]]:
    """The parity inputs as feeds of each graph (the interaction graph's from ONNX Runtime's encoders on the
    CPU), cut into chunks within ``limits`` (graph -> axis -> max, an engine profile's)."""
    limits = limits or {}
    text = {"input_ids": x["input_ids"].numpy(), "attention_mask": x["attention_mask"].numpy()}
    video = {"frames": x["frames"].numpy(), "frame_mask": x["frame_mask"].numpy()}
    text_out = _session(pkg.graph_path("text_encoder")).run(None, text)
    video_out = _session(pkg.graph_path("video_encoder")).run(None, video)
    names = [t.name for t in pkg.graph("interaction").inputs]
    weights = np.asarray(pkg.manifest.level_weights, np.float32)
    interaction = _interaction_feed(pkg, names, text_out, video_out, weights)
    feeds = {"text_encoder": text, "video_encoder": video, "interaction": interaction}
    return {g: _chunks(pkg.graph(g).inputs, f, limits.get(g, {})) for g, f in feeds.items()}


def polygraphy_tensor_checks(runners: dict[str, list[Any]], feeds: dict[str, list[dict[str, np.ndarray]]],
                             precision: str) -> list[Check]:
    """Polygraphy's ``Comparator`` per graph: the first runner (the reference) against each other one, every
    output tensor of every feed, with :data:`TENSOR_TOLERANCE` of ``precision``. One :class:`Check` per output and
    runner: the error statistic, Polygraphy's verdict (gating for fp32 only)."""
    from polygraphy import comparator as pc

    from hbi_export.trt.builder import polygraphy_log

    atol, rtol, stat, gates = TENSOR_TOLERANCE[precision]
    make = getattr(pc, "SimpleCompareFunc", None) or pc.CompareFunc.simple
    compare = make(atol=atol, rtol=rtol, check_error_stat=stat)
    metric = f"polygraphy {stat} abs" + ("" if gates else " (reported; not gated)")
    checks = []
    with polygraphy_log():
        for graph, graph_runners in runners.items():
            results = pc.Comparator.run(graph_runners, data_loader=feeds[graph])
            pairs = [(0, i) for i in range(1, len(graph_runners))]
            accuracy = pc.Comparator.compare_accuracy(results, comparisons=pairs, compare_func=compare)
            # one AccuracyResult (polygraphy < 0.53), or AccuracyResults: one per compare function
            accuracy = accuracy[0] if not hasattr(accuracy, "items") else accuracy
            for (_, got), iterations in accuracy.items():
                for out in iterations[0]:
                    values = [it[out] for it in iterations]
                    err = max(float(getattr(v, f"{stat}_absdiff") or 0.0) for v in values)
                    passed = all(bool(v) for v in values)
                    checks.append(Check(f"{graph}:{out} [{got}]", metric, err, "<=", atol, passed or not gates))
    return checks


def _polygraphy_available(required: bool) -> bool:
    try:
        import polygraphy  # noqa: F401
    except ImportError as exc:
        if required:
            from hbi_export.trt.builder import POLYGRAPHY_HINT

            raise MissingDependencyError(f"polygraphy is not installed ({exc}); engine parity compares tensors "
                                         "with it", hint=POLYGRAPHY_HINT) from exc
        return False
    return True


def engine_tensor_runners(pkg: Package, precision: str, backend: str, options: dict) -> tuple[dict, dict]:
    """Per graph: ONNX Runtime on the CPU (Polygraphy's ``OnnxrtRunner``, the reference), our ``backend``, and for
    TensorRT engines Polygraphy's ``TrtRunner`` on the engine file; and each graph's axis limits (the engine
    profile's max, since Polygraphy's runners do not split feeds)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    runners, limits = {}, {}
    engine_set = None
    if backend == "trt":
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from hbi_runtime.backends.tensorrt import axis_limits
        from hbi_runtime.engines import read_engine_set

        engine_set = read_engine_set(pkg.dir, precision)
    for graph in ("text_encoder", "video_encoder", "interaction"):
        path = pkg.graph_path(graph)
        graph_runners = [OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]), name="onnxruntime-cpu"),
                         backend_runner(create_backend(backend, pkg.graph(graph), path, **options), f"hbi-{backend}")]
        if engine_set is not None:
            entry = engine_set.entry_for(pkg.graph(graph).file)
            if entry is not None:  # after ours, which loads the plugin library that the engine may need
                graph_runners.append(TrtRunner(EngineFromBytes((pkg.dir / entry.file).read_bytes()),
                                               name="polygraphy-trt"))
                limits[graph] = axis_limits(pkg.graph(graph).inputs, entry.profiles[0])
        runners[graph] = graph_runners
    return runners, limits


def compare_engines(pkg_dir: str | Path, model: HBIModel, precision: str, *, seed: int = 0, backend: str = "trt",
                    progress: Callable[[str], None] = lambda _: None, tensors: bool | None = None,
                    **backend_options: Any) -> ParityResult:
    """PyTorch vs the package's engines of ``precision``, run by ``backend`` (see the module docstring).

    Args:
        backend: ``"trt"`` (the engines of ``hbi-export build-engine``), or ``"onnxruntime"`` with
            ``providers="tensorrt"`` (ONNX Runtime's TensorRT execution provider at ``precision``), or another
            backend standing in.
        tensors: add Polygraphy's per-tensor checks; default: always for ``trt`` (polygraphy required), for other
            backends when polygraphy is installed.
    Raises:
        UsageError / MissingDependencyError: no such backend here (TensorRT needs a GPU), no polygraphy.
        BadInputError, MismatchError: no engines of that precision, or engines built for another machine (with the
        rebuild command).
    """
    if precision not in TOLERANCES or precision == "custom_op":
        raise MismatchError(f"no tolerance for engine precision {precision!r}")
    pkg = load_package(pkg_dir, allow_unverified=True)
    options = dict(backend_options)
    if backend == "trt":
        options = {"precision": precision, **options}
    elif backend == "onnxruntime" and options.get("providers") == "tensorrt":
        options["tensorrt"] = {"precision": precision, **dict(options.get("tensorrt") or {})}
    tensors = _polygraphy_available(required=backend == "trt") if tensors is None else (
        tensors and _polygraphy_available(required=True))
    opened: list[BackendSession] = []

    def open_graph(name: str) -> BackendSession:
        opened.append(BackendSession(create_backend(backend, pkg.graph(name), pkg.graph_path(name), **options)))
        return opened[-1]

    try:
        result = compare_package(pkg, model, seed, open_graph=open_graph, tolerance=precision, progress=progress)
    finally:
        for session in opened:
            session.backend.close()
    if not tensors:
        return result
    from hbi_export.trt.builder import polygraphy_log

    progress("parity: per tensor (Polygraphy)")
    with polygraphy_log():  # Polygraphy logs to stdout by default, from its constructors on
        runners, limits = engine_tensor_runners(pkg, precision, backend, options)
        x = parity_inputs(model, pkg.manifest.max_words, pkg.manifest.max_frames, seed)
        checks = polygraphy_tensor_checks(runners, graph_feeds(pkg, x, limits), precision)
    return ParityResult(result.tolerance, result.comparisons, result.checks + tuple(checks))


def check_package(pkg_dir: str | Path, model: HBIModel, *, seed: int = 0,
                  progress: Callable[[str], None] = lambda _: None) -> ParityResult:
    """Compare, then record the verdict in the manifest (``verified`` / ``failed``) with the full report.
    ``progress`` hears each step before it starts (the verdict is the result's)."""
    pkg = load_package(pkg_dir, allow_unverified=True)
    result = compare_package(pkg, model, seed, progress=progress)
    update_status(pkg_dir, "verified" if result.ok else "failed", result.to_dict())
    return result
