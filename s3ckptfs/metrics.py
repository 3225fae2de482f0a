"""Prometheus metrics of one mount, served over HTTP when ``-o metrics_port=N`` is set.

Counters are updated where things happen (the FUSE boundary counts operations
and errors; the uploader counts uploads and their durations). Gauges that
describe state (pending and failed uploads, cache bytes) are computed at
scrape time from the filesystem, so they can never drift from the truth.
"""

from __future__ import annotations

import errno
import logging
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)


class Metrics:
    """All metrics of one daemon, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.uploaded_bytes = Counter("s3ckptfs_uploaded_bytes", "Bytes of objects completed in S3",
                                      registry=self.registry)
        self.uploaded_objects = Counter("s3ckptfs_uploaded_objects", "Objects completed in S3",
                                        registry=self.registry)
        self.part_bytes = Counter("s3ckptfs_part_bytes", "Bytes of multipart parts made in S3, by how: sent "
                                  "(uploaded) or copied (server-side, from an equal range already there)",
                                  ["how"], registry=self.registry)
        self.upload_failures = Counter("s3ckptfs_upload_failures", "Uploads given up (data kept in the cache)",
                                       registry=self.registry)
        self.upload_seconds = Histogram(
            "s3ckptfs_upload_duration_seconds", "From close (commit request) to the object complete in S3",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, float("inf")),
            registry=self.registry)
        self.stale_answers = Counter("s3ckptfs_stale_answers", "Lookups and listings answered from a kept "
                                     "listing because S3 failed or did not answer in time", registry=self.registry)
        self.fuse_operations = Counter("s3ckptfs_fuse_operations", "FUSE operations by type", ["operation"],
                                       registry=self.registry)
        self.fuse_errors = Counter("s3ckptfs_fuse_errors", "FUSE operations that failed, by type and errno",
                                   ["operation", "errno"], registry=self.registry)

    def count_operation(self, operation: str) -> None:
        self.fuse_operations.labels(operation).inc()

    def count_error(self, operation: str, code: int) -> None:
        self.fuse_errors.labels(operation, errno.errorcode.get(code, str(code))).inc()

    def add_state(self, collect: Callable[[], dict[str, float]]) -> None:
        """Gauges computed at scrape time: ``collect()`` returns {name: value}."""
        self.registry.register(_StateCollector(collect))

    def serve(self, port: int, addr: str) -> None:
        start_http_server(port, addr=addr, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", addr, port)


_STATE_HELP = {
    "pending_uploads": "Files closed but not yet complete in S3",
    "failed_uploads": "Files whose upload was given up (kept in the cache)",
    "dirty_bytes": "Bytes in the cache not yet in S3 (staging files)",
    "clean_cache_bytes": "Bytes of clean cached object data",
}


class _StateCollector:
    def __init__(self, collect: Callable[[], dict[str, float]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[GaugeMetricFamily]:
        for name, value in self._collect().items():
            yield GaugeMetricFamily(f"s3ckptfs_{name}", _STATE_HELP.get(name, name), value=value)
