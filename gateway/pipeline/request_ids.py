"""The request id: the client's `x-request-id` when it is a plain id, else one of ours.

The id goes to the access log, spans, error logs, the upstream request and the response,
so a client's value is kept only when it is short, of a safe charset, and holds nothing
the redactor would mask (`sk-proj-…` fits the charset). Otherwise the response says, in
REPLACED_HEADER, that the id it carries is a new one, and why.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from policies.redaction import Redactor

MAX_LENGTH = 128
# UUIDs, ULIDs, our own `req_…`, `svc:1.2`; nothing that quotes, spaces or escapes
VALID = re.compile(rf"[A-Za-z0-9_.:-]{{1,{MAX_LENGTH}}}")
REPLACED_HEADER = "x-tallygate-request-id-replaced"
INVALID = "invalid"  # too long, or a character outside VALID
SENSITIVE = "sensitive"  # a detector found PII or a secret in it


def incoming_request_id(
    headers: Mapping[str, str], redactor: Redactor, new_id: Callable[[], str]
) -> tuple[str, dict[str, str]]:
    """(the request id, the response headers to send with it). `new_id()` makes one when
    the client sent none (no header for that) or one that is refused (REPLACED_HEADER)."""
    value = headers.get("x-request-id")
    if not value:
        return new_id(), {}
    if len(value) > MAX_LENGTH or VALID.fullmatch(value) is None:
        reason = INVALID
    elif redactor.finds(value):
        reason = SENSITIVE
    else:
        return value, {}
    return new_id(), {REPLACED_HEADER: reason}
