"""How server messages look on the wire: pure functions from values to bytes.

Payload bytes are never copied: a reply is a list of buffers (header first)
for ``socket.sendmsg``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from blockstore.export import Buffer
from nbdfront.protocol.constants import (
    BASE_ALLOCATION,
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    MAX_PAYLOAD,
    MAX_STRING,
    MIN_BLOCK_SIZE,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    PREFERRED_BLOCK_SIZE,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    HandshakeFlag,
    Info,
    OptionReply,
    ReplyFlag,
    ReplyType,
)

_OPTION_REPLY = struct.Struct(">QIII")
_SIMPLE = struct.Struct(">IIQ")
_CHUNK = struct.Struct(">IHHQI")
_OFFSET_DATA = struct.Struct(">IHHQIQ")
# Plain ints for the per-read header: enum lookups cost more than the packing.
_DONE = int(ReplyFlag.DONE)
_OFFSET_DATA_TYPE = int(ReplyType.OFFSET_DATA)


def greeting() -> bytes:
    """The server's first words: fixed newstyle, zeroes optional."""
    flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)


def encode_message(text: str) -> bytes:
    """A human message, cut to the spec's string limit on a character boundary. A NUL,
    which NBD strings must not hold (a registry's error text may), becomes U+FFFD."""
    raw = text.replace("\0", "\ufffd").encode("utf-8", "replace")
    if len(raw) > MAX_STRING:
        raw = raw[:MAX_STRING].decode("utf-8", "ignore").encode()
    return raw


def option_reply(option: int, reply: OptionReply, payload: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def option_error(option: int, reply: OptionReply, message: str) -> bytes:
    return option_reply(option, reply, encode_message(message))


def server_entry(option: int, name: str, description: str = "") -> bytes:
    """One export in a LIST reply; text after the name is shown to people."""
    raw = name.encode()
    payload = struct.pack(">I", len(raw)) + raw + encode_message(description)
    return option_reply(option, OptionReply.SERVER, payload)


def info_export(option: int, size: int, flags: int) -> bytes:
    return option_reply(option, OptionReply.INFO, struct.pack(">HQH", Info.EXPORT, size, flags))


def info_string(option: int, info: Info, text: str) -> bytes:
    return option_reply(option, OptionReply.INFO, struct.pack(">H", info) + encode_message(text))


def info_block_size(option: int) -> bytes:
    payload = struct.pack(
        ">HIII", Info.BLOCK_SIZE, MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD
    )
    return option_reply(option, OptionReply.INFO, payload)


def meta_context(option: int, context_id: int, name: str = BASE_ALLOCATION) -> bytes:
    return option_reply(
        option, OptionReply.META_CONTEXT, struct.pack(">I", context_id) + name.encode()
    )


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The answer to ``NBD_OPT_EXPORT_NAME``, which has no reply header."""
    padding = b"" if no_zeroes else bytes(EXPORT_NAME_PADDING)
    return struct.pack(">QH", size, flags) + padding


def simple_reply(handle: int, error: int = 0, data: Sequence[Buffer] = ()) -> list[Buffer]:
    return [_SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, handle), *data]


def chunk(handle: int, kind: ReplyType, payload: bytes, *, done: bool = True) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, handle, len(payload)) + payload


def offset_data(
    handle: int, offset: int, data: Sequence[Buffer], length: int, *, done: bool
) -> list[Buffer]:
    """One ``OFFSET_DATA`` chunk carrying ``length`` bytes (the sum of ``data``)."""
    flags = _DONE if done else 0
    header = _OFFSET_DATA.pack(
        STRUCTURED_REPLY_MAGIC, flags, _OFFSET_DATA_TYPE, handle, 8 + length, offset
    )
    return [header, *data]


def read_reply(
    handle: int, offset: int, data: Sequence[Buffer], length: int, structured: bool
) -> list[Buffer]:
    """The whole reply to a read of one byte or more: its ``length`` bytes of ``data``
    in one final ``OFFSET_DATA`` chunk, or after a simple reply's header."""
    if structured:
        return offset_data(handle, offset, data, length, done=True)
    return simple_reply(handle, 0, data)


def error_chunk(handle: int, error: int, message: str) -> bytes:
    raw = encode_message(message)
    return chunk(handle, ReplyType.ERROR, struct.pack(">IH", error, len(raw)) + raw)


def error_offset_chunk(handle: int, error: int, message: str, offset: int) -> bytes:
    raw = encode_message(message)
    payload = struct.pack(">IH", error, len(raw)) + raw + struct.pack(">Q", offset)
    return chunk(handle, ReplyType.ERROR_OFFSET, payload)


def done_chunk(handle: int) -> bytes:
    return chunk(handle, ReplyType.NONE, b"")


def block_status_chunk(handle: int, context_id: int, length: int, status: int = 0) -> bytes:
    """One descriptor for the whole range: the export is data everywhere."""
    return chunk(handle, ReplyType.BLOCK_STATUS, struct.pack(">III", context_id, length, status))
