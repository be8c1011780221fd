"""The OCI distribution client: one pooled HTTP session per registry, mirrors first.

Reads (manifests, blob ranges) go to each mirror in order, then to the
upstream, as containerd's ``hosts.toml`` and ``registries.conf`` mirrors do;
a mirror that fails is skipped for a while so a dead mirror costs one
timeout, not one per chunk. Writes (push) go to the upstream only.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from blockstore.errors import (
    AuthError,
    BlobReadError,
    RegistryError,
    RegistryUnreachable,
    UsageError,
)
from blockstore.registry.credentials import Credentials, credentials_for
from blockstore.registry.endpoint import Body, Endpoint, describe_failure
from blockstore.registry.mediatypes import MANIFEST_ACCEPT
from blockstore.registry.options import RegistryOptions
from blockstore.registry.ranges import check_partial_reply, range_header, slice_stream
from blockstore.registry.replies import registry_error
from blockstore.registry.retry import RetryClock, RetryPolicy

log = logging.getLogger(__name__)

MAX_SMALL_BODY = 4 << 20
"""Manifests and configs are a few KiB; a larger reply is refused, not buffered."""
STREAM_CHUNK = 256 << 10
STREAM_PIECE = 32 << 10
"""Pieces of a streamed range: one cache chunk, so each can be served as it lands."""
TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)
"""What reading a reply's body raises when the connection breaks."""
MIRROR_COOLDOWN = 30.0
"""Seconds a mirror that failed is left out before it is tried again."""


@dataclass(frozen=True)
class ManifestReply:
    raw: bytes
    digest_header: str | None
    """``Docker-Content-Digest`` as the registry sent it, to be checked by the caller."""


class RegistryClient:
    """A client of one registry (and its mirrors); safe to share between threads."""

    def __init__(self, registry: str, options: RegistryOptions | None = None):
        self.registry = registry
        self.options = options = options or RegistryOptions()
        self._session = requests.Session()
        # Proxies, netrc and CA bundles from the environment would change where
        # requests go and with which credentials behind our back.
        self._session.trust_env = False
        self._session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=16))
        self._session.mount("https://", HTTPAdapter(pool_connections=4, pool_maxsize=16))
        if options.ca_file and not os.path.isfile(options.ca_file):
            raise UsageError(f"CA file {options.ca_file} does not exist")
        self._verify = options.ca_file or system_ca_bundle()
        self.retry_policy = RetryPolicy(
            max_attempts=options.max_attempts, budget=options.retry_budget
        )
        self.upstream = self._endpoint(
            registry,
            credentials_for(registry, username=options.username, password=options.password),
            self.retry_policy,
        )
        # A mirror gets one quick retry: when it fails the upstream is next.
        mirror_policy = RetryPolicy(max_attempts=min(2, options.max_attempts), budget=5.0)
        self.mirrors = [
            self._endpoint(
                mirror,
                credentials_for(host_of(mirror), use_environment=False),
                mirror_policy,
                is_mirror=True,
            )
            for mirror in options.mirrors
        ]
        self._mirror_down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self._session.close()

    def _endpoint(
        self,
        name: str,
        credentials: Credentials | None,
        policy: RetryPolicy,
        *,
        is_mirror: bool = False,
    ) -> Endpoint:
        return Endpoint(
            host_of(name),
            base_url(name, self.options.insecure),
            self._session,
            credentials=credentials,
            verify=self._verify,
            timeout=self.options.timeout,
            policy=policy,
            is_mirror=is_mirror,
        )

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Reads: mirrors first, then the upstream.

    def get_manifest(self, repository: str, reference: str) -> ManifestReply:
        """The raw manifest or index for a tag or digest (its digest not yet checked)."""
        separator = "@" if ":" in reference else ":"
        subject = f"image {self.registry}/{repository}{separator}{reference}"
        path = f"/v2/{repository}/manifests/{reference}"
        raw, headers = self._pull_whole(repository, path, subject, {"Accept": MANIFEST_ACCEPT})
        return ManifestReply(raw, headers.get("Docker-Content-Digest"))

    def get_blob(self, repository: str, digest: str) -> bytes:
        """A whole small blob (an image config); the caller checks its digest."""
        subject = f"blob {digest} of {self.registry}/{repository}"
        return self._pull_whole(repository, f"/v2/{repository}/blobs/{digest}", subject)[0]

    def read_blob_range(
        self, repository: str, digest: str, first: int, last: int, size: int
    ) -> bytes:
        """Bytes ``first..last`` (inclusive) of a blob of ``size`` bytes.

        A 206 must carry exactly the span asked for; a 200 (Range ignored) is
        streamed and sliced without holding the blob. Transport failures in
        the body raise ``BlobReadError``; the caller decides to retry.
        """
        subject = f"blob {digest} of {self.registry}/{repository}"
        headers = {"Range": range_header(first, last), "Accept-Encoding": "identity"}
        path = f"/v2/{repository}/blobs/{digest}"
        with self._pull("GET", repository, path, subject, headers=headers, stream=True) as reply:
            try:
                if reply.status_code == 206:
                    check_partial_reply(reply.headers.get("Content-Range"), first, last, size)
                    want = last - first + 1
                    data = read_body(reply, want)
                    if len(data) != want:
                        raise BlobReadError(
                            f"{subject}: asked for {want} bytes at {first}, got {len(data)}"
                        )
                    return data
                log.debug(
                    "%s ignored Range: streaming %d bytes to reach %d", self.registry, size, first
                )
                return slice_stream(reply.iter_content(STREAM_CHUNK), first, last)
            except BlobReadError:
                raise
            except TRANSPORT_ERRORS as exc:
                raise BlobReadError(
                    f"{subject}: reading bytes {first}-{last} failed: {describe_failure(exc)}"
                ) from None

    def stream_blob_range(
        self, repository: str, digest: str, first: int, last: int, size: int
    ) -> Iterator[bytes]:
        """Bytes ``first..last`` (inclusive) as they arrive, in pieces of at most 32 KiB.

        Checked as ``read_blob_range`` checks them; the caller counts what
        it got, so a body cut short shows as too few bytes (or a
        ``BlobReadError``) and the caller may ask again for the rest.
        """
        subject = f"blob {digest} of {self.registry}/{repository}"
        headers = {"Range": range_header(first, last), "Accept-Encoding": "identity"}
        path = f"/v2/{repository}/blobs/{digest}"
        with self._pull("GET", repository, path, subject, headers=headers, stream=True) as reply:
            try:
                if reply.status_code != 206:  # Range ignored: one slice, bounded by the range
                    yield slice_stream(reply.iter_content(STREAM_CHUNK), first, last)
                    return
                check_partial_reply(reply.headers.get("Content-Range"), first, last, size)
                yield from reply.iter_content(STREAM_PIECE)
            except TRANSPORT_ERRORS as exc:
                raise BlobReadError(
                    f"{subject}: reading bytes {first}-{last} failed: {describe_failure(exc)}"
                ) from None

    # Writes: the upstream only.

    def blob_exists(self, repository: str, digest: str) -> bool:
        with self._push("HEAD", repository, f"/v2/{repository}/blobs/{digest}") as reply:
            if reply.status_code == 404:
                return False
            if reply.status_code != 200:
                raise registry_error(
                    reply, f"checking blob {digest} in {self.registry}/{repository}"
                )
            return True

    def upload_blob(self, repository: str, digest: str, body: bytes | Path) -> None:
        """Upload a blob in one PUT (a monolithic upload), skipping it if already there."""
        if self.blob_exists(repository, digest):
            return
        subject = f"uploading blob {digest} to {self.registry}/{repository}"
        with self._push("POST", repository, f"/v2/{repository}/blobs/uploads/") as reply:
            if reply.status_code != 202 or "Location" not in reply.headers:
                raise registry_error(reply, subject)
            location = reply.headers["Location"]
        separator = "&" if "?" in location else "?"
        target = location + separator + urlencode({"digest": digest})
        if "://" not in target:
            target = self.upstream.base_url + target
        headers = {"Content-Type": "application/octet-stream"}
        with self._push("PUT", repository, target, headers=headers, body=body) as reply:
            if reply.status_code != 201:
                raise registry_error(reply, subject)

    def put_manifest(
        self, repository: str, reference: str, raw: bytes, media_type: str
    ) -> str | None:
        """Store a manifest under a tag or digest; returns the registry's digest for it."""
        headers = {"Content-Type": media_type}
        path = f"/v2/{repository}/manifests/{reference}"
        with self._push("PUT", repository, path, headers=headers, body=raw) as reply:
            if reply.status_code != 201:
                raise registry_error(
                    reply, f"pushing manifest {reference} to {self.registry}/{repository}"
                )
            return reply.headers.get("Docker-Content-Digest")

    # Plumbing.

    def _push(
        self,
        method: str,
        repository: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: Body = None,
    ) -> requests.Response:
        scope = f"repository:{repository}:pull,push"
        return self.upstream.request(method, path, scope=scope, headers=headers, body=body)

    def _pull(
        self,
        method: str,
        repository: str,
        path: str,
        subject: str,
        *,
        headers: dict[str, str] | None = None,
        stream: bool = False,
    ) -> requests.Response:
        """The first successful reply among the mirrors, in order, then the upstream.

        A mirror's failure (unreachable, refused, not found, 5xx) is logged
        and the next one is tried; the upstream's failure is raised.
        """
        scope = f"repository:{repository}:pull"
        for endpoint in self._read_endpoints():
            try:
                reply = endpoint.request(method, path, scope=scope, headers=headers, stream=stream)
            except (RegistryUnreachable, AuthError) as exc:
                if not endpoint.is_mirror:
                    raise
                self._mirror_failed(endpoint, str(exc), down=True)
                continue
            if 200 <= reply.status_code < 300:
                return reply
            if endpoint.is_mirror:
                # Not-found is the mirror lacking one object, not the mirror being down.
                down = reply.status_code != 404
                self._mirror_failed(endpoint, f"HTTP {reply.status_code} for {subject}", down=down)
                reply.close()
                continue
            with reply:
                raise registry_error(reply, subject)
        raise AssertionError("the upstream, always last, returns or raises")

    def _pull_whole(
        self, repository: str, path: str, subject: str, headers: dict[str, str] | None = None
    ) -> tuple[bytes, CaseInsensitiveDict]:
        """A small body (manifest, config) read whole, tried again if it breaks off."""
        clock = RetryClock(self.retry_policy)
        while True:
            clock.start_attempt()
            with self._pull(
                "GET", repository, path, subject, headers=headers, stream=True
            ) as reply:
                try:
                    data = read_body(reply, MAX_SMALL_BODY)
                except TRANSPORT_ERRORS as exc:
                    if clock.wait_before_next():
                        continue
                    raise RegistryUnreachable(
                        f"{subject}: the connection broke while reading it "
                        f"({describe_failure(exc)})"
                    ) from None
                if len(data) > MAX_SMALL_BODY:
                    raise RegistryError(f"{subject}: larger than {MAX_SMALL_BODY} bytes, refused")
                return data, reply.headers

    def _read_endpoints(self) -> Iterator[Endpoint]:
        now = time.monotonic()
        with self._lock:
            down = dict(self._mirror_down_until)
        for mirror in self.mirrors:
            if down.get(mirror.host, 0.0) <= now:
                yield mirror
        yield self.upstream

    def _mirror_failed(self, mirror: Endpoint, why: str, *, down: bool) -> None:
        if down:
            with self._lock:
                self._mirror_down_until[mirror.host] = time.monotonic() + MIRROR_COOLDOWN
        log.warning("mirror %s failed, trying the next: %s", mirror.host, why)


def read_body(reply: requests.Response, limit: int) -> bytes:
    """The body, or its first ``limit + 1`` bytes when it is longer than ``limit``.

    Read through requests so that a body read to its end hands the
    connection back to the pool (keep-alive); one left unread is closed.
    """
    parts: list[bytes] = []
    got = 0
    for chunk in reply.iter_content(STREAM_CHUNK):
        parts.append(chunk)
        got += len(chunk)
        if got > limit:
            break
    return b"".join(parts)[: limit + 1]


def host_of(registry: str) -> str:
    """``https://mirror:5000/`` -> ``mirror:5000``."""
    return registry.split("://", 1)[-1].rstrip("/")


def base_url(registry: str, insecure: bool) -> str:
    """The URL of a registry named ``host[:port]`` or ``scheme://host[:port]``."""
    if "://" in registry:
        return registry.rstrip("/")
    return f"{'http' if insecure else 'https'}://{registry}"


def system_ca_bundle() -> str | bool:
    """The system CA bundle (not certifi's copy), for registries with public certificates."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.exists(candidate):
            return candidate
    return True
