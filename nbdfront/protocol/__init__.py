"""The NBD protocol without I/O: feed bytes, get events, turn replies into bytes."""

from nbdfront.protocol.connection import Phase, ServerConnection
from nbdfront.protocol.constants import MAX_PAYLOAD, PREFERRED_BLOCK_SIZE, Errno
from nbdfront.protocol.errors import nbd_error
from nbdfront.protocol.events import (
    NEED_DATA,
    CacheRequest,
    CommandDone,
    ConnectionClosed,
    Disconnect,
    ExportSelected,
    ReadFailed,
    ReadPiece,
    ReadReply,
    ReadRequest,
    StartTLS,
)
from nbdfront.protocol.handshake import Catalog, TLSPolicy

__all__ = [
    "MAX_PAYLOAD",
    "NEED_DATA",
    "PREFERRED_BLOCK_SIZE",
    "CacheRequest",
    "Catalog",
    "CommandDone",
    "ConnectionClosed",
    "Disconnect",
    "Errno",
    "ExportSelected",
    "Phase",
    "ReadFailed",
    "ReadPiece",
    "ReadReply",
    "ReadRequest",
    "ServerConnection",
    "StartTLS",
    "TLSPolicy",
    "nbd_error",
]
