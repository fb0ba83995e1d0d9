"""A serving process tunes the garbage collector; an embedding app leaves it alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gateway.server.runtime import GC_THRESHOLDS

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import asyncio, gc, json, sys, time
from gateway.app import create_app
from gateway.config import load_config

config = load_config(sys.argv[1], env={})
config = config.model_copy(update={"store": config.store.model_copy(update={"path": sys.argv[2]})})
app = create_app(config, serving=sys.argv[3] == "serve")

async def main():
    async with app.router.lifespan_context(app):
        gw = app.state.gateway
        await asyncio.wait_for(gw.warming, 30)
        deadline = time.monotonic() + 10
        while sys.argv[3] == "serve" and not gc.get_freeze_count() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        print(json.dumps({"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}))

asyncio.run(main())
"""


def run(mode: str, tmp_path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT / "config.yaml"), str(tmp_path / "t.db"), mode],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_serving_tunes_gc_and_freezes_the_startup_heap(tmp_path: Path) -> None:
    served = run("serve", tmp_path)
    assert tuple(served["threshold"]) == GC_THRESHOLDS
    assert served["frozen"] > 10_000  # config, SDKs, tokenizer wrappers: out of the GC's walk
    embedded = run("embed", tmp_path)
    assert tuple(embedded["threshold"]) != GC_THRESHOLDS and embedded["frozen"] == 0
