"""The Redactor's cost: MB/s on ordinary chat text and on hostile strings, and the worst string.

    python -m bench.bench_redaction [--rounds 7] [--kb 256]

Times are CPU time of this process (time.process_time), so that other work on the
machine inflates them less than wall time; each figure is the median of the rounds.
MB are megabytes of UTF-8. Hostile strings are redacted whole (max_chars=0) and also
as the gateway sees them (cut at the default max_chars=32768 first), since that cut
is what bounds the cost of one string in production.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable

from policies.redaction import RedactionConfig, Redactor
from tests.data.redaction_corpus import benign_sentences, grouped, pii_examples

PROSE = [
    "Can you summarise the attached meeting notes and list the action items by owner?",
    "The migration finished at 02:14 UTC; 3 of the 48 shards needed a second pass.",
    "Rewrite this paragraph so it sounds friendlier but keep it under 120 words.",
    "We saw p95 latency go from 180 ms to 240 ms after the v2.14.1 rollout.",
    "Here is the stack trace from the worker, what is the most likely cause?",
    "Draft a short reply thanking them for the feedback and promising a fix next sprint.",
    "The quarterly revenue grew 12.5% to $4.2M, mostly from the enterprise plan.",
    "Translate the following into French, keeping the product names in English.",
]


def chat_text(size: int, rng: random.Random) -> str:
    """Prose with a little PII: about one value per 600 characters."""
    pii = [e.text for e in pii_examples() if e.kind != "secret" or len(e.text) < 200]
    benign = benign_sentences()
    parts: list[str] = []
    total = 0
    while total < size:
        roll = rng.random()
        sentence = rng.choice(pii if roll < 0.08 else benign if roll < 0.3 else PROSE)
        parts.append(sentence)
        total += len(sentence) + 1
    return " ".join(parts)[:size]


def plain_text(size: int, rng: random.Random) -> str:
    return " ".join(rng.choice(PROSE) for _ in range(size // 40))[:size]


def json_text(size: int, rng: random.Random) -> str:
    """A tool result: JSON records with ids, numbers, timestamps (and no PII)."""
    rows = []
    while sum(len(r) for r in rows) < size:
        rows.append(
            json.dumps(
                {
                    "id": rng.randint(10**6, 10**7),
                    "sku": f"SKU-{rng.randint(10000, 99999)}",
                    "price": round(rng.uniform(1, 999), 2),
                    "updated_at": f"2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T10:3{rng.randint(0, 9)}:00Z",
                    "tags": ["a", "b"],
                    "max_tokens": 512,
                }
            )
        )
    return "[" + ",".join(rows)[:size] + "]"


def cjk_text(size: int, rng: random.Random) -> str:
    words = ["会议记录", "请总结", "行动项目", "负责人", "下周", "版本", "发布", "问题"]
    return "".join(
        rng.choice(words) + rng.choice(["\uff0c", "\u3002", ""]) for _ in range(size // 5)
    )[: size // 3]


def hostile(size: int) -> dict[str, str]:
    def rep(unit: str) -> str:
        return (unit * (size // len(unit) + 1))[:size]

    return {
        "a@a.a run": rep("a@a.a"),
        "digits": rep("1"),
        "-----BEGIN": rep("-----BEGIN"),
        "sk- run": rep("sk-"),
        "BEGIN KEY, no END": "-----BEGIN RSA PRIVATE KEY-----\n"
        + rep("MIIEvQIBADANBgkqhkiG9w0B\n"),
        "1 1 1 ...": rep("1 "),
        "a:a:a ...": rep("a:"),
        "1.1.1 ...": rep("1."),
        "+++": rep("+"),
        "---": rep("-"),
        "@@@": rep("@"),
        "4111 groups": rep("4111 "),
        "valid cards": rep(grouped("4111111111111111") + " "),
        "::1 ::1": rep("::1 "),
        "1.1.1.1 ips": rep("1.1.1.1 "),
        "phones": rep("415-555-2671 "),
        "password=": rep("password="),
        "token: x": rep("token: x "),
        "json secrets": rep('{"token": "abc", "password": "x", "api_key": 1}'),
        "eyJ.": rep("eyJ."),
        "http://": rep("http://"),
        "0 0 0": rep("0 "),
        "((((": rep("("),
    }


def cpu(fn: Callable[[], object], rounds: int) -> float:
    """Median CPU seconds of one call."""
    times = []
    for _ in range(rounds):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return statistics.median(times)


def mbps(text: str, seconds: float) -> float:
    return len(text.encode()) / 1e6 / seconds if seconds > 0 else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--kb", type=int, default=256, help="size of each text (KiB)")
    args = parser.parse_args()
    size = args.kb * 1024
    rng = random.Random(1)

    started = time.process_time()
    Redactor(RedactionConfig())  # first build compiles the patterns (cached per detector set)
    print(f"first Redactor build: {(time.process_time() - started) * 1000:.0f} ms CPU")
    whole = Redactor(RedactionConfig(max_chars=0))
    cut = Redactor(RedactionConfig())

    print(f"\nordinary text, {args.kb} KiB each, median of {args.rounds} (CPU time):")
    for name, text in [
        ("chat prose, a little PII", chat_text(size, rng)),
        ("prose, no PII", plain_text(size, rng)),
        ("JSON tool result", json_text(size, rng)),
        ("CJK prose", cjk_text(size, rng)),
    ]:
        found = sum(whole.redact(text)[1].values())
        seconds = cpu(lambda text=text: whole.redact(text), args.rounds)
        print(f"  {name:26s} {mbps(text, seconds):7.1f} MB/s   {found:5d} values masked")

    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": PROSE[2] * 4},
            *(
                {"role": "user" if i % 2 else "assistant", "content": chat_text(1500, rng)}
                for i in range(10)
            ),
        ],
    }
    seconds = cpu(lambda: [cut.redact_value(body) for _ in range(100)], args.rounds) / 100
    size_kb = len(json.dumps(body)) / 1024
    print(
        f"  chat request body ({size_kb:.0f} KiB, 11 messages) redact_value: {seconds * 1e6:.0f} µs"
    )

    strings = hostile(size)
    total_bytes = sum(len(s.encode()) for s in strings.values())
    for label, redactor, limit in [("whole strings", whole, None), ("cut at 32768", cut, 32768)]:
        per: dict[str, float] = {}
        for name, text in strings.items():
            per[name] = cpu(lambda text=text, r=redactor: r.redact(text), args.rounds)
        used = sum(len(s[:limit].encode()) for s in strings.values()) if limit else total_bytes
        worst = max(per, key=per.__getitem__)
        print(
            f"\nhostile strings ({label}): {mbps('x' * used, sum(per.values())):.1f} MB/s over "
            f"{len(strings)} strings; worst '{worst}' {per[worst] * 1000:.1f} ms"
        )
        if limit is None:
            for name, seconds in sorted(per.items(), key=lambda kv: -kv[1]):
                print(
                    f"  {name:20s} {seconds * 1000:7.1f} ms  {mbps(strings[name], seconds):7.1f} MB/s"
                )


if __name__ == "__main__":
    main()
