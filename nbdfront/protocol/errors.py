"""The one place a failure becomes an NBD error value."""

from __future__ import annotations

import errno

from nbdfront.protocol.constants import Errno

_BY_ERRNO = {
    errno.EPERM: Errno.EPERM,
    errno.EACCES: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EIO: Errno.EIO,
    errno.ENOMEM: Errno.ENOMEM,
    errno.EINVAL: Errno.EINVAL,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.EOVERFLOW: Errno.EOVERFLOW,
    errno.ENOTSUP: Errno.ENOTSUP,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_error(exc: BaseException) -> Errno:
    """The NBD error a client sees for ``exc``.

    An ``OSError`` keeps its meaning where NBD has a value for it; anything
    else (a bug, a backend failure without an errno) is an I/O error, which
    clients report instead of using data.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        return _BY_ERRNO.get(exc.errno, Errno.EIO)
    return Errno.EIO
