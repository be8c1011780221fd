"""The engine's errors, each with the exit code the CLI gives it.

One place decides what a failure means to a user: the CLI maps these to exit
codes and one-line messages, the NBD frontend maps ``OSError.errno`` to NBD
error codes. Messages never contain credentials.
"""

from __future__ import annotations

import errno


class BlockstoreError(Exception):
    """Base of every error the engine reports to a user."""

    exit_code = 1


class UsageError(BlockstoreError):
    """The user asked for something malformed (a bad reference, bad options)."""

    exit_code = 2


class InvalidReference(UsageError):
    """An image reference that docker and podman would refuse too."""


class RegistryError(BlockstoreError):
    """The registry answered, and the answer was no (carries its own code)."""

    exit_code = 3

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class NotFound(RegistryError):
    """Unknown repository, tag, manifest, blob, platform or layer."""


class AuthError(RegistryError):
    """Wrong or missing credentials, or a token the issuer refused."""

    exit_code = 4


class LoginRefused(AuthError):
    """The login offered (or its absence) refused as such: by the token issuer, or by a
    registry taking user names and passwords. Any request would be refused alike, so none
    is asked again in another form (a blob's HEAD as a GET)."""


class CredentialHelperError(AuthError):
    """A docker credential helper an auth file names for the registry gave no usable
    answer (missing, hung, failed, or a reply that is no login): said before any request,
    as going anonymous would leave the user guessing why the login was not used."""


class StorageRefused(RegistryError):
    """Storage a registry redirected a request to (object storage, a CDN) refused the URL
    the registry gave: most often a signed one that expired, or was signed for GET only."""


class RegistryUnreachable(BlockstoreError):
    """No connection could be made, or it timed out, after all retries."""

    exit_code = 5


UNAVAILABLE_STATUS = frozenset({429, 500, 502, 503, 504})


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is a registry's (or its token issuer's) answer that it will not
    answer now, for every try (its retries spent): failing, down behind its gateway, or
    rate-limiting (Docker Hub's pull limit is a 429). As unusable as a registry that
    cannot be reached, and said as one."""
    return isinstance(exc, RegistryError) and exc.status in UNAVAILABLE_STATUS


class RegistryTLSMismatch(RegistryUnreachable):
    """The registry answered, but not as the TLS settings say: plain HTTP where TLS was
    asked for (or the reverse), or a certificate the given CAs do not trust. A setting
    to fix, not an outage: no command serves from the cache alone because of it."""


class IntegrityError(BlockstoreError):
    """Bytes that do not match the digest or checksum they must match."""

    exit_code = 6


class BlobReadError(BlockstoreError, OSError):
    """A read of blob bytes that cannot be served; an NBD client sees EIO.

    Raised for a chunk that is not cached while offline, or whose bytes
    could not be fetched or verified. It is an ``OSError`` so layers that know
    nothing of registries (the NBD frontend) can map it by errno.
    """

    exit_code = 7

    def __init__(self, message: str, err: int = errno.EIO):
        OSError.__init__(self, err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotCached(BlobReadError):
    """Offline, and the bytes asked for are not in the cache."""

    said = "the cache is offline"
    """What each of its messages says, so one quoting such a message (a mount failing on
    the server's warning) can tell it and add what to do."""


class CacheError(BlockstoreError):
    """The cache cannot be opened or written (wrong format, disk full)."""

    exit_code = 8


class MountError(BlockstoreError):
    """Mounting or unmounting failed for a reason the user can act on."""

    exit_code = 10


class NotPermitted(MountError):
    """The operation needs root (or FUSE access) that this process lacks."""

    exit_code = 11


class MissingDependency(MountError):
    """A system tool or kernel feature the operation needs is not there."""

    exit_code = 12


class MountpointBusy(MountError):
    """The mountpoint is already mounted or in use."""

    exit_code = 13


class MountBeingUndone(MountpointBusy):
    """Another blockstore process holds the mount's state directory (unmounting it, or
    clearing its record): the cause is that process, not one using the mount."""


class OutOfResources(BlockstoreError):
    """The process could not start a thread or get memory: a limit on it (``ulimit``, a
    cgroup) or the machine's, not a fault of the image, the registry or the cache."""

    exit_code = 14


class ImageNotCached(BlockstoreError):
    """Offline, and the image is not in the cache: never resolved here, or removed (with
    the registry unreachable instead, the cause is that: ``RegistryUnreachable``)."""

    exit_code = 9
