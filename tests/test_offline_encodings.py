"""The encodings shipped in pricing/encodings: tiktoken's own, loaded with no network.

Offline runs are subprocesses with TIKTOKEN_CACHE_DIR unset, HOME, TMPDIR (tiktoken's
default cache) and cwd in a temp dir, and every proxy variable pointed at a loopback
"proxy" that records and drops each connection; an audit hook in the child records any
socket it opens. tiktoken's own download goes through that proxy (the control test).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import pytest
import tiktoken

from pricing.encodings import (
    DIRECTORY,
    PACKAGED,
    PLUGIN_PREFIX,
    SHA256,
    EncodingFileError,
    get_encoding,
)
from tiktoken_ext import openai_public

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that answers in French."},
    {"role": "user", "content": "Combien font 12 \u00d7 7 ? Réponds en chiffres 🙂"},
]
TEXTS = [
    "hello world",
    "Bonjour, comment ça va ? 你好\uff0c世界。 Привет! 🎉👩‍💻",
    "def f(x):\n    return x ** 2  # squares\n\n\n\tindented\r\nCRLF",
    "1234567890 3.14159 -42 0x1F 1e-9 $1,000,000.00",
    "I'm, you're, they've, we'll, he'd, IT'S, DON'T",
    "   leading and trailing spaces   ",
    "<|endoftext|> <|endofprompt|> <|fim_prefix|> as text",
    "https://example.com/path?q=1&r=2#frag // comment /* block */",
]
# Runs in the child: count with what the brief says the gateway uses, report as JSON.
CHILD_PRELUDE = """
import json, sys
network = []
def _audit(event, args):
    if event == "socket.connect":
        network.append(f"connect {args[1]!r}")
    elif event == "socket.getaddrinfo":
        network.append(f"getaddrinfo {args[0]!r}")
sys.addaudithook(_audit)
"""
CHILD_GET_ENCODING = (
    CHILD_PRELUDE
    + """
from pricing.encodings import get_encoding
texts = json.loads(sys.argv[1])
ids = {n: [get_encoding(n).encode(t, allowed_special="all") for t in texts]
       for n in ("o200k_base", "cl100k_base")}
print(json.dumps({"ids": ids, "network": network}))
"""
)
CHILD_TOKEN_COUNTER = (
    CHILD_PRELUDE
    + """
import logging
from pricing.tokens import TokenCounter
warnings = []
class _Keep(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("tallygate.pricing").addHandler(_Keep(logging.WARNING))
body = {"messages": json.loads(sys.argv[1])}
counter = TokenCounter(load_timeout_s=60)
counts = {m: list(counter.count_chat(m, body)) for m in ("gpt-4o", "gpt-4")}
print(json.dumps({"counts": counts, "warnings": warnings, "network": network}))
"""
)
CHILD_TIKTOKEN_DOWNLOAD = (
    CHILD_PRELUDE
    + """
import tiktoken
try:
    tiktoken.get_encoding("o200k_base")
    error = None
except Exception as exc:
    error = repr(exc)
print(json.dumps({"error": error, "network": network}))
"""
)


class DroppingProxy:
    """A loopback 'proxy' that accepts each connection, counts it and closes it at once,
    so a download through it fails immediately instead of hanging."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed by __exit__
                return
            self.connections += 1
            conn.close()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)


@pytest.fixture
def proxy() -> Iterator[DroppingProxy]:
    with DroppingProxy() as p:
        yield p


def run_offline(
    script: str, arg: Any, proxy: DroppingProxy, tmp: Path, source: Path = ROOT
) -> dict[str, Any]:
    """Run `script` with `source` first on sys.path, cut off from network and caches."""
    home = tmp / "home"
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k.upper() not in {"TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR", "NO_PROXY"}
    }
    proxies = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
    env |= dict.fromkeys(proxies, proxy.url)
    env |= {"HOME": str(home), "TMPDIR": str(home / "tmp"), "PYTHONPATH": str(source)}
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(arg)],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def tiktoken_own(name: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> tiktoken.Encoding:
    """tiktoken's own encoding (openai_public's constructor and hash check), fed the
    packaged file through tiktoken's cache (keyed by the download URL's sha1)."""
    url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
    cache.mkdir(exist_ok=True)
    shutil.copyfile(DIRECTORY / f"{name}.tiktoken", cache / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    return tiktoken.Encoding(**getattr(openai_public, name)())


def cookbook(enc: tiktoken.Encoding, messages: list[dict[str, str]]) -> int:
    return 3 + sum(3 + sum(len(enc.encode(v)) for v in m.values()) for m in messages)


def damaged_copy(tmp: Path) -> tuple[Path, dict[str, str]]:
    """pricing/ and tiktoken_ext/ copied to tmp/src, one byte of each encoding flipped;
    returns the source root and each damaged file's sha256."""
    src = tmp / "src"
    shutil.copytree(ROOT / "pricing", src / "pricing", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tiktoken_ext", src / "tiktoken_ext")
    hashes = {}
    for name in sorted(PACKAGED):
        path = src / "pricing" / "encodings" / f"{name}.tiktoken"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(data)
        hashes[name] = hashlib.sha256(data).hexdigest()
    return src, hashes


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_packaged_encoding_is_tiktokens_own(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = (DIRECTORY / f"{name}.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == SHA256[name]
    ours = get_encoding(name, directory=DIRECTORY)
    own = tiktoken_own(name, tmp_path / "cache", monkeypatch)
    assert ours._pat_str == own._pat_str
    assert ours._special_tokens == own._special_tokens
    assert ours._mergeable_ranks == own._mergeable_ranks
    assert ours.n_vocab == own.n_vocab
    for text in TEXTS:
        assert ours.encode(text, allowed_special="all") == own.encode(text, allowed_special="all")
        assert ours.encode_ordinary(text) == own.encode_ordinary(text)


def test_plugin_registers_beside_openai_public() -> None:
    names = tiktoken.list_encoding_names()  # a duplicate name would raise here
    assert {PLUGIN_PREFIX + n for n in PACKAGED} | PACKAGED <= set(names)
    for name in PACKAGED:
        assert get_encoding(name) is tiktoken.get_encoding(PLUGIN_PREFIX + name)


def test_other_encodings_are_tiktokens_business() -> None:
    with pytest.raises(ValueError, match="Unknown encoding no_such_base"):
        get_encoding("no_such_base")


def test_get_encoding_needs_no_network_or_cache(
    proxy: DroppingProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = run_offline(CHILD_GET_ENCODING, TEXTS, proxy, tmp_path)
    assert out["network"] == []
    assert proxy.connections == 0
    for name in sorted(PACKAGED):
        own = tiktoken_own(name, tmp_path / "cache", monkeypatch)
        assert out["ids"][name] == [own.encode(t, allowed_special="all") for t in TEXTS]


def test_the_offline_harness_sees_tiktokens_download(proxy: DroppingProxy, tmp_path: Path) -> None:
    # the control: tiktoken's own o200k_base, with no cache, tries the proxy and fails
    out = run_offline(CHILD_TIKTOKEN_DOWNLOAD, None, proxy, tmp_path)
    assert out["error"] is not None
    assert proxy.connections >= 1
    assert any(event.startswith("connect") for event in out["network"])


def test_token_counter_counts_exactly_offline(
    proxy: DroppingProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # needs pricing/tokens.py to load encodings through pricing.encodings.get_encoding
    out = run_offline(CHILD_TOKEN_COUNTER, MESSAGES, proxy, tmp_path)
    assert out["warnings"] == []
    assert out["network"] == []
    assert proxy.connections == 0
    o200k = tiktoken_own("o200k_base", tmp_path / "cache", monkeypatch)
    cl100k = tiktoken_own("cl100k_base", tmp_path / "cache", monkeypatch)
    assert out["counts"] == {
        "gpt-4o": [cookbook(o200k, MESSAGES), False],
        "gpt-4": [cookbook(cl100k, MESSAGES), False],
    }


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_damaged_file_is_refused(name: str, tmp_path: Path) -> None:
    src, hashes = damaged_copy(tmp_path)
    directory = src / "pricing" / "encodings"
    with pytest.raises(EncodingFileError) as refused:
        get_encoding(name, directory=directory)
    assert str(refused.value) == (
        f"{directory / f'{name}.tiktoken'} is damaged: "
        f"sha256 {hashes[name]} instead of tiktoken's {SHA256[name]}"
    )
    (directory / f"{name}.tiktoken").unlink()
    with pytest.raises(FileNotFoundError):
        get_encoding(name, directory=directory)


def test_damaged_install_falls_back_to_estimates_with_one_warning(
    proxy: DroppingProxy, tmp_path: Path
) -> None:
    # needs pricing/tokens.py to load encodings through pricing.encodings.get_encoding
    src, hashes = damaged_copy(tmp_path)
    out = run_offline(CHILD_TOKEN_COUNTER, MESSAGES, proxy, tmp_path, source=src)
    estimate = 3 + sum(3 + sum(-(-len(v) // 4) for v in m.values()) for m in MESSAGES)
    assert out["counts"] == {"gpt-4o": [estimate, True], "gpt-4": [estimate, True]}
    assert len(out["warnings"]) == 1
    # the reason whole: which file, and both hashes
    damaged = src / "pricing" / "encodings" / "o200k_base.tiktoken"
    assert f"{damaged} is damaged" in out["warnings"][0]
    assert (
        f"sha256 {hashes['o200k_base']} instead of tiktoken's {SHA256['o200k_base']}"
        in (out["warnings"][0])
    )
    assert out["network"] == []
    assert proxy.connections == 0
