"""What a registry's refusal means: its status and its OCI error JSON, as our errors."""

from __future__ import annotations

import math
import time
from typing import Any

import requests
import urllib3

from blockstore.errors import AuthError, NotFound, RegistryError

ERROR_BODY_LIMIT = 64 << 10
"""What is read of a refusal's body: an OCI error says a line or two."""
ERROR_BODY_SECONDS = 2.0
"""How long a refusal's body is waited for: a server trickling it is not waited out."""


def capped_body(reply: requests.Response, limit: int, seconds: float) -> bytes:
    """At most ``limit`` bytes of a streamed reply's body, read within ``seconds``, and
    kept as its content, so ``reply.json()`` and ``reply.content`` read only them.
    Without this a refusal's body was read whole, with no deadline: a 512 MiB 404 held
    4 GB of memory, and one sent a byte a second held the read for as long. What is cut
    short no longer parses, which each caller takes for a body that says nothing."""
    return body_within(reply, limit, seconds)[0]


def body_within(reply: requests.Response, limit: int, seconds: float) -> tuple[bytes, bool]:
    """``capped_body``, and whether the body came to its end: not where the time ran
    out, the connection broke, or ``limit`` bytes came before its end was seen."""
    if reply._content_consumed:  # read already (not streamed): only the cap applies
        return reply.content[:limit], len(reply.content) <= limit
    raw, parts, got, ended = reply.raw, [], 0, False
    end = time.monotonic() + seconds
    try:
        while got < limit and (left := end - time.monotonic()) > 0:
            sock = getattr(raw.connection, "sock", None)
            if sock is not None:
                sock.settimeout(left if math.isfinite(left) else None)  # None: no deadline
            piece = raw.read1(min(limit - got, 16 << 10), decode_content=True)
            if not piece:
                ended = True
                break
            parts.append(piece)
            got += len(piece)
    except (OSError, requests.RequestException, urllib3.exceptions.HTTPError):
        pass  # what came is what there is
    if not ended:  # the rest may still come: this connection must answer nothing else
        raw.close()
    body = b"".join(parts)
    reply._content, reply._content_consumed = body, True
    return body, ended


def reply_json(reply: requests.Response) -> Any:
    """The reply's body as JSON; ``ValueError`` for one that is not, one nested too
    deeply included: past a thousand levels, 2 KB of brackets, Python's decoder raises
    ``RecursionError``, which no caller took for a body that says nothing."""
    try:
        return reply.json()
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def registry_error(reply: requests.Response, subject: str) -> RegistryError:
    """The error for a reply that is not a success, in the registry's own words.

    ``subject`` says what was asked for (``manifest latest of demo/app``); the
    message adds the OCI error codes and messages, e.g.
    ``MANIFEST_UNKNOWN: manifest unknown``.
    """
    status = reply.status_code
    code, detail = oci_error(reply)
    said = f" ({detail})" if detail else f" (HTTP {status})"
    if status == 404:
        return NotFound(f"{subject}: not found{said}", status=status, code=code)
    if status in (401, 403):
        return AuthError(f"{subject}: access denied{said}", status=status, code=code)
    said = f" ({detail})" if detail else ""  # the status is said already
    if status == 413:  # most often a proxy before the registry capping bodies (nginx: 1 MiB)
        said += ": larger than the registry, or a proxy before it, takes in one request"
    return RegistryError(f"{subject}: HTTP {status}{said}", status=status, code=code)


def oci_error(reply: requests.Response) -> tuple[str | None, str]:
    """The first error code and a ``CODE: message`` summary of an OCI error body (of at
    most ``ERROR_BODY_LIMIT`` bytes, read within ``ERROR_BODY_SECONDS``)."""
    capped_body(reply, ERROR_BODY_LIMIT, ERROR_BODY_SECONDS)
    try:
        errors = reply_json(reply).get("errors") or []
    except (ValueError, AttributeError):
        return None, ""
    parts: list[str] = []
    code = None
    for error in errors if isinstance(errors, list) else []:
        if not isinstance(error, dict):
            continue
        code = code or error.get("code")
        parts.append(f"{error.get('code', '?')}: {error.get('message', '')}".rstrip(": "))
    return code, "; ".join(parts)
