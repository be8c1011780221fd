"""What a registry's refusal means: its status and its OCI error JSON, as our errors."""

from __future__ import annotations

import requests

from blockstore.errors import AuthError, NotFound, RegistryError


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
    return RegistryError(f"{subject}: HTTP {status}{said}", status=status, code=code)


def oci_error(reply: requests.Response) -> tuple[str | None, str]:
    """The first error code and a ``CODE: message`` summary of an OCI error body."""
    try:
        errors = reply.json().get("errors") or []
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
