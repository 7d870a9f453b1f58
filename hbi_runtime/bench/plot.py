"""Latency and throughput against batch size, one line per record (backend / precision / device): a PNG.

matplotlib is optional (the ``plot`` extra) and imported only here, when a plot is asked for.
"""

from __future__ import annotations

import os
from typing import Sequence

from hbi_runtime.bench.stages import BATCHED_STAGES
from hbi_runtime import plotting
from hbi_runtime.errors import BadInputError


def _figure_class():
    return plotting.figure_class("--plot", "or drop --plot and plot the --out JSON later")


def series_label(record: dict) -> str:
    """``onnxruntime/fp32/cpu`` (+ the GPU or Jetson name when there is one)."""
    cfg = record.get("config", {})
    label = "/".join(str(cfg.get(k, "?")) for k in ("backend", "precision", "device"))
    device = record.get("device", {})
    if device.get("jetson"):
        label += f" ({device['jetson']['model']})"
    elif cfg.get("device") == "cuda" and device.get("gpus"):
        label += f" ({device['gpus'][0]['name']})"
    return label


def plot_records(records: Sequence[dict], path: str | os.PathLike) -> None:
    """Write a PNG with, per batched stage (text, video, score), p50 latency and throughput against batch size.

    Raises:
        MissingDependencyError: matplotlib is not installed. BadInputError: no record has a batched stage.
    """
    stages = [s for s in BATCHED_STAGES if any(r["stage"] == s for rec in records for r in rec["results"])]
    if not stages:
        raise BadInputError("nothing to plot: the records have none of the batched stages "
                            f"{', '.join(BATCHED_STAGES)}", hint="run with --stages text,video or score")
    fig = _figure_class()(figsize=(4.2 * len(stages), 7))
    axes = fig.subplots(2, len(stages), squeeze=False)
    for col, stage in enumerate(stages):
        lat_ax, thr_ax = axes[0][col], axes[1][col]
        unit = ""
        for record in records:
            rows = sorted((r for r in record["results"] if r["stage"] == stage), key=lambda r: r["batch"])
            if not rows:
                continue
            unit = rows[0]["unit"]
            batches = [r["batch"] for r in rows]
            label = series_label(record)
            lat_ax.errorbar(batches, [r["latency_ms"]["p50"] for r in rows], marker="o", label=label,
                            yerr=[[0] * len(rows), [r["latency_ms"]["p90"] - r["latency_ms"]["p50"] for r in rows]])
            thr_ax.plot(batches, [r["throughput"] for r in rows], marker="o", label=label)
        lat_ax.set_title(f"{stage}: latency (p50, bar to p90)")
        lat_ax.set_ylabel("ms per call")
        thr_ax.set_title(f"{stage}: throughput")
        thr_ax.set_ylabel(unit)
        for ax in (lat_ax, thr_ax):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
