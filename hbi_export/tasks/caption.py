"""Export a caption decoder (``hbi_export.tasks.decoder``) as a caption package beside a retrieval package.

Graphs (all fp32, opset 18, torch dynamo exporter, one dynamic batch axis each):

| graph | inputs | outputs |
|---|---|---|
| caption_memory | the 9 video side tensors ``[video_batch, N_l, ...]`` (+ ``video_patches [video_batch, T, cells, width]`` with a spatial memory) | ``cross_key_i`` / ``cross_value_i`` ``[video_batch, heads, M, head_dim]`` per layer, ``memory_bias [video_batch, 1, 1, M]`` |
| frame_patches (spatial memory only) | ``frames [video_batch, T, 3, S, S]`` (the retrieval preprocessing) | ``video_patches [video_batch, T, cells, width]`` |
| decoder_init | ``input_ids int64 [batch, prefix]`` (decoder indices), ``memory_bias``, the cross keys / values | ``logprobs [batch, V]`` (last position), ``present_key_i`` / ``present_value_i`` ``[batch, heads, prefix, head_dim]`` |
| decoder_step | ``input_ids int64 [batch, 1]``, ``past_key_i`` / ``past_value_i`` ``[batch, heads, past, head_dim]``, ``memory_bias``, the cross keys / values | ``logprobs [batch, V]``, ``present_key_i`` / ``present_value_i`` ``[batch, heads, past + 1, head_dim]`` |

The video side comes from the retrieval package's own ``video_encoder.onnx``, which the caption package
references by path and ``manifest_sha256`` (one exported backbone serves retrieval, captioning and QA).

The caption package's ``manifest.json`` (:class:`hbi_runtime.tasks.caption.CaptionPackageManifest`, the package
format every kind shares, written by :func:`write_caption_package`)::

    {"kind": "caption", "schema_version": 2, "toolkit_version", "created", "graphs": {name: GraphSpec},
     "files": {}, "status", "parity": {"graphs": {...}, "decode": {...}}, "source": null,
     "retrieval": {"path", "manifest_sha256"}, "decoder": DecoderConfig, "tasks": [...], "generation": {...},
     "training": {...}, "manifest_sha256"}
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
from torch import nn

from hbi_export.onnx.export import DEFAULT_OPSET, run_export
from hbi_export.onnx.graphs import GraphDef, TensorDef, side_defs
from hbi_export.tasks.decoder import CaptionDecoder, DecoderConfig
from hbi_runtime.errors import UsageError
from hbi_runtime.outputs import prepare_output_dir, staged_output_dir
from hbi_runtime.package import GraphSpec, TensorSpec, sha256_file
from hbi_runtime.tasks.caption import PATCH_GRAPH

def cache_names(config: DecoderConfig, kind: str) -> tuple[str, ...]:
    """``kind``: ``cross`` / ``past`` / ``present`` -> [key_0, value_0, key_1, ...] names."""
    return tuple(f"{kind}_{part}_{i}" for i in range(config.layers) for part in ("key", "value"))


def caption_graph_defs(config: DecoderConfig) -> dict[str, GraphDef]:
    """The graphs' specs (module docstring)."""
    h, dh, m, v = config.heads, config.head_dim, config.memory_tokens, config.vocab_size
    side = side_defs("video", config.tokens_per_level, config.embed_dim)
    extra = {}
    if config.patch_grid:
        t, vis = config.tokens_per_level[0], config.patch_vision
        patches = TensorDef("video_patches", "float32", ("video_batch", t, config.patch_cells, vis["width"]))
        side = side + (patches,)
        extra[PATCH_GRAPH] = GraphDef(
            PATCH_GRAPH, (TensorDef("frames", "float32", ("video_batch", t, 3, vis["image_size"],
                                                               vis["image_size"])),),
            (patches,), _Patches)
    cross = tuple(TensorDef(n, "float32", ("batch", h, m, dh)) for n in cache_names(config, "cross"))
    bias = TensorDef("memory_bias", "float32", ("batch", 1, 1, m))
    logp = TensorDef("logprobs", "float32", ("batch", v))
    return {
        "caption_memory": GraphDef(
            "caption_memory", side,
            tuple(TensorDef(t.name, t.dtype, ("video_batch", *t.shape[1:])) for t in cross)
            + (TensorDef("memory_bias", "float32", ("video_batch", 1, 1, m)),),
            _Memory),
        "decoder_init": GraphDef(
            "decoder_init", (TensorDef("input_ids", "int64", ("batch", "prefix")), bias) + cross,
            (logp,) + tuple(TensorDef(n, "float32", ("batch", h, "prefix", dh))
                            for n in cache_names(config, "present")),
            _Init),
        "decoder_step": GraphDef(
            "decoder_step",
            (TensorDef("input_ids", "int64", ("batch", 1)),)
            + tuple(TensorDef(n, "float32", ("batch", h, "past", dh)) for n in cache_names(config, "past"))
            + (bias,) + cross,
            (logp,) + tuple(TensorDef(n, "float32", ("batch", h, "present", dh))
                            for n in cache_names(config, "present")),
            _Step),
        **extra,
    }


class _Memory(nn.Module):
    fixed = 0  # inputs before the *varargs (torch.export wants their dynamic shapes as one nested tuple)

    def __init__(self, model: CaptionDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, *side):
        kv, bias = self.model.cross_cache(side)
        return (*kv, bias)


class _Patches(nn.Module):
    fixed = None  # no *varargs

    def __init__(self, model: CaptionDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, frames):
        return (self.model.patch_encoder(frames),)


class _Init(nn.Module):
    fixed = 2

    def __init__(self, model: CaptionDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, memory_bias, *cross):
        logp, present = self.model.decode(input_ids, None, list(cross), memory_bias)
        return (logp, *present)


class _Step(nn.Module):
    fixed = 1

    def __init__(self, model: CaptionDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, *rest):
        n = 2 * self.model.config.layers
        past, memory_bias, cross = list(rest[:n]), rest[n], list(rest[n + 1:])
        logp, present = self.model.decode(input_ids, past, cross, memory_bias)
        return (logp, *present)


def example_feed(config: DecoderConfig, model: CaptionDecoder, graph: str, batch: int = 3, prefix: int = 3,
                 past: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Deterministic inputs of one graph (also the export's example inputs and the parity fixtures)."""
    g = torch.Generator().manual_seed(seed)
    if graph == PATCH_GRAPH:
        s = config.patch_vision["image_size"]
        return (torch.randn(batch, config.tokens_per_level[0], 3, s, s, generator=g),)
    side = []
    for n in config.tokens_per_level:
        tokens = torch.nn.functional.normalize(torch.randn(batch, n, config.embed_dim, generator=g), dim=-1)
        side += [tokens, torch.rand(batch, n, generator=g).softmax(-1), torch.ones(batch, n)]
    side[2][-1, config.tokens_per_level[0] // 2:] = 0  # the last video has padded frames
    if config.patch_grid:
        side.append(torch.randn(batch, config.tokens_per_level[0], config.patch_cells, config.patch_vision["width"],
                                generator=g))
    if graph == "caption_memory":
        return tuple(side)
    with torch.no_grad():
        cross, bias = model.cross_cache(tuple(side))
    if graph == "decoder_init":
        ids = torch.randint(0, config.vocab_size, (batch, prefix), generator=g)
        return (ids, bias, *cross)
    with torch.no_grad():
        _, cache = model.decode(torch.randint(0, config.vocab_size, (batch, past), generator=g), None, cross, bias)
    ids = torch.randint(0, config.vocab_size, (batch, 1), generator=g)
    return (ids, *cache, bias, *cross)


def export_caption_graph(gdef: GraphDef, model: CaptionDecoder, path: str | Path,
                         opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export one decoder graph with its dynamic axes, check it, save it. Raises ExportError."""
    module = gdef.wrapper(model).eval()
    names = {d for spec in gdef.inputs for d in spec.shape if isinstance(d, str)}
    dims = {n: torch.export.Dim(n, min=2 if n in ("past", "prefix") else 1, max=model.config.max_positions)
            if n in ("past", "prefix") else torch.export.Dim(n, min=1) for n in names}
    dynamic = tuple({i: dims[d] for i, d in enumerate(spec.shape) if isinstance(d, str)} or None
                    for spec in gdef.inputs)
    if module.fixed is not None:
        dynamic = dynamic[:module.fixed] + (dynamic[module.fixed:],)
    inputs = example_feed(model.config, model, gdef.name)
    return run_export(gdef, module, inputs, dynamic, path, opset)


def graph_spec(gdef: GraphDef, root: Path, opset: int) -> GraphSpec:
    def spec(t: TensorDef) -> TensorSpec:
        return TensorSpec(t.name, t.dtype, tuple(t.shape))

    file = f"{gdef.name}.onnx"
    return GraphSpec(file=file, sha256=sha256_file(root / file), opset=opset, precision="fp32",
                     inputs=tuple(spec(t) for t in gdef.inputs), outputs=tuple(spec(t) for t in gdef.outputs))


def export_graphs(model: CaptionDecoder, root: Path, opset: int = DEFAULT_OPSET,
                  progress: Callable[[str], None] = lambda _: None) -> dict[str, GraphSpec]:
    """The graphs into ``root`` -> their specs."""
    model = model.eval()
    out = {}
    for name, gdef in caption_graph_defs(model.config).items():
        started = time.perf_counter()
        export_caption_graph(gdef, model, root / f"{name}.onnx", opset)
        out[name] = graph_spec(gdef, root, opset)
        progress(f"exported {name} ({os.path.getsize(root / out[name].file) / 2**10:.0f} KiB) in "
                 f"{time.perf_counter() - started:.1f} s")
    return out


# ---------------------------------------------------------------------------------------------------------------
# parity: PyTorch vs ONNX Runtime, graph by graph and as whole decodes


def graph_parity(model: CaptionDecoder, root: Path, specs: dict[str, GraphSpec]) -> dict:
    """Max abs difference of every graph's outputs (fixtures at batch 1 and 3) -> report with ``ok``."""
    import onnxruntime as ort

    report, ok = {}, True
    for name, gdef in caption_graph_defs(model.config).items():
        sess = ort.InferenceSession(str(root / specs[name].file), providers=["CPUExecutionProvider"])
        worst = 0.0
        for batch in (1, 3):
            feed = example_feed(model.config, model, name, batch=batch, seed=batch)
            with torch.no_grad():
                want = gdef.wrapper(model)(*feed)
            got = sess.run(None, {s.name: t.numpy() for s, t in zip(gdef.inputs, feed)})
            worst = max(worst, max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want)))
        report[name] = {"max_abs": worst}
        ok &= worst <= 1e-4
    report["tolerance"] = 1e-4
    report["ok"] = bool(ok)
    return report


def check_options(model: CaptionDecoder, opset: int) -> None:
    if opset < 17:
        raise UsageError(f"opset {opset} is too old for LayerNormalization; use >= 17")
    if not isinstance(model, CaptionDecoder):
        raise UsageError("export_graphs needs a CaptionDecoder")


# ---------------------------------------------------------------------------------------------------------------
# PyTorch decoding through the runtime's search (the reference the ONNX decodes must equal token for token)


class TorchSteps:
    """The PyTorch decoder as a :class:`hbi_runtime.tasks.generate.StepModel` (KV cache, or none)."""

    def __init__(self, model: CaptionDecoder, side: tuple[torch.Tensor, ...], cache: bool = True) -> None:
        self.model, self.cache = model.eval(), cache
        with torch.no_grad():
            self.cross, self.bias = model.cross_cache(side)

    def _run(self, items, ids, past):
        items_t = torch.from_numpy(np.asarray(items))
        with torch.no_grad():
            logp, present = self.model.decode(torch.from_numpy(np.asarray(ids)), past,
                                              [c[items_t] for c in self.cross], self.bias[items_t])
        return logp.numpy(), present

    def init(self, items, prefix):
        logp, present = self._run(items, prefix, None)
        return logp, (np.asarray(items), present if self.cache else np.asarray(prefix))

    def step(self, state, parents, tokens):
        items, kept = state[0][parents], state[1]
        if not self.cache:
            seq = np.concatenate([kept[parents], tokens[:, None]], axis=1)
            logp, _ = self._run(items, seq, None)
            return logp, (items, seq)
        idx = torch.from_numpy(np.asarray(parents))
        logp, present = self._run(items, tokens[:, None], [p[idx] for p in kept])
        return logp, (items, present)


def side_tensors(videos) -> tuple[torch.Tensor, ...]:
    """Runtime CaptionVideos (or a VideoSide) -> the decoder's torch inputs in graph order: the 9 side tensors,
    then the patch map if there is one."""
    from hbi_runtime.tasks.caption import CaptionVideos

    videos = videos if isinstance(videos, CaptionVideos) else CaptionVideos(videos)
    arrays = [a for lv in videos.side.levels for a in (lv.tokens, lv.weights, lv.mask)]
    if videos.patches is not None:
        arrays.append(videos.patches)
    return tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays)


def decode_parity(model: CaptionDecoder, caption_model, side, prefixes: list[list[int]] | None = None,
                  settings=((1, 0.0, 0), (3, 1.0, 0), (3, 1.0, 3))) -> dict:
    """Token sequences of PyTorch vs the ONNX graphs (through the runtime's search) for greedy and beam settings
    ``(beam_size, length_penalty, no_repeat_ngram)``; ``ok`` when every sequence is identical."""
    from hbi_runtime.tasks.caption import _Steps
    from hbi_runtime.tasks.generate import SearchOptions, generate

    side = caption_model.videos(side)
    n = side.n
    prefixes = prefixes or [[caption_model.to_local[49406]]] * n
    eot = int(caption_model.to_local[49407])
    cross, bias = caption_model.memory(side)
    torch_side = side_tensors(side)
    report, ok = [], True
    for beam, penalty, ngram in settings:
        o = SearchOptions(beam_size=beam, max_length=caption_model.max_positions - max(map(len, prefixes)),
                          length_penalty=penalty, no_repeat_ngram=ngram)
        want = generate(TorchSteps(model, torch_side), prefixes, eot, o)
        got = generate(_Steps(caption_model, cross, bias, cache=True), prefixes, eot, o)
        same = sum(a.tokens == b.tokens for a, b in zip(want, got))
        ok &= same == n
        report.append({"beam_size": beam, "length_penalty": penalty, "no_repeat_ngram": ngram,
                       "identical": same, "of": n})
    return {"ok": bool(ok), "settings": report}


# ---------------------------------------------------------------------------------------------------------------
# the caption package


def write_caption_package(model: CaptionDecoder, retrieval_pkg: str | Path, out: str | Path, *,
                          training: dict | None = None, opset: int = DEFAULT_OPSET, overwrite: bool = False,
                          fixture_videos: Sequence[str] | None = None, inputs: Sequence[str | Path | None] = (),
                          progress: Callable[[str], None] = lambda _: None) -> dict:
    """Export ``model`` as a caption package at ``out`` referencing ``retrieval_pkg`` (path stored relative to
    ``out``, and its ``manifest_sha256``); parity graph by graph and as whole decodes (greedy and beam) on the
    fixture videos (or random sides). Returns the manifest.

    ``out`` follows :func:`hbi_runtime.outputs.prepare_output_dir` (kind ``caption package``; never the retrieval
    package, a fixture video or one of ``inputs``, the files the decoder came from): the package is written and
    checked in a temporary sibling folder that replaces ``out`` only when complete, so a failed export leaves a
    previous package as it was.

    Raises:
        UsageError: bad options, ``out`` may not be written, the decoder does not fit the retrieval package.
    """
    import hbi_runtime

    check_options(model, opset)
    out, retrieval_pkg = Path(out), Path(retrieval_pkg)
    prepare_output_dir(out, kind="caption package", inputs=[retrieval_pkg, *inputs, *(fixture_videos or ())],
                       overwrite=overwrite)
    with staged_output_dir(out) as tmp, hbi_runtime.load(retrieval_pkg) as retrieval:
        body = _write_checked(model, retrieval, retrieval_pkg, out, tmp, training=training, opset=opset,
                              fixture_videos=fixture_videos, progress=progress)
    return body


def _write_checked(model: CaptionDecoder, retrieval, retrieval_pkg: Path, out: Path, tmp: Path, *,
                   training: dict | None, opset: int, fixture_videos: Sequence[str] | None,
                   progress: Callable[[str], None]) -> dict:
    """:func:`write_caption_package`'s work in the temporary folder ``tmp`` (the manifest's paths are ``out``'s)."""
    from dataclasses import replace

    from hbi_runtime.package import HASH_FIELD, write_manifest
    from hbi_runtime.tasks.caption import CaptionModel, CaptionPackageManifest, read_caption_manifest

    rsha = retrieval.package.manifest_sha256
    if tuple(retrieval.manifest.tokens_per_level["video"]) != tuple(model.config.tokens_per_level) or \
            retrieval.manifest.embed_dim != model.config.embed_dim:
        raise UsageError(f"the decoder expects video sides of {model.config.tokens_per_level} tokens x "
                         f"{model.config.embed_dim}; {retrieval_pkg} gives "
                         f"{retrieval.manifest.tokens_per_level['video']} x {retrieval.manifest.embed_dim}")
    specs = export_graphs(model, tmp, opset, progress)
    graph_report = graph_parity(model, tmp, specs)
    progress(f"graph parity: {'ok' if graph_report['ok'] else 'FAILED'} "
             f"(max abs {max(v['max_abs'] for k, v in graph_report.items() if isinstance(v, dict)):.1e})")
    manifest = CaptionPackageManifest(
        retrieval={"path": os.path.relpath(retrieval_pkg.resolve(), out.parent.resolve() / out.name),
                   "manifest_sha256": rsha},
        decoder=model.config.to_dict(), tasks=("caption", "qa"),
        generation={"beam_size": 1, "max_length": 40, "length_penalty": 1.0, "no_repeat_ngram": 0},
        graphs=specs, parity={"graphs": graph_report}, status="unverified", training=training or {})
    write_manifest(tmp, manifest)
    # decode parity: the same token sequences from PyTorch and from the ONNX graphs
    cm = CaptionModel(tmp, read_caption_manifest(tmp), retrieval)
    try:
        if fixture_videos:
            side = _fixture_side(model, cm, list(fixture_videos), graph_report)
        else:
            side = _random_side(model.config, 4)
        decode_report = decode_parity(model, cm, side)
    finally:
        for b in cm._backends.values():
            b.close()
    progress(f"decode parity: {'ok' if decode_report['ok'] else 'FAILED'} {decode_report['settings']}")
    manifest = replace(manifest, parity={"graphs": graph_report, "decode": decode_report},
                       status="verified" if graph_report["ok"] and decode_report["ok"] else "failed")
    write_manifest(tmp, manifest)
    return {**manifest.to_dict(), HASH_FIELD: manifest.sha256}


def _random_side(config: DecoderConfig, n: int):
    """Random decoder inputs of ``n`` videos: a VideoSide, or CaptionVideos with a patch map."""
    from hbi_runtime.model import VideoSide
    from hbi_runtime.sides import SideLevel
    from hbi_runtime.tasks.caption import CaptionVideos

    feed = example_feed(config, None, "caption_memory", batch=n, seed=7)
    levels = tuple(SideLevel(*(feed[3 * i + j].numpy() for j in range(3))) for i in range(3))
    if config.patch_grid:
        return CaptionVideos(VideoSide(levels), feed[9].numpy())
    return VideoSide(levels)


def _fixture_side(model: CaptionDecoder, cm, videos: list[str], graph_report: dict):
    """The decoder inputs of the fixture ``videos`` through the package (each decoded once). With a spatial
    memory, ``frame_patches.onnx`` is also held against the PyTorch PatchEncoder on those frames
    (``graph_report["frame_patches_videos"]``, part of ``graph_report["ok"]``)."""
    from hbi_runtime.tasks.caption import CaptionVideos

    batches: list[np.ndarray] = []
    hook = (lambda frames, _mask: batches.append(frames)) if model.config.patch_grid else None
    encoded = cm.retrieval.encode_videos(videos, workers=1, frames_hook=hook)
    if hook is None:
        return CaptionVideos(encoded.side)
    frames = np.concatenate(batches)
    got = cm.patches(frames)
    with torch.no_grad():
        want = model.patch_encoder(torch.from_numpy(frames)).numpy()
    graph_report["frame_patches_videos"] = {"max_abs": float(np.abs(got - want).max()), "videos": len(frames)}
    graph_report["ok"] &= graph_report["frame_patches_videos"]["max_abs"] <= 1e-4
    return CaptionVideos(encoded.side, got)
