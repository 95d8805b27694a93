"""The stage registry: every stage of a labelling run, in order, and the chain of keys derived from it.

A Stage owns its name, its input stage, its record type (and so its Arrow schema), its output folder, its
config section, the settings and model revision that change its output (its key), the device it runs on,
whether it writes rejects, the statistics it reports and the funnel rows they make, and the function that
computes one batch. The ledger, `status`, the layout, the funnel, the command line's flags and the GPU slot
all derive from the registry: adding a stage is one module that calls `register` (tasks/stages/ holds the
built-in ones, registered in pipeline order when `tasks.stages` is imported).

Keys chain: key(stage) = hash(stage name, its settings, its revision, key(upstream), pipeline version); the
plan's key hashes the plan settings and the input checksums. A changed setting therefore changes the key of
its stage and of every stage after it, and nothing before it: the outputs of unchanged stages are reused in
place. The run key is the key of the last stage.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pyarrow as pa
from pydantic import BaseModel

from storage import schemas
from storage.manifest import ChainLink
from storage.records import Quarantined
from tasks.config import PipelineConfig, register_section, unregister_section
from tasks.run.context import RunContext
from tasks.stats import Stats

#: Bump when a stage's semantics change, so old results are never mixed with new ones.
PIPELINE_VERSION = "4"  # 3: captions and triplets carry the captions file's annotation ids; 4: the verify
# stage heads the chain and the plan checks image headers


@dataclass(slots=True)
class StageOutput:
    """What a stage computed for one batch: rows (its record type), quarantined records, stats, rejects."""

    rows: list
    quarantined: list[Quarantined] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)
    rejects: list = field(default_factory=list)


@dataclass(frozen=True)
class FunnelRow:
    """One row of a run's funnel: a statistic of its stage, and what was lost on the way to it, by reason
    (computed from the same stage's merged statistics; tasks/audit/summary.py)."""

    step: str
    label: str
    stat: str
    drops: Callable[[Stats], Mapping[str, int]] = lambda stats: {}


def no_revision(cfg: PipelineConfig, inputs: dict) -> str:
    return ""


def cpu(cfg: PipelineConfig) -> str:
    return "cpu"


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    compute(ctx, shard, batch) -> StageOutput for a batch stage; None for a shard-level stage (the write
    stage, tasks/stages/write.py). `stats` names the statistics every batch must report (the funnel's among
    them): run_batch_stage refuses a batch that leaves one out, so a funnel row can never silently read 0.
    `revision_record` = (name, fn): the model identity the run record lists under `revisions[name]`.
    `config`: the model of a section that PipelineConfig does not have built in (registered with the stage).
    """

    name: str
    input: str | None  # upstream stage (None: the plan)
    record: type | None
    folder: str
    section: str | None  # config section the stage reads
    settings: Callable[[PipelineConfig], dict]  # what changes the output (devices and worker counts do not)
    revision: Callable[[PipelineConfig, dict], str] = no_revision  # inputs = {"captions_sha256": ...}
    device: Callable[[PipelineConfig], str] = cpu
    compute: Callable[[RunContext, int, int], StageOutput] | None = None
    rejects: bool = False
    stats: tuple[str, ...] = ()
    funnel: tuple[FunnelRow, ...] = ()
    revision_record: tuple[str, Callable[[PipelineConfig, dict], object]] | None = None
    config: type[BaseModel] | None = None
    schema: pa.Schema | None = None  # default: storage.schemas.SCHEMAS[record]

    @property
    def per_batch(self) -> bool:
        return self.compute is not None

    @property
    def arrow_schema(self) -> pa.Schema:
        return self.schema if self.schema is not None else schemas.SCHEMAS[self.record]


_LOCK = threading.Lock()
_STAGES: list[Stage] = []


def register(st: Stage, *, before: str | None = None) -> Stage:
    """Add a stage to the pipeline: at the end, or just before the stage named `before`.

    Its input must be a stage registered before it (or None: the plan), its name and folder unused, and a
    section not built into PipelineConfig needs its model in `config`. Every stage after the insertion point
    gets a new key (its upstream changed), so nothing already written is reused by mistake."""
    with _LOCK:
        names = [s.name for s in _STAGES]
        if st.name in names:
            raise ValueError(f"stage {st.name!r} is already registered; stages are {names}")
        taken = {s.folder: s.name for s in _STAGES}
        if st.folder in taken or st.folder in _RESERVED_FOLDERS:
            raise ValueError(
                f"stage {st.name!r}: folder {st.folder!r} is taken (by {taken.get(st.folder, 'the layout')})"
            )
        at = len(_STAGES) if before is None else _index(before)
        if st.input is not None and st.input not in names[:at]:
            raise ValueError(
                f"stage {st.name!r}: input stage {st.input!r} is not registered before it ({names[:at]})"
            )
        if st.per_batch and any(not s.per_batch for s in _STAGES[:at]):
            last = next(s.name for s in _STAGES[:at] if not s.per_batch)
            raise ValueError(
                f"batch stage {st.name!r} would come after the shard-level stage {last!r}, which writes the "
                f"product: register it with before={last!r}"
            )
        if st.per_batch and st.record is None:
            raise ValueError(f"batch stage {st.name!r} declares no record type")
        if st.record is not None and st.schema is None and st.record not in schemas.SCHEMAS:
            raise ValueError(
                f"stage {st.name!r}: record {st.record.__name__} has no schema in storage.schemas"
            )
        if st.config is not None:
            register_section(st.section, st.config)
        _STAGES.insert(at, st)
        return st


def unregister(name: str) -> None:
    """Remove a stage (and the config section it brought)."""
    with _LOCK:
        st = _STAGES.pop(_index(name))
        if st.config is not None:
            unregister_section(st.section)


#: folders of the layout that are not a stage's (storage/layout.py)
_RESERVED_FOLDERS = frozenset(
    {"images", "quarantine", "rejects", "stats", "runs", "report", "_ledger", "_leases"}
)


def _index(name: str) -> int:
    for i, s in enumerate(_STAGES):
        if s.name == name:
            return i
    raise ValueError(f"unknown stage {name!r}; stages are {[s.name for s in _STAGES]}")


def stages() -> tuple[Stage, ...]:
    """The pipeline, in order (the built-in stages are registered by importing `tasks.stages`)."""
    if not _STAGES:
        raise RuntimeError("no stage is registered: import tasks.stages (the built-in stages) first")
    return tuple(_STAGES)


def batch_stages() -> tuple[str, ...]:
    """The names of the stages that work batch by batch, in order."""
    return tuple(s.name for s in stages() if s.per_batch)


def last_stage() -> Stage:
    """The shard-level stage that writes the product; its unit per shard says the shard is written."""
    return stages()[-1]


def stage(name: str) -> Stage:
    return stages()[_index(name)]


def folders() -> tuple[tuple[str, str], ...]:
    return tuple((s.name, s.folder) for s in stages())


def _hash(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def plan_key(cfg: PipelineConfig, inputs: dict) -> str:
    """The plan's key: plan settings, the annotation file's checksum and the image root (the plan checks the
    images, so a plan made against one folder is not reused for another)."""
    return _hash(
        {"stage": "plan", "settings": cfg.plan.model_dump(mode="json", exclude={"image_threads"}),
         "inputs": {"annotations_sha256": inputs["annotations_sha256"], "images_root": inputs.get("images_root")},
         "pipeline": PIPELINE_VERSION}
    )  # fmt: skip


def chain(cfg: PipelineConfig, inputs: dict) -> tuple[str, list[ChainLink]]:
    """(plan key, one ChainLink per stage in order): each stage's key chains to its upstream's."""
    upstream = plan_key(cfg, inputs)
    plan = upstream
    links = []
    for s in stages():
        settings, revision = s.settings(cfg), s.revision(cfg, inputs)
        key = _hash(
            {"stage": s.name, "settings": settings, "revision": revision, "upstream": upstream,
             "pipeline": PIPELINE_VERSION}
        )  # fmt: skip
        links.append(ChainLink(s.name, key, upstream, settings, revision))
        upstream = key
    return plan, links


def revisions(cfg: PipelineConfig, inputs: dict) -> dict:
    """The model and parser revisions of the run's stages (they are part of the stage keys), for the record."""
    out = {}
    for s in stages():
        if s.revision_record is not None:
            name, fn = s.revision_record
            out[name] = fn(cfg, inputs)
    return {**out, "pipeline": PIPELINE_VERSION}
