"""The Gateway: everything a request needs, built once in the lifespan and closed on shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from dataclasses import dataclass, field
from typing import Any, TextIO

from gateway import __version__
from gateway.alerts import Alerts
from gateway.auth import KeyIndex
from gateway.config import Config
from gateway.providers.base import Provider
from gateway.providers.registry import build_provider
from gateway.routing import Router
from gateway.tasks import TaskSet
from gateway.telemetry import Telemetry
from policies.redaction import Redactor
from policies.store import Store, open_store
from pricing.table import PriceTable, host_tag
from pricing.tokens import TokenCounter

log = logging.getLogger("tallygate")


def warm_encodings(counter: TokenCounter, models: set[str]) -> None:
    for model in sorted(models):
        counter.count_text(model, "warm up")


@dataclass
class TelemetryHooks:
    """Test seams: in-memory exporters and a captured access log instead of the configured ones."""

    span_exporter: Any = None
    metric_reader: Any = None
    access_log: TextIO | None = None


@dataclass
class Gateway:
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
            known_models=set(config.models)
            | {d.model for ds in config.models.values() for d in ds},
        )
        providers: dict[str, Provider] = {}
        for name, prov in config.providers.items():
            provider = build_provider(name, prov, counter=counter)
            client = getattr(provider, "client", None)
            if client is not None:
                telemetry.instrument_client(client)
            providers[name] = provider
        store = open_store(config.store, processes=config.server.workers)
        await store.start()
        hosts = {name: host_tag(p.base_url, p.kind) for name, p in config.providers.items()}
        for alias, deps in config.models.items():
            for dep in deps:
                if prices.lookup(dep.model, hosts[dep.provider]) is None:
                    log.warning(
                        "no price for model '%s' (models.%s): requests to it are %s",
                        dep.model,
                        alias,
                        "refused" if config.pricing.on_unknown_price == "reject" else "not charged",
                    )
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
        models = {d.model for deps in config.models.values() for d in deps}
        gw.warming = gw.tasks.spawn(asyncio.to_thread(warm_encodings, counter, models))
        gw.ready = True
        return gw

    async def close(self) -> None:
        self.ready = False
        await self.tasks.drain(self.config.server.drain_timeout_s)
        await self.alerts.close(self.config.server.drain_timeout_s)  # settled: alerts queued
        for provider in self.providers.values():
            await provider.aclose()
        await self.store.close()
        await self.telemetry.shutdown()
