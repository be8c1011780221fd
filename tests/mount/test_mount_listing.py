"""How ``blockstore mounts`` shows cache state and which layers a mount serves."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockstore.cli.mount_layers import describe_layers
from blockstore.cli.mount_listing import percent, served_layers
from nbdfront.mount.records import MountRecord

KIB, MIB = 1 << 10, 1 << 20


@pytest.mark.parametrize(
    ("fraction", "shown"),
    [
        (0.0, "0%"),
        (416 * KIB / (170 * MIB), "0.2%"),
        (0.00001, "<0.1%"),
        (0.0949, "9.5%"),
        (0.0999, "10%"),
        (0.5, "50%"),
        (0.996, "99%"),
        (1.0, "100%"),
    ],
)
def test_percentages(fraction, shown):
    """A small part shows with one decimal (416 KiB of 170 MiB is 0.2%, not 0%); an almost
    complete layer shows 99%, not 100%."""
    assert percent(fraction) == shown


@given(st.floats(min_value=0, max_value=1, exclude_min=True, exclude_max=True))
def test_a_partly_cached_layer_is_never_shown_empty_or_complete(fraction):
    """Whatever fraction strictly between 0 and 1 is cached, it never shows as 0% or 100%."""
    assert percent(fraction) not in ("0%", "0.0%", "100%", "100.0%")


def _record(info: dict, attachments: int = 0) -> MountRecord:
    record = MountRecord("/mnt", "img", "nbdfuse", "/run/x", "/run/x.log", info=info)
    record.attachments = [None] * attachments  # only counted here
    return record


def test_served_layers_say_which_layer_of_how_many():
    """A mount of one layer of three says ``layer 1 of 3``; the whole image says its count;
    a record whose cache could not say falls back to the number of attachments."""
    image = [{"index": i, "digest": f"sha256:{i:064x}", "size": 100} for i in range(3)]
    assert served_layers(_record(describe_layers(image, ["layer1"]), 1)) == "layer 1 of 3"
    whole = describe_layers(image, ["layer0", "layer1", "layer2"])
    assert served_layers(_record(whole, 3)) == "3"
    assert served_layers(_record({}, 2)) == "2"
