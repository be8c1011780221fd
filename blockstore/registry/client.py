"""The OCI distribution client: one pooled HTTP session per registry, mirrors first.

Reads (manifests, blob ranges) go to each mirror in order, then to the
upstream, as containerd's ``hosts.toml`` and ``registries.conf`` mirrors do;
a mirror that fails in any way (no reply, an error status, a body cut short
or of the wrong range) is left out for a while and the next source is used
at once, so a dead or broken mirror costs one attempt, not one per chunk.
Writes (push) go to the upstream only. Each operation has one retry policy
and one deadline (``retry.py``) that all of its attempts share.
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import urllib3
from requests.structures import CaseInsensitiveDict

from blockstore.errors import (
    BlobReadError,
    BlockstoreError,
    IntegrityError,
    LoginRefused,
    NotFound,
    RegistryError,
    RegistryUnreachable,
    StorageRefused,
    UsageError,
)
from blockstore.logformat import without_url_secrets
from blockstore.registry.credentials import Credentials, credentials_for
from blockstore.registry.digests import check_digest
from blockstore.registry.endpoint import Body, Endpoint, describe_failure, local_shortage
from blockstore.registry.mediatypes import MANIFEST_ACCEPT, OCI_INDEX
from blockstore.registry.options import RegistryOptions
from blockstore.registry.ranges import (
    check_blob_reply,
    parse_content_range,
    range_header,
    slice_stream,
)
from blockstore.registry.reference import is_tag
from blockstore.registry.replies import registry_error
from blockstore.registry.retry import (
    RETRIABLE_STATUS,
    Deadline,
    RetryPolicy,
    TryAgain,
    parse_retry_after,
    with_retries,
)
from blockstore.registry.transport import pooled_session, url_host

log = logging.getLogger(__name__)

# Connections kept per host: as many as reads run at once in a process serving a few
# layers (each fetcher's twelve workers, readahead, span fetches). A connection past
# it is closed after its one request, with a warning from urllib3.
POOL_SIZE = 64

MAX_SMALL_BODY = 4 << 20
"""Manifests and configs are a few KiB; a larger reply is refused, not buffered (the
distribution spec suggests registries accept manifests of at least 4 MiB)."""
STREAM_CHUNK = 256 << 10
SHORT_RANGE_PIECES = 64
"""Replies a range read takes from a registry that serves less than it is asked for
(one that sends a few bytes each time would make a chunk thousands of requests)."""
TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)
"""What reading a reply's body raises when the connection breaks."""
MAX_REFERRER_PAGES = 16
"""Pages of a referrers listing followed; a registry linking on and on is refused."""
MAX_URLS_SHOWN = 3
"""A foreign layer's URLs an error names."""
HEAD_REFUSED = frozenset({401, 403, 404, 405})
"""What registries answer a HEAD of a blob they serve on GET with: Harbor's proxy cache a
404 for a blob it fetches upstream on GET, ECR Public a 401 or 403 for every HEAD, storage
a 403 for a URL the registry signed for GET alone."""
MIRROR_COOLDOWN = 30.0
"""Seconds a mirror that failed is left out before it is tried again."""
STORED = frozenset({200, 201, 202, 204})
"""Statuses a registry says a manifest or blob was stored with: the spec's 201, or
another success (Quay's 202 for a manifest), which docker and containerd take too."""
UPLOAD_LOST = frozenset({"BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN"})
"""The distribution spec's codes for an upload the registry will not complete."""
CANCEL_SECONDS = 5.0
"""How long cancelling a failed upload may take: it only saves the registry space."""
T = TypeVar("T")


@dataclass(frozen=True)
class ManifestReply:
    raw: bytes
    digest_header: str | None
    """``Docker-Content-Digest`` as the registry sent it, to be checked by the caller."""


@dataclass(frozen=True)
class ManifestPut:
    digest: str | None
    """``Docker-Content-Digest``: the registry's digest of the manifest stored."""
    subject: str | None
    """``OCI-Subject``: the subject a registry with the referrers API lists it under;
    None where the registry does not, and the client keeps the referrers tag."""


_PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----"
)


class RegistryClient:
    """A client of one registry (and its mirrors); safe to share between threads."""

    def __init__(
        self,
        registry: str,
        options: RegistryOptions | None = None,
        *,
        repository: str | None = None,
    ):
        """``repository``: the one the client is for, which picks the login among those
        an auth file keeps for namespaces of the registry (``podman login host/org``)."""
        self.registry = registry
        self.options = options = options or RegistryOptions()
        if options.ca_file and not os.path.isfile(options.ca_file):
            raise UsageError(f"CA file {options.ca_file} does not exist")
        extra_cas = _pem_certificates(Path(options.ca_file)) if options.ca_file else None
        self._session = pooled_session(POOL_SIZE, extra_cas)
        self._verify = system_ca_bundle()
        self.policy = RetryPolicy(max_attempts=options.max_attempts)
        self.upstream = self._endpoint(
            registry,
            credentials_for(
                registry, repository, username=options.username, password=options.password
            ),
        )
        self.mirrors = [
            self._endpoint(
                mirror,
                credentials_for(host_of(mirror), repository, use_environment=False),
                is_mirror=True,
            )
            for mirror in options.mirrors
        ]
        self._mirror_down_until: dict[str, float] = {}
        self._foreign: dict[str, tuple[str, ...]] = {}
        """Foreign layers' URLs by digest, as manifests resolved with this client name them."""
        self._lock = threading.Lock()

    def close(self) -> None:
        self._session.close()

    def note_foreign(self, digest: str, urls: Sequence[str]) -> None:
        """Keep that ``digest`` is a foreign layer a manifest says is had from ``urls``:
        a registry need not hold it, and its 404 for the blob then says so."""
        with self._lock:
            self._foreign[digest] = tuple(urls)

    def _foreign_not_found(self, digest: str, exc: NotFound) -> NotFound:
        """``exc`` naming the URLs of a foreign layer, for a 404 of its blob."""
        with self._lock:
            urls = self._foreign.get(digest)
        if not urls:
            return exc
        shown = ", ".join(urls[:MAX_URLS_SHOWN]) + (", ..." if len(urls) > MAX_URLS_SHOWN else "")
        return NotFound(
            f"{exc}; it is a foreign layer, which a registry need not hold, and its manifest "
            f"names where it is had: {shown} (this engine reads layers from the registry only)",
            status=exc.status,
            code=exc.code,
        )

    def _endpoint(
        self, name: str, credentials: Credentials | None, *, is_mirror: bool = False
    ) -> Endpoint:
        return Endpoint(
            host_of(name),
            base_url(name, self.options.insecure),
            self._session,
            credentials=credentials,
            verify=self._verify,
            insecure=self.options.insecure,
            is_mirror=is_mirror,
        )

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def deadline(self) -> Deadline:
        """A new deadline for one read: ``options.timeout`` from now."""
        return Deadline(self.options.timeout)

    # Reads: mirrors first, then the upstream.

    def get_manifest(self, repository: str, reference: str) -> ManifestReply:
        """The raw manifest or index for a tag or digest (its digest not yet checked)."""
        separator = "@" if ":" in reference else ":"
        subject = f"image {self.registry}/{repository}{separator}{reference}"
        path = f"/v2/{repository}/manifests/{reference}"

        def hashes_as_said(raw: bytes, headers: CaseInsensitiveDict) -> None:
            # Here, per source: a mirror whose bytes are not what it (or the reference)
            # names is left out for the next source, not taken for the image's fault.
            said = reference if ":" in reference else digest_said(headers)
            if said:
                check_digest(raw, said, f"{subject} from {self.registry}")

        raw, headers = self._pull_whole(
            repository, path, subject, {"Accept": MANIFEST_ACCEPT}, check=hashes_as_said
        )
        return ManifestReply(raw, digest_said(headers))

    def blob_size(self, repository: str, digest: str, expected: int | None = None) -> int | None:
        """The blob's size as the registry stores it (a HEAD's Content-Length), or None
        when the registry does not say. A mirror that says other than ``expected`` (the
        manifest's) is left out for the next source; the upstream's word is returned.

        A HEAD refused (``HEAD_REFUSED``), or saying 0 bytes where the manifest says
        more, is asked again as a GET of the blob's first byte, whose answer is taken:
        some registries refuse a HEAD of a blob they serve, and some proxies write a
        HEAD's length as 0. A HEAD refused for its login (``LoginRefused``) is not: the
        GET would ask for the same login, to be refused alike."""
        subject = f"blob {digest} of {self.registry}/{repository}"
        path = f"/v2/{repository}/blobs/{digest}"
        deadline = self.deadline()

        def judged(endpoint: Endpoint, size: int | None) -> int | None:
            if endpoint.is_mirror and None not in (size, expected) and size != expected:
                raise IntegrityError(f"{subject}: {size} bytes, the manifest says {expected}")
            return size

        def head(endpoint: Endpoint) -> int | None:
            with self._get(endpoint, repository, path, subject, None, deadline, "HEAD") as reply:
                size = content_length(reply.headers)
            if size == 0 and expected:
                # A proxy that dropped a HEAD's length may write 0 in its place; a GET
                # says what the blob really holds.
                return first_byte(endpoint)
            return judged(endpoint, size)

        def first_byte(endpoint: Endpoint) -> int | None:
            headers = {"Range": range_header(0, 0), "Accept-Encoding": "identity"}
            with self._get(endpoint, repository, path, subject, headers, deadline) as reply:
                if reply.status_code != 206:  # Range ignored: the whole blob's length
                    return judged(endpoint, content_length(reply.headers))
                try:
                    size = parse_content_range(reply.headers["Content-Range"])[2]
                except (KeyError, ValueError):
                    size = None
                return judged(endpoint, size)

        try:
            try:
                return self._read(subject, deadline, head)
            except LoginRefused:
                raise  # the login, not the HEAD: a GET would be refused alike
            except RegistryError as refused:
                if refused.status not in HEAD_REFUSED and not isinstance(refused, StorageRefused):
                    raise
                log.info("%s: HEAD refused, asking its first byte: %s", subject, refused)
                return self._read(subject, deadline, first_byte)
        except NotFound as exc:
            raise self._foreign_not_found(digest, exc) from None

    def list_tags(self, repository: str, limit: int = 100) -> list[str]:
        """The first ``limit`` tags of ``repository`` (one page, in the registry's order):
        what a mistyped tag is told it could have been. Only strings that are tags: a
        registry's other text (a newline, a terminal's escapes) is never shown."""
        subject = f"tags of {self.registry}/{repository}"
        path = f"/v2/{repository}/tags/list?{urlencode({'n': limit})}"
        raw, _ = self._pull_whole(repository, path, subject)
        try:
            tags = json.loads(raw).get("tags")
        except (ValueError, AttributeError, RecursionError):
            raise RegistryError(f"{subject}: not a tag list") from None
        return [tag for tag in tags or [] if isinstance(tag, str) and is_tag(tag)][:limit]

    def get_blob(
        self, repository: str, digest: str, what: str = "blob", *, limit: int = MAX_SMALL_BODY
    ) -> bytes:
        """A whole blob of at most ``limit`` bytes (``what``: an image config, an
        artifact's), held in memory and checked against ``digest`` from each source (a
        mirror whose bytes differ is left out for the next)."""
        subject = f"{what} {digest} of {self.registry}/{repository}"
        path = f"/v2/{repository}/blobs/{digest}"
        return self._pull_whole(
            repository,
            path,
            subject,
            check=lambda raw, _: check_digest(raw, digest, subject),
            limit=limit,
        )[0]

    def read_blob_range(
        self,
        repository: str,
        digest: str,
        first: int,
        last: int,
        size: int,
        *,
        deadline: Deadline | None = None,
        upstream_only: bool = False,
    ) -> bytes:
        """Bytes ``first..last`` (inclusive) of a blob of ``size`` bytes, within ``deadline``
        (default: the options' timeout from now), every attempt included.

        A 206 must start with the span asked for (the reply is read no further); one
        that ends early (a CDN that caps the ranges it serves) is taken, and the rest
        asked for, at most ``SHORT_RANGE_PIECES`` times. A 200 (Range ignored) is
        streamed and sliced without holding the blob. A body cut short, of the wrong
        range, or slower than the deadline is tried again (from the next source, if a
        mirror sent it); every failure in the end is a ``BlockstoreError`` naming its
        cause.
        """
        deadline = deadline or self.deadline()
        parts = []
        at = first
        for _ in range(SHORT_RANGE_PIECES):
            piece = self._read_from(repository, digest, at, last, size, deadline, upstream_only)
            parts.append(piece)
            at += len(piece)
            if at > last:
                return b"".join(parts)
        raise BlobReadError(
            f"blob {digest} of {self.registry}/{repository}: bytes {first}-{last} came in "
            f"pieces of {len(parts[0])} bytes or less, more than {SHORT_RANGE_PIECES} of them"
        )

    def _read_from(
        self,
        repository: str,
        digest: str,
        first: int,
        last: int,
        size: int,
        deadline: Deadline,
        upstream_only: bool,
    ) -> bytes:
        """Bytes ``first`` to ``last``, or to where a 206 that ends early ends."""
        subject = f"blob {digest} of {self.registry}/{repository}"
        headers = {"Range": range_header(first, last), "Accept-Encoding": "identity"}
        path = f"/v2/{repository}/blobs/{digest}"

        def attempt(endpoint: Endpoint) -> bytes:
            with self._get(endpoint, repository, path, subject, headers, deadline) as reply:
                end = judged_reply(reply, subject, first, last, size)
                try:
                    if reply.status_code == 206:
                        want = end - first + 1
                        data = b"".join(receive(reply, deadline, subject, want))
                        if len(data) != want:
                            # The body ended before its own Content-Range did: cut off.
                            raise out_of_reach(
                                f"{subject}: asked for {want} bytes at {first}, got {len(data)}"
                            )
                        return data
                    log.debug(
                        "%s ignored Range: streaming %d bytes to reach %d",
                        endpoint.host,
                        size,
                        first,
                    )
                    return sliced_whole(reply, deadline, subject, first, last)
                except BlobReadError as exc:
                    raise TryAgain(exc) from None
                except TRANSPORT_ERRORS as exc:
                    raise TryAgain(body_broken(subject, first, last, exc)) from None

        try:
            return self._read(subject, deadline, attempt, upstream_only=upstream_only)
        except NotFound as exc:
            raise self._foreign_not_found(digest, exc) from None

    def get_referrers(self, repository: str, digest: str) -> list[bytes] | None:
        """The pages of the OCI 1.1 referrers index of a manifest, each a raw index, or
        None where the registry has no referrers API (it answers 404 for the path; with
        the API it answers 200 always). Pages are followed by their ``Link: <...>;
        rel="next"``, at most ``MAX_REFERRER_PAGES`` of them."""
        path: str | None = f"/v2/{repository}/referrers/{digest}"
        subject = f"referrers of {digest} in {self.registry}/{repository}"
        pages: list[bytes] = []
        while path is not None:
            if len(pages) == MAX_REFERRER_PAGES:
                raise RegistryError(f"{subject}: more than {MAX_REFERRER_PAGES} pages, refused")
            try:
                raw, headers = self._pull_whole(repository, path, subject, {"Accept": OCI_INDEX})
            except NotFound:
                if pages:  # the API answered, then lost a page it linked to
                    raise
                return None
            pages.append(raw)
            path = next_page(path, headers.get("Link"))
        return pages

    def stream_blob_range(
        self,
        repository: str,
        digest: str,
        first: int,
        last: int,
        size: int,
        *,
        deadline: Deadline,
        upstream_only: bool = False,
    ) -> Iterator[bytes]:
        """Bytes ``first..last`` (inclusive) as they arrive, from the first source, once.

        Checked as ``read_blob_range`` checks them, but not retried: the
        caller counts what it got and reads the rest with
        ``read_blob_range``, which retries, under the same ``deadline``.
        """
        subject = f"blob {digest} of {self.registry}/{repository}"
        headers = {"Range": range_header(first, last), "Accept-Encoding": "identity"}
        path = f"/v2/{repository}/blobs/{digest}"
        endpoint = next(self._read_endpoints(upstream_only))
        with self._get(endpoint, repository, path, subject, headers, deadline) as reply:
            end = judged_reply(reply, subject, first, last, size)
            try:
                if reply.status_code != 206:  # Range ignored: one slice, bounded by the range
                    yield slice_stream(receive(reply, deadline, subject), first, last)
                    return
                # A 206 that ends early ends the stream there: the caller reads the rest.
                yield from receive(reply, deadline, subject, end - first + 1)
            except BlobReadError:
                raise  # receive's own account (the deadline, a short body): an OSError too
            except TRANSPORT_ERRORS as exc:
                raise body_broken(subject, first, last, exc)  # noqa: B904 (its cause is set on it)

    # Writes: the upstream only.

    def blob_exists(self, repository: str, digest: str) -> bool:
        """Whether the registry holds the blob; not where storage it redirects the HEAD
        to refuses it (a URL signed for GET alone): uploading it again costs time only."""
        try:
            reply = self._push("HEAD", repository, f"/v2/{repository}/blobs/{digest}")
        except StorageRefused as exc:
            log.info("checking blob %s: %s; uploading it", digest, exc)
            return False
        with reply:
            if reply.status_code == 404:
                return False
            if reply.status_code != 200:
                raise registry_error(
                    reply, f"checking blob {digest} in {self.registry}/{repository}"
                )
            return True

    def upload_blob(self, repository: str, digest: str, body: bytes | Path) -> None:
        """Upload a blob in one PUT (a monolithic upload), skipping it if already there.

        Each attempt is an upload of its own (POST, then PUT): a PUT cut short may
        have left part of the blob in its upload, which the registry then will not
        complete (the CNCF registry: 404 ``BLOB_UPLOAD_INVALID``). An upload that
        failed is cancelled, so its part of the blob does not stay in the registry's
        storage until the registry purges old uploads (a week, by default).
        """
        if self.blob_exists(repository, digest):
            return
        subject = f"uploading blob {digest} to {self.registry}/{repository}"
        deadline = Deadline(None, stall=self.options.timeout)

        def upload_once() -> None:
            location = self._start_upload(repository, deadline, subject)
            separator = "&" if "?" in location else "?"
            target = location + separator + urlencode({"digest": digest})
            headers = {"Content-Type": "application/octet-stream"}
            try:
                with self._push_attempt(
                    "PUT", repository, target, deadline, headers, body
                ) as reply:
                    if reply.status_code in STORED:
                        return
                    error = registry_error(reply, subject)
            except Exception:
                self._cancel_upload(repository, location)
                raise
            self._cancel_upload(repository, location)
            if error.code in UPLOAD_LOST:
                raise TryAgain(error)
            raise error

        try:
            with_retries(self.policy, deadline, upload_once, subject)
        except RegistryUnreachable as exc:
            if subject in str(exc):
                raise
            # The link's own words ("connection closed by the server") name no blob: a
            # push of many layers would not say which one it was sending.
            raise type(exc)(f"{subject}: {exc}") from exc

    def _start_upload(self, repository: str, deadline: Deadline, subject: str) -> str:
        """A new upload's URL: its ``Location`` (absolute, or relative to the host or to
        the uploads path; with a query or without), made absolute."""
        path = f"/v2/{repository}/blobs/uploads/"
        with self._push_attempt("POST", repository, path, deadline) as reply:
            if reply.status_code != 202 or "Location" not in reply.headers:
                raise registry_error(reply, subject)
            # A URI reference, resolved against the POST's URL as RFC 3986 has it.
            location = urljoin(self.upstream.base_url + path, reply.headers["Location"])
        over_tls = urlsplit(self.upstream.base_url).scheme == "https"
        if over_tls and urlsplit(location).scheme == "http" and not self.options.insecure:
            # The blob would cross the network unencrypted: a registry behind a proxy that
            # ends TLS, not told its clients use HTTPS, names its own address so.
            raise RegistryError(
                f"{subject}: the registry gave a plain-HTTP upload URL "
                f"({url_host(location)}), refused: the blob would go unencrypted. A "
                "registry behind a TLS proxy must be told its clients use HTTPS "
                "(X-Forwarded-Proto, or the registry's relativeurls setting)"
            )
        return location

    def _cancel_upload(self, repository: str, location: str) -> None:
        """Cancel an upload that failed (the distribution spec's DELETE of its URL), once
        and briefly: the registry purges it in time anyway, so any failure here is
        only logged, and never hides the upload's own. The CNCF registry refuses
        it (404 ``BLOB_UPLOAD_INVALID``) for an upload that took part of a body,
        whose URL's state no longer matches; that part stays until its purge."""
        deadline = Deadline(CANCEL_SECONDS, stall=CANCEL_SECONDS)
        shown = without_url_secrets(location)  # its query may be signed
        try:
            with self._push_attempt("DELETE", repository, location, deadline) as reply:
                if reply.status_code not in (200, 202, 204, 404):
                    log.info("cancelling upload %s: HTTP %s", shown, reply.status_code)
        except Exception as exc:  # best effort: logged
            log.info("cancelling upload %s failed: %s", shown, exc)

    def put_manifest(
        self, repository: str, reference: str, raw: bytes, media_type: str
    ) -> ManifestPut:
        """Store a manifest under a tag or digest; what the registry said of it."""
        headers = {"Content-Type": media_type}
        path = f"/v2/{repository}/manifests/{reference}"
        with self._push("PUT", repository, path, headers=headers, body=raw) as reply:
            if reply.status_code not in STORED:
                raise registry_error(
                    reply, f"pushing manifest {reference} to {self.registry}/{repository}"
                )
            return ManifestPut(
                digest_said(reply.headers), digest_said(reply.headers, "OCI-Subject")
            )

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
        """One write to the upstream, retried on no reply, 5xx and 429.

        An upload lasts as long as its blob needs, so it has no overall
        deadline: each receive has the timeout, and attempts are bounded.
        """
        deadline = Deadline(None, stall=self.options.timeout)
        return with_retries(
            self.policy,
            deadline,
            lambda: self._push_attempt(method, repository, path, deadline, headers, body),
            f"{method} {self.upstream.host}",
        )

    def _push_attempt(
        self,
        method: str,
        repository: str,
        path: str,
        deadline: Deadline,
        headers: dict[str, str] | None = None,
        body: Body = None,
    ) -> requests.Response:
        """One attempt at a write to the upstream: its reply, or ``TryAgain`` for no reply,
        a 5xx or a 429."""
        scope = f"repository:{repository}:pull,push"
        reply = self.upstream.request(
            method, path, scope=scope, deadline=deadline, headers=headers, body=body
        )
        if reply.status_code in RETRIABLE_STATUS:
            with reply:
                raise TryAgain(
                    registry_error(reply, f"{method} {self.registry}/{repository}"),
                    parse_retry_after(reply.headers.get("Retry-After")),
                )
        return reply

    def _get(
        self,
        endpoint: Endpoint,
        repository: str,
        path: str,
        subject: str,
        headers: dict[str, str] | None,
        deadline: Deadline,
        method: str = "GET",
    ) -> requests.Response:
        """A streamed read's reply if it is a success; else its error (``TryAgain`` for
        the statuses another attempt may cure)."""
        scope = f"repository:{repository}:pull"
        reply = endpoint.request(
            method, path, scope=scope, deadline=deadline, headers=headers, stream=True
        )
        if 200 <= reply.status_code < 300:
            return reply
        with reply:
            error = registry_error(reply, subject)
            if reply.status_code in RETRIABLE_STATUS:
                raise TryAgain(error, parse_retry_after(reply.headers.get("Retry-After")))
            raise error

    def _read(
        self,
        subject: str,
        deadline: Deadline,
        attempt: Callable[[Endpoint], T],
        *,
        upstream_only: bool = False,
    ) -> T:
        """``attempt`` on the first source that serves it, under the one retry policy.

        A mirror that fails (no reply, refused, 5xx, a broken body) is left
        out for ``MIRROR_COOLDOWN`` and the next source is tried at once; a
        mirror that lacks the object (404) is passed over but stays in use.
        The upstream's failures are retried, then raised.
        """

        def from_first_source() -> T:
            for endpoint in self._read_endpoints(upstream_only):
                if not endpoint.is_mirror:
                    return attempt(endpoint)
                try:
                    return attempt(endpoint)
                except NotFound as exc:
                    log.info("mirror %s lacks it, trying the next: %s", endpoint.host, exc)
                except TryAgain as exc:
                    self._mirror_failed(endpoint, str(exc.error))
                except BlockstoreError as exc:
                    self._mirror_failed(endpoint, str(exc))
            raise AssertionError("the upstream, always last, returns or raises")

        return with_retries(self.policy, deadline, from_first_source, subject)

    def _pull_whole(
        self,
        repository: str,
        path: str,
        subject: str,
        headers: dict[str, str] | None = None,
        *,
        check: Callable[[bytes, CaseInsensitiveDict], None] | None = None,
        limit: int = MAX_SMALL_BODY,
    ) -> tuple[bytes, CaseInsensitiveDict]:
        """A body of at most ``limit`` bytes (manifest, config) read whole, tried again if
        it breaks off; ``check`` judges each source's answer (raising fails that source)."""
        deadline = self.deadline()

        def attempt(endpoint: Endpoint) -> tuple[bytes, CaseInsensitiveDict]:
            with self._get(endpoint, repository, path, subject, headers, deadline) as reply:
                try:
                    data = b"".join(receive(reply, deadline, subject, limit + 1))
                except BlobReadError as exc:  # before TRANSPORT_ERRORS: it is an OSError
                    raise TryAgain(RegistryUnreachable(str(exc))) from None
                except TRANSPORT_ERRORS as exc:
                    raise TryAgain(
                        RegistryUnreachable(
                            f"{subject}: the connection broke while reading it "
                            f"({describe_failure(exc)})"
                        )
                    ) from None
                if len(data) > limit:
                    raise RegistryError(f"{subject}: larger than {limit} bytes, refused")
                if check is not None:
                    check(data, reply.headers)
                return data, reply.headers

        return self._read(subject, deadline, attempt)

    def _read_endpoints(self, upstream_only: bool = False) -> Iterator[Endpoint]:
        now = time.monotonic()
        with self._lock:
            down = dict(self._mirror_down_until)
        for mirror in [] if upstream_only else self.mirrors:
            if down.get(mirror.host, 0.0) <= now:
                yield mirror
        yield self.upstream

    def _mirror_failed(self, mirror: Endpoint, why: str) -> None:
        with self._lock:
            self._mirror_down_until[mirror.host] = time.monotonic() + MIRROR_COOLDOWN
        log.warning("mirror %s failed, left out for %.0fs: %s", mirror.host, MIRROR_COOLDOWN, why)


def receive(
    reply: requests.Response, deadline: Deadline, subject: str, limit: int | None = None
) -> Iterator[bytes]:
    """The body as it arrives, up to ``limit`` bytes, all of it within ``deadline``.

    One receive at a time, with the socket's timeout set to the time left
    before each: a server that trickles a byte every few seconds never
    resets the clock, as a per-receive timeout would let it. Raises
    ``BlobReadError`` when the deadline passes. A body read to its end hands
    the connection back to the pool (keep-alive); one left unread is closed.
    """
    raw = reply.raw
    got = 0
    while limit is None or got < limit:
        if deadline.expired:
            raise out_of_reach(
                f"{subject}: the reply did not arrive within {deadline.seconds:g}s "
                f"({got} bytes came)"
            )
        sock = getattr(raw.connection, "sock", None)
        if sock is not None:
            sock.settimeout(deadline.receive_timeout())
        want = STREAM_CHUNK if limit is None else min(STREAM_CHUNK, limit - got)
        piece = raw.read1(want, decode_content=True)
        if not piece:
            return
        got += len(piece)
        yield piece


def sliced_whole(
    reply: requests.Response, deadline: Deadline, subject: str, first: int, last: int
) -> bytes:
    """Bytes ``first..last`` of a reply sending the whole blob (Range ignored). One with no
    ``Content-Length`` that ends before ``last`` was cut off (nothing else tells a body
    with no length cut short): the registry out of reach, as a 206 cut short is."""
    try:
        return slice_stream(receive(reply, deadline, subject), first, last)
    except BlobReadError as exc:
        if exc.__cause__ is not None:  # the deadline passed: said with its cause
            raise
        raise out_of_reach(f"{subject}: {exc}")  # noqa: B904 (its cause is the link)


def judged_reply(reply: requests.Response, subject: str, first: int, last: int, size: int) -> int:
    """``check_blob_reply`` of a reply to a range read of ``subject``, its refusal naming
    the blob and the registry (``TryAgain``: another attempt may be answered right)."""
    try:
        return check_blob_reply(reply.status_code, reply.headers, first, last, size)
    except BlobReadError as exc:
        message = f"{subject}: {exc}"
        error = BlobReadError(message)
        error.__cause__ = RegistryError(message)  # the registry's answer, refused
        raise TryAgain(error) from None


def out_of_reach(message: str) -> BlobReadError:
    """A blob read the registry did not answer in full: ``EIO`` for a reader, caused by
    the registry being out of reach, as a request that got no reply at all is, so a
    command ends with that code (a prefetch's timeout mid-body, 5), not a read's."""
    error = BlobReadError(message)
    error.__cause__ = RegistryUnreachable(message)
    return error


def body_broken(subject: str, first: int, last: int, exc: BaseException) -> BlobReadError:
    """Bytes ``first..last`` of a blob whose body the link broke off (reset, closed,
    timed out): the registry out of reach, unless this machine ran short of something
    (``local_shortage``), which is no fault of the registry's."""
    message = f"{subject}: reading bytes {first}-{last} failed: {describe_failure(exc)}"
    return BlobReadError(message) if local_shortage(exc) else out_of_reach(message)


def digest_said(headers: CaseInsensitiveDict, name: str = "Docker-Content-Digest") -> str | None:
    """The digest header ``name`` (``Docker-Content-Digest``, ``OCI-Subject``) without the
    whitespace around it, which is no part of a header's value (RFC 9110): a proxy that
    leaves a space after it does not make the manifest, or the subject, another's."""
    said = headers.get(name)
    return said.strip() if said is not None else None


def content_length(headers: CaseInsensitiveDict) -> int | None:
    """A reply's ``Content-Length``, or None where it has none that is a number."""
    length = headers.get("Content-Length", "")
    return int(length) if length.isascii() and length.isdigit() else None


def next_page(path: str, link: str | None) -> str | None:
    """The ``rel="next"`` target of a ``Link`` header, resolved against ``path``: its path
    and query only, asked of the same registry (an absolute link to another host or
    scheme, plain HTTP say, is not followed there)."""
    for target in requests.utils.parse_header_links(link or ""):
        if target.get("rel") == "next" and target.get("url"):
            parts = urlsplit(urljoin(path, target["url"]))
            return parts.path + (f"?{parts.query}" if parts.query else "")
    return None


def host_of(registry: str) -> str:
    """``https://mirror:5000/`` -> ``mirror:5000``."""
    return registry.split("://", 1)[-1].rstrip("/")


def base_url(registry: str, insecure: bool) -> str:
    """The URL of a registry named ``host[:port]`` or ``scheme://host[:port]``."""
    if "://" in registry:
        return registry.rstrip("/")
    return f"{'http' if insecure else 'https'}://{registry}"


def _pem_certificates(path: Path) -> str:
    """The PEM certificates of a CA file, without what may lie between them (comments,
    keys, text not in ASCII, which OpenSSL's loader of PEM text refuses)."""
    text = path.read_bytes().decode("ascii", errors="replace")
    return "\n".join(_PEM_CERTIFICATE.findall(text))


def system_ca_bundle() -> str | bool:
    """The system CA bundle (not certifi's copy), for registries with public certificates."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and os.path.exists(candidate):
            return candidate
    return True
