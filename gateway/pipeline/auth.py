"""Authentication: a caller's gateway key (Bearer, x-api-key or api-key header) → its Principal."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.config import Config, hash_key
from gateway.errors import AuthenticationFailed
from gateway.pipeline.context import Principal


class KeyIndex:
    """sha256(key) → principal. Plain keys are hashed at start, so only digests are held."""

    def __init__(self, config: Config) -> None:
        self._by_digest: dict[str, Principal] = {}
        for team, tcfg in config.teams.items():
            for key in tcfg.keys:
                self._by_digest[key.digest] = Principal(
                    team=team, key_name=key.name, admin=tcfg.admin
                )

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        key = presented_key(headers)
        if not key:
            raise AuthenticationFailed(
                "Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'."
            )
        # Looking up a digest, not the key, leaks nothing useful through timing.
        principal = self._by_digest.get(hash_key(key))
        if principal is None:
            raise AuthenticationFailed("Incorrect API key provided.")
        return principal


def presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get("x-api-key") or headers.get("api-key") or None
