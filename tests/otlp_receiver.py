"""An OTLP/HTTP receiver on loopback for tests: decodes the real protobuf the exporters send.

POST /v1/traces, /v1/metrics, /v1/logs with `application/x-protobuf` bodies (gzip or
not) are decoded with opentelemetry.proto and kept as plain Python values.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

LOOPBACK = "127.0.0.1"

# OTLP span kinds (opentelemetry.proto.trace.v1.Span.SpanKind)
SPAN_KIND = {
    0: "UNSPECIFIED",
    1: "INTERNAL",
    2: "SERVER",
    3: "CLIENT",
    4: "PRODUCER",
    5: "CONSUMER",
}
STATUS_CODE = {0: "UNSET", 1: "OK", 2: "ERROR"}


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        assert isinstance(kv, KeyValue)
        out[kv.key] = any_value(kv.value)
    return out


@dataclass
class ReceivedSpan:
    name: str
    kind: str  # "SERVER", "CLIENT", ...
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root
    attributes: dict[str, Any]
    status: str  # "UNSET", "OK", "ERROR"
    status_message: str
    resource: dict[str, Any]


@dataclass
class ReceivedPoint:
    metric: str
    unit: str
    kind: str  # "sum", "histogram", "gauge", ...
    attributes: dict[str, Any]
    value: float | None = None  # sum / gauge
    count: int | None = None  # histogram
    sum: float | None = None
    bounds: list[float] = field(default_factory=list)
    bucket_counts: list[int] = field(default_factory=list)


@dataclass
class ReceivedLog:
    body: Any
    attributes: dict[str, Any]
    trace_id: str
    span_id: str
    severity: str
    event_name: str


class OTLPReceiver:
    """`with OTLPReceiver() as rx:` … `rx.endpoint` is the base URL to configure."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.points: list[ReceivedPoint] = []
        self.logs: list[ReceivedLog] = []
        self.requests: list[tuple[str, dict[str, str]]] = []  # (path, headers)
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                encoding = self.headers.get("content-encoding", "")
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                try:
                    reply = receiver._receive(self.path, body, dict(self.headers.items()))
                except Exception as exc:
                    self.send_response(400)
                    self.end_headers()
                    self.wfile.write(str(exc).encode())
                    return
                if reply is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    # -- decoding --

    def _receive(self, path: str, body: bytes, headers: dict[str, str]) -> bytes | None:
        with self._cond:
            self.requests.append((path, headers))
        if path == "/v1/traces":
            traces = ExportTraceServiceRequest.FromString(body)
            spans = [
                ReceivedSpan(
                    name=span.name,
                    kind=SPAN_KIND.get(span.kind, str(span.kind)),
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    attributes=attributes(span.attributes),
                    status=STATUS_CODE.get(span.status.code, str(span.status.code)),
                    status_message=span.status.message,
                    resource=attributes(rs.resource.attributes),
                )
                for rs in traces.resource_spans
                for ss in rs.scope_spans
                for span in ss.spans
            ]
            with self._cond:
                self.spans.extend(spans)
                self._cond.notify_all()
            return ExportTraceServiceResponse().SerializeToString()
        if path == "/v1/metrics":
            metrics = ExportMetricsServiceRequest.FromString(body)
            points: list[ReceivedPoint] = []
            for rm in metrics.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        points.extend(_points(metric))
            with self._cond:
                self.points.extend(points)
                self._cond.notify_all()
            return ExportMetricsServiceResponse().SerializeToString()
        if path == "/v1/logs":
            logs = ExportLogsServiceRequest.FromString(body)
            records = [
                ReceivedLog(
                    body=any_value(rec.body),
                    attributes=attributes(rec.attributes),
                    trace_id=rec.trace_id.hex(),
                    span_id=rec.span_id.hex(),
                    severity=rec.severity_text,
                    event_name=rec.event_name,
                )
                for rl in logs.resource_logs
                for sl in rl.scope_logs
                for rec in sl.log_records
            ]
            with self._cond:
                self.logs.extend(records)
                self._cond.notify_all()
            return ExportLogsServiceResponse().SerializeToString()
        return None

    # -- waiting --

    def _wait(self, what: str, ready: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not ready():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"OTLP receiver: timed out after {timeout}s waiting for {what}"
                    )
                self._cond.wait(remaining)

    def wait_for_spans(self, n: int, timeout: float = 10.0) -> list[ReceivedSpan]:
        self._wait(f"{n} spans (have {len(self.spans)})", lambda: len(self.spans) >= n, timeout)
        return list(self.spans)

    def wait_for_metric(self, name: str, timeout: float = 10.0) -> list[ReceivedPoint]:
        self._wait(f"metric {name}", lambda: any(p.metric == name for p in self.points), timeout)
        return [p for p in self.points if p.metric == name]

    def wait_for_logs(self, n: int, timeout: float = 10.0) -> list[ReceivedLog]:
        self._wait(f"{n} log records", lambda: len(self.logs) >= n, timeout)
        return list(self.logs)

    def metric_names(self) -> set[str]:
        with self._cond:
            return {p.metric for p in self.points}


def _points(metric: Any) -> list[ReceivedPoint]:
    kind = metric.WhichOneof("data")
    data = getattr(metric, kind)
    out = []
    for dp in data.data_points:
        point = ReceivedPoint(
            metric=metric.name, unit=metric.unit, kind=kind, attributes=attributes(dp.attributes)
        )
        if kind == "histogram":
            point.count = dp.count
            point.sum = dp.sum
            point.bounds = list(dp.explicit_bounds)
            point.bucket_counts = list(dp.bucket_counts)
        elif kind in ("sum", "gauge"):
            point.value = dp.as_double if dp.WhichOneof("value") == "as_double" else dp.as_int
        out.append(point)
    return out


def dead_port(host: str = LOOPBACK) -> int:
    """A port nothing listens on: bound once to get a free number, then released."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def dead_endpoint() -> str:
    return f"http://{LOOPBACK}:{dead_port()}"
