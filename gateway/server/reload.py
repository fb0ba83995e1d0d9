"""Hot reload: `SIGHUP` or `POST /admin/reload` re-reads the config file.

A valid config becomes a new Gateway snapshot (gateway/state.py) swapped in with one
assignment; requests already running keep the snapshot they started on (gateway/app.py
hands each request the snapshot current at its start). An invalid file is refused, naming
the bad key, and the old config keeps serving. Store, telemetry and server settings are
built once per process: a change to them is reported as needing a restart, and the running
values are kept. Providers that changed or went away are closed once the requests of the
snapshots that used them have ended.

Under `tallygate serve` with several workers, SIGHUP to the supervisor reaches every worker
(gateway/server/supervisor.py); `POST /admin/reload` reaches one worker, which reloads, then sends
SIGHUP to the supervisor so that every other worker does too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import Config, ConfigError, load_config
from gateway.providers.base import Provider
from gateway.state import RESTART_SECTIONS, Gateway

log = logging.getLogger("tallygate")

# Set by `tallygate serve` for its workers: the supervisor's pid, which forwards SIGHUP.
SUPERVISOR_ENV = "TALLYGATE_SUPERVISOR_PID"
DRAIN_POLL_S = 0.5  # how often replaced snapshots are checked for requests still running


class CannotReload(Exception):
    """No reload now: `code` says why."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message, self.code = message, code


@dataclass(frozen=True, slots=True)
class Reloaded:
    changed: bool  # False: the file held the config already serving
    generation: int
    restart_needed: list[str]  # key paths, e.g. "server.port"


def changed_keys(prefix: str, old: Any, new: Any) -> list[str]:
    """The dotted key paths under which two model_dump() trees differ (a list is one value)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(old.keys() | new.keys(), key=str):
            out += changed_keys(f"{prefix}.{key}", old.get(key), new.get(key))
        return out
    return [] if old == new else [prefix]


def restart_needed(started: Config, loaded: Config) -> list[str]:
    """Keys of RESTART_SECTIONS whose value in the file differs from the one read at start."""
    out: list[str] = []
    for section in RESTART_SECTIONS:
        before, after = getattr(started, section), getattr(loaded, section)
        if before != after:
            out += changed_keys(section, before.model_dump(), after.model_dump())
    return out


def bad_key(exc: ConfigError) -> str | None:
    """The first key path a ConfigError names ("<file>: invalid config:\\n  teams.x.keys: ...")."""
    lines = str(exc).splitlines()
    if len(lines) < 2 or not lines[0].endswith("invalid config:"):
        return None
    return lines[1].strip().split(": ", 1)[0] or None


class Reloader:
    """Re-reads `source` into a new snapshot of `state.gateway` (Starlette's app.state)."""

    def __init__(self, state: Any, source: Path | None, started_from: Config) -> None:
        self.state = state
        self.source = source
        self.started_from = started_from  # the file as read at start: what restart_needed compares
        self._lock = asyncio.Lock()  # one reload at a time (SIGHUP and POST may coincide)
        self._replaced: list[Gateway] = []  # snapshots that may still have requests running
        self._retired: list[Provider] = []  # providers of those snapshots, closed once unused
        self._drainer: asyncio.Task[None] | None = None
        self._announced: set[int] = set()  # ids of retired providers said to be in use
        self._closed = False

    @classmethod
    async def for_app(cls, state: Any, source: Path | None) -> Reloader:
        """The start's file as a baseline: the running config may differ from it by the
        command line (--workers), which is no change to report."""
        running: Config = state.gateway.config
        started = running
        if source is not None:
            with contextlib.suppress(ConfigError):
                started = await asyncio.to_thread(load_config, source)
        return cls(state, source, started)

    async def reload(self, trigger: str) -> Reloaded:
        """Apply the file's config; ConfigError (logged) when it is invalid: nothing changes."""
        if self.source is None:
            raise CannotReload(
                "This gateway was not started from a config file: there is nothing to reload.",
                "no_config_file",
            )
        async with self._lock:
            if self._closed:
                raise CannotReload("The gateway is shutting down.", "shutting_down")
            try:
                loaded = await asyncio.to_thread(load_config, self.source)
            except ConfigError as exc:
                log.error(
                    "config reload (%s) refused, the old config keeps serving [pid %d]: %s",
                    trigger,
                    os.getpid(),
                    exc,
                )
                raise
            current: Gateway = self.state.gateway
            kept = {section: getattr(current.config, section) for section in RESTART_SECTIONS}
            config = loaded.model_copy(update=kept)
            changed = config != current.config
            if changed:
                snapshot, retired = await current.reconfigured(config)
                self.state.gateway = snapshot  # the switch: requests from now on start on it
                self._retire(current, retired)
                current = snapshot
            log.info(
                "config %s from %s (%s): generation %d [pid %d]",
                "reloaded" if changed else "re-read, no change,",
                self.source,
                trigger,
                current.generation,
                os.getpid(),
            )
            restart = restart_needed(self.started_from, loaded)
            if restart:
                log.warning(
                    "config reload: %s changed; the running values are kept until a restart",
                    ", ".join(restart),
                )
            return Reloaded(changed, current.generation, restart)

    async def reload_logged(self, trigger: str) -> None:
        """reload() for a signal: the outcome is only logged."""
        with contextlib.suppress(ConfigError, CannotReload):
            await self.reload(trigger)

    def on_sighup(self) -> None:
        self.state.gateway.tasks.spawn(self.reload_logged("SIGHUP"))

    def tell_other_workers(self) -> None:
        """Under a `tallygate serve` supervisor: SIGHUP to it, which forwards it to every
        worker (this one too: a re-read that finds the config unchanged)."""
        pid = os.environ.get(SUPERVISOR_ENV, "")
        if pid.isdigit() and int(pid) == os.getppid():
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGHUP)

    # closing what the old snapshots used, once they are done

    def _retire(self, snapshot: Gateway, providers: list[Provider]) -> None:
        # kept while it has requests running: a later reload may retire a provider it uses
        self._replaced = [gw for gw in self._replaced if gw.in_flight] + [snapshot]
        self._retired += providers
        if self._retired and (self._drainer is None or self._drainer.done()):
            self._drainer = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._retired:
            await asyncio.sleep(DRAIN_POLL_S)
            # a replaced snapshot gets no new requests: its count only goes down
            self._replaced = [gw for gw in self._replaced if gw.in_flight]
            in_use = {id(p) for gw in self._replaced for p in gw.providers.values()}
            self._say_waiting([p for p in self._retired if id(p) in in_use])
            unused = [p for p in self._retired if id(p) not in in_use]
            if not unused:
                continue
            self._retired = [p for p in self._retired if id(p) in in_use]
            # A stream's settlement task may still be closing its upstream response.
            current: Gateway = self.state.gateway
            await current.tasks.drain(current.config.server.drain_timeout_s)
            for provider in unused:
                await close_provider(provider)
            self._announced -= {id(p) for p in unused}
            names = ", ".join(sorted(p.name for p in unused))
            log.info("closed the provider(s) a reload replaced, now unused: %s", names)

    def _say_waiting(self, providers: list[Provider]) -> None:
        """Logged once per provider: why a replaced one is still open."""
        new = [p for p in providers if id(p) not in self._announced]
        if new:
            self._announced |= {id(p) for p in new}
            log.info(
                "provider(s) %s replaced by a reload: closed once the %d request(s) "
                "still using them end",
                ", ".join(sorted(p.name for p in new)),
                sum(gw.in_flight for gw in self._replaced),
            )

    async def close(self) -> None:
        """At shutdown: the current snapshot (after a reload in progress), then the
        providers replaced snapshots left open. No reload after this."""
        async with self._lock:
            self._closed = True
        await self.state.gateway.close()
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        for provider in self._retired:
            await close_provider(provider)
        self._retired, self._replaced = [], []


async def close_provider(provider: Provider) -> None:
    try:
        await provider.aclose()
    except Exception:  # one provider failing to close does not keep the others open
        log.exception("closing provider '%s' failed", provider.name)
