"""INT8 (``hbi-export calibrate``) against fp32 on ONNX Runtime CPU: speed of a ViT-B/32-size video encoder, and
retrieval accuracy of the demo model.

    python benchmarks/bench_int8.py --b32-package PKG [--demo-data DIR] [--json benchmarks/results/int8.json]

1. ViT-B/32 (random weights; make the package with ``hbi-export init /tmp/b32ckpt --preset vit-b-32 &&
   hbi-export onnx --checkpoint /tmp/b32ckpt --out PKG --max-words 24 --max-frames 12``): calibrate for the
   ``ort-cpu`` target on generated synthetic videos (``hbi_training.data.generate``), then encode the same videos
   with the fp32 and the INT8 video encoder, alternating in one run (the machine is shared: a ratio from one run is
   the meaningful figure), with the feature cosine of INT8 to fp32.
2. The demo model (``hbi_runtime/data/demo/package``): calibrate on 80 *train* videos of the demo's synthetic set
   (with their captions, 20 held out for the gate), then text-to-video R@1 / R@5 of both packages over the 120
   held-out test videos, measured exactly as the demo measured its 94.2 % (``hbi_training.demo.package_recall``).
   ``--demo-data`` is the set ``python -m hbi_training.demo`` rendered (2400 + 120 videos, seed 0); without it the
   set is rendered first (minutes).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import hbi_runtime
from hbi_runtime.compare import compare_tensors
from hbi_runtime.package import load_package

DEMO_PKG = Path(hbi_runtime.__file__).resolve().parent / "data" / "demo" / "package"


def _say(message: str) -> None:
    print(f"  {message}", flush=True)


def bench_b32(pkg: Path, work: Path, *, videos: int, repeats: int, threads: int) -> dict:
    from hbi_calibration.pipeline import calibrate_package
    from hbi_runtime.video import decode_video
    from hbi_training.data import generate

    preprocessing = load_package(pkg).manifest.preprocessing
    seconds = preprocessing.max_frames  # 1 frame per second is sampled: every frame slot holds a real frame
    data = generate(work / "b32-videos", n_train=videos, n_test=0, seed=3, seconds=seconds, workers=2).root
    data = data / "videos"
    started = time.perf_counter()
    report = calibrate_package(pkg, data, work / "b32-int8", target="ort-cpu", method="minmax",
                               progress=_say)
    calib_s = time.perf_counter() - started
    decoded = [decode_video(p, preprocessing) for p in sorted(data.glob("*.mp4"))[:4]]
    frames = np.stack([d.frames for d in decoded])  # (4, T, 3, 224, 224)
    mask = np.stack([d.mask for d in decoded])
    n_frames = int(mask.size)  # frames through the ViT per run (all real: mask.sum() == mask.size)
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    sides = {}
    with hbi_runtime.load(pkg, intra_op_threads=threads) as fp32, \
            hbi_runtime.load(work / "b32-int8", intra_op_threads=threads) as int8:
        models = {"fp32": fp32, "int8": int8}
        for name, model in models.items():  # warm-up: session creation and first run
            sides[name] = model.encode_frames(frames, mask, batch_size=1)
        for _ in range(repeats):  # alternate, so that a busy neighbour hurts both alike
            for name, model in models.items():
                t0 = time.perf_counter()
                model.encode_frames(frames, mask, batch_size=1)
                times[name].append(time.perf_counter() - t0)
    fps = {name: n_frames / float(np.median(t)) for name, t in times.items()}
    cosines = {f"video_tokens_l{i}": compare_tensors("t", a.tokens, b.tokens).cosine_min
               for i, (a, b) in enumerate(zip(sides["fp32"].levels, sides["int8"].levels))}
    return {"package": str(pkg), "outcome": report["outcome"], "calibration_seconds": round(calib_s, 1),
            "calibration_videos": report["data"]["calibration_decoded"],
            "held_out_videos": report["data"]["held_out_decoded"],
            "gate": [a["checks"] for a in report["gate"]["attempts"]],
            "frames_per_run": n_frames, "real_frames_per_run": int(mask.sum()), "repeats": repeats,
            "threads": threads,
            "frames_per_s": {k: round(v, 2) for k, v in fps.items()}, "speedup": round(fps["int8"] / fps["fp32"], 2),
            "worst_video_cosine": cosines}


def bench_demo(data: Path, work: Path, *, n_calib: int) -> dict:
    from hbi_calibration.pipeline import calibrate_package
    from hbi_training.data import read_manifest
    from hbi_training.demo import package_recall

    train = [v for v in read_manifest(data)["videos"] if v["split"] == "train"][:n_calib]
    folder = work / "demo-calib"
    folder.mkdir()
    with open(work / "demo-calib.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption"])
        for v in train:
            shutil.copyfile(data / v["file"], folder / Path(v["file"]).name)
            writer.writerow([Path(v["file"]).name, v["captions"][0]])
    report = calibrate_package(DEMO_PKG, folder, work / "demo-int8", captions=work / "demo-calib.csv",
                               target="ort-cpu", method="minmax", progress=_say)
    recall = {"fp32": package_recall(DEMO_PKG, data), report["outcome"]: package_recall(work / "demo-int8", data)}
    return {"outcome": report["outcome"], "calibration_videos": report["data"]["calibration_decoded"],
            "held_out_videos": report["data"]["held_out_decoded"],
            "gate": [a["checks"] for a in report["gate"]["attempts"]],
            "test_videos": recall["fp32"]["videos"],
            "t2v_r1": {k: round(100 * v["t2v_r1"], 2) for k, v in recall.items()},
            "t2v_r5": {k: round(100 * v["t2v_r5"], 2) for k, v in recall.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--b32-package", type=Path, help="fp32 ViT-B/32 package (skip part 1 without it)")
    parser.add_argument("--demo-data", type=Path, help="the demo's synthetic set (rendered when not given)")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--videos", type=int, default=24, help="generated videos for the ViT-B/32 calibration")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/int8.json"))
    args = parser.parse_args()
    out = {"schema": "hbi.bench-int8/1", "machine_note": "2-core CPU shared with other jobs; ratios are from one run"}
    with tempfile.TemporaryDirectory(prefix="hbi-bench-int8-") as tmp:
        work = Path(tmp)
        if args.b32_package:
            print("ViT-B/32 video encoder, ort-cpu INT8 vs fp32:", flush=True)
            out["vit_b32"] = r = bench_b32(args.b32_package, work, videos=args.videos, repeats=args.repeats,
                                           threads=args.threads)
            print(f"fp32 {r['frames_per_s']['fp32']} frames/s, int8 {r['frames_per_s']['int8']} frames/s: "
                  f"{r['speedup']}x; worst per-video cosine {min(r['worst_video_cosine'].values()):.5f}", flush=True)
        if not args.skip_demo:
            data = args.demo_data
            if data is None:
                from hbi_training.demo import DemoRecipe, make_data

                data = make_data(work / "demo-data", DemoRecipe(), seed=0)
            print("demo model, R@1 on the 120 held-out test videos:", flush=True)
            out["demo"] = r = bench_demo(data, work, n_calib=80)
            print(f"{r['outcome']}: t2v R@1 {r['t2v_r1']}, R@5 {r['t2v_r5']}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
