"""Caption decoding speed with and without the KV cache, and caption quality of the demo decoder.

::

    python benchmarks/bench_caption.py --data DIR [--caption-model hbi_runtime/data/demo/caption] [--json out.json]

``DIR`` is the synthetic set the demo was trained on (``python -m hbi_training.demo --out D`` renders it to
``D/data``; ``python -m hbi_training.data.synthetic --out DIR --train 2400 --test 120 --seed 0`` renders the
same set). Every held-out (test) video is encoded once through the retrieval package; then

1. speed: generated tokens per second of the whole decode (memory graph + search), greedy and beam 3, with the
   KV cache (``decoder_step``) and without it (``decoder_init`` re-run on the whole sequence every step); median
   of ``--repeats`` runs, ONNX Runtime CPU (default threads);
2. quality: greedy captions of the held-out videos against their reference (canonical) captions: BLEU-4,
   ROUGE-L, CIDEr-D (hbi_runtime.tasks.metrics; METEOR is not available offline), and the attribute accuracy
   (hbi_training.caption.attribute_match: every colour, shape, motion and the order of events named).

The demo's 120 test videos are the *validation* split (variants were chosen on them); the quality figures the docs
quote come from the *test* split through ``benchmarks/eval_splits.py``, whose work folder ``DIR/test`` can also be
given here as ``--data``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import hbi_runtime
from hbi_runtime.tasks.caption import DEMO_CAPTION_PACKAGE, load_caption
from hbi_runtime.tasks.generate import SearchOptions
from hbi_runtime.tasks.metrics import caption_metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the synthetic set (its test split is used)")
    parser.add_argument("--caption-model", type=Path, default=DEMO_CAPTION_PACKAGE)
    parser.add_argument("--videos", type=int, default=0, help="first N test videos (0: all)")
    parser.add_argument("--speed-videos", type=int, default=32, help="videos per timed decode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from hbi_training.caption import attribute_match
    from hbi_training.data import read_manifest

    manifest = read_manifest(args.data)
    test = [v for v in manifest["videos"] if v["split"] == "test"]
    if args.videos:
        test = test[:args.videos]
    model = load_caption(args.caption_model)
    started = time.perf_counter()
    side, _, errors = model.encode_videos([str(args.data / v["file"]) for v in test], workers=1)
    if errors:
        raise SystemExit(f"could not decode {errors[0]}")
    encode_s = time.perf_counter() - started
    report: dict = {"caption_package": str(args.caption_model), "videos": len(test),
                    "caption_package_sha256": model.manifest.sha256,
                    "model_sha256": model.retrieval.package.manifest_sha256,
                    "encode_seconds": encode_s, "speed": []}

    # ---------------------------------------------------------------- speed
    n = min(args.speed_videos, len(test))
    sub = side.take(np.arange(n))
    for beam in (1, 3):
        o = SearchOptions(beam_size=beam, max_length=args.max_length)
        row = {"beam_size": beam, "videos": n}
        for cache in (True, False):
            times, tokens = [], 0
            for _ in range(args.repeats + 1):  # the first run warms the sessions up
                t0 = time.perf_counter()
                hyps, positions = model.generate_side(sub, options=o, cache=cache)
                times.append(time.perf_counter() - t0)
                tokens = sum(len(h.tokens) + h.ended for h in hyps)
            sec = statistics.median(times[1:])
            key = "cache" if cache else "no_cache"
            row[key] = {"seconds": sec, "generated_tokens": tokens, "tokens_per_s": tokens / sec,
                        "decoder_positions": positions}
        row["speedup"] = row["cache"]["tokens_per_s"] / row["no_cache"]["tokens_per_s"]
        report["speed"].append(row)
        print(f"beam {beam}: {row['cache']['tokens_per_s']:.0f} tokens/s with the KV cache, "
              f"{row['no_cache']['tokens_per_s']:.0f} without ({row['speedup']:.2f}x); {n} videos", flush=True)

    # ---------------------------------------------------------------- quality
    results = model.caption_side(side, [v["file"] for v in test], options=SearchOptions(max_length=args.max_length))
    refs = [[v["captions"][0]] for v in test]
    metrics = caption_metrics([r.text for r in results], refs)
    hits = [attribute_match(r.text, v["scene"], manifest["vocabulary"]) for r, v in zip(results, test)]
    report["metrics"] = metrics
    report["attribute_accuracy"] = sum(hits) / len(hits)
    report["captions"] = [{"video": v["file"], "caption": r.text, "reference": v["captions"][0], "match": h}
                          for v, r, h in zip(test, results, hits)]
    print(f"held-out ({len(test)} videos, greedy): BLEU-4 {metrics['bleu4']:.4f}  ROUGE-L {metrics['rouge_l']:.4f}  "
          f"CIDEr-D {metrics['cider_d']:.4f}  attribute accuracy {100 * report['attribute_accuracy']:.1f} %")
    # open-ended QA: exact-match accuracy of greedy answers to the scene-generated questions
    from hbi_training.caption import qa_pairs

    rows = [(i, q, a) for i, v in enumerate(test) for q, a in qa_pairs(v["scene"])]
    pick = [r[0] for r in rows]
    answers = model.caption_side(side.take(pick), [test[i]["file"] for i in pick], [r[1] for r in rows],
                                 SearchOptions(max_length=args.max_length))
    per_kind: dict = {}
    for (_, q, a), r in zip(rows, answers):
        kind = q.split(" the ")[0] if q.startswith("what does") else q
        per_kind.setdefault(kind, []).append(r.text == a)
    report["qa"] = {"questions": len(rows), "exact_match": sum(r.text == a for (_, _, a), r in zip(rows, answers))
                    / len(rows), "per_question": {k: sum(v) / len(v) for k, v in per_kind.items()}}
    print(f"held-out open-ended QA ({len(rows)} questions, greedy): exact match "
          f"{100 * report['qa']['exact_match']:.1f} %  " + ", ".join(
              f"{k!r} {100 * v:.0f} %" for k, v in report["qa"]["per_question"].items()))
    report["toolkit_version"] = hbi_runtime.__version__
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
