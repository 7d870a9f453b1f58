"""Timing one call repeatedly and summarising it: percentiles, throughput, one result row of a record."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


def time_calls(fn: Callable[[], object], *, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed calls (``time.perf_counter``)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """``{p50, p90, p99, mean, min, max}`` in milliseconds (linear interpolation between samples, as numpy's
    default; with few samples p99 is close to the maximum)."""
    if len(seconds) == 0:
        raise ValueError("latency_summary needs at least one sample")
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    summary = {f"p{q}": float(np.percentile(ms, q)) for q in PERCENTILES}
    summary.update(mean=float(ms.mean()), min=float(ms.min()), max=float(ms.max()))
    return {k: round(v, 4) for k, v in summary.items()}


def result_row(stage: str, batch: int, unit: str, items_per_call: float, seconds: Sequence[float],
               **extra: Any) -> dict:
    """One ``results`` entry: latency percentiles of a call and ``throughput = items_per_call / p50``.

    Args:
        stage: ``text``, ``video``, ``score``, ``decode``, ``retrieve`` (or a script's own name).
        batch: the batch size of the call.
        unit: the throughput unit, e.g. ``texts/s``, ``frames/s``, ``pairs/s``, ``videos/s``, ``queries/s``.
        items_per_call: how many ``unit`` items one call processes.
        seconds: the timed calls.
        extra: stage facts worth keeping (shapes, gallery size).
    """
    latency = latency_summary(seconds)
    return {"stage": stage, "batch": int(batch), "unit": unit, "items_per_call": items_per_call,
            "iters": len(seconds), "latency_ms": latency,
            "throughput": round(items_per_call / (latency["p50"] / 1e3), 4), **extra}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB. (Not of its children: on Linux a child's maxrss keeps
    the size it had when forked from this process, which says nothing about the child's own use.)"""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    per_mb = 2**20 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return round(usage.ru_maxrss / per_mb, 1)
