"""Where everything lives under one output root (local path or fsspec URI)."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs

#: Per-batch stage outputs, in pipeline order.
BATCH_STAGES = ("caption", "parse", "match", "tag", "threshold")
#: Folder of each stage's per-batch Parquet output.
STAGE_DIRS = {
    "caption": "captions",
    "parse": "parses",
    "match": "candidates",
    "tag": "tags",
    "threshold": "accepted",
}


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def batch_name(batch: int) -> str:
    return f"batch-{batch:05d}"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run: `<root>/<dataset>/<run_key>/...` (see DESIGN.md, Records and storage)."""

    root: str
    dataset: str
    run_key: str

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return url_to_fs(self.root)[0]

    @property
    def base(self) -> str:
        return posixpath.join(url_to_fs(self.root)[1], self.dataset, self.run_key)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    @property
    def manifest(self) -> str:
        return self.path("manifest.json")

    def images(self, shard: int) -> str:
        return self.path("images", f"{shard_name(shard)}.parquet")

    def stage_batch(self, stage: str, shard: int, batch: int) -> str:
        return self.path(STAGE_DIRS[stage], shard_name(shard), f"{batch_name(batch)}.parquet")

    def quarantine(self, stage: str, shard: int | None = None, batch: int | None = None) -> str:
        if shard is None:
            return self.path("quarantine", stage, "part-00000.parquet")
        return self.path("quarantine", stage, shard_name(shard), f"{batch_name(batch)}.parquet")

    def rejects(self, shard: int, batch: int) -> str:
        return self.path("rejects", shard_name(shard), f"{batch_name(batch)}.parquet")

    def triplets(self, shard: int) -> str:
        return self.path("triplets", f"{shard_name(shard)}.parquet")

    def shard_stats(self, shard: int) -> str:
        return self.path("stats", f"{shard_name(shard)}.json")

    @property
    def run_stats(self) -> str:
        return self.path("stats", "run.json")

    @property
    def ledger_dir(self) -> str:
        return self.path("_ledger")
