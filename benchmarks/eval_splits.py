"""Held-out figures of the demo artifacts on the named evaluation splits: validation (used to choose) and test.

::

    taskset -c 0 python benchmarks/eval_splits.py --work DIR [--split validation test] [--seed 0] [--json out.json]

The splits are ranges of seed 0's held-out stream (``hbi_training.data.scenes.EVAL_SPLITS``; every video has a
(colour, shape, action) combination that never occurs in train, and a caption of its own):

* ``validation``: positions 0-119, the demo's 120 test videos. They chose among training variants (the vision
  towers, the stage to keep, the decoder recipes in docs/captioning.md), so their figures are optimistic.
* ``test``: positions 360-719, never used to train or to choose. The figures are quoted on it.

(Positions 120-359 were used to diagnose the caption decoder and are in neither.) Each split is rendered into
``DIR/<split>`` (``hbi_training.data.synthetic.generate_split``; a folder that already holds it is reused), then
measured through the torch-free runtime (ONNX Runtime, greedy), on the artifacts in ``--demo``:

1. retrieval (``package/``): text-to-video R@1 / R@5 of each video's canonical caption over the split's whole
   gallery, and over galleries of 120 videos (consecutive blocks; the mean), the validation gallery's size, since
   R@1 falls as a gallery grows;
2. captions (``caption/``, ``hbi_training.joint.runtime_caption_figures``): the share of videos whose caption names
   every attribute (``hbi_training.caption.attribute_match``: every colour, shape, motion and the order of the
   events, nothing else), BLEU-4 / ROUGE-L / CIDEr-D, open-ended QA exact match; and per event (the i-th stated
   event against the i-th true one) colour / shape / action / all three, for events whose triple occurs in train
   and for those whose triple never does;
3. the QA package (``qa/``): top-1 / top-5 over the scenes' one-word questions (``hbi_training.qa``).

The runtime uses every core the process may run on: ``taskset -c 0`` keeps it to one. On one core of a shared
2-core machine the test split (360 videos) took 43 s, rendering included, the validation split 18 s.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import hbi_runtime

DEMO = Path(hbi_runtime.__file__).resolve().parent / "data" / "demo"
GALLERY = 120  # the validation split's size: retrieval is also reported over galleries of this many videos


def retrieval(package: Path, data: Path, videos: list[dict]) -> dict:
    """t2v R@1 / R@5 of the canonical captions over the whole gallery and over consecutive GALLERY-video blocks."""
    with hbi_runtime.load(package) as model:
        encoded = model.encode_videos([str(data / v["file"]) for v in videos], workers=1)
        if encoded.errors:
            raise SystemExit(f"could not decode {encoded.errors[0]}")
        scores = np.asarray(model.score(model.encode_text([v["captions"][0] for v in videos]), encoded.side))
        sha = model.package.manifest_sha256

    def ranks(s: np.ndarray) -> np.ndarray:  # 0 = the caption's own video first
        return (s > np.diag(s)[:, None]).sum(axis=1)

    whole = ranks(scores)
    blocks = [ranks(scores[a:a + GALLERY, a:a + GALLERY]) for a in range(0, len(videos) - GALLERY + 1, GALLERY)]
    out = {"model_sha256": sha, "gallery": len(videos), "t2v_r1": float((whole == 0).mean()),
           "t2v_r5": float((whole < 5).mean())}
    if blocks and len(videos) != GALLERY:
        out[f"gallery_{GALLERY}"] = {"blocks": len(blocks),
                                     "t2v_r1": float(np.mean([(r == 0).mean() for r in blocks])),
                                     "t2v_r5": float(np.mean([(r < 5).mean() for r in blocks])),
                                     "t2v_r1_per_block": [float((r == 0).mean()) for r in blocks]}
    return out


def per_event(captions: list[dict], videos: list[dict], vocabulary: dict, held_out: set) -> dict:
    """Colour / shape / action / all-three accuracy per event, for seen and unseen (held-out) triples."""
    from hbi_training.caption import parse_events, scene_events

    counts = {kind: np.zeros(5, dtype=int) for kind in ("seen", "unseen")}  # events, colour, shape, action, all
    for c, v in zip(captions, videos):
        said = parse_events(c["caption"], vocabulary)
        for i, true in enumerate(scene_events(v["scene"])):
            got = said[i] if i < len(said) else (None, None, None, None)
            kind = "unseen" if tuple(true[:3]) in held_out else "seen"
            action_ok = got[2:] == true[2:]  # the action with its direction / new colour
            hits = (got[0] == true[0], got[1] == true[1], action_ok)
            counts[kind] += (1, *hits, all(hits))
    return {kind: {"events": int(n[0]), **{name: float(n[k + 1] / n[0]) if n[0] else None
                                          for k, name in enumerate(("colour", "shape", "action", "all"))}}
            for kind, n in counts.items()}


def qa_package(package: Path, data: Path) -> dict:
    """Top-1 / top-5 of the QA package over every question of the split's scenes."""
    from hbi_runtime.tasks.qa import accuracy, load_qa
    from hbi_training.qa import question_rows

    rows = [(str(data / r["file"]), r["question"], r["answer"]) for r in question_rows(data, "test")]
    with load_qa(package) as qa:
        result = qa.ask(rows, top_k=5, workers=1)
        acc = accuracy(result.rows, qa.answers)
    return {"questions": acc["questions"], "failed": len(result.failed), "top1": acc["top1"], "top5": acc["top5"]}


def measure(name: str, root: Path, demo: Path, seed: int) -> dict:
    from hbi_training.data.scenes import eval_split
    from hbi_training.data.synthetic import generate_split
    from hbi_training.joint import runtime_caption_figures

    span = eval_split(name)
    started = time.monotonic()
    paths = generate_split(root, name, seed, workers=1)
    manifest = json.loads(paths.manifest.read_text())
    videos = [v for v in manifest["videos"] if v["split"] == "test"]
    report: dict = {"split": name, "seed": seed, "positions": [span.start, span.stop], "videos": len(videos),
                    "data": str(paths.root), "rendered": not paths.reused,
                    "render_seconds": time.monotonic() - started}
    t0 = time.monotonic()
    report["retrieval"] = retrieval(demo / "package", paths.root, videos)
    report["retrieval"]["seconds"] = time.monotonic() - t0
    t0 = time.monotonic()
    figures = runtime_caption_figures(demo / "caption", paths.root)
    hits = sum(c["match"] for c in figures["captions"])
    p = hits / len(videos)
    report["caption"] = {
        "caption_package_sha256": figures["caption_package_sha256"],
        "every_attribute": {"videos": hits, "of": len(videos), "share": p,
                            "standard_error": math.sqrt(p * (1 - p) / len(videos))},
        "metrics": figures["metrics"],
        "qa_exact_match": figures["qa_exact_match"], "qa_questions": figures["qa_questions"],
        "per_event": per_event(figures["captions"], videos, manifest["vocabulary"],
                               {tuple(t) for t in manifest["held_out"]}),
        "seconds": time.monotonic() - t0,
        "captions": figures["captions"],
    }
    t0 = time.monotonic()
    report["qa_package"] = qa_package(demo / "qa" / "package", paths.root)
    report["qa_package"]["seconds"] = time.monotonic() - t0
    return report


def summary_line(r: dict) -> str:
    ret, cap, qa = r["retrieval"], r["caption"], r["qa_package"]
    e = cap["every_attribute"]
    block = ret.get(f"gallery_{GALLERY}")
    m = cap["metrics"]
    unseen = cap["per_event"]["unseen"]
    return (f"{r['split']} (held-out positions {r['positions'][0]}-{r['positions'][1] - 1}, {r['videos']} videos):\n"
            f"  every attribute named: {e['videos']} / {e['of']} = {100 * e['share']:.1f} % "
            f"(standard error {100 * e['standard_error']:.1f} points)\n"
            f"  per event, unseen triples ({unseen['events']}): colour {100 * unseen['colour']:.1f} / shape "
            f"{100 * unseen['shape']:.1f} / action {100 * unseen['action']:.1f} / all {100 * unseen['all']:.1f} %\n"
            f"  BLEU-4 {m['bleu4']:.3f}  ROUGE-L {m['rouge_l']:.3f}  CIDEr-D {m['cider_d']:.2f}\n"
            f"  open-ended QA exact match (caption decoder): {100 * cap['qa_exact_match']:.1f} % of "
            f"{cap['qa_questions']} questions\n"
            f"  t2v R@1 {100 * ret['t2v_r1']:.1f} %, R@5 {100 * ret['t2v_r5']:.1f} % over {ret['gallery']} videos"
            + (f"; over galleries of {GALLERY}: R@1 {100 * block['t2v_r1']:.1f} %, R@5 {100 * block['t2v_r5']:.1f} % "
               f"(mean of {block['blocks']})" if block else "") + "\n"
            f"  QA package top-1 {100 * qa['top1']:.1f} %, top-5 {100 * qa['top5']:.1f} % of {qa['questions']} "
            "questions")


def main(argv: list[str] | None = None) -> int:
    from hbi_training.data.scenes import EVAL_SPLITS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True,
                        help="folder for the rendered splits (DIR/<split>; reused when already there)")
    parser.add_argument("--split", nargs="+", choices=list(EVAL_SPLITS), default=list(EVAL_SPLITS))
    parser.add_argument("--seed", type=int, default=0, help="the demo's seed (0)")
    parser.add_argument("--demo", type=Path, default=DEMO, help="the demo artifact folder (package/, caption/, qa/)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from hbi_runtime.errors import HbiError

    reports = []
    try:
        for name in args.split:
            reports.append(measure(name, args.work / name, args.demo, args.seed))
            print(summary_line(reports[-1]), flush=True)
    except HbiError as exc:
        print(f"error: {exc.message}" + (f" (hint: {exc.hint})" if exc.hint else ""), file=sys.stderr)
        return exc.exit_code
    if args.json:
        args.json.write_text(json.dumps({"schema": "hbi.eval-splits/1", "toolkit_version": hbi_runtime.__version__,
                                         "splits": reports}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
