"""The one place a failure becomes an NBD error value."""

from __future__ import annotations

import errno

from nbdfront.protocol.constants import Errno

# Not ESHUTDOWN, ENOTSUP or EOVERFLOW: the spec gives them meanings of its own (the
# server is stopping, so the client must disconnect; a fast zero that would not be
# fast; a request too long), which a backend's failure never has: it is an I/O error.
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
}


def nbd_error(exc: BaseException) -> Errno:
    """The NBD error a client sees for ``exc``.

    An ``OSError`` keeps its meaning where NBD has a value of that meaning;
    anything else (a bug, a backend failure without an errno) is an I/O
    error, which clients report instead of using data.
    """
    if isinstance(exc, OSError) and exc.errno is not None:
        return _BY_ERRNO.get(exc.errno, Errno.EIO)
    return Errno.EIO
