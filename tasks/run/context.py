"""What every unit of a run needs: the run's context (keys, folders, config) and the per-process resources."""

from __future__ import annotations

import functools
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import pyarrow.parquet as pq

from models.matcher import Vocabulary
from storage import schemas
from storage.atomic import read_json
from storage.layout import RunLayout, shard_records
from storage.manifest import PlanManifest
from storage.records import ImageRecord, VerifiedImage
from tasks.config import PipelineConfig
from tasks.images import load_image

T = TypeVar("T")


@dataclass(frozen=True)
class RunContext:
    """Small and picklable (it crosses into Prefect tasks): where the run is, its chain of stage keys and
    folders, its config.

    run_key: the run's key (the last stage's); plan_key: the plan folder; stage_keys: (stage, key) pairs;
    folders: (stage, folder) pairs, from the stage registry when the run was started.
    """

    root: str
    dataset: str
    run_key: str
    images_root: str
    captions_file: str | None
    config_json: str  # PipelineConfig as JSON, so the context stays hashable and picklable
    plan_key: str | None = None
    stage_keys: tuple[tuple[str, str], ...] = field(default=())
    folders: tuple[tuple[str, str], ...] = field(default=())

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.root, self.dataset, self.run_key, self.plan_key, self.stage_keys, self.folders)

    @functools.cached_property
    def config(self) -> PipelineConfig:
        return PipelineConfig.model_validate_json(self.config_json)

    def key(self, stage: str) -> str:
        return dict(self.stage_keys).get(stage, self.run_key)


# -- per-process resources: models are loaded once per worker process, not per batch ------------------------

_RESOURCES: OrderedDict = OrderedDict()
_RESOURCES_LOCK = threading.Lock()
#: resources kept per process (a run's captioners, a parser, ...): the least recently used goes first
MAX_RESOURCES = 8


def process_resource(key: tuple, build: Callable[[], T]) -> T:
    """The object `build()` makes for `key` (e.g. ("captioners", config JSON, captions file)), built once per
    worker process and reused by every batch and stage thread after it."""
    with _RESOURCES_LOCK:
        if key in _RESOURCES:
            _RESOURCES.move_to_end(key)
            return _RESOURCES[key]
        obj = build()  # under the lock: two stage threads never load the same model twice
        _RESOURCES[key] = obj
        while len(_RESOURCES) > MAX_RESOURCES:
            _RESOURCES.popitem(last=False)
        return obj


def clear_process_resources() -> None:
    """Forget every per-process resource (tests and benchmarks that swap a model in)."""
    with _RESOURCES_LOCK:
        _RESOURCES.clear()


@functools.lru_cache(maxsize=8)
def plan_manifest(ctx: RunContext) -> PlanManifest:
    layout = ctx.layout
    return PlanManifest.from_dict(read_json(layout.fs, layout.plan_manifest))


@functools.lru_cache(maxsize=4)
def shard_images(ctx: RunContext, shard: int) -> tuple[ImageRecord, ...]:
    return tuple(shard_records(ctx.layout, shard))


def batch_images(ctx: RunContext, shard: int, batch: int) -> list[ImageRecord]:
    bs = ctx.config.plan.batch_size
    return list(shard_images(ctx, shard)[batch * bs : (batch + 1) * bs])


def read_stage(ctx: RunContext, stage: str, record: type, shard: int, batch: int) -> list:
    """The rows a stage wrote for one batch, as records."""
    layout = ctx.layout
    with layout.fs.open(layout.stage_batch(stage, shard, batch), "rb") as f:
        return schemas.from_table(pq.read_table(f), record)


def verified_images(ctx: RunContext, shard: int, batch: int) -> list[ImageRecord]:
    """The planned images of a batch that the verify stage decoded in full, in plan order."""
    ok = {v.image_id for v in read_stage(ctx, "verify", VerifiedImage, shard, batch)}
    return [im for im in batch_images(ctx, shard, batch) if im.image_id in ok]


@functools.lru_cache(maxsize=4)
def vocabulary(categories_json: str, name: str, extensions: bool = False) -> Vocabulary:
    return Vocabulary.from_categories(json.loads(categories_json), name, extensions)


def run_vocabulary(ctx: RunContext) -> Vocabulary:
    """The run's vocabulary over its plan's categories (cached per process), with the synonym extensions when
    the config matches in correct mode with extensions on."""
    m = ctx.config.match
    return vocabulary(
        json.dumps(plan_manifest(ctx).categories, sort_keys=True), m.vocabulary,
        m.extensions and m.mode == "correct",
    )  # fmt: skip


def load_pixels(ctx: RunContext, images: list[ImageRecord], stage: str):
    """Decode the images a stage needs: (kept records, PIL images, quarantined records)."""
    pixels, quarantined, kept = [], [], []
    for im in images:
        img, q = load_image(ctx.images_root, im, stage=stage)
        if q is not None:
            quarantined.append(q)
        else:
            kept.append(im)
            pixels.append(img)
    return kept, pixels, quarantined
