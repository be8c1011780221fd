"""The NBD frontend: read-only exports served to any NBD client.

``nbdfront.protocol`` is the protocol without I/O (bytes in, events and
bytes out); ``nbdfront.server.NBDServer`` runs it over TCP and Unix
sockets; ``nbdfront.mount`` is the mount stack, the NBD client side that
attaches a server's exports (kernel NBD or nbdfuse), mounts them with EROFS
and overlayfs, and keeps the records that ``umount`` undoes. What a client
is offered:

- Fixed newstyle handshake with NO_ZEROES; options EXPORT_NAME, GO, INFO,
  LIST, ABORT, STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT
  (``base:allocation`` only). Other options get ERR_UNSUP; STARTTLS
  upgrades the connection where the server has TLS on (``nbdfront.tls``)
  and gets ERR_POLICY where it has not; options over 16 KiB are skipped
  unread and get ERR_TOO_BIG if their data would be read (others get the
  answer they would get with any data: ERR_UNSUP or ERR_INVALID).
- INFO/GO answer EXPORT, NAME and DESCRIPTION, and always BLOCK_SIZE:
  minimum 1 byte, preferred 32 KiB (the cache's chunk), maximum payload
  32 MiB. A read longer than 32 MiB, or past the end, gets EINVAL.
- Transmission flags HAS_FLAGS, READ_ONLY, SEND_FLUSH, SEND_FUA (kept by
  doing nothing), CAN_MULTI_CONN, SEND_CACHE, and SEND_DF once structured
  replies are on.
- READ (simple or structured replies; a failed read is an error chunk,
  never data), CACHE (fetches the range now), FLUSH (nothing to flush),
  BLOCK_STATUS (everything is data), DISC. WRITE, TRIM and WRITE_ZEROES get
  EPERM; unknown commands and flags EINVAL; a request that does not parse
  ends that connection only.
- On shutdown, replies in flight are sent; options and requests that
  arrive after it began get ERR_SHUTDOWN / ESHUTDOWN.
- Backend errors reach the client by ``OSError.errno`` (EIO when there is
  none, or when NBD gives it a meaning of its own: ESHUTDOWN, ENOTSUP,
  EOVERFLOW), mapped in ``nbdfront.protocol.errors``.
"""
