"""Do the synthetic frames carry the caption attributes? A small CNN trained on the frame caches says.

    python benchmarks/probe_frames.py --data DATA [--steps 900] [--image-size 32] [--json out.json]

The demo captioner misses its goal because the demo retrieval model's video side barely encodes shape
(docs/captioning.md). This script separates "the pixels do not show it" from "the model does not extract it":
it trains a 4-layer CNN from scratch, one frame at a time, on the train split's frame caches (the frames the
runtime samples, at the model's input size) to predict, for each of the 4 shapes, its colour or "absent"
(``hbi_training.joint.frame_targets``, from the scene metadata), and reports per-frame accuracy on the held-out
test split. Seeded, one thread.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="synthetic set (python -m hbi_training.demo)")
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--max-frames", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from hbi_runtime.cli_support import guarded

    with guarded():  # a missing or wrong --data: a message and exit 3, not a traceback
        return _probe(args)


def _probe(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    from hbi_training.data import frame_cache
    from hbi_training.data.manifest import read_manifest
    from hbi_training.data.scenes import COLOURS, SHAPES
    from hbi_training.joint import frame_times, frame_targets

    torch.set_num_threads(1)
    torch.manual_seed(0)
    manifest = read_manifest(args.data)
    times = frame_times(manifest["config"], args.max_frames)
    data = {}
    for split in ("train", "test"):
        videos = [v for v in manifest["videos"] if v["split"] == split]
        frames, _ = frame_cache(args.data, split, max_frames=args.max_frames, image_size=args.image_size)
        classes, _ = frame_targets(videos, times, args.max_frames, list(COLOURS), list(SHAPES))
        data[split] = (torch.tensor(np.asarray(frames), dtype=torch.float32).flatten(0, 1),
                       torch.from_numpy(classes).flatten(0, 1))
    n_shapes, n_classes = len(SHAPES), 1 + len(COLOURS)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, n_shapes * n_classes))
    optimiser = torch.optim.AdamW(net.parameters(), 2e-3)
    x, y = data["train"]
    started = time.monotonic()
    for _ in range(args.steps):
        rows = torch.randint(0, len(x), (128,))
        logits = net(x[rows]).view(-1, n_classes)
        loss = nn.functional.cross_entropy(logits, y[rows].reshape(-1), ignore_index=-100)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    seconds = time.monotonic() - started
    xt, yt = data["test"]
    with torch.no_grad():
        pred = torch.cat([net(xt[i:i + 512]).view(-1, n_shapes, n_classes).argmax(-1) for i in range(0, len(xt), 512)])
    real = yt >= 0
    present = real & (yt > 0)
    result = {"schema": "hbi.probe-frames/1", "steps": args.steps, "train_seconds": round(seconds, 1),
              "image_size": args.image_size, "test_frames": int(real.any(-1).sum()),
              "slot_accuracy": float((pred[real] == yt[real]).float().mean()),
              "present_object_accuracy": float((pred[present] == yt[present]).float().mean()),
              "frames_all_correct": float(((pred == yt) | ~real).all(-1).float().mean())}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
