"""``cmim shards SRC OUT --shard-size N [--max-side S]``: write an image folder as WebDataset tar shards."""

from __future__ import annotations

import argparse
from typing import Any

from cmim.data.images import DEFAULT_MAX_IMAGE_PIXELS

EPILOG = """\
Then pre-train from them with data.name=shards and data.root set to OUT, to OUT/index.json (also as an
http(s):// URL), or to the brace pattern printed at the end (local, http(s)://, or a pipe: command such as
'pipe:aws s3 cp s3://bucket/shards/shard-{000000..000009}.tar -'). A re-run of the same command continues
after the last finished shard.
"""


def _run(args: argparse.Namespace) -> int:
    from cmim.data.shards.writer import write_shards

    res = write_shards(args.src, args.out, args.shard_size, args.max_side, args.workers, args.max_image_pixels)
    print(f"{res['samples']} samples in {res['shards']} shards ({res['bytes'] / 1e6:.1f} MB): {res['pattern']}")
    if res["skipped"]:
        print(f"{res['skipped']} unreadable images skipped, listed in {res['skip_list']}")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "shards", help="write an image folder as WebDataset tar shards (for data.name=shards)",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="image folder (class sub-folders give labels, as with data.name=folder)")
    p.add_argument("out", help="output folder: shard-000000.tar, ..., index.json, skipped.txt")
    p.add_argument("--shard-size", type=int, required=True, metavar="N", help="samples per shard")
    p.add_argument("--max-side", type=int, default=None, metavar="S",
                   help="shrink images whose longer side is above S to S (re-encoded: PNG, JPEG for JPEG files); "
                        "default: every file's bytes as they are")
    p.add_argument("--workers", type=int, default=1, help="processes that decode and shrink (default 1)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help="skip images whose header declares more pixels (default: PIL's limit, as in the data config)")
    p.set_defaults(func=_run)
