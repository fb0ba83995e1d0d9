"""The `azure` provider against a real loopback server (tests/fake_upstream.py), which
records the URL, query and headers Azure OpenAI would see."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gateway.config import ProviderConfig
from gateway.providers.azure import AzureProvider
from gateway.providers.base import UpstreamResponse
from tests.fake_upstream import FakeUpstream, RecordedRequest, Reply, chat_stream

API_VERSION = "2024-10-21"
CHAT = {"model": "prod-4o", "messages": [{"role": "user", "content": "hi azure"}]}

Make = Callable[..., AzureProvider]


@pytest.fixture
async def azure(fake_upstream: FakeUpstream) -> AsyncIterator[Make]:
    made: list[AzureProvider] = []

    def make(**config: Any) -> AzureProvider:
        settings = {"base_url": fake_upstream.url, "api_key": "az-secret",
                    "api_version": API_VERSION, **config}  # fmt: skip
        provider = AzureProvider("az", ProviderConfig(kind="azure", **settings))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.aclose()


async def send(
    provider: AzureProvider,
    operation: str = "chat",
    deployment: str = "prod-4o",
    body: dict[str, Any] | None = None,
    *,
    stream: bool = False,
    headers: dict[str, str] | None = None,
) -> UpstreamResponse:
    return await provider.send(
        operation, deployment, body or CHAT, stream=stream, timeout_s=5, headers=headers or {}
    )


def only(fake: FakeUpstream) -> RecordedRequest:
    (request,) = fake.requests
    return request


async def test_chat_goes_to_the_deployment_url_with_the_api_version(
    azure: Make, fake_upstream: FakeUpstream
) -> None:
    up = await send(azure())
    assert up.status == 200 and up.body is not None
    assert json.loads(up.body)["choices"][0]["message"]["content"] == "hi azure"
    request = only(fake_upstream)
    assert request.method == "POST"
    assert request.path == "/openai/deployments/prod-4o/chat/completions"
    assert request.query == f"api-version={API_VERSION}"
    assert request.json == CHAT  # the body as given: OpenAI's wire format


@pytest.mark.parametrize(
    ("operation", "suffix"),
    [("chat", "/chat/completions"), ("text_completion", "/completions"),
     ("embeddings", "/embeddings")],
)  # fmt: skip
async def test_each_operation_has_its_deployment_path(
    azure: Make, fake_upstream: FakeUpstream, operation: str, suffix: str
) -> None:
    body = {"model": "emb-small", "input": "x", "prompt": "x"}
    await send(azure(), operation, "emb-small", body)
    request = only(fake_upstream)
    assert request.path == f"/openai/deployments/emb-small{suffix}"
    assert request.query == f"api-version={API_VERSION}"


async def test_the_responses_api_uses_the_v1_surface(
    azure: Make, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Reply(json={"id": "resp_1", "object": "response"}))
    body = {"model": "prod-4o", "input": "hi"}
    up = await send(azure(), "responses", "prod-4o", body)
    assert up.status == 200
    request = only(fake_upstream)
    # no api-version and no deployment in the path: the body's model names the deployment
    assert request.path == "/openai/v1/responses" and request.query == ""
    assert request.json["model"] == "prod-4o"


async def test_the_key_goes_in_the_api_key_header_only(
    azure: Make, fake_upstream: FakeUpstream
) -> None:
    await send(azure(headers={"x-ms-client": "tg"}), headers={"x-request-id": "req-7"})
    headers = only(fake_upstream).headers
    assert headers["api-key"] == "az-secret"
    assert "authorization" not in headers  # OpenAI's Bearer header is not sent to Azure
    assert headers["x-ms-client"] == "tg"  # configured extra headers
    assert headers["x-request-id"] == "req-7"  # per-request headers
    assert headers["content-type"] == "application/json"


async def test_no_key_no_api_key_header(azure: Make, fake_upstream: FakeUpstream) -> None:
    await send(azure(api_key=None))
    headers = only(fake_upstream).headers
    assert "api-key" not in headers and "authorization" not in headers


async def test_a_trailing_slash_on_the_base_url_is_not_doubled(
    azure: Make, fake_upstream: FakeUpstream
) -> None:
    await send(azure(base_url=fake_upstream.url + "/"))
    assert only(fake_upstream).path == "/openai/deployments/prod-4o/chat/completions"


async def test_the_deployment_comes_from_the_model_argument(
    azure: Make, fake_upstream: FakeUpstream
) -> None:
    # the gateway rewrites the body's model too; the URL follows the argument
    await send(azure(), deployment="eu-gpt-4o-mini")
    assert only(fake_upstream).path == "/openai/deployments/eu-gpt-4o-mini/chat/completions"


async def test_a_stream_is_relayed_as_raw_bytes(azure: Make, fake_upstream: FakeUpstream) -> None:
    fake_upstream.enqueue(chat_stream("one two"))
    up = await send(azure(), body={**CHAT, "stream": True}, stream=True)
    assert up.status == 200 and up.chunks is not None
    try:
        raw = b"".join([chunk async for chunk in up.chunks])
    finally:
        await up.close()
    assert raw.endswith(b"data: [DONE]\n\n") and b'"content":" two"' in raw
    assert only(fake_upstream).query == f"api-version={API_VERSION}"


async def test_an_upstream_error_comes_back_as_a_status(
    azure: Make, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(Reply(404, json={"error": {"code": "DeploymentNotFound"}}))
    up = await send(azure(), deployment="missing")
    assert up.status == 404 and up.body is not None
    assert json.loads(up.body)["error"]["code"] == "DeploymentNotFound"


async def test_server_address_and_port_come_from_the_base_url(azure: Make) -> None:
    provider = azure(base_url="https://res.openai.azure.com")
    assert (provider.server_address, provider.server_port) == ("res.openai.azure.com", 443)
