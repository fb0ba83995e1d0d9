"""Recall and false positives of the Redactor on the labelled corpus in tests/data/redaction_corpus.py."""

from __future__ import annotations

from collections import Counter

import pytest

from policies.redaction import RedactionConfig, Redactor
from tests.data.redaction_corpus import Example, benign_sentences, pii_examples

FULL_RECALL = ("secret", "credit_card", "email")  # every one of these must be caught
MIN_RECALL = 0.98  # over all examples
MAX_BENIGN_ALTERED = 0.01


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return Redactor(RedactionConfig())


def caught(redactor: Redactor, example: Example) -> bool:
    """The exact value is gone and the expected label is where it was."""
    out, counts = redactor.redact(example.text)
    return (
        example.secret not in out
        and f"[{example.kind.upper()}]" in out
        and counts.get(example.kind, 0) >= 1
    )


def test_corpus_is_large_and_varied() -> None:
    examples = pii_examples()
    assert len(examples) >= 200
    assert len({e.text for e in examples}) == len(examples)
    assert all(e.secret in e.text for e in examples)
    assert {e.kind for e in examples} == {
        "email",
        "phone",
        "credit_card",
        "ssn",
        "iban",
        "ip",
        "secret",
    }
    benign = benign_sentences()
    assert len(benign) >= 200 and len(set(benign)) >= 0.95 * len(benign)
    assert pii_examples() == examples and benign_sentences() == benign  # deterministic


def test_recall(redactor: Redactor) -> None:
    total: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    missed: list[Example] = []
    for example in pii_examples():
        total[example.kind] += 1
        if caught(redactor, example):
            hits[example.kind] += 1
        else:
            missed.append(example)
    print()
    for kind in sorted(total):
        print(
            f"recall {kind:12s} {hits[kind]:3d}/{total[kind]:3d} = {hits[kind] / total[kind]:.1%}"
        )
    overall = sum(hits.values()) / sum(total.values())
    print(f"recall overall      {sum(hits.values()):3d}/{sum(total.values()):3d} = {overall:.1%}")
    for example in missed:
        print(f"  missed {example.kind}: {example.text!r}")
    for kind in FULL_RECALL:
        assert hits[kind] == total[kind], [e.text for e in missed if e.kind == kind]
    assert overall >= MIN_RECALL


def test_benign_sentences_are_left_alone(redactor: Redactor) -> None:
    sentences = benign_sentences()
    altered = [(s, out) for s in sentences if (out := redactor.redact(s)[0]) != s]
    rate = len(altered) / len(sentences)
    print(f"\nbenign altered {len(altered)}/{len(sentences)} = {rate:.1%}")
    for before, after in altered:
        print(f"  {before!r}\n   -> {after!r}")
    assert rate <= MAX_BENIGN_ALTERED


def test_hash_mode_hides_what_label_mode_hides(redactor: Redactor) -> None:
    hashing = Redactor(RedactionConfig(replacement="hash", hash_key="corpus"))
    for example in pii_examples():
        if not caught(redactor, example):
            continue
        out, _ = hashing.redact(example.text)
        assert example.secret not in out, example.text
        assert f"[{example.kind.upper()}:" in out, example.text
