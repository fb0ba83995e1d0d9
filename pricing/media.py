"""Upper bounds on the prompt tokens of images, files and audio, by the providers' published rules.

The gateway reserves the most a request can cost before it forwards it, so every figure
here may be high but is never low where a provider publishes its rule. Where a rule is
not published, or a part's bytes are not in the request, the figure is a documented
estimate (the caller marks the whole count estimated, as it does for any media part).
Every public function is total: any JSON in, an int out, never an exception.

Images (`image_tokens`), by model family, for a size read from the image's header bytes.
A size that cannot be read (an http(s) URL, a file id, an unparseable payload) counts the
family's largest image for the detail level, computed from the same formula.

- OpenAI tile formula, developers.openai.com/api/docs/guides/images-vision, "Tile-based
  image tokenization": fit in 2048x2048; if the short side exceeds 768 scale it to 768,
  rounding the other side down; tokens = base + tile x (512px tiles covering it);
  detail "low" = base. (base, tile): gpt-5 / gpt-5.1 70/140; gpt-4o, gpt-4.1, gpt-4.5,
  chatgpt-4o, gpt-4-turbo 85/170; gpt-4o-mini 2833/5667; o1, o1-pro, o3 75/150;
  computer-use-preview 65/129. Largest image: the short side is at most 768 and the long
  side at most 2048, so 2 x 4 = 8 tiles (gpt-4o 1445, gpt-4o-mini 48,169). The 2048 fit
  rounds up here (the page does not say how it rounds), so a count is never a tile short.
- OpenAI patch formula, same page, "Patch-based image tokenization": fit within the
  detail level's edge limit, patches = ceil(w/32) x ceil(h/32), capped at the level's
  patch budget (an image over budget is shrunk to fit it, so the budget bounds it),
  tokens = ceil(patches x multiplier). Per family (edge px / patch budget):
  gpt-5.6-*, gpt-6-*: x1.2; low 512; high 2048/2,500; original and auto 65,535 with no
  budget, but "If this count exceeds 30,000 patches, the API rejects the request".
  gpt-5.5: x1.2; low 512; high 2048/2,500; original and auto 6000/10,000.
  gpt-5.4: x1.2 (-mini x1.62, -nano x2.46: an earlier version of the page); low
  2048/6,144; high and auto 2048/2,500; original 6000/10,000.
  gpt-5.2, gpt-5.3: x1.2; every level 2048/6,144. gpt-4.1-mini: x1.62; 2048/6,144.
  gpt-5-mini x1.62, gpt-5-nano x2.46, gpt-4.1-nano x2.46, o4-mini x1.72, and
  gpt-5-codex-mini / gpt-5.1-codex-mini (listed there, multiplier unpublished: gpt-5-mini's):
  a 1,536-patch budget and no edge limit (the earlier page). Where versions of the page
  disagree (gpt-5-mini is x1.2 today, gpt-5-nano x1.5), the larger value is used.
  detail missing = "auto"; an unknown detail value counts the family's costliest level.
- Anthropic, platform.claude.com/docs/en/build-with-claude/vision: 28x28 px patches,
  ceil(w/28) x ceil(h/28), after fitting the long edge (1568 px; 2576 px for Claude Opus
  4.7 and later: Opus 4.8, Fable 5, Mythos 5) and the visual-token budget (1,568; 4,784).
  The page's earlier rule, w x h / 750 with images over "~1,600 tokens" scaled down, is
  also applied and the larger kept: min(cap, max(patches, ceil(w x h / 750))), cap 1,600
  (4,784 for the high-resolution models). A claude-* name whose version cannot be read
  counts as high-resolution.
- Gemini, ai.google.dev/gemini-api/docs/tokens: 258 tokens if both sides are at most 384
  px, else 258 per 768x768 tile; images larger than 3072x3072 are scaled to fit it
  (Gemini 1.5 docs), so at most 16 tiles = 4,128. Gemini 1.5 tiles are min(w, h)/1.5
  clamped to 256..768 px. Gemini 3 and later allot up to 2,240 tokens per image
  (media_resolution ULTRA_HIGH), whatever the size: the larger of the two is kept.
- Any other model: the largest of all the rules above, for the size if known.

Audio (`audio_tokens`): duration x tokens per second. OpenAI: "Audio tokens in user
messages are 1 token per 100 ms of audio" (guides/realtime-costs): 10/s. Gemini: "audio
at 32 tokens per second" (docs/tokens): 32/s, also used for every other model. A WAV
(RIFF) payload's duration is read from its fmt chunk: the bytes after the data chunk's
header / (rate x channels x bytes per sample). Any other format is bounded by its size at
6 kbit/s (750 bytes a second; Opus's lowest bitrate, MP3's is 8 kbit/s).

Files (`file_tokens`: chat `file`, Responses `input_file`, Anthropic `document`):
- PDF: pages x (PDF_TEXT_TOKENS_PER_PAGE + the family's largest high-detail image). Both
  OpenAI (guides/file-inputs: "extracts both text and page images") and Anthropic
  (pdf-support: "Each page typically uses 1,500-3,000 tokens per page", plus "each page is
  converted into an image") send text and an image of each page; 3,000 is Anthropic's
  upper figure, so a denser page can exceed it. The page count is read from the bytes
  (/Type /Page objects and /Count, in compressed object streams too) when the PDF is at
  most PDF_SCAN_BYTES; otherwise, or when objects stay hidden, ceil(bytes /
  PDF_MIN_BYTES_PER_PAGE). Counts are capped at PDF_MAX_PAGES (Anthropic's per-request
  page limit, the larger of the two providers').
- An image sent as a file: the image rule, detail "auto".
- A zip container (docx, xlsx, pptx): the uncompressed size of its entries, from the
  central directory; unreadable: ZIP_EXPANSION x its size (an estimate).
- Anything else (text, csv, json, code): its size in bytes. Text tokenizers are byte-level
  BPE, so a token covers at least one byte and this is a true bound.
- A file id or URL with no bytes in the request: FILE_REFERENCE_PAGES pages of PDF, an
  estimate (those providers' 100-page PDF limit on 200k-context models).

An image's header read decodes only the base64 windows it needs: at most HEADER_BYTES in
all, never past HEADER_SCAN_BYTES into the payload (a JPEG's SOF can sit behind large
APPn segments, which are skipped by their lengths). A file reads its head, a zip its
central directory (FILE_READ_BYTES), and a PDF of at most PDF_SCAN_BYTES is decoded whole
to count its pages. Bytes that are not clean base64 (line breaks, other characters) are
not read: a decoder that skipped them would see other bytes at those offsets.

Over 600 lines on purpose: images, files and audio share the part walker and the byte
readers (base64, data URLs, headers), and this docstring is the rule book for all three.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

# OpenAI tile formula
TILE_FIT = 2048
TILE_SHORT_SIDE = 768
TILE_SIZE = 512
# OpenAI patch formula
PATCH_SIZE = 32
PATCH_REJECT = 30_000  # patches above which OpenAI rejects an image
# Anthropic
CLAUDE_PATCH = 28
CLAUDE_PIXELS_PER_TOKEN = 750
# Gemini
GEMINI_TILE_TOKENS = 258
GEMINI_SMALL_SIDE = 384
GEMINI_TILE = 768
GEMINI_FIT = 3072
GEMINI_MEDIA_MAX = 2240  # media_resolution ULTRA_HIGH, Gemini 3 and later
# Audio
OPENAI_AUDIO_TOKENS_PER_S = 10
GEMINI_AUDIO_TOKENS_PER_S = 32
AUDIO_MIN_BYTES_PER_S = 750  # 6 kbit/s
# Files
PDF_TEXT_TOKENS_PER_PAGE = 3_000
PDF_MAX_PAGES = 600
PDF_MIN_BYTES_PER_PAGE = 2_048
PDF_SCAN_BYTES = 8 * 1024 * 1024
FILE_REFERENCE_PAGES = 100
ZIP_EXPANSION = 10
# Header reads
HEADER_BYTES = 64 * 1024
HEADER_SCAN_BYTES = 2 * 1024 * 1024
FILE_READ_BYTES = 1024 * 1024  # a zip's central directory

_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_PDF_PAGE = re.compile(rb"/Type\s*/Page(?![A-Za-z0-9#])")
_PDF_COUNT = re.compile(rb"/Count\s+(\d{1,9})")
_PDF_OBJSTM = re.compile(rb"/Type\s*/ObjStm")
_PDF_STREAM = re.compile(rb"stream\r?\n")
_VERSION_SPLIT = re.compile(r"[-._:@/]")
_GEMINI_MAJOR = re.compile(r"gemini-(\d+)")
_PDF_OBJSTM_LIMIT = 256  # object streams inflated per PDF
_PDF_INFLATE_BYTES = 4 * 1024 * 1024  # inflated bytes per PDF


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _fit(width: int, height: int, edge: int) -> tuple[int, int]:
    """Scale down to fit edge x edge, keeping the aspect ratio; the short side rounds up."""
    longest = max(width, height)
    if longest <= edge:
        return width, height
    if width >= height:
        return edge, _ceil_div(height * edge, longest)
    return _ceil_div(width * edge, longest), edge


class Rule(Protocol):
    def tokens(self, width: int, height: int, detail: str) -> int: ...

    def most(self, detail: str) -> int: ...


@dataclass(frozen=True, slots=True)
class Tiles:
    """OpenAI's tile formula: base + tile tokens per 512px tile; detail "low" is base."""

    base: int
    tile: int

    def tokens(self, width: int, height: int, detail: str) -> int:
        if detail == "low":
            return self.base
        return self.base + self.tile * _tiles(width, height)

    def most(self, detail: str) -> int:
        # after both scalings the short side is <= 768 and the long side <= 2048
        return self.tokens(TILE_SHORT_SIDE, TILE_FIT, detail)


def _tiles(width: int, height: int) -> int:
    short, long_ = sorted((width, height))
    fitted = min(long_, TILE_FIT)
    if short * fitted > TILE_SHORT_SIDE * long_:  # the short side is still over 768
        # both scalings together: 768 by the aspect ratio, "round down the other dimension"
        short, long_ = TILE_SHORT_SIDE, TILE_SHORT_SIDE * long_ // short
    else:  # the page does not say how the 2048 fit rounds: up
        short, long_ = _ceil_div(short * fitted, long_), fitted
    return _ceil_div(short, TILE_SIZE) * _ceil_div(long_, TILE_SIZE)


@dataclass(frozen=True, slots=True)
class Level:
    name: str
    edge: int | None  # pixel limit on each side, None when the page gives none
    budget: int  # patch budget


@dataclass(frozen=True, slots=True)
class Patches:
    """OpenAI's patch formula: 32px patches within a level's limits, x a multiplier."""

    percent: int  # the multiplier x 100: integer maths, rounded up as billed
    levels: tuple[Level, ...]
    auto: str  # the level "auto" (and a missing detail) uses

    def tokens(self, width: int, height: int, detail: str) -> int:
        return max(self._tokens(level, width, height) for level in self._levels(detail))

    def most(self, detail: str) -> int:
        return max(self._tokens(level, None, None) for level in self._levels(detail))

    def _levels(self, detail: str) -> tuple[Level, ...]:
        name = self.auto if detail == "auto" else detail
        found = tuple(level for level in self.levels if level.name == name)
        return found or self.levels  # an unknown level: the costliest

    def _tokens(self, level: Level, width: int | None, height: int | None) -> int:
        if width is None or height is None:  # the largest image the level lets through
            patches = level.budget
            if level.edge is not None:
                patches = min(patches, _ceil_div(level.edge, PATCH_SIZE) ** 2)
        else:
            if level.edge is not None:
                width, height = _fit(width, height, level.edge)
            patches = _ceil_div(width, PATCH_SIZE) * _ceil_div(height, PATCH_SIZE)
            patches = min(patches, level.budget)
        return _ceil_div(patches * self.percent, 100)


@dataclass(frozen=True, slots=True)
class Claude:
    """Anthropic: 28px patches (and the older w x h / 750) after the edge fit, capped."""

    edge: int
    cap: int

    def tokens(self, width: int, height: int, detail: str) -> int:
        width, height = _fit(width, height, self.edge)
        patches = _ceil_div(width, CLAUDE_PATCH) * _ceil_div(height, CLAUDE_PATCH)
        legacy = _ceil_div(width * height, CLAUDE_PIXELS_PER_TOKEN)
        return min(self.cap, max(patches, legacy))

    def most(self, detail: str) -> int:
        return self.cap


@dataclass(frozen=True, slots=True)
class Gemini:
    """Gemini: 258 per 768px tile (per min(w, h)/1.5 tile for 1.x), at least `floor`."""

    floor: int
    v1: bool = False

    def tokens(self, width: int, height: int, detail: str) -> int:
        if width <= GEMINI_SMALL_SIDE and height <= GEMINI_SMALL_SIDE:
            return max(GEMINI_TILE_TOKENS, self.floor)
        width, height = _fit(width, height, GEMINI_FIT)
        tile = GEMINI_TILE
        if self.v1:
            tile = min(GEMINI_TILE, max(256, min(width, height) * 2 // 3))
        tiles = _ceil_div(width, tile) * _ceil_div(height, tile)
        return max(GEMINI_TILE_TOKENS * tiles, self.floor)

    def most(self, detail: str) -> int:
        if self.v1:  # smallest tiles (256px) along a 3072px side, two across the short one
            return self.tokens(GEMINI_SMALL_SIDE + 1, GEMINI_FIT, detail)
        return self.tokens(GEMINI_FIT, GEMINI_FIT, detail)


@dataclass(frozen=True, slots=True)
class Largest:
    """An unknown family: the largest of every known rule."""

    rules: tuple[Rule, ...]

    def tokens(self, width: int, height: int, detail: str) -> int:
        return max(rule.tokens(width, height, detail) for rule in self.rules)

    def most(self, detail: str) -> int:
        return max(rule.most(detail) for rule in self.rules)


def _patches(percent: int, *levels: tuple[str, int | None, int], auto: str = "high") -> Patches:
    return Patches(percent, tuple(Level(*level) for level in levels), auto)


_GPT56 = (("low", 512, PATCH_REJECT), ("high", 2048, 2500), ("original", 65_535, PATCH_REJECT))
_GPT55 = (("low", 512, PATCH_REJECT), ("high", 2048, 2500), ("original", 6000, 10_000))
_GPT54 = (("low", 2048, 6144), ("high", 2048, 2500), ("original", 6000, 10_000))
_BUDGET_6144 = (("low", 2048, 6144), ("high", 2048, 6144))
_BUDGET_1536 = (("low", None, 1536), ("high", None, 1536))
_TILES_4O = Tiles(85, 170)
_TILES_GPT5 = Tiles(70, 140)
_TILES_O = Tiles(75, 150)

# (name prefix, rule): the first prefix that matches the whole name or a "-" after it wins
_OPENAI_FAMILIES: tuple[tuple[str, Rule], ...] = (
    ("gpt-6", _patches(120, *_GPT56, auto="original")),
    ("gpt-5.6", _patches(120, *_GPT56, auto="original")),
    ("gpt-5.5", _patches(120, *_GPT55, auto="original")),
    ("gpt-5.4-mini", _patches(162, *_GPT54)),
    ("gpt-5.4-nano", _patches(246, *_GPT54)),
    ("gpt-5.4", _patches(120, *_GPT54)),
    ("gpt-5.3", _patches(120, *_BUDGET_6144)),
    ("gpt-5.2", _patches(120, *_BUDGET_6144)),
    ("gpt-5.1-codex-mini", _patches(162, *_BUDGET_1536)),
    ("gpt-5-codex-mini", _patches(162, *_BUDGET_1536)),
    ("gpt-5.1", _TILES_GPT5),
    ("gpt-5-mini", _patches(162, *_BUDGET_1536)),
    ("gpt-5-nano", _patches(246, *_BUDGET_1536)),
    ("gpt-5", _TILES_GPT5),
    ("gpt-4.1-mini", _patches(162, *_BUDGET_6144)),
    ("gpt-4.1-nano", _patches(246, *_BUDGET_1536)),
    ("gpt-4o-mini", Tiles(2833, 5667)),
    ("gpt-4.1", _TILES_4O),
    ("gpt-4.5", _TILES_4O),
    ("gpt-4o", _TILES_4O),
    ("chatgpt-4o", _TILES_4O),
    ("gpt-4-turbo", _TILES_4O),
    ("gpt-4-vision", _TILES_4O),
    ("gpt-4-1106-vision", _TILES_4O),
    ("o4-mini", _patches(172, *_BUDGET_1536)),
    ("o1", _TILES_O),
    ("o3", _TILES_O),
    ("computer-use-preview", Tiles(65, 129)),
)
CLAUDE_STANDARD = Claude(1568, 1600)
CLAUDE_HIGH_RES = Claude(2576, 4784)
GEMINI_V1 = Gemini(GEMINI_TILE_TOKENS, v1=True)
GEMINI_V2 = Gemini(GEMINI_TILE_TOKENS)
GEMINI_LATER = Gemini(GEMINI_MEDIA_MAX)
LARGEST = Largest(
    (
        *(rule for _, rule in _OPENAI_FAMILIES),
        *(CLAUDE_STANDARD, CLAUDE_HIGH_RES, GEMINI_V1, GEMINI_V2, GEMINI_LATER),
    )
)


@lru_cache(maxsize=1024)
def image_rule(model: str) -> Rule:
    """The image rule of a model, by its base name (no provider prefix, lower case)."""
    for prefix, rule in _OPENAI_FAMILIES:
        if model == prefix or model.startswith(prefix + "-"):
            return rule
    if "claude" in model:
        return _claude(model)
    if model.startswith("gemini"):
        return _gemini(model)
    return LARGEST


def _claude(model: str) -> Claude:
    numbers = [int(t) for t in _VERSION_SPLIT.split(model) if t.isdigit() and len(t) <= 2]
    if not numbers:
        return CLAUDE_HIGH_RES  # unreadable: the larger limits
    version = (numbers[0], numbers[1] if len(numbers) > 1 else 0)
    return CLAUDE_STANDARD if version < (4, 7) else CLAUDE_HIGH_RES


def _gemini(model: str) -> Gemini:
    match = _GEMINI_MAJOR.match(model)
    major = int(match.group(1)) if match else None
    if major == 1:
        return GEMINI_V1
    return GEMINI_V2 if major == 2 else GEMINI_LATER


def audio_rate(model: str) -> int:
    """Audio tokens per second of input: OpenAI's figure for its models, else the largest."""
    if model.startswith(("gpt-", "chatgpt-", "o1", "o3", "o4")):
        return OPENAI_AUDIO_TOKENS_PER_S
    return GEMINI_AUDIO_TOKENS_PER_S


# base64 payloads


class _Unreadable(Exception):
    """The bytes asked for are not there, not base64, or beyond the read limits."""


class _Base64:
    """A base64 payload whose bytes are decoded on demand, a window at a time."""

    __slots__ = ("_budget", "_checked", "_end", "_scan", "_start", "_text", "size")

    def __init__(self, text: str, start: int, scan: int, budget: int) -> None:
        end = len(text)
        while end > start and text[end - 1] == "=" and len(text) - end < 2:
            end -= 1
        self._text, self._start, self._end = text, start, end
        self._checked = start  # text[start:_checked] is known to be base64 alphabet
        self._scan, self._budget = scan, budget
        self.size = (end - start) * 3 // 4  # decoded length (exact for valid base64)

    def read(self, offset: int, n: int) -> bytes:
        """Bytes [offset, offset + n), fewer at the end of the payload."""
        n = min(n, self.size - offset)
        if offset < 0 or n <= 0:
            return b""
        if n > self._budget or offset + n > self._scan:
            raise _Unreadable("read limit")
        self._budget -= n
        first = offset // 3
        lo = self._start + first * 4
        hi = min(self._start + _ceil_div(offset + n, 3) * 4, self._end)
        self._check(hi)
        chunk = self._text[lo:hi]
        if len(chunk) % 4 == 1:
            raise _Unreadable("truncated base64")
        raw = binascii.a2b_base64(chunk + "=" * (-len(chunk) % 4))
        skip = offset - first * 3
        return raw[skip : skip + n]

    def all(self, limit: int) -> bytes:
        """The whole payload, if it decodes to at most `limit` bytes."""
        if self.size > limit:
            raise _Unreadable("payload too large to scan")
        return base64.b64decode(self._text[self._start :], validate=True)

    def _check(self, hi: int) -> None:
        # offsets map onto the text only when every char before them is base64: a decoder
        # that skips line breaks or junk would see other bytes there than this reader
        if hi > self._checked:
            window = self._text[self._checked : hi]
            if not window.isascii() or window.encode("ascii").translate(None, _BASE64_ALPHABET):
                raise _Unreadable("not base64")
            self._checked = hi


@dataclass(frozen=True, slots=True)
class _Payload:
    """Inline bytes of a part: base64, or text (a data URL without ;base64)."""

    media_type: str
    data: _Base64 | None = None
    text: str | None = None


def _payload(value: Any, media_type: Any = "", *, file: bool = False) -> _Payload | None:
    """A data URL or a bare base64 string; None for anything else (URLs, ids).

    Images read a header near the start; files may read a zip's directory at the end.
    """
    if not isinstance(value, str) or not value:
        return None
    media = media_type.lower() if isinstance(media_type, str) else ""
    start = 0
    if value.startswith("data:"):
        comma = value.find(",", 5, 512)
        if comma < 0:
            return None
        header = value[5:comma].lower()
        media = header.split(";", 1)[0].strip() or media
        if ";base64" not in header:
            return _Payload(media, text=value[comma + 1 :])
        start = comma + 1
    elif value.startswith(("http://", "https://", "gs://", "file-")):
        return None
    limits = (PDF_SCAN_BYTES, FILE_READ_BYTES) if file else (HEADER_SCAN_BYTES, HEADER_BYTES)
    return _Payload(media, data=_Base64(value, start, *limits))


# image headers


def image_size(data: _Base64) -> tuple[int, int] | None:
    """(width, height) from a PNG, GIF, JPEG or WebP header; None if unknown."""
    try:
        return _image_size(data)
    except (_Unreadable, struct.error, binascii.Error, IndexError, ValueError):
        return None


def _image_size(data: _Base64) -> tuple[int, int] | None:
    head = data.read(0, 32)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
        return _positive(*struct.unpack(">II", head[16:24]))
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _gif_size(data, head)
    if head[:3] == b"\xff\xd8\xff":
        return _jpeg_size(data)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp_size(head)
    return None


def _positive(width: int, height: int) -> tuple[int, int] | None:
    return (width, height) if width > 0 and height > 0 else None


def _gif_size(data: _Base64, head: bytes) -> tuple[int, int] | None:
    """The logical screen, grown to the first frame if that frame reaches beyond it."""
    width, height, flags = struct.unpack("<HHB", head[6:11])
    palette = 3 << ((flags & 7) + 1) if flags & 0x80 else 0  # global colour table
    pos = 13 + palette
    for _ in range(64):
        kind = data.read(pos, 1)
        if kind == b"\x2c":  # image descriptor
            left, top, w, h = struct.unpack("<HHHH", data.read(pos + 1, 8))
            return _positive(max(width, left + w), max(height, top + h))
        if kind != b"\x21":  # anything but an extension ends the walk
            break
        pos += 2
        for _ in range(256):  # extension sub-blocks
            size = data.read(pos, 1)
            if not size:
                return _positive(width, height)
            pos += 1 + size[0]
            if size[0] == 0:
                break
    return _positive(width, height)


_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: _Base64) -> tuple[int, int] | None:
    """Walk the segments to the first SOFn marker; segment bodies are skipped, not decoded."""
    pos = 2
    for _ in range(1024):
        head = data.read(pos, 4)
        if len(head) < 2 or head[0] != 0xFF:
            return None
        marker = head[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if len(head) < 4:
            return None
        if marker in _JPEG_SOF:
            body = data.read(pos + 5, 4)
            if len(body) < 4:
                return None
            height, width = struct.unpack(">HH", body)
            return _positive(width, height)  # height 0 (set by a later DNL): unknown
        pos += 2 + struct.unpack(">H", head[2:4])[0]
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", head[26:30])
        return _positive(width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return _positive((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return _positive(width, height)
    return None


# public entry points


def image_tokens(model: str, part: Mapping[str, Any]) -> int:
    """Tokens of an image part (chat image_url, Responses input_image, Anthropic image)."""
    rule = image_rule(model)
    detail = _detail(part)
    try:
        payload = _image_payload(part)
        size = image_size(payload.data) if payload and payload.data else None
        if size is not None:
            return rule.tokens(size[0], size[1], detail)
    except Exception:  # hostile or broken bytes: the largest image below
        pass
    return rule.most(detail)


def _detail(part: Mapping[str, Any]) -> str:
    url = part.get("image_url")
    detail = url.get("detail") if isinstance(url, Mapping) else part.get("detail")
    return detail.lower() if isinstance(detail, str) else "auto"


def _image_payload(part: Mapping[str, Any]) -> _Payload | None:
    source = part.get("source")
    if isinstance(source, Mapping):  # Anthropic
        if source.get("type") == "base64":
            return _payload(source.get("data"), source.get("media_type"))
        return None
    url = part.get("image_url")
    if isinstance(url, Mapping):
        url = url.get("url")
    return _payload(url) if isinstance(url, str) and url.startswith("data:") else None


def audio_tokens(model: str, part: Mapping[str, Any]) -> int:
    """Tokens of an input_audio part: its duration (WAV) or size-bound at 6 kbit/s."""
    audio = part.get("input_audio")
    audio = audio if isinstance(audio, Mapping) else part
    try:
        payload = _payload(audio.get("data"))
        if payload is None:
            return 0  # no audio bytes: the provider rejects the request, nothing is billed
        rate = audio_rate(model)
        if payload.data is None:
            return _ceil_div(len(payload.text or "") * rate, AUDIO_MIN_BYTES_PER_S)
        pcm = _wav(payload.data)
        if pcm is not None:
            data_bytes, bytes_per_s = pcm
            return _ceil_div(data_bytes * rate, bytes_per_s)
        return _ceil_div(payload.data.size * rate, AUDIO_MIN_BYTES_PER_S)
    except Exception:  # never raise: bound by the string's length
        data = audio.get("data")
        size = len(data) if isinstance(data, str) else 0
        return _ceil_div(size * audio_rate(model), AUDIO_MIN_BYTES_PER_S)


_PCM_FORMATS = frozenset({1, 3, 6, 7, 0xFFFE})  # PCM, float, A-law, mu-law, extensible


def _wav(data: _Base64) -> tuple[int, int] | None:
    """(bytes of samples, bytes per second) of a PCM WAV; None for anything else."""
    head = data.read(0, 12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    pos, bytes_per_s = 12, 0
    for _ in range(64):
        chunk = data.read(pos, 8)
        if len(chunk) < 8:
            return None
        size = struct.unpack("<I", chunk[4:])[0]
        if chunk[:4] == b"fmt ":
            bytes_per_s = _wav_rate(data.read(pos + 8, 16))
        elif chunk[:4] == b"data":
            # the bytes actually sent, not the declared size: never less than what plays
            return (data.size - pos - 8, bytes_per_s) if bytes_per_s else None
        pos += 8 + size + (size & 1)
    return None


def _wav_rate(fmt: bytes) -> int:
    if len(fmt) < 16:
        return 0
    tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", fmt)
    plausible = 1 <= channels <= 64 and 1 <= rate <= 768_000 and bits in (8, 16, 24, 32, 64)
    return channels * rate * bits // 8 if tag in _PCM_FORMATS and plausible else 0


def file_tokens(model: str, part: Mapping[str, Any]) -> int:
    """Tokens of a file part (chat file, Responses input_file, Anthropic document).

    An Anthropic document with a text or content source is the caller's to count.
    """
    try:
        payload, reference = _file_payload(part)
    except Exception:  # never raise: a part that cannot be read counts as a referenced file
        return _pdf_bound(model, FILE_REFERENCE_PAGES)
    if payload is None:  # no bytes (a file id or URL), or nothing at all
        return _pdf_bound(model, FILE_REFERENCE_PAGES) if reference else 0
    try:
        return _payload_tokens(model, payload)
    except Exception:  # bytes that are not clean base64: as a referenced file, or its size
        size = payload.data.size if payload.data else len(payload.text or "")
        return max(_pdf_bound(model, FILE_REFERENCE_PAGES), size)


def _file_payload(part: Mapping[str, Any]) -> tuple[_Payload | None, bool]:
    """(inline bytes, whether the part points at a file elsewhere)."""
    source = part.get("source")
    if isinstance(source, Mapping):  # Anthropic document
        if source.get("type") == "base64":
            payload = _payload(source.get("data"), source.get("media_type"), file=True)
            return payload, payload is None
        return None, source.get("type") in ("url", "file")
    inner = part.get("file")
    fields = inner if isinstance(inner, Mapping) else part
    media = _media_type(fields.get("filename"))
    payload = _payload(fields.get("file_data"), media, file=True)
    if payload is not None:
        return payload, False
    refs = (fields.get(k) for k in ("file_id", "file_url", "file_data"))
    return None, any(isinstance(v, str) and v for v in refs)


_EXTENSIONS = {"pdf": "application/pdf", "png": "image/png", "jpg": "image/jpeg"}


def _media_type(filename: Any) -> str:
    if not isinstance(filename, str) or "." not in filename:
        return ""
    return _EXTENSIONS.get(filename.rsplit(".", 1)[1].lower(), "")


def _payload_tokens(model: str, payload: _Payload) -> int:
    if payload.data is None:  # a non-base64 data URL: at most a token per byte
        return len((payload.text or "").encode("utf-8", "surrogatepass"))
    data = payload.data
    head = data.read(0, 32)
    if head.startswith(b"%PDF") or payload.media_type == "application/pdf":
        return _pdf_bound(model, _pdf_pages(data))
    size = image_size(data)
    if size is not None:
        return image_rule(model).tokens(size[0], size[1], "auto")
    if payload.media_type.startswith("image/"):
        return image_rule(model).most("auto")
    if head.startswith(b"PK\x03\x04"):
        return _zip_bound(data)
    return data.size


def _pdf_bound(model: str, pages: int) -> int:
    return pages * (PDF_TEXT_TOKENS_PER_PAGE + image_rule(model).most("high"))


def _pdf_pages(data: _Base64) -> int:
    """Pages of a PDF, from its bytes when countable, else from its size; >= 1."""
    by_size = _ceil_div(data.size, PDF_MIN_BYTES_PER_PAGE)
    try:
        counted, hidden = _count_pages(data.all(PDF_SCAN_BYTES))
    except (_Unreadable, binascii.Error, ValueError):
        counted, hidden = 0, True
    pages = max(counted, by_size) if hidden or counted == 0 else counted
    return max(1, min(pages, PDF_MAX_PAGES))


def _count_pages(pdf: bytes) -> tuple[int, bool]:
    """(the most pages any count shows, whether objects may be hidden from the count).

    Page objects and /Count appear in the file, or inside compressed object streams
    (PDF 1.5+), which are inflated here within _PDF_INFLATE_BYTES.
    """
    leaves, declared = _page_marks(pdf)
    hidden, inflated = False, 0
    for n, match in enumerate(_PDF_OBJSTM.finditer(pdf)):
        stream = _PDF_STREAM.search(pdf, match.end())
        if n >= _PDF_OBJSTM_LIMIT or stream is None or inflated >= _PDF_INFLATE_BYTES:
            hidden = True
            break
        inflater = zlib.decompressobj()
        try:
            text = inflater.decompress(
                pdf[stream.end() : stream.end() + _PDF_INFLATE_BYTES],
                _PDF_INFLATE_BYTES - inflated,
            )
        except zlib.error:  # not Flate, or encrypted
            hidden = True
            continue
        hidden = hidden or bool(inflater.unconsumed_tail)
        inflated += len(text)
        more, count = _page_marks(text)
        leaves, declared = leaves + more, max(declared, count)
    return max(leaves, declared), hidden


def _page_marks(data: bytes) -> tuple[int, int]:
    """(/Type /Page objects, the largest /Count) in a run of PDF bytes."""
    leaves = sum(1 for _ in _PDF_PAGE.finditer(data))
    return leaves, max((int(n) for n in _PDF_COUNT.findall(data)), default=0)


def _zip_bound(data: _Base64) -> int:
    """Uncompressed bytes of a zip's entries (text extracted from them is no longer)."""
    try:
        total = _zip_uncompressed(data)
    except (_Unreadable, struct.error, ValueError):
        total = None
    return total if total is not None else data.size * ZIP_EXPANSION


def _zip_uncompressed(data: _Base64) -> int | None:
    tail_at = max(0, data.size - 1024)
    tail = data.read(tail_at, data.size - tail_at)
    end = tail.rfind(b"PK\x05\x06")
    if end < 0 or len(tail) < end + 22:
        return None
    entries, cd_size, cd_at = struct.unpack("<HII", tail[end + 10 : end + 20])
    directory = data.read(cd_at, cd_size)
    total, pos = 0, 0
    for _ in range(entries):
        if directory[pos : pos + 4] != b"PK\x01\x02":
            return None
        size, name, extra, comment = struct.unpack("<IHHH", directory[pos + 24 : pos + 34])
        if size == 0xFFFFFFFF:  # zip64: sizes elsewhere
            return None
        total += size
        pos += 46 + name + extra + comment
    return total
