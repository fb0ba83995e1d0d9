"""gateway.telemetry.access_log: the one line per request."""

from __future__ import annotations

import io
import json

from gateway.iso_time import iso_utc
from gateway.pipeline.context import Attempt, Principal, RequestContext
from gateway.telemetry.access_log import FIELDS, AccessLog, access_record, format_text
from pricing.usage import Usage
from tests.servers import async_wait_until


def finished_context() -> RequestContext:
    ctx = RequestContext(
        request_id="req-42",
        method="POST",
        path="/v1/chat/completions",
        operation="chat",
        started=100.0,
        started_unix=1_700_000_000.0,
    )
    ctx.body = {"model": "smart", "messages": [{"role": "user", "content": "secret prompt"}]}
    ctx.requested_model = "smart"
    ctx.principal = Principal(team="search", key_name="search-prod")
    ctx.stream = True
    ctx.first_chunk_at = 100.25
    ctx.attempts = [
        Attempt(1, "smart#0:anthropic", "anthropic", "anthropic", "claude-sonnet-4-5", None, None),
        Attempt(2, "smart#1:openai", "openai", "openai", "gpt-4.1", None, None),
    ]
    ctx.status = 200
    ctx.usage = Usage(input_tokens=12, output_tokens=34, estimated=True)
    ctx.cost_nano = 123_450
    ctx.output_text = ["secret completion"]
    return ctx


def test_record_fields_in_order() -> None:
    ctx = finished_context()
    record = access_record(
        ctx,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        span_id="b7ad6b7169203331",
        end_unix=1_700_000_000.5,
        latency_s=0.5,
        ttft_s=ctx.time_to_first_chunk(),
        overhead_ms=1.234,
    )
    assert tuple(record) == FIELDS
    assert record == {
        "timestamp": "2023-11-14T22:13:20.500Z",
        "request_id": "req-42",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
        "method": "POST",
        "path": "/v1/chat/completions",
        "team": "search",
        "key": "search-prod",
        "model": "smart",
        "deployment": "smart#1:openai",
        "upstream_model": "gpt-4.1",
        "status": 200,
        "latency_ms": 500.0,
        "ttft_ms": 250.0,
        "attempts": 2,
        "input_tokens": 12,
        "output_tokens": 34,
        "tokens_estimated": True,
        "cost_usd": "0.000123450",
        "overhead_ms": 1.234,
        "error_type": None,
        "error_message": None,
        "cancelled": False,
    }


def test_refused_request_record() -> None:
    ctx = RequestContext(
        request_id="r", method="POST", path="/v1/embeddings", operation="embeddings"
    )
    ctx.status = 401
    ctx.error_type = "invalid_api_key"
    record = access_record(
        ctx, trace_id=None, span_id=None, end_unix=0.0, latency_s=0.001, ttft_s=None,
        overhead_ms=1.0,
    )  # fmt: skip
    assert record["team"] is None and record["key"] is None and record["deployment"] is None
    assert record["attempts"] == 0 and record["cost_usd"] is None and record["ttft_ms"] is None
    assert record["error_type"] == "invalid_api_key"


def test_cost_is_exact_decimal_text() -> None:
    ctx = finished_context()
    for nano, text in ((0, "0.000000000"), (1, "0.000000001"), (1_500_000_000, "1.500000000"),
                       (123_456_789_012, "123.456789012")):  # fmt: skip
        ctx.cost_nano = nano  # always nine decimals: nano-USD exactly (docs/TELEMETRY.md)
        record = access_record(
            ctx, trace_id=None, span_id=None, end_unix=0.0, latency_s=0.1, ttft_s=None,
            overhead_ms=0.1,
        )  # fmt: skip
        assert record["cost_usd"] == text


def test_iso_utc() -> None:
    assert iso_utc(0.0, ms=True) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1_700_000_000.999, ms=True) == "2023-11-14T22:13:20.999Z"
    assert iso_utc(1_700_000_000.999) == "2023-11-14T22:13:20Z"  # to the second


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def test_json_line_written_once_without_content_or_keys() -> None:
    stream = CountingStream()
    ctx = finished_context()
    record = access_record(
        ctx, trace_id="t", span_id="s", end_unix=1.0, latency_s=0.1, ttft_s=0.25, overhead_ms=10.0
    )
    AccessLog(stream, "json").write(record)
    assert stream.writes == 1
    line = stream.getvalue()
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line) == record
    assert "secret" not in line  # no prompt, no completion
    assert "sk-" not in line


def test_text_line_is_logfmt() -> None:
    record = {
        "timestamp": "2023-11-14T22:13:20.500Z",
        "path": "/v1/chat/completions",
        "team": "data science",
        "error_type": None,
        "cancelled": False,
        "note": 'say "hi"',
    }
    assert format_text(record) == (
        'timestamp=2023-11-14T22:13:20.500Z path=/v1/chat/completions team="data science" '
        'cancelled=false note="say \\"hi\\""\n'
    )
    stream = CountingStream()
    AccessLog(stream, "text").write(record)
    assert stream.writes == 1 and stream.getvalue() == format_text(record)


async def test_lines_to_an_os_file_are_batched_then_flushed_together(tmp_path) -> None:
    path = tmp_path / "access.log"
    with open(path, "w") as stream:  # noqa: ASYNC230 (a test: the file is the point)
        log = AccessLog(stream)
        log.write({"n": 1})
        log.write({"n": 2})
        assert path.read_text() == ""  # gathered, not yet written
        # the flush is a loop callback (FLUSH_DELAY_S): both lines leave in it, whole
        await async_wait_until(lambda: path.read_text() != "", what="the batch is flushed")
        assert path.read_text() == '{"n":1}\n{"n":2}\n'
        log.write({"n": 3})
        log.flush()  # shutdown flushes what is pending
        assert path.read_text().endswith('{"n":3}\n')
