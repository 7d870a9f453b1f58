"""A model package, ready to encode texts and videos and to score them: ``hbi_runtime.model.load(pkg_dir)``.

::

    from hbi_runtime.model import load

    with load("pkg/") as model:                      # checks manifest, hashes and parity status
        texts = model.encode_text(["a dog runs"])    # TextSide (numpy), texts.truncated: one flag per text
        videos = model.encode_frames(frames, mask)   # VideoSide; frames float32 [B, T, 3, S, S], mask int64 [B, T]
        side, paths, errors = model.encode_videos(["a.mp4", "b.mkv"])  # decoded in worker processes
        scores = model.score(texts, videos)          # [Bt, Bv] float32, level weights from the manifest

Each graph of the package (``text_encoder``, ``video_encoder``, ``interaction``) runs on one backend of
:data:`hbi_runtime.backends.BACKENDS`; a graph's backend is loaded on its first use, so a text-only query never
loads the video encoder, and :meth:`Model.close` (or the ``with`` block) releases them all. Large batches are split
(``batch_size``) and the outputs concatenated: a text's or a video's side is the same in any batch.

Sides are :class:`hbi_runtime.sides.Side` objects (per level the L2-normalised tokens, weights and bool mask),
so :func:`hbi_runtime.sides.score` scores them without any backend. Truncation of long texts is reported in
:attr:`TextSide.truncated` (one flag per text), not hidden: the caller decides whether to warn.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np

from hbi_runtime.backends import Backend, create_backend
from hbi_runtime.errors import BadInputError, MismatchError, UsageError
from hbi_runtime.package import GRAPH_NAMES, LEVELS, Package, load_package
from hbi_runtime.sides import DEFAULT_CHUNK_BYTES, Side, SideLevel, check_level_weights
from hbi_runtime.tokenizer import EOT_ID, SOT_ID, ClipTokenizer

if TYPE_CHECKING:
    from hbi_runtime.video import VideoDecoder

LEVEL_TAGS = ("l0", "l1", "l2")  # entity, action, event: the suffix of each side tensor's name
SIDE_PARTS = ("tokens", "weights", "mask")
CLUSTER_PARTS = ("clusters_l1", "clusters_l2", "clusters_ok")  # optional encoder outputs (newer packages)
TEXT_BATCH = 64  # texts per text-encoder call
VIDEO_BATCH = 16  # videos per video-encoder call (T frames each: the input alone is 7 MB per video at T=12, 224)
INTERACTION_CHUNK_BYTES = DEFAULT_CHUNK_BYTES  # bound on one interaction call's (Bt, Nt, Bv, Nv) float32 block


def side_tensor_names(kind: str) -> tuple[str, ...]:
    """The 9 tensors of a side in graph order (level-major): ``text_tokens_l0, text_weights_l0, text_mask_l0, ...``."""
    return tuple(f"{kind}_{part}_{tag}" for tag in LEVEL_TAGS for part in SIDE_PARTS)


def cluster_tensor_names(kind: str) -> tuple[str, ...]:
    """The optional cluster outputs of an encoder, after its side: ``text_clusters_l1, text_clusters_l2,
    text_clusters_ok``."""
    return tuple(f"{kind}_{part}" for part in CLUSTER_PARTS)


@dataclass(frozen=True)
class Clusters:
    """Which tokens each merged token of a side merged (the encoders' optional cluster outputs; packages exported
    before they existed have none).

    Attributes:
        l1: ``(n, N0)`` int64, the action-level cluster of each entity-level token (padding included).
        l2: ``(n, N1)`` int64, the event-level cluster of each action-level token.
        ok: ``(n, 2)`` bool, per merge, whether the graph confirmed that ``l1`` / ``l2`` reproduce the merged
            tokens the merge op computed (the assignment is computed beside the op, from the same tokens; max
            |merge(x, assignment) - merged| <= 1 % of max |merged|, rounding being ~1e-7 in fp32, ~1e-3 in fp16).
            Where not, :meth:`members` says None.
    """

    l1: np.ndarray
    l2: np.ndarray
    ok: np.ndarray

    def members(self, row: int, level: int, count: int, valid: np.ndarray | None = None) -> list[np.ndarray] | None:
        """Per cluster ``0 .. count-1`` of ``level`` (1 action, 2 event) of side row ``row``, the entity-level
        positions it merged (only those in ``valid``, the row's entity mask, when given); None when a merge's check
        failed: no cluster is ever shown with members that were guessed."""
        if level not in (1, 2):
            raise UsageError(f"clusters exist at levels 1 and 2, not {level!r}")
        if not np.all(self.ok[row, :level]):
            return None
        of_token = self.l1[row] if level == 1 else self.l2[row][self.l1[row]]  # (N0,) its cluster at `level`
        keep = np.ones(len(of_token), bool) if valid is None else np.asarray(valid, bool)
        return [np.flatnonzero((of_token == c) & keep) for c in range(count)]

    def select(self, rows) -> Clusters:
        return Clusters(self.l1[rows], self.l2[rows], self.ok[rows])


def _clusters(outputs: Mapping[str, np.ndarray], kind: str) -> Clusters | None:
    names = cluster_tensor_names(kind)
    if not all(n in outputs for n in names):
        return None
    l1, l2, ok = (outputs[n] for n in names)
    return Clusters(np.rint(l1).astype(np.int64), np.rint(l2).astype(np.int64), np.asarray(ok) > 0.5)


@dataclass(frozen=True)
class TextSide(Side):
    """A text side with one truncation flag per text (True: the text had more BPE tokens than fit and lost them),
    and, from packages with cluster outputs, its :class:`Clusters`.

    Raises:
        BadInputError: as :class:`~hbi_runtime.sides.Side`; ``truncated`` does not have one flag per text.
    """

    kind: str = "text"
    truncated: tuple[bool, ...] | None = None  # None: every text fit (a side built without a tokenizer)
    clusters: Clusters | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != "text":
            raise BadInputError(f"TextSide.kind | Received {self.kind!r}. Note: Expected 'text'")
        flags = (False,) * self.n if self.truncated is None else tuple(bool(t) for t in self.truncated)
        if len(flags) != self.n:
            raise BadInputError(f"TextSide.truncated | Received {len(flags)} flags. Note: Expected one per text "
                                f"({self.n})")
        object.__setattr__(self, "truncated", flags)

    def select(self, rows) -> TextSide:
        """The texts at ``rows`` (an index array, repeats allowed, or a slice), in that order, with their
        truncation flags and clusters."""
        picked = np.arange(self.n)[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        base = Side.select(self, picked)
        return TextSide(base.levels, truncated=tuple(self.truncated[int(r)] for r in picked),
                        clusters=None if self.clusters is None else self.clusters.select(picked))


@dataclass(frozen=True)
class VideoSide(Side):
    """A video side (the :class:`~hbi_runtime.sides.Side` of kind ``"video"``), and, from packages with cluster
    outputs, its :class:`Clusters`."""

    kind: str = "video"
    clusters: Clusters | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind != "video":
            raise BadInputError(f"VideoSide.kind | Received {self.kind!r}. Note: Expected 'video'")


class EncodedVideos(NamedTuple):
    """What :meth:`Model.encode_videos` returns: unpack as ``side, paths, errors = model.encode_videos(files)``."""

    side: VideoSide  # one row per decoded file, in input order
    paths: list  # the decoded files, as given, row by row
    errors: list  # one VideoDecodeError per file that could not be decoded (``.path``, ``.reason``), in order


def load(pkg_dir: str | os.PathLike, *, backend: str = "onnxruntime", allow_unverified: bool = False,
         **backend_options) -> Model:
    """Load a model package for inference.

    Args:
        pkg_dir: the package folder (``hbi-export onnx --out``).
        backend: a key of :data:`hbi_runtime.backends.BACKENDS`.
        allow_unverified: accept a package whose parity check failed or never ran.
        backend_options: options of that backend, for every graph (``onnxruntime``: ``providers``,
            ``intra_op_threads``, ``inter_op_threads``, ``optimization``, ``custom_ops``, ``spinning``; ``triton``: ``url``,
            ``model``, ``timeout_s``, ``retries``, ``retry_wait_s``, ``tolerance``).
    Returns:
        The :class:`Model`; its graphs load on first use.
    Raises:
        BadInputError, MismatchError, GateFailedError: the package (see :func:`hbi_runtime.package.load_package`).
        UsageError: unknown backend or option, or a bad option value.
    """
    return open_model(load_package(pkg_dir, allow_unverified=allow_unverified), backend=backend, **backend_options)


def open_model(package: Package, *, backend: str = "onnxruntime", allow_unverified: bool = False,
               **backend_options) -> Model:
    """The :class:`Model` of a loaded, checked retrieval package (what :func:`hbi_runtime.package.load_any` returns
    for one); ``backend`` and ``backend_options`` as :func:`load`."""
    backends = {name: create_backend(backend, package.graph(name), package.graph_path(name), **backend_options)
                for name in GRAPH_NAMES}
    return Model(package, backends)


class Model:
    """Encoders and scorer of one model package (build it with :func:`load`).

    Args:
        package: the loaded, checked package.
        backends: one backend per graph of :data:`~hbi_runtime.package.GRAPH_NAMES`, not necessarily loaded.
    Raises:
        MismatchError: the graphs' inputs / outputs are not the layout this runtime reads.
    """

    def __init__(self, package: Package, backends: Mapping[str, Backend]) -> None:
        self.package = package
        self._backends = dict(backends)
        missing = [g for g in GRAPH_NAMES if g not in self._backends]
        if missing:
            raise UsageError(f"Model needs a backend for every graph; missing {missing}")
        _check_layout(package)

    @property
    def backends(self) -> Mapping[str, Backend]:
        """The backend of each graph (read-only view; a graph's backend is loaded on its first use)."""
        return MappingProxyType(self._backends)

    @property
    def manifest(self):
        """The package's :class:`~hbi_runtime.package.Manifest`."""
        return self.package.manifest

    @cached_property
    def tokenizer(self) -> ClipTokenizer:
        """The package's CLIP tokenizer, ``max_words`` from the manifest (built on first use)."""
        spec = self.manifest.tokenizer
        if (spec.kind, spec.sot_id, spec.eot_id, spec.pad_id, spec.lowercase) != ("clip-bpe", SOT_ID, EOT_ID, 0,
                                                                                     True):
            raise MismatchError(f"{self.package.dir}: tokenizer {spec.kind!r} (sot {spec.sot_id}, eot "
                                f"{spec.eot_id}, pad {spec.pad_id}, lowercase {spec.lowercase}) is not the CLIP "
                                "tokenizer this runtime has")
        if len(spec.files) != 1:
            raise MismatchError(f"{self.package.dir}: the CLIP tokenizer takes one vocabulary file; the manifest "
                                f"lists {sorted(spec.files)}")
        return ClipTokenizer(self.package.dir / next(iter(spec.files)), max_words=spec.max_words)

    # ------------------------------------------------------------------ encoders

    def encode_text(self, texts: Sequence[str], batch_size: int = TEXT_BATCH) -> TextSide:
        """Tokenise and encode texts.

        Args:
            texts: the captions / queries (a list, not one string).
            batch_size: texts per text-encoder call.
        Returns:
            The :class:`TextSide` (``n = len(texts)``), with ``truncated`` flags.
        Raises:
            UsageError: ``texts`` is one string, or ``batch_size`` is not a positive integer.
            BadInputError: a text is empty once cleaned, or not a string.
        """
        _check_batch_size(batch_size)
        ids, mask, truncated = self.tokenizer(texts)  # (n, L) int64 each
        outputs = self._encode("text_encoder", {"input_ids": ids, "attention_mask": mask}, batch_size)
        return TextSide(_levels(outputs, "text"), truncated=tuple(truncated), clusters=_clusters(outputs, "text"))

    def encode_frames(self, frames: np.ndarray, frame_mask: np.ndarray, batch_size: int = VIDEO_BATCH) -> VideoSide:
        """Encode preprocessed videos.

        Args:
            frames: float32 ``[B, T, 3, S, S]``, preprocessed as ``manifest.preprocessing`` says; zero at padding.
            frame_mask: int64 ``[B, T]``, 1 for a real frame, 0 for padding.
            batch_size: videos per video-encoder call.
        Returns:
            The :class:`VideoSide` (``n = B``).
        Raises:
            BadInputError: wrong dtypes or shapes (``Input tensor: frames | Received incompatible shape: ...``),
                or a mask with values other than 0 and 1.
            UsageError: ``batch_size`` is not a positive integer.
        """
        _check_batch_size(batch_size)
        feed = {"frames": frames, "frame_mask": frame_mask}
        self._backends["video_encoder"].validate(feed)
        if not np.isin(frame_mask, (0, 1)).all():
            raise BadInputError("Input tensor: frame_mask | Received values other than 0 and 1. Note: Expected 1 "
                                "for a real frame, 0 for padding")
        outputs = self._encode("video_encoder", feed, batch_size)
        return VideoSide(_levels(outputs, "video"), clusters=_clusters(outputs, "video"))

    def encode_videos(self, paths: Iterable[str | bytes | os.PathLike], batch_size: int = VIDEO_BATCH, *,
                      workers: int = 2, timeout_s: float = 120.0,
                      video_decoder: VideoDecoder | None = None,
                      frames_hook: Callable[[np.ndarray, np.ndarray], None] | None = None) -> EncodedVideos:
        """Decode, preprocess (``manifest.preprocessing``) and encode video files; a bad file never stops the rest.

        Files decode in worker processes (:class:`hbi_runtime.video.VideoDecoder`) while earlier batches are
        encoded; frames are kept only until their batch has run.

        Args:
            paths: the video files.
            batch_size: videos per video-encoder call.
            workers: decoding processes (ignored when ``video_decoder`` is given).
            timeout_s: per-file decoding limit (ignored when ``video_decoder`` is given).
            video_decoder: an open ``VideoDecoder`` to reuse across calls (its preprocessing must be this package's);
                default: one opened and closed by this call.
            frames_hook: called with each encoded batch's ``(frames [B, T, 3, S, S], frame_mask [B, T])``, batches
                in row order (e.g. a caption model's patch map of the same frames).
        Returns:
            :class:`EncodedVideos`: the side of the decoded files (rows in input order), their paths, and one
            :class:`~hbi_runtime.video.VideoDecodeError` per file that could not be decoded.
        Raises:
            UsageError: ``batch_size`` is not a positive integer. MissingDependencyError: no video decoder
            installed. ConfigError: a preprocessing contract this runtime does not implement.
        """
        from hbi_runtime.video import VideoDecodeError, VideoDecoder  # decoding workers only where videos are read

        _check_batch_size(batch_size)
        own = video_decoder is None
        pool = (VideoDecoder(self.manifest.preprocessing, workers=workers, timeout_s=timeout_s) if own
                else video_decoder)
        decoded, errors, parts, pending = [], [], [], []
        try:
            for path, result in pool.decode_many(paths):
                if isinstance(result, VideoDecodeError):
                    errors.append(result)
                    continue
                decoded.append(path)
                pending.append(result)
                if len(pending) == batch_size:
                    parts.append(self._encode_decoded(pending, frames_hook))
                    pending = []
        finally:
            if own:
                pool.close()
        if pending:
            parts.append(self._encode_decoded(pending, frames_hook))
        outputs = (_empty_outputs(self._backends["video_encoder"]) if not parts
                   else {name: np.concatenate([p[name] for p in parts]) for name in parts[0]})
        return EncodedVideos(VideoSide(_levels(outputs, "video"), clusters=_clusters(outputs, "video")), decoded,
                             errors)

    # ------------------------------------------------------------------ scores

    def score(self, text_side: Side, video_side: Side,
              level_weights: Sequence[float] | None = None) -> np.ndarray:
        """Combined scores ``sum_l w_l * score_l`` through the interaction graph: ``[Bt, Bv]`` float32.

        Args:
            text_side: a side of kind ``"text"`` from this model (or of the same shapes).
            video_side: a side of kind ``"video"``.
            level_weights: one weight per level (entity, action, event); default: the manifest's.
        Raises:
            UsageError: the sides are not (text, video), or ``level_weights`` is not three finite numbers, not
                all zero.
            BadInputError: a side does not fit this package's token counts or width.
        """
        weights = self._level_weights(level_weights)
        return self._interact(text_side, video_side, weights)[0]

    def score_levels(self, text_side: Side, video_side: Side) -> np.ndarray:
        """Per-level scores (entity, action, event) through the interaction graph: ``[3, Bt, Bv]`` float32."""
        return self._interact(text_side, video_side, self._level_weights(None))[1]

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Release every loaded backend (idempotent)."""
        for backend in self._backends.values():
            backend.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        loaded = [name for name, b in self._backends.items() if b.is_active]
        kinds = sorted({b.name for b in self._backends.values()})
        return f"Model({str(self.package.dir)!r}, backend={', '.join(kinds)}, loaded={loaded})"

    # ------------------------------------------------------------------ helpers

    def _graph(self, name: str) -> Backend:
        return self._backends[name].load()

    def _encode(self, graph: str, feed: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
        """Run an encoder over row batches of ``feed`` and concatenate the outputs; no call for an empty batch."""
        n = len(next(iter(feed.values())))
        if n == 0:
            return _empty_outputs(self._backends[graph])
        backend = self._graph(graph)
        parts = [backend.infer({k: v[start:start + batch_size] for k, v in feed.items()})
                 for start in range(0, n, batch_size)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _encode_decoded(self, videos: Sequence, frames_hook=None) -> dict[str, np.ndarray]:
        """One video-encoder call on decoded videos (``DecodedVideo``: frames (T, 3, S, S), mask (T,))."""
        feed = {"frames": np.stack([v.frames for v in videos]),  # (B, T, 3, S, S)
                "frame_mask": np.stack([v.mask for v in videos])}  # (B, T)
        out = self._graph("video_encoder").infer(feed)
        if frames_hook is not None:
            frames_hook(feed["frames"], feed["frame_mask"])
        return out

    def _level_weights(self, level_weights: Sequence[float] | None) -> np.ndarray:
        if level_weights is None:
            return np.asarray(self.manifest.level_weights, dtype=np.float32)
        return check_level_weights(level_weights).astype(np.float32)

    def _interact(self, text: Side, video: Side, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(scores [Bt, Bv], level_scores [3, Bt, Bv]), in (text, video) chunks that bound the graph's memory."""
        if not (isinstance(text, Side) and isinstance(video, Side) and text.kind == "text"
                and video.kind == "video"):
            raise UsageError("score(text_side, video_side): arguments must be a text Side and a video Side, in "
                             "order")
        scores = np.zeros((text.n, video.n), dtype=np.float32)
        levels = np.zeros((len(LEVELS), text.n, video.n), dtype=np.float32)
        if text.n == 0 or video.n == 0:
            return scores, levels
        t_feed, v_feed = _side_feed(text), _side_feed(video)
        backend = self._graph("interaction")
        backend.validate({**t_feed, **v_feed, "level_weights": weights})  # whole sides: a misfit names no chunk
        text_chunk, video_chunk = _pair_chunks(text, video)
        for t0 in range(0, text.n, text_chunk):
            for v0 in range(0, video.n, video_chunk):
                rows, cols = slice(t0, t0 + text_chunk), slice(v0, v0 + video_chunk)
                feed = {**{k: a[rows] for k, a in t_feed.items()}, **{k: a[cols] for k, a in v_feed.items()},
                        "level_weights": weights}
                out = backend.infer(feed)
                scores[rows, cols] = out["scores"]
                levels[:, rows, cols] = out["level_scores"]
        return scores, levels


# ----------------------------------------------------------------------------------------------------------------
# Sides <-> graph tensors


def _check_layout(package: Package) -> None:
    """The graph signatures this module relies on (names only; dtypes and shapes are checked per feed). An encoder
    may add the cluster outputs after its side (packages exported since they exist)."""
    m = package.manifest
    text, video = side_tensor_names("text"), side_tensor_names("video")
    expected = {"text_encoder": (("input_ids", "attention_mask"), text),
                "video_encoder": (("frames", "frame_mask"), video),
                "interaction": ((*text, *video, "level_weights"), ("scores", "level_scores"))}
    optional = {"text_encoder": cluster_tensor_names("text"), "video_encoder": cluster_tensor_names("video")}
    for name, (inputs, outputs) in expected.items():
        graph = m.graphs[name]
        got = (tuple(t.name for t in graph.inputs), tuple(t.name for t in graph.outputs))
        if name in optional and got == (inputs, outputs + optional[name]):
            continue
        if got != (inputs, outputs):
            raise MismatchError(f"{package.dir}: graph {name!r} has inputs {list(got[0])} and outputs "
                                f"{list(got[1])}; this runtime reads inputs {list(inputs)} and outputs "
                                f"{list(outputs)}", hint="re-export the package with this toolkit version")


def _levels(outputs: Mapping[str, np.ndarray], kind: str) -> tuple[SideLevel, SideLevel, SideLevel]:
    names = side_tensor_names(kind)
    return tuple(SideLevel(*(outputs[n] for n in names[3 * i:3 * i + 3])) for i in range(len(LEVELS)))


def _side_feed(side: Side) -> dict[str, np.ndarray]:
    """A side as the interaction graph's float32 inputs (masks back to 0/1 floats; fp16 storage upcast)."""
    arrays = [a for lv in side.levels for a in (lv.tokens, lv.weights, lv.mask)]
    return {n: a.astype(np.float32, copy=False) for n, a in zip(side_tensor_names(side.kind), arrays)}


def _empty_outputs(backend: Backend) -> dict[str, np.ndarray]:
    """Zero-row outputs of the right shapes, for an empty batch (graphs are never run on 0 rows)."""
    return {t.name: np.zeros([0 if isinstance(d, str) else d for d in t.shape], dtype=t.dtype)
            for t in backend.output_specs}


def _pair_chunks(text: Side, video: Side) -> tuple[int, int]:
    """(texts, videos) per interaction call so that the largest level's similarity block fits the budget."""
    per_pair = max(t.length * v.length for t, v in zip(text.levels, video.levels)) * 4  # float32 bytes
    pairs = max(1, INTERACTION_CHUNK_BYTES // max(per_pair, 1))
    text_chunk = max(1, min(text.n, pairs))
    return text_chunk, max(1, min(video.n, pairs // text_chunk))


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive integer, got {batch_size!r}")


__all__ = ["Clusters", "EncodedVideos", "Model", "TextSide", "VideoSide", "cluster_tensor_names", "load",
           "open_model", "side_tensor_names"]
