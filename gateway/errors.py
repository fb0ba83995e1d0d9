"""The gateway's error hierarchy: every error it returns, rendered as OpenAI error JSON.

    GatewayError                      (status, type, code)
    ├── InvalidRequest                400 invalid_request_error
    │   ├── RequestTooLarge           413 invalid_request_error / request_too_large
    │   └── PriceUnknown              400 invalid_request_error / price_unknown
    ├── AuthenticationFailed          401 authentication_error / invalid_api_key
    ├── PermissionDenied              403 permission_error / model_not_allowed
    ├── ModelNotFound                 404 invalid_request_error / model_not_found
    ├── RateLimited                   429 requests|tokens / rate_limit_exceeded (+ Retry-After)
    ├── BudgetExceeded                429 insufficient_quota / budget_exceeded
    ├── StoreUnavailable              503 service_unavailable / store_unavailable
    ├── UpstreamError                 502 upstream_error / upstream_error
    └── UpstreamTimeout               504 upstream_timeout / upstream_timeout

Upstream 4xx responses are not GatewayErrors: they pass through with their own status
and body. Messages never carry a key or unredacted prompt content.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if type is not None:
            self.type = type
        self.headers = dict(headers or {})

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_response(self, extra_headers: Mapping[str, str] | None = None) -> Response:
        headers = {**self.headers, **(extra_headers or {})}
        return error_response(self.status, self.body(), headers)


def error_response(status: int, body: object, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class RequestTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class PriceUnknown(InvalidRequest):
    code = "price_unknown"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RateLimited(GatewayError):
    status = 429
    type = "requests"  # OpenAI names the exhausted window: "requests" or "tokens"
    code = "rate_limit_exceeded"


class BudgetExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "budget_exceeded"


class StoreUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "store_unavailable"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"
    kind = "upstream_error"  # a transport failure's error.type (gateway.pipeline.upstream_errors)


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_timeout"
    code = "upstream_timeout"
    kind = "timeout"
