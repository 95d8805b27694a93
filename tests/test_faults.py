"""The fault suite: a full disk, SIGTERM, a parse worker killed, a flaky object store, CUDA out-of-memory.

Each fault is injected into a run of the default path (human captions, greedy tagger) and checked against one
invariant: after the fault (and a rerun where the fault stops the run), the triplets are byte-identical to an
uninterrupted run's, and every unit has exactly one ledger record. Kill -9 is tests/test_crash.py's (local) and
tests/test_s3.py's (object store); two workers sharing a run are tests/test_workers.py's.
"""

from __future__ import annotations

import errno
import glob
import os
import signal
import subprocess
import sys
import time

import fsspec
import pytest

from benchmarks.synth import write_dataset
from storage import retry
from storage.ledger import Ledger, Unit
from tasks.config import ParseConfig, PipelineConfig, PlanConfig
from tasks.run.pipeline import run_batch_stage
from tasks.run.registry import batch_stages
from tasks.stages.plan.start import plan_run
from tasks.stages.write import finalize_shard
from tests.flaky_fs import FlakyMemoryFileSystem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: 40 images in 2 shards of 20, batches of 10: 2 x 2 batches x 5 stages + 2 shard writes
CFG = PipelineConfig(dataset="f", plan=PlanConfig(shard_size=20, batch_size=10))
N_UNITS = 4 * len(batch_stages()) + 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("ds")), 40, seed=11)


def run_units(ds, out: str, cfg: PipelineConfig = CFG) -> tuple[object, list[str]]:
    """Every unit of the run in this process, in order, as the flow's run_shard does: a failed unit stops the
    later stages of its batch, the other batches go on, a shard is written only when all its units are done.
    Returns (context, failed units as 'stage/shard-XXXXX/batch-XXXXX: error')."""
    ctx, plan = plan_run(ds["detections"], ds["images_root"], out, ds["captions"], "f", cfg)
    failed = []
    for sh in plan.shards:
        ok = True
        for b in range(sh.batches):
            for name in batch_stages():
                try:
                    run_batch_stage(ctx, name, sh.shard, b)
                except Exception as e:
                    failed.append(f"{Unit(name, sh.shard, b).rel()}: {type(e).__name__}: {e}")
                    ok = False
                    break
        if ok:
            finalize_shard(ctx, sh.shard, sh.batches)
    return ctx, failed


def triplet_bytes(ctx) -> dict[str, bytes]:
    fs, layout = ctx.layout.fs, ctx.layout
    return {str(s): fs.cat_file(layout.triplets(s)) for s in range(2)}


def done_records(ctx) -> dict[str, dict]:
    """{unit: its done record}; asserts there is exactly one record per unit of the plan."""
    ledger = Ledger(ctx.layout)
    snap = ledger.snapshot()
    units = [Unit(n, s, b) for s in range(2) for b in range(2) for n in batch_stages()]
    units += [Unit("write", s) for s in range(2)]
    assert sorted(snap["done"]) == sorted(u.rel() for u in units) and not snap["failed"]
    return {u.rel(): ledger.read(u) for u in units}


@pytest.fixture(scope="module")
def clean(dataset, tmp_path_factory):
    """An uninterrupted run: its triplet bytes."""
    ctx, failed = run_units(dataset, str(tmp_path_factory.mktemp("clean") / "out"))
    assert not failed
    out = triplet_bytes(ctx)
    assert all(len(b) > 1000 for b in out.values())  # shards with rows: the comparisons are not of nothing
    return out


def _temporaries(out: str) -> list[str]:
    return glob.glob(os.path.join(out, "**", ".*.tmp-*"), recursive=True)


# -- disk full ------------------------------------------------------------------------------------------------


def test_disk_full_while_writing_a_batch_fails_the_unit_and_a_rerun_completes(
    dataset, clean, tmp_path, monkeypatch
):
    import storage.atomic as atomic

    out = str(tmp_path / "out")
    real = atomic.ParquetBatchWriter.write

    def full_disk(self, table):
        if "/parses/" in self.path and self.path.endswith("batch-00001.parquet"):
            real(self, table)  # part of the file reached the disk, then the disk filled up
            self._f.flush()
            raise OSError(errno.ENOSPC, "No space left on device", self.path)
        return real(self, table)

    monkeypatch.setattr(atomic.ParquetBatchWriter, "write", full_disk)
    ctx, failed = run_units(dataset, out)
    assert [f.split(":")[0] for f in failed] == [
        "parse/shard-00000/batch-00001",
        "parse/shard-00001/batch-00001",
    ]
    assert all("No space left on device" in f for f in failed)
    layout, ledger = ctx.layout, Ledger(ctx.layout)
    snap = ledger.snapshot()
    assert snap["failed"] == {"parse/shard-00000/batch-00001", "parse/shard-00001/batch-00001"}
    after_parse = len(batch_stages()) - batch_stages().index("parse")  # parse and the batch stages after it
    assert (
        len(snap["done"]) == N_UNITS - 2 * after_parse - 2
    )  # the failed batches' parse..threshold, both writes
    for s in range(2):
        assert not os.path.exists(
            layout.stage_batch("parse", s, 1)
        )  # nothing half-written under the real name
        assert not os.path.exists(layout.triplets(s))
    assert _temporaries(out) == []  # the partial temporary was removed when the write failed
    monkeypatch.setattr(atomic.ParquetBatchWriter, "write", real)  # space freed
    ctx, failed = run_units(dataset, out)
    assert not failed
    assert triplet_bytes(ctx) == clean
    records = done_records(ctx)
    assert records["parse/shard-00000/batch-00001"]["attempts"] == 2  # it failed once, was done once
    assert all(r["storage_retries"] == 0 for r in records.values())  # a full disk is not retried as transient


# -- SIGTERM ---------------------------------------------------------------------------------------------------


def _cli(ds, out):
    return [
        sys.executable, "-m", "flows.cli", "run", "--annotations", ds["detections"], "--images", ds["images_root"],
        "--captions", ds["captions"], "--out", out, "--dataset", "f", "--shard-size", "20", "--batch-size", "10",
    ]  # fmt: skip


@pytest.mark.slow
def test_sigterm_stops_a_run_cleanly_and_the_rerun_completes(dataset, clean, tmp_path):
    out = str(tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": ROOT, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    markers = lambda: glob.glob(os.path.join(out, "f", "*", "_ledger", "**", "*.done.json"), recursive=True)  # noqa: E731
    proc = subprocess.Popen(
        _cli(dataset, out), env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while len(markers()) < 3:
            assert proc.poll() is None, f"the run ended before the signal: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.02)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        stopped_in = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err[-3000:]  # 128 + SIGTERM, as a shell reports it
    assert "reltag run: SIGTERM: stopping" in err and stopped_in < 30
    # the run's own temporary Prefect server went down with it: nothing of its session is left
    assert subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).returncode == 1
    at_stop = len(markers())
    assert 3 <= at_stop < N_UNITS
    ctx, _ = plan_run(dataset["detections"], dataset["images_root"], out, dataset["captions"], "f", CFG)
    ledger = Ledger(ctx.layout)
    for unit in ledger.snapshot()["done"]:  # every recorded unit's output is complete and readable
        stage, shard, batch = unit.split("/")
        if stage != "write":
            import pyarrow.parquet as pq

            pq.read_table(ctx.layout.stage_batch(stage, int(shard[6:]), int(batch[6:])))
    r = subprocess.run(_cli(dataset, out), env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert triplet_bytes(ctx) == clean
    records = done_records(ctx)
    # in-flight units finished and were recorded; the others had not started: none ran twice
    assert all(rec["attempts"] == 1 for rec in records.values())


# -- a parse worker process killed -----------------------------------------------------------------------------


def test_a_parse_worker_killed_fails_its_batch_and_a_rerun_completes(dataset, clean, tmp_path, monkeypatch):
    from models import scene_graph

    cfg = CFG.model_copy(update={"parse": ParseConfig(processes=2)})  # "processes" is not in the parse key
    parser = scene_graph.SceneGraphParser(
        cfg.parse.spacy_model, processes=2, gemm=cfg.parse.gemm, min_texts_for_processes=1, chunk_size=4
    )
    monkeypatch.setitem(scene_graph._CACHE, (cfg.parse.spacy_model, 2, cfg.parse.gemm), parser)
    real = scene_graph.SceneGraphParser._parse_in_workers
    killed = []

    def kill_a_worker_then_parse(self, distinct):
        if not killed and self._pool is not None:  # the second batch: the pool's worker is up
            proc = next(iter(self._pool._processes.values()))
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            killed.append(proc.pid)
            deadline = time.time() + 20
            while not self._pool._broken and time.time() < deadline:
                time.sleep(0.01)  # the executor notices the death and refuses new work
        return real(self, distinct)

    monkeypatch.setattr(scene_graph.SceneGraphParser, "_parse_in_workers", kill_a_worker_then_parse)
    out = str(tmp_path / "out")
    try:
        ctx, failed = run_units(dataset, out, cfg)
        assert killed and [f.split(":")[0] for f in failed] == ["parse/shard-00000/batch-00001"]
        assert "a scene-graph worker process died" in failed[0]
        assert not os.path.exists(ctx.layout.stage_batch("parse", 0, 1))
        ctx, failed = run_units(dataset, out, cfg)  # a fresh pool parses the batch
        assert not failed and parser.last_used_processes == 2
    finally:
        parser.close()
    assert triplet_bytes(ctx) == clean
    assert done_records(ctx)["parse/shard-00000/batch-00001"]["attempts"] == 2


# -- the object store failing every third request --------------------------------------------------------------


@pytest.fixture
def flaky(monkeypatch):
    fsspec.register_implementation("flakymem", FlakyMemoryFileSystem, clobber=True)
    FlakyMemoryFileSystem.reset()
    # the production policy's shape, with millisecond waits (the schedule itself is tested in test_storage.py)
    monkeypatch.setattr(retry, "POLICY", retry.RetryPolicy(attempts=6, base=0.001, cap=0.004))
    yield FlakyMemoryFileSystem
    FlakyMemoryFileSystem.reset()


def test_object_store_failing_every_third_request_is_retried_and_counted(dataset, clean, flaky):
    flaky.fail_every(3, budget=60)
    before = retry.total_retries()
    ctx, failed = run_units(dataset, "flakymem://bucket/out")
    assert not failed
    assert flaky.failures == 60  # the store did fail, 60 times, every third request while it was flaky
    assert retry.total_retries() - before == 60  # each failure was retried (none read as an answer)
    assert triplet_bytes(ctx) == clean
    records = done_records(ctx)
    assert all(r["attempts"] == 1 for r in records.values())  # retried inside the unit, never redone
    assert sum(r["storage_retries"] for r in records.values()) > 0  # counted in the units' ledger records


def test_without_retries_the_flaky_store_fails_the_run(dataset, flaky, monkeypatch):
    """The control: the same faults with one attempt per operation stop the run."""
    monkeypatch.setattr(retry, "POLICY", retry.RetryPolicy(attempts=1))
    flaky.fail_every(3, budget=60)
    with pytest.raises(ConnectionResetError, match="injected"):
        run_units(dataset, "flakymem://bucket/out")


# -- CUDA out of memory in the captioner -----------------------------------------------------------------------


def test_cuda_oom_in_the_captioner_halves_the_micro_batch_and_gives_the_same_captions(tmp_path):
    """tests/test_caption*.py raise the OOM from a wrapper around the captioner; here it comes from inside the
    real (tiny) BLIP, its vision encoder's forward, as it would on a GPU, twice in a row, then always."""
    import torch

    from models.captioners.blip import BlipCaptioner
    from tasks.config import CaptionConfig
    from tasks.stages.caption import caption_batch
    from tests.tiny_models import SIZE, build_tiny_blip, draw_images

    images = draw_images(str(tmp_path), 4)
    cap = BlipCaptioner.load(build_tiny_blip(str(tmp_path / "blip")), image_size=SIZE, n_cap=3, max_length=12)
    cfg = CaptionConfig(captioner="blip", batch_size=4)
    ref = caption_batch(images, [cap], str(tmp_path), seed=7, cfg=cfg)
    vision = cap.model.vision_model
    real, calls = vision.forward, []

    def forward(*a, **k):
        calls.append(k.get("pixel_values", a[0] if a else None).shape[0])
        if len(calls) <= 2:  # the first two calls run out of GPU memory
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)

    vision.forward = forward
    got = caption_batch(images, [cap], str(tmp_path), seed=7, cfg=cfg)
    assert calls == [4, 2, 1, 1, 1, 1]  # 4 images: OOM, halved to 2: OOM, halved to 1, then one at a time
    assert got.stats["oom_halvings"] == 2 and got.stats["micro_batch"] == 1
    assert ref.stats["oom_halvings"] == 0
    assert (
        got.captions == ref.captions and len(ref.captions) == 12
    )  # per-image seeds: the split changes no caption

    def always(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    vision.forward = always
    with pytest.raises(torch.cuda.OutOfMemoryError):  # at one image there is nothing left to halve
        caption_batch(images, [cap], str(tmp_path), seed=7, cfg=cfg)


# -- CUDA out of memory in the tagger --------------------------------------------------------------------------


def test_cuda_oom_in_the_tagger_halves_the_groups_per_forward_and_gives_the_same_scores(monkeypatch):
    import torch

    import tasks.stages.tag.rtagger as rtagger_stage
    from tasks.config import TagConfig
    from tasks.stages.tag.rtagger import tag_batch_rtagger
    from tests.test_rtagger import _candidates, _image
    from tests.test_rtagger import runner as runner_fixture

    runner = runner_fixture.__wrapped__()
    im, px = _image(1, 9, width=64, height=48)
    cands = _candidates(im, 64)
    cfg = TagConfig(tagger="rtagger", n_q=2)  # 64 pairs in 32 groups of 2: 2 forwards of 16 groups
    # the uninterrupted run decodes 4 groups per forward, the size the halved run ends at: the same float32
    # computation (a run at 16 groups per forward may round differently, GEMMs with other row counts; that the
    # groups do not interact is test_rlipv2_parity's, within a derived bound)
    monkeypatch.setattr(rtagger_stage, "GROUPS_PER_FORWARD", 4)
    ref, ref_stats = tag_batch_rtagger([im], [px], cands, runner, cfg)
    monkeypatch.undo()
    model = runner.model
    real, groups = model.decode, []

    def decode(state, img_index, *a, **k):
        groups.append(len(img_index))
        if len(groups) <= 2:  # the first two decoder forwards run out of GPU memory
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real(state, img_index, *a, **k)

    model.decode = decode
    try:
        rows, stats = tag_batch_rtagger([im], [px], cands, runner, cfg)
        assert groups == [16, 8] + [4] * 8  # 16 groups: OOM, 8: OOM, then 4 per forward
        assert stats["oom_halvings"] == 2 and ref_stats["oom_halvings"] == 0
        assert stats["groups"] == ref_stats["groups"] == 32 and len(rows) == len(ref) == len(cands)
        key = lambda r: (r.subject_ann_id, r.object_ann_id, r.relation)  # noqa: E731
        got = {key(r): r for r in rows}
        # the OOM-halved run equals the uninterrupted run at its final size in every row, rank and score
        for r in ref:
            g = got[key(r)]
            assert g.relation_rank == r.relation_rank
            for f in ("p_subject", "p_object", "p_relation", "confidence"):
                assert getattr(g, f) == getattr(r, f), (key(r), f, getattr(g, f), getattr(r, f))

        def always(*a, **k):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

        model.decode = always
        with pytest.raises(torch.cuda.OutOfMemoryError):  # at one group per forward nothing is left to halve
            tag_batch_rtagger([im], [px], cands, runner, cfg)
    finally:
        del model.decode
