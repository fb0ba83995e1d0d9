"""FakeAnthropic: a scripted Anthropic Messages API on loopback (FakeUpstream's machinery).

Unscripted, POST /v1/messages answers like Anthropic: the last user message's text echoed,
usage counted in whitespace-separated words (input: every message and the system prompt),
an SSE stream of named events when the body says `stream`; POST
/v1/messages/count_tokens answers that input count. Script it with FakeUpstream's
steps, built here in Anthropic's shapes: `message_reply`, `message_stream`,
`error_reply` (Reply / Stream of `event: x` + `data: {...}` events, no [DONE]).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from tests.fake_upstream import FakeUpstream, RecordedRequest, Reply, Stream

MODEL = "claude-sonnet-4-5-20250929"


def tokens(
    input_tokens: int, output_tokens: int, *, cache_read: int = 0, cache_write: int = 0
) -> dict[str, int]:
    """An Anthropic usage object: input_tokens exclude the cache reads and writes."""
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
        "output_tokens": output_tokens,
    }


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def tool_block(id: str, name: str, input: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": id, "name": name, "input": input}


def message_json(
    content: Sequence[dict[str, Any]] | str,
    *,
    stop_reason: str = "end_turn",
    usage: dict[str, int] | None = None,
    model: str = MODEL,
    id: str = "msg_fake",
) -> dict[str, Any]:
    blocks = [text_block(content)] if isinstance(content, str) else list(content)
    return {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": usage if usage is not None else tokens(10, 5),
    }


def message_reply(content: Sequence[dict[str, Any]] | str, **fields: Any) -> Reply:
    return Reply(json=message_json(content, **fields))


def event(name: str, data: dict[str, Any]) -> str:
    """One SSE event as Anthropic writes it: the event name, then its JSON data."""
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def message_events(
    content: Sequence[dict[str, Any]] | str,
    *,
    stop_reason: str = "end_turn",
    start_usage: dict[str, int] | None = None,
    output_tokens: int = 5,
    model: str = MODEL,
    id: str = "msg_fake",
) -> list[str]:
    """The documented event flow of a message: message_start (input usage, a placeholder
    output count), per block a start, its deltas (text word by word; tool input in two
    JSON pieces) and a stop, a ping, message_delta (stop reason, cumulative output),
    message_stop."""
    blocks = [text_block(content)] if isinstance(content, str) else list(content)
    start = message_json([], stop_reason=stop_reason, usage=start_usage, model=model, id=id)
    start["stop_reason"] = None
    start["usage"] = {**(start_usage or tokens(10, 0)), "output_tokens": 1}
    out = [event("message_start", {"type": "message_start", "message": start})]
    out.append(event("ping", {"type": "ping"}))
    for i, block in enumerate(blocks):
        if block["type"] == "text":
            opening, deltas = text_block(""), _text_deltas(block["text"])
        else:
            opening, deltas = {**block, "input": {}}, _json_deltas(block["input"])
        out.append(event("content_block_start", {"type": "content_block_start", "index": i,
                                                 "content_block": opening}))  # fmt: skip
        for delta in deltas:
            out.append(event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                     "delta": delta}))  # fmt: skip
        out.append(event("content_block_stop", {"type": "content_block_stop", "index": i}))
    delta = {"stop_reason": stop_reason, "stop_sequence": None}
    out.append(event("message_delta", {"type": "message_delta", "delta": delta,
                                       "usage": {"output_tokens": output_tokens}}))  # fmt: skip
    out.append(event("message_stop", {"type": "message_stop"}))
    return out


def _text_deltas(text: str) -> list[dict[str, Any]]:
    words = text.split(" ")
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    return [{"type": "text_delta", "text": p} for p in pieces if p]


def _json_deltas(value: dict[str, Any]) -> list[dict[str, Any]]:
    text = json.dumps(value)
    half = len(text) // 2
    return [{"type": "input_json_delta", "partial_json": p} for p in ("", text[:half], text[half:])]


def message_stream(content: Sequence[dict[str, Any]] | str, **fields: Any) -> Stream:
    stream_fields = {k: fields.pop(k) for k in ("delay_s", "drop_after", "headers") if k in fields}
    return Stream(message_events(content, **fields), done=False, **stream_fields)


def error_json(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_reply(
    status: int, kind: str, message: str = "fake anthropic error", **headers: str
) -> Reply:
    return Reply(status, error_json(kind, message), headers=dict(headers))


# ---- the default answer ---------------------------------------------------------------


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(b.get("text", "")) for b in value if isinstance(b, dict))
    return 0


def prompt_words(body: dict[str, Any]) -> int:
    """The fake's input count: words in every message's text and in the system prompt."""
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    return sum(_words(m.get("content")) for m in messages) + _words(body.get("system"))


def messages_answer(request: RecordedRequest, number: int) -> Reply | Stream | None:
    """Anthropic's answer to POST /v1/messages: the last user message's text echoed; to
    POST /v1/messages/count_tokens: the input words counted as the usage counts them."""
    body = request.json
    if request.path == "/v1/messages/count_tokens" and isinstance(body, dict):
        return Reply(json={"input_tokens": prompt_words(body)})
    if request.path != "/v1/messages" or not isinstance(body, dict):
        return None
    if "max_tokens" not in body:  # as Anthropic: the field is required
        return error_reply(400, "invalid_request_error", "max_tokens: Field required")
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    users = [m for m in messages if m.get("role") == "user"]
    last = users[-1].get("content") if users else ""
    blocks = last if isinstance(last, list) else []
    text = last if isinstance(last, str) else " ".join(
        b["text"] for b in blocks
        if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
    )  # fmt: skip
    text = text or "ok"
    prompt = prompt_words(body)
    output = len(text.split())
    id, model = f"msg_fake_{number}", body.get("model", MODEL)
    if body.get("stream"):
        return message_stream(text, start_usage=tokens(prompt, 0), output_tokens=output,
                              model=model, id=id)  # fmt: skip
    return message_reply(text, usage=tokens(prompt, output), model=model, id=id)


class FakeAnthropic(FakeUpstream):
    """A FakeUpstream that answers like Anthropic's Messages API when not scripted."""

    def __init__(self) -> None:
        super().__init__(answer=messages_answer)

    def reset(self) -> None:
        super().reset()
        self.answer = messages_answer
