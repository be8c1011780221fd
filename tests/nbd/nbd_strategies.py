"""Hypothesis strategies for what an NBD client may send: options, requests, whole
conversations and mutations of them. Shared by the fuzzing of the protocol core
and of a running server.
"""

from __future__ import annotations

import itertools

import nbd_wire as w
from hypothesis import strategies as st

from nbdfront.protocol import MAX_PAYLOAD

names = st.sampled_from(["", "layer0", "layer1", "missing", "\u00e9"])
infos = st.lists(st.integers(0, 6), max_size=4).map(tuple)
queries = st.lists(st.sampled_from(["base:allocation", "base:", "x-y:z", "nocolon", ""]))
option_codes = st.one_of(st.integers(1, 12), st.integers(0, 2**32 - 1))
option_data = st.one_of(
    st.builds(w.go_data, names, infos),
    st.builds(w.meta_data, names, queries),
    names.map(str.encode),
    st.binary(max_size=64),
)
options = st.builds(w.option, option_codes, option_data)
final_option = st.one_of(
    st.builds(lambda n, i: w.option(w.OPT_GO, w.go_data(n, i)), names, infos),
    names.map(lambda n: w.option(w.OPT_EXPORT_NAME, n.encode())),
)
interesting = st.one_of(
    st.sampled_from([0, 1, 511, 512, 65536, 65543, 1 << 20, MAX_PAYLOAD, MAX_PAYLOAD + 1]),
    st.integers(0, 2**32 - 1),
)


@st.composite
def requests(draw):
    command = draw(st.one_of(st.integers(0, 8), st.integers(0, 2**16 - 1)))
    flags = draw(st.one_of(st.sampled_from([0, 1, 4, 8]), st.integers(0, 2**16 - 1)))
    handle = draw(st.integers(0, 8))
    offset = draw(st.one_of(interesting, st.integers(0, 2**64 - 1)))
    length = draw(interesting)
    payload = b""
    if command == w.CMD_WRITE:
        length = draw(st.integers(0, 64))
        payload = bytes(draw(st.integers(0, length)))  # maybe short: then EOF mid-write
    return w.request(command, handle, offset, length, flags) + payload


@st.composite
def conversations(draw):
    script = w.client_flags(draw(st.booleans()))
    if draw(st.booleans()):
        script += w.option(w.OPT_STRUCTURED_REPLY)
    script += b"".join(draw(st.lists(options, max_size=6)))
    script += draw(final_option)
    script += b"".join(draw(st.lists(requests(), max_size=12)))
    return script


@st.composite
def mutated(draw):
    script = bytearray(draw(conversations()))
    for _ in range(draw(st.integers(0, 4))):
        if not script:
            break
        position = draw(st.integers(0, len(script) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            script[position] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del script[position:]
        else:
            script[position:position] = draw(st.binary(min_size=1, max_size=8))
    return bytes(script)


def pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]
