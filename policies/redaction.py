"""Redaction policy: its config model and the Redactor that masks PII and secrets in text and JSON."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from policies.detectors import BUILTIN_BRANCHES, DETECTOR_TYPES, Branch, normalize

DetectorName = Literal["email", "phone", "credit_card", "ssn", "iban", "ip", "secret"]

_CONTAINERS = (dict, list, tuple)


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

    detectors: list[DetectorName] = Field(default_factory=lambda: list(DETECTOR_TYPES))
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
        self._config = config
        self._max_chars = config.max_chars
        self._hash_key = config.hash_key.encode() if config.hash_key else secrets.token_bytes(32)
        self._hashed = config.replacement == "hash"
        enabled = set(config.detectors)
        branches = [b for b in BUILTIN_BRANCHES if b.kind in enabled]
        # Custom patterns join the combined pattern unless they carry groups of their own
        # (their numbers would shift) or global flags (only legal at the start): those run
        # as their own pass, merged with the others.
        self._separate: list[tuple[re.Pattern[str], str]] = []
        for i, custom in enumerate(config.custom):
            compiled = re.compile(custom.pattern)
            if compiled.groups == 0 and _embeddable(custom.pattern):
                branches.append(Branch(f"custom_{i}", custom.name, f"(?:{custom.pattern})"))
            else:
                self._separate.append((compiled, custom.name))
        self._labels = {b.kind: b.kind.upper() for b in branches}
        self._labels.update({name: name.upper() for _, name in self._separate})
        self._scan: re.Pattern[str] | None = None
        if branches:
            # One pass finds the next position where any branch matches; at that position
            # one probe (a lookahead per branch) reports what every branch matches there.
            self._scan = re.compile("|".join(f"(?:{b.pattern})" for b in branches))
            self._probe = re.compile("".join(f"(?:(?=(?P<{b.name}>{b.pattern}))|)" for b in branches))
            index = self._probe.groupindex
            self._branches = [(b, index[b.name], index[b.value] if b.value else 0) for b in branches]

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

    def redact_value(self, obj: Any, *, truncate: bool = True) -> tuple[Any, dict[str, int]]:
        """`obj` (JSON-like: dicts, lists, strings, other scalars) with every string value
        redacted; dict keys are kept. Containers where nothing changed are returned as they
        are, so an object without findings comes back unchanged (the same object)."""
        counts: dict[str, int] = {}
        if not isinstance(obj, _CONTAINERS):
            return self._leaf(obj, counts, truncate), counts
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
                return result, counts
            stack[-1][2].append(result)

    def _leaf(self, value: Any, counts: dict[str, int], truncate: bool) -> Any:
        if not isinstance(value, str):
            return value
        new, found = self.redact(value, truncate=truncate)
        for kind, n in found.items():
            counts[kind] = counts.get(kind, 0) + n
        return new

    def _find(self, text: str) -> list[_Span]:
        """Non-overlapping spans to mask: the earliest match wins, then the longest; a
        candidate that fails its validation (Luhn, mod-97, ipaddress) blocks nothing."""
        spans: list[_Span] = []
        if self._scan is not None:
            search, probe = self._scan.search, self._probe.match
            pos, size = 0, len(text)
            while pos < size:
                found = search(text, pos)
                if found is None:
                    break
                at = found.start()
                regs = probe(text, at).regs  # type: ignore[union-attr]  # matches at `at`
                best_end, best = -1, None
                for branch, group, value in self._branches:
                    start, end = regs[group]
                    if end <= start or end <= best_end:
                        continue  # this branch did not match here, or matched no longer
                    mask_start, mask_end = regs[value] if value else (start, end)
                    if branch.validate is not None:
                        checked = branch.validate(text, mask_start, mask_end)
                        if checked < 0:
                            continue
                        if checked != mask_end:
                            end = mask_end = checked
                    if end > best_end:
                        best_end, best = end, (mask_start, mask_end, branch.kind)
                if best is None:
                    pos = at + 1
                else:
                    spans.append(best)
                    pos = best_end
        if self._separate:
            extra = [
                (m.start(), m.end(), name)
                for pattern, name in self._separate
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


def _embeddable(pattern: str) -> bool:
    """Whether `pattern` compiles inside an alternation (global flags such as a leading
    `(?i)` do not)."""
    try:
        re.compile(f"x|(?:{pattern})")
    except re.error:
        return False
    return True


def _truncate(text: str, limit: int) -> tuple[str, str]:
    cut = limit
    if not text[cut].isspace() and not text[cut - 1].isspace():
        for i in range(cut - 1, max(cut - 256, 0), -1):
            if text[i - 1].isspace():
                cut = i
                break
    return text[:cut], f"…[truncated {len(text) - cut} chars]"


def _merge(spans: list[_Span]) -> list[_Span]:
    """Earliest, then longest, of possibly overlapping spans."""
    merged: list[_Span] = []
    last = 0
    for span in sorted(spans, key=lambda s: (s[0], -s[1])):
        if span[0] >= last:
            merged.append(span)
            last = span[1]
    return merged


def _children(node: Any) -> list[Any]:
    return list(node.values()) if isinstance(node, dict) else list(node)


def _rebuild(node: Any, items: list[Any], done: list[Any]) -> Any:
    if all(new is old for new, old in zip(done, items, strict=True)):
        return node
    if isinstance(node, dict):
        return dict(zip(node.keys(), done, strict=True))
    return tuple(done) if isinstance(node, tuple) else done
