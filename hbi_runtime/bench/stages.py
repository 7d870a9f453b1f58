"""The stages ``hbi-run bench`` measures, each on a loaded :class:`hbi_runtime.model.Model`.

=========  ================================================================  ==========
stage      one timed call                                                    throughput
=========  ================================================================  ==========
text       ``encode_text`` of ``batch`` captions (tokenizer included)        texts/s
video      ``encode_frames`` of ``batch`` videos of T preprocessed frames    frames/s
score      exact scores of ``batch`` queries x ``gallery`` stored videos     pairs/s
decode     decoding + preprocessing every file of a folder (worker pool)     videos/s
retrieve   one query end to end over an index: encode, score, top 10, why    queries/s
=========  ================================================================  ==========

Inputs are synthetic where the content does not change the cost (random frames, random stored sides of the
package's shapes, generated captions of MSR-VTT length); decoding and retrieval use real files and a real index.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from hbi_runtime.bench.timing import result_row, time_calls
from hbi_runtime.errors import BadInputError, UsageError

STAGES = ("text", "video", "score", "decode", "retrieve")
BATCHED_STAGES = ("text", "video", "score")
DEMO_SAMPLES = Path(__file__).resolve().parent.parent / "data" / "demo" / "samples"
_SUBJECTS = ("a man", "a woman", "a child", "a dog", "two people", "a chef", "a band", "a car", "a cat", "a team")
_ACTIONS = ("is cooking", "plays", "runs across", "talks about", "is driving", "dances in", "rides", "shows")
_OBJECTS = ("pasta in a small kitchen", "the guitar on a stage", "a green field", "a new phone to the camera",
            "down a busy street at night", "a red ball in the park", "a horse on the beach", "how to fix a bike")

Progress = Callable[[str], None]


@dataclass
class BenchConfig:
    """What to measure. ``stages`` is a subset of :data:`STAGES`; batch sizes apply to text, video and score."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)
    warmup: int = 2
    iters: int = 10
    stages: tuple[str, ...] = STAGES
    gallery: int = 10_000  # stored videos scored by the score stage
    threads: int | None = None  # scoring engine threads (encoders: the backend's own option)
    videos_dir: Path = DEMO_SAMPLES  # decode stage, and the index of the retrieve stage when none is given
    index_dir: Path | None = None
    workers: int = 2
    query: str = "a man is cooking pasta in a small kitchen"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                       for b in self.batch_sizes):
            raise UsageError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        for name in ("iters", "gallery", "workers"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise UsageError(f"warmup must be 0 or more, got {self.warmup}")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise UsageError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")


def captions(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct-ish captions of MSR-VTT length (8-12 words), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    return [f"{_SUBJECTS[rng.integers(len(_SUBJECTS))]} {_ACTIONS[rng.integers(len(_ACTIONS))]} "
            f"{_OBJECTS[rng.integers(len(_OBJECTS))]}" for _ in range(n)]


def random_video_side(model, n: int, seed: int = 0):
    """A video side of ``n`` rows with the package's shapes: L2-normalised random tokens, softmax weights, 10% of
    the videos with padded frames at the entity level (as short clips have)."""
    from hbi_runtime.model import VideoSide
    from hbi_runtime.sides import SideLevel

    rng = np.random.default_rng(seed)
    counts, dim = model.manifest.tokens_per_level["video"], model.manifest.embed_dim
    levels = []
    for level, length in enumerate(counts):
        tokens = rng.standard_normal((n, length, dim), dtype=np.float32)
        tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
        mask = np.ones((n, length), dtype=bool)
        if level == 0 and length > 1:
            short = rng.random(n) < 0.1
            mask[short] = np.arange(length)[None, :] < rng.integers(1, length, short.sum())[:, None]
            tokens *= mask[:, :, None]
        logits = np.where(mask, rng.standard_normal((n, length)), -np.inf)
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        levels.append(SideLevel(tokens, (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32), mask))
    return VideoSide(tuple(levels))


def random_frames(model, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``frames`` float32 ``[batch, T, 3, S, S]`` (standard normal, as normalised pixels are) and an all-ones mask."""
    pre = model.manifest.preprocessing
    rng = np.random.default_rng(seed)
    frames = rng.standard_normal((batch, pre.max_frames, 3, pre.image_size, pre.image_size), dtype=np.float32)
    return frames, np.ones((batch, pre.max_frames), dtype=np.int64)


def bench_text(model, config: BenchConfig, progress: Progress) -> list[dict]:
    rows = []
    for b in config.batch_sizes:
        texts = captions(b)
        progress(f"text encoder, batch {b}")
        seconds = time_calls(lambda: model.encode_text(texts, batch_size=b), warmup=config.warmup,
                             iters=config.iters)
        rows.append(result_row("text", b, "texts/s", b, seconds, text_length=model.manifest.max_words))
    return rows


def bench_video(model, config: BenchConfig, progress: Progress) -> list[dict]:
    rows = []
    frames_per_video = model.manifest.preprocessing.max_frames
    for b in config.batch_sizes:
        frames, mask = random_frames(model, b)
        progress(f"video encoder, batch {b} ({b * frames_per_video} frames)")
        seconds = time_calls(lambda: model.encode_frames(frames, mask, batch_size=b), warmup=config.warmup,
                             iters=config.iters)
        row = result_row("video", b, "frames/s", b * frames_per_video, seconds, frames_per_video=frames_per_video,
                         image_size=model.manifest.preprocessing.image_size)
        row["videos_per_s"] = round(row["throughput"] / frames_per_video, 4)
        rows.append(row)
    return rows


def bench_score(model, config: BenchConfig, progress: Progress) -> list[dict]:
    from hbi_runtime.scoring import DEFAULT_DTYPE, VideoStore, score

    store = VideoStore.from_sides(random_video_side(model, config.gallery), DEFAULT_DTYPE)
    weights = tuple(model.manifest.level_weights)
    rows = []
    for b in config.batch_sizes:
        text = model.encode_text(captions(b, seed=1))
        progress(f"scoring, {b} queries x {config.gallery} videos ({DEFAULT_DTYPE} storage)")
        seconds = time_calls(lambda: score(text, store, level_weights=weights, threads=config.threads),
                             warmup=config.warmup, iters=config.iters)
        rows.append(result_row("score", b, "pairs/s", b * config.gallery, seconds, gallery=config.gallery,
                               storage=DEFAULT_DTYPE, level_weights=list(weights), engine="onnxruntime-cpu"))
    return rows


def _video_files(folder: Path) -> list[str]:
    from hbi_runtime.index import scan

    files = [entry.path for entry in scan(folder).files]
    if not files:
        raise BadInputError(f"no video files in {folder}", hint="pass --videos DIR with a few video files")
    return files


def bench_decode(model, config: BenchConfig, progress: Progress) -> list[dict]:
    from hbi_runtime.video import VideoDecodeError, VideoDecoder

    files = _video_files(config.videos_dir)
    progress(f"decoding {len(files)} files from {config.videos_dir}, {config.workers} worker(s)")
    failed: list[str] = []

    def decode_all() -> None:
        for path, result in pool.decode_many(files):
            if isinstance(result, VideoDecodeError):
                failed.append(f"{path!r}: {result.reason}")

    with VideoDecoder(model.manifest.preprocessing, workers=config.workers) as pool:
        seconds = time_calls(decode_all, warmup=max(config.warmup, 1), iters=config.iters)  # warm: workers started
    if failed:
        raise BadInputError(f"{len(set(failed))} file(s) of {config.videos_dir} could not be decoded: "
                            f"{sorted(set(failed))[0]}", hint="benchmark decoding on files that decode")
    return [result_row("decode", len(files), "videos/s", len(files), seconds, workers=config.workers,
                       files=len(files), folder=str(config.videos_dir))]


def bench_retrieve(model, config: BenchConfig, progress: Progress) -> list[dict]:
    from hbi_runtime.index import Index, update_index
    from hbi_runtime.search import search

    with tempfile.TemporaryDirectory(prefix="hbi-bench-index-") as tmp:
        target = config.index_dir
        if target is None:
            progress(f"indexing {config.videos_dir} for the retrieve stage")
            target = Path(tmp) / "index"
            update_index(model, config.videos_dir, target, workers=config.workers)
        index = Index.open(target, model.package.manifest_sha256)
        progress(f"retrieve, 1 query over {len(index.rows)} indexed videos")
        seconds = time_calls(lambda: search(model, index, [config.query], top_k=10), warmup=config.warmup,
                             iters=config.iters)
    return [result_row("retrieve", 1, "queries/s", 1, seconds, indexed_videos=len(index.rows),
                       index=str(config.index_dir) if config.index_dir else "temporary index of --videos",
                       top_k=10)]


RUNNERS: dict[str, Callable] = {"text": bench_text, "video": bench_video, "score": bench_score,
                                "decode": bench_decode, "retrieve": bench_retrieve}


def run_stages(model, config: BenchConfig, progress: Progress = lambda message: None) -> list[dict]:
    """Every configured stage in :data:`STAGES` order; the result rows of all of them."""
    rows: list[dict] = []
    for stage in STAGES:
        if stage in config.stages:
            rows += RUNNERS[stage](model, config, progress)
    return rows


def select_stages(names: Sequence[str]) -> tuple[str, ...]:
    """Stage names from a user list (order and duplicates ignored); UsageError for an unknown one."""
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise UsageError(f"unknown stage(s) {unknown or names}; choose from {', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)
