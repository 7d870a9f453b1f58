"""The synthetic video-caption set: render it to real H.264 files with a manifest (and the CLI that does so).

Each video is 2-3 events in sequence on coloured shapes (``a red square moves left, then a blue circle
appears``): see :mod:`hbi_training.data.scenes` for events, timing and the held-out-combination split, and
:mod:`hbi_training.data.captions` for the grammar. :func:`generate` writes::

    OUT/
      .hbi-synthetic           marker: this folder is a generated set (and may be regenerated in place)
      videos/train_00000.mp4   H.264 (libx264, yuv420p), size x size, `fps` frames per second, `seconds` long
      videos/test_00000.mp4
      train.csv, test.csv      `video,caption`: one row per caption (train: canonical + paraphrases;
                               test: the canonical caption only); `video` is the mp4 path relative to OUT
      manifest.json            config, vocabulary, held-out triples, and per video: id, file, split,
                               captions (canonical first) and the scene (objects and events)

Everything follows from the seed: a second run gives identical captions and identical files (libx264 with
one thread is deterministic). The manifest is written last; a folder with a manifest of the same config is
reused, not rendered again.

Test videos are positions of the seed's held-out stream (:func:`hbi_training.data.scenes.plan_split`): ``test_i``
is position ``i``. ``test_start`` renders a later range (``test_00360`` ... with ``test_start=360``), and
:func:`generate_split` renders a named evaluation split (:data:`hbi_training.data.scenes.EVAL_SPLITS`) alone:
``validation`` is the demo's 120 test videos (used to choose among training variants), ``test`` 360 videos never
used to train or choose.

Standalone::

    python -m hbi_training.data.synthetic --out DIR --train 600 --test 120 --seed 0 [--max-frames 8 --image-size 32]
    python -m hbi_training.data.synthetic --out DIR --split test --seed 0 --no-decode

renders the set, then decodes it once through hbi_runtime.video into the frame caches the training data set
reads (``--no-decode`` to skip), with one progress line.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hbi_runtime.errors import BadInputError, HbiError, UsageError
from hbi_training.data.captions import paraphrases
from hbi_training.data.manifest import FORMAT, MANIFEST, SPLITS, VERSION, Progress, read_manifest
from hbi_training.data.render import encode_h264, render_frames
from hbi_training.data.scenes import (ACTIONS, COLOURS, EVAL_SPLITS, SHAPES, Scene, eval_split, plan_split,
                                      words)

MARKER = ".hbi-synthetic"
CAPTIONS_PER_VIDEO = 8  # train: the canonical caption and up to 7 paraphrases


@dataclass(frozen=True)
class SyntheticPaths:
    """Where a generated set lives. ``csv[split]`` is ``OUT/<split>.csv``."""

    root: Path
    manifest: Path
    videos: Path
    csv: dict[str, Path]
    reused: bool  # True when an identical set was already there and nothing was rendered


def _config(n_train: int, n_test: int, seed: int, size: int, fps: int, seconds: int, events: tuple[int, int],
            captions_per_video: int, test_start: int = 0) -> dict:
    config = {"version": VERSION, "n_train": n_train, "n_test": n_test, "seed": seed, "size": size, "fps": fps,
              "seconds": seconds, "events": list(events), "captions_per_video": captions_per_video}
    if test_start:  # only when set, so that the sets rendered before it existed keep their config (and are reused)
        config["test_start"] = test_start
    return config


def _check_args(size: int, fps: int, seconds: int, captions_per_video: int) -> None:
    if size < 16 or size % 2:
        raise UsageError(f"size must be even and >= 16 (yuv420p, visible shapes), got {size}")
    if fps < 1 or seconds < 1 or captions_per_video < 1:
        raise UsageError(f"fps, seconds and captions_per_video must be >= 1, got {fps}, {seconds}, "
                         f"{captions_per_video}")


def _paths(root: Path, reused: bool) -> SyntheticPaths:
    return SyntheticPaths(root=root, manifest=root / MANIFEST, videos=root / "videos",
                          csv={s: root / f"{s}.csv" for s in SPLITS}, reused=reused)


def _prepare_folder(root: Path, config: dict) -> bool:
    """True when ``root`` already holds this set; else make it ready for writing (refusing foreign folders)."""
    if (root / MANIFEST).is_file():
        try:
            manifest = read_manifest(root)
        except BadInputError:  # another version's or a damaged manifest: regenerate (if the folder is ours)
            manifest = None
        if manifest and manifest["config"] == config and all((root / v["file"]).is_file()
                                                             for v in manifest["videos"]):
            return True
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root} is a file, not a folder", hint="give a new or empty folder for --out")
    if root.exists() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise UsageError(f"{root} is not empty and was not made by this generator",
                         hint="give an empty or new folder for --out")
    for name in ("videos", "cache"):  # our own outputs of another config (or an interrupted run)
        shutil.rmtree(root / name, ignore_errors=True)
    for name in (MANIFEST, "train.csv", "test.csv"):
        (root / name).unlink(missing_ok=True)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(json.dumps(config) + "\n")
    return False


def generate(out_dir: str | os.PathLike, n_train: int, n_test: int, seed: int, size: int = 64, fps: int = 4,
             seconds: int = 8, *, events: tuple[int, int] = (2, 3), captions_per_video: int = CAPTIONS_PER_VIDEO,
             test_start: int = 0, workers: int | None = None, progress: Progress | None = None) -> SyntheticPaths:
    """Render the train and test videos of ``seed`` to ``out_dir`` with their captions and manifest.

    Args:
        out_dir: a new or empty folder, or one this function wrote before (regenerated unless identical).
        n_train, n_test: number of videos per split; test videos each contain a held-out triple.
        seed: everything (held-out triples, scenes, paraphrases) follows from it.
        size: rendered frame side in pixels (even); the model's image_size is chosen when decoding.
        fps, seconds: frame rate and length; keep ``seconds`` <= the model's max_frames so that the official
            1-fps sampling keeps every second (each event spans >= 2 s).
        events: least and most events per video.
        captions_per_video: canonical caption plus paraphrases per train video.
        test_start: the test videos are positions ``[test_start, test_start + n_test)`` of the seed's held-out
            stream, named ``test_<position>`` (the same videos and captions as in any set that holds them).
        workers: videos rendered at once (default: the CPU count).
        progress: called as ``progress("render", done, total)`` after each video.

    Returns:
        The :class:`SyntheticPaths` of the set.

    Raises:
        UsageError: bad sizes, too few seconds for the events, or a foreign non-empty ``out_dir``.
        EncodeError: ffmpeg failed. MissingDependencyError: imageio-ffmpeg is not installed.
    """
    _check_args(size, fps, seconds, captions_per_video)
    root = Path(out_dir)
    config = _config(n_train, n_test, seed, size, fps, seconds, tuple(events), captions_per_video, test_start)
    plan = plan_split(n_train, n_test, seed, seconds=seconds, events=tuple(events),
                      test_start=test_start)  # validates counts first
    if _prepare_folder(root, config):
        return _paths(root, reused=True)
    entries = _entries(plan.train, plan.test, seed, captions_per_video, test_start)
    jobs = [(scene, root / e["file"]) for scene, e in zip(plan.train + plan.test, entries)]
    done = 0
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        # ffmpeg runs in its own process and numpy releases the GIL, so threads keep the cores busy.
        for _ in pool.map(lambda job: encode_h264(render_frames(job[0], size, fps), job[1], fps), jobs):
            done += 1
            if progress:
                progress("render", done, len(jobs))
    _write_csvs(root, entries)
    test_words = words(c for e in entries if e["split"] == "test" for c in e["captions"])
    train_words = words(c for e in entries if e["split"] == "train" for c in e["captions"])
    manifest = {"format": FORMAT, "config": config,
                "vocabulary": {"colours": list(COLOURS), "shapes": list(SHAPES), "actions": list(ACTIONS)},
                "held_out": sorted(list(t) for t in plan.held_out),
                "test_words_missing_from_train": sorted(test_words - train_words), "videos": entries}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root / MANIFEST)  # last, and atomic: a manifest means a complete set
    return _paths(root, reused=False)


def generate_split(out_dir: str | os.PathLike, name: str, seed: int = 0, **options) -> SyntheticPaths:
    """Render the named evaluation split ``name`` of ``seed`` alone (no train videos) to ``out_dir``.

    ``validation``: held-out positions 0-119, the demo's 120 test videos (the same files and captions as the
    demo's set); ``test``: positions 360-719, never used to train or to choose
    (:data:`hbi_training.data.scenes.EVAL_SPLITS`). The videos are the set's ``test`` split. ``options``: those
    of :func:`generate` (``size``, ``fps``, ``seconds``, ``events``, ``workers``, ``progress``); the figures
    quoted in the docs use the defaults.

    Raises:
        UsageError: an unknown split name, or what :func:`generate` raises.
    """
    span = eval_split(name)
    return generate(out_dir, 0, span.size, seed, test_start=span.start, **options)


def _entries(train: tuple[Scene, ...], test: tuple[Scene, ...], seed: int, captions_per_video: int,
             test_start: int = 0) -> list[dict]:
    """Manifest entries, train then test; test videos keep only their canonical caption."""
    entries = []
    for split, scenes, n_captions, first in (("train", train, captions_per_video, 0), ("test", test, 1, test_start)):
        # child k of a SeedSequence does not depend on how many are spawned: position k gets the same stream
        seeds = np.random.SeedSequence([seed, SPLITS.index(split)]).spawn(first + len(scenes))[first:]
        for i, (scene, ss) in enumerate(zip(scenes, seeds), start=first):
            video_id = f"{split}_{i:05d}"
            entries.append({"id": video_id, "file": f"videos/{video_id}.mp4", "split": split,
                            "captions": paraphrases(scene, np.random.default_rng(ss), n_captions),
                            "scene": scene.to_dict()})
    return entries


def _write_csvs(root: Path, entries: list[dict]) -> None:
    for split in SPLITS:
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["video", "caption"])
            writer.writerows((e["file"], c) for e in entries if e["split"] == split for c in e["captions"])


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _progress_line(start: float) -> Progress:
    def report(stage: str, done: int, total: int) -> None:
        end = "\n" if done == total else ""
        print(f"\r{stage}: {done}/{total} videos, {time.monotonic() - start:.1f} s", end=end, file=sys.stderr,
              flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hbi_training.data.synthetic",
                                     description="Render the synthetic video-caption set (and its frame caches).")
    parser.add_argument("--out", required=True, help="output folder (new, empty, or a previous set)")
    parser.add_argument("--train", type=int, default=None, help="train videos (default 600)")
    parser.add_argument("--test", type=int, default=None, help="test videos (held-out combinations; default 120)")
    parser.add_argument("--split", choices=sorted(EVAL_SPLITS), default=None,
                        help="render only this named evaluation split (validation: held-out positions 0-119, the "
                             "demo's test videos; test: 360-719, never used to train or choose); not with "
                             "--train / --test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="rendered frame side in pixels")
    parser.add_argument("--fps", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--max-frames", type=int, default=8, help="T of the frame cache")
    parser.add_argument("--image-size", type=int, default=32, help="S of the frame cache")
    parser.add_argument("--no-decode", action="store_true", help="render only; build no frame cache")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        if args.split:
            if args.train is not None or args.test is not None:
                raise UsageError("--split renders one named split alone: leave out --train and --test")
            span = EVAL_SPLITS[args.split]
            n_train, n_test, test_start = 0, span.size, span.start
        else:
            n_train, n_test, test_start = (600 if args.train is None else args.train,
                                           120 if args.test is None else args.test, 0)
        paths = generate(args.out, n_train, n_test, args.seed, args.size, args.fps, args.seconds,
                         test_start=test_start, progress=_progress_line(start))
        rendered = time.monotonic()
        print(f"{'reused' if paths.reused else 'rendered'} {n_train + n_test} videos in {paths.root} "
              f"({rendered - start:.1f} s)", file=sys.stderr)
        if not args.no_decode:
            from hbi_training.data.cache import frame_cache

            for split in SPLITS:
                frame_cache(paths.root, split, max_frames=args.max_frames, image_size=args.image_size,
                            progress=_progress_line(time.monotonic()))
            print(f"decoded both splits in {time.monotonic() - rendered:.1f} s", file=sys.stderr)
    except HbiError as exc:
        print(f"error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""), file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
