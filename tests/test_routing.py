"""gateway.pipeline.routing: plan order, weights, cooldowns, backoff and Retry-After, as units.

A seeded `random.Random` and a hand-moved clock make every outcome reproducible; the
gateway's wiring of the same Router is tested over HTTP in tests/test_gateway_routing.py.
"""

from __future__ import annotations

import collections
import math
import random
from typing import Any

import pytest

from gateway.config import Config
from gateway.pipeline.routing import Deployment, Router, parse_retry_after

PROVIDERS = {"a": {"kind": "openai", "timeout_s": 7}, "b": {"kind": "openai"}}


def config(models: dict[str, list[dict[str, Any]]], **routing: Any) -> Config:
    return Config.model_validate({"providers": PROVIDERS, "models": models, "routing": routing})


def dep(model: str, weight: float | None = None, **extra: Any) -> dict[str, Any]:
    return {"provider": "a", "model": model, **({"weight": weight} if weight else {}), **extra}


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FixedRandom(random.Random):
    """random() always gives `value`: the jitter's two ends, exactly."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


def models_of(plan: list[Deployment]) -> list[str]:
    return [d.model for d in plan]


def first_shares(router: Router, alias: str, runs: int) -> dict[str, float]:
    route = router.get(alias)
    assert route is not None
    firsts = collections.Counter(router.plan(route)[0].model for _ in range(runs))
    return {model: n / runs for model, n in firsts.items()}


# --- the route table -------------------------------------------------------------------


def test_routes_keep_config_order_labels_and_timeouts() -> None:
    router = Router(config({"m": [dep("x", name="primary"), dep("y", timeout_s=3)]}))
    route = router.get("m")
    assert route is not None and router.get("nope") is None
    x, y = route.deployments
    assert (x.alias, x.index, x.label, x.provider, x.model) == ("m", 0, "primary", "a", "x")
    assert (y.index, y.label) == (1, "a/y")  # the default label: provider/model
    assert x.timeout_s == 7 and y.timeout_s == 3  # the provider's, unless the deployment's


def test_unweighted_deployments_are_tried_in_config_order() -> None:
    router = Router(config({"m": [dep("x"), dep("y"), dep("z")]}), rng=random.Random(1))
    route = router.get("m")
    assert route is not None
    for _ in range(20):
        assert models_of(router.plan(route)) == ["x", "y", "z"]


def test_a_weighted_run_stays_between_its_unweighted_neighbours() -> None:
    router = Router(
        config({"m": [dep("first"), dep("w1", 1), dep("w2", 1), dep("w3", 1), dep("last")]}),
        rng=random.Random(7),
    )
    route = router.get("m")
    assert route is not None
    orders = set()
    for _ in range(200):
        plan = models_of(router.plan(route))
        assert plan[0] == "first" and plan[-1] == "last"
        assert sorted(plan[1:4]) == ["w1", "w2", "w3"]  # each once: fallbacks to one another
        orders.add(tuple(plan[1:4]))
    assert len(orders) == 6  # every order of the three turns up


def test_two_weighted_runs_are_shuffled_apart() -> None:
    models = [dep("a1", 1), dep("a2", 1), dep("fixed"), dep("b1", 1), dep("b2", 1)]
    router = Router(config({"m": models}), rng=random.Random(3))
    route = router.get("m")
    assert route is not None
    for _ in range(50):
        plan = models_of(router.plan(route))
        assert set(plan[:2]) == {"a1", "a2"} and plan[2] == "fixed"
        assert set(plan[3:]) == {"b1", "b2"}


def test_weights_share_first_place_in_proportion() -> None:
    router = Router(config({"m": [dep("big", 3), dep("small", 1)]}), rng=random.Random(42))
    shares = first_shares(router, "m", 4000)
    assert shares["big"] == pytest.approx(0.75, abs=0.03)
    assert shares["small"] == pytest.approx(0.25, abs=0.03)


def test_three_weights_share_first_place_in_proportion() -> None:
    models = [dep("x", 1), dep("y", 1), dep("z", 2)]
    router = Router(config({"m": models}), rng=random.Random(11))
    shares = first_shares(router, "m", 4000)
    assert shares["x"] == pytest.approx(0.25, abs=0.03)
    assert shares["y"] == pytest.approx(0.25, abs=0.03)
    assert shares["z"] == pytest.approx(0.5, abs=0.03)


def test_a_lone_weighted_deployment_is_not_shuffled() -> None:
    router = Router(config({"m": [dep("x"), dep("w", 5), dep("y")]}), rng=random.Random(5))
    route = router.get("m")
    assert route is not None
    assert {tuple(models_of(router.plan(route))) for _ in range(20)} == {("x", "w", "y")}


def test_the_same_seed_gives_the_same_plans() -> None:
    cfg = config({"m": [dep("x", 1), dep("y", 2), dep("z", 3)]})

    def plans(seed: int) -> list[list[str]]:
        router = Router(cfg, rng=random.Random(seed))
        route = router.get("m")
        assert route is not None
        return [models_of(router.plan(route)) for _ in range(30)]

    assert plans(9) == plans(9)
    assert plans(9) != plans(10)


# --- health: failures and cooldown -----------------------------------------------------


def cooled_router(**routing: Any) -> tuple[Router, Clock, list[Deployment]]:
    clock = Clock()
    router = Router(config({"m": [dep("x"), dep("y")]}, **routing), clock=clock)
    route = router.get("m")
    assert route is not None
    return router, clock, route.deployments


def test_cooldown_starts_after_n_failures_in_a_row() -> None:
    router, clock, (x, _) = cooled_router(cooldown_after_failures=3, cooldown_s=30)
    route = router.get("m")
    assert route is not None
    router.record_failure(x)
    router.record_failure(x)
    assert models_of(router.plan(route)) == ["x", "y"]  # two failures: still first
    router.record_failure(x)
    assert x.cooldown_until == clock.now + 30
    assert models_of(router.plan(route)) == ["y", "x"]  # cooling: last, not dropped
    clock.now += 29.9
    assert models_of(router.plan(route)) == ["y", "x"]
    clock.now += 0.1
    assert models_of(router.plan(route)) == ["x", "y"]  # the cooldown is over


def test_a_success_resets_the_failure_count() -> None:
    router, _, (x, _) = cooled_router(cooldown_after_failures=2)
    route = router.get("m")
    assert route is not None
    router.record_failure(x)
    router.record_success(x)
    router.record_failure(x)  # one in a row again, not two
    assert x.cooldown_until == 0.0 and x.failures == 1
    assert models_of(router.plan(route)) == ["x", "y"]


def test_the_count_starts_again_after_a_cooldown() -> None:
    router, clock, (x, _) = cooled_router(cooldown_after_failures=2, cooldown_s=10)
    router.record_failure(x)
    router.record_failure(x)
    first_until = x.cooldown_until
    assert x.failures == 0
    clock.now += 11
    router.record_failure(x)  # one failure after the cooldown does not start another
    assert x.cooldown_until == first_until
    router.record_failure(x)
    assert x.cooldown_until == clock.now + 10


def test_all_in_cooldown_keep_their_order() -> None:
    router, _, (x, y) = cooled_router(cooldown_after_failures=1, cooldown_s=5)
    route = router.get("m")
    assert route is not None
    router.record_failure(y)
    router.record_failure(x)
    assert models_of(router.plan(route)) == ["x", "y"]  # better a slim chance than none


# --- backoff ---------------------------------------------------------------------------


def backoff_router(value: float, **routing: Any) -> Router:
    return Router(config({"m": [dep("x")]}, **routing), rng=FixedRandom(value))


@pytest.mark.parametrize(
    ("retry", "low", "high"),
    [(1, 0.125, 0.25), (2, 0.25, 0.5), (3, 0.5, 1.0), (4, 1.0, 2.0)],
)
def test_backoff_doubles_with_full_jitter_between_half_and_whole(
    retry: int, low: float, high: float
) -> None:
    settings = {"backoff_s": 0.25, "max_backoff_s": 8}
    assert backoff_router(0.0, **settings).backoff_s(retry, None) == pytest.approx(low)
    assert backoff_router(0.999999, **settings).backoff_s(retry, None) == pytest.approx(high)


def test_backoff_is_capped_at_max_backoff() -> None:
    router = backoff_router(0.999999, backoff_s=1, max_backoff_s=3)
    assert router.backoff_s(2, None) == pytest.approx(2.0)
    assert router.backoff_s(3, None) == 3  # 4 s capped
    assert router.backoff_s(30, None) == 3


def test_backoff_with_a_real_rng_stays_in_its_band() -> None:
    router = Router(config({"m": [dep("x")]}, backoff_s=0.5), rng=random.Random(2))
    waits = [router.backoff_s(2, None) for _ in range(500)]
    assert all(0.5 <= w <= 1.0 for w in waits)  # type: ignore[operator]
    assert len(set(waits)) > 400  # jittered, not one fixed value


def test_retry_after_is_honoured_up_to_max_backoff() -> None:
    router = backoff_router(0.5, backoff_s=0.25, max_backoff_s=8)
    assert router.backoff_s(1, 0.0) == 0.0
    assert router.backoff_s(1, 2.5) == 2.5  # as told, without jitter
    assert router.backoff_s(5, 8.0) == 8.0  # exactly the cap still waits
    assert router.backoff_s(1, 8.01) is None  # longer: fall back instead of waiting
    assert router.backoff_s(1, math.inf) is None


# --- parse_retry_after -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        ("0", 0.0),
        ("0.4", 0.4),  # not RFC 9110's digits only, but some servers send fractions
        (" 3 ", 3.0),
        ("-5", 0.0),  # a negative wait is no wait
        ("86400", 86400.0),  # huge: parsed; backoff_s then falls back instead of waiting
        ("1e9", 1e9),
    ],
)
def test_parse_retry_after_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "soon",
        "0x10",
        "1,5",
        # the HTTP-date form: not parsed on purpose (LLM providers send seconds); the
        # router then uses its own backoff
        "Wed, 21 Oct 2015 07:28:00 GMT",
    ],
)
def test_parse_retry_after_gives_none_for_what_it_cannot_read(value: str | None) -> None:
    assert parse_retry_after(value) is None


def test_a_huge_retry_after_means_fall_back() -> None:
    router = backoff_router(0.5)
    assert router.backoff_s(1, parse_retry_after("99999999999999999999")) is None
    assert router.backoff_s(1, parse_retry_after("inf")) is None


def test_parse_retry_after_nan_is_junk() -> None:
    assert parse_retry_after("nan") is None
