"""A token issuer that is slow for one repository: only the requests that need that
token wait for it, one request fetches it for all of them, and none waits past its own
deadline."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from rig.fault_proxy import Fault, RecordedRequest
from rig.pushed import push_erofs
from rig.registry_server import RegistryServer, TokenAuth
from rig.token_issuer import TokenIssuer
from rig.waiting import wait_for

from blockstore.errors import RegistryUnreachable
from blockstore.registry import resolve_image
from blockstore.registry.retry import Deadline

STALL = 3.0
"""Seconds the issuer takes for a token of the ``slow/`` repository."""


@pytest.fixture
def slow_issuer_registry(tmp_path, test_ca, fault_proxy, erofs_images) -> Iterator:
    """A token-auth registry whose issuer is reached through a proxy (``.proxy``), with
    ``slow/image:v1`` and ``fast/image:v1`` pushed."""
    cert, key = test_ca.issue("slow-issuer", server=False)
    issuer = TokenIssuer(cert, key, users={"carol": "carol-pw"})
    issuer.start()
    proxy = fault_proxy(issuer.realm.removesuffix("/token"))
    token = TokenAuth(f"{proxy.url}/token", issuer.service, issuer.name, test_ca.cert)
    server = RegistryServer(
        tmp_path / "registry", token=token, username="carol", password="carol-pw"
    )
    server.issuer, server.proxy = issuer, proxy
    server.start()
    try:
        for repository in ("slow/image", "fast/image"):
            push_erofs(
                server.host, repository, "v1", [erofs_images.small.path], options=server.options()
            )
        yield server
    finally:
        server.stop()
        issuer.stop()


def slow_tokens(issuer: TokenIssuer) -> int:
    return sum(1 for e in issuer.issued for a in e["access"] if a["name"] == "slow/image")


def test_a_slow_issuer_holds_up_only_the_requests_that_need_its_token(
    slow_issuer_registry, erofs_images
):
    """The issuer takes 3 s for slow/image's token. While one reader waits for it (its
    request seen by the issuer's proxy): a reader of fast/image is served before that
    token comes; a second reader of slow/image takes the same token (one request to the
    issuer for both); a read of slow/image whose deadline is 1 s gives up after about
    1 s, not when the token comes."""
    server = slow_issuer_registry
    server.proxy.fault = Fault("delay", seconds=STALL, path_contains="slow%2Fimage")
    before = slow_tokens(server.issuer)
    small = erofs_images.small
    with server.client(timeout=STALL * 4) as client:
        resolved: list[str] = []

        def resolve_slow() -> None:
            resolved.append(resolve_image(client, f"{server.host}/slow/image:v1").manifest_digest)

        slow = [threading.Thread(target=resolve_slow) for _ in range(2)]
        asked = len(server.proxy.requests)
        slow[0].start()
        assert wait_for(lambda: _asked_for_slow_token(server.proxy.requests[asked:]))
        slow[1].start()
        assert resolve_image(client, f"{server.host}/fast/image:v1").layers
        assert not resolved, "fast/image waited for slow/image's token"
        started = time.monotonic()
        with pytest.raises(RegistryUnreachable, match="no token from its issuer"):
            client.read_blob_range(
                "slow/image", small.digest, 0, 99, small.size, deadline=Deadline(1.0)
            )
        bounded_took = time.monotonic() - started
        for thread in slow:
            thread.join()
    assert bounded_took < 1.8, f"a read with 1 s left waited {bounded_took:.1f}s"
    assert len(resolved) == 2
    assert slow_tokens(server.issuer) - before == 1


def _asked_for_slow_token(requests: list[RecordedRequest]) -> bool:
    """Whether a token request for slow/image has reached the issuer's proxy."""
    return any("slow%2Fimage" in request.path for request in requests)


def test_a_challenge_for_more_scopes_does_not_join_a_narrower_request():
    """While one thread's token request for a repository's pull scope is under way, a
    401 whose challenge asks for that scope and another one (a cross-repository mount,
    say) makes a request of its own for both, so its retry carries the scope the
    registry asked for; a second thread needing the same scope alone joins the first.
    (The issuer here is a function that answers after 0.5 s: what is tried is who asks
    it, and for what.)"""
    from types import SimpleNamespace

    from blockstore.registry.auth import Authenticator

    asked: list[tuple[str, ...]] = []

    def issuer(realm, params, credentials, deadline):
        scopes = tuple(v for k, v in params if k == "scope")
        asked.append(scopes)
        time.sleep(0.5)
        return SimpleNamespace(status_code=200, json=lambda: {"token": "|".join(scopes)})

    auth = Authenticator("registry.example", None, issuer)
    pull, base = "repository:a/app:pull", "repository:b/base:pull"
    both = f"{pull} {base}"
    auth.answer_challenge(f'Bearer realm="https://issuer.example/token",scope="{pull}"', pull,
                          Deadline(10), None)  # fmt: skip
    asked.clear()
    answers: dict[str, str] = {}

    def renew(name: str, challenge_scope: str) -> None:
        challenge = f'Bearer realm="https://issuer.example/token",scope="{challenge_scope}"'
        answers[name] = auth.answer_challenge(challenge, pull, Deadline(10), f"Bearer {pull}")

    first = threading.Thread(target=renew, args=("first", pull))
    first.start()
    time.sleep(0.1)
    wider = threading.Thread(target=renew, args=("wider", both))
    same = threading.Thread(target=renew, args=("same", pull))
    wider.start()
    same.start()
    for thread in (first, wider, same):
        thread.join(5)
    assert sorted(asked) == sorted([(pull,), (pull, base)])
    assert answers["wider"] == f"Bearer {pull}|{base}"
    assert answers["same"] == answers["first"] == f"Bearer {pull}"
