"""The telemetry of one request: a RequestRecord from its arrival to its finish, and an
AttemptRecord per upstream attempt, in the style of OpenTelemetry's util-genai handler
(`start_llm(inv)`, `stop_llm(inv)` / `fail_llm(inv, err)`):

    rec = telemetry.start_request(ctx, headers)  # the SERVER span (also ctx.trace)
    att = rec.attempt(attempt)                   # a CLIENT span per upstream attempt
    att.trace_headers()                          # its traceparent, for the upstream
    with att.current(): ...                      # its span current (telemetry.http_spans)
    att.fail("timeout")  /  att.end()
    rec.count("retry");  rec.chunk_gap(seconds)
    rec.finish()                                 # spans, metrics, the access line

Every call is guarded: a failure inside telemetry is counted (tallygate.telemetry.errors,
by stage) and logged once per stage, never raised into a request. The figures that
several signals carry are computed once, at finish, and read from the record: the
overhead (the x-tallygate-overhead-ms header, the span, the metric, the access line),
the time to first chunk, the cost in USD. What the attributes are is decided in
gateway.telemetry.semconv (pure), the access line's format in gateway.telemetry.access_log.

A record and its request's context refer to each other until finish, which lets go of
the context (and each attempt of its record): no reference cycle outlives a request, so
its objects are freed as it ends rather than left to the cyclic garbage collector. A
finished record records nothing more, as an ended span.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Literal

import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry._logs import SeverityNumber
from opentelemetry.propagators.textmap import Getter
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.pipeline.client_strings import WITHHELD, Redact, Scrubber
from gateway.telemetry import semconv as gen
from gateway.telemetry.access_log import AccessLog, ClientStrings, access_record
from gateway.telemetry.fast.lite_spans import LiteSpan, LiteTracer, PlainSpan, PlainTracer
from gateway.telemetry.instruments import Instruments, genai_metric_attributes
from policies.redaction import RedactionConfig, Redactor
from pricing.cost import NANO_PER_USD

if TYPE_CHECKING:
    from gateway.pipeline.context import Attempt, RequestContext

logger = logging.getLogger("gateway.telemetry.facade")

Span = LiteSpan | PlainSpan


class _HeaderGetter(Getter[Mapping[str, str]]):
    """Reads W3C trace headers from any mapping: Starlette's Headers (case-insensitive)
    or a plain dict whose keys may be capitalized."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None and isinstance(carrier, dict):
            for name, candidate in carrier.items():
                if name.lower() == key:
                    value = candidate
                    break
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


_PROPAGATOR = TraceContextTextMapPropagator()
_GETTER = _HeaderGetter()
_NOTHING = contextlib.nullcontext()


class Recorder:
    """The process-wide parts every record writes to: the tracer, the instruments, the
    access log (and its OTLP logger), the redaction of client strings and content.
    Telemetry.create builds one; reconfigure swaps the redaction and the model names."""

    __slots__ = (
        "_failed_stages",
        "access",
        "capture",
        "http_spans",
        "instruments",
        "models",
        "otel_logger",
        "redact",
        "scrub",
        "spans",
    )

    def __init__(
        self,
        *,
        spans: LiteTracer | PlainTracer,
        instruments: Instruments,
        access: AccessLog,
        otel_logger: Any,
        capture: Literal["none", "redacted", "full"],
        http_spans: bool,
        redact: Redact | None,
        known_models: Collection[str],
    ) -> None:
        self.spans = spans
        self.instruments = instruments
        self.access = access
        self.otel_logger = otel_logger  # None: the access lines are not exported
        self.capture = capture
        self.http_spans = http_spans
        self._failed_stages: set[str] = set()
        # client strings are redacted even when no redactor is given (default detectors)
        self.redact = redact
        self.models = gen.ModelBuckets(known_models)
        self.scrub = Scrubber(
            redact or Redactor(RedactionConfig()).redact_value,
            known_models,
            self._client_strings_failed,
        )

    def reconfigure(self, redact: Redact, known_models: Collection[str]) -> None:
        self.redact = redact
        self.models = gen.ModelBuckets(known_models)
        self.scrub = Scrubber(redact, known_models, self._client_strings_failed)

    def failed(self, stage: str) -> None:
        """An exception inside telemetry: counted, logged once per stage, never raised."""
        try:
            self.instruments.errors(1, {gen.TALLYGATE_STAGE: stage})
            if stage not in self._failed_stages:
                self._failed_stages.add(stage)
                logger.exception("telemetry: %s failed (logged once; requests unaffected)", stage)
        except Exception:
            pass

    def _client_strings_failed(self) -> None:
        self.failed("client_strings")


def start_request(kit: Recorder, ctx: RequestContext, headers: Mapping[str, str]) -> RequestRecord:
    """The request's record and its SERVER span "{method} {path}", continuing an incoming
    traceparent (its tracestate without entries the redactor flags); the user agent
    redacted. Always a record: without its span when that could not start."""
    record = RequestRecord(kit, ctx)
    try:
        incoming = _PROPAGATOR.extract(headers, getter=_GETTER)
        parent = trace.get_current_span(incoming).get_span_context()
        record.span = kit.spans.start_span(
            f"{ctx.method} {ctx.path}",
            parent=kit.scrub.parent(ctx, parent),
            kind=SpanKind.SERVER,
            attributes=gen.server_request_attributes(
                method=ctx.method,
                path=ctx.path,
                request_id=ctx.request_id,  # checked on arrival (gateway/pipeline/request_ids.py)
                user_agent=kit.scrub.optional(ctx, headers.get("user-agent")),
            ),
            start_time=int(ctx.started_unix * 1e9),
        )
    except Exception:
        kit.failed("start_request")
    return record


def count_event(kit: Recorder, ctx: RequestContext, event: str, attrs: Mapping[str, Any]) -> None:
    """Counts a pipeline event (RequestRecord.count), guarded."""
    try:
        kit.instruments.count_event(ctx, event, attrs)
    except Exception:
        kit.failed("count")


class RequestRecord:
    """One request's telemetry: its SERVER span, and the figures fixed at finish
    (`elapsed_s`, `overhead_s`, `overhead_ms`, `ttft_s`, `cost_usd`), which the header, the
    spans, the metrics and the access line all read."""

    __slots__ = (
        "_chunk_attrs",
        "_ctx",
        "_kit",
        "_request_attrs",
        "cost_usd",
        "elapsed_s",
        "end_unix",
        "overhead_ms",
        "overhead_s",
        "span",
        "ttft_s",
    )

    def __init__(self, kit: Recorder, ctx: RequestContext) -> None:
        self._kit = kit
        self._ctx: RequestContext | None = ctx  # None once finished
        self.span: Span | None = None
        self._request_attrs: dict[str, Any] | None = None  # gen_ai.request.* of the body
        self._chunk_attrs: dict[str, Any] | None = None  # metric attributes for chunk gaps
        self.elapsed_s = 0.0  # request received → finished
        self.overhead_s = 0.0  # of which the gateway's own time (not the upstream wait)
        self.overhead_ms = 0.0  # the same, as the header, span and access line show it
        self.ttft_s: float | None = None  # to the first chunk the client got (streams)
        self.cost_usd: float | None = None  # ctx.cost_nano in USD
        self.end_unix = 0.0

    @property
    def finished(self) -> bool:
        return self._ctx is None

    # -- attempts --

    def attempt(self, attempt: Attempt) -> AttemptRecord:
        """Starts the CLIENT span "{operation} {upstream model}" under the request's span,
        closing an earlier attempt's (a retry or fallback). Always a record, also
        `attempt.record`: without a span when that could not start."""
        kit = self._kit
        record = AttemptRecord(self, attempt)
        ctx = self._ctx
        if ctx is None:
            return record
        try:
            attempt.record = record
            for earlier in ctx.attempts:
                if earlier is not attempt and earlier.record is not None:
                    earlier.record._close(ctx, final=False)
            server = self.span
            attributes: dict[str, Any] | None = None
            if server is None or server.is_recording():
                # (in a sampled-out trace the child is not recorded either: skip the work)
                attributes = self._attempt_attributes(ctx, attempt)
            record.span = kit.spans.start_span(
                f"{ctx.operation} {attempt.upstream_model}",
                parent=server.get_span_context() if server is not None else None,
                kind=SpanKind.CLIENT,
                attributes=attributes,
                start_time=_wall_ns(ctx, attempt.started),
            )
        except Exception:
            kit.failed("start_attempt")
        return record

    def _attempt_attributes(self, ctx: RequestContext, attempt: Attempt) -> dict[str, Any]:
        if self._request_attrs is None:  # the body's part, computed once per request
            self._request_attrs = self._kit.scrub.attributes(
                ctx, gen.request_attributes(ctx.body, ctx.operation)
            )
        attributes = dict(self._request_attrs)
        attributes.update(
            gen.attempt_attributes(
                operation=ctx.operation,
                upstream_model=attempt.upstream_model,
                provider_kind=attempt.provider_kind,
                server_address=attempt.server_address,
                server_port=attempt.server_port,
                number=attempt.number,
                deployment=attempt.deployment,
                stream=ctx.stream,
            )
        )
        return attributes

    # -- along the way --

    def count(self, event: str, **attrs: Any) -> None:
        """Counts a pipeline event: "retry", "fallback" (attrs deployment=, error_type=,
        defaulting to the current attempt's), "rejection" (kind="budget"|"rate_limit"),
        "store_error"; any other name goes to tallygate.events. Keep attrs
        low-cardinality: other keys become tallygate.<key> attributes."""
        ctx = self._ctx
        if ctx is not None:
            count_event(self._kit, ctx, event, attrs)

    def chunk_gap(self, seconds: float) -> None:
        """gen_ai.client.operation.time_per_output_chunk: each chunk after the first."""
        ctx = self._ctx
        if ctx is None:
            return
        try:
            attributes = self._chunk_attrs
            if attributes is None:
                attributes = self._chunk_attrs = genai_metric_attributes(
                    self._kit.models, ctx, ctx.attempt, response=False
                )
            self._kit.instruments.chunk(seconds, attributes)
        except Exception:
            self._kit.failed("record_chunk_gap")

    # -- the end --

    def finish(self) -> None:
        """Ends the request: its figures, open attempt spans, content capture, the SERVER
        span, metrics, one access line (and its OTLP log record). Once: again, nothing."""
        ctx = self._ctx
        if ctx is None:
            return
        kit = self._kit
        now = time.perf_counter()
        self._fix_figures(ctx, now)
        # redacted once, before the spans and the line that carry them
        client = ClientStrings(WITHHELD, WITHHELD)
        try:
            client = ClientStrings(
                kit.scrub.model(ctx, ctx.requested_model),
                kit.scrub.optional(ctx, ctx.error_message),
            )
        except Exception:
            kit.failed("finish_request.client_strings")
        try:
            self._finish_spans(ctx, now, client)
        except Exception:
            kit.failed("finish_request.spans")
            self._end_leftovers(ctx, now)
        try:
            kit.instruments.record_request(
                ctx,
                kit.models,
                elapsed_s=self.elapsed_s,
                overhead_s=self.overhead_s,
                ttft_s=self.ttft_s,
                cost_usd=self.cost_usd,
            )
        except Exception:
            kit.failed("finish_request.metrics")
        try:
            self._write_access(ctx, client)
        except Exception:
            kit.failed("finish_request.access_log")
        for attempt in ctx.attempts:  # no cycle outlives the request
            attempt.record = None
        self._ctx = None

    def _fix_figures(self, ctx: RequestContext, now: float) -> None:
        """The figures the header, spans, metrics and access line share, computed once."""
        self.elapsed_s = max(0.0, now - ctx.started)
        self.overhead_s = ctx.overhead_until(now)
        self.overhead_ms = round(self.overhead_s * 1000.0, 3)
        self.ttft_s = ctx.time_to_first_chunk()
        self.cost_usd = None if ctx.cost_nano is None else ctx.cost_nano / NANO_PER_USD
        self.end_unix = ctx.started_unix + self.elapsed_s

    def _finish_spans(self, ctx: RequestContext, now: float, client: ClientStrings) -> None:
        kit = self._kit
        last = ctx.attempt
        last_record = last.record if last is not None else None
        if last_record is not None and last_record.end_ns is None:
            last_record._end(ctx, now)  # may close it, if it failed
        server = self.span
        # content goes where the answer came from: the last attempt, unless it failed
        attempt_span = last_record.span if last_record is not None else None
        on_attempt = attempt_span is not None and last_record is not None and not last_record.closed
        target = attempt_span if on_attempt else server
        content = None
        if kit.capture != "none" and target is not None and target.is_recording():
            try:
                content = self._content(ctx)
            except Exception:  # e.g. the redactor failed: capture nothing, end the spans
                kit.failed("content")
        for attempt in ctx.attempts:
            if attempt.record is not None:
                if attempt is last:
                    attempt.record._close(ctx, final=True, content=content)
                else:
                    attempt.record._close(ctx, final=False)
        if server is None:
            return
        if content and not on_attempt:
            server.set_attributes(content)
        if server.is_recording():
            server.set_attributes(
                gen.server_result_attributes(
                    ctx, model=client.model, overhead_ms=self.overhead_ms, cost_usd=self.cost_usd
                )
            )
            if ctx.status >= 500 or (ctx.error_type and 0 < ctx.status < 400):
                message = client.error_message or ctx.error_type or str(ctx.status)
                server.set_status(Status(StatusCode.ERROR, message))
        server.end(end_time=_wall_ns(ctx, now))

    def _end_leftovers(self, ctx: RequestContext, now: float) -> None:
        """After a failure in _finish_spans: end whatever is still open, plainly."""
        end = _wall_ns(ctx, now)
        spans = [a.record.span for a in ctx.attempts if a.record is not None]
        spans.append(self.span)
        for span in spans:
            with contextlib.suppress(Exception):
                if span is not None and span.is_recording():
                    span.end(end_time=end)

    def _content(self, ctx: RequestContext) -> dict[str, str] | None:
        """The content attributes, redacted (mode "redacted") and serialized as JSON."""
        raw = gen.content_attributes(
            ctx.body,
            ctx.operation,
            ctx.output_text,
            ctx.output_tool_calls,
            ctx.finish_reasons,
            has_output=bool(ctx.output_text or ctx.output_tool_calls),
        )
        if not raw:
            return None
        kit = self._kit
        if kit.capture == "redacted":
            if kit.redact is None:  # Telemetry.create turns capture off without one
                return None
            raw, counts = kit.redact(raw)
            for kind, n in counts.items():
                if n:
                    ctx.redactions[kind] = ctx.redactions.get(kind, 0) + n
        return {key: _dumps(value) for key, value in raw.items()}

    def _write_access(self, ctx: RequestContext, client: ClientStrings) -> None:
        kit = self._kit
        trace_id = span_id = None
        span = self.span
        if span is not None:
            sc = span.get_span_context()
            if sc.is_valid:
                trace_id = format(sc.trace_id, "032x")
                span_id = format(sc.span_id, "016x")
        record = access_record(
            ctx,
            trace_id=trace_id,
            span_id=span_id,
            end_unix=self.end_unix,
            latency_s=self.elapsed_s,
            ttft_s=self.ttft_s,
            overhead_ms=self.overhead_ms,
            client=client,
        )
        kit.access.write(record)
        if kit.otel_logger is not None:
            kit.otel_logger.emit(
                timestamp=int(self.end_unix * 1e9),
                context=_as_context(span) if span is not None else None,
                severity_number=SeverityNumber.INFO,
                severity_text="INFO",
                body={k: v for k, v in record.items() if v is not None},
                event_name="tallygate.access",
            )


class AttemptRecord:
    """One upstream attempt's CLIENT span. A failed attempt's span ends at once; a
    successful one's stays open (its end time fixed) until the request finishes, which
    adds the response, usage and content only complete then."""

    __slots__ = ("_request", "attempt", "closed", "end_ns", "failed", "span")

    def __init__(self, request: RequestRecord, attempt: Attempt) -> None:
        self._request = request
        self.attempt = attempt
        self.span: Span | None = None
        self.end_ns: int | None = None
        self.failed = False
        self.closed = False

    def current(self) -> contextlib.AbstractContextManager[None]:
        """The attempt span as the current span (not ended on exit), so the httpx
        instrumentation's span nests under it (telemetry.http_spans). Exceptions of the
        body pass through."""
        if not self._request._kit.http_spans or self.span is None:
            return _NOTHING  # no instrumentation to see the current span
        return _CurrentSpan(self._request._kit, self.span)

    def trace_headers(self) -> dict[str, str]:
        """W3C trace context for the upstream request: the attempt span as the parent.
        Empty with `http_spans` (the instrumentation injects its own span's) or no span."""
        span = self.span
        if span is None or self._request._kit.http_spans:
            return {}
        try:
            sc = span.get_span_context()
            if not sc.is_valid:
                return {}
            headers = {
                "traceparent": f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
            }
            if sc.trace_state:
                headers["tracestate"] = sc.trace_state.to_header()
            return headers
        except Exception:
            self._request._kit.failed("trace_headers")
            return {}

    def fail(self, error_type: str) -> None:
        """The attempt failed with `error_type` (its Attempt says so; ended now unless it
        already had an end): error.type and ERROR status, the span ends now."""
        attempt = self.attempt
        attempt.error_type = error_type
        if attempt.ended is None:
            attempt.ended = time.perf_counter()
        self.end()

    def end(self) -> None:
        """The attempt is over, with the outcome its Attempt holds (status, error_type,
        ended): a failure ends the span now; a success fixes its end time and leaves the
        response, usage and content to RequestRecord.finish. Idempotent."""
        ctx = self._request._ctx
        if ctx is None:
            return
        try:
            self._end(ctx, time.perf_counter())
        except Exception:
            self._request._kit.failed("end_attempt")

    def _end(self, ctx: RequestContext, now: float) -> int:
        """Fixes the end time (the Attempt's, else `now`); returns it."""
        if self.end_ns is not None:
            return self.end_ns
        attempt = self.attempt
        end_ns = self.end_ns = _wall_ns(ctx, attempt.ended if attempt.ended is not None else now)
        span = self.span
        if span is None:
            return end_ns
        if attempt.status and span.is_recording():  # the HTTP call's outcome
            span.set_attribute(HTTP_RESPONSE_STATUS_CODE, attempt.status)
        error = gen.error_attributes(attempt.error_type, attempt.status)
        if error:
            self.failed = True
            span.set_attributes(error)
            span.set_status(Status(StatusCode.ERROR, error[ERROR_TYPE]))
            self._close(ctx, final=False)
        return end_ns

    def _close(
        self, ctx: RequestContext, *, final: bool, content: Mapping[str, str] | None = None
    ) -> None:
        span = self.span
        if span is None or self.closed:
            return
        end_ns = self.end_ns
        if end_ns is None:
            end_ns = self._end(ctx, time.perf_counter())
            if self.closed:  # _end closed it: a failure
                return
        self.closed = True
        if final and not self.failed and ctx.error_type and 0 < ctx.status < 400:
            # the response had started (a stream) and then broke: the attempt failed
            span.set_attribute(ERROR_TYPE, ctx.error_type)
            span.set_status(Status(StatusCode.ERROR, ctx.error_type))
        if not self.failed and span.is_recording():
            span.set_attributes(
                gen.response_attributes(
                    response_id=ctx.response_id,
                    response_model=ctx.response_model,
                    finish_reasons=ctx.finish_reasons,
                    usage=ctx.usage,
                    time_to_first_chunk_s=ctx.time_to_first_chunk(self.attempt.started),
                    service_tier=ctx.response_service_tier,
                    system_fingerprint=ctx.response_system_fingerprint,
                )
            )
        if content and final:
            span.set_attributes(content)
        span.end(end_time=end_ns)


class _CurrentSpan:
    """AttemptRecord.current's context manager: attaches the attempt span's context on
    entry and detaches it on exit; its own failures are counted, the body's exceptions
    propagate."""

    __slots__ = ("_kit", "_span", "_token")

    def __init__(self, kit: Recorder, span: Span) -> None:
        self._kit = kit
        self._span = span
        self._token: Any = None

    def __enter__(self) -> None:
        try:
            self._token = otel_context.attach(_as_context(self._span))
        except Exception:
            self._kit.failed("use_attempt")

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            try:
                otel_context.detach(self._token)
            except Exception:
                self._kit.failed("use_attempt")
            self._token = None


def _as_context(span: Span) -> otel_context.Context:
    """An OpenTelemetry Context whose current span is `span` (for instrumentation and logs)."""
    return trace.set_span_in_context(trace.NonRecordingSpan(span.get_span_context()))


def _wall_ns(ctx: RequestContext, perf: float) -> int:
    """A perf_counter reading of this request → epoch nanoseconds."""
    return int((ctx.started_unix + (perf - ctx.started)) * 1e9)


def _dumps(value: Any) -> str:
    return orjson.dumps(value, default=str).decode()
