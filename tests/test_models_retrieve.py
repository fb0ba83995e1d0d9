"""GET /v1/models/{id}: the alias, as in the list, when the caller's team may use it; else the
404 OpenAI sends for a model that does not exist. With the official openai SDK."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.gateway_harness import KEYS, RunningGateway, running_gateway


def client(gw: RunningGateway, key: str = KEYS["alpha"]) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=10)


def test_an_alias_the_team_may_use_is_the_list_entry(gateway: RunningGateway) -> None:
    with client(gateway) as c:
        model = c.models.retrieve("demo")
        listed = {m.id: m for m in c.models.list()}
    assert model.id == "demo" and model.object == "model" and model.owned_by == "tallygate"
    assert model == listed["demo"]


@pytest.mark.parametrize("alias", ["gpt-4o-mini", "no-such-model"])
def test_an_alias_the_team_may_not_use_is_a_404_like_an_unknown_one(
    gateway: RunningGateway, alias: str
) -> None:
    with client(gateway, KEYS["beta"]) as c:  # team beta may use only "demo"
        assert c.models.retrieve("demo").id == "demo"
        with pytest.raises(openai.NotFoundError) as missing:
            c.models.retrieve(alias)
    body = missing.value.body
    assert isinstance(body, dict)
    assert body["code"] == "model_not_found" and body["type"] == "invalid_request_error"
    assert body["param"] == "model" and f"`{alias}` does not exist" in body["message"]


def test_it_needs_a_key_and_works_without_v1(gateway: RunningGateway) -> None:
    bare = httpx.get(gateway.url + "/v1/models/demo", timeout=10)
    assert bare.status_code == 401 and bare.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(
        gateway.url + "/v1/models/demo", headers={"authorization": "Bearer sk-nope"}, timeout=10
    )
    assert wrong.status_code == 401
    plain = httpx.get(
        gateway.url + "/models/demo", headers={"x-api-key": KEYS["alpha"]}, timeout=10
    )
    assert plain.status_code == 200 and plain.json()["id"] == "demo"
    post = httpx.post(
        gateway.url + "/v1/models/demo", headers={"x-api-key": KEYS["alpha"]}, timeout=10
    )
    assert post.status_code == 405


def test_an_alias_with_a_slash_is_one_id(gateway_config: dict) -> None:
    gateway_config["models"]["org/model-x"] = [{"provider": "demo", "model": "gpt-4o-mini"}]
    with running_gateway(gateway_config) as gw, client(gw) as c:
        assert c.models.retrieve("org/model-x").id == "org/model-x"
        with pytest.raises(openai.NotFoundError):
            c.models.retrieve("org")
