"""gateway.pipeline.auth: which header's key is read, and which principal it names.

Headers are starlette's own `Headers`, as the routes pass them (case-insensitive names).
"""

from __future__ import annotations

import pytest
from starlette.datastructures import Headers

from gateway.config import Config, hash_key
from gateway.errors import AuthenticationFailed
from gateway.pipeline.auth import KeyIndex, presented_key
from gateway.pipeline.context import Principal

CONFIG = Config.model_validate(
    {
        "teams": {
            "search": {
                "keys": [{"name": "prod", "key": "sk-search"}, {"name": "ci", "key": "sk-ci"}]
            },
            "ops": {
                "admin": True,
                "keys": [{"name": "root", "sha256": hash_key("sk-ops").upper()}],
            },
        }
    }
)
SEARCH = Principal(team="search", key_name="prod")


@pytest.fixture(scope="module")
def keys() -> KeyIndex:
    return KeyIndex(CONFIG)


def auth(keys: KeyIndex, **headers: str) -> Principal:
    return keys.authenticate(Headers({k.replace("_", "-"): v for k, v in headers.items()}))


def test_each_header_names_its_key(keys: KeyIndex) -> None:
    assert auth(keys, authorization="Bearer sk-search") == SEARCH
    assert auth(keys, x_api_key="sk-search") == SEARCH  # Anthropic's header
    assert auth(keys, api_key="sk-search") == SEARCH  # Azure's header


def test_the_principal_carries_team_key_and_admin(keys: KeyIndex) -> None:
    assert auth(keys, authorization="Bearer sk-ci") == Principal("search", "ci", admin=False)
    # configured by digest (any hex case): the plain key is never in the config
    assert auth(keys, authorization="Bearer sk-ops") == Principal("ops", "root", admin=True)


def test_header_names_and_the_scheme_are_case_insensitive(keys: KeyIndex) -> None:
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert keys.authenticate(Headers({"Authorization": f"{scheme} sk-search"})) == SEARCH
    assert keys.authenticate(Headers({"X-Api-Key": "sk-search"})) == SEARCH


def test_bearer_wins_over_the_key_headers(keys: KeyIndex) -> None:
    assert (
        auth(keys, authorization="Bearer sk-search", x_api_key="sk-ci", api_key="sk-ci") == SEARCH
    )
    # a wrong Bearer key is wrong, even with a right x-api-key beside it
    with pytest.raises(AuthenticationFailed, match="Incorrect"):
        auth(keys, authorization="Bearer sk-wrong", x_api_key="sk-search")


def test_x_api_key_wins_over_api_key(keys: KeyIndex) -> None:
    assert auth(keys, x_api_key="sk-search", api_key="sk-ci") == SEARCH


def test_another_scheme_falls_through_to_the_key_headers(keys: KeyIndex) -> None:
    assert auth(keys, authorization="Basic c2stY2k=", x_api_key="sk-search") == SEARCH
    assert auth(keys, authorization="Bearer", api_key="sk-search") == SEARCH  # no value
    assert auth(keys, authorization="Bearer    ", api_key="sk-search") == SEARCH  # blank value


def test_whitespace_around_a_bearer_key_is_ignored(keys: KeyIndex) -> None:
    assert auth(keys, authorization="Bearer   sk-search  ") == SEARCH


def test_a_tab_is_not_a_bearer_separator(keys: KeyIndex) -> None:
    # RFC 9110 separates scheme and credentials with spaces only
    assert presented_key(Headers({"authorization": "Bearer\tsk-search"})) is None


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Basic c2stY2k="}, {"x-api-key": ""}, {"authorization": "Bearer "}],
)
def test_no_key_is_a_missing_key(keys: KeyIndex, headers: dict[str, str]) -> None:
    with pytest.raises(AuthenticationFailed, match="Missing API key") as info:
        keys.authenticate(Headers(headers))
    assert info.value.status == 401 and info.value.code == "invalid_api_key"


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer sk-unknown"},
        {"x-api-key": "sk-SEARCH"},  # keys are case-sensitive
        {"api-key": "sk-search\xa0"},  # a no-break space is part of the key
        {"authorization": f"Bearer {hash_key('sk-search')}"},  # the digest is not the key
    ],
)
def test_an_unknown_key_is_incorrect(keys: KeyIndex, headers: dict[str, str]) -> None:
    with pytest.raises(AuthenticationFailed, match="Incorrect API key provided") as info:
        keys.authenticate(Headers(headers))
    assert info.value.status == 401


def test_no_teams_no_keys() -> None:
    with pytest.raises(AuthenticationFailed, match="Incorrect"):
        KeyIndex(Config()).authenticate(Headers({"authorization": "Bearer sk-search"}))
