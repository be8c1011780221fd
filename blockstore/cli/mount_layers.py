"""What a mount's record says of its layers: those mounted, found in the cache as the
server resolved the image, and how many the image has.

``mount`` writes this account once its server is ready; ``mounts`` reads it back, and
looks the layers up again where the mount could not name them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from nbdfront.mount.records import MountRecord


def layers_in_cache(cache_dir: Path, image: str, platform: str | None) -> list[dict]:
    """Every layer (index, digest, size, media type) of the image as the server resolved
    and cached it for ``platform`` (this host's if None), found under that platform as
    the server keeps it: another platform's record names another image's layers, which
    would have a tar layer mounted bare, as an EROFS one is.

    To show what is mounted and cached in ``mounts``, and to tell a tar layer; a cache
    that cannot say yields nothing.
    """
    from blockstore.cache import ChunkStore
    from blockstore.cache.env import looking
    from blockstore.cache.layout import holds_cache
    from blockstore.registry import parse_reference
    from blockstore.registry.platforms import Platform, host_platform

    if not holds_cache(cache_dir):
        return []
    try:
        canonical = str(parse_reference(image))
        asked = str(Platform.parse(platform) if platform else host_platform())
        with looking(), ChunkStore(cache_dir) as store:
            record = store.images.get(canonical, asked)
    except Exception:
        return []
    return record.get("layers", []) if record else []


def describe_layers(image_layers: list[dict], exports: list[str]) -> dict:
    """The record's account of the layers: those mounted, and how many the image has."""
    by_export = {f"layer{layer['index']}": layer for layer in image_layers}
    return {
        "layers": [
            {
                "export": name,
                **{k: by_export[name][k] for k in ("index", "digest", "size")},
                "mediaType": by_export[name].get("mediaType"),
            }
            for name in exports
            if name in by_export
        ],
        "image_layers": len(image_layers),
    }


def with_layers(record: MountRecord) -> MountRecord:
    """``record``, its layers looked up again if the mount could not name them: its
    cache could not be read then (damaged, and moved aside by the server since)."""
    info = record.info
    if info.get("layers") or not info.get("cache_dir"):
        return record
    found = layers_in_cache(Path(info["cache_dir"]), record.image, info.get("platform"))
    exports = [attachment.export for attachment in record.attachments]
    return replace(record, info={**info, **describe_layers(found, exports)})
