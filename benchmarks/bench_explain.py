"""``hbi-run explain``'s figures: time and accuracy of the interaction map, and its faithfulness (docs/explain.md).

::

    taskset -c 0 python benchmarks/bench_explain.py timing [--samples 2048] [--repeat 20]
    taskset -c 0 python benchmarks/bench_explain.py faithfulness --work DIR [--split validation] [--json out.json]
    taskset -c 0 python benchmarks/bench_explain.py faithfulness --samples-dir   # the 8 shipped samples (CI's set)

``timing``: the entity-level map of one pair (:func:`hbi_runtime.explain.explainer.level_map`: the estimate and the
players; decoding and encoding are the model's cost, reported apart), best of ``--repeat`` runs (one thread:
``taskset -c 0``), with its accuracy (median and largest standard error relative to the largest |interaction|):

* the demo model on its 8 sample videos and their canonical captions (14-20 text tokens x 8 frames);
* ViT-B/32 dimensions: 32 text tokens x 12 frames, D = 512, synthetic unit tokens whose cosines spread like CLIP's
  (about 0.2 +- 0.05), softmaxed weights. The time depends on the shape only; the accuracy on these tokens is a
  stand-in for a trained model's.

``faithfulness``: the deletion test of :mod:`hbi_runtime.explain.faithfulness` on the demo model, over a split of
the demo's held-out stream rendered by ``hbi_training.data.synthetic.generate_split`` (seed 0; the validation split
is the demo's 120 held-out videos; a folder that already holds the split is reused), or over the 8 shipped samples
(``--samples-dir``, the set CI runs). Prints the mean area under the deletion curve per order and mode.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import hbi_runtime
from hbi_runtime.explain.banzhaf import DEFAULT_SAMPLES, LevelGame, interaction_map
from hbi_runtime.explain.explainer import level_map

DEMO = Path(hbi_runtime.__file__).resolve().parent / "data" / "demo"


def _best_of(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _demo_pairs() -> list[tuple[str, str]]:
    queries = json.loads((DEMO / "queries.json").read_text())["queries"]
    return [(q["query"], str(DEMO / "samples" / q["expected"])) for q in queries if q["kind"] == "canonical"]


def timing(samples: int, repeat: int) -> dict:
    from hbi_runtime.video import VideoDecoder

    rows = []
    with hbi_runtime.load(DEMO / "package") as model, VideoDecoder(model.manifest.preprocessing, workers=1) as pool:
        for caption, path in _demo_pairs():
            t0 = time.perf_counter()
            decoded = pool.decode(path)
            t1 = time.perf_counter()
            text = model.encode_text([caption])
            video = model.encode_frames(np.asarray(decoded.frames)[None], np.asarray(decoded.mask)[None])
            t2 = time.perf_counter()
            words = model.tokenizer.words(caption)
            times = list(range(len(decoded.mask)))

            def run():
                return level_map(text, video, 0, words=words, max_words=model.manifest.max_words, times=times,
                                 samples=samples)

            seconds = _best_of(run, repeat)
            m = run()
            rows.append({"video": Path(path).name, "players": [m.text_players, m.video_players],
                         "map_ms": 1e3 * seconds, "decode_ms": 1e3 * (t1 - t0), "encode_ms": 1e3 * (t2 - t1),
                         **m.accuracy()})
    rng = np.random.default_rng(0)
    synthetic = []
    for trial in range(5):
        d, nt, nv = 512, 32, 12
        common = rng.normal(size=d)
        common /= np.linalg.norm(common)

        def tokens(n: int) -> np.ndarray:
            x = 0.45 * common + rng.normal(size=(n, d)) / np.sqrt(d)
            return x / np.linalg.norm(x, axis=1, keepdims=True)

        t, v = tokens(nt), tokens(nv)
        game = LevelGame(t @ v.T, np.exp(z := rng.normal(size=nt)) / np.exp(z).sum(),
                         np.exp(z2 := rng.normal(size=nv)) / np.exp(z2).sum())
        groups = np.eye(nt)
        seconds = _best_of(lambda: interaction_map(game, samples=samples, text_groups=groups), repeat)
        r = interaction_map(game, samples=samples, text_groups=groups)
        top = float(np.abs(r.values).max())
        synthetic.append({"trial": trial, "map_ms": 1e3 * seconds, "mean_cosine": float(game.sim.mean()),
                          "median_stderr_ratio": float(np.median(r.stderr) / top),
                          "max_stderr_ratio": float(r.stderr.max() / top)})
    return {"samples": samples, "repeat": repeat, "demo": rows, "vit_b32_dims": synthetic}


def timing_lines(r: dict) -> str:
    demo, syn = r["demo"], r["vit_b32_dims"]
    worst = max(demo, key=lambda x: x["map_ms"])
    lines = [f"samples {r['samples']} (best of {r['repeat']} runs, one thread)",
             f"demo model, 8 pairs (text x video players {min(d['players'][0] for d in demo)}-"
             f"{max(d['players'][0] for d in demo)} x 8): entity map {np.median([d['map_ms'] for d in demo]):.1f} ms "
             f"median, {worst['map_ms']:.1f} ms worst; median standard error / max |interaction|: median "
             f"{100 * np.median([d['median_stderr_ratio'] for d in demo]):.2f} %, worst "
             f"{100 * max(d['median_stderr_ratio'] for d in demo):.2f} %; largest standard error / max |interaction| "
             f"worst {100 * max(d['max_stderr_ratio'] for d in demo):.2f} %",
             f"  (decoding {np.median([d['decode_ms'] for d in demo]):.0f} ms, encoding "
             f"{np.median([d['encode_ms'] for d in demo]):.0f} ms per pair, median: the model's cost)",
             f"ViT-B/32 dimensions (32 x 12, D = 512, synthetic): entity map "
             f"{np.median([s['map_ms'] for s in syn]):.1f} ms median, {max(s['map_ms'] for s in syn):.1f} ms worst; "
             f"median standard error / max |interaction| worst {100 * max(s['median_stderr_ratio'] for s in syn):.2f} "
             f"%; largest worst {100 * max(s['max_stderr_ratio'] for s in syn):.2f} %"]
    return "\n".join(lines)


def split_pairs(work: Path, split: str, seed: int) -> list[tuple[str, str]]:
    from hbi_training.data.synthetic import generate_split

    paths = generate_split(work / split, split, seed, workers=1)
    manifest = json.loads(paths.manifest.read_text())
    return [(v["captions"][0], str(paths.root / v["file"])) for v in manifest["videos"] if v["split"] == "test"]


def faithfulness(pairs: list[tuple[str, str]], samples: int, random_orders: int) -> dict:
    from hbi_runtime.explain.faithfulness import deletion_test

    with hbi_runtime.load(DEMO / "package") as model:
        t0 = time.perf_counter()
        result = deletion_test(model, pairs, samples=samples, random_orders=random_orders)
        result["seconds"] = time.perf_counter() - t0
    return result


def faithfulness_lines(r: dict, what: str) -> str:
    lines = [f"deletion test, {what}: mean area under the deletion curve (lower: the order finds what the match "
             "rests on sooner), +- standard error over pairs"]
    for mode, s in r["modes"].items():
        areas = "  ".join(f"{o} {s['area'][o]:.4f}+-{s['area_stderr'][o]:.4f}" for o in s["area"])
        iv, vv = s["interaction_vs_heuristic"], s["value_vs_heuristic"]
        lines.append(f"  {mode} ({s['pairs']} pairs): {areas}")
        lines.append(f"    interaction - heuristic: {iv['mean']:+.4f}+-{iv['stderr']:.4f} (interaction lower on "
                     f"{100 * iv['below']:.0f} % of pairs); value - heuristic: {vv['mean']:+.4f}+-{vv['stderr']:.4f} "
                     f"(value lower on {100 * vv['below']:.0f} %)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("timing")
    t.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    t.add_argument("--repeat", type=int, default=20)
    t.add_argument("--json", type=Path, default=None)
    f = sub.add_parser("faithfulness")
    f.add_argument("--work", type=Path, help="folder for the rendered split (reused when already there)")
    f.add_argument("--split", default="validation", help="validation (the demo's 120 held-out videos) or test")
    f.add_argument("--samples-dir", action="store_true", help="the 8 shipped samples instead of a split")
    f.add_argument("--seed", type=int, default=0, help="the demo's seed (0)")
    f.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    f.add_argument("--random-orders", type=int, default=4)
    f.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.what == "timing":
        result = timing(args.samples, args.repeat)
        print(timing_lines(result))
    else:
        if args.samples_dir:
            pairs, what = _demo_pairs(), "the 8 shipped samples"
        else:
            if args.work is None:
                parser.error("--work DIR is needed to render the split (or pass --samples-dir)")
            pairs, what = split_pairs(args.work, args.split, args.seed), f"the {args.split} split"
        result = faithfulness(pairs, args.samples, args.random_orders)
        print(faithfulness_lines(result, f"{what} ({len(pairs)} pairs, {result['seconds']:.0f} s)"))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
