"""An app factory for multi-worker serving: each worker process loads $TALLYGATE_CONFIG itself."""

from __future__ import annotations

import os

from starlette.applications import Starlette

from gateway.app import create_app
from gateway.config import load_config


def app_from_env() -> Starlette:
    config = load_config(os.environ.get("TALLYGATE_CONFIG"))
    workers = int(os.environ.get("TALLYGATE_WORKERS", "1"))
    server = config.server.model_copy(update={"workers": workers})
    return create_app(config.model_copy(update={"server": server}), serving=True)
