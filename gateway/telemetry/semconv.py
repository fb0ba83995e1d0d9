"""GenAI attribute mapping: request bodies, attempts, usage and content → attribute dicts.

Pure functions, no telemetry SDK: what a span or a metric point carries is decided here,
how it is recorded is gateway.telemetry.record's business. Names come from the OpenTelemetry
semantic conventions (the `opentelemetry.semconv` constants; SEMCONV.md lists what we
emit); the gateway's own attributes live under `tallygate.*`.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as ga
from opentelemetry.semconv._incubating.attributes.openai_attributes import (
    OPENAI_REQUEST_SERVICE_TIER,
    OPENAI_RESPONSE_SERVICE_TIER,
    OPENAI_RESPONSE_SYSTEM_FINGERPRINT,
)
from opentelemetry.semconv._incubating.attributes.server_attributes import (
    SERVER_ADDRESS,
    SERVER_PORT,
)
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_RESPONSE_STATUS_CODE,
)
from opentelemetry.semconv.attributes.url_attributes import URL_PATH
from opentelemetry.semconv.attributes.user_agent_attributes import USER_AGENT_ORIGINAL

from pricing.cost import NANO_PER_USD
from pricing.usage import Usage

if TYPE_CHECKING:
    from gateway.pipeline.context import RequestContext

# --- the gateway's own attribute names (no convention covers them) ---------------------
TALLYGATE_REQUEST_ID = "tallygate.request_id"
TALLYGATE_TEAM = "tallygate.team"
TALLYGATE_KEY = "tallygate.key"  # the key's *name* in config, never the key
TALLYGATE_MODEL = "tallygate.model"  # the model the client asked for (an alias, maybe)
TALLYGATE_DEPLOYMENT = "tallygate.deployment"
TALLYGATE_ATTEMPT = "tallygate.attempt"
TALLYGATE_ATTEMPTS = "tallygate.attempts"
TALLYGATE_COST_USD = "tallygate.cost.usd"
TALLYGATE_PRICING_VERSION = "tallygate.pricing.version"
TALLYGATE_BUDGET_REMAINING_USD = "tallygate.budget.remaining_usd"
TALLYGATE_TOKENS_ESTIMATED = "tallygate.tokens.estimated"
TALLYGATE_REDACTIONS_PREFIX = "tallygate.redactions."
TALLYGATE_OVERHEAD_MS = "tallygate.overhead_ms"
TALLYGATE_CANCELLED = "tallygate.cancelled"
TALLYGATE_REJECTED = "tallygate.rejected"
# what was wrong with the upstream's usage report (clamped counts), when anything was
TALLYGATE_USAGE_ANOMALIES = "tallygate.usage.anomalies"
TALLYGATE_STREAM = "tallygate.stream"
# metric-only attributes
TALLYGATE_REJECTION_KIND = "tallygate.rejection.kind"
TALLYGATE_REDACTION_TYPE = "tallygate.redaction.type"
TALLYGATE_EVENT = "tallygate.event"
TALLYGATE_SIGNAL = "tallygate.telemetry.signal"
TALLYGATE_DROP_REASON = "tallygate.telemetry.reason"
TALLYGATE_STAGE = "tallygate.telemetry.stage"

OTHER = "_OTHER"  # the convention's fallback for values outside a bounded set
NO_TEAM = "_none"  # the request was refused before a team was known

# attempt.provider_kind → gen_ai.provider.name (it names the API flavour used)
PROVIDER_NAMES: Mapping[str, str] = {
    "openai": ga.GenAiProviderNameValues.OPENAI.value,
    "azure": ga.GenAiProviderNameValues.AZURE_AI_OPENAI.value,
    "anthropic": ga.GenAiProviderNameValues.ANTHROPIC.value,
    "mock": "tallygate.mock",
}

_JSON_FORMATS = frozenset({"json_object", "json_schema", "json"})


def provider_name(kind: str) -> str:
    return PROVIDER_NAMES.get(kind, kind)


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def request_attributes(body: Mapping[str, Any] | None, operation: str) -> dict[str, Any]:
    """`gen_ai.request.*` attributes of a client request body (OpenAI chat/completions/
    embeddings/responses shapes and Anthropic messages). Values of the wrong type are
    skipped, never exported: the body is the client's."""
    attrs: dict[str, Any] = {}
    if not body:
        return attrs
    get = body.get
    for key, name in (
        ("temperature", ga.GEN_AI_REQUEST_TEMPERATURE),
        ("top_p", ga.GEN_AI_REQUEST_TOP_P),
        ("frequency_penalty", ga.GEN_AI_REQUEST_FREQUENCY_PENALTY),
        ("presence_penalty", ga.GEN_AI_REQUEST_PRESENCE_PENALTY),
    ):
        if (v := _number(get(key))) is not None:
            attrs[name] = v
    if (v := _int(get("top_k"))) is not None:
        attrs[ga.GEN_AI_REQUEST_TOP_K] = v
    if (v := _int(get("seed"))) is not None:
        attrs[ga.GEN_AI_REQUEST_SEED] = v
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        if (v := _int(get(key))) is not None:
            attrs[ga.GEN_AI_REQUEST_MAX_TOKENS] = v
            break
    if (n := _int(get("n"))) is not None and n != 1:
        attrs[ga.GEN_AI_REQUEST_CHOICE_COUNT] = n
    stop = get("stop", get("stop_sequences"))
    if isinstance(stop, str):
        attrs[ga.GEN_AI_REQUEST_STOP_SEQUENCES] = (stop,)
    elif isinstance(stop, list) and stop and all(isinstance(s, str) for s in stop):
        attrs[ga.GEN_AI_REQUEST_STOP_SEQUENCES] = tuple(stop)
    if isinstance(tier := get("service_tier"), str):
        attrs[OPENAI_REQUEST_SERVICE_TIER] = tier
    output_type = _output_type(body)
    if output_type is not None:
        attrs[ga.GEN_AI_OUTPUT_TYPE] = output_type
    if operation == ga.GenAiOperationNameValues.EMBEDDINGS.value:
        if isinstance(fmt := get("encoding_format"), str):
            attrs[ga.GEN_AI_REQUEST_ENCODING_FORMATS] = (fmt,)
        if (dims := _int(get("dimensions"))) is not None:
            attrs[ga.GEN_AI_EMBEDDINGS_DIMENSION_COUNT] = dims
    return attrs


def _output_type(body: Mapping[str, Any]) -> str | None:
    fmt = body.get("response_format")  # chat completions
    if fmt is None and isinstance(text := body.get("text"), Mapping):
        fmt = text.get("format")  # responses API
    if isinstance(fmt, Mapping):
        kind = fmt.get("type")
        if kind in _JSON_FORMATS:
            return ga.GenAiOutputTypeValues.JSON.value
        if kind == "text":
            return ga.GenAiOutputTypeValues.TEXT.value
    return None


def attempt_attributes(
    *,
    operation: str,
    upstream_model: str,
    provider_kind: str,
    server_address: str | None,
    server_port: int | None,
    number: int,
    deployment: str,
    stream: bool,
) -> dict[str, Any]:
    """The per-attempt attributes of a CLIENT span (the request part comes from
    `request_attributes`)."""
    attrs: dict[str, Any] = {
        ga.GEN_AI_OPERATION_NAME: operation,
        ga.GEN_AI_PROVIDER_NAME: provider_name(provider_kind),
        ga.GEN_AI_REQUEST_MODEL: upstream_model,
        TALLYGATE_ATTEMPT: number,
        TALLYGATE_DEPLOYMENT: deployment,
    }
    if server_address:
        attrs[SERVER_ADDRESS] = server_address
        if server_port:
            attrs[SERVER_PORT] = server_port
    if stream:
        attrs[ga.GEN_AI_REQUEST_STREAM] = True
    return attrs


def usage_attributes(usage: Usage) -> dict[str, Any]:
    """`gen_ai.usage.*`: input includes cache reads/writes, output includes reasoning."""
    attrs: dict[str, Any] = {
        ga.GEN_AI_USAGE_INPUT_TOKENS: usage.input_tokens,
        ga.GEN_AI_USAGE_OUTPUT_TOKENS: usage.output_tokens,
    }
    if usage.cache_read_input_tokens:
        attrs[ga.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = usage.cache_read_input_tokens
    if usage.cache_creation_input_tokens:
        attrs[ga.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS] = usage.cache_creation_input_tokens
    if usage.reasoning_output_tokens:
        attrs[ga.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS] = usage.reasoning_output_tokens
    return attrs


def response_attributes(
    *,
    response_id: str | None,
    response_model: str | None,
    finish_reasons: Iterable[str] = (),
    usage: Usage | None = None,
    time_to_first_chunk_s: float | None = None,
    service_tier: str | None = None,
    system_fingerprint: str | None = None,
) -> dict[str, Any]:
    """The response part of a successful CLIENT span."""
    attrs: dict[str, Any] = {}
    if response_id:
        attrs[ga.GEN_AI_RESPONSE_ID] = response_id
    if response_model:
        attrs[ga.GEN_AI_RESPONSE_MODEL] = response_model
    reasons = tuple(finish_reasons)
    if reasons:
        attrs[ga.GEN_AI_RESPONSE_FINISH_REASONS] = reasons
    if usage is not None:
        attrs.update(usage_attributes(usage))
    if time_to_first_chunk_s is not None:
        attrs[ga.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK] = time_to_first_chunk_s
    if service_tier:
        attrs[OPENAI_RESPONSE_SERVICE_TIER] = service_tier
    if system_fingerprint:
        attrs[OPENAI_RESPONSE_SYSTEM_FINGERPRINT] = system_fingerprint
    return attrs


def server_request_attributes(
    *, method: str, path: str, request_id: str, user_agent: str | None
) -> dict[str, Any]:
    """The SERVER span's attributes known when the request arrives."""
    attrs: dict[str, Any] = {
        HTTP_REQUEST_METHOD: method,
        URL_PATH: path,
        TALLYGATE_REQUEST_ID: request_id,
    }
    if user_agent:
        attrs[USER_AGENT_ORIGINAL] = user_agent
    return attrs


def server_result_attributes(
    ctx: RequestContext, *, model: str | None, overhead_ms: float, cost_usd: float | None
) -> dict[str, Any]:
    """The SERVER span's attributes once the request is answered. `model`: the one the
    client asked for, redacted; `overhead_ms`, `cost_usd`: the request record's figures."""
    attributes = status_attributes(ctx.status)
    attributes.update(error_attributes(ctx.error_type, ctx.status if ctx.status >= 500 else None))
    principal = ctx.principal
    if principal is not None:
        attributes[TALLYGATE_TEAM] = principal.team
        attributes[TALLYGATE_KEY] = principal.key_name
    if model:
        attributes[TALLYGATE_MODEL] = model
    last = ctx.attempt
    if last is not None:
        attributes[TALLYGATE_DEPLOYMENT] = last.deployment
    attributes[TALLYGATE_ATTEMPTS] = len(ctx.attempts)
    if cost_usd is not None:
        attributes[TALLYGATE_COST_USD] = cost_usd
    if ctx.pricing_version:
        attributes[TALLYGATE_PRICING_VERSION] = ctx.pricing_version
    if ctx.budget_remaining_nano is not None:
        attributes[TALLYGATE_BUDGET_REMAINING_USD] = ctx.budget_remaining_nano / NANO_PER_USD
    if ctx.usage is not None:
        attributes[TALLYGATE_TOKENS_ESTIMATED] = ctx.usage.estimated
    for kind, n in ctx.redactions.items():
        attributes[TALLYGATE_REDACTIONS_PREFIX + kind] = n
    attributes[TALLYGATE_OVERHEAD_MS] = overhead_ms
    if ctx.stream:
        attributes[TALLYGATE_STREAM] = True
    if ctx.cancelled:
        attributes[TALLYGATE_CANCELLED] = True
    if ctx.usage_anomalies:
        attributes[TALLYGATE_USAGE_ANOMALIES] = list(ctx.usage_anomalies)
    if ctx.rejected:
        attributes[TALLYGATE_REJECTED] = ctx.rejected
    return attributes


def error_attributes(error_type: str | None, status: int | None = None) -> dict[str, Any]:
    """`error.type`: the gateway's low-cardinality error name, else the HTTP status."""
    if error_type:
        return {ERROR_TYPE: error_type}
    if status is not None and status >= 400:
        return {ERROR_TYPE: str(status)}
    return {}


def status_attributes(status: int) -> dict[str, Any]:
    return {HTTP_RESPONSE_STATUS_CODE: status} if status else {}


# --- metric attributes: low cardinality only ------------------------------------------


# A snapshot of a configured model: `-2024-07-18`, `-20241022`, `-0613`, `-002`, `-latest`,
# `-preview`, once or twice. Nothing freer: a label is exported as it is, and a client could
# otherwise append `-dave@example.com` to a configured name.
_SNAPSHOT = re.compile(
    r"(?:-(?:[0-9]{4}-[0-9]{2}-[0-9]{2}|[0-9]{8}|[0-9]{3,4}|latest|preview)){1,2}"
)


class ModelBuckets:
    """Maps a model name to itself when it is configured (or a snapshot of a configured
    one, `gpt-4o-mini-2024-07-18`), else to `_OTHER`, so metric series stay bounded and
    free of client text whatever names clients send or providers answer with."""

    __slots__ = ("_known", "_limit", "_seen")

    def __init__(self, known: Collection[str], limit: int = 512) -> None:
        self._known = frozenset(known)
        self._seen: dict[str, str] = {}
        self._limit = limit

    def __call__(self, name: str | None) -> str:
        if not name:
            return ""
        if name in self._known:
            return name
        bucket = self._seen.get(name)
        if bucket is None:
            bucket = OTHER
            if len(self._seen) < self._limit and any(
                name.startswith(known + "-") and _SNAPSHOT.fullmatch(name, len(known))
                for known in self._known
            ):
                bucket = name
            if len(self._seen) < self._limit:
                self._seen[name] = bucket
        return bucket


# --- content (opt-in): the GenAI messages schema, role + parts --------------------------


def _text_parts(content: Any) -> list[dict[str, Any]]:
    """OpenAI / Anthropic message content (a string or a list of parts) → parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts: list[dict[str, Any]] = []
    if not isinstance(content, list):
        return [{"type": "text", "content": str(content)}]
    for item in content:
        if isinstance(item, str):
            parts.append({"type": "text", "content": item})
            continue
        if not isinstance(item, Mapping):
            continue
        kind = item.get("type")
        if kind in ("text", "input_text", "output_text"):
            parts.append({"type": "text", "content": item.get("text", "")})
        elif kind in ("image_url", "input_image", "image"):
            parts.append(_image_part(item))
        elif kind == "tool_use":  # anthropic assistant content
            parts.append(
                {
                    "type": "tool_call",
                    "id": item.get("id"),
                    "name": item.get("name", ""),
                    "arguments": item.get("input"),
                }
            )
        elif kind == "tool_result":  # anthropic user content
            parts.append(
                {
                    "type": "tool_call_response",
                    "id": item.get("tool_use_id"),
                    "response": item.get("content"),
                }
            )
        elif kind in ("thinking", "reasoning"):
            parts.append(
                {"type": "reasoning", "content": item.get("thinking", item.get("text", ""))}
            )
        else:
            parts.append({"type": str(kind or "generic"), "value": "(not captured)"})
    return parts


def _image_part(item: Mapping[str, Any]) -> dict[str, Any]:
    url = item.get("image_url")
    if isinstance(url, Mapping):
        url = url.get("url")
    if isinstance(url, str) and not url.startswith("data:"):
        return {"type": "uri", "modality": "image", "mime_type": None, "uri": url}
    # inline data (a data: URL or base64 source) is not captured: size, not secrecy
    return {"type": "blob", "modality": "image", "mime_type": None, "content": ""}


def _tool_call_part(call: Mapping[str, Any]) -> dict[str, Any]:
    fn = call.get("function")
    fn = fn if isinstance(fn, Mapping) else {}
    return {
        "type": "tool_call",
        "id": call.get("id"),
        "name": fn.get("name", call.get("name", "")),
        "arguments": fn.get("arguments", call.get("arguments")),
    }


def _chat_message(message: Mapping[str, Any]) -> dict[str, Any]:
    role = message.get("role", "user")
    if role == "tool":
        parts: list[dict[str, Any]] = [
            {
                "type": "tool_call_response",
                "id": message.get("tool_call_id"),
                "response": message.get("content"),
            }
        ]
    else:
        parts = _text_parts(message.get("content"))
        for call in message.get("tool_calls") or ():
            if isinstance(call, Mapping):
                parts.append(_tool_call_part(call))
    out: dict[str, Any] = {"role": role, "parts": parts}
    if isinstance(name := message.get("name"), str):
        out["name"] = name
    return out


def input_content(body: Mapping[str, Any] | None) -> tuple[list[Any] | None, list[Any] | None]:
    """(system instructions, input messages) of a request body, per the GenAI messages
    schema. Chat history keeps its system messages in the input messages (as the
    convention says); instructions given apart from the history (Anthropic's `system`,
    the Responses API's `instructions`) go to system instructions. Not for embeddings,
    whose `input` is not a conversation (content_attributes skips them)."""
    if not body:
        return None, None
    system: list[Any] | None = None
    raw_system = body.get("system", body.get("instructions"))
    if raw_system is not None:
        system = _text_parts(raw_system)
    messages: list[Any] | None = None
    if isinstance(raw := body.get("messages"), list):
        messages = [_chat_message(m) for m in raw if isinstance(m, Mapping)]
    elif "prompt" in body:  # legacy completions: a string or a list of strings
        prompt = body["prompt"]
        prompts = prompt if isinstance(prompt, list) else [prompt]
        messages = [
            {"role": "user", "parts": [{"type": "text", "content": p}]}
            for p in prompts
            if isinstance(p, str)
        ]
    elif isinstance(raw_input := body.get("input"), str):  # Responses API
        messages = [{"role": "user", "parts": [{"type": "text", "content": raw_input}]}]
    elif isinstance(raw_input, list):
        messages = [_responses_item(item) for item in raw_input if isinstance(item, Mapping)]
    return system, messages


def _responses_item(item: Mapping[str, Any]) -> dict[str, Any]:
    kind = item.get("type")
    if kind == "function_call":
        return {
            "role": "assistant",
            "parts": [
                {
                    "type": "tool_call",
                    "id": item.get("call_id"),
                    "name": item.get("name", ""),
                    "arguments": item.get("arguments"),
                }
            ],
        }
    if kind == "function_call_output":
        return {
            "role": "tool",
            "parts": [
                {
                    "type": "tool_call_response",
                    "id": item.get("call_id"),
                    "response": item.get("output"),
                }
            ],
        }
    return {"role": item.get("role", "user"), "parts": _text_parts(item.get("content"))}


def output_content(
    output_text: Iterable[str],
    tool_calls: Iterable[Mapping[str, Any]],
    finish_reasons: Iterable[str],
) -> list[Any]:
    """The assistant's answer as one output message (text pieces joined)."""
    parts: list[dict[str, Any]] = []
    text = "".join(output_text)
    if text:
        parts.append({"type": "text", "content": text})
    for call in tool_calls:
        parts.append(_tool_call_part(call))
    reasons = list(finish_reasons)
    return [{"role": "assistant", "parts": parts, "finish_reason": reasons[0] if reasons else ""}]


def tool_definitions(body: Mapping[str, Any] | None) -> list[Any] | None:
    """`gen_ai.tool.definitions` from OpenAI (`function`) or Anthropic tool lists."""
    tools = body.get("tools") if body else None
    if not isinstance(tools, list) or not tools:
        return None
    out: list[Any] = []
    for tool in tools:
        if not isinstance(tool, Mapping):
            continue
        fn = tool.get("function")
        if isinstance(fn, Mapping):  # chat completions
            tool = fn
        name = tool.get("name")
        if not isinstance(name, str):
            out.append({"type": str(tool.get("type", "generic")), "name": ""})
            continue
        out.append(
            {
                "type": "function",
                "name": name,
                "description": tool.get("description"),
                "parameters": tool.get("parameters", tool.get("input_schema")),
            }
        )
    return out


def content_attributes(
    body: Mapping[str, Any] | None,
    operation: str,
    output_text: Iterable[str],
    tool_calls: Iterable[Mapping[str, Any]],
    finish_reasons: Iterable[str],
    *,
    has_output: bool,
) -> dict[str, Any]:
    """The content attributes as Python structures (not yet redacted nor serialized):
    gen_ai.system_instructions, gen_ai.input.messages, gen_ai.tool.definitions,
    gen_ai.output.messages. Embeddings carry no content."""
    if operation == ga.GenAiOperationNameValues.EMBEDDINGS.value:
        return {}
    attrs: dict[str, Any] = {}
    system, messages = input_content(body)
    if system:
        attrs[ga.GEN_AI_SYSTEM_INSTRUCTIONS] = system
    if messages:
        attrs[ga.GEN_AI_INPUT_MESSAGES] = messages
    if tools := tool_definitions(body):
        attrs[ga.GEN_AI_TOOL_DEFINITIONS] = tools
    if has_output:
        attrs[ga.GEN_AI_OUTPUT_MESSAGES] = output_content(output_text, tool_calls, finish_reasons)
    return attrs
