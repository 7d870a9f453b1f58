"""Which features say which way a shape moves? Linear probes on the video side vs the patch map.

    python benchmarks/probe_motion.py --data DATA [--test-data DATA2] [--train-videos 4000] [--json out.json]

The demo captioner names motions on unseen (colour, shape, action) triples worst (docs/captioning.md). This
script separates "the decoder does not generalise" from "its memory does not carry the direction": for every
move event (left / right / up / down) it takes the features of the event's first and last sampled frame, and
trains a linear classifier of the direction (no language involved) on the train split's events, then reports its
accuracy on the test split's events whose triple occurs in train (seen) and never does (unseen), with the most
frequent confusions. Two feature sets, from the same frames:

* ``side``: the retrieval package's entity tokens (one per frame, the CLS feature: what the decoder reads
  without a spatial memory);
* ``patches``: the checkpoint tower's patch tokens pooled to a ``--grid`` map per frame
  (``hbi_export.tasks.decoder.PatchEncoder``: the decoder's spatial memory).

Features are [first, last, last - first], standardised on train. Seeded, ``--threads`` torch threads.
``--test-data`` takes the test split of another set of the same seed and size (e.g. ``n_test=360``, whose first
120 test videos are DATA's), for more held-out events.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

DIRECTIONS = ("left", "right", "up", "down")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="synthetic set (its train split trains the probe)")
    parser.add_argument("--test-data", type=Path, default=None, help="set whose test split is probed (default --data)")
    parser.add_argument("--package", type=Path, default=None, help="retrieval package (default: the demo's)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="its checkpoint (default: the demo's)")
    parser.add_argument("--train-videos", type=int, default=4000)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(".probe-cache"), help="features cache folder")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from hbi_runtime.cli_support import guarded

    with guarded():  # a missing or wrong --data: a message and exit 3, not a traceback
        return _probe(args)


def _events(videos: list[dict], times: np.ndarray, held: set) -> list[tuple[int, int, int, int, bool]]:
    """(video row, first frame, last frame, direction, unseen) per move event."""
    out = []
    for i, v in enumerate(videos):
        scene = v["scene"]
        for e in scene["events"]:
            if e["action"] in DIRECTIONS:
                frames = [k for k, t in enumerate(times) if e["start"] <= t <= e["end"]]
                obj = scene["objects"][e["obj"]]
                out.append((i, frames[0], frames[-1], DIRECTIONS.index(e["action"]),
                            (obj["colour"], obj["shape"], e["action"]) in held))
    return out


def _features(per_frame: np.ndarray, events) -> np.ndarray:
    rows = []
    for i, a, b, _, _ in events:
        first, last = per_frame[i, a].reshape(-1).astype(np.float32), per_frame[i, b].reshape(-1).astype(np.float32)
        rows.append(np.concatenate([first, last, last - first]))
    return np.stack(rows)


def _fit(x_train, y_train, x_test, steps: int, seed: int) -> np.ndarray:
    import torch

    torch.manual_seed(seed)
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-5
    xt, yt = torch.from_numpy((x_train - mu) / sd), torch.from_numpy(y_train)
    head = torch.nn.Linear(xt.shape[1], len(DIRECTIONS))
    opt = torch.optim.AdamW(head.parameters(), 1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(xt), (256,), generator=g)
        loss = torch.nn.functional.cross_entropy(head(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return head(torch.from_numpy((x_test - mu) / sd)).argmax(-1).numpy()


def _probe(args: argparse.Namespace) -> int:
    import torch

    import hbi_runtime
    from hbi_training.caption import patch_encoder, read_splits, video_patches, video_sides
    from hbi_training.data import read_manifest
    from hbi_training.demo import DEMO_DIR
    from hbi_training.joint import frame_times

    torch.set_num_threads(args.threads)
    package, checkpoint = args.package or DEMO_DIR / "package", args.checkpoint or DEMO_DIR / "checkpoint"
    test_data = args.test_data or args.data
    _, train, _ = read_splits(args.data)
    _, _, test = read_splits(test_data)
    manifest = read_manifest(args.data)
    held = {tuple(t) for t in manifest["held_out"]}
    if {tuple(t) for t in read_manifest(test_data)["held_out"]} != held:
        raise SystemExit("--test-data has other held-out triples: use a set of the same seed")
    n = min(args.train_videos, len(train))
    with hbi_runtime.load(package) as model:
        pre, embed = model.manifest.preprocessing, model.manifest.embed_dim
    times = frame_times(manifest["config"], pre.max_frames)
    train_ev, test_ev = _events(train[:n], times, held), _events(test, times, held)
    y_train = np.array([e[3] for e in train_ev])
    y_test = np.array([e[3] for e in test_ev])
    unseen = np.array([e[4] for e in test_ev])
    encoder, _ = patch_encoder(checkpoint, package, args.grid, embed)
    sources = {
        "side": (video_sides(package, args.data, "train", args.cache, print)["video_tokens_l0"],
                 video_sides(package, test_data, "test", args.cache, print)["video_tokens_l0"]),
        "patches": (video_patches(encoder, args.data, "train", args.cache, pre.max_frames, pre.image_size, print),
                    video_patches(encoder, test_data, "test", args.cache, pre.max_frames, pre.image_size, print)),
    }
    report = {"train_events": len(train_ev), "test_events": len(test_ev), "unseen_test_events": int(unseen.sum()),
              "grid": args.grid, "probes": {}}
    for name, (tr, te) in sources.items():
        pred = _fit(_features(tr, train_ev), y_train, _features(te, test_ev), args.steps, seed=0)
        ok = pred == y_test
        confusions = Counter((DIRECTIONS[a], DIRECTIONS[b]) for a, b, u in zip(y_test, pred, unseen) if u and a != b)
        report["probes"][name] = {"seen": float(ok[~unseen].mean()), "unseen": float(ok[unseen].mean()),
                                  "unseen_confusions": [[f"{a}->{b}", c] for (a, b), c in confusions.most_common(4)]}
        r = report["probes"][name]
        print(f"{name:8s} direction accuracy: seen triples {100 * r['seen']:.1f} %, unseen {100 * r['unseen']:.1f} % "
              f"(top confusions on unseen: {', '.join(f'{p} x{c}' for p, c in r['unseen_confusions'])})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
