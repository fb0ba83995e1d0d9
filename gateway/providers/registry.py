"""The provider registry: config `kind` → "module:Class", imported only when a config uses it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gateway.config import ProviderConfig
from gateway.providers import PROVIDERS
from gateway.providers.base import Provider
from pricing.tokens import TokenCounter

if TYPE_CHECKING:
    from gateway.providers.http import UpstreamFactory


def provider_class(kind: str) -> Any:
    try:
        module, _, cls = PROVIDERS[kind].partition(":")
    except KeyError:
        raise ValueError(f"provider kind '{kind}' is not available in this build") from None
    return getattr(importlib.import_module(module), cls)


def build_provider(
    name: str,
    config: ProviderConfig,
    *,
    counter: TokenCounter,
    upstream: UpstreamFactory | None = None,
) -> Provider:
    """Every provider class takes (name, config, *, counter, upstream): the gateway's token
    counter, which the mock answers with and HTTP providers ignore; and the HTTP client
    class HTTP providers send through (gateway.providers.http; None: AiohttpUpstream),
    which the mock ignores."""
    cls = provider_class(config.kind)
    return cls(name, config, counter=counter, upstream=upstream)  # type: ignore[no-any-return]
