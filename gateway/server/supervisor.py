"""The supervisor of `tallygate serve` with several workers: uvicorn's, but SIGHUP reloads.

uvicorn's multiprocess supervisor answers SIGHUP by replacing every worker, which ends
each worker's streams after the drain timeout and drops its in-process state. Ours
forwards SIGHUP to every worker instead: each re-reads the config in place
(gateway/server/reload.py), keeping its connections and the requests it is serving.

A worker still starting has no SIGHUP handler yet (the signal would end it): it gets the
signal once it has started. A worker started later (after a crash) reads the file as it
is then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from socket import socket

from uvicorn.config import Config
from uvicorn.supervisors.multiprocess import Multiprocess

log = logging.getLogger("tallygate")


class ReloadingSupervisor(Multiprocess):
    def __init__(self, config: Config, sockets: list[socket]) -> None:
        super().__init__(config, sockets)
        self.reload_pending: set[int] = set()  # pids of workers still to signal

    def handle_hup(self) -> None:
        log.info("SIGHUP: every worker reloads the config")
        self.reload_pending = {p.pid for p in self.processes if p.pid is not None}
        self.deliver_reloads()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        if self.reload_pending:  # workers that were starting at the last SIGHUP
            self.deliver_reloads()

    def deliver_reloads(self) -> None:
        timeout = self.config.timeout_worker_healthcheck
        for process in self.processes:
            pid = process.pid
            if pid in self.reload_pending and process.is_ready(timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)
                self.reload_pending.discard(pid)
        # a worker replaced meanwhile read the file when it started
        self.reload_pending &= {p.pid for p in self.processes if p.pid is not None}
