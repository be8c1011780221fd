"""``blockstore inspect`` and ``blockstore push``: an image as the registry sees it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from blockstore.cli.common import (
    add_registry_options,
    image_argument,
    is_local_layer_file,
    registry_options_from_args,
)
from blockstore.errors import UsageError
from blockstore.registry import (
    EROFS_MEDIA_TYPE,
    RegistryClient,
    ResolvedImage,
    parse_reference,
    push_image,
    resolve_image,
)
from blockstore.registry.descriptors import is_media_type
from blockstore.registry.platforms import host_platform
from blockstore.registry.push import detect_media_type
from blockstore.registry.pushcheck import check_tar_layer


def register(subparsers: argparse._SubParsersAction) -> None:
    inspect = subparsers.add_parser(
        "inspect",
        help="show an image's manifest digest, platforms and layers",
        description="Show an image as the registry serves it: its manifest digest, the "
        "platforms of its index, and each layer's index, digest, size and media type "
        "(the index --layer takes, the digest --blob takes).",
    )
    inspect.add_argument(
        "image", type=image_argument, metavar="IMAGE", help="image reference, e.g. host:5000/app:v1"
    )
    add_registry_options(inspect)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(func=run_inspect)

    push = subparsers.add_parser(
        "push",
        help="upload files as the layers of an OCI image",
        description="Upload each FILE as a layer of one image, the first at the bottom. "
        "An EROFS image, a tar archive and a tar in a gzip or zstd stream are told by "
        "their bytes and get their OCI media types; other content needs --media-type.",
    )
    push.add_argument(
        "files",
        metavar="FILE",
        type=layer_file_argument,
        nargs="+",
        help="a layer: an EROFS image, or a tar, tar.gz or tar.zst",
    )
    push.add_argument(
        "image",
        type=push_target_argument,
        metavar="IMAGE",
        help="where to push it, e.g. host:5000/app:v1",
    )
    add_registry_options(push, mirrors=False)
    push.add_argument(
        "--media-type",
        action="append",
        type=parse_media_type,
        help="layer media type: once for every layer, or once per FILE in order "
        f"(default: told by the file's bytes, e.g. {EROFS_MEDIA_TYPE})",
    )
    index = push.add_mutually_exclusive_group()
    index.add_argument(
        "--add-to-index",
        action="store_true",
        help="make the tag an index holding this platform next to the ones already there",
    )
    index.add_argument(
        "--replace-index",
        action="store_true",
        help="replace an index of other platforms under the tag with this platform alone "
        "(without it, or --add-to-index, such a push is refused)",
    )
    push.set_defaults(func=run_push)


def run_inspect(args: argparse.Namespace) -> int:
    ref = parse_reference(args.image)
    with RegistryClient(
        ref.registry, registry_options_from_args(args), repository=ref.repository
    ) as client:
        # A platform the user names holds for a single-platform image too.
        image = resolve_image(
            client, ref, args.platform, require_platform=args.platform is not None
        )
    print(json.dumps(inspect_record(image), indent=2) if args.json else describe(image))
    return 0


def inspect_record(image: ResolvedImage) -> dict:
    """What ``inspect --json`` prints: digest, platforms and layers, and where they came from."""
    return {
        "reference": image.reference,
        "digest": image.manifest_digest,
        "indexDigest": image.index_digest,
        "platform": image.platform,
        "platforms": image.platforms,
        "layers": [layer.to_record() for layer in image.layers],
    }


def describe(image: ResolvedImage) -> str:
    lines = [f"image      {image.reference}", f"digest     {image.manifest_digest}"]
    if image.index_digest:
        lines.append(f"index      {image.index_digest}")
    if image.platform:
        lines.append(f"platform   {image.platform}")
    if image.index_digest:
        lines.append(f"platforms  {', '.join(image.platforms)}")
    lines.append(f"layers     {len(image.layers)}")
    for layer in image.layers:
        lines.append(f"  {layer.index:>3}  {layer.digest}  {layer.size:>12}  {layer.media_type}")
    return "\n".join(lines)


def run_push(args: argparse.Namespace) -> int:
    ref = parse_reference(args.image)
    if ref.digest:
        raise UsageError(f"cannot push to {args.image!r}: give a tag, not a digest")
    media_types = layer_media_types(args.files, args.media_type)
    each = [media_types] * len(args.files) if isinstance(media_types, str) else media_types
    for path, media_type in zip(args.files, each, strict=True):
        check_tar_layer(path, media_type)
    with RegistryClient(
        ref.registry, registry_options_from_args(args), repository=ref.repository
    ) as client:
        digest = push_image(
            client,
            ref.repository,
            ref.tag or "latest",
            args.files,
            platform=args.platform or str(host_platform()),
            media_type=media_types,
            add_to_index=args.add_to_index,
            replace_index=args.replace_index,
        )
    print(digest)
    return 0


def layer_file_argument(text: str) -> Path:
    """A layer file to push. Standard input (``-``) is refused: a layer is read twice, for
    its digest and to upload it, which a pipe cannot be."""
    if text == "-":
        raise argparse.ArgumentTypeError(
            "a layer cannot come from standard input (-): it is read once for its digest "
            "and again to upload it; give a file"
        )
    return Path(text)


def push_target_argument(text: str) -> str:
    """The image to push to, as given. A local layer file named there (the image left out,
    or given first) is refused: taken for a Docker Hub name, the layers would go there."""
    if is_local_layer_file(text):
        raise argparse.ArgumentTypeError(
            f"{text} is a local file, and IMAGE, the last argument, names the image in a "
            "registry to push to: blockstore push FILE... HOST[:PORT]/NAME:TAG"
        )
    return text


def parse_media_type(text: str) -> str:
    """A layer media type as a manifest must carry one: checked here, or the push would
    succeed and make an image every pull refuses."""
    if not is_media_type(text):
        raise argparse.ArgumentTypeError(
            f"not a media type: {text!r} (type/subtype, e.g. {EROFS_MEDIA_TYPE})"
        )
    return text


def layer_media_types(files: list[Path], given: list[str] | None) -> str | list[str]:
    """The media type of each layer ``push`` uploads: as given (once for all, or once
    per file), else told by each file's bytes."""
    if not given:
        return [detect_media_type(path) for path in files]
    if len(given) == 1:
        return given[0]
    if len(given) != len(files):
        raise UsageError(
            f"{len(given)} --media-type for {len(files)} files: give it once for every "
            "layer, or once per FILE"
        )
    return given
