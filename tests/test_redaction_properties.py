"""Properties of the Redactor over generated text (hypothesis): it never raises, and a
value planted in arbitrary text never comes out."""

from __future__ import annotations

import string
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from policies.redaction import RedactionConfig, Redactor

REDACTOR = Redactor(RedactionConfig())
HASHING = Redactor(RedactionConfig(replacement="hash", hash_key="k", max_chars=200))

PLANTED = [
    "dave.hostile@example.com",
    "müller@bücher.de",
    "4111111111111111",
    "4111 1111 1111 1111",
    "5555-5555-5555-4444",
    "378282246310005",
    "AKIAIOSFODNN7EXAMPLE",
    "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCD",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "xoxb-1234567890-abcdefghijkl",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.c2lnbmF0dXJlLXBhcnQ",
]
# characters the detectors care about, so that generated text often comes close to a value
NEAR = string.digits + string.ascii_letters + " .-+_@:=/#()\"'\n\t"
TEXT = st.one_of(st.text(), st.text(alphabet=NEAR))
JSON: Any = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(TEXT)
def test_arbitrary_text_never_raises(text: str) -> None:
    out, counts = REDACTOR.redact(text)
    assert all(n > 0 for n in counts.values())
    assert (out == text) == (not counts)  # changed exactly when something was found
    out, counts = HASHING.redact(text)  # tags, and a cut at 200 characters
    assert isinstance(out, str) and all(n > 0 for n in counts.values())


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_arbitrary_json_never_raises(value: Any) -> None:
    out, counts = REDACTOR.redact_value(value)
    if not counts:
        assert out is value  # nothing found: the very same object back


@settings(max_examples=600, deadline=None)
@given(TEXT, st.sampled_from(PLANTED), TEXT)
def test_a_planted_value_never_comes_out(before: str, value: str, after: str) -> None:
    # separated by a space: glued to a letter, a value is part of another word
    text = f"{before} {value} {after}"
    for redactor in (REDACTOR, HASHING):
        out, _ = redactor.redact(text, truncate=False)
        assert value not in out
