"""Every error the gateway returns, in OpenAI's shape, through real HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.fake_upstream import Close, FakeUpstream, Hang, Reply, error_reply
from tests.gateway_harness import KEYS, UPSTREAM_KEY, RunningGateway, merge, running_gateway

HELLO = [{"role": "user", "content": "hello"}]


def post(
    gw: RunningGateway,
    body: object = None,
    *,
    key: str | None = KEYS["alpha"],
    path: str = "/v1/chat/completions",
    **kw,
) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    if body is None:
        body = {"model": "gpt-4o-mini", "messages": HELLO}
    if isinstance(body, bytes):
        return httpx.post(gw.url + path, content=body, headers=headers, timeout=30, **kw)
    return httpx.post(gw.url + path, json=body, headers=headers, timeout=30, **kw)


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_400_invalid_json(gateway: RunningGateway) -> None:
    r = post(gateway, b"{not json")
    assert r.status_code == 400
    assert error_of(r)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": HELLO}, "model"),
        ({"model": "gpt-4o-mini"}, "messages"),
        ({"model": "gpt-4o-mini", "messages": []}, "messages"),
        ({"model": "gpt-4o-mini", "messages": HELLO, "stream": "yes"}, "stream"),
    ],
)
def test_400_missing_or_bad_fields(gateway: RunningGateway, body: dict, param: str) -> None:
    r = post(gateway, body)
    assert r.status_code == 400
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_400_body_not_an_object(gateway: RunningGateway) -> None:
    r = post(gateway, b"[1, 2]")
    assert r.status_code == 400 and error_of(r)["type"] == "invalid_request_error"


def test_401_missing_and_wrong_key(gateway: RunningGateway) -> None:
    missing = post(gateway, key=None)
    wrong = post(gateway, key="sk-wrong-secret-value")
    for r in (missing, wrong):
        assert r.status_code == 401
        err = error_of(r)
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
    assert "sk-wrong-secret-value" not in wrong.text


def test_401_through_the_sdk(gateway: RunningGateway) -> None:
    with (
        openai.OpenAI(base_url=gateway.base_url, api_key="sk-nope", max_retries=0) as c,
        pytest.raises(openai.AuthenticationError),
    ):
        c.chat.completions.create(model="gpt-4o-mini", messages=HELLO)


def test_403_model_not_allowed(gateway: RunningGateway) -> None:
    r = post(gateway, key=KEYS["beta"])
    assert r.status_code == 403
    err = error_of(r)
    assert err["type"] == "permission_error" and err["code"] == "model_not_allowed"


def test_404_unknown_model(gateway: RunningGateway) -> None:
    with (
        openai.OpenAI(base_url=gateway.base_url, api_key=KEYS["alpha"], max_retries=0) as c,
        pytest.raises(openai.NotFoundError) as info,
    ):
        c.chat.completions.create(model="no-such-model", messages=HELLO)
    assert info.value.code == "model_not_found"
    assert info.value.status_code == 404


def test_404_unknown_path_is_openai_shaped(gateway: RunningGateway) -> None:
    r = httpx.get(gateway.url + "/v1/nope", headers={"authorization": f"Bearer {KEYS['alpha']}"})
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"


def test_413_body_too_large(gateway_config: dict) -> None:
    with running_gateway(merge(gateway_config, {"server": {"max_body_mb": 0.01}})) as gw:
        big = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * 20000}]}
        r = post(gw, big)
        # without a content-length the limit is enforced while reading
        chunked = httpx.post(
            gw.url + "/v1/chat/completions",
            content=iter([b"{" + b" " * 20000 + b"}"]),
            headers={"authorization": f"Bearer {KEYS['alpha']}"},
        )
    assert r.status_code == 413
    assert error_of(r)["code"] == "request_too_large"
    assert chunked.status_code == 413


def test_upstream_4xx_passes_through(gateway: RunningGateway, fake_upstream: FakeUpstream) -> None:
    body = {
        "error": {
            "message": "Invalid 'temperature': too high",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }
    fake_upstream.enqueue(Reply(400, json=body))
    r = post(gateway)
    assert r.status_code == 400
    assert r.json() == body
    assert len(fake_upstream.requests) == 1  # a 4xx is not retried


def test_502_after_retries_and_the_message_names_no_key(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.enqueue(error_reply(500), error_reply(500))
    r = post(gateway)
    assert r.status_code == 502
    err = error_of(r)
    assert err["type"] == "upstream_error" and err["code"] == "upstream_error"
    assert r.headers["x-tallygate-attempts"] == "2"  # retries: 1
    assert UPSTREAM_KEY not in r.text
    line = gateway.access_lines()[-1]
    assert line["status"] == 502 and line["error_message"] == err["message"]
    assert "HTTP 500" in line["error_message"]


def test_502_connection_refused(gateway_config: dict) -> None:
    from tests.servers import free_port

    gateway_config["providers"]["up"]["base_url"] = f"http://127.0.0.1:{free_port()}/v1"
    with running_gateway(gateway_config) as gw:
        r = post(gw)
    assert r.status_code == 502 and error_of(r)["code"] == "upstream_error"


def test_502_connection_dropped(gateway: RunningGateway, fake_upstream: FakeUpstream) -> None:
    fake_upstream.enqueue(Close(), Close())
    r = post(gateway)
    assert r.status_code == 502 and error_of(r)["type"] == "upstream_error"


def test_504_timeout(gateway_config: dict, fake_upstream: FakeUpstream) -> None:
    cfg = merge(
        gateway_config,
        {
            "models": {
                "gpt-4o-mini": [{"provider": "up", "model": "gpt-4o-mini", "timeout_s": 0.3}]
            },
            "routing": {"retries": 0},
        },
    )
    with running_gateway(cfg) as gw:
        fake_upstream.enqueue(Hang(3))
        r = post(gw)
    assert r.status_code == 504
    err = error_of(r)
    assert err["type"] == "upstream_timeout" and err["code"] == "upstream_timeout"


def test_429_from_every_deployment_passes_through(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    limited = Reply(
        429,
        json={
            "error": {
                "message": "slow down",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        },
        headers={"retry-after": "60"},
    )
    fake_upstream.enqueue(limited)
    r = post(gateway)
    assert r.status_code == 429
    assert r.json()["error"]["message"] == "slow down"
    assert r.headers["retry-after"] == "60"
    assert len(fake_upstream.requests) == 1  # Retry-After 60 s is longer than we wait: no retry


def test_405_wrong_method(gateway: RunningGateway) -> None:
    r = httpx.get(
        gateway.url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEYS['alpha']}"}
    )
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


# --- who may call a route: declared in the route table ---------------------------------

PUBLIC_PATHS = {"/healthz", "/readyz", "/metrics"}


def table_requests() -> list[tuple[str, str]]:
    from gateway.app import routes

    out = []
    for r in routes():
        (method,) = r.methods - {"HEAD"}
        out.append((method, r.path.replace("{model:path}", "gpt-4o-mini")))
    return out


def test_every_route_but_the_public_ones_refuses_a_caller_without_a_key(
    gateway: RunningGateway,
) -> None:
    requests = table_requests()
    assert len(requests) >= 20 and PUBLIC_PATHS <= {path for _, path in requests}
    for method, path in requests:
        r = httpx.request(method, gateway.url + path, json={}, timeout=30)
        if path in PUBLIC_PATHS:
            assert r.status_code in (200, 503), (method, path)
        else:
            assert r.status_code == 401, (method, path, r.text)
            err = error_of(r) if "/messages" not in path else r.json()["error"]
            assert err["type"] == "authentication_error" or err["code"] == "invalid_api_key"


def test_admin_routes_refuse_a_team_key_in_openai_shape(gateway: RunningGateway) -> None:
    for method, path in [("GET", "/admin/spend"), ("POST", "/admin/reload")]:
        r = httpx.request(
            method, gateway.url + path, headers={"authorization": f"Bearer {KEYS['alpha']}"}
        )
        assert r.status_code == 403 and error_of(r)["code"] == "admin_required"


def test_a_route_must_declare_its_access() -> None:
    from gateway.app import healthz, route

    with pytest.raises(ValueError, match="unknown access"):
        route("/x", healthz, "GET", "everyone")
