"""The command line: `tallygate serve | check-config | spend` (also `python -m gateway`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from gateway.config import Config, ConfigError, config_path, load_config

log = logging.getLogger("tallygate")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tallygate", description="OpenAI-compatible LLM gateway")
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
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("tallygate").setLevel(logging.INFO)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(describe(config, str(config_path(args.config))))
        return 0
    if args.command == "spend":
        return asyncio.run(print_spend(config, args.team, args.json))
    return run_server(config, args)


def describe(config: Config, path: str) -> str:
    lines = [f"{path}: OK"]
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


async def print_spend(config: Config, team: str | None, as_json: bool) -> int:
    from gateway.spend import spend_report
    from policies.store import StoreError, open_store

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
    ]
    table = [cols] + [[str(r[c]) if r[c] is not None else "-" for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def run_server(config: Config, args: argparse.Namespace) -> int:
    import uvicorn

    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    workers = args.workers or config.server.workers
    options = dict(
        host=host,
        port=port,
        loop=event_loop(),
        http="httptools",
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
    from gateway.telemetry import describe_export

    exporter = describe_export(config.telemetry, os.environ)
    print(
        f"tallygate listening on http://{host}:{port} (workers: {workers}; store: {store}; telemetry: {exporter})",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn drains on SIGTERM, restores this handler, then re-raises the signal: a drained
    # shutdown then exits 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if workers == 1:
        from gateway.app import create_app

        uvicorn.run(create_app(config, serving=True), **options)  # type: ignore[arg-type]
        return 0
    # Several processes: each worker re-reads the config file named in the environment.
    from gateway.telemetry import prepare_multiprocess

    os.environ["TALLYGATE_CONFIG"] = str(config_path(args.config).resolve())
    os.environ["TALLYGATE_WORKERS"] = str(workers)
    os.environ.update(prepare_multiprocess(workers))
    uvicorn.run("gateway.asgi:app_from_env", factory=True, workers=workers, **options)  # type: ignore[arg-type]
    return 0


def event_loop() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def redact_url(url: str) -> str:
    """Hide a password in redis://user:pass@host."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url
