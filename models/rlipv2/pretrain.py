"""Pre-training RLIPv2-ParSeDA or RLIPv2-ParSeD (learned queries) on relation datasets: resumable checkpoints, DDP,
no Prefect.

Single process:   python -m models.rlipv2.pretrain --source examples/vg_tiny/relationships.json --out /tmp/pt --tiny
Several GPUs:     python -m torch.distributed.run --nproc_per_node 8 -m models.rlipv2.pretrain --source ... --out ...

The defaults are the reference's pre-training run of its main model (JacobYuan7/RLIPv2,
scripts/RLIP_ParSeDA/train_RLIP_ParSeDA_v2_mixed_vgcocoo365_resnet.sh, with main.py's argparse defaults for the
flags that script leaves unset); `--model parsed` trains RLIPv2-ParSeD instead (its twin script); see
PretrainSettings (models/rlipv2/pretrain_settings.py).

This module is the training loop and its command line; the data (pretrain_data), checkpoints and resume
(pretrain_state) and the collectives across processes (pretrain_dist) are beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.rlipv2.checkpoint import MODELS, Model, load_checkpoint, load_training_state, model_kind
from models.rlipv2.criterion import LossSettings
from models.rlipv2.pretrain_data import (
    DatasetFactory,
    EpochBatches,
    batch_predicates,
    collate_records,
    open_sources,
)
from models.rlipv2.pretrain_dist import (
    barrier,
    gather_objects,
    init_distributed,
    mean_over_ranks,
    min_over_ranks,
)
from models.rlipv2.pretrain_settings import PretrainSettings, add_settings_flags, from_flags
from models.rlipv2.pretrain_state import (
    LOSS_LOG,
    STATE_NAME,
    CheckpointStore,
    LossLog,
    rng_state,
    run_identity,
    set_rng_state,
)
from models.rlipv2.train import detect_loss, make_batch, tiny_config


# ------------------------------------------------------------------------------------------------- model
class DetectionObjective(nn.Module):
    """The model plus its loss as one forward, so DistributedDataParallel sees the whole step."""

    def __init__(self, model: Model, loss: LossSettings):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch) -> dict[str, torch.Tensor]:
        return detect_loss(self.model, batch, self.loss)


def model_config(settings: PretrainSettings, **over):
    """The architecture `settings.model` names: the tiny test sizes (models.rlipv2.train.tiny_config, the same
    for both models) or the reference's full size (RLIPv2Config / ParSeDAConfig defaults), with `over` on top."""
    cfg_cls = MODELS[settings.model][0]
    if settings.tiny:
        return cfg_cls.from_dict(tiny_config(**over).to_dict())
    return cfg_cls(**over)


def build_model(settings: PretrainSettings, texts: Callable[[], list[str]]) -> Model:
    """A fresh model of `settings.model` (seeded by the caller): every image's texts are its own labels and
    predicates, so the entity vocabulary is empty (models.rlipv2.tagger.entity_texts appends each image's labels)."""
    if settings.init_checkpoint:
        model = load_checkpoint(settings.init_checkpoint)
        if model_kind(model) != settings.model:
            raise ValueError(
                f"init_checkpoint {settings.init_checkpoint!r} holds RLIPv2-{model_kind(model)}, but the settings "
                f"train model {settings.model!r}"
            )
        if model.cfg.n_q != settings.num_queries // 2:
            raise ValueError(
                f"init_checkpoint {settings.init_checkpoint!r} has {model.cfg.n_q} pair slots; num_queries "
                f"{settings.num_queries} needs {settings.num_queries // 2}"
            )
        return model
    over = dict(entity_names=[], n_q=settings.num_queries // 2)
    if settings.dropout is not None:
        over["dropout"] = settings.dropout
    model_cls = MODELS[settings.model][1]
    cfg = model_config(settings, **over)
    if settings.tiny:
        from models.rlipv2.tokenizer import build_word_tokenizer

        return model_cls(cfg, build_word_tokenizer(texts() + [cfg.no_object_text]))
    from models.rlipv2.tokenizer import load_tokenizer

    return model_cls(cfg, load_tokenizer(cfg.text_model), pretrained=True)


def param_groups(model: Model, s: PretrainSettings) -> list[dict]:
    """The reference's three AdamW groups (main.py): names with "backbone", with "text_encoder", the rest."""
    groups: dict[str, list] = {"rest": [], "backbone": [], "text": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "backbone" if "backbone" in name else "text" if "text_encoder" in name else "rest"
        groups[key].append(p)
    return [
        {"params": groups["rest"], "lr": s.lr},
        {"params": groups["backbone"], "lr": s.lr_backbone},
        {"params": groups["text"], "lr": s.lr_text_encoder},
    ]


def _to_device(batch, device):
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            setattr(batch, f.name, v.to(device))
    return batch


# ------------------------------------------------------------------------------------------------- loop
@dataclass
class StepInfo:
    """What a step hands to the caller's callback: the record logged (losses averaged over ranks), this rank's
    image ids, the model (unwrapped), and the total number of steps of the run."""

    record: dict
    image_ids: list[int]
    model: Model
    total_steps: int
    rank: int


@dataclass
class PretrainResult:
    out: str
    total_steps: int
    resumed_from: int | None
    history: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    identity: str = ""


def pretrain(
    sources: Sequence[str],
    out: str | Path,
    settings: PretrainSettings = PretrainSettings(),
    dataset_factory: DatasetFactory | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
) -> PretrainResult:
    """Train RLIPv2-ParSeDA or -ParSeD (settings.model) with learned queries (Hungarian matching) on `sources`; resume from `out` if it holds
    checkpoints of the same run (same sources, settings and number of processes), else start fresh.

    Every `checkpoint_every` steps and at the end: weights (safetensors) + config + tokenizer + the training
    state (optimizer, scheduler, RNG of torch/numpy/python per rank, step, epoch, position in the epoch), then
    the index. Killed at any moment, a rerun continues from the last indexed checkpoint and
    computes the same losses as an uninterrupted run (in deterministic mode; tested on CPU). Losses go to
    `<out>/loss_log.jsonl`, one line per step; the result's history holds the steps of this call.
    Under torchrun (WORLD_SIZE > 1) each process trains on its shard; rank 0 writes.
    """
    rank, world, local_rank = init_distributed()
    distributed = world > 1
    device = torch.device(settings.device)
    if device.type == "cuda" and distributed:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if settings.deterministic:
        if device.type == "cuda":  # cuBLAS refuses deterministic mode without a fixed workspace
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    out = Path(out)
    identity = run_identity(sources, settings, world)
    store = CheckpointStore(out)
    idx = store.index()
    if idx["identity"] not in (None, identity):
        raise ValueError(
            f"{out} holds checkpoints of another pre-training run (identity {idx['identity']}, this one "
            f"{identity}: different sources, settings or number of processes); use another output folder"
        )
    latest = store.latest()

    ds = open_sources(sources, settings, rank, world, dataset_factory)
    frequencies = getattr(ds, "frequencies", None)  # every rank's images counted (PretrainDataset)
    n_local = len(ds)
    # every rank takes the same number of steps (DDP needs it)
    steps_per_epoch = min_over_ranks(n_local // settings.batch_size, device)
    if steps_per_epoch == 0:
        raise ValueError(
            f"rank {rank}: {n_local} images with relations < batch size {settings.batch_size}: no full batch"
        )
    total = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)

    def all_texts() -> list[str]:
        full = open_sources(sources, settings, 0, 1, dataset_factory)
        return [
            t for im in full for t in [o.name for o in im.objects] + [r.predicate for r in im.relationships]
        ]

    state = None
    if latest is not None:
        model = load_checkpoint(store.path(latest))
        state = load_training_state(store.path(latest) / STATE_NAME)
    else:
        torch.manual_seed(settings.seed)  # the same initial weights on every rank
        model = build_model(settings, all_texts)
    model.to(device).train()
    opt = torch.optim.AdamW(param_groups(model, settings), lr=settings.lr, weight_decay=settings.weight_decay)
    spe, drop = steps_per_epoch, settings.lr_drop
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 ** ((s // spe) // drop))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][rank])
        step = int(state["step"])
    else:
        seed = settings.seed + rank  # as the reference: seed + rank for everything after the model
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        step = 0
    resumed_from = step if state is not None else None
    history: list[dict] = []  # the steps of this call (the whole run's are in the loss log)
    log = LossLog(out / LOSS_LOG)
    if rank == 0:
        log.open(step)
    objective: nn.Module = DetectionObjective(model, settings.loss)
    if distributed:
        objective = nn.parallel.DistributedDataParallel(
            objective,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # the tagger-only query projections get no gradient (as the reference)
        )
    params = [p for p in model.parameters() if p.requires_grad]

    def checkpoint() -> None:
        rngs = gather_objects(rng_state())  # every rank's, in rank order
        if rank == 0:
            epoch, pos = divmod(step, steps_per_epoch)
            st = {
                "step": step, "epoch": epoch, "position": pos, "steps_per_epoch": steps_per_epoch,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rngs,
                "identity": identity, "world_size": world,
            }  # fmt: skip
            info = {"epochs_done": epoch, "loss": history[-1]["loss"] if history else None}
            log.sync()  # every step up to this one is on disk before the index names the checkpoint
            entry = store.save(model, st, identity, settings.keep_checkpoints, info)
            if on_checkpoint is not None:
                on_checkpoint(entry)
        barrier()

    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        loader = torch.utils.data.DataLoader(
            ds,
            batch_sampler=EpochBatches(
                n_local, settings.batch_size, settings.seed, epoch, pos, steps_per_epoch
            ),
            collate_fn=collate_records,
            num_workers=settings.num_workers,
            generator=torch.Generator(),  # its seed draw must not advance the global RNG (resume equality)
        )
        for records in loader:
            t0 = time.perf_counter()
            # the batch's texts shared by its images, extended with negatives sampled from the data's name
            # frequencies (Label Sequence Extension) with the global RNG, which checkpoints save and restore
            batch = make_batch(
                model, records, None, batch_predicates(records), denoise=False, frequencies=frequencies,
                negative_texts=settings.loss.negative_text_sampling, sampling=settings.loss.sampling_strategy,
            )  # fmt: skip
            batch = _to_device(batch, device)
            terms = objective(batch)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.clip_max_norm)
            lr = opt.param_groups[0]["lr"]  # the rate this step uses
            opt.step()
            sched.step()
            step += 1
            names = sorted(terms)
            vals = torch.stack([terms[k].detach().float() for k in names] + [grad_norm.detach().float()])
            vals = mean_over_ranks(vals, device).cpu().tolist()
            rec = {k: vals[i] for i, k in enumerate(names)} | {
                "step": step,
                "epoch": epoch,
                "grad_norm": vals[-1],
                "lr": lr,
                "seconds": round(time.perf_counter() - t0, 4),
            }
            history.append(rec)
            if rank == 0:
                log.append(rec)
            if on_step is not None:
                on_step(StepInfo(rec, [im.image_id for im in records], model, total, rank))
            if step % settings.checkpoint_every == 0 or step == total:
                checkpoint()
            if step >= total:
                break
    log.close()
    model.eval()
    return PretrainResult(str(out), total, resumed_from, history, store.index()["checkpoints"], identity)


# ------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--source", action="append", required=True, help="a VG-format relationships JSON (repeat)"
    )
    ap.add_argument("--out", required=True, help="training folder: checkpoints/, loss_log.jsonl")
    add_settings_flags(ap)
    a = ap.parse_args(argv)
    settings = from_flags(a)
    sources = [s if "://" in s else os.path.abspath(s) for s in a.source]  # the run's identity uses them
    res = pretrain(sources, a.out, settings, on_step=_print_step)
    if int(os.environ.get("RANK", "0")) == 0:
        last = res.history[-1]["loss"] if res.history else float("nan")
        print(f"{res.total_steps} steps (resumed from {res.resumed_from}); last loss {last:.4f}; {res.out}")


def _print_step(info: StepInfo) -> None:
    if info.rank == 0:
        r = info.record
        print(
            f"step {r['step']}/{info.total_steps} epoch {r['epoch']} loss {r['loss']:.4f} lr {r['lr']:.3g}",
            flush=True,
        )


if __name__ == "__main__":
    main()
