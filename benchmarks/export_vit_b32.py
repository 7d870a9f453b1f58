"""Full ViT-B/32-size export on CPU: time, file sizes, peak memory and parity of fp32 and fp16 packages.

    python benchmarks/export_vit_b32.py [--out-dir DIR] [--json benchmarks/results/export_vit_b32.json]

Random weights (``hbi-export init --preset vit-b-32``), MSR-VTT shapes (L = 24 words, T = 12 frames).
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=None, help="where to write the model and packages")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/export_vit_b32.json"))
    parser.add_argument("--max-words", type=int, default=24)
    parser.add_argument("--max-frames", type=int, default=12)
    args = parser.parse_args()

    from hbi_export.checkpoints.convert import init_random
    from hbi_export.onnx.package import export_package

    root = args.out_dir or Path(tempfile.mkdtemp(prefix="hbi-b32-"))
    init_random(root / "model", "vit-b-32", overwrite=True)
    records = []
    for precision in ("fp32", "fp16"):
        started = time.perf_counter()
        manifest, parity = export_package(root / "model", root / f"pkg-{precision}", max_words=args.max_words,
                                          max_frames=args.max_frames, precision=precision, overwrite=True,
                                          progress=lambda m: print(f"  {m}", flush=True))
        seconds = time.perf_counter() - started
        sizes = {name: (root / f"pkg-{precision}" / g.file).stat().st_size for name, g in manifest.graphs.items()}
        worst = {c.name: c.worst_cosine for c in parity.comparisons}
        record = {"precision": precision, "seconds_total": round(seconds, 1), "status": manifest.status,
                  "graph_bytes": sizes, "parity_ok": parity.ok,
                  "max_abs": {c.name: c.max_abs for c in parity.comparisons},
                  "worst_cosine": worst,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        records.append(record)
        print(f"{precision}: {seconds:.1f} s, status {manifest.status}, sizes (MiB) "
              + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in sizes.items())
              + f", max abs scores {record['max_abs']['scores']:.2e}, worst feature cosine "
              + f"{min(v for k, v in worst.items() if not k.startswith('score')):.6f}, peak RSS {record['peak_rss_mib']} MiB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"schema": "hbi.bench-export/1", "records": records}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
