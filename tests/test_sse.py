"""gateway.pipeline.sse: whole events out of any split of the bytes, raw bytes kept, data joined.

Hypothesis explores random streams in tests/test_properties_parsers.py; these are the
named edge cases, each checked at every split point.
"""

from __future__ import annotations

import pytest

from gateway.pipeline.sse import SSEDecoder, event_data, is_sse, lf_line_ends, with_data

Event = tuple[bytes, bytes | None]


def decode(*chunks: bytes) -> list[Event]:
    decoder = SSEDecoder()
    return [event for chunk in chunks for event in decoder.feed(chunk)]


def every_split(stream: bytes) -> list[list[Event]]:
    """The events for each way of cutting `stream` in two, and byte by byte."""
    cuts = [decode(stream[:i], stream[i:]) for i in range(len(stream) + 1)]
    return [*cuts, decode(*(stream[i : i + 1] for i in range(len(stream))))]


def assert_any_split(stream: bytes, expected: list[Event]) -> None:
    for i, events in enumerate(every_split(stream)):
        assert events == expected, f"split {i}"


# --- framing ---------------------------------------------------------------------------

CHUNK = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'


def test_one_event() -> None:
    assert_any_split(CHUNK, [(CHUNK, b'{"choices":[{"delta":{"content":"hi"}}]}')])


def test_several_events_and_done() -> None:
    stream = b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    expected = [(b"data: 1\n\n", b"1"), (b"data: 2\n\n", b"2"), (b"data: [DONE]\n\n", b"[DONE]")]
    assert_any_split(stream, expected)


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
def test_every_line_end_is_read_and_relayed_as_lf(end: bytes) -> None:
    stream = b"event: delta" + end + b"data: a" + end + end + b"data: b" + end + end
    expected = [(b"event: delta\ndata: a\n\n", b"a"), (b"data: b\n\n", b"b")]
    if end == b"\r":  # a final CR waits: the next byte may be the LF of a CRLF
        for events in every_split(stream):
            assert events == expected[:1]
        assert decode(stream, b"data: c\n\n")[1:] == [expected[1], (b"data: c\n\n", b"c")]
        return
    assert_any_split(stream, expected)


def test_mixed_line_ends_in_one_stream() -> None:
    stream = b"data: a\r\n\r\ndata: b\n\ndata: c\r\rdata: d\r\n\n"
    expected = [(b"data: a\n\n", b"a"), (b"data: b\n\n", b"b"), (b"data: c\n\n", b"c"),
                (b"data: d\n\n", b"d")]  # fmt: skip
    assert_any_split(stream, expected)


def test_a_crlf_cut_between_cr_and_lf_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert list(decoder.feed(b"data: x\r\n\r")) == []
    assert list(decoder.feed(b"\n")) == [(b"data: x\n\n", b"x")]  # not a blank line too many


def test_an_event_without_its_final_blank_line_waits() -> None:
    decoder = SSEDecoder()
    assert list(decoder.feed(b"data: x\n")) == []
    assert list(decoder.feed(b"data: y")) == []
    assert list(decoder.feed(b"\n\n")) == [(b"data: x\ndata: y\n\n", b"x\ny")]


def test_a_stream_cut_mid_event_yields_only_whole_events() -> None:
    assert decode(b'data: 1\n\ndata: {"trunc') == [(b"data: 1\n\n", b"1")]


def test_empty_chunks_change_nothing() -> None:
    assert decode(b"", b"data: 1\n", b"", b"\n", b"") == [(b"data: 1\n\n", b"1")]


# --- fields ----------------------------------------------------------------------------


def test_multi_line_data_is_joined_with_lf() -> None:
    stream = b"data: first\ndata: second\ndata:third\n\n"
    assert_any_split(stream, [(stream, b"first\nsecond\nthird")])


def test_only_one_space_after_the_colon_is_dropped() -> None:
    assert decode(b"data:  two spaces\n\n")[0][1] == b" two spaces"
    assert decode(b"data:\n\n")[0][1] == b""  # an empty data line is data, not none


def test_other_fields_are_kept_in_the_raw_bytes() -> None:
    stream = b"event: message_start\nid: 7\nretry: 100\ndata: {}\n\n"
    assert_any_split(stream, [(stream, b"{}")])


def test_comments_and_events_without_data_have_none() -> None:
    stream = b": keep-alive\n\nevent: ping\n\n:\n\n"
    expected = [(b": keep-alive\n\n", None), (b"event: ping\n\n", None), (b":\n\n", None)]
    assert_any_split(stream, expected)
    assert all(is_sse(raw) for raw, _ in expected)


def test_a_comment_among_data_lines_is_skipped_in_the_data() -> None:
    stream = b"data: a\n: note\ndata: b\n\n"
    assert decode(stream) == [(stream, b"a\nb")]


def test_a_field_that_only_starts_with_data_is_not_data() -> None:
    assert event_data(b"database: x\n\n") is None
    assert event_data(b"event: data\n\n") is None


def test_non_sse_bytes_are_told_apart() -> None:
    assert not is_sse(b"<html><body>Bad gateway</body></html>\n\n")
    assert not is_sse(b"upstream connect error\n\n")
    assert is_sse(b"event: x\nid: 1\nretry: 5\n: c\n\n")


def test_a_leading_bom_is_ignored() -> None:
    assert decode(b"\xef\xbb\xbfdata: 1\n\ndata: 2\n\n") == [
        (b"data: 1\n\n", b"1"),
        (b"data: 2\n\n", b"2"),
    ]


def test_a_bom_later_in_the_stream_is_data() -> None:
    # only the stream's first bytes may be a BOM; elsewhere U+FEFF is content
    assert decode(b"data: 1\n\ndata: \xef\xbb\xbf2\n\n")[1][1] == b"\xef\xbb\xbf2"


# --- helpers ---------------------------------------------------------------------------


def test_lf_line_ends_keeps_a_trailing_cr() -> None:
    assert lf_line_ends(b"a\r\nb\rc\n") == b"a\nb\nc\n"
    assert lf_line_ends(b"a\r\n\r") == b"a\n\r"
    assert lf_line_ends(b"\r") == b"\r"


def test_with_data_replaces_the_data_and_keeps_other_fields() -> None:
    assert with_data(b"data: old\n\n", b"new") == b"data: new\n\n"
    assert with_data(b"event: e\ndata: a\ndata: b\nid: 3\n\n", b"{}") == (
        b"event: e\ndata: {}\nid: 3\n\n"
    )
    assert with_data(b"event: e\n\n", b"{}") == b"event: e\ndata: {}\n\n"


def test_a_leading_bom_split_across_chunks_is_ignored() -> None:
    decoder = SSEDecoder()
    out = [e for part in (b"\xef", b"\xbb", b"\xbfdata: 1\n\n") for e in decoder.feed(part)]
    assert out == [(b"data: 1\n\n", b"1")]
