"""Prometheus metrics of one server (its own registry: two servers in one process never share counters).

Names (all ``hbi_serve_``): ``requests_total{route,status}``, ``errors_total{route,type}``,
``request_seconds{route}`` (histogram), ``batch_size{lane}`` (histogram of queries / videos per model call),
``batch_requests{lane}`` (histogram of requests per model call), ``queue_depth{lane}``, ``index_videos``,
``index_rows``, ``index_shard_bytes``, ``index_generation``, ``index_reloads_total``, ``index_ready``.
``route`` is the route's template (``/v1/videos/{video_id}/media``), never the raw path.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("hbi_serve_requests_total", "HTTP requests answered", ["route", "status"],
                                registry=r)
        self.errors = Counter("hbi_serve_errors_total", "Requests answered with an error, by error type",
                              ["route", "type"], registry=r)
        self.latency = Histogram("hbi_serve_request_seconds", "Time to answer a request", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("hbi_serve_batch_size", "Queries (text lane) or videos per model call",
                                    ["lane"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("hbi_serve_batch_requests", "Requests coalesced into one model call",
                                        ["lane"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("hbi_serve_queue_depth", "Requests waiting for their lane", ["lane"], registry=r)
        self.index_videos = Gauge("hbi_serve_index_videos", "Videos in the served index state", registry=r)
        self.index_rows = Gauge("hbi_serve_index_rows", "Stored sides (videos or windows) served", registry=r)
        self.index_bytes = Gauge("hbi_serve_index_shard_bytes", "Bytes of the served shards", registry=r)
        self.index_generation = Gauge("hbi_serve_index_generation", "Published generation served", registry=r)
        self.index_reloads = Counter("hbi_serve_index_reloads_total", "Index states loaded", registry=r)
        self.index_ready = Gauge("hbi_serve_index_ready", "1 while the index can be served", registry=r)

    def batch_observer(self, lane: str):
        size, count = self.batch_size.labels(lane), self.batch_requests.labels(lane)

        def observe(requests: int, units: int) -> None:
            size.observe(units)
            count.observe(requests)

        return observe

    def index_loaded(self, served) -> None:
        self.index_videos.set(served.videos)
        self.index_rows.set(len(served.index.rows))
        self.index_bytes.set(sum(f[1] for f in served.files))
        gen = served.token[1] if len(served.token) > 1 else None
        self.index_generation.set(gen if isinstance(gen, int) else 0)
        self.index_reloads.inc()

    def render(self, lanes: dict, ready: bool) -> bytes:
        for name, lane in lanes.items():
            self.queue_depth.labels(name).set(lane.depth)
        self.index_ready.set(1 if ready else 0)
        return generate_latest(self.registry)
