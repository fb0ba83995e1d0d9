"""The command line: `tallygate serve | check-config | spend | prices` (also `python -m gateway`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from gateway import __version__
from gateway.config import Config, ConfigError, config_path, load_config
from pricing.table import Listing, PriceTable, Resolution, host_tag

log = logging.getLogger("tallygate")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tallygate", description="OpenAI-compatible LLM gateway")
    parser.add_argument("--version", action="version", version=f"tallygate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "--config", help="config file (default $TALLYGATE_CONFIG, else ./config.yaml)"
    )
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    check = sub.add_parser("check-config", help="validate the config; print routes, teams, budgets")
    check.add_argument("--config")
    spend = sub.add_parser("spend", help="spend, reserved and remaining budget per team and key")
    spend.add_argument("--config")
    spend.add_argument("--team")
    spend.add_argument("--json", action="store_true", help="print JSON instead of a table")
    prices = sub.add_parser("prices", help="what the gateway charges for a model or each route")
    prices.add_argument("model", nargs="?", help="a model name or a routed alias (models.<alias>)")
    prices.add_argument("--config")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format=LOG_FORMAT,
    )
    logging.getLogger("tallygate").setLevel(logging.INFO)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        code = check_prices(config)
        print(describe(config, str(config_path(args.config)), ok=code == 0))
        return code
    if args.command == "spend":
        return asyncio.run(print_spend(config, args.team, args.json))
    if args.command == "prices":
        return print_prices(config, args.model)
    return run_server(config, args)


def check_prices(config: Config) -> int:
    """Every routed deployment needs a price under on_unknown_price: reject (else each
    request to it is refused): 1 and an error per unpriced one; under allow, a warning."""
    table = PriceTable.load(config.pricing.overrides)
    reject = config.pricing.on_unknown_price == "reject"
    unpriced = [
        (alias, dep)
        for alias, deps in config.models.items()
        for dep in deps
        if table.lookup(dep.model, price_host(config, dep.provider)) is None
    ]
    for alias, dep in unpriced:
        print(
            f"{'error' if reject else 'warning'}: models.{alias}: no price for '{dep.model}' "
            f"({dep.label}): requests to it are {'refused' if reject else 'not charged'} "
            "(add it under pricing.overrides; `tallygate prices` shows how names resolve)",
            file=sys.stderr,
        )
    return 1 if reject and unpriced else 0


def describe(config: Config, path: str, ok: bool = True) -> str:
    lines = [f"{path}: {'OK' if ok else 'not usable as it is (errors above)'}"]
    lines.append(
        f"providers: {', '.join(f'{n} ({p.kind})' for n, p in config.providers.items()) or 'none'}"
    )
    lines.append("models:")
    for alias, deps in config.models.items():
        chain = " → ".join(
            d.label + (f" (weight {d.weight:g})" if d.weight is not None else "") for d in deps
        )
        lines.append(f"  {alias}: {chain}")
    lines.append("teams:")
    for name, team in config.teams.items():
        budget = f"${team.budget.limit_usd} {team.budget.period}" if team.budget else "no budget"
        key_budget = (
            f", each key ${team.key_budget.limit_usd} {team.key_budget.period}"
            if team.key_budget
            else ""
        )
        rl = team.rate_limit
        rate = f", {rl.rpm or '∞'} rpm / {rl.tpm or '∞'} tpm" if rl else ""
        models = ", ".join(team.models) if team.models is not None else "all models"
        admin = " [admin]" if team.admin else ""
        lines.append(
            f"  {name}{admin}: {len(team.keys)} key(s), {budget}{key_budget}{rate}; {models}"
        )
    lines.append(f"store: {config.store.backend}")
    return "\n".join(lines)


FORECAST_NOTES = {"outlasts_period": "after period end", "no_spend": "no spend yet"}


async def print_spend(config: Config, team: str | None, as_json: bool) -> int:
    from gateway.pipeline.spend import spend_report
    from policies.stores import open_store
    from policies.stores.base import StoreError

    if team is not None and team not in config.teams:
        print(f"error: unknown team '{team}'", file=sys.stderr)
        return 2
    store = open_store(config.store)
    try:
        await store.start()
        rows = await spend_report(config, store, team)
    except StoreError as exc:
        print(f"error: store unavailable: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = [
        "team",
        "key",
        "period_key",
        "spent_usd",
        "reserved_usd",
        "limit_usd",
        "remaining_usd",
        "period_end",
        "burn_usd_per_hour",
        "exhausted_at",
    ]
    for r in rows:  # say why there is no date: it would run out after the period, or no spend
        if r["exhausted_at"] is None and r["forecast"] in FORECAST_NOTES:
            r["exhausted_at"] = FORECAST_NOTES[r["forecast"]]
    table = [cols] + [[str(r[c]) if r[c] is not None else "-" for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def print_prices(config: Config, model: str | None) -> int:
    """With a model (or a routed alias): how each is priced, exit 1 if any is not.
    Without: one line per routed deployment."""
    table = PriceTable.load(config.pricing.overrides)
    if model is None:
        print_price_routes(config, table)
        return 0
    if model in config.models:
        found = []
        for dep in config.models[model]:
            host = price_host(config, dep.provider)
            print(f"{model} → {dep.label} (host: {host or 'none'})")
            found.append(table.resolve(dep.model, host))
            print(describe_price(dep.model, found[-1], config))
    else:
        found = [table.resolve(model)]
        print(describe_price(model, found[0], config))
    print(f"price table {table.version}")
    return 0 if all(r.price is not None for r in found) else 1


def price_host(config: Config, provider: str) -> str | None:
    """The price table's name for the host behind a provider, as the gateway tags it."""
    prov = config.providers[provider]
    return host_tag(prov.base_url, prov.kind)


def describe_price(model: str, found: Resolution, config: Config) -> str:
    price = found.price
    if price is None:
        why = {
            "ambiguous": "rows for "
            + ", ".join(sorted({r.provider for r in found.claimants}))
            + " claim it; route it through a provider whose base_url names the host",
            "unknown": "no row or override matches it",
        }[found.via]
        fate = "refused" if config.pricing.on_unknown_price == "reject" else "not charged"
        return (
            f"  {model}: no price ({found.via}): {why}\n"
            f"  requests to it are {fate} (pricing.on_unknown_price: "
            f"{config.pricing.on_unknown_price})"
        )
    row = found.listing
    lines = [
        ("model", model),
        ("priced as", f"{price.model}{provider_note(row)} via {step_name(found)}"),
        ("input", per_mtok(price.input_per_mtok)),
        ("output", per_mtok(price.output_per_mtok)),
        ("cached input", per_mtok(price.cached_input_per_mtok)),
        ("cache write", per_mtok(price.cache_write_per_mtok)),
        ("max output", tokens(price.max_output_tokens)),
        ("context", tokens(price.context_window)),
        ("source", row.source if row else "config: pricing.overrides"),
        ("checked", row.checked.isoformat() if row else "-"),
    ]
    return "\n".join(f"  {label:<14}{value}" for label, value in lines)


def print_price_routes(config: Config, table: PriceTable) -> None:
    cols = ["alias", "deployment", "host", "priced_as", "row", "via", "input", "output"]
    cols += ["cached", "cache_write", "max_output", "context", "checked"]
    rows, unpriced = [cols], 0
    for alias, deps in config.models.items():
        for dep in deps:
            host = price_host(config, dep.provider)
            found = table.resolve(dep.model, host)
            price, row = found.price, found.listing
            if price is None:
                unpriced += 1
                rows.append([alias, dep.label, host or "-", "NO PRICE", "-", found.via] + ["-"] * 7)
                continue
            rows.append(
                [alias, dep.label, host or "-", price.model, row.provider if row else "override"]
                + [found.via]
                + [money(p) for p in (price.input_per_mtok, price.output_per_mtok)]
                + [money(p) for p in (price.cached_input_per_mtok, price.cache_write_per_mtok)]
                + [count(price.max_output_tokens), count(price.context_window)]
                + [row.checked.isoformat() if row else "-"]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    for r in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    print(f"USD per million tokens; price table {table.version}")
    if unpriced:
        fate = "refused" if config.pricing.on_unknown_price == "reject" else "not charged"
        print(f"{unpriced} deployment(s) have no price: requests to them are {fate}")


def step_name(found: Resolution) -> str:
    return {
        "exact": "exact name",
        "case": "name, case ignored",
        "prefix": "name without its provider prefix",
        "family": "family (snapshots shared)",
        "override": "override (pricing.overrides)",
    }[found.via]


def provider_note(row: Listing | None) -> str:
    return f" [{row.provider}]" if row and row.provider else ""


def per_mtok(value: object) -> str:
    return "-" if value is None else f"${value} / Mtok"


def money(value: object) -> str:
    return "-" if value is None else str(value)


def tokens(value: int | None) -> str:
    return "-" if value is None else f"{value} tokens"


def count(value: int | None) -> str:
    return "-" if value is None else str(value)


def run_server(config: Config, args: argparse.Namespace) -> int:
    import uvicorn

    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    workers = args.workers or config.server.workers
    from gateway.server.limits import LimitedHttpToolsProtocol, http_limits

    limits, backlog = http_limits(config)
    options = dict(
        host=host,
        port=port,
        loop=event_loop(),
        http=LimitedHttpToolsProtocol.factory(limits),  # pickled to each worker with its limits
        backlog=backlog,
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=config.server.drain_timeout_s,
    )
    store = config.store.backend + (
        f" {config.store.path}"
        if config.store.backend == "local"
        else f" {redact_url(config.store.redis_url)}"
    )
    from gateway.telemetry.facade import describe_export

    exporter = describe_export(config.telemetry, os.environ)
    print(
        f"tallygate listening on http://{host}:{port} (workers: {workers}; store: {store}; telemetry: {exporter})",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn drains on SIGTERM, restores this handler, then re-raises the signal: a drained
    # shutdown then exits 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    source = config_path(args.config).resolve()
    if workers == 1:
        from gateway.app import create_app

        app = create_app(config, serving=True, source=source)
        # SIGHUP reloads the config once the app has started; while it starts, ignored
        # (its default would end the process)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        uvicorn.run(app, **options)  # type: ignore[arg-type]
        return 0
    # Several processes: each worker re-reads the config file named in the environment.
    from gateway.server.reload import SUPERVISOR_ENV
    from gateway.server.supervisor import ReloadingSupervisor
    from gateway.telemetry.facade import prepare_multiprocess

    os.environ["TALLYGATE_CONFIG"] = str(source)
    os.environ["TALLYGATE_WORKERS"] = str(workers)
    os.environ[SUPERVISOR_ENV] = str(os.getpid())  # a worker's POST /admin/reload tells us
    os.environ.update(prepare_multiprocess(workers))
    server = uvicorn.Config(
        "gateway.asgi:app_from_env",
        factory=True,
        workers=workers,
        log_config=worker_logging(),
        **options,  # type: ignore[arg-type]
    )
    # uvicorn.run with workers, but SIGHUP reloads each worker's config instead of
    # replacing the workers (gateway/server/supervisor.py).
    with contextlib.suppress(KeyboardInterrupt):
        ReloadingSupervisor(server, sockets=[server.bind_socket()]).run()
    return 0


def worker_logging() -> dict[str, Any]:
    """uvicorn's logging config, plus the gateway's logger as main() sets it up: each worker
    process applies it (a spawned worker does not inherit main()'s logging setup)."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["tallygate"] = {"format": LOG_FORMAT}
    config["handlers"]["tallygate"] = {
        "formatter": "tallygate",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    config["loggers"]["tallygate"] = {
        "handlers": ["tallygate"],
        "level": "INFO",
        "propagate": False,
    }
    return config


def event_loop() -> str:
    """uvloop with a listening socket that accepts a batch per loop turn (gateway/server/listener.py)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"  # asyncio's loop accepts a batch per turn already
    return "gateway.server.listener:new_event_loop"


def redact_url(url: str) -> str:
    """Hide a password in redis://user:pass@host."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
