"""WebDataset tar shards: ``cmim shards`` writes them from an image folder; ``data.name: shards`` reads them with
random access (local files, brace patterns, ``http(s)://`` and ``pipe:`` sources)."""

from cmim.data.shards.dataset import ShardDataset, build_shard_dataset, resolve_shards
from cmim.data.shards.writer import write_shards

__all__ = ["ShardDataset", "build_shard_dataset", "resolve_shards", "write_shards"]
