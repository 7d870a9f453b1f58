"""1,000 x 1,000 similarity matrix (MSR-VTT 1k-A shape), all three levels: our scoring vs the official evaluation
style, on the same fp32 features.

Features: 1,000 texts of 24 positions (5-24 valid tokens, mean ~12 as MSR-VTT captions with SOT / EOT) and 1,000
videos of 12 frames (5% shorter, with padded frames), D = 512, random (seeded); the HBI heads (token-weight MLPs,
CTM token merges, TCBlocks) of a ViT-B/32-size reference model (``hbi_export.model``, seeded random weights, or
``--checkpoint``).

* **official style** (the baseline, implemented here after the official ``_run_on_single_gpu`` loop, see
  shared/reference/hbi-official.md section 1.7): the similarity in 32 x 32 chunks; for every (text chunk, video
  chunk) the per-modality work of *both* chunks (token weights, normalisation, CTM + TCBlock merges of the action
  and event levels) is redone, then the three level scores of the chunk from the full ``[32, 32, L, T]``
  similarity tensor. Eager PyTorch, ``torch.set_num_threads(threads)``.
* **ours**: each text's and each video's side once (the same PyTorch heads, one pass over all 1,000 of each),
  then :func:`hbi_runtime.scoring.score_levels` over a float32 :class:`~hbi_runtime.scoring.VideoStore`: valid
  query tokens only, one matrix product per chunk of videos (ONNX Runtime), segmented reductions.

Both produce ``[3, 1000, 1000]`` level scores; the benchmark reports their max abs difference per level (goal
<= 1e-5) and the speed-up (goal >= 20x). The baseline runs once (``--baseline-repeats``), ours ``--repeats`` times
(median).

Usage::

    python benchmarks/bench_similarity.py [--texts 1000] [--videos 1000] [--threads 2] [--repeats 3] \\
        [--out benchmarks/results/similarity.json]

Needs torch (the ``export`` extra) for the heads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from hbi_runtime.bench.records import envelope, write_record
from hbi_runtime.bench.timing import result_row

DEFAULT_OUT = Path("benchmarks/results/similarity.json")
L_TEXT, T_VIDEO, DIM, CHUNK = 24, 12, 512, 32


def make_features(n_texts: int, n_videos: int, seed: int = 0):
    """Text features (n, 24, 512) + mask, video features (n, 12, 512) + mask, float32 torch tensors."""
    import torch

    rng = np.random.default_rng(seed)
    t_len = np.clip(np.rint(rng.normal(12, 3.5, n_texts)), 5, L_TEXT).astype(int)
    t_mask = (np.arange(L_TEXT)[None, :] < t_len[:, None]).astype(np.float32)
    v_len = np.where(rng.random(n_videos) < 0.05, rng.integers(4, T_VIDEO, n_videos), T_VIDEO)
    v_mask = (np.arange(T_VIDEO)[None, :] < v_len[:, None]).astype(np.float32)
    t_feat = rng.standard_normal((n_texts, L_TEXT, DIM), dtype=np.float32)
    v_feat = rng.standard_normal((n_videos, T_VIDEO, DIM), dtype=np.float32)
    v_feat *= v_mask[:, :, None]  # padded frames of a short video: the official loader's zero frames
    return tuple(torch.from_numpy(a) for a in (t_feat, t_mask, v_feat, v_mask))


def build_reference(checkpoint: Path | None):
    import torch

    from hbi_export.model import HBIModel
    from hbi_export.model.config import HBIConfig

    if checkpoint is not None:
        from hbi_export.checkpoints.loader import build_model

        return build_model(checkpoint)[0]
    torch.manual_seed(0)
    return HBIModel(HBIConfig.vit_b_32()).eval()


def official_style(model, t_feat, t_mask, v_feat, v_mask, chunk: int = CHUNK):
    """The official evaluation loop: per (text chunk, video chunk), both chunks' per-modality work is redone."""
    import torch

    from hbi_export.model.sides import score_levels

    out = torch.zeros(3, t_feat.shape[0], v_feat.shape[0])
    with torch.inference_mode():
        for t0 in range(0, t_feat.shape[0], chunk):
            for v0 in range(0, v_feat.shape[0], chunk):
                text = model.text_side(t_feat[t0:t0 + chunk], t_mask[t0:t0 + chunk])
                video = model.video_side(v_feat[v0:v0 + chunk], v_mask[v0:v0 + chunk])
                out[:, t0:t0 + chunk, v0:v0 + chunk] = score_levels(text, video)  # (3, 32, 32)
    return out.numpy()


def _numpy_side(side, cls):
    from hbi_runtime.sides import SideLevel

    return cls(tuple(SideLevel(lv.tokens.numpy(), lv.weights.numpy(), lv.mask.numpy() > 0) for lv in side.levels))


def ours(model, t_feat, t_mask, v_feat, v_mask, threads: int) -> tuple[np.ndarray, dict]:
    """Sides once per text and per video, then the scoring engine: ``([3, Nt, Nv], seconds per part)``."""
    import torch

    from hbi_runtime.model import TextSide, VideoSide
    from hbi_runtime.scoring import VideoStore, score_levels

    start = time.perf_counter()
    with torch.inference_mode():
        text = _numpy_side(model.text_side(t_feat, t_mask), TextSide)
        video = _numpy_side(model.video_side(v_feat, v_mask), VideoSide)
    sides_s = time.perf_counter() - start
    store = VideoStore.from_sides(video, "float32")
    start = time.perf_counter()
    levels = score_levels(text, store, threads=threads)
    score_s = time.perf_counter() - start
    return np.stack([levels[name] for name in ("entity", "action", "event")]), {"sides_s": sides_s,
                                                                                "score_s": score_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--videos", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of our path (median)")
    parser.add_argument("--baseline-repeats", type=int, default=1, help="timed runs of the official-style path")
    parser.add_argument("--checkpoint", type=Path, help="reference weights (default: seeded random ViT-B/32)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    model = build_reference(args.checkpoint)
    feats = make_features(args.texts, args.videos)
    ours(model, *[f[:64] for f in feats], threads=args.threads)  # warm-up (sessions, allocator)

    our_runs = []
    for i in range(args.repeats):
        start = time.perf_counter()
        mine, parts = ours(model, *feats, threads=args.threads)
        our_runs.append({"total_s": time.perf_counter() - start, **parts})
        print(f"ours, run {i + 1}: {our_runs[-1]['total_s']:.2f} s (sides {parts['sides_s']:.2f} s, scoring "
              f"{parts['score_s']:.2f} s)", flush=True)
    base_runs = []
    for i in range(args.baseline_repeats):
        print(f"official style, run {i + 1} ({-(-args.texts // CHUNK)} x {-(-args.videos // CHUNK)} chunks) ...",
              flush=True)
        start = time.perf_counter()
        base = official_style(model, *feats)
        base_runs.append(time.perf_counter() - start)
        print(f"official style, run {i + 1}: {base_runs[-1]:.2f} s", flush=True)

    ours_s = statistics.median(r["total_s"] for r in our_runs)
    base_s = statistics.median(base_runs)
    diff = {name: float(np.abs(mine[i] - base[i]).max()) for i, name in enumerate(("entity", "action", "event"))}
    pairs = args.texts * args.videos
    speedup = base_s / ours_s
    load_end = os.getloadavg()
    print(f"\n{args.texts} x {args.videos} similarity, all three levels, {args.threads} threads:")
    print(f"  official style (32x32 chunks, per-modality work redone per chunk): {base_s:.2f} s")
    print(f"  ours (sides once + scoring engine): {ours_s:.2f} s median of {args.repeats} "
          f"(sides {statistics.median(r['sides_s'] for r in our_runs):.2f} s, scoring "
          f"{statistics.median(r['score_s'] for r in our_runs):.2f} s)")
    print(f"  speed-up {speedup:.1f}x (goal >= 20x); max |ours - official style| per level: "
          + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()) + " (goal <= 1e-5)")
    print(f"  load average {load_start[0]:.2f} -> {load_end[0]:.2f} ({os.cpu_count()} cores, shared)")

    results = [result_row("similarity", args.texts, "pairs/s", pairs, [r["total_s"] for r in our_runs],
                          runtime="ours", parts=our_runs),
               result_row("similarity", args.texts, "pairs/s", pairs, base_runs, runtime="official-style",
                          chunk=CHUNK)]
    record = envelope(benchmark="bench_similarity", model_sha256=None,
                      config={"texts": args.texts, "videos": args.videos, "text_length": L_TEXT,
                              "frames": T_VIDEO, "dim": DIM, "threads": args.threads, "repeats": args.repeats,
                              "baseline_repeats": args.baseline_repeats,
                              "checkpoint": str(args.checkpoint) if args.checkpoint else "random vit-b-32, seed 0"},
                      results=results, summary={"speedup": speedup, "max_abs_diff": diff, "ours_s": ours_s,
                                                "official_style_s": base_s},
                      load_average={"start": list(load_start), "end": list(load_end)})
    print(f"wrote {write_record(record, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
