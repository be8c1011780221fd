"""Platforms (``os/arch[/variant]``) as image indexes name them, and how they match.

Follows containerd's normalisation: ``aarch64`` is ``arm64``, whose variant
defaults to ``v8``; ``arm`` defaults to ``v7``; ``x86_64`` is ``amd64``.
"""

from __future__ import annotations

import platform as host
from dataclasses import dataclass

from blockstore.errors import UsageError

_ARCH_ALIASES = {
    "x86_64": "amd64",
    "x86-64": "amd64",
    "aarch64": "arm64",
    "i386": "386",
    "i686": "386",
    "armhf": "arm",
    "armel": "arm",
    "armv7l": "arm",
    "armv6l": "arm",
}
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        parts = [self.os, self.architecture] + ([self.variant] if self.variant else [])
        return "/".join(parts)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``linux/arm64/v8`` -> Platform; refuse anything else with a message."""
        parts = text.strip().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"invalid platform {text!r}: expected os/arch[/variant]")
        return cls(
            parts[0].lower(), parts[1].lower(), parts[2].lower() if len(parts) == 3 else None
        )

    @classmethod
    def from_descriptor(cls, platform: dict) -> Platform:
        """The ``platform`` object of an index entry, or an image config's fields. The
        spec has them strings; one that is not raises ``ValueError`` saying which."""
        fields = {name: platform.get(name) for name in ("os", "architecture", "variant")}
        for name, value in fields.items():
            if value is not None and not isinstance(value, str):
                shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
                raise ValueError(f"platform {name} {shown} is not a string")
        return cls(fields["os"] or "", fields["architecture"] or "", fields["variant"] or None)

    def normalized(self) -> Platform:
        arch = _ARCH_ALIASES.get(self.architecture, self.architecture)
        return Platform(self.os, arch, self.variant or _DEFAULT_VARIANT.get(arch))

    def accepts(self, offered: Platform) -> bool:
        """Whether an image built for ``offered`` satisfies this requested platform."""
        want, got = self.normalized(), offered.normalized()
        if (want.os, want.architecture) != (got.os, got.architecture):
            return False
        return want.variant is None or want.variant == got.variant

    def choose(self, offered: list[Platform]) -> int | None:
        """Which of ``offered`` to take: the first exact match (the same variant, or none
        on either side) before the first merely accepted one (linux/amd64 asked, so
        linux/amd64 before linux/amd64/v3, whatever the index's order); None if none is."""
        accepted = [i for i, platform in enumerate(offered) if self.accepts(platform)]
        exact = [i for i in accepted if offered[i].normalized() == self.normalized()]
        return (exact or accepted or [None])[0]


def host_platform() -> Platform:
    """This machine's platform, the default when a user names none."""
    machine = host.machine().lower()
    arch = _ARCH_ALIASES.get(machine, machine)
    variant = {"armv6l": "v6", "armv7l": "v7"}.get(machine) or _DEFAULT_VARIANT.get(arch)
    return Platform(host.system().lower(), arch, variant)
