"""The provider registry: config `kind` → "module:Class", imported only when a config uses it."""

from __future__ import annotations

import importlib
from typing import Any

from gateway.config import ProviderConfig
from gateway.providers import PROVIDERS
from gateway.providers.base import Provider
from pricing.tokens import TokenCounter


def provider_class(kind: str) -> Any:
    try:
        module, _, cls = PROVIDERS[kind].partition(":")
    except KeyError:
        raise ValueError(f"provider kind '{kind}' is not available in this build") from None
    return getattr(importlib.import_module(module), cls)


def build_provider(name: str, config: ProviderConfig, *, counter: TokenCounter) -> Provider:
    """Every provider class takes (name, config, *, counter): the gateway's token counter,
    which the mock answers with and HTTP providers ignore."""
    return provider_class(config.kind)(name, config, counter=counter)  # type: ignore[no-any-return]
