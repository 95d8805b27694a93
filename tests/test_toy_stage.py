"""A stage is one object: a toy stage registered from this file alone shows up in the keys, the ledger, `status`,
the funnel, its output folder and `reltag run --help`, and a changed setting of it redoes only it and the write."""

from __future__ import annotations

import glob
import json
import os
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel, ConfigDict, Field

from benchmarks.synth import write_dataset
from flows.cli import main
from flows.params import LabelParams
from flows.status import find_runs, run_status
from storage.records import Triplet
from tasks.config import PipelineConfig, cli
from tasks.run import pipeline, registry
from tasks.run.context import RunContext, read_stage
from tasks.run.registry import FunnelRow, Stage, StageOutput, chain
from tasks.stats import Count, Stats, Tally


@dataclass(slots=True)
class ToyRow:
    image_id: int
    weighted_triplets: int


TOY_SCHEMA = pa.schema([("image_id", pa.int64(), False), ("weighted_triplets", pa.int64(), False)])


class ToyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    weight: int = Field(
        1, ge=1, description="what each triplet counts for", json_schema_extra=cli("toy-weight")
    )


def _toy_batch(ctx: RunContext, shard: int, batch: int) -> StageOutput:
    """Per image of the batch with accepted triplets: their number times the weight."""
    weight = ctx.config.section("toy").weight
    per_image = Counter(t.image_id for t in read_stage(ctx, "threshold", Triplet, shard, batch))
    rows = [ToyRow(i, n * weight) for i, n in sorted(per_image.items())]
    return StageOutput(
        rows,
        stats=Stats(
            toy_images=Count(len(rows)), toy_small=Tally.of("small" for r in rows if r.weighted_triplets < 2)
        ),
    )


TOY = Stage(
    "toy", "threshold", ToyRow, "toys", "toy",
    settings=lambda cfg: cfg.section("toy").model_dump(mode="json"),
    compute=_toy_batch,
    stats=("toy_images",),
    funnel=(FunnelRow("toy_images", "images the toy stage counted", "toy_images", lambda s: s.tally("toy_small")),),
    config=ToyConfig,
    schema=TOY_SCHEMA,
)  # fmt: skip


@pytest.fixture
def toy():
    registry.register(TOY, before="write")
    try:
        yield TOY
    finally:
        registry.unregister("toy")


def test_toy_stage_is_in_the_help_and_the_config(toy, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "--toy-weight" in help_text and "toy.weight: what each triplet counts for (default: 1)" in help_text
    )
    assert "(sections plan/caption/parse/match/tag/threshold/region/toy)" in help_text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert (
        "label a dataset: plan, verify, caption, parse, match, region, tag, threshold, toy, write"
        in " ".join(capsys.readouterr().out.split())
    )
    assert PipelineConfig().section("toy") == ToyConfig()  # filled with its defaults
    assert PipelineConfig.model_validate({"toy": {"weight": 3}}).section("toy").weight == 3
    with pytest.raises(ValueError, match="weight"):
        PipelineConfig.model_validate({"toy": {"weight": 0}})
    with pytest.raises(ValueError, match="unknown config section 'toys'"):
        PipelineConfig.model_validate({"toys": {}})


def test_without_the_toy_its_section_and_flag_are_unknown(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--toy-weight" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown config section 'toy'"):
        PipelineConfig.model_validate({"toy": {"weight": 3}})


def test_toy_stage_runs_in_the_flow(prefect_harness, toy, tmp_path):
    from flows.label import label_dataset

    ds = write_dataset(str(tmp_path / "ds"), 30, seed=5)
    cfg = PipelineConfig.model_validate({"dataset": "t", "plan": {"batch_size": 10}, "toy": {"weight": 3}})
    params = LabelParams(
        annotations=ds["detections"], images=ds["images_root"], out=str(tmp_path / "out"), captions=ds["captions"],
        config=cfg,
    )  # fmt: skip
    summary = label_dataset(params)
    (run,) = find_runs(params.out)

    # keys: the toy sits between threshold and write; the stages before it keep the keys they have without it
    record = json.loads(open(run.manifest).read())
    links = {c["stage"]: c for c in record["chain"]}
    assert [c["stage"] for c in record["chain"]][-3:] == ["threshold", "toy", "write"]
    assert links["toy"]["settings"] == {"weight": 3} and links["toy"]["upstream"] == links["threshold"]["key"]
    assert links["write"]["upstream"] == links["toy"]["key"]
    inputs = {"annotations_sha256": "a" * 64, "images_root": "/images", "captions_sha256": "c" * 64}
    with_toy = {link.stage: link.key for link in chain(cfg, inputs)[1]}
    registry.unregister("toy")
    try:
        without = {link.stage: link.key for link in chain(cfg, inputs)[1]}
    finally:
        registry.register(TOY, before="write")
    assert all(
        without[s] == with_toy[s]
        for s in ("verify", "caption", "parse", "match", "region", "tag", "threshold")
    )
    assert without["write"] != with_toy["write"] and "toy" not in without
    heavier = PipelineConfig.model_validate({**cfg.model_dump(), "toy": {"weight": 4}})
    changed = {link.stage: link.key for link in chain(heavier, inputs)[1]}
    assert [s for s in with_toy if changed[s] != with_toy[s]] == ["toy", "write"]

    # ledger and status: one toy unit per batch, all done
    done = glob.glob(
        os.path.join(run.base, "_ledger", "toy", links["toy"]["key"], "shard-00000", "*.done.json")
    )
    assert len(done) == 3
    st = run_status(run)
    assert st["complete"] and st["totals"]["toy"] == {"done": 3, "failed": 0, "pending": 0}

    # its own folder and schema, and the funnel row it declared, counted from its rows
    rows = []
    for b in range(3):
        t = pq.read_table(
            os.path.join(run.base, "toys", links["toy"]["key"], "shard-00000", f"batch-{b:05d}.parquet")
        )
        assert t.schema.equals(TOY_SCHEMA)
        rows += t.to_pylist()
    triplets = pq.read_table(run.triplets(0)).to_pylist()
    per_image = Counter(r["image_id"] for r in triplets)
    assert len(per_image) > 0
    assert sorted((r["image_id"], r["weighted_triplets"]) for r in rows) == sorted(
        (i, 3 * n) for i, n in per_image.items()
    )
    stats = json.loads(open(run.run_stats).read())
    funnel = {f["stage"]: f for f in stats["funnel"]}
    assert [f["stage"] for f in stats["funnel"]][-2:] == ["accepted", "toy_images"]
    assert funnel["toy_images"]["count"] == len(per_image) == stats["stages"]["toy"]["toy_images"]
    assert funnel["toy_images"]["dropped"] == {}  # weight 3: every counted image has >= 3
    assert summary["triplets"] == len(triplets)


def test_a_stage_that_leaves_out_a_declared_statistic_fails_naming_it():
    quiet = Stage(
        "quiet", "threshold", ToyRow, "quiet", None, settings=lambda cfg: {},
        compute=lambda ctx, shard, batch: StageOutput([], stats=Stats(other=Count(1))),
        stats=("toy_images",), schema=TOY_SCHEMA,
    )  # fmt: skip
    registry.register(quiet, before="write")
    try:
        with pytest.raises(
            ValueError, match=r"stage 'quiet' reported no statistic \['toy_images'\] for shard 0 batch 2"
        ):
            pipeline.compute(None, "quiet", 0, 2)
    finally:
        registry.unregister("quiet")


def test_registration_refuses_what_would_break_the_pipeline():
    with pytest.raises(ValueError, match="stage 'caption' is already registered"):
        registry.register(TOY.__class__(**{**_fields(TOY), "name": "caption"}))
    with pytest.raises(ValueError, match="folder 'captions' is taken \\(by caption\\)"):
        registry.register(TOY.__class__(**{**_fields(TOY), "folder": "captions"}))
    with pytest.raises(ValueError, match="input stage 'write' is not registered before it"):
        registry.register(TOY.__class__(**{**_fields(TOY), "input": "write"}), before="write")
    with pytest.raises(ValueError, match="would come after the shard-level stage 'write'.*before='write'"):
        registry.register(TOY)
    assert "toy" not in [s.name for s in registry.stages()]


def _fields(st: Stage) -> dict:
    import dataclasses

    return {f.name: getattr(st, f.name) for f in dataclasses.fields(st)}


def test_a_config_built_before_a_section_was_registered_gets_its_defaults():
    """A PipelineConfig made at import time (a flow parameter's default, before the stages registered their
    sections) answers a registered section with its defaults instead of failing in a worker."""
    from pydantic import BaseModel

    from tasks.config import PipelineConfig, register_section, unregister_section

    class LateConfig(BaseModel):
        level: int = 3

    early = PipelineConfig()
    register_section("late_toy", LateConfig)
    try:
        assert early.section("late_toy") == LateConfig()
        with pytest.raises(ValueError, match="config has no section 'never_registered'"):
            early.section("never_registered")
    finally:
        unregister_section("late_toy")
