"""Artifacts on an image, pushed and read back through the referrers tag schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

import pytest
from rig.fault_proxy import Fault
from rig.processes import QuietHTTPServer
from rig.pushed import push_erofs

from blockstore.errors import IntegrityError, NotFound, RegistryError, UsageError
from blockstore.registry import RegistryClient, RegistryOptions, resolve_image
from blockstore.registry.client import MAX_REFERRER_PAGES
from blockstore.registry.digests import digest_of
from blockstore.registry.manifests import fetch_manifest
from blockstore.registry.mediatypes import OCI_INDEX, OCI_MANIFEST
from blockstore.registry.referrers import (
    MAX_ARTIFACT_BLOB,
    MAX_ARTIFACT_BYTES,
    Referrer,
    Subject,
    fallback_tag,
    list_referrers,
    newest,
    push_artifact,
    read_artifact,
)

ARTIFACT = "application/vnd.blockstore.test-artifact.v1"
BLOB = "application/octet-stream"
CREATED = "2024-01-01T00:00:00Z"


def subject_of(client: RegistryClient, ref: str) -> Subject:
    image = resolve_image(client, ref, None)
    raw = image.manifests[image.manifest_digest]
    return Subject(ref.split("/", 1)[1].rsplit(":", 1)[0], image.manifest_digest, len(raw))


@pytest.fixture
def subject_ref(registry, erofs_images, request) -> str:
    """An image of this test's own repository, so its artifacts meet no other test's."""
    repository = "attached/" + request.node.name.replace("_", "-")[:60].strip("-")
    return push_erofs(registry.host, repository, "v1", [erofs_images.small.path])


def test_an_artifact_blob_over_4_mib_reads_back(registry, subject_ref):
    """A blob one byte over 4 MiB (the cap of manifests and configs) is pushed as an
    artifact and read back whole: artifact blobs are allowed up to MAX_ARTIFACT_BLOB."""
    data = bytes(range(256)) * ((4 << 20) // 256) + b"!"
    with registry.client() as client:
        subject = subject_of(client, subject_ref)
        push_artifact(client, subject, ARTIFACT, [(data, BLOB, {})], created=CREATED)
        referrer = newest(list_referrers(client, subject), ARTIFACT)
        assert referrer is not None
        assert read_artifact(client, subject, referrer) == [(data, BLOB, {})]


def test_an_artifact_blob_over_the_limit_is_refused_before_any_upload(registry, subject_ref):
    """A blob over MAX_ARTIFACT_BLOB, which no reader would take, is refused up front with
    a usage error saying its size and the limit; nothing of the artifact is uploaded."""
    small, big = b"first", b"\0" * (MAX_ARTIFACT_BLOB + 1)
    with registry.client() as client:
        subject = subject_of(client, subject_ref)
        with pytest.raises(UsageError, match=f"{MAX_ARTIFACT_BLOB + 1} bytes is over"):
            push_artifact(
                client, subject, ARTIFACT, [(small, BLOB, {}), (big, BLOB, {})], created=CREATED
            )
        assert not client.blob_exists(subject.repository, digest_of(small))
        assert list_referrers(client, subject) == []


def via(proxy) -> RegistryClient:
    return RegistryClient(proxy.host, RegistryOptions(insecure=True, timeout=5.0))


def test_without_oci_subject_the_referrers_tag_is_kept_even_where_the_api_answers(
    registry, subject_ref, fault_proxy
):
    """A registry that answers the referrers API but does not say OCI-Subject when the
    artifact is pushed: the client must keep the referrers tag, and does."""
    proxy = fault_proxy(registry)
    empty = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    proxy.fault = Fault(
        "status",
        status=200,
        body=empty,
        path_contains="/referrers/",
        headers={"Content-Type": OCI_INDEX},
    )
    with via(proxy) as client:
        subject = subject_of(client, subject_ref.replace(registry.host, proxy.host))
        pushed = push_artifact(client, subject, ARTIFACT, [(b"x", BLOB, {})], created=CREATED)
    with registry.client() as client:
        raw, _ = fetch_manifest(client, subject.repository, fallback_tag(subject.digest))
    assert [e["digest"] for e in json.loads(raw)["manifests"]] == [pushed]


def test_with_oci_subject_no_referrers_tag_is_written(registry, subject_ref, fault_proxy):
    """A registry that answers the artifact's PUT with OCI-Subject lists it by itself:
    no referrers tag is read or written."""
    proxy = fault_proxy(registry)
    with via(proxy) as client:
        subject = subject_of(client, subject_ref.replace(registry.host, proxy.host))
        proxy.fault = Fault(
            "status",
            status=201,
            body=b"",
            method="PUT",
            path_contains="/manifests/",
            headers={"OCI-Subject": subject.digest},
        )
        push_artifact(client, subject, ARTIFACT, [(b"y", BLOB, {})], created=CREATED)
    tag = fallback_tag(subject.digest)
    assert proxy.faults_applied == 1
    assert not [r for r in proxy.requests if tag in r.path]


def test_an_oci_subject_with_a_space_after_it_is_taken_as_said(registry, subject_ref, fault_proxy):
    """Tried: the artifact's PUT answered with ``OCI-Subject`` naming the subject, a
    space after it (as a proxy may leave one; no part of a header's value, RFC 9110).
    Must hold: the registry is taken to list the artifact by itself: no referrers tag is
    read or written. Before, the space made it another digest than the subject's, and
    the client kept a referrers tag the registry had no need of."""
    proxy = fault_proxy(registry)
    with via(proxy) as client:
        subject = subject_of(client, subject_ref.replace(registry.host, proxy.host))
        proxy.fault = Fault(
            "status",
            status=201,
            body=b"",
            method="PUT",
            path_contains="/manifests/",
            headers={"OCI-Subject": f"{subject.digest} "},
        )
        push_artifact(client, subject, ARTIFACT, [(b"w", BLOB, {})], created=CREATED)
    tag = fallback_tag(subject.digest)
    assert proxy.faults_applied == 1
    assert not [r for r in proxy.requests if tag in r.path]


@pytest.mark.parametrize("status", [400, 403, 405, 501])
def test_a_referrers_api_that_refuses_the_call_falls_back_to_the_tag(
    registry, subject_ref, fault_proxy, status
):
    """The referrers API answers 400, 403, 405 or 501 (not 404): the artifacts under the
    referrers tag are listed, not lost with an error."""
    proxy = fault_proxy(registry)
    with via(proxy) as client:
        subject = subject_of(client, subject_ref.replace(registry.host, proxy.host))
        pushed = push_artifact(client, subject, ARTIFACT, [(b"z", BLOB, {})], created=CREATED)
        proxy.fault = Fault("status", status=status, path_contains="/referrers/")
        assert [r.digest for r in list_referrers(client, subject)] == [pushed]
    assert proxy.faults_applied >= 1


def test_artifacts_under_the_tag_are_listed_where_the_api_answers_without_them(
    registry, subject_ref, fault_proxy
):
    """Tried: an artifact pushed to a registry without the referrers API (so kept under
    the referrers tag), then listed through a proxy whose referrers API answers 200 with
    an empty index, as a registry that gained the API since (distribution 2 to 3) lists
    none of what was pushed before it. Must hold: the artifact is listed, from the tag;
    before, the API's empty answer hid every artifact attached until then."""
    with registry.client() as client:
        subject = subject_of(client, subject_ref)
        pushed = push_artifact(client, subject, ARTIFACT, [(b"old", BLOB, {})], created=CREATED)
    proxy = fault_proxy(registry)
    empty = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    proxy.fault = Fault.document(empty, OCI_INDEX, path_contains="/referrers/")
    with via(proxy) as client:
        assert [r.digest for r in list_referrers(client, subject)] == [pushed]
    assert proxy.faults_applied >= 1


class ReferrersAPI:
    """A registry that has only the referrers API, served in pages of one entry each,
    linked by ``Link: <...>; rel="next"`` (``endless``: every page links to another)."""

    def __init__(self, count: int, *, endless: bool = False):
        self.count, self.endless = count, endless
        self.asked = 0
        self._server = QuietHTTPServer(("127.0.0.1", 0), self._handler())
        self.host = f"127.0.0.1:{self._server.server_address[1]}"

    def page(self, number: int) -> tuple[bytes, str | None]:
        """Page ``number``'s index and its next link."""
        entry = {
            "mediaType": OCI_MANIFEST,
            "digest": entry_digest(number),
            "size": 10,
            "artifactType": ARTIFACT,
        }
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [entry]}
        more = self.endless or number + 1 < self.count
        return json.dumps(index).encode(), f"?page={number + 1}" if more else None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if "/referrers/" not in parts.path:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                api.asked += 1
                number = int(parse_qs(parts.query).get("page", ["0"])[0])
                body, link = api.page(number)
                self.send_response(200)
                self.send_header("Content-Type", OCI_INDEX)
                if link:
                    self.send_header("Link", f'<{parts.path}{link}>; rel="next"')
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def __enter__(self) -> ReferrersAPI:
        self._server.start_in_background()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()


def entry_digest(number: int) -> str:
    return digest_of(f"artifact {number}".encode())


SUBJECT = Subject("any/image", entry_digest(-1), 100)


@pytest.fixture
def referrers_api() -> Iterator:
    def start(count: int, **kw) -> ReferrersAPI:
        api = ReferrersAPI(count, **kw)
        started.append(api.__enter__())
        return api

    started: list[ReferrersAPI] = []
    yield start
    for api in started:
        api.__exit__()


def test_every_page_of_the_referrers_api_is_listed(referrers_api):
    """Three pages linked by rel="next": the artifacts of all three are listed, in order."""
    api = referrers_api(3)
    with via(api) as client:
        listed = [r.digest for r in list_referrers(client, SUBJECT)]
    assert listed == [entry_digest(n) for n in range(3)]


def test_pages_linked_without_end_are_bounded(referrers_api):
    """A registry whose every page links to another: at most MAX_REFERRER_PAGES are asked
    for, then the listing is refused as a registry error, not followed forever."""
    api = referrers_api(0, endless=True)
    with via(api) as client, pytest.raises(RegistryError, match="more than") as caught:
        client.get_referrers(SUBJECT.repository, SUBJECT.digest)
    assert not isinstance(caught.value, NotFound)
    assert api.asked == MAX_REFERRER_PAGES


@pytest.mark.parametrize(
    ("digest", "tag"),
    [
        ("sha256:" + "a" * 64, "sha256-" + "a" * 64),
        ("sha512:" + "b" * 128, "sha512-" + "b" * 64),
        (
            "test+algorithm+using+algorithm+separators+and+lots+of+characters+to+excercise"
            "+overall+truncation:alsoSome=InTheEncodedSectionToShowHyphenReplacementAndLots"
            "AndLotsOfCharactersToExcerciseEncodedTruncation",
            "test-algorithm-using-algorithm-s-alsoSome-InTheEncodedSectionToShowHyphen"
            "ReplacementAndLotsAndLot",
        ),
    ],
)
def test_the_referrers_tag_is_the_specs(digest, tag):
    """The distribution spec's own examples: the algorithm cut to 32 characters, the
    encoded part to 64 (a sha512 subject's tag holds half its hex), and characters a
    tag cannot hold replaced with '-'."""
    assert fallback_tag(digest) == tag


def test_an_artifact_whose_listed_size_is_off_is_refused(registry, subject_ref, fault_proxy):
    """The referrers tag lists the artifact with a size one byte larger than its
    manifest: reading it is refused as an integrity error, though the digest matches."""
    with registry.client() as client:
        subject = subject_of(client, subject_ref)
        push_artifact(client, subject, ARTIFACT, [(b"listed", BLOB, {})], created=CREATED)
        tag = fallback_tag(subject.digest)
        index = json.loads(fetch_manifest(client, subject.repository, tag)[0])
    index["manifests"][0]["size"] += 1
    proxy = fault_proxy(registry)
    proxy.fault = Fault.document(index, OCI_INDEX, path_contains=tag)
    with via(proxy) as client:
        [referrer] = list_referrers(client, subject)
        with pytest.raises(IntegrityError, match="its descriptor says"):
            read_artifact(client, subject, referrer)


def test_an_artifact_blob_whose_size_is_off_is_refused(registry, subject_ref):
    """An artifact manifest whose layer descriptor says one byte more than the blob
    holds: the blob is refused as an integrity error, though its digest matches."""
    data = b"sized blob"
    with registry.client() as client:
        subject = subject_of(client, subject_ref)
        pushed = push_artifact(client, subject, ARTIFACT, [(data, BLOB, {})], created=CREATED)
        manifest = json.loads(fetch_manifest(client, subject.repository, pushed)[0])
        manifest["layers"][0]["size"] += 1
        raw = json.dumps(manifest).encode()
        client.put_manifest(subject.repository, digest_of(raw), raw, OCI_MANIFEST)
        referrer = Referrer(digest_of(raw), ARTIFACT, {}, len(raw))
        with pytest.raises(IntegrityError, match=f"blob {digest_of(data)} is 10 bytes"):
            read_artifact(client, subject, referrer)


def test_an_artifact_listing_more_than_a_reader_holds_is_refused_before_its_blobs(
    registry, subject_ref, fault_proxy
):
    """Tried: an artifact manifest that lists one 64 MiB blob (uploaded once) five times,
    and one that lists it three times saying each is one byte. Must hold: the first is
    refused before any blob is asked for, saying what its blobs add up to; each blob of
    the second is read no further than its descriptor's size; pushing the five is refused
    up front. A reader never holds more
    than MAX_ARTIFACT_BYTES of an artifact, however its manifest repeats or belittles
    its blobs; before, the first took 320 MiB of memory, and a manifest can list a blob
    thousands of times."""
    data = bytes(MAX_ARTIFACT_BLOB)
    proxy = fault_proxy(registry)
    with via(proxy) as client:
        subject = subject_of(client, subject_ref.replace(registry.host, proxy.host))
        pushed = push_artifact(client, subject, ARTIFACT, [(data, BLOB, {})], created=CREATED)
        manifest = json.loads(fetch_manifest(client, subject.repository, pushed)[0])
        (layer,) = manifest["layers"]
        for copies, size, refusal in [
            (5, len(data), f"add up to {5 * len(data)} bytes, over the {MAX_ARTIFACT_BYTES}"),
            (3, 1, "larger than 1 bytes"),
        ]:
            manifest["layers"] = [{**layer, "size": size}] * copies
            raw = json.dumps(manifest).encode()
            client.put_manifest(subject.repository, digest_of(raw), raw, OCI_MANIFEST)
            proxy.requests.clear()
            with pytest.raises(RegistryError, match=refusal):
                read_artifact(client, subject, Referrer(digest_of(raw), ARTIFACT, {}, len(raw)))
            asked = [r for r in proxy.requests if layer["digest"] in r.path]
            assert len(asked) == (0 if size == len(data) else copies), asked
        with pytest.raises(UsageError, match=f"add up to {5 * len(data)} bytes"):
            push_artifact(client, subject, ARTIFACT, [(data, BLOB, {})] * 5, created=CREATED)


def referrer(digit: str, created: str | None) -> Referrer:
    notes = {} if created is None else {"org.opencontainers.image.created": created}
    return Referrer("sha256:" + digit * 64, ARTIFACT, notes)


def test_newest_reads_created_as_a_time_and_breaks_ties_by_digest():
    """Created in the same second, the artifact with the greater digest is taken,
    whatever order they are listed in; times with zones and fractions are compared as
    times (01:00+01:00 is before 00:30Z); one with no created time, or a word, is oldest."""
    same = [referrer("a", "2024-05-01T12:00:00Z"), referrer("b", "2024-05-01T12:00:00Z")]
    assert newest(same, ARTIFACT) == newest(same[::-1], ARTIFACT) == same[1]
    zoned = [referrer("c", "2024-05-01T00:30:00Z"), referrer("d", "2024-05-01T01:00:00+01:00")]
    assert newest(zoned, ARTIFACT) == zoned[0]
    fraction = [referrer("f", "2024-05-01T00:00:00Z"), referrer("e", "2024-05-01T00:00:00.5Z")]
    assert newest(fraction, ARTIFACT) == fraction[1]
    undated = [referrer("f", None), referrer("f", "soon"), referrer("1", "1999-01-01T00:00:00Z")]
    assert newest(undated, ARTIFACT) == undated[2]


def test_a_next_page_link_is_followed_on_the_same_registry_only():
    """A Link to another host or scheme (plain HTTP from an HTTPS registry, say) gives
    only its path and query, asked of the registry that sent it; a relative one is
    resolved against the page's path."""
    from blockstore.registry.client import next_page

    page = "/v2/a/referrers/sha256:1"
    evil = '<http://elsewhere.example/v2/a/referrers/sha256:1?last=x>; rel="next"'
    assert next_page(page, evil) == "/v2/a/referrers/sha256:1?last=x"
    assert next_page(page, '<?last=y>; rel="next"') == "/v2/a/referrers/sha256:1?last=y"
    assert next_page(page, '<?last=y>; rel="prev"') is None
