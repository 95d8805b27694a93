"""Pre-training: defaults, resumable data order and RNG, kill -9 and resume equality, DDP on gloo, the flow."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from models.rlipv2.pretrain import param_groups
from models.rlipv2.pretrain_data import EpochBatches, batch_predicates, open_sources
from models.rlipv2.pretrain_settings import PretrainSettings
from models.rlipv2.pretrain_state import CheckpointStore, LossLog, rng_state, set_rng_state


def _weights_hash(model) -> str:
    """sha256 of every weight of a model, in state-dict order: equal exactly when the weights are."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


REPO = Path(__file__).resolve().parent.parent
VG = str(REPO / "examples" / "vg_tiny" / "relationships.json")
VG_IDS = [1000, 1001, 1002, 1003]


def test_defaults_are_the_reference_pretraining_settings():
    # scripts/RLIP_ParSeD/train_RLIP_ParSeD_v2_mixed_vgcocoo365_resnet.sh + main.py defaults (see PretrainSettings)
    s = PretrainSettings()
    assert (s.lr, s.lr_backbone, s.lr_text_encoder, s.weight_decay) == (1.41e-4, 1.41e-5, 1.41e-5, 1e-4)
    assert (s.epochs, s.lr_drop, s.batch_size, s.clip_max_norm, s.num_queries, s.seed) == (
        20,
        15,
        4,
        0.1,
        200,
        42,
    )
    assert (s.eta, s.rule, s.overlap_filter, s.max_relations) == (0.2, "relation_only", False, 100)
    # the paper's main model by default; each model's script sets its own images per GPU
    assert s.model == "parseda" and PretrainSettings(model="parsed").batch_size == 8
    assert PretrainSettings(model="parsed", batch_size=3).batch_size == 3
    with pytest.raises(ValueError, match="model 'detr' is not one of"):
        PretrainSettings(model="detr")
    # the model is part of the run's identity
    from models.rlipv2.pretrain_state import run_identity

    ident = {m: run_identity([VG], PretrainSettings(model=m, batch_size=2), 1) for m in ("parsed", "parseda")}
    assert ident["parsed"] != ident["parseda"]


def test_epoch_batches_resume_mid_epoch_gives_the_remaining_batches():
    full = list(EpochBatches(10, 3, seed=7, epoch=2, start=0, steps=3))
    assert len(full) == 3 and all(len(b) == 3 for b in full)  # the 10th index is dropped (drop_last)
    assert len({i for b in full for i in b}) == 9
    assert list(EpochBatches(10, 3, seed=7, epoch=2, start=1, steps=3)) == full[1:]
    # another epoch is another order, the same epoch the same order
    assert list(EpochBatches(10, 3, seed=7, epoch=3, start=0, steps=3)) != full
    assert list(EpochBatches(10, 3, seed=7, epoch=2, start=0, steps=3)) == full


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    from models.rlipv2.checkpoint import load_training_state, save_training_state

    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    st = rng_state()
    expect = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    save_training_state({"rng": [st], "step": 5}, tmp_path / "s.pt")
    loaded = load_training_state(tmp_path / "s.pt")  # weights_only=True inside
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    set_rng_state(loaded["rng"][0])
    got = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(got[0], expect[0]) and np.array_equal(got[1], expect[1])
    assert got[2] == expect[2] and got[3] == expect[3] and loaded["step"] == 5
    assert not list(tmp_path.glob(".*tmp*"))  # written under a temporary name, then renamed


def test_vg_sources_shard_disjointly_and_cover_every_image():
    s = PretrainSettings()
    shards = [[im.image_id for im in open_sources([VG], s, r, 3)] for r in range(3)]
    # contiguous blocks, as for runs: rank r takes [r * 4 // 3, (r + 1) * 4 // 3) = [0, 1), [1, 2), [2, 4)
    assert shards == [[1000], [1001], [1002, 1003]]
    one = open_sources([VG], s, 0, 1)
    assert [im.image_id for im in one] == VG_IDS
    assert all(os.path.isabs(im.file_name) and os.path.isfile(im.file_name) for im in one)
    # two files mix (in order), max_relations keeps the first relations in file order
    two = open_sources([VG, VG], PretrainSettings(max_relations=2), 0, 1)
    assert len(two) == 8 and [len(im.relationships) for im in two[:1]] == [2]
    assert [(r.subject_id, r.object_id) for r in two[0].relationships] == [(1, 2), (2, 3)]
    assert batch_predicates([one[0], one[1]]) == ["riding on", "next to", "in front of", "on", "holding"]


def test_open_sources_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="abc.json does not exist"):
        open_sources([str(tmp_path / "runs" / "abc.json")], PretrainSettings())
    record = tmp_path / "runs" / "0123456789abcdef.json"
    record.parent.mkdir()
    record.write_text(json.dumps({"run_key": "0123456789abcdef", "chain": []}))
    with pytest.raises(
        ValueError, match="not a VG-format relationships file .a JSON list of images.; a label"
    ):
        open_sources([str(record)], PretrainSettings())  # a run record without its plan folder
    seen = {}

    def factory(sources, **kw):  # the RelationDataset signature
        seen.update(kw, sources=sources)
        return [1, 2]

    assert open_sources(["x"], PretrainSettings(eta=0.3), 1, 2, factory) == [1, 2]
    assert seen == {"sources": ["x"], "eta": 0.3, "rule": "relation_only", "overlap_filter": False,
                    "max_relations": 100, "rank": 1, "world_size": 2}  # fmt: skip


@pytest.mark.parametrize(
    "model_name, learned", [("parsed", "query_embed.weight"), ("parseda", "tgt_embed.weight")]
)
def test_param_groups_follow_the_reference_names(model_name, learned):
    from models.rlipv2.pretrain import build_model

    model = build_model(PretrainSettings(tiny=True, model=model_name), lambda: ["a b"])
    assert type(model).__name__ == {"parsed": "RLIPv2ParSeD", "parseda": "RLIPv2ParSeDA"}[model_name]
    g = param_groups(model, PretrainSettings())
    names = {id(p): n for n, p in model.named_parameters()}
    assert [x["lr"] for x in g] == [1.41e-4, 1.41e-5, 1.41e-5]
    assert all(names[id(p)].startswith("backbone.") for p in g[1]["params"])
    assert all("transformer.text_encoder." in names[id(p)] for p in g[2]["params"])
    rest = {names[id(p)] for p in g[0]["params"]}
    assert learned in rest and not any("backbone" in n or "text_encoder" in n for n in rest)
    assert sum(len(x["params"]) for x in g) == len(list(model.parameters()))


def test_init_checkpoint_of_the_other_model_is_refused(tmp_path):
    from models.rlipv2.checkpoint import save_checkpoint
    from models.rlipv2.pretrain import build_model

    parsed = build_model(PretrainSettings(tiny=True, model="parsed"), lambda: ["a b"])
    save_checkpoint(parsed, tmp_path / "parsed")
    again = build_model(PretrainSettings(model="parsed", init_checkpoint=str(tmp_path / "parsed")), list)
    assert type(again) is type(parsed)
    with pytest.raises(ValueError, match="holds RLIPv2-parsed, but the settings train model 'parseda'"):
        build_model(PretrainSettings(init_checkpoint=str(tmp_path / "parsed")), list)


def test_a_folder_of_another_run_is_refused(tmp_path):
    from models.rlipv2.pretrain import pretrain

    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "index.json").write_text(json.dumps({"identity": "0123456789abcdef", "checkpoints": []}))
    with pytest.raises(ValueError, match="holds checkpoints of another pre-training run"):
        pretrain([VG], tmp_path, PretrainSettings(tiny=True, batch_size=2))


# ---------------------------------------------------------------------------------------------- kill and resume
TRAIN_ARGS = ["--tiny", "--deterministic", "--batch-size", "2", "--max-steps", "8", "--checkpoint-every", "3",
              "--lr-drop", "2", "--dropout", "0.1", "--lr", "0.001", "--keep-checkpoints", "5"]  # fmt: skip


def _train_cmd(out: Path, model: str) -> list[str]:
    return [sys.executable, "-m", "models.rlipv2.pretrain", "--source", VG, "--out", str(out), *TRAIN_ARGS,
            "--model", model]  # fmt: skip


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["parseda", "parsed"])
def test_sigkill_after_a_checkpoint_then_rerun_gives_the_uninterrupted_losses(tmp_path, model):
    # 4 images, batch 2: 2 steps an epoch; lr drops x0.1 at epoch 2 (step 4); dropout 0.1 uses the RNG
    ref = subprocess.run(
        _train_cmd(tmp_path / "ref", model), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = LossLog.read(tmp_path / "ref" / "loss_log.jsonl")
    assert [h["step"] for h in expected] == list(range(1, 9))
    assert expected[3]["lr"] == pytest.approx(1e-3) and expected[4]["lr"] == pytest.approx(1e-4)

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(out, model), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    index = out / "checkpoints" / "index.json"
    deadline = time.time() + 240
    while not (index.is_file() and json.loads(index.read_text())["checkpoints"]):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    kept = [c["step"] for c in CheckpointStore(out).index()["checkpoints"]]
    assert kept and kept[-1] < 8  # killed before the end
    logged = LossLog.read(out / "loss_log.jsonl")
    assert logged and logged[-1]["step"] < 8
    with open(out / "loss_log.jsonl", "a") as f:  # as if killed in the middle of writing a line
        f.write('{"step": 99, "lo')
    # a checkpoint killed half-way (not in the index) must never be read: plant garbage where the next one goes
    nxt = out / "checkpoints" / f"step-{kept[-1] + 3:08d}"
    nxt.mkdir(parents=True, exist_ok=True)
    (nxt / "model.safetensors").write_bytes(b"\0garbage")
    (nxt / "train_state.pt").write_bytes(b"garbage")

    rerun = subprocess.run(_train_cmd(out, model), env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {kept[-1]})" in rerun.stdout
    got = LossLog.read(out / "loss_log.jsonl")
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in got]
    want = [{k: v for k, v in h.items() if k != "seconds"} for h in expected]
    assert strip == want  # every loss term, grad norm and lr bit for bit
    # the weights at the end are identical too
    idx_ref, idx = CheckpointStore(tmp_path / "ref").index(), CheckpointStore(out).index()
    assert idx["checkpoints"][-1]["revision"] == idx_ref["checkpoints"][-1]["revision"]
    assert [c["step"] for c in idx["checkpoints"]][-3:] == [3, 6, 8]


# ---------------------------------------------------------------------------------------------- DDP (gloo)
def _ddp_worker(rank: int, world: int, port: int, out: str, result_dir: str, model: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
    import torch.distributed as dist

    from models.rlipv2.pretrain import pretrain

    seen, revisions = [], []

    def on_step(info):
        seen.append(info.image_ids)
        revisions.append(_weights_hash(info.model))

    try:
        settings = PretrainSettings(tiny=True, model=model, batch_size=1, max_steps=2, checkpoint_every=1)
        res = pretrain([VG], out, settings, on_step=on_step)
        Path(result_dir, f"rank{rank}.json").write_text(
            json.dumps({"seen": seen, "revisions": revisions, "losses": [h["loss"] for h in res.history]})
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["parseda", "parsed"])
def test_two_gloo_processes_see_disjoint_data_and_keep_identical_weights(tmp_path, model):
    import torch.multiprocessing as mp

    res_dir = tmp_path / "res"
    res_dir.mkdir()
    mp.spawn(
        _ddp_worker, args=(2, _free_port(), str(tmp_path / "out"), str(res_dir), model), nprocs=2, join=True
    )
    r = [json.loads((res_dir / f"rank{i}.json").read_text()) for i in range(2)]
    seen = [sorted(i for b in x["seen"] for i in b) for x in r]
    assert seen == [[1000, 1001], [1002, 1003]]  # disjoint, every image once (contiguous blocks, as for runs)
    assert r[0]["revisions"] == r[1]["revisions"]  # the same weights after every step
    assert len(set(r[0]["revisions"])) == 2  # and they changed from step to step
    assert r[0]["losses"] == r[1]["losses"]  # the logged loss is the mean over ranks, the same on both
    # rank 0 alone wrote the checkpoints; the state holds both ranks' RNG states
    from models.rlipv2.checkpoint import load_training_state

    idx = CheckpointStore(tmp_path / "out").index()
    assert [c["step"] for c in idx["checkpoints"]] == [1, 2]
    st = load_training_state(tmp_path / "out" / "checkpoints" / "step-00000002" / "train_state.pt")
    assert len(st["rng"]) == 2 and st["world_size"] == 2
    assert not torch.equal(st["rng"][0]["torch"], st["rng"][1]["torch"])  # seed + rank, as the reference


# ---------------------------------------------------------------------------------------------- the flow
@pytest.mark.flow
@pytest.mark.slow
def test_pretrain_flow_trains_resumes_and_publishes_artifacts(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.pretrain import PretrainParams, pretrain_flow

    settings = PretrainSettings(tiny=True, batch_size=2, max_steps=3, checkpoint_every=2, deterministic=True)
    params = PretrainParams(sources=[VG], out=str(tmp_path), settings=settings, label_run="testkey")
    first = pretrain_flow(params)
    run_dir = tmp_path / params.identity()
    assert first["run_dir"] == str(run_dir) and first["steps"] == 3 and first["resumed_from"] is None
    assert first["checkpoints"] == ["step-00000002", "step-00000003"]
    # a rerun with more steps resumes from the last checkpoint (max_steps is not part of the run's identity)
    more = PretrainParams(
        sources=[VG], out=str(tmp_path), settings=replace(settings, max_steps=4), label_run="k"
    )
    assert more.identity() == params.identity()
    second = pretrain_flow(more)
    assert second["resumed_from"] == 3 and second["steps"] == 4
    with get_client(sync_client=True) as client:
        arts = {}
        for a in sorted(client.read_artifacts(), key=lambda a: a.created):  # the newest version of each key
            arts[a.key] = a
    table = arts["pretrain-loss"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    hist = LossLog.read(run_dir / "loss_log.jsonl")
    assert [r["loss"] for r in rows] == [round(h["loss"], 6) for h in hist]
    assert "step-00000004" in arts["pretrain-checkpoints"].data


def test_loss_rows_sample_the_curve_and_keep_the_last_step():
    from flows.pretrain import loss_rows

    hist = [{"step": i, "epoch": 0, "loss": float(i), "loss_l1": 0.0, "loss_giou": 0.0, "loss_cls": 0.0,
             "loss_rel": 0.0, "loss_noobj": 0.0, "lr": 1e-4} for i in range(1, 1002)]  # fmt: skip
    rows = loss_rows(hist, max_rows=200)
    assert [r["step"] for r in rows][:3] == [6, 12, 18] and rows[-1]["step"] == 1001 and len(rows) == 167
    assert loss_rows([]) == []


def test_torchrun_command_carries_every_setting():
    from flows.pretrain import PretrainParams, torchrun_command
    from models.rlipv2.pretrain import main  # noqa: F401  (the module torchrun runs)

    p = PretrainParams(sources=[VG], out="/tmp/x", nproc_per_node=2,
                       settings=PretrainSettings(tiny=True, lr=3e-4, max_steps=5, device="cuda"))  # fmt: skip
    cmd = torchrun_command(p, "/tmp/x/run")
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert cmd[cmd.index("--lr") + 1] == "0.0003" and cmd[cmd.index("--max-steps") + 1] == "5"
    assert "--tiny" in cmd and "--deterministic" not in cmd and "--dropout" not in cmd
    assert cmd[cmd.index("--model") + 1] == "parseda" and cmd[cmd.index("--batch-size") + 1] == "4"
    # the flags rebuild the settings exactly, the loss settings included (booleans that default to on too)
    import argparse

    from models.rlipv2.criterion import LossSettings
    from models.rlipv2.pretrain_settings import add_settings_flags, from_flags, to_flags

    s = PretrainSettings(model="parsed", dropout=0.2, loss=LossSettings(eos_coef=0.3, pseudo_verb=False,
                                                                        sampling_strategy="random"))  # fmt: skip
    ap = argparse.ArgumentParser()
    add_settings_flags(ap)
    assert from_flags(ap.parse_args(to_flags(s))) == s
    assert from_flags(ap.parse_args(to_flags(p.settings))) == p.settings
    assert to_flags(s)[to_flags(s).index("--loss-pseudo-verb") + 1] == "false"
    assert cmd[cmd.index("--source") + 1] == VG and cmd[cmd.index("--device") + 1] == "cuda"


def test_cli_model_flag_and_loss_settings_reach_the_settings(tmp_path):
    from flows.cli import build_parser
    from flows.pretrain import params_from_cli

    ap = build_parser()
    p = params_from_cli(ap.parse_args(["pretrain", "--source", VG, "--out", str(tmp_path), "--tiny"]))
    assert p.settings.model == "parseda" and p.settings.batch_size == 4
    p = params_from_cli(
        ap.parse_args(["pretrain", "--source", VG, "--out", str(tmp_path), "--model", "parsed"])
    )
    assert p.settings.model == "parsed" and p.settings.batch_size == 8
    cfg = tmp_path / "s.yaml"
    cfg.write_text("model: parsed\nloss:\n  eos_coef: 0.2\n  pseudo_verb: false\n")
    p = params_from_cli(
        ap.parse_args(["pretrain", "--source", VG, "--out", str(tmp_path), "--config", str(cfg)])
    )
    assert (p.settings.model, p.settings.loss.eos_coef, p.settings.loss.pseudo_verb) == ("parsed", 0.2, False)
    cfg.write_text("loss:\n  eos_coeff: 0.2\n")
    with pytest.raises(ValueError, match=r"unknown loss fields \['eos_coeff'\]"):
        params_from_cli(
            ap.parse_args(["pretrain", "--source", VG, "--out", str(tmp_path), "--config", str(cfg)])
        )
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        ap.parse_args(["pretrain", "--source", VG, "--out", str(tmp_path), "--model", "detr"])


def test_cli_refuses_bad_input_in_one_line_before_prefect_starts(tmp_path, capsys):
    from flows.cli import main

    assert main(["pretrain", "--source", str(tmp_path / "nope.json"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"reltag pretrain: error: source '{tmp_path / 'nope.json'}' does not exist"
    bad = tmp_path / "s.yaml"
    bad.write_text("batch_size: 0\n")
    assert main(["pretrain", "--source", VG, "--out", str(tmp_path), "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reltag pretrain: error: ") and "batch_size must be >= 1, got 0" in err
    assert len(err.splitlines()) == 1
    bad.write_text("learning_rate: 0.1\n")
    assert main(["pretrain", "--source", VG, "--out", str(tmp_path), "--config", str(bad)]) == 2
    assert f"config file {bad}: unknown fields ['learning_rate']" in capsys.readouterr().err
    bad.write_text("- a list\n")
    assert main(["pretrain", "--source", VG, "--out", str(tmp_path), "--config", str(bad)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"reltag pretrain: error: config file {bad} must hold a mapping, not list"
    )


@pytest.mark.flow
@pytest.mark.slow
def test_pretrain_flow_launches_torchrun_for_several_processes(prefect_harness, tmp_path):
    from flows.pretrain import PretrainParams, pretrain_flow
    from models.rlipv2.checkpoint import load_training_state

    params = PretrainParams(sources=[VG], out=str(tmp_path), nproc_per_node=2,
                            settings=PretrainSettings(tiny=True, batch_size=1, max_steps=1))  # fmt: skip
    res = pretrain_flow(params)
    assert res["steps"] == 1 and res["resumed_from"] is None and res["checkpoints"] == ["step-00000001"]
    st = load_training_state(
        tmp_path / params.identity() / "checkpoints" / "step-00000001" / "train_state.pt"
    )
    assert st["world_size"] == 2 and len(st["rng"]) == 2 and st["steps_per_epoch"] == 2  # 4 images, 2 ranks


def test_checkpoint_store_keeps_the_newest_and_removes_what_the_index_does_not_list(tmp_path):
    from models.rlipv2.checkpoint import load_checkpoint, load_training_state
    from models.rlipv2.model import RLIPv2ParSeD
    from models.rlipv2.tokenizer import build_word_tokenizer
    from models.rlipv2.train import tiny_config

    model = RLIPv2ParSeD(tiny_config(), build_word_tokenizer(["a b"]))
    store = CheckpointStore(tmp_path)
    assert store.latest() is None and store.index() == {"identity": None, "checkpoints": []}
    orphan = tmp_path / "checkpoints" / "step-00000001"  # e.g. left by a save killed after its index
    orphan.mkdir(parents=True)
    for step in (2, 4, 6):
        store.save(model, {"step": step}, "id", keep=2, info={"loss": float(step)})
    assert [c["step"] for c in store.index()["checkpoints"]] == [4, 6] and store.index()["identity"] == "id"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "index.json", "step-00000004", "step-00000006"
    ]  # fmt: skip
    assert load_training_state(store.path(store.latest()) / "train_state.pt") == {"step": 6}
    again = load_checkpoint(store.path(store.latest()))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_pretraining_reads_a_finished_labelling_run_mixed_with_a_vg_file(prefect_harness, tmp_path):
    """The path `reltag run` prints is a source: its images come through the triplet reader (RelationDataset),
    in order after nothing is dropped, mixed with a VG file; a few tiny steps train on them."""
    from flows.label import run_in_process
    from flows.params import LabelParams
    from models.rlipv2.data import RelationDataset
    from models.rlipv2.pretrain import pretrain
    from models.rlipv2.pretrain_data import PretrainDataset
    from tasks.config import PipelineConfig

    ex = REPO / "examples"
    summary = run_in_process(
        LabelParams(
            annotations=str(ex / "sample_detections.json"),
            images=str(ex / "images"),
            captions=str(ex / "sample_captions.json"),
            out=str(tmp_path / "out"),
            config=PipelineConfig.model_validate(
                {"dataset": "sample", "threshold": {"rule": "relation_only"}}
            ),
        )
    )
    run = summary["output"]
    settings = PretrainSettings(tiny=True, batch_size=2, max_steps=2, deterministic=True)
    ds = open_sources([run, VG], settings)
    assert isinstance(ds, PretrainDataset)
    # this rank's records, in the reader's order: the run's images with triplets, then the VG file's
    expected = [im.image_id for im in RelationDataset([run, VG])]
    assert [im.image_id for im in ds] == expected
    assert summary["images_with_triplets"] + len(json.load(open(VG))) == len(expected)
    assert all(os.path.isabs(im.file_name) and os.path.exists(im.file_name) for im in ds)
    res = pretrain([run, VG], tmp_path / "pt", settings)
    assert res.total_steps == 2 and [h["step"] for h in res.history] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in res.history)
