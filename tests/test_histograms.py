"""gateway.telemetry.fast.histograms: the same points the SDK's histogram would give, at a fraction of the cost."""

from __future__ import annotations

import random

import pytest
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from gateway.telemetry.fast import histograms as hmod
from gateway.telemetry.fast.histograms import Histograms
from gateway.telemetry.prometheus import MetricSpec

BOUNDS = (0.01, 0.02, 0.04, 0.08)
SPEC = MetricSpec("t.duration", "histogram", "s", "a duration", ("k",), BOUNDS)
OTHER = MetricSpec("t.tokens", "histogram", "{token}", "tokens", ("k",), (1, 4, 16))
COUNTER = MetricSpec("t.count", "counter", "1", "a counter", ("k",))
RESOURCE = Resource.create({"service.name": "t"})
SCOPE = InstrumentationScope("tallygate", "1.0")


def points(data, name: str) -> list:
    return [
        p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == name
        for p in m.data.data_points
    ]


def by_attributes(data, name: str) -> dict:
    return {tuple(sorted(p.attributes.items())): p for p in points(data, name)}


def test_points_equal_the_sdk_histogram() -> None:
    sdk_reader, reader = InMemoryMetricReader(), InMemoryMetricReader()
    view = View(instrument_name=SPEC.name, aggregation=ExplicitBucketHistogramAggregation(BOUNDS))
    sdk = MeterProvider(metric_readers=[sdk_reader], resource=RESOURCE, views=[view])
    sdk_histogram = sdk.get_meter("sdk").create_histogram(SPEC.name, SPEC.unit, SPEC.description)
    ours = Histograms([SPEC, OTHER, COUNTER], RESOURCE, SCOPE)
    MeterProvider(metric_readers=[reader], resource=RESOURCE)  # no instruments of its own
    ours.attach(reader)
    record = ours.recorder(SPEC.name)
    rng = random.Random(7)
    values = [0.0, 0.01, 0.02, 0.0200001, 0.08, 0.5] + [rng.random() / 10 for _ in range(200)]
    for i, v in enumerate(values):
        attrs = {"k": "a" if i % 3 else "b", "n": i % 2}
        record(v, attrs)
        sdk_histogram.record(v, attrs)
    mine = by_attributes(reader.get_metrics_data(), SPEC.name)
    theirs = by_attributes(sdk_reader.get_metrics_data(), SPEC.name)
    assert set(mine) == set(theirs) and len(theirs) == 4
    for key, expected in theirs.items():
        got = mine[key]
        assert (got.count, list(got.bucket_counts), list(got.explicit_bounds)) == (
            expected.count, list(expected.bucket_counts), list(expected.explicit_bounds),
        )  # fmt: skip
        assert (got.min, got.max) == (expected.min, expected.max)
        assert got.sum == pytest.approx(expected.sum)
    [metric] = [m for rm in reader.get_metrics_data().resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics]  # fmt: skip
    assert (metric.name, metric.unit, metric.description) == (SPEC.name, "s", "a duration")
    assert metric.data.aggregation_temporality is AggregationTemporality.CUMULATIVE


def test_added_under_the_scope_and_resource_of_the_collection() -> None:
    ours = Histograms([SPEC], RESOURCE, SCOPE)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], resource=RESOURCE)
    ours.attach(reader)
    counter = provider.get_meter("tallygate", "1.0").create_counter("t.count")
    assert reader.get_metrics_data() is None  # nothing recorded anywhere yet
    ours.recorder(SPEC.name)(0.03, {"k": "x"})
    counter.add(1)
    data = reader.get_metrics_data()
    [rm] = data.resource_metrics
    [sm] = rm.scope_metrics  # one scope: ours joined the SDK's "tallygate" scope
    assert {m.name for m in sm.metrics} == {"t.count", SPEC.name}
    [p] = points(data, SPEC.name)
    assert p.bucket_counts == [0, 0, 1, 0, 0] and p.count == 1 and p.min == p.max == 0.03


def test_cumulative_keeps_counting_delta_restarts() -> None:
    cumulative, delta = (
        InMemoryMetricReader(),
        InMemoryMetricReader(preferred_temporality={SdkHistogram: AggregationTemporality.DELTA}),
    )
    ours = Histograms([SPEC], RESOURCE, SCOPE)
    MeterProvider(metric_readers=[cumulative, delta], resource=RESOURCE)
    ours.attach(cumulative)
    ours.attach(delta)
    record = ours.recorder(SPEC.name)
    record(0.015, {"k": "x"})
    record(0.05, {"k": "x"})
    [c1], [d1] = (
        points(cumulative.get_metrics_data(), SPEC.name),
        points(delta.get_metrics_data(), SPEC.name),
    )
    assert c1.count == d1.count == 2
    record(0.001, {"k": "x"})
    [c2], [d2] = (
        points(cumulative.get_metrics_data(), SPEC.name),
        points(delta.get_metrics_data(), SPEC.name),
    )
    assert c2.count == 3 and c2.start_time_unix_nano == c1.start_time_unix_nano
    assert d2.count == 1 and d2.min == d2.max == 0.001
    assert d2.start_time_unix_nano >= d1.time_unix_nano  # the interval after the last one
    assert delta.get_metrics_data() is None  # nothing new, nothing else: nothing delivered
    [c3] = points(cumulative.get_metrics_data(), SPEC.name)
    assert c3.count == 3


def test_series_past_the_limit_fold_into_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hmod, "CARDINALITY_LIMIT", 3)
    ours = Histograms([SPEC], RESOURCE, SCOPE)
    reader = InMemoryMetricReader()
    MeterProvider(metric_readers=[reader], resource=RESOURCE)
    ours.attach(reader)
    record = ours.recorder(SPEC.name)
    for i in range(6):
        record(0.01, {"k": str(i)})
    record(0.01, {"k": "0"})  # an existing series still counts as itself
    got = {
        tuple(p.attributes.items()): p.count for p in points(reader.get_metrics_data(), SPEC.name)
    }
    assert got == {(("k", "0"),): 2, (("k", "1"),): 1, (("k", "2"),): 1, (("otel.metric.overflow", True),): 3}  # fmt: skip
