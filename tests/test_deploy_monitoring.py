"""deploy/ monitoring matches the gateway: promtool checks and unit-tests the alert rules,
and every metric, label and label value that deploy/alerts.yml and the Grafana dashboards
use is in a real /metrics scrape after traffic that produces every series."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_upstream import FakeUpstream, error_reply
from tests.gateway_harness import KEYS, base_config, merge, running_gateway
from tests.otlp_receiver import dead_endpoint
from tests.redis_server import RedisServer, require_redis_server
from tests.servers import wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "alerts.yml"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
RULE_TESTS = sorted((DEPLOY / "tests").glob("*.yml"))
GAMMA_KEY = "sk-gamma-key-5555"
PII = [{"role": "user", "content": "write to jane.doe@example.com please"}]

# the label set of a series: label name -> values seen
Labels = dict[str, set[str]]


# ---- promtool ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    message = "promtool is not installed (Debian: apt-get install prometheus; .ci/run does)"
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"{message}: CI must run the rule checks", pytrace=False)
    pytest.skip(message)


def run_promtool(promtool: str, *args: str | Path) -> str:
    done = subprocess.run(
        [promtool, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_promtool_check_rules(promtool: str) -> None:
    assert "SUCCESS" in run_promtool(promtool, "check", "rules", ALERTS)


def test_promtool_rule_unit_tests(promtool: str) -> None:
    assert RULE_TESTS, "no promtool unit tests in deploy/tests/"
    assert "SUCCESS" in run_promtool(promtool, "test", "rules", *RULE_TESTS)


def test_promtool_check_prometheus_config(promtool: str, tmp_path: Path) -> None:
    # the container path of the rules file, pointed at the repository's copy
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    assert "SUCCESS" in run_promtool(promtool, "check", "config", tmp_path / "prometheus.yml")


# ---- one path for metrics into Prometheus -------------------------------------------------


def test_prometheus_scrapes_the_gateways_only_once() -> None:
    """Every series reaches Prometheus by one path: the gateways' /metrics, not also the
    Collector's re-export (which made every sum() count twice)."""
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    ]
    assert sorted(targets) == ["gateway-1:4000", "gateway-2:4000"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert {t.split(":")[0] for t in targets} <= set(compose["services"])
    collector = yaml.safe_load((DEPLOY / "otel-collector.yaml").read_text())
    metrics_exporters = collector["service"]["pipelines"]["metrics"]["exporters"]
    assert not [e for e in metrics_exporters if e.split("/")[0].startswith("prometheus")]


def test_budget_limit_records_match_the_deploy_config() -> None:
    """/metrics has no budget limit: alerts.yml records the config's, and must keep up."""
    config = yaml.safe_load((DEPLOY / "config.yaml").read_text())
    budgets = {
        team: (float(spec["budget"]["limit_usd"]), spec["budget"]["period"])
        for team, spec in config["teams"].items()
        if spec.get("budget")
    }
    recorded = {}
    for rule in rules():
        if rule.get("record") == "tallygate:budget_limit_usd":
            match = re.fullmatch(r"vector\(([0-9.]+)\)", rule["expr"].strip())
            assert match, rule["expr"]
            labels = rule["labels"]
            recorded[labels["tallygate_team"]] = (
                float(match[1]),
                labels["tallygate_budget_period"],
            )
    assert budgets and recorded == budgets


# ---- PromQL: the metrics and labels an expression uses -----------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<duration>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*\b)
  | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<var>\$\{?\w+\}?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^=<>{}(),@])
    """,
    re.VERBOSE,
)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# aggregations too: `sum by (x) (...)` puts the modifier before the parenthesis
_AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                 "bottomk", "topk", "quantile", "limitk", "limit_ratio"}  # fmt: skip
_KEYWORDS = (
    _GROUPING | _AGGREGATIONS | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
)


@dataclass
class Selector:
    metric: str | None
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)


@dataclass
class Usage:
    selectors: list[Selector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)  # by/without/on/ignoring/group_* labels


def tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        assert match, f"cannot tokenize PromQL at {expr[pos:]!r}"
        pos = match.end()
        if match.lastgroup != "ws":
            out.append((match.lastgroup or "", match.group()))
    return out


def _unquote(token: str) -> str:
    body = token[1:-1]
    return body if token[0] == "`" else re.sub(r"\\(.)", r"\1", body)


def _matchers(toks: list[tuple[str, str]], i: int) -> tuple[list[tuple[str, str, str]], int]:
    """The label matchers of the `{...}` opening at toks[i]; the index after the `}`."""
    found, i = [], i + 1
    while toks[i][1] != "}":
        if toks[i][1] == ",":
            i += 1
            continue
        (kind, label), (_, op), (value_kind, value) = toks[i : i + 3]
        assert kind == "ident" and value_kind == "string", toks[i : i + 3]
        found.append((label, op, _unquote(value)))
        i += 3
    return found, i + 1


def promql_usage(expr: str) -> Usage:
    """The selectors (metric names and matchers) and grouping labels of an expression."""
    toks, usage, i = tokens(expr), Usage(), 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident" and text in _GROUPING and following == "(":
            i += 2
            while toks[i][1] != ")":
                if toks[i][0] == "ident":
                    usage.grouping.add(toks[i][1])
                i += 1
        elif kind == "ident" and (text in _KEYWORDS or following == "("):
            pass  # a keyword, a function or an aggregation
        elif kind == "ident" or text == "{":
            selector = Selector(None if text == "{" else text)
            if text != "{" and following == "{":
                i += 1
            if toks[i][1] == "{":
                selector.matchers, i = _matchers(toks, i)
                i -= 1
            usage.selectors.append(selector)
        i += 1
    return usage


def test_promql_usage_reads_selectors_matchers_and_grouping() -> None:
    usage = promql_usage(
        'sum by (a, b) (rate(m_total{x="1",y=~"2|3"}[5m] offset 1h)) / on (a) group_left () '
        "n:rec * 3600 > 1 and histogram_quantile(0.5, rate(h_bucket[1m]))"
    )
    assert [(s.metric, s.matchers) for s in usage.selectors] == [
        ("m_total", [("x", "=", "1"), ("y", "=~", "2|3")]),
        ("n:rec", []),
        ("h_bucket", []),
    ]
    assert usage.grouping == {"a", "b"}


# ---- the rules and dashboards --------------------------------------------------------------


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every query target in the dashboards, rows' panels included."""
    found: list[tuple[str, str]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            where = f"{where} / {node['title']}" if isinstance(node.get("title"), str) else where
            for key, value in node.items():
                if key == "expr" and isinstance(value, str) and value.strip():
                    found.append((where, value))
                else:
                    walk(value, where)
        elif isinstance(node, list):
            for item in node:
                walk(item, where)

    for path in DASHBOARDS:
        walk(json.loads(path.read_text()), path.name)
    return found


def recorded_labels(scrape: dict[str, Labels]) -> dict[str, Labels]:
    """What the recording rules make, label names as they can carry (values: their own)."""
    records: dict[str, Labels] = {}
    for rule in rules():
        if "record" not in rule:
            continue
        labels = records.setdefault(rule["record"], {})
        for name, value in rule.get("labels", {}).items():
            labels.setdefault(name, set()).add(value)
        for selector in promql_usage(rule["expr"]).selectors:
            source = scrape.get(selector.metric or "") or records.get(selector.metric or "", {})
            for name in source:
                labels.setdefault(name, set())
    return records


def problems(
    where: str, expr: str, scrape: dict[str, Labels], extra: frozenset[str] | set[str] = frozenset()
) -> list[str]:
    """What in `expr` the scrape does not have. `extra`: labels used by templates on it."""
    records = recorded_labels(scrape)
    usage = promql_usage(expr)
    found: list[str] = []
    available: set[str] = set()
    for selector in usage.selectors:
        name = selector.metric or ""
        series = scrape.get(name)
        if series is None and name in records:
            series, check_values = records[name], False  # values come from the config
        else:
            check_values = True
        if series is None:
            found.append(f"{where}: metric {name!r} is not in /metrics")
            continue
        available |= set(series)
        for label, op, value in selector.matchers:
            if label not in series:
                found.append(f"{where}: {name} has no label {label!r} (has {sorted(series)})")
            elif check_values and value and op == "=" and value not in series[label]:
                found.append(f"{where}: {name}{{{label}}} never is {value!r}: {series[label]}")
            elif check_values and value and op == "=~":
                if not any(re.fullmatch(value, seen) for seen in series[label]):
                    found.append(f"{where}: {name}{{{label}}} never matches {value!r}")
    for label in (usage.grouping | extra) - available:
        found.append(f"{where}: label {label!r} is on none of its metrics")
    if extra - usage.grouping and usage.grouping:
        found.append(f"{where}: the result has no label {sorted(extra - usage.grouping)}")
    return found


def template_labels(rule: dict[str, Any]) -> set[str]:
    text = " ".join(str(v) for v in rule.get("annotations", {}).values())
    return set(re.findall(r"\$labels\.(\w+)", text))


# ---- a real gateway, every series ------------------------------------------------------------


def parse_scrape(text: str) -> dict[str, Labels]:
    series: dict[str, Labels] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = series.setdefault(sample.name, {})
            for name, value in sample.labels.items():
                labels.setdefault(name, set()).add(value)
    return series


def _traffic_config(upstream: FakeUpstream, redis: RedisServer, db: Path) -> dict[str, Any]:
    return merge(
        base_config(upstream.base_url, db),
        {
            "teams": {
                "beta": {"budget": {"limit_usd": "0.000001", "period": "monthly"}},
                "gamma": {
                    "keys": [{"name": "gamma-app", "key": GAMMA_KEY}],
                    "rate_limit": {"rpm": 1, "tpm": 100000},
                    "models": ["demo"],
                },
            },
            "store": {"backend": "redis", "redis_url": redis.url, "timeout_s": 0.5},
            # access lines exported as OTLP logs to nowhere: dropped telemetry, counted
            "telemetry": {
                "exporter": "otlp",
                "endpoint": dead_endpoint(),
                "export_logs": True,
                "export_timeout_s": 1,
            },
        },
    )


def _status(call: Any) -> int:
    try:
        call()
    except openai.APIStatusError as e:
        return e.status_code
    return 200


def _send_every_kind(base_url: str, upstream: FakeUpstream, redis: RedisServer) -> list[int]:
    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=20)

    alpha, beta, gamma = client(KEYS["alpha"]), client(KEYS["beta"]), client(GAMMA_KEY)
    chat = alpha.chat.completions.create
    demo = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    codes = [
        _status(lambda: chat(model="gpt-4o-mini", messages=PII)),  # success, redaction
        _status(lambda: list(chat(model="gpt-4o-mini", messages=PII, stream=True))),
    ]
    # retries on both deployments, a fallback between them, then 502
    upstream.enqueue(*[error_reply(500)] * 4)
    codes.append(_status(lambda: chat(model="fallback", messages=PII)))
    codes.append(_status(lambda: beta.chat.completions.create(**demo)))  # budget 429
    codes += [_status(lambda: gamma.chat.completions.create(**demo)) for _ in range(2)]
    redis.stop()  # the store fails: fail_closed refuses with 503
    codes.append(_status(lambda: gamma.chat.completions.create(**demo)))
    return codes


@pytest.fixture(scope="module")
def scrape(
    _fake_upstream_server: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Labels]]:
    require_redis_server()
    upstream = _fake_upstream_server
    upstream.reset()
    with RedisServer() as redis:
        cfg = _traffic_config(upstream, redis, tmp_path_factory.mktemp("mon") / "t.db")
        with running_gateway(cfg) as gw:
            codes = _send_every_kind(gw.base_url, upstream, redis)
            assert codes == [200, 200, 502, 429, 200, 429, 503]
            telemetry = gw.gateway.telemetry
            wait_until(lambda: telemetry.dropped > 0, within=30, what="dropped telemetry")
            yield parse_scrape(httpx.get(gw.url + "/metrics").text)
    upstream.reset()


def test_the_traffic_produced_every_series(scrape: dict[str, Labels]) -> None:
    assert scrape["tallygate_rejections_total"]["tallygate_rejection_kind"] == {
        "budget",
        "rate_limit",
    }
    assert {"200", "429", "502", "503"} <= scrape["tallygate_requests_total"][
        "http_response_status_code"
    ]
    for name in (
        "gen_ai_client_operation_time_to_first_chunk_seconds_bucket",
        "tallygate_retries_total",
        "tallygate_fallbacks_total",
        "tallygate_store_errors_total",
        "tallygate_redactions_total",
        "tallygate_telemetry_dropped_total",
    ):
        assert name in scrape, name


def test_alert_rules_use_what_metrics_serves(scrape: dict[str, Labels]) -> None:
    found = []
    for rule in rules():
        where = f"alerts.yml {rule.get('alert') or rule.get('record')}"
        found += problems(where, rule["expr"], scrape, template_labels(rule))
    assert found == []


def test_dashboards_use_what_metrics_serves(scrape: dict[str, Labels]) -> None:
    exprs = dashboard_exprs()
    assert exprs, "no PromQL found in the dashboards"
    found = [p for where, expr in exprs for p in problems(where, expr, scrape)]
    assert found == []


def test_the_check_catches_the_old_rejection_label(scrape: dict[str, Labels]) -> None:
    """The rule that never fired (`kind` instead of `tallygate_rejection_kind`) is flagged."""
    old = 'sum by (tallygate_team) (rate(tallygate_rejections_total{kind="budget"}[15m])) > 0'
    assert problems("old", old, scrape) == [
        "old: tallygate_rejections_total has no label 'kind' "
        "(has ['tallygate_rejection_kind', 'tallygate_team'])"
    ]
    assert problems("old", "sum by (kind) (rate(tallygate_rejections_total[5m]))", scrape) == [
        "old: label 'kind' is on none of its metrics"
    ]
