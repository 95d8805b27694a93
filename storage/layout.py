"""Where everything lives under one output root (local path or fsspec URI).

```
<root>/<dataset>/<plan_key>/plan.json                                   the plan: inputs, shards, counts, categories
                            images/shard-00000.parquet                  planned images with their boxes
                            <folder>/<stage_key>/shard-00000/batch-00000.parquet   captions/, parses/, ...
                            quarantine/plan/..., quarantine/<stage>/<stage_key>/shard-00000/batch-00000.parquet
                            rejects/<threshold_key>/shard-00000/batch-00000.parquet
                            triplets/<run_key>/shard-00000.parquet      the product of one run
                            stats/<run_key>/shard-00000.json, run.json
                            runs/<run_key>.json                         the run: its chain of stage keys, config
                            _ledger/<stage>/<stage_key>/shard-00000/batch-00000.done.json
```

A stage's key hashes its own output-changing settings, its model revision and its upstream stage's key
(tasks/run/registry.py), so runs that agree up to a stage share that stage's outputs in place; the run key is the
key of the last stage. Folder names per stage come from the stage registry through `folders`.

Object stores: the root (like the annotations, captions and images) may be any fsspec URL (s3://, gs://,
file://). Endpoint and credentials come from the environment every worker process shares, never from the run's
config: fsspec's per-protocol settings (FSSPEC_S3_ENDPOINT_URL=http://host:9000, or FSSPEC_S3='{"endpoint_url":
..., "key": ...}', or a JSON file in ~/.config/fsspec/) become S3FileSystem(endpoint_url=...) arguments, and
botocore reads AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and the AWS_* credentials itself.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

import fsspec
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from storage import schemas
from storage.records import ImageRecord
from storage.retry import retrying


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def batch_name(batch: int) -> str:
    return f"batch-{batch:05d}"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run.

    root, dataset: where; run_key: the run's key (the last stage's); plan_key: the plan folder (default
    run_key: a layout used for planning alone); stage_keys / folders: (stage, key) and (stage, folder) pairs
    of the run's chain (a stage not listed uses run_key / its own name).
    """

    root: str
    dataset: str
    run_key: str
    plan_key: str | None = None
    stage_keys: tuple[tuple[str, str], ...] = ()
    folders: tuple[tuple[str, str], ...] = ()

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The root's filesystem, its idempotent operations retried on transient errors (storage.retry)."""
        return retrying(url_to_fs(self.root)[0])

    @property
    def base(self) -> str:
        """The plan folder: every run of this plan lives inside it."""
        return posixpath.join(url_to_fs(self.root)[1], self.dataset, self.plan_key or self.run_key)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    def key(self, stage: str) -> str:
        return dict(self.stage_keys).get(stage, self.run_key)

    def folder(self, stage: str) -> str:
        return dict(self.folders).get(stage, stage)

    @property
    def plan_manifest(self) -> str:
        return self.path("plan.json")

    @property
    def manifest(self) -> str:
        """The run's record: the plan's manifest plus the run's chain of stage keys, config and revisions."""
        return self.path("runs", f"{self.run_key}.json")

    def images(self, shard: int) -> str:
        return self.path("images", f"{shard_name(shard)}.parquet")

    def stage_batch(self, stage: str, shard: int, batch: int) -> str:
        return self.path(
            self.folder(stage), self.key(stage), shard_name(shard), f"{batch_name(batch)}.parquet"
        )

    def quarantine(self, stage: str, shard: int | None = None, batch: int | None = None) -> str:
        if shard is None:
            return self.path("quarantine", stage, "part-00000.parquet")
        return self.path(
            "quarantine", stage, self.key(stage), shard_name(shard), f"{batch_name(batch)}.parquet"
        )

    def rejects(self, shard: int, batch: int) -> str:
        return self.path("rejects", self.key("threshold"), shard_name(shard), f"{batch_name(batch)}.parquet")

    def triplets(self, shard: int) -> str:
        return self.path("triplets", self.run_key, f"{shard_name(shard)}.parquet")

    def shard_stats(self, shard: int) -> str:
        return self.path("stats", self.run_key, f"{shard_name(shard)}.json")

    @property
    def run_stats(self) -> str:
        return self.path("stats", self.run_key, "run.json")

    @property
    def ledger_dir(self) -> str:
        return self.path("_ledger")


def shard_records(layout: RunLayout, shard: int) -> list[ImageRecord]:
    """The planned images of one shard (`images/shard-XXXXX.parquet`), as ImageRecords."""
    with layout.fs.open(layout.images(shard), "rb") as f:
        return schemas.from_table(pq.read_table(f, schema=schemas.IMAGES), ImageRecord)
