"""What every unit of a run needs: the run's context (keys, paths, config) and the per-process resources."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from storage import schemas
from storage.layout import RunLayout
from storage.manifest import PlanManifest
from storage.records import ImageRecord
from tasks.config import PipelineConfig


@dataclass(frozen=True)
class RunContext:
    """Small and picklable (it crosses into Prefect tasks): where the run is, its chain of stage keys, config.

    run_key: the run's key (the last stage's); plan_key: the plan folder; stage_keys: (stage, key) pairs.
    """

    root: str
    dataset: str
    run_key: str
    images_root: str
    captions_file: str | None
    config_json: str  # PipelineConfig as JSON, so the context stays hashable and picklable
    plan_key: str | None = None
    stage_keys: tuple[tuple[str, str], ...] = field(default=())

    @property
    def layout(self) -> RunLayout:
        from tasks.run.registry import folders

        return RunLayout(self.root, self.dataset, self.run_key, self.plan_key, self.stage_keys, folders())

    @functools.cached_property
    def config(self) -> PipelineConfig:
        return PipelineConfig.model_validate_json(self.config_json)

    def key(self, stage: str) -> str:
        return dict(self.stage_keys).get(stage, self.run_key)


# -- per-process resources: models are loaded once per worker process, not per batch ------------------------


@functools.lru_cache(maxsize=8)
def plan_manifest(ctx: RunContext) -> PlanManifest:
    from storage.atomic import read_json

    layout = ctx.layout
    return PlanManifest.from_dict(read_json(layout.fs, layout.plan_manifest))


@functools.lru_cache(maxsize=4)
def shard_images(ctx: RunContext, shard: int) -> tuple[ImageRecord, ...]:
    from tasks.stages.plan import shard_records

    return tuple(shard_records(ctx.layout, shard))


def batch_images(ctx: RunContext, shard: int, batch: int) -> list[ImageRecord]:
    bs = ctx.config.plan.batch_size
    return list(shard_images(ctx, shard)[batch * bs : (batch + 1) * bs])


def read_stage(ctx: RunContext, stage: str, record: type, shard: int, batch: int) -> list:
    """The rows a stage wrote for one batch, as records."""
    layout = ctx.layout
    with layout.fs.open(layout.stage_batch(stage, shard, batch), "rb") as f:
        return schemas.from_table(pq.read_table(f), record)


@functools.lru_cache(maxsize=4)
def vocabulary(categories_json: str, name: str):
    from models.matcher import Vocabulary

    return Vocabulary.from_categories(json.loads(categories_json), name)


def load_pixels(ctx: RunContext, images: list[ImageRecord], stage: str):
    """Decode the images a stage needs: (kept records, PIL images, quarantined records)."""
    from tasks.images import load_image

    pixels, quarantined, kept = [], [], []
    for im in images:
        img, q = load_image(ctx.images_root, im, stage=stage)
        if q is not None:
            quarantined.append(q)
        else:
            kept.append(im)
            pixels.append(img)
    return kept, pixels, quarantined
