"""The tiktoken encodings the gateway counts with, shipped inside the package.

`o200k_base.tiktoken` and `cl100k_base.tiktoken` here are tiktoken's own files, byte for
byte: each is checked against the sha256 tiktoken itself expects before it is used, so
counting needs no network and no cache directory. The `tiktoken_ext.tallygate` plugin
registers them with tiktoken as `tallygate_o200k_base` and `tallygate_cl100k_base`
(tiktoken refuses a second plugin that registers openai_public's names), so each loads
once per process, in tiktoken's registry. Other encodings are tiktoken's business
(downloaded, or read from TIKTOKEN_CACHE_DIR).
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import tiktoken

DIRECTORY = Path(__file__).resolve().parent
PLUGIN_PREFIX = "tallygate_"

ENDOFTEXT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
ENDOFPROMPT = "<|endofprompt|>"

# Copied from tiktoken_ext/openai_public.py (tiktoken 0.14); tests compare them with
# tiktoken's own encodings, token ids included.
SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}
_PAT_STR = {
    "o200k_base": "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ),
    "cl100k_base": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
}
_SPECIAL_TOKENS = {
    "o200k_base": {ENDOFTEXT: 199999, ENDOFPROMPT: 200018},
    "cl100k_base": {
        ENDOFTEXT: 100257,
        FIM_PREFIX: 100258,
        FIM_MIDDLE: 100259,
        FIM_SUFFIX: 100260,
        ENDOFPROMPT: 100276,
    },
}
PACKAGED = frozenset(SHA256)


class EncodingFileError(ValueError):
    """A packaged encoding file does not hash to what tiktoken expects."""


def get_encoding(name: str, *, directory: str | Path | None = None) -> tiktoken.Encoding:
    """The encoding `name`: o200k_base and cl100k_base from the package, others from tiktoken.

    `directory` reads the packaged names from another directory, uncached (tests point it
    at damaged copies). Raises EncodingFileError for a file whose hash is wrong, OSError
    for one that cannot be read.
    """
    if name not in PACKAGED:
        return tiktoken.get_encoding(name)
    if directory is None:
        return tiktoken.get_encoding(PLUGIN_PREFIX + name)
    return tiktoken.Encoding(**constructor(name, directory))


def constructor(name: str, directory: str | Path = DIRECTORY) -> dict[str, Any]:
    """tiktoken.Encoding's arguments for a packaged encoding (the plugin's constructor)."""
    return {
        "name": PLUGIN_PREFIX + name,
        "pat_str": _PAT_STR[name],
        "mergeable_ranks": _ranks(Path(directory) / f"{name}.tiktoken", SHA256[name]),
        "special_tokens": dict(_SPECIAL_TOKENS[name]),
    }


def _ranks(path: Path, expected: str) -> dict[bytes, int]:
    """A .tiktoken file (base64 token, space, rank per line), refused unless its hash is right."""
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise EncodingFileError(
            f"{path} is damaged: sha256 {actual} instead of tiktoken's {expected}"
        )
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks
