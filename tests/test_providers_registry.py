"""gateway.providers.registry: each config `kind` builds its own class, lazily imported."""

from __future__ import annotations

import json
import subprocess
import sys
import typing

import pytest

from gateway.config import ProviderConfig
from gateway.providers import PROVIDERS
from gateway.providers.anthropic import AnthropicProvider
from gateway.providers.azure import AzureProvider
from gateway.providers.mock import MockProvider
from gateway.providers.openai import OpenAIProvider
from gateway.providers.registry import build_provider, provider_class
from pricing.tokens import TokenCounter

CLASSES = {
    "openai": OpenAIProvider,
    "azure": AzureProvider,
    "anthropic": AnthropicProvider,
    "mock": MockProvider,
}
CONFIGS = {
    "openai": {"base_url": "http://127.0.0.1:9/v1", "api_key": "k"},
    "azure": {"base_url": "https://res.openai.azure.com", "api_version": "2024-10-21"},
    "anthropic": {"api_key": "k"},
    "mock": {"text": "fixed"},
}


def test_every_documented_kind_is_registered() -> None:
    kinds = set(typing.get_args(ProviderConfig.model_fields["kind"].annotation))
    assert kinds == set(PROVIDERS) == set(CLASSES)


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_provider_class_names_the_right_class(kind: str) -> None:
    cls = provider_class(kind)
    assert cls is CLASSES[kind]
    assert cls.kind == kind


@pytest.mark.parametrize("kind", sorted(CLASSES))
async def test_build_provider_builds_the_kind(kind: str) -> None:
    config = ProviderConfig(kind=kind, **CONFIGS[kind])  # type: ignore[arg-type]
    provider = build_provider(f"my-{kind}", config, counter=TokenCounter())
    try:
        assert type(provider) is CLASSES[kind]
        assert provider.name == f"my-{kind}" and provider.config is config
    finally:
        await provider.aclose()


async def test_the_mock_counts_with_the_counter_it_is_given() -> None:
    config = ProviderConfig(kind="mock", text="four words right here")
    provider = build_provider("demo", config, counter=TokenCounter())
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
    up = await provider.send("chat", "gpt-4o-mini", body, stream=False, timeout_s=5, headers={})
    assert up.status == 200 and up.body is not None
    usage = json.loads(up.body)["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == 4


@pytest.mark.parametrize("kind", ["bedrock", "", "OpenAI", "openai:OpenAIProvider"])
def test_an_unknown_kind_is_an_error(kind: str) -> None:
    with pytest.raises(ValueError, match=f"provider kind '{kind}' is not available"):
        provider_class(kind)


def test_a_kind_is_imported_only_when_used() -> None:
    # a fresh interpreter: this test process has imported every provider already
    code = (
        "import json, sys\n"
        "from gateway.providers.registry import provider_class\n"
        "provider_class('mock')\n"
        "print(json.dumps([m for m in sys.modules if m.startswith('gateway.providers.')]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    loaded = set(json.loads(out))
    assert "gateway.providers.mock" in loaded
    assert not loaded & {"gateway.providers.anthropic", "gateway.providers.azure"}
