"""Hot reload on real processes: `python -m gateway serve`, SIGHUP and POST /admin/reload."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.fake_upstream import FakeUpstream, chat_stream, usage_json
from tests.gateway_harness import KEYS, base_config, running_gateway, serve_command
from tests.servers import ProcessServer, free_port, run_process_server, wait_until

ADMIN = "sk-admin-reload"
ASK = {"model": "demo", "messages": [{"role": "user", "content": "hello"}]}
RELOADED = re.compile(r"config reloaded from \S+ \((?:SIGHUP|POST /admin/reload)\): "
                      r"generation (\d+) \[pid (\d+)\]")  # fmt: skip


def config(tmp_path: Path, teams: dict[str, str], text: str = "old reply", **extra: Any) -> dict:
    """The mock provider answering `text`; one team per name → key; an admin team."""
    cfg: dict[str, Any] = {
        "providers": {"m": {"kind": "mock", "text": text}},
        "models": {"demo": [{"provider": "m", "model": "gpt-4o-mini"}]},
        "teams": {
            **{
                name: {"keys": [{"name": f"{name}-key", "key": key}]} for name, key in teams.items()
            },
            "ops": {"keys": [{"name": "ops", "key": ADMIN}], "admin": True},
        },
        "store": {"backend": "local", "path": str(tmp_path / "spend.db")},
        "telemetry": {"exporter": "none"},
    }
    for section, value in extra.items():
        cfg[section] = {**cfg.get(section, {}), **value}
    return cfg


def write(path: Path, cfg: dict) -> None:
    # a rename, as editors and config management do: a reader never sees half a file
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg))
    tmp.replace(path)


@contextmanager
def serve(tmp_path: Path, cfg: dict, *extra: str) -> Iterator[tuple[ProcessServer, Path]]:
    path = tmp_path / "config.yaml"
    write(path, cfg)
    port = free_port()
    with run_process_server(serve_command(path, port, *extra), port, cwd=tmp_path) as server:
        yield server, path


def stderr_now(server: ProcessServer) -> str:
    """What the server has written to stderr so far (pread: the child's offset is untouched)."""
    fd = server._files[1].fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


def reloads(server: ProcessServer, generation: int) -> set[int]:
    """The pids of the processes that logged reaching config `generation` (so far, or in
    all once the server has exited)."""
    text = server.stderr if server.returncode is not None else stderr_now(server)
    return {int(p) for g, p in RELOADED.findall(text) if int(g) == generation}


def ask(server: ProcessServer, key: str | None, **body: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    # a new connection each time: with several workers, any of them may answer
    return httpx.post(
        f"{server.url}/v1/chat/completions", headers=headers, json={**ASK, **body}, timeout=20
    )


def reload_by_post(server: ProcessServer, key: str | None = ADMIN) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/admin/reload", headers=headers, timeout=20)


def spent(server: ProcessServer, team: str) -> Decimal:
    rows = httpx.get(
        f"{server.url}/admin/spend",
        params={"team": team},
        headers={"authorization": f"Bearer {ADMIN}"},
        timeout=20,
    ).json()["data"]
    return Decimal(next(r["spent_usd"] for r in rows if r["key"] is None))


def test_sighup_applies_a_new_team_and_drops_a_removed_one(tmp_path: Path) -> None:
    with serve(tmp_path, config(tmp_path, {"a": "sk-a"})) as (server, path):
        assert ask(server, "sk-a").status_code == 200
        assert ask(server, "sk-b").status_code == 401
        write(path, config(tmp_path, {"b": "sk-b"}, text="new reply"))
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(server, 1), within=20, what="the reload's log line")
        fresh = ask(server, "sk-b")
        assert fresh.status_code == 200
        assert fresh.json()["choices"][0]["message"]["content"] == "new reply"
        gone = ask(server, "sk-a")
        assert gone.status_code == 401 and gone.json()["error"]["code"] == "invalid_api_key"
    assert server.returncode == 0  # SIGHUP did not end it; SIGTERM drained as before
    assert reloads(server, 1) == {server.proc.pid}


def test_an_invalid_config_is_refused_naming_the_key_and_the_old_one_serves(
    tmp_path: Path,
) -> None:
    with serve(tmp_path, config(tmp_path, {"a": "sk-a"})) as (server, path):
        bad = config(tmp_path, {"b": "sk-b"})
        bad["teams"]["b"]["keys"][0] = {"name": "b-key"}  # neither key nor sha256
        write(path, bad)
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "refused" in stderr_now(server), within=20, what="the refusal")
        line = next(x for x in stderr_now(server).splitlines() if "refused" in x)
        assert "the old config keeps serving" in line and "(SIGHUP)" in line
        assert "teams.b.keys[0]" in stderr_now(server)
        assert ask(server, "sk-a").status_code == 200
        assert ask(server, "sk-b").status_code == 401

        refused = reload_by_post(server)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_config"
        assert error["param"] == "teams.b.keys[0]"
        assert "the old config keeps serving" in error["message"]
        assert ask(server, "sk-a").status_code == 200
        assert not reloads(server, 1)


def test_post_admin_reload_needs_an_admin_key(tmp_path: Path) -> None:
    with serve(tmp_path, config(tmp_path, {"a": "sk-a"})) as (server, path):
        write(path, config(tmp_path, {"a": "sk-a", "b": "sk-b"}))
        assert reload_by_post(server, None).status_code == 401
        denied = reload_by_post(server, "sk-a")
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "admin_required"
        assert ask(server, "sk-b").status_code == 401  # neither reloaded
        done = reload_by_post(server)
        assert done.status_code == 200
        assert done.json() == {"reloaded": True, "generation": 1, "restart_needed": []}
        assert ask(server, "sk-b").status_code == 200
        again = reload_by_post(server)  # the same file: read, nothing to apply
        assert again.json() == {"reloaded": True, "generation": 1, "restart_needed": []}


def test_spend_carries_over_a_reload(tmp_path: Path) -> None:
    budget = {"budget": {"limit_usd": 5, "period": "total"}}
    before = config(tmp_path, {"a": "sk-a"})
    before["teams"]["a"].update(budget)
    with serve(tmp_path, before) as (server, path):
        assert ask(server, "sk-a").status_code == 200
        first = spent(server, "a")
        assert first > 0
        after = config(tmp_path, {"a": "sk-a", "b": "sk-b"}, text="a longer reply than before")
        after["teams"]["a"].update(budget)
        write(path, after)
        assert reload_by_post(server).status_code == 200
        assert spent(server, "a") == first  # same store, same ledger
        assert ask(server, "sk-a").status_code == 200
        assert spent(server, "a") > first


def test_server_store_and_telemetry_changes_need_a_restart(tmp_path: Path) -> None:
    with serve(tmp_path, config(tmp_path, {"a": "sk-a"})) as (server, path):
        changed = config(
            tmp_path,
            {"a": "sk-a", "b": "sk-b"},
            server={"port": server.port + 1, "max_body_mb": 1},
            store={"path": str(tmp_path / "elsewhere.db")},
            telemetry={"service_name": "renamed"},
        )
        write(path, changed)
        done = reload_by_post(server)
        assert done.status_code == 200
        assert done.json()["restart_needed"] == [
            "server.max_body_mb",
            "server.port",
            "store.path",
            "telemetry.service_name",
        ]
        assert ask(server, "sk-b").status_code == 200  # the rest applied
        # the running values kept: this port, this store, a body over 1 MB still accepted
        big = ask(server, "sk-a", messages=[{"role": "user", "content": "x " * 600_000}])
        assert big.status_code == 200
    assert not (tmp_path / "elsewhere.db").exists()
    assert "server.max_body_mb, server.port, store.path, telemetry.service_name changed" in (
        server.stderr
    )


def priced(usd_per_mtok: int) -> dict:
    return {
        "overrides": {
            "gpt-4o-mini": {"input_per_mtok": usd_per_mtok, "output_per_mtok": usd_per_mtok}
        }
    }


def test_a_stream_in_flight_finishes_on_the_config_it_started_with(tmp_path: Path) -> None:
    words = " ".join(f"w{i}" for i in range(60))
    slow = config(tmp_path, {"a": "sk-a"}, text=words, pricing=priced(1))
    # a stream of about 6 s, for a reload that takes well under one
    slow["providers"]["m"]["chunk_delay_ms"] = 100
    # an alert at the first spend, which settlement checks against the team's config
    slow["teams"]["a"].update(budget={"limit_usd": 5}, alerts={"thresholds": [0.000001]})
    started, result = threading.Event(), {}
    with serve(tmp_path, slow) as (server, path):

        def stream() -> None:
            body = {**ASK, "stream": True, "stream_options": {"include_usage": True}}
            text, usage = [], None
            with httpx.stream(
                "POST",
                f"{server.url}/v1/chat/completions",
                headers={"authorization": "Bearer sk-a"},
                json=body,
                timeout=30,
            ) as r:
                result["status"] = r.status_code
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    for choice in chunk["choices"]:
                        text.append(choice["delta"].get("content") or "")
                    usage = chunk.get("usage") or usage
                    started.set()
            result["text"], result["usage"] = "".join(text), usage
            result["reloaded_before_the_end"] = bool(reloads(server, 1))

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(20)
        # team a removed, another reply, a thousand times the price
        write(path, config(tmp_path, {"b": "sk-b"}, text="new reply", pricing=priced(1000)))
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(server, 1), within=20, what="the reload's log line")
        assert ask(server, "sk-a").status_code == 401
        fresh = ask(server, "sk-b")
        assert fresh.json()["choices"][0]["message"]["content"] == "new reply"
        tokens = fresh.json()["usage"]["total_tokens"]
        assert Decimal(fresh.headers["x-tallygate-cost-usd"]) == Decimal(tokens * 1000) / 10**6
        reader.join(30)
    assert result["reloaded_before_the_end"]  # the reload happened while it streamed
    assert result["status"] == 200 and result["text"] == words
    usage = result["usage"]
    # charged at the price of the config it started on
    assert Decimal(str(usage["cost"])) == Decimal(usage["total_tokens"]) / 10**6
    lines = [json.loads(x) for x in server.stdout.splitlines() if x.startswith("{")]
    streamed = [x for x in lines if x["team"] == "a" and x["status"] == 200]
    assert len(streamed) == 1  # settled and logged for the team the old config had
    assert Decimal(streamed[0]["cost_usd"]) == Decimal(usage["total_tokens"]) / 10**6
    assert "Budget alert: team 'a' has reached" in server.stderr  # a team the new config lacks


# any reload a worker logs: a worker that started after the file changed finds no change
REREAD = re.compile(r"config (?:reloaded|re-read, no change,) from \S+ \((?:SIGHUP|POST /admin/reload)\)"
                    r": generation \d+ \[pid (\d+)\]")  # fmt: skip


def workers_reloaded_since(server: ProcessServer, mark: int) -> set[int]:
    return {int(pid) for pid in REREAD.findall(stderr_now(server)[mark:])}


def both_workers_reload_since(server: ProcessServer, mark: int) -> set[int]:
    try:
        wait_until(lambda: len(workers_reloaded_since(server, mark)) == 2, within=60)
    except AssertionError:
        raise AssertionError(f"not both workers reloaded:\n{stderr_now(server)}") from None
    return workers_reloaded_since(server, mark)


def test_every_worker_reloads(tmp_path: Path) -> None:
    with serve(tmp_path, config(tmp_path, {"a": "sk-a"}), "--workers", "2") as (server, path):
        write(path, config(tmp_path, {"b": "sk-b"}))
        server.proc.send_signal(signal.SIGHUP)  # to the supervisor
        workers = both_workers_reload_since(server, 0)
        assert server.proc.pid not in workers
        for _ in range(20):  # new connections: both workers answer some of them
            assert ask(server, "sk-b").status_code == 200
            assert ask(server, "sk-a").status_code == 401

        # POST reaches one worker; it has the supervisor tell the other
        mark = len(stderr_now(server))
        write(path, config(tmp_path, {"b": "sk-b", "c": "sk-c"}))
        done = reload_by_post(server)
        assert done.status_code == 200 and done.json()["reloaded"] is True
        assert both_workers_reload_since(server, mark) == workers  # the same, reloaded in place
        for _ in range(20):
            assert ask(server, "sk-c").status_code == 200
    assert server.returncode == 0


def test_reload_without_a_config_file_is_refused(tmp_path: Path) -> None:
    """A gateway built from a Config object (tests, embedding) has no file to re-read."""
    with running_gateway(base_config("http://127.0.0.1:9", tmp_path / "spend.db")) as gw:
        headers = {"authorization": f"Bearer {KEYS['admin']}"}
        r = httpx.post(gw.url + "/admin/reload", headers=headers)
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_config_file"


def test_a_replaced_provider_closes_only_after_its_streams_end(tmp_path: Path) -> None:
    with FakeUpstream() as upstream:
        cfg = config(tmp_path, {"a": "sk-a"})
        cfg["providers"]["up"] = {"kind": "openai", "base_url": upstream.base_url, "api_key": "u"}
        cfg["models"]["remote"] = [{"provider": "up", "model": "gpt-4o-mini"}]
        # each chunk after the first waits for upstream.release()
        upstream.enqueue(chat_stream("one two three", gate=True, usage=usage_json(5, 3)))
        started, result = threading.Event(), {}
        with serve(tmp_path, cfg) as (server, path):

            def stream() -> None:
                text = []
                with httpx.stream(
                    "POST",
                    f"{server.url}/v1/chat/completions",
                    headers={"authorization": "Bearer sk-a"},
                    json={**ASK, "model": "remote", "stream": True},
                    timeout=30,
                ) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            assert "error" not in chunk, chunk
                            text += [c["delta"].get("content") or "" for c in chunk["choices"]]
                            started.set()
                result["text"] = "".join(text)

            reader = threading.Thread(target=stream)
            reader.start()
            assert started.wait(20)
            changed = json.loads(json.dumps(cfg))
            changed["providers"]["up"]["headers"] = {"x-config": "2"}  # a new client for "up"
            write(path, changed)
            server.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: reloads(server, 1), within=20, what="the reload's log line")
            assert ask(server, "sk-a", model="remote").status_code == 200
            assert upstream.requests[-1].headers.get("x-config") == "2"  # the new provider
            wait_until(
                lambda: (
                    "up replaced by a reload: closed once the 1 request(s)" in stderr_now(server)
                ),
                within=20,
                what="the old client kept for the stream",
            )
            assert "closed the provider" not in stderr_now(server)
            upstream.release(10)
            reader.join(30)
            assert result["text"] == "one two three"  # its client was not closed under it
            wait_until(
                lambda: (
                    "closed the provider(s) a reload replaced, now unused: up" in stderr_now(server)
                ),
                within=20,
                what="the old client closed",
            )
