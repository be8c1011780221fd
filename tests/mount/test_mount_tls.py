"""``mount --tls``: the mount's own server speaks TLS to its own nbdfuse client.

The server listens on an owner-only Unix socket, so TLS there is for those
who ask for it; what must hold is that asking works end to end, and that
what cannot work is refused before anything starts.
"""

from __future__ import annotations

import json

import pytest
from mount_trees import assert_same_tree
from test_mount_e2e import assert_nothing_left, cli, umount

from nbdfront.mount import attach

pytestmark = pytest.mark.slow


def test_a_tls_mount_is_attached_with_nbdfuse_where_kernel_nbd_is_the_default(monkeypatch):
    """On a machine with the kernel NBD driver and nbd-client (made so here: this one has
    no driver), a plain mount attaches with the kernel's client, and a TLS mount with
    nbdfuse, which speaks TLS; the kernel path would refuse its nbds+unix URI after
    the server had started."""
    monkeypatch.setattr(attach, "kernel_nbd_devices", lambda: ["/dev/nbd0"])
    monkeypatch.setattr(attach.shutil, "which", lambda name: f"/usr/sbin/{name}")
    assert attach.choose_method() == attach.KERNEL
    assert attach.choose_method(tls=True) == attach.NBDFUSE


@pytest.fixture
def nbdfuse_dirs(mount_dirs):
    base, run = mount_dirs
    for name in ("mnt", "cache"):
        (base / name).mkdir()
    return base / "mnt", base / "cache", run


def test_mount_with_its_server_requiring_tls(
    nbdfuse_dirs, pushed_images, erofs_images, nbd_certificates
):
    """``mount --tls require --tls-certificates DIR``: the server is told to require TLS,
    announces nbds+unix URIs, nbdfuse's connection upgrades to TLS (the server logs the
    handshake and no failure), the tree is whole, and umount leaves nothing."""
    mnt, cache, run = nbdfuse_dirs
    tls = ["--tls", "require", "--tls-certificates", str(nbd_certificates.server)]
    done = cli("-v", "mount", "--insecure", "--cache-dir", str(cache), *tls,
               pushed_images.small, str(mnt))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_same_tree(erofs_images.small.tree, mnt)
    (mount,) = json.loads(cli("mounts", "--json").stdout)
    assert mount["mountpoint"] == str(mnt)
    log = next(run.glob("log/*.log")).read_text()
    assert "nbds+unix://" in done.stderr + log
    assert "unix now speaks TLS" in log and "TLS handshake" not in log, log[-2000:]
    umount(mnt)
    assert_nothing_left(mnt, run)


def test_mount_refuses_tls_verify_peer_up_front(nbdfuse_dirs, pushed_images, nbd_certificates):
    """nbdfuse cannot show a client certificate, so ``mount --tls-verify-peer`` is refused
    as bad usage in one line, before any server starts."""
    mnt, cache, run = nbdfuse_dirs
    tls = ["--tls", "require", "--tls-certificates", str(nbd_certificates.server)]
    done = cli("mount", "--insecure", "--cache-dir", str(cache), *tls, "--tls-verify-peer",
               pushed_images.small, str(mnt))  # fmt: skip
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "--tls-verify-peer" in line and "nbdfuse" in line
    assert_nothing_left(mnt, run)
