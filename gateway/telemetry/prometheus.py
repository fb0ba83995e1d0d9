"""The Prometheus exposition behind GET /metrics, for one worker process or several.

Every measurement telemetry records into an OpenTelemetry instrument is also recorded
here, into a prometheus_client metric of the same name translated to Prometheus's
conventions (`gen_ai.client.operation.duration` [s] → `gen_ai_client_operation_duration_seconds`,
`tallygate.requests` → `tallygate_requests_total`), with the same buckets and the
same (low-cardinality) attributes as labels.

Several workers (`server.workers: N`, uvicorn processes): prometheus_client's
multiprocess mode. `prepare_multiprocess(N)`, called by the serve command before the
workers start, returns the environment (`PROMETHEUS_MULTIPROC_DIR`, a fresh directory)
the workers inherit; every worker then writes its values to memory-mapped files there,
and a scrape, whichever worker answers it, merges all of them (counters and histogram
buckets summed). Counts of a worker that exited stay in the sum, as counters must.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import tempfile
import threading
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector

logger = logging.getLogger("gateway.telemetry.facade")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# OpenTelemetry unit → Prometheus name suffix (units in braces are annotations: none)
_UNIT_SUFFIXES = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "USD": "usd"}


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One instrument, as both OpenTelemetry and Prometheus see it."""

    name: str  # OpenTelemetry name, e.g. gen_ai.client.token.usage
    kind: Literal["counter", "histogram"]
    unit: str
    description: str
    labels: tuple[str, ...]  # attribute keys exposed as Prometheus labels
    buckets: tuple[float, ...] | None = None

    @property
    def prometheus_name(self) -> str:
        base = self.name.replace(".", "_")
        suffix = _UNIT_SUFFIXES.get(self.unit)
        return f"{base}_{suffix}" if suffix and not base.endswith(suffix) else base


def label_name(attribute: str) -> str:
    return attribute.replace(".", "_")


def _label_value(value: Any) -> str:
    if value is None:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    return str(value)


FLUSH_EVERY_S = 1.0  # multiprocess mode: how stale a scrape of another worker may be


class _Instrument:
    """One prometheus_client metric; children cached per label values (bounded by the
    attributes' low cardinality) so a record is a tuple build and a dict hit.

    Deferred (multiprocess mode): every value a child takes there is written to a
    memory-mapped file under a lock, a histogram's twice; that took a third of a
    request's CPU with two workers. Records then add into plain numbers here, and
    `flush()` writes them (once a second, and before a scrape)."""

    __slots__ = (
        "_bounds",
        "_children",
        "_deferred",
        "_keys",
        "_kind",
        "_lock",
        "_metric",
        "_owner",
        "_pending",
    )

    def __init__(self, spec: MetricSpec, registry: CollectorRegistry) -> None:
        self._keys = spec.labels
        self._kind = spec.kind
        labelnames = [label_name(k) for k in spec.labels]
        if spec.kind == "counter":
            self._metric: Any = Counter(
                spec.prometheus_name, spec.description, labelnames, registry=registry
            )
        else:
            self._metric = Histogram(
                spec.prometheus_name,
                spec.description,
                labelnames,
                registry=registry,
                buckets=spec.buckets or Histogram.DEFAULT_BUCKETS,
            )
        self._children: dict[tuple[str, ...], Any] = {}
        self._bounds = tuple(self._metric._upper_bounds) if spec.kind == "histogram" else ()
        self._deferred = False
        # child -> counter total, or histogram [sum, count per bucket]; records may come
        # from exporter threads too (dropped-span counts), hence the lock
        self._pending: dict[Any, Any] = {}
        self._lock = threading.Lock()
        self._owner: PrometheusMetrics | None = None

    def defer(self, owner: PrometheusMetrics) -> None:
        self._deferred = True
        self._owner = owner

    def record(self, value: float, attributes: Mapping[str, Any]) -> None:
        # a list comprehension, not a generator (which resumes once per label), and no
        # call for the usual string value
        key = tuple(
            [v if type(v) is str else _label_value(v) for v in map(attributes.get, self._keys)]
        )
        child = self._children.get(key)
        if child is None:
            child = self._metric.labels(*key) if key else self._metric
            self._children[key] = child
        if self._deferred:
            with self._lock:
                self._add(child, value)
            if not self._owner.armed:  # type: ignore[union-attr]  # set with _deferred
                self._owner.arm()  # type: ignore[union-attr]
        elif self._kind == "counter":
            child.inc(value)
        else:
            child.observe(value)

    def _add(self, child: Any, value: float) -> None:
        pending = self._pending
        if self._kind == "counter":
            pending[child] = pending.get(child, 0) + value
            return
        entry = pending.get(child)
        if entry is None:
            entry = pending[child] = [0.0, [0] * len(self._bounds)]
        entry[0] += value
        entry[1][bisect_left(self._bounds, value)] += 1  # the first bound >= value, as observe

    def flush(self) -> None:
        """Write what was recorded since the last flush into the metric's children."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for child, delta in pending.items():
            if self._kind == "counter":
                child.inc(delta)
                continue
            child._sum.inc(delta[0])
            for bucket, n in zip(child._buckets, delta[1], strict=True):
                if n:
                    bucket.inc(n)


class PrometheusMetrics:
    """The metrics of this process (workers == 1) or of all workers (multiprocess)."""

    def __init__(self, specs: Iterable[MetricSpec], *, workers: int = 1) -> None:
        self._registry = CollectorRegistry(auto_describe=True)
        self.instruments = {spec.name: _Instrument(spec, self._registry) for spec in specs}
        self.multiprocess_dir: str | None = None
        self.deferred = False  # multiprocess: values written by flush(), see _Instrument
        self.armed = False  # a flush is scheduled
        self._exposition = self._registry
        if workers > 1:
            directory = os.environ.get(MULTIPROC_ENV)
            if not directory or not os.path.isdir(directory):
                logger.warning(
                    "telemetry: %d workers but %s is not set to a directory: /metrics shows "
                    "only the worker that answers the scrape (the serve command sets it "
                    "up with gateway.telemetry.prometheus.prepare_multiprocess)",
                    workers,
                    MULTIPROC_ENV,
                )
            else:
                if values.ValueClass is values.MutexValue:
                    # prometheus_client was imported before the variable was set: this
                    # process's own values stay in memory, the scrape still merges the dir
                    logger.warning(
                        "telemetry: prometheus_client was imported before %s was set; "
                        "this process's metrics are not shared with the other workers",
                        MULTIPROC_ENV,
                    )
                self.multiprocess_dir = directory
                self.deferred = True
                for instrument in self.instruments.values():
                    instrument.defer(self)
                atexit.register(self.flush)  # a worker's last second, when it exits
                self._exposition = CollectorRegistry()
                MultiProcessCollector(self._exposition, path=directory)  # type: ignore[no-untyped-call]

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        self.flush()  # this worker's own latest; the others' are at most FLUSH_EVERY_S old
        return generate_latest(self._exposition), CONTENT_TYPE_LATEST

    def flush(self) -> None:
        if self.deferred:
            for instrument in self.instruments.values():
                instrument.flush()

    def arm(self) -> None:
        """Flush FLUSH_EVERY_S after the first record since the last flush: a timer only
        while there is traffic. From a thread with no event loop (an exporter), nothing:
        the next record on the loop arms it."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.armed = True
        loop.call_later(FLUSH_EVERY_S, self._timed_flush)

    def _timed_flush(self) -> None:
        self.armed = False
        self.flush()


def prepare_multiprocess(workers: int, directory: str | None = None) -> dict[str, str]:
    """The environment to set before starting `workers` worker processes so /metrics
    merges them: {} for one worker, else {"PROMETHEUS_MULTIPROC_DIR": <dir>}.

    The directory is `directory`, else an existing $PROMETHEUS_MULTIPROC_DIR, else a
    fresh temporary one; stale `*.db` files from an earlier run are removed (they would
    add old counts). The caller sets the variables (os.environ.update) before the
    workers start; they must not have imported prometheus_client earlier (uvicorn
    spawns fresh interpreters, so they have not)."""
    if workers <= 1:
        return {}
    path = directory or os.environ.get(MULTIPROC_ENV)
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        for stale in Path(path).glob("*.db"):
            stale.unlink(missing_ok=True)
    else:
        path = tempfile.mkdtemp(prefix="tallygate-metrics-")
    return {MULTIPROC_ENV: str(path)}
