"""Benchmark: TokenCounter's cost per 1k prompt tokens (µs) for short and long chat prompts.

    TIKTOKEN_CACHE_DIR=/work/shared/tiktoken-cache python bench/bench_tokens.py [--runs 7]

Each figure is the median over --runs runs; a run repeats the call for about --seconds
and divides. "tiktoken" is encode_ordinary on the same text: the floor under our formula.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pricing.tokens import TokenCounter

MODEL = "gpt-4o-mini"
WORDS = (
    "the gateway counts tokens before it forwards a request so that budgets and rate "
    "limits see the prompt size; prices are kept in nano-USD, 1234 5678, café, naïve, "
    "def f(x): return x * 2  # code { json: true } <tag/> https://example.com/a?b=c"
).split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def chat(rng: random.Random, turns: int, words: int) -> dict:
    messages = [{"role": "system", "content": text(rng, words)}]
    for i in range(turns):
        messages.append(
            {"role": "user" if i % 2 == 0 else "assistant", "content": text(rng, words)}
        )
    return {"model": MODEL, "messages": messages}


def per_call_us(fn: Callable[[], object], seconds: float, runs: int) -> float:
    fn()  # warm: encodings loaded, caches filled
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 4:
        fn()
        calls += 1
    loops = max(calls * 4, 1)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        samples.append((time.perf_counter() - start) / loops * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.3, help="per run")
    args = parser.parse_args()

    counter = TokenCounter()
    rng = random.Random(0)
    bodies = {"short chat": chat(rng, 1, 12), "long chat": chat(rng, 40, 400)}
    encoding = counter._encoding("o200k_base")  # the floor: raw tiktoken on the same text
    if encoding is None:
        sys.exit("o200k_base not loadable: set TIKTOKEN_CACHE_DIR")

    print(f"model {MODEL}, median of {args.runs} runs")
    print(f"{'prompt':<12}{'tokens':>8}  {'method':<12}{'µs/call':>10}{'µs/1k tok':>11}")
    for label, body in bodies.items():
        joined = "\n".join(m["content"] for m in body["messages"])
        tokens = counter.count_chat(MODEL, body).tokens
        text_tokens = counter.count_text(MODEL, joined).tokens
        cases = [
            ("count_chat", tokens, lambda b=body: counter.count_chat(MODEL, b)),
            ("count_text", text_tokens, lambda t=joined: counter.count_text(MODEL, t)),
            ("tiktoken", text_tokens, lambda t=joined: encoding.encode_ordinary(t)),
        ]
        for method, n, fn in cases:
            us = per_call_us(fn, args.seconds, args.runs)
            print(f"{label:<12}{n:>8}  {method:<12}{us:>10.1f}{us / n * 1000:>11.1f}")


if __name__ == "__main__":
    main()
