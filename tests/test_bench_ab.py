"""bench.run's A/B of two builds: --targets, where the baseline's packages come from, and
the gateway/baseline figures of the report. No load is run here (that is bench.run's job)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import run as bench

BOTH = ("plain", "stream")


def test_targets_default_to_every_target_in_both_modes() -> None:
    assert bench.parse_targets(None, baseline=False) == dict.fromkeys(bench.TARGETS, BOTH)
    assert list(bench.parse_targets(None, baseline=True)) == [*bench.TARGETS, "baseline"]


def test_targets_pick_targets_and_modes_in_round_order() -> None:
    modes = bench.parse_targets("baseline, direct:plain,gateway:stream,gateway:plain", True)
    assert modes == {"direct": ("plain",), "gateway": BOTH, "baseline": BOTH}
    assert list(modes) == ["direct", "gateway", "baseline"]


@pytest.mark.parametrize(
    ("spec", "baseline", "message"),
    [
        ("baseline", False, "needs --baseline"),
        ("gw", True, "unknown target"),
        ("gateway:fast", True, "unknown mode"),
        (" , ", True, "no target"),
    ],
)
def test_targets_refuse_what_cannot_run(spec: str, baseline: bool, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bench.parse_targets(spec, baseline)


def make_tree(root: Path, packages: tuple[str, ...]) -> Path:
    for name in packages:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text("")
    return root


def test_baseline_packages_come_from_its_own_tree(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "base", bench.BUILD_PACKAGES)
    build = bench.Build("baseline", tree, tree / "config.yaml")
    files = bench.build_imports(build)
    assert set(files) == set(bench.BUILD_PACKAGES)
    assert all(Path(f).parent.parent == tree for f in files.values())


def test_a_package_missing_from_the_baseline_tree_is_refused(tmp_path: Path) -> None:
    # without policies/ there, it would come from this checkout (or nowhere): never measured
    tree = make_tree(tmp_path / "base", ("gateway", "pricing"))
    with pytest.raises(RuntimeError, match="policies"):
        bench.build_imports(bench.Build("baseline", tree, tree / "config.yaml"))


def test_this_checkout_runs_its_own_packages() -> None:
    files = bench.build_imports(bench.Build("gateway", bench.REPO, bench.CONFIG))
    assert all(Path(f).resolve().is_relative_to(bench.REPO) for f in files.values())


def plain(r: int, target: str, c: int, rps: float, cpu: float, p50_ms: float) -> dict[str, Any]:
    return {
        "round": r, "mode": "plain", "concurrency": c, "target": target, "rps": rps,
        "p50_us": 1000 * p50_ms, "p99_us": 2000 * p50_ms, "cpu_ms_per_req": cpu, "errors": 0,
    }  # fmt: skip


def stream(r: int, target: str, c: int, ttft: float, cpu: float) -> dict[str, Any]:
    return {
        "round": r, "mode": "stream", "concurrency": c, "target": target, "ttft_p50_ms": ttft,
        "ttft_p99_ms": 2 * ttft, "total_p50_ms": 100.0, "streams_per_s": 10.0,
        "cpu_ms_per_req": cpu, "errors": 0,
    }  # fmt: skip


RUNS = [
    plain(0, "direct", 1, 40000, 0.01, 0.02),
    plain(0, "gateway", 1, 1000, 1.0, 1.02),
    plain(0, "baseline", 1, 500, 2.0, 0.52),
    plain(1, "direct", 1, 40000, 0.01, 0.02),
    plain(1, "gateway", 1, 300, 3.0, 1.02),
    plain(1, "baseline", 1, 1000, 1.0, 0.52),
    stream(0, "gateway", 16, 3.0, 4.0),
    stream(0, "baseline", 16, 2.0, 4.0),
]


def test_ab_ratios_are_paired_per_round() -> None:
    summary = bench.summarize(RUNS, ["direct", "gateway", "baseline"])
    ab = bench.ab_summary(RUNS, summary)
    assert ab is not None
    cpu = ab["plain"][1]["cpu_ms_per_req"]
    # rounds: 1.0/2.0 and 3.0/1.0; the ratio of the medians would be 2.0/1.5
    assert cpu["ratio_rounds"] == [0.5, 3.0]
    assert cpu["ratio"] == pytest.approx(1.75)
    assert ab["plain"][1]["rps"]["ratio"] == pytest.approx((2.0 + 0.3) / 2)
    # added p50: gateway +1.0 ms, baseline +0.5 ms over direct, ratio of the medians
    assert ab["plain"][1]["added_p50_ms"]["ratio"] == pytest.approx(2.0)
    s16 = ab["stream"][16]
    assert s16["ttft_p50_ms"]["ratio"] == pytest.approx(1.5)
    assert s16["added_ttft_p50_ms"]["ratio"] is None  # no direct streams ran
    assert set(ab["plain"]) == {1}


def test_no_ab_without_a_baseline() -> None:
    runs = [r for r in RUNS if r["target"] != "baseline"]
    assert bench.ab_summary(runs, bench.summarize(runs, ["direct", "gateway"])) is None


def report(runs: list[dict[str, Any]], targets: list[str], ab: bool) -> dict[str, Any]:
    summary = bench.summarize(runs, targets)
    meta: dict[str, Any] = {
        "utc": "T", "commit": "abc1234", "rounds": 2, "duration_s": 1.0, "quick": False,
        "transport": "aiohttp-transport", "loadavg": "0.5 0.5 0.5", "chunks": 20,
        "chunk_delay_ms": 5, "config": "bench/config.bench.yaml",
    }  # fmt: skip
    out: dict[str, Any] = {
        "meta": meta, "summary": summary, "runs": runs, "rss_idle_mb": {}, "rss_load_mb": {},
        "goals": bench.goals(summary, {}), "gateway_checks": {},
    }  # fmt: skip
    if ab:
        meta["gateway_tree"] = {"dir": "/repo", "commit": "a" * 40, "dirty": True}
        meta["baseline"] = {"dir": "/tmp/tg-base", "commit": "b" * 40, "dirty": False,
                            "config": "/tmp/tg-base/bench/config.bench.yaml"}  # fmt: skip
        out["ab"] = bench.ab_summary(runs, summary)
    return out


def test_the_report_has_an_ab_section_only_with_a_baseline() -> None:
    with_ab = bench.markdown(report(RUNS, ["direct", "gateway", "baseline"], ab=True))
    assert "A/B, gateway = this checkout `aaaaaaaaaaaa` + uncommitted changes" in with_ab
    assert "at `bbbbbbbbbbbb` (config" in with_ab
    assert "| 1 | 650 vs 750 (1.15x) | 2.000 vs 1.500 (1.75x) |" in with_ab
    assert "| 16 | 3.000 vs 2.000 (1.50x) | - | 6.000 vs 4.000 (1.50x) |" in with_ab
    runs = [r for r in RUNS if r["target"] != "baseline"]
    assert "A/B" not in bench.markdown(report(runs, ["direct", "gateway"], ab=False))
