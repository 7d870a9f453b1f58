"""Captioning and open-ended video QA in the torch-free runtime: the caption package and the decoder's graphs.

A caption package is a folder beside (or anywhere relative to) a retrieval package::

    manifest.json        kind ``caption`` (:class:`CaptionPackageManifest`, read by :func:`read_caption_manifest`),
                         manifest_sha256; a package written before package kinds has ``schema:
                         hbi.caption-package`` (schema version 1) instead and loads as it is
    caption_memory.onnx  video side (+ patch map) -> per-layer cross-attention keys / values + memory bias
    frame_patches.onnx   only for a decoder with a spatial memory: frames -> the pooled patch map
    decoder_init.onnx    prefix (no past) -> next-token log-probabilities + the self-attention cache
    decoder_step.onnx    one token + the cache -> log-probabilities + the longer cache

Its manifest names the retrieval package (``retrieval.path``, relative to the caption package, and
``retrieval.manifest_sha256``; a reference to another package, loaded and checked as one, not a file of this
package); the video side comes from *that* package's ``video_encoder.onnx``, so one exported backbone serves
retrieval, captioning and QA. A decoder with a spatial memory (``patch_grid``) also reads
where things are in each frame: ``frame_patches.onnx`` holds a frozen copy of the retrieval vision tower's blocks
but the last and maps the same preprocessed frames to pooled patch tokens (:class:`CaptionVideos`). Loading
refuses an edited manifest, a graph (or its listed ``external_data``) whose sha256 differs, external data a graph
reads that the manifest does not list, a symlink leading out of the folder (the checks every package kind shares,
:func:`hbi_runtime.package.read_package`), a retrieval package with another hash, and (unless allowed) a package
whose parity failed.

Token ids inside the graphs are *decoder indices*: ``decoder.vocab_ids[i]`` is the CLIP BPE id of index ``i``
(all 49408 when ``vocab_ids`` is null); CLIP ids outside the list map to the unknown index ``len(vocab_ids)``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from hbi_runtime.errors import BadInputError, MismatchError, UsageError
from hbi_runtime.inputs import read_json
from hbi_runtime.package import (FORMAT_VERSION, Package, PackageManifest, _Fields, _list_of, _object, _pos_int,
                                 _sha256, _str, manifest_field, read_package, register_kind)
from hbi_runtime.tasks.generate import Hypothesis, SearchOptions, generate
from hbi_runtime.tokenizer import EOT_ID, SOT_ID, VOCAB_SIZE

KIND = "caption"
SCHEMA = "hbi.caption-package"  # the marker of the manifest form before package kinds
SCHEMA_VERSION = FORMAT_VERSION
GRAPHS = ("caption_memory", "decoder_init", "decoder_step")
PATCH_GRAPH = "frame_patches"  # only in packages whose decoder has a spatial memory (decoder.patch_grid > 0)
SIDE_NAMES = tuple(f"video_{part}_{tag}" for tag in ("l0", "l1", "l2") for part in ("tokens", "weights", "mask"))
DEMO_CAPTION_PACKAGE = Path(__file__).resolve().parent.parent / "data" / "demo" / "caption"
_SPACE_BEFORE_PUNCT = re.compile(r" ([,.;:!?])")


def _hint(root: Path) -> str:
    return f"re-export it: `hbi-export caption-export --decoder RUN/decoder --out {root}`"


def _retrieval_ref(value: Any, path: str) -> dict:
    """The retrieval package a caption package reads video sides from: ``path`` (relative to the caption package)
    and ``manifest_sha256``. A reference, not a file of the package: :func:`load_caption` loads it as a package."""
    f = _Fields(value, path, ("path", "manifest_sha256"))
    return {"path": f.get("path", _str), "manifest_sha256": f.get("manifest_sha256", _sha256)}


def _of_manifest(name: str) -> property:
    return property(lambda self: getattr(self.manifest, name), doc=f"The manifest's ``{name}``.")


@dataclass(frozen=True)
class CaptionPackage(Package):
    """A loaded, checked caption package (:func:`read_caption_manifest`), with the manifest's facts the decoder
    runtime reads by name (``CaptionModel.manifest`` is this package)."""

    graphs = _of_manifest("graphs")
    decoder = _of_manifest("decoder")
    generation = _of_manifest("generation")
    status = _of_manifest("status")
    layers = _of_manifest("layers")
    patch_grid = _of_manifest("patch_grid")

    @property
    def sha256(self) -> str:
        """The package's identity: the ``manifest_sha256`` its manifest was written with."""
        return self.manifest_sha256

    @property
    def retrieval_path(self) -> str:
        return self.manifest.retrieval["path"]

    @property
    def retrieval_sha256(self) -> str:
        return self.manifest.retrieval["manifest_sha256"]


@dataclass(frozen=True, kw_only=True)
class CaptionPackageManifest(PackageManifest):
    """A caption package's manifest: the decoder's configuration, the retrieval package it reads video sides from,
    the tasks it serves, default generation settings and how it was trained (``parity``: per graph and whole
    decodes, ``{"graphs": ..., "decode": ...}``)."""

    KIND = KIND
    LABEL = "caption package"
    GRAPHS = GRAPHS
    PACKAGE = CaptionPackage

    decoder: dict = manifest_field(_object)  # hbi_export.tasks.decoder.DecoderConfig.to_dict()
    retrieval: dict = manifest_field(_retrieval_ref)
    tasks: tuple[str, ...] = manifest_field(_list_of(_str), default=("caption", "qa"))
    generation: dict = manifest_field(_object, default_factory=dict)
    training: dict = manifest_field(_object, default_factory=dict)

    @property
    def layers(self) -> int:
        return int(self.decoder["layers"])

    @property
    def patch_grid(self) -> int:
        return int(self.decoder.get("patch_grid") or 0)

    def required_graphs(self) -> tuple[str, ...]:
        return GRAPHS + ((PATCH_GRAPH,) if self.patch_grid else ())

    def check(self) -> None:
        for key in ("layers", "max_positions"):
            _pos_int(self.decoder.get(key), f"decoder.{key}")
        super().check()

    @classmethod
    def export_hint(cls, root: Path, source: Any = None) -> str:
        return _hint(root)


def read_caption_manifest(root: str | os.PathLike, *, verify_hashes: bool = True,
                          allow_unverified: bool = True) -> CaptionPackage:
    """Read and check a caption package (:func:`hbi_runtime.package.read_package` with ``kind="caption"``).

    Raises:
        BadInputError: missing folder / manifest / file, unreadable / oversized / too deeply nested manifest,
            malformed field, a symlink leading out of the package (exit 3).
        MismatchError: another kind of package, an edited manifest, a modified graph, external data the manifest
            does not list (exit 4).
        GateFailedError: parity failed or never ran, unless ``allow_unverified`` (the default: the status is
            :func:`load_caption`'s to judge).
    """
    return read_package(root, kind=KIND, allow_unverified=allow_unverified, verify_hashes=verify_hashes)


class _Steps:
    """The decoder graphs as a :class:`~hbi_runtime.tasks.generate.StepModel` over a batch of videos' memories.

    ``cache=True`` feeds each step the key/value cache (``decoder_step``); ``cache=False`` re-runs ``decoder_init``
    on the whole sequence every step (the reference the KV-cache path must equal, and the benchmark's baseline).
    """

    def __init__(self, owner: CaptionModel, cross: list[np.ndarray], bias: np.ndarray, cache: bool) -> None:
        self.o, self.cross, self.bias, self.cache = owner, cross, bias, cache
        self.tokens_run = 0  # decoder positions computed (for the benchmark)
        self._rows: np.ndarray | None = None  # the rows of the last memory feed, reused while they stay the same
        self._feed: dict[str, np.ndarray] = {}

    def _memory(self, items: np.ndarray) -> dict[str, np.ndarray]:
        """The cross keys / values and bias of ``items``' rows. Gathering them is the largest per-step cost once
        the memory is long (a spatial memory: 258 tokens), so the gather is reused while the rows do not change
        (greedy: until a video finishes) and skipped when the rows are all videos in order."""
        if self._rows is not None and np.array_equal(items, self._rows):
            return self._feed
        whole = len(items) == len(self.bias) and np.array_equal(items, np.arange(len(items)))
        feed = {"memory_bias": self.bias if whole else self.bias[items]}
        for name, arr in zip(self.o.cache_names("cross"), self.cross):
            feed[name] = arr if whole else arr[items]
        self._rows, self._feed = np.array(items, copy=True), feed
        return feed

    def _init(self, items: np.ndarray, seq: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        out = self.o.run("decoder_init", {"input_ids": seq, **self._memory(items)})
        self.tokens_run += seq.size
        return out["logprobs"], [out[n] for n in self.o.cache_names("present")]

    def init(self, items: np.ndarray, prefix: np.ndarray):
        logp, present = self._init(items, prefix)
        return logp, (items, prefix if not self.cache else present)

    def step(self, state, parents: np.ndarray, tokens: np.ndarray):
        items, kept = state[0][parents], state[1]
        if not self.cache:
            seq = np.concatenate([kept[parents], tokens[:, None]], axis=1)
            logp, _ = self._init(items, seq)
            return logp, (items, seq)
        feed = {"input_ids": tokens[:, None], **self._memory(items)}
        for name, arr in zip(self.o.cache_names("past"), kept):
            feed[name] = arr[parents]
        out = self.o.run("decoder_step", feed)
        self.tokens_run += len(tokens)
        return out["logprobs"], (items, [out[n] for n in self.o.cache_names("present")])


@dataclass(frozen=True)
class CaptionVideos:
    """What the decoder reads of some videos: the retrieval model's video side and, for a decoder with a spatial
    memory, the pooled patch map ``[n, T, cells, width]`` (``frame_patches``; None otherwise)."""

    side: Any  # hbi_runtime.model.VideoSide
    patches: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.side.n

    def take(self, rows) -> CaptionVideos:
        """The videos at ``rows`` (any index array; repeats allowed), in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        return CaptionVideos(self.side.select(rows), None if self.patches is None else self.patches[rows])


@dataclass(frozen=True)
class CaptionResult:
    path: str
    text: str
    tokens: tuple[int, ...]  # CLIP ids, without SOT / EOT
    logprob: float
    score: float
    question: str | None = None


class CaptionModel:
    """A loaded caption package plus its retrieval package (``load_caption``)."""

    def __init__(self, root: Path, manifest: CaptionPackage, retrieval, backend: str = "onnxruntime") -> None:
        self.root, self.manifest, self.retrieval = root, manifest, retrieval
        self.backend = backend
        self._backends: dict[str, Any] = {}
        ids = manifest.decoder.get("vocab_ids")
        self.vocab_ids = np.arange(VOCAB_SIZE) if ids is None else np.asarray(ids, dtype=np.int64)
        self.unk = len(self.vocab_ids)
        self.to_local = np.full(VOCAB_SIZE, self.unk, dtype=np.int64)
        self.to_local[self.vocab_ids] = np.arange(len(self.vocab_ids))
        self.max_positions = int(manifest.decoder["max_positions"])

    # ------------------------------------------------------------------ plumbing
    def cache_names(self, kind: str) -> tuple[str, ...]:
        return tuple(f"{kind}_{part}_{i}" for i in range(self.manifest.layers) for part in ("key", "value"))

    def run(self, graph: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from hbi_runtime.backends import create_backend

        if graph not in self._backends:
            spec = self.manifest.graphs[graph]
            self._backends[graph] = create_backend(self.backend, spec, self.root / spec.file).load()
        return self._backends[graph].infer(feed)

    @property
    def tokenizer(self):
        return self.retrieval.tokenizer

    def close(self) -> None:
        for b in self._backends.values():
            b.close()
        self._backends.clear()
        self.retrieval.close()

    def __enter__(self) -> CaptionModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ video inputs
    def videos(self, side, patches: np.ndarray | None = None) -> CaptionVideos:
        """A retrieval VideoSide (+ its patch map) as decoder input; refuses a missing or misshapen patch map."""
        if isinstance(side, CaptionVideos):
            side, patches = side.side, side.patches
        grid = self.manifest.patch_grid
        if grid and patches is None:
            raise UsageError("this caption package's decoder reads each frame's patch map as well as the video "
                             "side", hint="encode the videos with CaptionModel.encode_videos (or .patches(frames))")
        if patches is not None:
            want = tuple(self.manifest.graphs[PATCH_GRAPH].outputs[0].shape[1:]) if grid else None
            if want is None or patches.shape != (side.n, *want):
                raise BadInputError(f"patch map of shape {patches.shape}; this decoder takes "
                                    f"{('(n, ' + ', '.join(map(str, want)) + ')') if want else 'none'}")
        return CaptionVideos(side, patches)

    def patches(self, frames: np.ndarray) -> np.ndarray:
        """Preprocessed frames ``[B, T, 3, S, S]`` -> the patch map ``[B, T, cells, width]`` (``frame_patches``)."""
        if not self.manifest.patch_grid:
            raise UsageError("this caption package's decoder has no spatial memory (no frame_patches graph)")
        return self.run(PATCH_GRAPH, {"frames": np.ascontiguousarray(frames, dtype=np.float32)})["video_patches"]

    def encode_videos(self, paths: Sequence[str | os.PathLike], workers: int = 1, batch_size: int = 16):
        """Decode and encode files through the retrieval package (and ``frame_patches`` when the decoder reads
        patch maps, batch by batch on the same frames). Returns (CaptionVideos, decoded paths, errors)."""
        parts: list[np.ndarray] = []
        hook = (lambda frames, _mask: parts.append(self.patches(frames))) if self.manifest.patch_grid else None
        encoded = self.retrieval.encode_videos([str(p) for p in paths], batch_size=batch_size, workers=workers,
                                               frames_hook=hook)
        patches = None
        if hook is not None:
            patches = np.concatenate(parts) if parts else np.zeros(
                (0, *self.manifest.graphs[PATCH_GRAPH].outputs[0].shape[1:]), dtype=np.float32)
        return CaptionVideos(encoded.side, patches), list(encoded.paths), list(encoded.errors)

    # ------------------------------------------------------------------ decoding
    def memory(self, videos) -> tuple[list[np.ndarray], np.ndarray]:
        """CaptionVideos (or a VideoSide, for a decoder without spatial memory) -> the cross keys / values per
        layer and the memory bias."""
        videos = self.videos(videos)
        feed = {}
        for lv, tag in zip(videos.side.levels, ("l0", "l1", "l2")):
            feed[f"video_tokens_{tag}"] = np.ascontiguousarray(lv.tokens, dtype=np.float32)
            feed[f"video_weights_{tag}"] = np.ascontiguousarray(lv.weights, dtype=np.float32)
            feed[f"video_mask_{tag}"] = np.ascontiguousarray(lv.mask, dtype=np.float32)
        if videos.patches is not None:
            feed["video_patches"] = np.ascontiguousarray(videos.patches, dtype=np.float32)
        out = self.run("caption_memory", feed)
        return [out[n] for n in self.cache_names("cross")], out["memory_bias"]

    def prefix(self, question: str | None) -> list[int]:
        """Decoder indices of the prefix: SOT (captioning) or SOT + the question's tokens (QA)."""
        ids = [SOT_ID]
        if question is not None:
            q = question.strip()
            if not q:
                raise BadInputError("the question is empty", hint='ask e.g. --question "what happens first?"')
            if not q.endswith("?"):
                q += "?"
            ids += self.tokenizer.encode(q)
        local = self.to_local[np.asarray(ids)].tolist()
        if len(local) >= self.max_positions:
            raise BadInputError(f"the question has {len(local) - 1} tokens; the decoder takes at most "
                                f"{self.max_positions - 2}", hint="ask a shorter question")
        return local

    def generate_side(self, side, questions: Sequence[str | None] | None = None,
                      options: SearchOptions = SearchOptions(), cache: bool = True) -> tuple[list[Hypothesis], int]:
        """Decode every video of ``side`` (CaptionVideos, or a VideoSide for a decoder without spatial memory),
        optionally each with a question. Returns hypotheses (decoder indices) and the decoder positions
        computed."""
        side = self.videos(side)
        n = side.n
        if n == 0:
            return [], 0
        questions = list(questions) if questions is not None else [None] * n
        if len(questions) != n:
            raise UsageError(f"{len(questions)} questions for {n} videos")
        prefixes = [self.prefix(q) for q in questions]
        longest = max(len(p) for p in prefixes)
        if longest + options.max_length > self.max_positions:
            options = SearchOptions(options.beam_size, self.max_positions - longest, options.length_penalty,
                                    options.no_repeat_ngram)
        cross, bias = self.memory(side)
        steps = _Steps(self, cross, bias, cache)
        eot = int(self.to_local[EOT_ID])
        return generate(steps, prefixes, eot, options), steps.tokens_run

    def text(self, tokens: Iterable[int]) -> tuple[tuple[int, ...], str]:
        clip = tuple(int(self.vocab_ids[t]) for t in tokens if t != self.unk)
        return clip, _SPACE_BEFORE_PUNCT.sub(r"\1", self.tokenizer.decode(clip))

    def caption_side(self, side, paths: Sequence[str], questions: Sequence[str | None] | None = None,
                     options: SearchOptions = SearchOptions()) -> list[CaptionResult]:
        hyps, _ = self.generate_side(side, questions, options)
        out = []
        for i, (path, h) in enumerate(zip(paths, hyps)):
            clip, text = self.text(h.tokens)
            out.append(CaptionResult(str(path), text, clip, h.logprob, h.score,
                                     None if questions is None else questions[i]))
        return out

    def caption_videos(self, paths: Sequence[str | os.PathLike], questions: Sequence[str | None] | None = None,
                       options: SearchOptions = SearchOptions(), workers: int = 1, batch_size: int = 16):
        """Decode + encode the files (retrieval package), then caption / answer. Returns (results, errors)."""
        paths = [str(p) for p in paths]
        if questions is not None and len(questions) != len(paths):
            raise UsageError(f"{len(questions)} questions for {len(paths)} videos")
        videos, decoded, errors = self.encode_videos(paths, workers=workers, batch_size=batch_size)
        if questions is not None:
            by_path: dict[str, list[str | None]] = {}
            for p, q in zip(paths, questions):
                by_path.setdefault(p, []).append(q)
            questions = [by_path[p].pop(0) for p in decoded]
        results = self.caption_side(videos, [str(p) for p in decoded], questions, options)
        return results, errors


def load_caption(caption_dir: str | os.PathLike | None = None, *, retrieval: str | os.PathLike | None = None,
                 allow_unverified: bool = False, backend: str = "onnxruntime") -> CaptionModel:
    """Load a caption package (default: the demo's) and the retrieval package it references.

    Args:
        caption_dir: the caption package folder.
        retrieval: override the retrieval package path (default: the manifest's, relative to the package);
            its ``manifest_sha256`` must still match.
    Raises:
        BadInputError / MismatchError: see :func:`read_caption_manifest`; a retrieval package with another
        hash is a MismatchError. GateFailedError: parity failed or never ran, without ``allow_unverified``.
    """
    if caption_dir is None:
        if not (DEMO_CAPTION_PACKAGE / "manifest.json").is_file():
            raise UsageError("no caption package given", hint="pass --caption-model DIR")
        caption_dir = DEMO_CAPTION_PACKAGE
    package = read_caption_manifest(caption_dir, allow_unverified=allow_unverified)
    return open_caption(package, retrieval=retrieval, allow_unverified=allow_unverified, backend=backend)


def open_caption(package: CaptionPackage, *, retrieval: str | os.PathLike | None = None,
                 allow_unverified: bool = False, backend: str = "onnxruntime") -> CaptionModel:
    """The :class:`CaptionModel` of a loaded, checked caption package: its retrieval package is loaded (with all of
    its checks) and must have the ``manifest_sha256`` the caption package names (what
    :func:`hbi_runtime.package.load_any` returns for a caption package)."""
    from hbi_runtime.model import load

    root = package.dir
    rpath = Path(retrieval) if retrieval is not None else (root / package.retrieval_path)
    model = load(rpath, allow_unverified=allow_unverified)
    if model.package.manifest_sha256 != package.retrieval_sha256:
        model.close()
        raise MismatchError(f"caption package {root} was trained on the retrieval package with manifest_sha256 "
                            f"{package.retrieval_sha256[:12]}..., but {rpath} has "
                            f"{model.package.manifest_sha256[:12]}...",
                            hint="pass the retrieval package it was exported with (--retrieval-model), or "
                                 "retrain the decoder on this one")
    return CaptionModel(root, package, model, backend)


register_kind(CaptionPackageManifest, open_caption)


# ---------------------------------------------------------------------------------------------------------------
# evaluation against reference captions (``hbi-run eval-caption``)


def read_references(path: str | os.PathLike, videos: str | os.PathLike) -> dict[str, list[str]]:
    """``video path -> reference captions`` from a CSV (``video,caption`` rows) or JSON (``{video: [...]}``).

    Video names are resolved against ``videos`` (as written, else by file name). Raises BadInputError."""
    from hbi_runtime.inputs import read_captions

    path, root = Path(path), Path(videos)
    if not path.is_file():
        raise BadInputError(f"captions file {path} does not exist", hint="pass --captions FILE (CSV or JSON)")
    if not root.is_dir():
        raise BadInputError(f"videos folder {root} does not exist or is not a folder", hint="pass --videos DIR")
    pairs: list[tuple[str, str]] = []
    if path.suffix.lower() == ".json":
        data = read_json(path, what="captions file")
        if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                                 for v in data.values()):
            raise BadInputError(f"{path}: expected a JSON object {{video: [captions]}}")
        pairs = [(k, c) for k, v in data.items() for c in v]
    else:
        pairs = [(video, caption) for video, caption in read_captions(path)]
    if not pairs:
        raise BadInputError(f"captions file {path} has no references")
    refs: dict[str, list[str]] = {}
    for name, cap in pairs:
        p = root / name
        if not p.exists() and (root / Path(name).name).exists():
            p = root / Path(name).name
        refs.setdefault(str(p), []).append(cap)
    return refs


def evaluate_captions(model: CaptionModel, refs: dict[str, list[str]], options: SearchOptions = SearchOptions(),
                      workers: int = 1, progress=None) -> dict:
    """Caption every video of ``refs`` and score against its references (:mod:`hbi_runtime.tasks.metrics`)."""
    from hbi_runtime.tasks.metrics import caption_metrics

    paths = list(refs)
    if progress:
        progress(f"captioning {len(paths)} video(s)...")
    results, errors = model.caption_videos(paths, options=options, workers=workers)
    if not results:
        raise BadInputError(f"none of the {len(paths)} videos could be decoded",
                            hint=str(errors[0]) if errors else None)
    metrics = caption_metrics([r.text for r in results], [refs[r.path] for r in results])
    return {"videos": len(results), "metrics": metrics,
            "failed": [{"path": str(e.path), "error": e.reason} for e in errors],
            "captions": [{"path": r.path, "caption": r.text, "references": refs[r.path]} for r in results]}
