"""The mount stack: an image's NBD exports made into a directory, and undone again.

Its one job is to turn a server's exports into a mounted tree and to take
that tree down from any process later. The entry points are ``stack``
(mount), ``unmount`` and ``listing`` (what ``blockstore mounts`` shows), all
three finding what stands of a mount, record or none, through ``finding``;
beneath them, ``server`` starts the NBD server under
``supervisor`` and hears on a ``readiness`` pipe that it serves, ``attach`` makes
each export a mountable file or device (kernel NBD or nbdfuse), ``syscall``
mounts EROFS and overlayfs, ``dirattrs`` keeps the attributes of the directories
a tar layer only implies, ``records`` keeps what was done, so ``umount`` knows
what to undo, and ``process`` finds the processes it left running again. It
lives beside the NBD server because it is an NBD client of it; the engine
below knows nothing of NBD or mounts.
"""
