"""The NBD server: sockets and threads around the sans-I/O protocol.

Each connection has one reader thread that receives and parses requests and
answers cache hits itself, with no hand-off; reads that must wait (a miss,
or a read larger than one piece) and cache hints go to the connection's
worker threads. Replies go out in the order they finish, through an outbox
that sends at once what the socket takes and queues the rest for a writer
thread: no thread that reads requests or serves a read ever blocks on a
slow client, so a client that writes a burst of requests before it reads
any reply cannot deadlock with the server. A per-connection budget counts
the bytes of reads in flight and of replies queued; over it, the reader
stops taking requests, so memory stays bounded however many requests a
client queues, and a misbehaving client only ever occupies its own threads.

Connections get a deadline for the whole handshake, an optional idle limit
once transmission has begun, and a count limit at which a connection still
in its handshake makes room for a newcomer; one that has chosen its export
is never cut for another (the spec allows a disconnect only for a broken
rule, and it may be a mounted disk). Stopping is bounded: new options and
requests are refused (ERR_SHUTDOWN, ESHUTDOWN) while replies in flight get
a drain timeout, then connections are cut; every thread is a daemon, so a
read stuck in a fetch never holds up the exit.

Modules: ``nbd_server`` listens, admits and stops; ``session`` is one
connection; ``outbox`` and ``sending`` get its replies onto the socket;
``budget`` bounds what it holds; ``workers`` serve what may wait.
"""

from nbdfront.server.nbd_server import DEFAULT_PORT, NBDServer, is_loopback, is_wildcard, netloc

__all__ = ["DEFAULT_PORT", "NBDServer", "is_loopback", "is_wildcard", "netloc"]
