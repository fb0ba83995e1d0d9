"""Run a server (the gateway or the pass-through) with a loop-lag and GC probe.

    python -m bench.probe gateway serve --config bench/config.bench.yaml ...
    python -m bench.probe bench.passthrough --port ... --upstream ...

Runs the module as __main__ after installing, in this process only:
  - a task on the server's event loop that sleeps TICK_S and records how late it wakes
    (the loop lag: how long a ready callback waits for the loop);
  - gc.callbacks timing every collection, per generation;
  - on SIGUSR1, the figures since the last SIGUSR1 as one JSON line appended to
    $PROBE_OUT (then reset), so bench/tail.py can bracket each wrk run.
Nothing in the gateway knows about it: uvicorn's Server.startup is wrapped to start the task.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import runpy
import signal
import sys
import threading
import time
from typing import Any

TICK_S = 0.001
BIG_LAG_S = 0.005  # lags above this are listed with their time


class Probe:
    def __init__(self) -> None:
        self.out = os.environ.get("PROBE_OUT", "/tmp/probe.jsonl")
        self.reset()
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)

    def reset(self) -> None:
        self.started = time.perf_counter()
        self.lags: list[float] = []
        self.big: list[tuple[float, float, float]] = []
        self.run_delay = 0.0  # seconds the loop's thread waited for a CPU
        self.gc: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self.gc_big: list[tuple[float, int, float]] = []
        self.http: list[float] = []  # head parsed -> response complete, per request
        self.gaps: list[float] = []  # response complete -> the connection's next head
        self.connections = 0  # first requests on a connection
        self.first_wait: list[float] = []  # connection made -> its first head
        self.first_http: list[float] = []  # in-server latency of first requests
        self.made_wall: list[float] = []  # time.time() of each connection_made
        # background work, (start, end) perf_counter per kind (see hook_gateway)
        self.events: dict[str, list[tuple[float, float]]] = {}
        self.turns: list[tuple[float, float]] = []  # (woke at, lag) of every tick

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
            return
        took = time.perf_counter() - self._gc_start
        self.event(f"gc{info['generation']}", self._gc_start, self._gc_start + took)
        self.gc[info["generation"]].append(took)
        if took > 0.001:
            self.gc_big.append((round(self._gc_start - self.started, 4), info["generation"], took))

    async def tick(self) -> None:
        # perf_counter, not loop.time(): uvloop's clock moves in whole milliseconds
        clock = time.perf_counter
        waited = run_delay()
        while True:
            due = clock() + TICK_S
            await asyncio.sleep(TICK_S)
            woke = clock()
            lag = woke - due
            self.lags.append(lag)
            self.turns.append((woke, lag))
            before, waited = waited, run_delay()
            self.run_delay += waited - before
            if lag > BIG_LAG_S:
                # how much of that lag the thread spent runnable but not running (other
                # processes on its core), from the kernel's schedstat
                self.big.append((round(woke - self.started - lag, 4), lag, waited - before))

    def event(self, kind: str, start: float, end: float) -> None:
        self.events.setdefault(kind, []).append((start, end))

    def correlate(self) -> dict[str, Any]:
        """Per kind of background work: how often, how long, and the share of the long loop
        turns (lag over twice the median) that overlap one, against the share of all turns."""
        if not self.turns:
            return {}
        median = sorted(lag for _, lag in self.turns)[len(self.turns) // 2]
        out: dict[str, Any] = {}
        for kind, spans in self.events.items():

            def hit(woke: float, lag: float, spans: list[tuple[float, float]] = spans) -> bool:
                return any(s < woke and e > woke - lag - TICK_S for s, e in spans)

            slow = [(w, lag) for w, lag in self.turns if lag > 2 * median]
            durations = sorted(e - s for s, e in spans)
            out[kind] = {
                "n": len(spans),
                "ms_p50": 1000 * durations[len(durations) // 2] if durations else 0,
                "ms_max": 1000 * durations[-1] if durations else 0,
                "slow_turns_hit": f"{sum(hit(w, lag) for w, lag in slow)}/{len(slow)}",
                "all_turns_hit": f"{sum(hit(w, lag) for w, lag in self.turns)}/{len(self.turns)}",
            }
        return out

    def dump(self) -> None:
        lags = sorted(self.lags)

        def pct(p: float) -> float:
            return 1000 * lags[min(len(lags) - 1, int(p * len(lags)))] if lags else 0.0

        http = sorted(self.http)

        def hpct(p: float) -> float:
            return 1000 * http[min(len(http) - 1, int(p * len(http)))] if http else 0.0

        gaps = sorted(self.gaps)

        def gpct(p: float) -> float:
            return 1000 * gaps[min(len(gaps) - 1, int(p * len(gaps)))] if gaps else 0.0

        record = {
            "events": self.correlate(),
            "gap_ms": {"p50": gpct(0.5), "p90": gpct(0.9), "p99": gpct(0.99), "max": gpct(1.0)},
            "new_connections": self.connections,
            "made_wall": self.made_wall,
            "first_wait_ms": [round(1000 * x, 1) for x in sorted(self.first_wait)[::8]],
            "first_http_ms": [round(1000 * x, 1) for x in sorted(self.first_http)[::8]],
            "http_ms": {
                "n": len(http),
                "p50": hpct(0.5),
                "p90": hpct(0.9),
                "p99": hpct(0.99),
                "max": hpct(1.0),
            },
            "seconds": time.perf_counter() - self.started,
            "ticks": len(lags),
            "lag_ms": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
            "lags_over_5ms": len(self.big),
            "lags_over_10ms": sum(1 for _, lag, _ in self.big if lag > 0.010),
            "lags_over_20ms": sum(1 for _, lag, _ in self.big if lag > 0.020),
            "lag_over_5ms_total_ms": 1000 * sum(lag for _, lag, _ in self.big),
            "run_delay_ms": 1000 * self.run_delay,
            "worst": [
                (t, round(1000 * lag, 1), round(1000 * waited, 1))
                for t, lag, waited in sorted(self.big, key=lambda b: -b[1])[:8]
            ],
            "gc": {
                gen: {"n": len(v), "total_ms": 1000 * sum(v), "max_ms": 1000 * max(v, default=0)}
                for gen, v in self.gc.items()
            },
            "gc_big": [(t, g, round(1000 * d, 2)) for t, g, d in self.gc_big[:200]],
            "threads": {t.native_id: t.name for t in threading.enumerate()},
        }
        with open(self.out, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.reset()


def run_delay() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (schedstat field 2)."""
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def install(probe: Probe) -> None:
    import uvicorn.server
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    begin, complete = HttpToolsProtocol.on_message_begin, HttpToolsProtocol.on_response_complete

    def on_message_begin(self: Any) -> None:
        self.probe_t0 = now = time.perf_counter()
        done = getattr(self, "probe_done", None)
        if done is not None:
            probe.gaps.append(now - done)
        else:
            probe.connections += 1
            made = getattr(self, "probe_made", None)
            if made is not None:
                probe.first_wait.append(now - made)
        begin(self)

    def on_response_complete(self: Any) -> None:
        first = getattr(self, "probe_done", None) is None
        self.probe_done = now = time.perf_counter()
        probe.http.append(now - self.probe_t0)
        if first:
            probe.first_http.append(now - self.probe_t0)
        complete(self)

    made = HttpToolsProtocol.connection_made

    def connection_made(self: Any, transport: Any) -> None:
        self.probe_made = time.perf_counter()
        probe.made_wall.append(time.time())
        made(self, transport)

    HttpToolsProtocol.connection_made = connection_made  # type: ignore[method-assign]
    HttpToolsProtocol.on_message_begin = on_message_begin  # type: ignore[method-assign]
    HttpToolsProtocol.on_response_complete = on_response_complete  # type: ignore[method-assign]

    startup = uvicorn.server.Server.startup

    async def startup_with_probe(self: Any, *args: Any, **kwargs: Any) -> None:
        loop = asyncio.get_running_loop()
        probe.task = loop.create_task(probe.tick())  # type: ignore[attr-defined]
        loop.add_signal_handler(signal.SIGUSR1, probe.dump)
        await startup(self, *args, **kwargs)

    uvicorn.server.Server.startup = startup_with_probe  # type: ignore[method-assign]
    hook_gateway(probe)


def timed(probe: Probe, kind: str, owner: Any, name: str) -> None:
    """Record each call of owner.name (sync or async) as an event of `kind`."""
    original = getattr(owner, name)
    if asyncio.iscoroutinefunction(original):

        async def wrapper_async(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                probe.event(kind, start, time.perf_counter())

        setattr(owner, name, wrapper_async)
        return

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            probe.event(kind, start, time.perf_counter())

    setattr(owner, name, wrapper)


def hook_gateway(probe: Probe) -> None:
    """The gateway's background work, when this process is the gateway."""
    try:
        from gateway.telemetry.access_log import AccessLog
        from gateway.telemetry.fast.span_export import EncodedSpanProcessor
        from policies.stores.ledger_memory import MemoryLedger
    except ImportError:
        return
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    timed(probe, "span_export_send", EncodedSpanProcessor, "_send")
    timed(probe, "store_flush", MemoryLedger, "flush")
    timed(probe, "access_log_flush", AccessLog, "flush")
    timed(probe, "metrics_collect", PeriodicExportingMetricReader, "_receive_metrics")


def main() -> None:
    module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    install(Probe())
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
