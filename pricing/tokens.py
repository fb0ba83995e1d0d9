"""TokenCounter: prompt token counts with tiktoken, and the estimate used when it cannot count.

Chat requests follow OpenAI's cookbook formula (`num_tokens_from_messages`): 3 tokens per
message, every string value of the message encoded, +1 per `name`, +3 to prime the reply.
Counts are exact (estimated=False) only where that formula is: messages of plain string
values under `role`, `content` and `name`, for a model whose tiktoken encoding we know.
Everything else is a documented approximation and is marked estimated=True:

- content as a list of parts: text parts encoded and summed (one text part is exact);
  images, files and audio (chat, Responses and Anthropic shapes, tool_result content too)
  at an upper bound by the provider's published rules, in pricing/media.py: the image's
  size read from its header bytes, the family's largest image when it cannot be read;
  a PDF's pages, a file's bytes, audio's duration. Anthropic text documents are encoded.
  Parts nested deeper than MAX_PART_DEPTH are walked without recursion.
- assistant `tool_calls`: name + arguments encoded, + TOKENS_PER_TOOL_CALL each.
- `tools` / `functions`: the cookbook's `num_tokens_for_tools` constants (gpt-4o values
  for o200k models, gpt-4/3.5 values otherwise); nested schemas encoded as compact JSON.
- `response_format` json_schema: the schema encoded as compact JSON.
- other models (claude-*, gemini-*, llama, mistral...): o200k_base.
- no encoding loadable (packaged file damaged or missing; other encodings: no cache, no network): ceil(chars / 4), warned about once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from functools import lru_cache, partial
from typing import Any, NamedTuple

import tiktoken

from . import encodings, media
from .table import PROVIDER_PREFIXES

log = logging.getLogger("tallygate.pricing")

O200K = "o200k_base"
CL100K = "cl100k_base"
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-3-", "text-embedding-ada-002")

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
TOKENS_PER_TOOL_CALL = 3
MAX_PART_DEPTH = 32  # tool_result / document nesting counted by recursion; deeper: a walk
CHARS_PER_TOKEN = 4
INLINE_LIMIT_CHARS = 16_384  # larger requests are counted in a worker thread
# cookbook num_tokens_for_tools: (func_init, prop_init, prop_key, enum_init, enum_item, func_end)
_TOOL_CONSTANTS_O200K = (7, 3, 3, -3, 3, 12)
_TOOL_CONSTANTS_CL100K = (10, 3, 3, -3, 3, 12)
_EXACT_KEYS = frozenset({"role", "content", "name"})
_ITEM_FIELDS = frozenset({"type", "id", "status"})  # of a Responses message item
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
_IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})
_FILE_PARTS = frozenset({"file", "input_file", "document"})
_MEDIA_PARTS = _IMAGE_PARTS | _FILE_PARTS | {"input_audio"}

Count = Callable[[str], int]


class TokenCount(NamedTuple):
    tokens: int
    estimated: bool


# Memoised: tiktoken's lookup raises (and we catch) a KeyError for every other model, ~3 µs
# each time. Bounded, since the model name comes from the client.
@lru_cache(maxsize=1024)
def _encoding_name(model: str) -> str | None:
    name = _base_model(model)
    if name.startswith(_O200K_PREFIXES):
        return O200K
    if name.startswith(_CL100K_PREFIXES):
        return CL100K
    try:
        return tiktoken.encoding_name_for_model(name)
    except KeyError:
        return None


class TokenCounter:
    """Counts prompt tokens. Build one per process (in the lifespan) and share it.

    Encodings load lazily on first use, once, under a lock, each in a helper thread
    joined with `load_timeout_s` so a download that hangs cannot hang the caller.
    `cache_dir` is handed to tiktoken through TIKTOKEN_CACHE_DIR, which tiktoken reads
    itself; it is set only when unset (tiktoken has no API for it).
    """

    def __init__(self, cache_dir: str | None = None, *, load_timeout_s: float = 30.0) -> None:
        self._cache_dir = cache_dir
        self._load_timeout_s = load_timeout_s
        self._lock = threading.Lock()
        self._encodings: dict[str, tiktoken.Encoding] = {}
        self._failed: set[str] = set()
        self._warned = False

    def encoding_name(self, model: str) -> str | None:
        """The tiktoken encoding of an OpenAI model, None for any other model."""
        return _encoding_name(model)

    def count_text(self, model: str, text: str) -> TokenCount:
        count, estimated = self._tokenizer(model)
        return TokenCount(count(text), estimated)

    def count_chat(self, model: str, body: Mapping[str, Any]) -> TokenCount:
        """Prompt tokens of a chat request (OpenAI shape; Anthropic `system` and blocks too)."""
        count, estimated = self._tokenizer(model)
        total, approx = REPLY_PRIMING, False
        system = body.get("system")
        if system:  # Anthropic Messages: the system prompt sits beside the messages
            n, _ = _content(count, system, model)
            total += TOKENS_PER_MESSAGE + count("system") + n
            approx = True
        for message in body.get("messages") or ():
            n, a = _message(count, message, model)
            total += n
            approx = approx or a
        functions = body.get("tools") or body.get("functions")
        if isinstance(functions, list) and functions:
            total += _tools(count, functions, self.encoding_name(model) == CL100K)
            approx = True
        schema = _json_schema(body.get("response_format"))
        if schema is not None:
            total += count(_json(schema))
            approx = True
        return TokenCount(total, estimated or approx)

    def count_prompt(self, model: str, prompt: Any) -> TokenCount:
        """Legacy completions `prompt`: str, list[str], list[int] or list[list[int]]."""
        count, estimated = self._tokenizer(model)
        tokens, used_text = _inputs(count, prompt)
        return TokenCount(tokens, estimated and used_text)

    def count_embeddings(self, model: str, input: Any) -> TokenCount:
        """Embeddings `input`, in the same shapes as a completions prompt."""
        return self.count_prompt(model, input)

    def count_responses(self, model: str, body: Mapping[str, Any]) -> TokenCount:
        """Prompt tokens of a Responses API request, by the chat formula: `instructions` as
        a system message, `input` (a string is one user message; else items: messages with
        text, image, file and audio parts, function calls and their outputs), `tools`, the
        `text.format` JSON schema. Exact where chat's count is (string messages); turns held
        upstream (`previous_response_id`, `conversation`, item references) are not counted,
        and the count is then estimated."""
        count, estimated = self._tokenizer(model)
        total, approx = REPLY_PRIMING, False
        instructions = body.get("instructions")
        if instructions:
            n, a = _content(count, instructions, model)
            total += TOKENS_PER_MESSAGE + count("system") + n
            approx = a
        items = body.get("input")
        if isinstance(items, str):
            total += TOKENS_PER_MESSAGE + count("user") + count(items)
        elif isinstance(items, list):
            for item in items:
                n, a = _response_item(count, item, model)
                total += n
                approx = approx or a
        elif items is not None:
            total += _opaque(count, items, model)
            approx = True
        tools = body.get("tools")
        if isinstance(tools, list) and tools:
            total += _tools(count, tools, self.encoding_name(model) == CL100K)
            approx = True
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, Mapping) else None
        if isinstance(fmt, Mapping) and fmt.get("type") == "json_schema":
            total += count(_json(fmt.get("schema") or {}))
            approx = True
        if body.get("previous_response_id") or body.get("conversation"):
            approx = True
        return TokenCount(total, estimated or approx)

    async def count_request(
        self, operation: str, model: str, body: Mapping[str, Any]
    ) -> TokenCount:
        """Count a request body for "chat", "text_completion", "embeddings" or "responses".

        Encodings load in a thread, and bodies over INLINE_LIMIT_CHARS of text are
        counted in one, so the event loop never waits on either.
        """
        if operation == "chat":
            run = partial(self.count_chat, model, body)
        elif operation == "text_completion":
            run = partial(self._count_completion, model, body)
        elif operation == "embeddings":
            run = partial(self.count_embeddings, model, body.get("input"))
        elif operation == "responses":
            run = partial(self.count_responses, model, body)
        else:
            raise ValueError(f"cannot count tokens for operation {operation!r}")
        if not self._ready(model) or _chars(body, INLINE_LIMIT_CHARS) > INLINE_LIMIT_CHARS:
            return await asyncio.to_thread(run)
        return run()

    def _count_completion(self, model: str, body: Mapping[str, Any]) -> TokenCount:
        prompt = self.count_prompt(model, body.get("prompt"))
        suffix = body.get("suffix")
        if not isinstance(suffix, str) or not suffix:
            return prompt
        extra = self.count_text(model, suffix)
        return TokenCount(prompt.tokens + extra.tokens, prompt.estimated or extra.estimated)

    # encodings

    def _chain(self, model: str) -> tuple[str, ...]:
        name = self.encoding_name(model)
        return (O200K,) if name is None or name == O200K else (name, O200K)

    def _ready(self, model: str) -> bool:
        return all(n in self._encodings or n in self._failed for n in self._chain(model))

    def _tokenizer(self, model: str) -> tuple[Count, bool]:
        """The counting function for `model`, and whether its counts are estimates."""
        exact = self.encoding_name(model) is not None
        for name in self._chain(model):
            encoding = self._encoding(name)
            if encoding is not None:
                return _counter(encoding), not exact
            exact = False
        return _estimate, True

    def _encoding(self, name: str) -> tiktoken.Encoding | None:
        encoding = self._encodings.get(name)
        if encoding is not None or name in self._failed:
            return encoding
        with self._lock:
            if name not in self._encodings and name not in self._failed:
                self._load(name)
        return self._encodings.get(name)

    def _load(self, name: str) -> None:
        """Load one encoding (lock held). A load that times out may still land later."""
        if self._cache_dir is not None:
            current = os.environ.setdefault("TIKTOKEN_CACHE_DIR", self._cache_dir)
            if current != self._cache_dir:
                log.warning("TIKTOKEN_CACHE_DIR=%s is set and wins over cache_dir", current)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self._encodings[name] = _lean(encodings.get_encoding(name))
            except BaseException as exc:  # reported below, in the caller's thread
                errors.append(exc)

        worker = threading.Thread(target=run, name=f"tiktoken-load-{name}", daemon=True)
        worker.start()
        worker.join(self._load_timeout_s)
        if name in self._encodings:
            return
        self._failed.add(name)
        if errors:
            reason = f"{type(errors[0]).__name__}: {errors[0]}"
        else:
            reason = f"timed out after {self._load_timeout_s}s"
        if not self._warned:
            self._warned = True
            log.warning(
                "tiktoken encoding %s could not be loaded (%s); token counts fall back to "
                "estimates and are marked estimated.",
                name,
                reason,
            )


def _lean(encoding: tiktoken.Encoding) -> tiktoken.Encoding:
    """Drop the Python copy of the rank table (o200k: 200k bytes → int, ~30 MB). tiktoken
    (0.14) keeps it only to pickle the Encoding; the Rust core encodes from its own copy.
    Should a release encode from it, the table is put back."""
    ranks = getattr(encoding, "_mergeable_ranks", None)
    if isinstance(ranks, dict) and ranks:
        encoding._mergeable_ranks = {}
        try:
            ok = encoding.decode(encoding.encode_ordinary("lean check ✓")) == "lean check ✓"
        except Exception:
            ok = False
        if not ok:
            encoding._mergeable_ranks = ranks
    return encoding


def _base_model(model: str) -> str:
    name = model.strip().lower()
    while "/" in name and name.split("/", 1)[0] in PROVIDER_PREFIXES:
        name = name.split("/", 1)[1]
    return name.removeprefix("ft:")


def _counter(encoding: tiktoken.Encoding) -> Count:
    encode = encoding.encode_ordinary  # special-token text in a prompt is just text
    return lambda text: len(encode(text))


def _estimate(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _message(count: Count, message: Any, model: str = "") -> tuple[int, bool]:
    """One message by the cookbook formula; (tokens, approximate)."""
    if not isinstance(message, Mapping):
        return 0, True
    total, approx = TOKENS_PER_MESSAGE, False
    for key, value in message.items():
        if value is None:
            continue
        if isinstance(value, str):
            total += count(value)
            if key == "name":
                total += TOKENS_PER_NAME
            approx = approx or key not in _EXACT_KEYS
        elif key == "content":
            n, a = _content(count, value, model)
            total += n
            approx = approx or a
        elif key == "tool_calls" and isinstance(value, list):
            total += sum(_tool_call(count, call) for call in value)
            approx = True
        elif key == "function_call" and isinstance(value, Mapping):
            total += _tool_call(count, {"function": value})
            approx = True
        else:
            total += count(_json(value))
            approx = True
    return total, approx


def _response_item(count: Count, item: Any, model: str) -> tuple[int, bool]:
    """One Responses API input item; (tokens, approximate)."""
    if not isinstance(item, Mapping):
        return _opaque(count, item, model), True
    kind = item.get("type", "message")
    if kind == "message":  # its type, id and status are not text the model reads
        message = {k: v for k, v in item.items() if k not in _ITEM_FIELDS}
        return _message(count, message, model)
    if kind == "function_call":
        return _tool_call(count, {"function": item}), True
    if kind == "function_call_output":
        output = item.get("output")
        n = count(output) if isinstance(output, str) else _content(count, output, model)[0]
        return TOKENS_PER_MESSAGE + n, True
    return _opaque(count, item, model), True  # reasoning, hosted tool calls, references


def _content(count: Count, content: Any, model: str = "", depth: int = 0) -> tuple[int, bool]:
    """A content string or list of parts; (tokens, approximate)."""
    if isinstance(content, str):
        return count(content), False
    if depth > MAX_PART_DEPTH:
        return _walk(count, content, model), True
    if not isinstance(content, list):
        return _opaque(count, content, model), True
    total, approx = 0, len(content) != 1
    for part in content:
        n, a = _part(count, part, model, depth)
        total += n
        approx = approx or a
    return total, approx


def _part(count: Count, part: Any, model: str = "", depth: int = 0) -> tuple[int, bool]:
    if isinstance(part, str):
        return count(part), True
    if not isinstance(part, Mapping):
        return 0, True
    kind = part.get("type")
    if not isinstance(kind, str):  # also keeps an unhashable "type" out of the set lookups
        return _opaque(count, part, model), True
    if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
        return count(part["text"]), False
    if kind in _MEDIA_PARTS:
        blocks = _document_blocks(part)
        if blocks is not None:  # Anthropic document with a content source
            n, _ = _content(count, blocks, model, depth + 1)
            return n + _file_names(count, part), True
        return _media(count, kind, part, model), True
    if kind == "tool_use":  # Anthropic
        return count(str(part.get("name") or "")) + _opaque(count, part.get("input"), model), True
    if kind == "tool_result":  # Anthropic
        return _content(count, part.get("content") or "", model, depth + 1)[0], True
    return _opaque(count, part, model), True


def _media(count: Count, kind: str, part: Mapping[str, Any], model: str) -> int:
    """An image, audio or file part at its upper bound (pricing/media.py)."""
    name = _base_model(model)
    if kind in _IMAGE_PARTS:
        return media.image_tokens(name, part)
    if kind == "input_audio":
        return media.audio_tokens(name, part)
    source = part.get("source")
    names = _file_names(count, part)
    if isinstance(source, Mapping) and source.get("type") == "text":  # Anthropic
        data = source.get("data")
        return names + (count(data) if isinstance(data, str) else 0)
    return names + media.file_tokens(name, part)


def _document_blocks(part: Mapping[str, Any]) -> Any:
    source = part.get("source")
    if part.get("type") == "document" and isinstance(source, Mapping):
        if source.get("type") == "content":
            return source.get("content") or ""
    return None


def _file_names(count: Count, part: Mapping[str, Any]) -> int:
    """A file's name, an Anthropic document's title and context: text the model sees."""
    inner = part.get("file")
    fields = inner if isinstance(inner, Mapping) else part
    values = (part.get("title"), part.get("context"), fields.get("filename"))
    return sum(count(value) for value in values if isinstance(value, str))


def _opaque(count: Count, value: Any, model: str) -> int:
    """Any other JSON as compact JSON text; nested too deep for that, walked."""
    try:
        return count(_json(value))
    except RecursionError:
        return _walk(count, value, model)


def _walk(count: Count, value: Any, model: str) -> int:
    """Parts nested past MAX_PART_DEPTH, without recursion: every string encoded, media
    parts at their bounds, keys and punctuation not counted (the count is estimated)."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += count(item)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, Mapping):
            kind, blocks = item.get("type"), _document_blocks(item)
            if blocks is not None:
                stack.append(blocks)
                total += _file_names(count, item)
            elif isinstance(kind, str) and kind in _MEDIA_PARTS:
                total += _media(count, kind, item, model)
            else:
                stack.extend(item.values())
    return total


def _tool_call(count: Count, call: Any) -> int:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping):
        return TOKENS_PER_TOOL_CALL + count(_json(call))
    name, arguments = fn.get("name"), fn.get("arguments")
    if not isinstance(arguments, str):
        arguments = _json(arguments)
    return TOKENS_PER_TOOL_CALL + count(str(name or "")) + count(arguments)


def _tools(count: Count, tools: list[Any], cl100k: bool) -> int:
    """Tool definitions, by the cookbook's `num_tokens_for_tools`."""
    func_init, prop_init, prop_key, enum_init, enum_item, func_end = (
        _TOOL_CONSTANTS_CL100K if cl100k else _TOOL_CONSTANTS_O200K
    )
    total = func_end
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or "name" not in fn:
            total += func_init + count(_json(tool))
            continue
        description = str(fn.get("description") or "").removesuffix(".")
        total += func_init + count(f"{fn['name']}:{description}")
        parameters = fn.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        if not isinstance(properties, Mapping) or not properties:
            continue
        total += prop_init
        for key, prop in properties.items():
            prop = prop if isinstance(prop, Mapping) else {}
            total += prop_key
            enum = prop.get("enum")
            if isinstance(enum, list):
                total += enum_init + sum(enum_item + count(str(item)) for item in enum)
            kind = prop.get("type", "")
            kind = ",".join(map(str, kind)) if isinstance(kind, list) else str(kind)
            description = str(prop.get("description") or "").removesuffix(".")
            total += count(f"{key}:{kind}:{description}")
            nested = {k: v for k, v in prop.items() if k in ("properties", "items", "anyOf")}
            if nested:
                total += count(_json(nested))
    return total


def _json_schema(response_format: Any) -> Any:
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
        return response_format.get("json_schema") or {}
    return None


def _inputs(count: Count, value: Any) -> tuple[int, bool]:
    """Tokens of a prompt/input in any accepted shape; (tokens, any text was encoded)."""
    if value is None:
        return 0, False
    if isinstance(value, str):
        return count(value), True
    if isinstance(value, list):
        if all(isinstance(item, int) for item in value):
            return len(value), False
        total, used_text = 0, False
        for item in value:
            n, t = _inputs(count, item)
            total += n
            used_text = used_text or t
        return total, used_text
    return count(_json(value)), True


def _chars(value: Any, limit: int) -> int:
    """Characters of text in a JSON body, counting stops soon after `limit`."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        items: Any = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return 0
    total = 0
    for item in items:
        total += _chars(item, limit - total)
        if total > limit:
            break
    return total
