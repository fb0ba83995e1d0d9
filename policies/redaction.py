"""Redaction policy: its config model and the Redactor that masks PII and secrets in text and JSON."""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
from itertools import compress
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from policies.detectors import BUILTIN_BRANCHES, Branch, normalize

DetectorName = Literal["email", "phone", "credit_card", "ssn", "iban", "ip", "secret"]

_CONTAINERS = (dict, list, tuple)
# Strings that make up the structure of OpenAI bodies and GenAI content (roles, part
# types, finish reasons): each one the detectors find nothing in is skipped per request.
_STRUCTURE_WORDS = (
    "system", "user", "assistant", "tool", "developer", "function", "text", "image_url",
    "input_audio", "file", "tool_call", "tool_call_response", "stop", "length",
    "content_filter", "tool_calls", "function_call", "json_object", "json_schema", "auto",
    "none", "required",
)  # fmt: skip
_RECURSION_LIMIT = 48  # deeper than this, redact_value walks with an explicit stack
_PAST_ANCHOR = r"[\s\S]"


class CustomPattern(BaseModel):
    """A user regex reported and labelled under its own name (`employee_id` → `[EMPLOYEE_ID]`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
    pattern: str = Field(min_length=1)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str, info: ValidationInfo) -> str:
        name = info.data.get("name", "?")
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"custom pattern {name!r} does not compile: {exc}") from None
        if compiled.fullmatch(""):
            raise ValueError(f"custom pattern {name!r} matches the empty string")
        return value


class RedactionConfig(BaseModel):
    """The `redaction:` section of config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    detectors: list[DetectorName] = Field(default_factory=lambda: list(get_args(DetectorName)))
    custom: list[CustomPattern] = Field(default_factory=list)
    replacement: Literal["label", "hash"] = "label"
    hash_key: str = ""  # empty: a random key per Redactor, tags then stable within one process
    upstream: bool = False  # also mask prompts sent to the provider (the model sees labels)
    max_chars: int = Field(default=32768, ge=0)  # longer strings are cut first; 0: no limit


# A found span: (start, end, kind) of the text that is replaced.
_Span = tuple[int, int, str]


class Redactor:
    """Masks what the configured detectors find. Built once per config; thread-safe."""

    def __init__(self, config: RedactionConfig) -> None:
        self.config = config
        self._max_chars = config.max_chars
        self._hash_key = config.hash_key.encode() if config.hash_key else secrets.token_bytes(32)
        self._hashed = config.replacement == "hash"
        self._matcher = _matcher(frozenset(config.detectors)) if config.detectors else None
        self._customs = [(re.compile(c.pattern), c.name) for c in config.custom]
        self._labels: dict[str, str] = {kind: kind.upper() for kind in config.detectors}
        self._labels.update({name: name.upper() for _, name in self._customs})
        self._clean = frozenset(w for w in _STRUCTURE_WORDS if not self._find(w))

    def redact(self, text: str, *, truncate: bool = True) -> tuple[str, dict[str, int]]:
        """The text with every detected value replaced, and the count per detector type.

        A string longer than `max_chars` is first cut (at whitespace near the limit, so no
        fragment of a value is left at the cut) and ends with `…[truncated N chars]`."""
        marker = ""
        if truncate and self._max_chars and len(text) > self._max_chars:
            text, marker = _truncate(text, self._max_chars)
        spans = self._find(text)
        if not spans:
            return (text + marker if marker else text), {}
        counts: dict[str, int] = {}
        parts: list[str] = []
        last = 0
        for start, end, kind in spans:
            parts.append(text[last:start])
            parts.append(self._tag(kind, text[start:end]))
            counts[kind] = counts.get(kind, 0) + 1
            last = end
        parts.append(text[last:])
        parts.append(marker)
        return "".join(parts), counts

    def finds(self, text: str) -> bool:
        """Whether the detectors find anything in `text` (a value to refuse, not to mask)."""
        return bool(self._find(text))

    def redact_value(self, obj: Any, *, truncate: bool = True) -> tuple[Any, dict[str, int]]:
        """`obj` (JSON-like: dicts, lists, strings, other scalars) with every string value
        redacted; dict keys are kept. Containers where nothing changed are returned as they
        are, so an object without findings comes back unchanged (the same object)."""
        counts: dict[str, int] = {}
        return self._walk(obj, counts, truncate, 0), counts

    def _walk(self, node: Any, counts: dict[str, int], truncate: bool, depth: int) -> Any:
        """Recursive while shallow (the usual case, and the fastest); deeper, iterative."""
        if isinstance(node, str):
            return self._leaf(node, counts, truncate)
        if not isinstance(node, _CONTAINERS):
            return node
        if depth >= _RECURSION_LIMIT:
            return self._walk_deep(node, counts, truncate)
        depth += 1
        if isinstance(node, dict):
            changed = None
            for key, value in node.items():
                new = self._walk(value, counts, truncate, depth)
                if new is not value:
                    if changed is None:
                        changed = dict(node)
                    changed[key] = new
            return node if changed is None else changed
        done = [self._walk(value, counts, truncate, depth) for value in node]
        if all(new is old for new, old in zip(done, node, strict=True)):
            return node
        return tuple(done) if isinstance(node, tuple) else done

    def _walk_deep(self, obj: Any, counts: dict[str, int], truncate: bool) -> Any:
        # Iterative post-order walk: deeply nested JSON cannot exhaust the interpreter stack.
        stack: list[tuple[Any, list[Any], list[Any]]] = [(obj, _children(obj), [])]
        while True:
            node, items, done = stack[-1]
            if len(done) < len(items):
                child = items[len(done)]
                if isinstance(child, _CONTAINERS):
                    stack.append((child, _children(child), []))
                else:
                    done.append(self._leaf(child, counts, truncate))
                continue
            stack.pop()
            result = _rebuild(node, items, done)
            if not stack:
                return result
            stack[-1][2].append(result)

    def _leaf(self, value: Any, counts: dict[str, int], truncate: bool) -> Any:
        if not isinstance(value, str) or value in self._clean:
            return value
        new, found = self.redact(value, truncate=truncate)
        for kind, n in found.items():
            counts[kind] = counts.get(kind, 0) + n
        return new

    def _find(self, text: str) -> list[_Span]:
        spans = self._matcher.find(text) if self._matcher is not None else []
        if self._customs:
            extra = [
                (m.start(), m.end(), name)
                for pattern, name in self._customs
                for m in pattern.finditer(text)
                if m.end() > m.start()
            ]
            if extra:
                spans = _merge(spans + extra)
        return spans

    def _tag(self, kind: str, value: str) -> str:
        label = self._labels[kind]
        if not self._hashed:
            return f"[{label}]"
        digest = hmac.new(self._hash_key, normalize(kind, value).encode(), hashlib.sha256)
        return f"[{label}:{digest.hexdigest()[:6]}]"


@functools.lru_cache(maxsize=8)
def _matcher(detectors: frozenset[str]) -> _Matcher:
    """Compiled once per set of enabled detectors (the patterns are constants)."""
    return _Matcher([b for b in BUILTIN_BRANCHES if b.kind in detectors])


class _Matcher:
    """Finds the built-in detectors' values in one scan of the text.

    The scan jumps from one non-alphanumeric character (an anchor) to the next where a
    branch may match; there a probe reports what each branch that can start there
    matches, and validators (Luhn, mod-97, ipaddress) keep or drop each candidate."""

    def __init__(self, branches: list[Branch]) -> None:
        scans = dict.fromkeys(b.scan or b.pattern for b in branches)  # in order, once each
        alternatives = "|".join(f"(?:{scan})" for scan in scans)
        self._scan = re.compile(f"[^A-Za-z0-9](?:{alternatives})")
        self._probes = _ProbeTables(branches)

    def find(self, text: str) -> list[_Span]:
        """Non-overlapping spans to mask: the earliest match wins, then the longest; a
        candidate that fails its validation blocks nothing."""
        spans: list[_Span] = []
        padded = " " + text  # an anchor for a value at the very start; offsets are +1
        search, probe_at = self._scan.search, self._probes.at
        pos = floor = 0
        while (found := search(padded, pos)) is not None:
            anchor = found.start()
            best_end, best = -1, None
            for branch, start, end, mask_start, mask_end in probe_at(padded, anchor):
                if end <= best_end or start < floor:
                    continue  # no longer than the best, or overlapping the previous span
                if branch.validate is not None:
                    checked = branch.validate(padded, mask_start, mask_end)
                    if checked < 0:
                        continue
                    if checked != mask_end:
                        end = mask_end = checked
                if end > best_end:
                    best_end, best = end, (mask_start - 1, mask_end - 1, branch.kind)
            if best is None:
                pos = anchor + 1
            else:
                spans.append(best)
                # the next value may start right at this one's end: its anchor is then
                # this one's last character
                pos, floor = best_end - 1, best_end
        return spans


class _Probe:
    """A lookahead per branch, matched at an anchor: what each branch matches there."""

    def __init__(self, branches: list[Branch]) -> None:
        self.pattern = re.compile(
            "".join(
                f"(?:(?={'' if b.at_anchor else _PAST_ANCHOR}(?P<{b.name}>{b.pattern}))|)"
                for b in branches
            )
        )
        index = self.pattern.groupindex
        self.branches = [(b, index[b.name], index[b.value] if b.value else 0) for b in branches]
        self.groups = [group for _, group, _ in self.branches]

    def run(self, text: str, anchor: int) -> list[tuple[Branch, int, int, int, int]]:
        """(branch, start, end, mask start, mask end) of each branch that matches here."""
        found = self.pattern.match(text, anchor)
        if found is None:  # cannot happen: every lookahead is optional
            return []
        regs = found.regs
        return [
            (branch, *regs[group], *(regs[value] if value else regs[group]))
            # only the branches that matched: their groups are non-empty strings
            for branch, group, value in compress(self.branches, found.group(0, *self.groups)[1:])
        ]


class _ProbeTables:
    """The probe for an anchor, chosen by the character after it (and by the anchor
    itself for branches that start on it), so that only branches that can start there
    are tried."""

    def __init__(self, branches: list[Branch]) -> None:
        ascii_chars = [chr(code) for code in range(128)]
        starts = {b.name: {c for c in ascii_chars if re.fullmatch(b.first, c)} for b in branches}
        on_anchor = set().union(*(starts[b.name] for b in branches if b.at_anchor))
        compiled: dict[tuple[str, ...], _Probe] = {}

        def table(anchor: str) -> dict[str, _Probe]:
            probes = {}
            for c in ascii_chars:
                members = [b for b in branches if (anchor if b.at_anchor else c) in starts[b.name]]
                key = tuple(b.name for b in members)
                if key not in compiled:
                    compiled[key] = _Probe(members)
                probes[c] = compiled[key]
            return probes

        self._default = table("")
        self._by_anchor = {anchor: table(anchor) for anchor in on_anchor}
        self._all = _Probe(branches)  # after a non-ASCII character

    def at(self, text: str, anchor: int) -> list[tuple[Branch, int, int, int, int]]:
        probes = self._by_anchor.get(text[anchor], self._default)
        probe = probes.get(text[anchor + 1 : anchor + 2]) or self._all
        return probe.run(text, anchor)


def _truncate(text: str, limit: int) -> tuple[str, str]:
    cut = limit
    if not text[cut].isspace() and not text[cut - 1].isspace():
        for i in range(cut - 1, max(cut - 256, 0), -1):
            if text[i - 1].isspace():
                cut = i
                break
    return text[:cut], f"…[truncated {len(text) - cut} chars]"


def _merge(spans: list[_Span]) -> list[_Span]:
    """Built-in and custom spans together: the earliest, then longest, names a region;
    a span overlapping it extends it, so that no part of either is left unmasked."""
    merged: list[_Span] = []
    for span in sorted(spans, key=lambda s: (s[0], -s[1])):
        if merged and span[0] < merged[-1][1]:
            start, end, kind = merged[-1]
            merged[-1] = (start, max(end, span[1]), kind)
        else:
            merged.append(span)
    return merged


def _children(node: Any) -> list[Any]:
    return list(node.values()) if isinstance(node, dict) else list(node)


def _rebuild(node: Any, items: list[Any], done: list[Any]) -> Any:
    if all(new is old for new, old in zip(done, items, strict=True)):
        return node
    if isinstance(node, dict):
        return dict(zip(node.keys(), done, strict=True))
    return tuple(done) if isinstance(node, tuple) else done
