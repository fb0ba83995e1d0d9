"""Upper bounds for images, files and audio (pricing/media.py) and their use by TokenCounter.

The images are real headers built here with struct/zlib (PNG, JPEG, GIF, WebP), the
formulas are checked against the providers' worked examples (quoted) and, for random
sizes, against the pages' own algorithms: the bound may be high, never low.
"""

from __future__ import annotations

import base64
import io
import math
import os
import struct
import zipfile
import zlib
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pricing import media
from pricing.tokens import MAX_PART_DEPTH, TokenCount, TokenCounter


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter(cache_dir=os.environ.get("TIKTOKEN_CACHE_DIR"))


# real headers


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png(width: int, height: int) -> bytes:
    """A PNG: complete for small sizes, header and a token IDAT for large ones."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    rows = b"\x00"
    if width * height <= 64 * 64:
        rows = b"".join(b"\x00" + b"\x00" * 3 * width for _ in range(height))
    pixels = zlib.compress(rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", pixels)
        + _chunk(b"IEND", b"")
    )


def jpeg(width: int, height: int, exif: int = 0) -> bytes:
    """A baseline JPEG's markers: JFIF, `exif` bytes of APP1/APP2 segments (as a large
    ICC profile is split), DQT, SOF0, EOI."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    app1 = b""
    while exif > 0:
        n = min(exif, 65_533)
        app1 += b"\xff\xe2" + struct.pack(">H", n + 2) + os.urandom(n)
        exif -= n
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes(range(1, 65))
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3)
    sof += b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + app1 + dqt + sof + b"\xff\xd9"


def gif(width: int, height: int, frame: tuple[int, int] | None = None) -> bytes:
    fw, fh = frame or (width, height)
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0)  # 2-colour global table
    control = b"\x21\xf9\x04\x00\x00\x00\x00\x00"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, fw, fh, 0) + b"\x02\x02\x4c\x01\x00"
    return b"GIF89a" + screen + b"\x00\x00\x00\xff\xff\xff" + control + image + b"\x3b"


def webp(width: int, height: int, kind: str) -> bytes:
    if kind == "VP8 ":
        body = b"\x00\x00\x00\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"\x00" * 8
    elif kind == "VP8L":
        bits = (width - 1) | (height - 1) << 14
        body = b"\x2f" + bits.to_bytes(4, "little") + b"\x00" * 8
    else:  # VP8X: an extended canvas
        body = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little")
        body += (height - 1).to_bytes(3, "little")
    chunk = kind.encode() + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def wav(seconds: float, rate: int = 16_000, channels: int = 1, bits: int = 16) -> bytes:
    samples = b"\x00" * int(seconds * rate) * channels * (bits // 8)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * bits // 8, 4, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
    body += b"data" + struct.pack("<I", len(samples)) + samples
    return b"RIFF" + struct.pack("<I", len(body)) + body


def pdf(pages: int, size: int = 0, compressed: bool = False) -> bytes:
    """A PDF's object structure with `pages` pages, padded to `size` bytes with a stream."""
    kids = " ".join(f"{3 + i} 0 R" for i in range(pages))
    objects = [f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>"]
    objects += ["<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"] * pages
    out = b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
    if compressed:  # PDF 1.5 object stream: the page tree is only visible once inflated
        packed = zlib.compress(" ".join(objects).encode())
        out += b"9 0 obj << /Type /ObjStm /N %d /First 0 /Filter /FlateDecode /Length %d >>\n" % (
            len(objects),
            len(packed),
        )
        out += b"stream\n" + packed + b"\nendstream endobj\n"
    else:
        for n, body in enumerate(objects, start=2):
            out += f"{n} 0 obj {body} endobj\n".encode()
    padding = max(0, size - len(out))
    out += b"99 0 obj << /Length %d >>\nstream\n" % padding + os.urandom(padding)
    return out + b"\nendstream endobj\n%%EOF\n"


def billed(amount: int, per: int = 100) -> int:
    """ceil(amount / per) in integers: patches x multiplier (as percent) / 100, rounded up."""
    return -(-amount // per)


def data_url(mime: str, raw: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_part(url: str, detail: str | None = None) -> dict[str, Any]:
    inner: dict[str, Any] = {"url": url}
    if detail is not None:
        inner["detail"] = detail
    return {"type": "image_url", "image_url": inner}


def size_of(raw: bytes) -> tuple[int, int] | None:
    payload = media._payload(data_url("image/x", raw))
    assert payload is not None and payload.data is not None
    return media.image_size(payload.data)


# headers


@pytest.mark.parametrize(
    ("raw", "size"),
    [
        (png(1, 1), (1, 1)),
        (png(40, 30), (40, 30)),
        (png(4096, 8192), (4096, 8192)),
        (jpeg(640, 480), (640, 480)),
        (jpeg(5000, 3000, exif=100_000), (5000, 3000)),  # SOF0 100 KB in, past the EXIF
        (gif(300, 200), (300, 200)),
        (gif(300, 200, frame=(900, 100)), (900, 200)),  # a frame wider than the screen
        (webp(1023, 767, "VP8 "), (1023, 767)),
        (webp(16383, 2, "VP8L"), (16383, 2)),
        (webp(20000, 10000, "VP8X"), (20000, 10000)),
    ],
)
def test_header_sizes(raw: bytes, size: tuple[int, int]) -> None:
    assert size_of(raw) == size


def test_header_reads_decode_little() -> None:
    # the EXIF segment is skipped by its length: only a few windows are decoded
    payload = media._payload(data_url("image/jpeg", jpeg(800, 600, exif=200_000)))
    assert payload is not None and payload.data is not None
    assert media.image_size(payload.data) == (800, 600)
    assert media.HEADER_BYTES - payload.data._budget <= 128  # of 200 KB


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not an image at all",
        png(10, 10)[:20],  # truncated before the size
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 5, 8, 2, 0, 0, 0)),
        jpeg(0, 100),  # height 0: set by a DNL marker later
        b"\xff\xd8\xff" + b"\xff" * 5000,  # fill bytes and nothing else
        b"RIFF\x00\x00\x00\x00WEBPVP8 " + b"\x00" * 4,
    ],
)
def test_unreadable_headers_are_unknown(raw: bytes) -> None:
    assert size_of(raw) is None


# OpenAI tile formula


GPT4O_MOST = 85 + 170 * 8  # the largest image: short side 768, long side 2048, 2 x 4 tiles


def test_openai_tile_worked_examples() -> None:
    # developers.openai.com/api/docs/guides/images-vision (gpt-4o, 85 base / 170 a tile):
    # "A 1024 x 1024 square image in detail: high mode costs 765 tokens"
    # "A 2048 x 4096 image in detail: high mode costs 1105 tokens"
    # "A 4096 x 8192 image in detail: low most costs 85 tokens"
    assert media.image_tokens("gpt-4o", image_part(data_url("image/png", png(1024, 1024)))) == 765
    assert media.image_tokens("gpt-4o", image_part(data_url("image/png", png(2048, 4096)))) == 1105
    low = image_part(data_url("image/png", png(4096, 8192)), "low")
    assert media.image_tokens("gpt-4o", low) == 85


@pytest.mark.parametrize(
    ("model", "base", "tile"),
    [
        ("gpt-4o-2024-08-06", 85, 170),
        ("gpt-4.1", 85, 170),
        ("chatgpt-4o-latest", 85, 170),
        ("gpt-4o-mini-2024-07-18", 2833, 5667),
        ("gpt-5", 70, 140),
        ("gpt-5-chat-latest", 70, 140),
        ("gpt-5.1", 70, 140),
        ("o1", 75, 150),
        ("o3-2025-04-16", 75, 150),
        ("computer-use-preview", 65, 129),
    ],
)
def test_tile_families_and_their_largest_image(model: str, base: int, tile: int) -> None:
    rule = media.image_rule(model)
    assert rule == media.Tiles(base, tile)
    assert rule.most("high") == rule.most("auto") == base + tile * 8
    assert rule.most("low") == base
    url = image_part("https://example.com/cat.png")
    assert media.image_tokens(model, url) == base + tile * 8


def test_fifty_high_detail_images_on_gpt_4o_mini(counter: TokenCounter) -> None:
    # the issue: 38,260 estimated, ~1.27M by the published formula (1024x1024 images)
    text = [{"type": "text", "text": "Compare these."}]

    def body(url: str) -> dict[str, Any]:
        parts = text + [image_part(url, "high") for _ in range(50)]
        return {"messages": [{"role": "user", "content": parts}]}

    base = counter.count_chat(
        "gpt-4o-mini", body_text := {"messages": [{"role": "user", "content": text}]}
    )
    unknown = counter.count_chat("gpt-4o-mini", body("https://example.com/photo.jpg"))
    assert unknown.estimated
    assert unknown.tokens >= 1_270_000
    assert unknown.tokens - base.tokens == 50 * (2833 + 5667 * 8)
    known = counter.count_chat("gpt-4o-mini", body(data_url("image/png", png(1024, 1024))))
    assert known.tokens - base.tokens == 50 * (2833 + 5667 * 4) == 1_275_050
    assert body_text["messages"][0]["content"] == text


# OpenAI patch formula


def test_openai_patch_worked_examples() -> None:
    # images-vision, "Cost calculation examples for gpt-5.4 with detail: high":
    # "A 1024 x 1024 image needs 32 x 32 = 1024 patches. ... ceil(1024 x 1.2) = 1229 tokens."
    # "A 2048 x 2048 image initially needs 64 x 64 = 4096 patches. The patch budget reduces
    #  it to 1600 x 1600 pixels, or 50 x 50 = 2500 patches. ... ceil(2500 x 1.2) = 3000"
    high = "high"
    assert (
        media.image_tokens("gpt-5.4", image_part(data_url("image/png", png(1024, 1024)), high))
        == 1229
    )
    assert (
        media.image_tokens("gpt-5.4", image_part(data_url("image/png", png(2048, 2048)), high))
        == 3000
    )
    # the earlier page (gpt-4.1-mini x1.62): "A 1024 x 1024 image is 1024 tokens" of patches
    assert media.image_rule("gpt-4.1-mini").tokens(1024, 1024, "high") == billed(1024 * 162)
    # "A 1800 x 2400 image is 1452 tokens" (1,536-patch budget): at most the budget here
    o4 = media.image_rule("o4-mini").tokens(1800, 2400, "high")
    assert billed(1452 * 172) <= o4 <= billed(1536 * 172)


@pytest.mark.parametrize(
    ("model", "detail", "most"),
    [
        ("gpt-5.4", "high", 3000),  # 2,500 patches x 1.2
        ("gpt-5.4", "auto", 3000),  # auto sizes like high
        ("gpt-5.4", "low", billed(64 * 64 * 120)),  # 6,144 budget, 2048 edge: 4,096
        ("gpt-5.4", "original", 12_000),  # 10,000 patches
        ("gpt-5.4-mini", "high", billed(2500 * 162)),
        ("gpt-5.5", "low", billed(16 * 16 * 120)),  # fits within 512 x 512
        ("gpt-5.5", "auto", 12_000),  # auto sizes like original
        ("gpt-5.6-sol", "auto", 36_000),  # no budget; over 30,000 patches is rejected
        ("gpt-5.6-sol", "high", 3000),
        ("gpt-5.2", "high", billed(4096 * 120)),
        ("gpt-4.1-mini", None, billed(4096 * 162)),
        ("gpt-4.1-nano-2025-04-14", None, billed(1536 * 246)),
        ("gpt-5-mini", None, billed(1536 * 162)),
        ("gpt-5-nano", None, billed(1536 * 246)),
        ("o4-mini", "low", billed(1536 * 172)),
        ("gpt-5.4", "someday", 12_000),  # an unknown detail: the costliest level
    ],
)
def test_patch_families_largest_image(model: str, detail: str | None, most: int) -> None:
    assert media.image_tokens(model, image_part("https://example.com/x.png", detail)) == most


# Anthropic


def test_anthropic_worked_examples() -> None:
    # platform.claude.com/docs/en/build-with-claude/vision, "Evaluate image size": most
    # models 200x200 -> 64, 1000x1000 -> 1296, 1920x1080 -> 1560 (downscaled); earlier
    # page: tokens = (width px * height px)/750, 1000x1000 "~1334". The larger is kept.
    standard = media.image_rule("claude-sonnet-4-5-20250929")
    assert standard.tokens(200, 200, "auto") == 64
    assert standard.tokens(1000, 1000, "auto") == 1334
    assert 1560 <= standard.tokens(1920, 1080, "auto") <= 1600 == standard.most("auto")
    # Opus 4.7 and later: "3840x2160 px ... 4784", "1920x1080 px ... 2691"
    high = media.image_rule("claude-opus-4-7")
    assert high.tokens(3840, 2160, "auto") == 4784 == high.most("auto")
    assert 2691 <= high.tokens(1920, 1080, "auto") <= math.ceil(1920 * 1080 / 750)


@pytest.mark.parametrize(
    ("model", "rule"),
    [
        ("claude-3-5-sonnet-20241022", media.CLAUDE_STANDARD),
        ("claude-haiku-4-5", media.CLAUDE_STANDARD),
        ("claude-sonnet-4", media.CLAUDE_STANDARD),
        ("anthropic.claude-3-5-sonnet-20240620-v1:0", media.CLAUDE_STANDARD),
        ("claude-opus-4-7", media.CLAUDE_HIGH_RES),
        ("claude-opus-4-8", media.CLAUDE_HIGH_RES),
        ("claude-fable-5", media.CLAUDE_HIGH_RES),
        ("claude-sonnet-5-5", media.CLAUDE_HIGH_RES),
        ("claude-next", media.CLAUDE_HIGH_RES),  # no readable version: the larger limits
    ],
)
def test_claude_families(model: str, rule: media.Claude) -> None:
    assert media.image_rule(model) == rule


def test_anthropic_image_blocks(counter: TokenCounter) -> None:
    block = {
        "type": "image",
        "source": {
            "type": "base64",
            "media_type": "image/png",
            "data": base64.b64encode(png(1000, 1000)).decode(),
        },
    }
    assert media.image_tokens("claude-sonnet-4-5", block) == 1334
    by_url = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
    assert media.image_tokens("claude-sonnet-4-5", by_url) == 1600
    assert media.image_tokens("claude-opus-4-7", by_url) == 4784


# Gemini and unknown families


def test_gemini() -> None:
    # ai.google.dev/gemini-api/docs/tokens: "image inputs with both dimensions <=384 pixels
    # are counted as 258 tokens. Images larger ... into tiles of 768x768 pixels, each 258"
    flash = media.image_rule("gemini-2.5-flash")
    assert flash.tokens(384, 300, "auto") == 258
    assert flash.tokens(1000, 1000, "auto") == 4 * 258
    assert flash.most("auto") == 16 * 258  # scaled to fit 3072 x 3072
    later = media.image_rule("gemini-3-pro-preview")
    assert later.tokens(100, 100, "auto") == 2240  # media_resolution ULTRA_HIGH
    assert later.most("auto") == 16 * 258


def test_unknown_family_takes_the_largest_rule() -> None:
    rule = media.image_rule("meta-llama/llama-4-maverick")
    assert rule is media.LARGEST
    assert rule.most("auto") == 2833 + 5667 * 8  # gpt-4o-mini's largest image
    everyone = [r for _, r in media._OPENAI_FAMILIES] + [media.CLAUDE_HIGH_RES, media.GEMINI_V1]
    assert rule.tokens(1280, 720, "high") == max(r.tokens(1280, 720, "high") for r in everyone)


# the pages' own algorithms, for random sizes: ours is never lower, nor above the largest


def doc_tiles(width: int, height: int, base: int, tile: int) -> int:
    """images-vision, tile-based: fit 2048x2048; short side over 768 -> 768, round down."""
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = (768, math.floor(h * scale)) if w < h else (math.floor(w * scale), 768)
    return base + tile * math.ceil(w / 512) * math.ceil(h / 512)


def doc_patches(width: int, height: int, edge: int | None, budget: int, rounding: Any) -> int:
    """images-vision, patch-based steps A-C (edge fit rounded by `rounding`)."""
    if edge is not None and max(width, height) > edge:
        scale = edge / max(width, height)
        width, height = max(1, rounding(width * scale)), max(1, rounding(height * scale))
    patches = math.ceil(width / 32) * math.ceil(height / 32)
    if patches <= budget:
        return patches
    shrink = math.sqrt(32**2 * budget / (width * height))
    shrink *= min(
        math.floor(width * shrink / 32) / (width * shrink / 32),
        math.floor(height * shrink / 32) / (height * shrink / 32),
    )
    w, h = math.floor(width * shrink), math.floor(height * shrink)
    return math.ceil(w / 32) * math.ceil(h / 32)


def doc_claude(width: int, height: int, max_edge: int, max_tokens: int) -> int:
    """vision, "Resize your image before uploading": Anthropic's reference implementation."""

    def count_image_tokens(w: int, h: int) -> int:
        return math.ceil(w / 28) * math.ceil(h / 28)

    def fits(w: int, h: int) -> bool:
        return (
            math.ceil(w / 28) * 28 <= max_edge
            and math.ceil(h / 28) * 28 <= max_edge
            and count_image_tokens(w, h) <= max_tokens
        )

    def resized_size(w: int, h: int) -> tuple[int, int]:
        if fits(w, h):
            return w, h
        if h > w:
            rh, rw = resized_size(h, w)
            return rw, rh
        aspect_ratio = w / h
        lo, hi = 1, w
        while lo + 1 < hi:
            mid = (lo + hi) // 2
            if fits(mid, max(round(mid / aspect_ratio), 1)):
                lo = mid
            else:
                hi = mid
        return lo, max(round(lo / aspect_ratio), 1)

    return count_image_tokens(*resized_size(width, height))


sides = st.integers(min_value=1, max_value=20_000)


@settings(max_examples=400, deadline=None)
@given(width=sides, height=sides)
@example(width=1535, height=2049)  # rounding the 2048 fit before the 768 step loses a tile row
def test_tiles_never_below_the_page(width: int, height: int) -> None:
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-5", "o3"):
        rule = media.image_rule(model)
        ours = rule.tokens(width, height, "high")
        assert doc_tiles(width, height, rule.base, rule.tile) <= ours <= rule.most("high")


@settings(max_examples=400, deadline=None)
@given(width=sides, height=sides)
def test_patches_never_below_the_page(width: int, height: int) -> None:
    for model in ("gpt-5.4", "gpt-5.5", "gpt-5.2", "gpt-4.1-mini", "o4-mini", "gpt-5.6-terra"):
        rule = media.image_rule(model)
        for level in rule.levels:
            ours = rule.tokens(width, height, level.name)
            for rounding in (math.floor, round, math.ceil):
                page = doc_patches(width, height, level.edge, level.budget, rounding)
                assert billed(page * rule.percent) <= ours
            assert ours <= rule.most(level.name)


@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 9000), height=st.integers(1, 9000))
def test_claude_never_below_the_reference(width: int, height: int) -> None:
    for rule, limits in (
        (media.CLAUDE_STANDARD, (1568, 1568)),
        (media.CLAUDE_HIGH_RES, (2576, 4784)),
    ):
        ours = rule.tokens(width, height, "auto")
        assert doc_claude(width, height, *limits) <= ours <= rule.most("auto")


@settings(max_examples=300, deadline=None)
@given(width=sides, height=sides)
def test_known_sizes_never_exceed_the_unknown_bound(width: int, height: int) -> None:
    for rule in media.LARGEST.rules:
        for detail in ("low", "high", "auto", "original"):
            assert 1 <= rule.tokens(width, height, detail) <= rule.most(detail)


# hostile inputs


HOSTILE_IMAGES: list[Any] = [
    image_part("data:image/png;base64," + base64.b64encode(png(800, 600)).decode()[:30]),
    image_part("data:image/png;base64,%%%%not-base64%%%%"),
    image_part("data:image/png;base64,"),
    image_part("data:image/png,rawtext"),
    image_part("data:"),
    image_part("data:image/png;base64," + "A" * 10_001),
    image_part("data:image/jpeg;base64,/9j/" + "\n" * 100 + "AAAA"),
    {"type": "image_url", "image_url": 5},
    {"type": "image_url", "image_url": {"url": None, "detail": 7}},
    {"type": "image_url", "image_url": {"url": ["x"], "detail": ["high"]}},
    {"type": "input_image", "file_id": "file-abc"},
    {"type": "input_image", "image_url": {"nested": True}},
    {"type": "image", "source": "nope"},
    {"type": "image", "source": {"type": "base64", "data": 42}},
    {"type": "image", "source": {"type": "base64", "data": "ÿÿÿÿ"}},
]


@pytest.mark.parametrize("part", HOSTILE_IMAGES)
@pytest.mark.parametrize("model", ["gpt-4o", "gpt-5.4", "claude-opus-4-7", "gemini-2.5-pro", "x"])
def test_hostile_images_count_the_largest(part: Any, model: str) -> None:
    rule = media.image_rule(model)
    assert media.image_tokens(model, part) == rule.most(media._detail(part))


def test_huge_declared_dimensions() -> None:
    huge = image_part(data_url("image/png", png(100_000, 100_000)))
    assert media.image_tokens("gpt-4o", huge) == 765  # fits 2048, then 768 x 768
    assert media.image_tokens("gpt-5.6-sol", huge) == 36_000  # original: rejected above
    assert media.image_tokens("claude-opus-4-7", huge) == 4784
    extreme = image_part(data_url("image/png", png(0xFFFFFFFF, 1)))
    assert 85 <= media.image_tokens("gpt-4o", extreme) <= GPT4O_MOST


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(
        st.sampled_from(["type", "image_url", "url", "detail", "source", "data", "file",
                         "file_data", "input_audio", "format", "media_type", "content"]),
        children,
        max_size=4,
    ),
    max_leaves=20,
)  # fmt: skip
part_types = st.sampled_from(
    ["image_url", "input_image", "image", "input_audio", "file", "input_file", "document"]
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=part_types, fields=st.dictionaries(st.text(max_size=12), json_values, max_size=4))
def test_arbitrary_parts_never_raise(counter: TokenCounter, kind: str, fields: dict) -> None:
    part = {**fields, "type": kind}
    count = counter.count_chat("gpt-4o", {"messages": [{"role": "user", "content": [part]}]})
    assert count.estimated and count.tokens >= 3 + 1 + 3
    if kind in ("image_url", "input_image", "image"):
        assert media.image_tokens("gpt-4o", part) >= 85


@pytest.mark.parametrize("kind", [["image_url"], {"a": 1}, 7, None])
def test_parts_with_odd_types_never_raise(counter: TokenCounter, kind: Any) -> None:
    part = {"type": kind, "image_url": {"url": "https://x/y.png"}}
    count = counter.count_chat("gpt-4o", {"messages": [{"role": "user", "content": [part]}]})
    assert count.estimated and count.tokens > 3 + 1 + 3


def test_deep_nesting_is_walked_not_recursed(counter: TokenCounter) -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
    content: Any = [image]
    for _ in range(900):  # orjson accepts bodies up to 1024 deep
        content = [{"type": "tool_result", "tool_use_id": "t", "content": content}]
    count = counter.count_chat(
        "claude-opus-4-7", {"messages": [{"role": "user", "content": content}]}
    )
    assert count.estimated
    assert count.tokens >= 4784  # the image at the bottom still counts, at its largest
    assert MAX_PART_DEPTH < 900
    deep: Any = "x"
    for _ in range(950):
        deep = {"type": "mystery", "v": [deep]}
    opaque = counter.count_chat("gpt-4o", {"messages": [{"role": "user", "content": [deep]}]})
    assert opaque.tokens >= 1


def test_text_only_bodies_do_no_media_work(
    counter: TokenCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: Any) -> int:
        raise AssertionError("media counted for a text-only body")

    for name in ("image_tokens", "audio_tokens", "file_tokens", "image_rule"):
        monkeypatch.setattr(media, name, refuse)
    body = {
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "hello"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "user", "content": [{"type": "tool_result", "content": "done"}]},
        ],
    }
    assert counter.count_chat("gpt-4o", body).tokens > 0


# audio


def audio_part(raw: bytes, fmt: str) -> dict[str, Any]:
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(raw).decode(), "format": fmt},
    }


def test_wav_duration() -> None:
    # 2.5 s of 16 kHz mono 16-bit PCM; OpenAI: "1 token per 100 ms" of user audio
    part = audio_part(wav(2.5), "wav")
    assert media.audio_tokens("gpt-4o-audio-preview", part) == 25
    assert media.audio_tokens("gpt-audio", part) == 25
    # Gemini: "audio at 32 tokens per second"; any other model takes the larger rate
    assert media.audio_tokens("gemini-2.5-flash", part) == 80
    assert media.audio_tokens("some-local-model", part) == 80
    stereo = audio_part(wav(3, rate=44_100, channels=2), "wav")
    assert media.audio_tokens("gpt-4o-audio-preview", stereo) == 30


def test_other_audio_is_bounded_by_size_at_6_kbits() -> None:
    mp3ish = b"ID3" + os.urandom(7497)  # 7,500 bytes: at most 10 s at 6 kbit/s
    assert media.audio_tokens("gpt-4o-audio-preview", audio_part(mp3ish, "mp3")) == 100
    # a WAV whose header lies about its format falls back to the size bound
    odd = bytearray(wav(1.0))
    odd[20:22] = struct.pack("<H", 0x55)  # "MPEG layer 3 in a WAV"
    assert media.audio_tokens("gpt-4o-audio-preview", audio_part(bytes(odd), "wav")) == billed(
        len(odd) * 10, 750
    )


@pytest.mark.parametrize(
    "audio",
    [
        {"data": None},
        {"data": 17},
        {},
        "not a mapping",
        {"data": "%%%", "format": "wav"},
        {"data": base64.b64encode(wav(1.0)).decode()[:50]},  # truncated in the header
    ],
)
def test_hostile_audio_never_raises(audio: Any) -> None:
    tokens = media.audio_tokens(
        "gpt-4o-audio-preview", {"type": "input_audio", "input_audio": audio}
    )
    assert tokens >= 0


def test_audio_in_a_chat_body(counter: TokenCounter) -> None:
    parts = [{"type": "text", "text": "Transcribe."}, audio_part(wav(10.0), "wav")]
    with_audio = counter.count_chat(
        "gpt-4o-audio-preview", {"messages": [{"role": "user", "content": parts}]}
    )
    without = counter.count_chat(
        "gpt-4o-audio-preview", {"messages": [{"role": "user", "content": parts[:1]}]}
    )
    assert with_audio.tokens - without.tokens == 100
    assert with_audio.estimated


# files


PER_PAGE_GPT4O = media.PDF_TEXT_TOKENS_PER_PAGE + GPT4O_MOST


def file_part(raw: bytes, mime: str, name: str = "doc.pdf") -> dict[str, Any]:
    return {"type": "file", "file": {"file_data": data_url(mime, raw), "filename": name}}


def test_pdf_pages_from_the_bytes() -> None:
    raw = pdf(3, size=400_000)
    assert len(raw) >= 400_000
    # OpenAI puts "both the extracted text and an image of each page" in the context;
    # Anthropic: "Each page typically uses 1,500-3,000 tokens per page" plus its image
    assert media.file_tokens("gpt-4o", file_part(raw, "application/pdf")) == 3 * PER_PAGE_GPT4O


def test_pdf_pages_inside_object_streams() -> None:
    raw = pdf(7, size=50_000, compressed=True)
    assert b"/Type /Page " not in raw  # only visible once the object stream is inflated
    assert media.file_tokens("gpt-4o", file_part(raw, "application/pdf")) == 7 * PER_PAGE_GPT4O


def test_pdf_without_countable_pages_is_bounded_by_size() -> None:
    raw = b"%PDF-1.7\n" + os.urandom(400_000)  # the 400 KB PDF, counted 0 before
    tokens = media.file_tokens("gpt-4o", file_part(raw, "application/pdf"))
    pages = billed(len(raw), media.PDF_MIN_BYTES_PER_PAGE)
    assert tokens == pages * PER_PAGE_GPT4O > 0
    # a PDF declaring absurd page counts is capped at the providers' page limit
    lying = b"%PDF-1.7\n<< /Type /Pages /Count 999999 >>\n"
    assert media.file_tokens("gpt-4o", file_part(lying, "application/pdf")) == (
        media.PDF_MAX_PAGES * PER_PAGE_GPT4O
    )


def test_file_shapes_across_apis(counter: TokenCounter) -> None:
    raw = pdf(2, size=10_000)
    encoded = base64.b64encode(raw).decode()
    shapes = [
        file_part(raw, "application/pdf"),  # chat
        {"type": "input_file", "file_data": data_url("application/pdf", raw), "filename": "a.pdf"},
        {"type": "file", "file": {"file_data": encoded, "filename": "a.pdf"}},  # bare base64
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": encoded},
        },
    ]
    for part in shapes:
        assert media.file_tokens("claude-sonnet-4-5", part) == 2 * (3000 + 1600), part
    in_tool_result = {"type": "tool_result", "tool_use_id": "t", "content": [shapes[3]]}
    body = {"messages": [{"role": "user", "content": [in_tool_result]}]}
    assert counter.count_chat("claude-sonnet-4-5", body).tokens >= 2 * (3000 + 1600)


def test_files_without_bytes_count_the_reference_bound() -> None:
    per_page = media.PDF_TEXT_TOKENS_PER_PAGE + GPT4O_MOST
    references = [
        {"type": "file", "file": {"file_id": "file-abc"}},
        {"type": "input_file", "file_id": "file-abc"},
        {"type": "input_file", "file_url": "https://example.com/report.pdf"},
        {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
        {"type": "document", "source": {"type": "file", "file_id": "file_011"}},
    ]
    for part in references:
        assert media.file_tokens("gpt-4o", part) == media.FILE_REFERENCE_PAGES * per_page
    assert media.file_tokens("gpt-4o", {"type": "file", "file": {"filename": "x"}}) == 0


def test_text_files_count_a_token_per_byte_at_most(counter: TokenCounter) -> None:
    text = "naïve café, 1234 — résumé\n" * 100
    raw = text.encode()
    assert media.file_tokens("gpt-4o", file_part(raw, "text/plain", "notes.txt")) == len(raw)
    assert counter.count_text("gpt-4o", text).tokens <= len(raw)
    # an Anthropic text document is encoded like any text, with its title
    doc = {
        "type": "document",
        "title": "Notes",
        "source": {"type": "text", "media_type": "text/plain", "data": text},
    }
    body = {"messages": [{"role": "user", "content": [doc]}]}
    expected = counter.count_text("x", text).tokens + counter.count_text("x", "Notes").tokens
    assert counter.count_chat("claude-sonnet-4-5", body).tokens == 3 + 1 + expected + 3


def test_zip_files_count_their_uncompressed_size() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("word/document.xml", "<w:t>hello</w:t>" * 5000)
        archive.writestr("docProps/core.xml", "<core/>")
    raw = buffer.getvalue()
    part = {
        "type": "input_file",
        "file_data": data_url("application/zip", raw),
        "filename": "a.docx",
    }
    assert media.file_tokens("gpt-4o", part) == len("<w:t>hello</w:t>") * 5000 + len("<core/>")
    assert len(raw) < 5000  # compressed: its size alone would be far too low


def test_image_sent_as_a_file() -> None:
    part = {"type": "input_file", "file_data": data_url("image/png", png(1024, 1024))}
    assert media.file_tokens("gpt-4o", part) == 765


@pytest.mark.parametrize(
    "part",
    [
        {"type": "file", "file": {"file_data": 12}},
        {"type": "file", "file": "file-abc"},
        {"type": "input_file", "file_data": "data:application/pdf;base64,JVBERi0%%%"},
        {"type": "input_file", "file_data": "data:application/pdf;base64," + "J" * 4001},
        {"type": "document", "source": {"type": "base64", "data": ["x"]}},
        {"type": "document", "source": {"type": "content", "content": 5}},
        {"type": "document", "source": {"type": "text", "data": None}},
    ],
)
def test_hostile_files_never_raise(counter: TokenCounter, part: dict[str, Any]) -> None:
    assert media.file_tokens("gpt-4o", part) >= 0
    count = counter.count_chat("gpt-4o", {"messages": [{"role": "user", "content": [part]}]})
    assert count.estimated


async def test_count_request_with_media(counter: TokenCounter) -> None:
    parts = [
        {"type": "input_text", "text": "What is this?"},
        {
            "type": "input_image",
            "image_url": data_url("image/jpeg", jpeg(1024, 1024)),
            "detail": "high",
        },
    ]
    body = {"messages": [{"role": "user", "content": parts}]}
    count = await counter.count_request("chat", "gpt-4o", body)
    text_only = counter.count_chat("gpt-4o", {"messages": [{"role": "user", "content": parts[:1]}]})
    assert count == TokenCount(text_only.tokens + 765, True)


def test_line_wrapped_file_counts_at_least_its_size() -> None:
    # MIME-wrapped base64 is not read (offsets would not map), but is never counted low
    raw = os.urandom(900_000)
    wrapped = base64.encodebytes(raw).decode()  # a line break every 76 characters
    part = {"type": "input_file", "file_data": "data:text/plain;base64," + wrapped}
    reference = media.FILE_REFERENCE_PAGES * PER_PAGE_GPT4O
    assert media.file_tokens("gpt-4o", part) == max(reference, len(wrapped) * 3 // 4) > len(raw)
