"""``hbi-export calibrate``'s library half: package + the user's videos -> INT8 package, gated, with fallback.

1. load the source package (verified), find and split the videos (:mod:`.data`);
2. decode the held-out videos once and encode them with the source package (the reference);
3. collect activation ranges on the calibration videos, streamed (:func:`.quantize.calibrate`);
4. for each fallback step (:func:`.quantize.fallback_steps`): write the Q/DQ video encoder, encode the held-out
   videos with it through the runtime, measure and decide (:mod:`.gate`); stop at the first pass;
5. write the new package at ``out``: INT8 when a step passed; otherwise (unless ``strict``) a copy of the source
   package, fp32 / fp16 as it was, so that ``out`` always works. The report goes into the manifest's
   ``calibration`` field either way. ``out`` follows :func:`hbi_runtime.outputs.prepare_output_dir` (kind ``model
   package``; never the source package, the videos or the captions file) and is replaced only once the new
   package is complete.

File names are recorded (report, manifest) in :func:`hbi_runtime.names.display_path`'s printable, lossless form,
whatever bytes they hold.

What is quantized: the video encoder, where the time goes (every video of an index passes through it). The text
encoder (one short query at a time) and the interaction graph stay as they are in the source package.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from hbi_runtime import __version__
from hbi_runtime.errors import GateFailedError, UsageError
from hbi_runtime.outputs import prepare_output_dir, staged_output_dir
from hbi_runtime.names import display_path
from hbi_runtime.package import GRAPH_NAMES, load_package, write_derived_package

from hbi_calibration import data, gate, quantize

SCHEMA = "hbi.calibrate/1"
GRAPH = "video_encoder"
Progress = Callable[[str], None]


def _check_source(pkg_dir: Path):
    source = load_package(pkg_dir)
    int8 = [name for name, g in source.manifest.graphs.items() if g.precision == "int8"]
    if int8:
        raise UsageError(f"{pkg_dir} is already an INT8 package ({', '.join(int8)} int8)",
                         hint="calibrate the fp32 (or fp16) package it was made from")
    return source


def _model(source, video_encoder: Path | None = None):
    """The source package as a runtime Model; ``video_encoder`` swaps in another video-encoder file."""
    from hbi_runtime.backends import create_backend
    from hbi_runtime.model import Model

    paths = {name: source.graph_path(name) for name in GRAPH_NAMES}
    if video_encoder is not None:
        paths[GRAPH] = video_encoder
    return Model(source, {name: create_backend("onnxruntime", source.graph(name), path)
                          for name, path in paths.items()})


def calibrate_package(pkg_dir: str | os.PathLike, videos: str | os.PathLike, out: str | os.PathLike, *,
                      captions: str | os.PathLike | None = None, target: str = "ort-cpu", samples: int = 64,
                      method: str = "minmax", exclude_ops: Sequence[str] = (), exclude_nodes: Sequence[str] = (),
                      holdout: float = data.DEFAULT_HOLDOUT, criteria: gate.Criteria = gate.Criteria(),
                      strict: bool = False, overwrite: bool = False, workers: int = 2,
                      progress: Progress = lambda _: None) -> dict:
    """Calibrate, gate and write; returns the report (also stored in the new package's manifest).

    Raises:
        UsageError: bad options, ``out`` may not be written (see the module), the source is already INT8.
        BadInputError: no videos / no decodable videos / unknown captioned videos (exit 3).
        BadInputError, MismatchError, GateFailedError: the source package (as ``load_package``).
        GateFailedError: every attempt failed the gate and ``strict`` (nothing is written).
    """
    import onnx

    pkg_dir, out = Path(pkg_dir), Path(out)
    ops = quantize.check_options(target, method, exclude_ops)
    inputs = [pkg_dir, videos, captions]
    prepare_output_dir(out, kind="model package", inputs=inputs, overwrite=overwrite)
    source = _check_source(pkg_dir)
    split = data.plan_split(videos, captions=captions, samples=samples, holdout=holdout)
    progress(f"videos: {len(split.calibration)} to calibrate, {len(split.held_out)} held out for the gate"
             f"{' (with captions)' if split.captions else ''}")
    graph_path = source.graph_path(GRAPH)
    nodes = quantize.quantizable_nodes(onnx.load(str(graph_path), load_external_data=False), ops)
    user_excluded = quantize.resolve_excluded(nodes, exclude_nodes)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hbi-calibrate-") as tmp:
        work = Path(tmp)
        progress(f"decoding {len(split.held_out)} held-out videos")
        held = data.decode_to_memmap(split.held_out, source.manifest.preprocessing, work, workers=workers,
                                     progress=progress)
        with _model(source) as reference_model:
            caps = [list(split.captions.get(p, ())) for p in held.paths] if split.captions else None
            progress("encoding the held-out videos with the source package (the reference)")
            ref = gate.make_reference(reference_model, held.frames, held.mask, caps)
            reader = data.make_video_reader(split.calibration, source.manifest.preprocessing, workers=workers,
                                            progress=progress)
            cache = work / "ranges.json"
            progress(f"collecting activation ranges ({method}) on up to {len(split.calibration)} videos")
            quantize.calibrate(graph_path, reader, method, cache, work, ops=ops, progress=progress)
            attempts, chosen = _attempts(source, held, ref, reference_model, nodes, user_excluded, ops, cache, work,
                                         target=target, method=method, criteria=criteria, progress=progress)
        report = _report(source, split, held, reader, nodes, attempts, chosen, videos=videos, target=target,
                         method=method, ops=ops, criteria=criteria, captions=bool(split.captions),
                         seconds=time.monotonic() - started)
        if chosen is None and strict:
            raise GateFailedError(
                f"the INT8 video encoder failed the accuracy gate ({criteria.describe(ref.captions)}) in all "
                f"{len(attempts)} attempts; nothing written (--strict): " + "; ".join(attempts[-1]["checks"]),
                hint="keep using the source package, or calibrate with more representative --videos, another "
                     "--method, or --exclude-nodes")
        graphs = {GRAPH: (work / f"{GRAPH}.{chosen}.onnx", "int8")} if chosen is not None else {}
        progress(f"writing {display_path(out)}")
        # again: the calibration took minutes, and whatever `out` holds when the new package is swapped in goes
        prepare_output_dir(out, kind="model package", inputs=inputs, overwrite=overwrite)
        with staged_output_dir(out) as stage:  # (write_derived_package puts the package in place of the empty stage)
            written = write_derived_package(source, stage, graphs=graphs, status=source.manifest.status,
                                            calibration=report, overwrite=True)
    return {"schema": SCHEMA, **report, "package": display_path(out), "package_sha256": written.manifest_sha256}


def _attempts(source, held, ref, reference_model, nodes, user_excluded, ops, cache: Path, work: Path, *, target: str,
              method: str, criteria: gate.Criteria, progress: Progress) -> tuple[list[dict], int | None]:
    """Quantize and gate step by step; returns every attempt's record and the index of the one that passed."""
    attempts = []
    steps = quantize.fallback_steps(nodes, user_excluded)
    for i, step in enumerate(steps):
        path = work / f"{GRAPH}.{i}.onnx"
        progress(f"gate attempt {i + 1}/{len(steps)} ({step.name}): quantizing")
        summary = quantize.quantize(source.graph_path(GRAPH), path, target=target, method=method, cache_path=cache,
                                    excluded=step.excluded, ops=ops)
        progress(f"gate attempt {i + 1}/{len(steps)} ({step.name}): encoding the held-out videos")
        with _model(source, path) as model:
            test = model.encode_frames(held.frames, held.mask, batch_size=4)
            metrics = gate.measure(reference_model, ref, test)
        passed, checks = gate.decide(metrics, criteria)
        attempts.append({"step": step.name, "quantized_nodes": len(summary["quantized"]),
                         "float_nodes": summary["float"], "metrics": metrics, "checks": checks, "passed": passed})
        progress(f"gate attempt {i + 1}/{len(steps)} ({step.name}, {len(summary['quantized'])} nodes int8): "
                 f"{'PASS' if passed else 'FAIL'}; " + "; ".join(checks))
        if passed:
            return attempts, i
    return attempts, None


def _report(source, split, held, reader, nodes, attempts: list[dict], chosen: int | None, *, videos, target: str,
            method: str, ops, criteria: gate.Criteria, captions: bool, seconds: float) -> dict:
    """The report: what was done, on which data, every attempt, and the outcome (stored in the manifest)."""
    root = Path(videos)
    passed = chosen is not None
    return {
        "toolkit_version": __version__, "outcome": "int8" if passed else "fallback",
        "message": (f"INT8 video encoder kept (attempt {chosen + 1}: {attempts[chosen]['step']})" if passed else
                    f"every INT8 attempt failed the gate; this package keeps the source's "
                    f"{source.manifest.graphs[GRAPH].precision} video encoder"),
        "source": {"package": display_path(source.dir), "manifest_sha256": source.manifest_sha256},
        "graphs": [GRAPH], "scheme": quantize.TARGETS[target].to_dict(), "method": method,
        "quantized_op_types": list(ops), "quantizable_nodes": len(nodes),
        "kept_float": "LayerNormalization, Softmax, residual and bias Add, GELU, hbi custom ops (function bodies), "
                      "the text encoder and the interaction graph",
        "data": {**split.to_dict(root), "held_out_decoded": len(held.paths), "calibration_decoded": reader.used,
                 "decode_failures": [f"{display_path(os.path.relpath(e.path, root))}: {display_path(e.reason)}"
                                     for e in held.errors + reader.errors][:20]},
        "gate": {"criterion": criteria.describe(captions), "max_r1_drop": criteria.max_r1_drop,
                 "min_top1": criteria.min_top1, "passed": passed, "attempts": attempts},
        "seconds": round(seconds, 1),
    }
