"""The Gateway: everything a request needs, built once in the lifespan and closed on shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import socket
from dataclasses import dataclass, field
from typing import Any, TextIO

from gateway import __version__
from gateway.config import Config, ProviderConfig
from gateway.pipeline.alerts import Alerts
from gateway.pipeline.auth import KeyIndex
from gateway.pipeline.routing import Router
from gateway.providers.base import Provider
from gateway.providers.http import AiohttpUpstream, HttpxUpstream
from gateway.providers.registry import build_provider
from gateway.tasks import TaskSet
from gateway.telemetry.facade import Telemetry
from policies.redaction import Redactor
from policies.stores import open_store
from policies.stores.base import Store
from pricing.table import PriceTable, host_tag
from pricing.tokens import TokenCounter

log = logging.getLogger("tallygate")

# Built once per process (listening socket, store connection, exporters): a reload keeps
# their running values and reports a change to them as needing a restart.
RESTART_SECTIONS = ("server", "store", "telemetry")


def warm_encodings(counter: TokenCounter, models: set[str]) -> None:
    for model in sorted(models):
        counter.count_text(model, "warm up")


def known_models(config: Config) -> set[str]:
    """Every routed alias and upstream model name: telemetry keeps these as they are."""
    return set(config.models) | {d.model for ds in config.models.values() for d in ds}


def upstream_models(config: Config) -> set[str]:
    return {d.model for deps in config.models.values() for d in deps}


def price_hosts(config: Config) -> dict[str, str | None]:
    return {name: host_tag(p.base_url, p.kind) for name, p in config.providers.items()}


def warn_unpriced(config: Config, prices: PriceTable, hosts: dict[str, str | None]) -> None:
    for alias, deps in config.models.items():
        for dep in deps:
            if prices.lookup(dep.model, hosts[dep.provider]) is None:
                log.warning(
                    "no price for model '%s' (models.%s): requests to it are %s",
                    dep.model,
                    alias,
                    "refused" if config.pricing.on_unknown_price == "reject" else "not charged",
                )


def router_inputs(config: Config) -> tuple[object, ...]:
    """What a Router is built from: equal inputs keep the old Router and its health state."""
    timeouts = {name: p.timeout_s for name, p in config.providers.items()}
    return (config.models, config.routing, timeouts)


@dataclass
class TelemetryHooks:
    """Test seams: in-memory exporters and a captured access log instead of the configured ones."""

    span_exporter: Any = None
    metric_reader: Any = None
    access_log: TextIO | None = None


@dataclass
class Gateway:
    """One snapshot of the gateway. A reload (gateway/server/reload.py) builds a new snapshot whose
    config-derived parts (config, keys, router, providers, prices, redactor) are new and whose
    process-wide parts (store, telemetry, alerts, tasks, counter) are shared, then swaps it in:
    a request keeps the snapshot it started on to its end."""

    config: Config
    keys: KeyIndex
    router: Router
    providers: dict[str, Provider]
    counter: TokenCounter
    prices: PriceTable
    store: Store
    redactor: Redactor
    telemetry: Telemetry
    alerts: Alerts
    tasks: TaskSet = field(default_factory=TaskSet)
    # provider name → the price table's name for its host (groq, together...): one model id
    # served by several hosts has a price per host
    price_hosts: dict[str, str | None] = field(default_factory=dict)
    ready: bool = False
    started_at: float = 0.0
    outage_logged_at: float = float("-inf")  # store outages: when one was last logged
    outages_unlogged: int = 0
    warming: asyncio.Task[None] | None = None  # tokenizers loading; /readyz waits for it
    # Request ids need uniqueness, not secrecy: os.urandom per request costs ~0.1 ms here.
    ids: random.Random = field(default_factory=lambda: random.Random(os.urandom(16)))
    generation: int = 0  # config reloads applied before this snapshot
    in_flight: int = 0  # requests started on this snapshot and not yet ended (gateway/app.py)

    def new_request_id(self) -> str:
        return f"req_{self.ids.getrandbits(128):032x}"

    @property
    def max_body_bytes(self) -> int:
        return int(self.config.server.max_body_mb * 1024 * 1024)

    @classmethod
    async def start(cls, config: Config, hooks: TelemetryHooks | None = None) -> Gateway:
        hooks = hooks or TelemetryHooks()
        counter = TokenCounter()
        prices = PriceTable.load(config.pricing.overrides)
        redactor = Redactor(config.redaction)
        telemetry = Telemetry.create(
            config.telemetry,
            service_version=__version__,
            instance_id=f"{socket.gethostname()}:{os.getpid()}",
            redact=redactor.redact_value,
            span_exporter=hooks.span_exporter,
            metric_reader=hooks.metric_reader,
            access_log=hooks.access_log,
            workers=config.server.workers,
            known_models=known_models(config),
        )
        providers = {
            name: new_provider(name, prov, counter, telemetry)
            for name, prov in config.providers.items()
        }
        store = open_store(config.store, processes=config.server.workers)
        await store.start()
        hosts = price_hosts(config)
        warn_unpriced(config, prices, hosts)
        gw = cls(
            config,
            KeyIndex(config),
            Router(config),
            providers,
            counter,
            prices,
            store,
            redactor,
            telemetry,
            Alerts(store, telemetry),
            price_hosts=hosts,
        )
        gw.alerts.start()
        # Load the tokenizers now, off the loop, rather than inside the first request.
        gw.warming = gw.tasks.spawn(
            asyncio.to_thread(warm_encodings, counter, upstream_models(config))
        )
        gw.ready = True
        return gw

    async def reconfigured(self, config: Config) -> tuple[Gateway, list[Provider]]:
        """A snapshot for `config` (its RESTART_SECTIONS already set to the running values),
        sharing this one's store, telemetry, alerts, tasks and token counter; and the providers
        of this snapshot the new one does not use, to close once no request needs them.
        An unchanged provider is kept with its connection pool; so are unchanged prices,
        redaction rules and routes (with their deployments' health)."""
        old = self.config
        prices, redactor, router = self.prices, self.redactor, self.router
        if config.pricing != old.pricing:  # reads the price table file: off the loop
            prices = await asyncio.to_thread(PriceTable.load, config.pricing.overrides)
        if config.redaction != old.redaction:
            redactor = await asyncio.to_thread(Redactor, config.redaction)
        if router_inputs(config) != router_inputs(old):
            router = Router(config)
        keys = await asyncio.to_thread(KeyIndex, config)  # hashes every plain key
        providers = {
            name: self.providers[name]
            if old.providers.get(name) == prov
            else new_provider(name, prov, self.counter, self.telemetry)
            for name, prov in config.providers.items()
        }
        retired = [p for name, p in self.providers.items() if providers.get(name) is not p]
        hosts = price_hosts(config)
        warn_unpriced(config, prices, hosts)
        # Telemetry's own view of the config: redaction of what it exports, the model names it
        # keeps as they are
        self.telemetry.reconfigure(redact=redactor.redact_value, known_models=known_models(config))
        new_models = upstream_models(config) - upstream_models(old)
        if new_models:
            self.tasks.spawn(asyncio.to_thread(warm_encodings, self.counter, new_models))
        snapshot = dataclasses.replace(
            self,
            config=config,
            keys=keys,
            router=router,
            providers=providers,
            prices=prices,
            redactor=redactor,
            price_hosts=hosts,
            generation=self.generation + 1,
            in_flight=0,
        )
        return snapshot, retired

    async def close(self) -> None:
        self.ready = False
        await self.tasks.drain(self.config.server.drain_timeout_s)
        await self.alerts.close(self.config.server.drain_timeout_s)  # settled: alerts queued
        for provider in self.providers.values():
            await provider.aclose()
        await self.store.close()
        await self.telemetry.shutdown()


def new_provider(
    name: str, config: ProviderConfig, counter: TokenCounter, telemetry: Telemetry
) -> Provider:
    """HTTP providers send through plain aiohttp, unless `telemetry.http_spans` asks for the
    OpenTelemetry httpx instrumentation's spans: then through httpx, whose client (the
    provider's `client`) is instrumented."""
    upstream = HttpxUpstream if telemetry.config.http_spans else AiohttpUpstream
    provider = build_provider(name, config, counter=counter, upstream=upstream)
    client = getattr(provider, "client", None)
    if client is not None:
        telemetry.instrument_client(client)
    return provider
