"""Pre-training RLIPv2-ParSeD (learned queries) on relation datasets: resumable checkpoints, DDP, no Prefect.

Single process:   python -m models.rlipv2.pretrain --source examples/vg_tiny/relationships.json --out /tmp/pt --tiny
Several GPUs:     python -m torch.distributed.run --nproc_per_node 8 -m models.rlipv2.pretrain --source ... --out ...

The defaults are the reference's pre-training run (JacobYuan7/RLIPv2,
scripts/RLIP_ParSeD/train_RLIP_ParSeD_v2_mixed_vgcocoo365_resnet.sh, with main.py's argparse defaults for the
flags that script leaves unset); see PretrainSettings.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.rlipv2.checkpoint import (
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from models.rlipv2.config import RLIPv2Config
from models.rlipv2.data import VGImage, load_vg
from models.rlipv2.model import RLIPv2ParSeD
from models.rlipv2.train import detect_loss, make_batch, tiny_config
from storage.relations import is_json_list

CHECKPOINTS = "checkpoints"
INDEX = "index.json"
STATE_NAME = "train_state.pt"
LOSS_LOG = "loss_log.jsonl"


@dataclass(frozen=True)
class PretrainSettings:
    """Pre-training settings. Defaults: the reference's RLIPv2-ParSeD R50 pre-training on VG + COCO + O365.

    From scripts/RLIP_ParSeD/train_RLIP_ParSeD_v2_mixed_vgcocoo365_resnet.sh: `--lr 1.41e-4 --lr_backbone
    1.41e-5 --text_encoder_lr 1.41e-5 --epochs 20 --lr_drop 15 --schedule step --batch_size 8` on
    `--nproc_per_node=8` (8 images per GPU, 64 per step), `--num_queries 200` (100 pairs),
    `--relation_threshold 0.20`; from main.py's defaults (flags the script does not pass): `--weight_decay 1e-4`,
    `--clip_max_norm 0.1`, `--seed 42` (+ rank). Schedule "step" (util/optim.py adjust_learning_rate): every
    learning rate times 0.1 ** (epoch // lr_drop). Optimizer AdamW with three groups: backbone, text encoder,
    the rest. The loader drops the last incomplete batch (BatchSampler drop_last=True), as the reference's.
    """

    lr: float = 1.41e-4
    lr_backbone: float = 1.41e-5
    lr_text_encoder: float = 1.41e-5
    weight_decay: float = 1e-4
    epochs: int = 20
    lr_drop: int = 15  # epochs
    batch_size: int = 8  # images per process and step
    clip_max_norm: float = 0.1
    num_queries: int = 200  # subject + object queries: 100 pair slots
    seed: int = 42
    # data (passed to the dataset factory): the reference's MixedRelDetection settings
    eta: float = 0.2
    rule: str = "relation_only"
    overlap_filter: bool = False
    max_relations: int = 100
    # model: tiny = the test architecture with a word tokenizer built over the data (offline runs)
    tiny: bool = False
    dropout: float | None = None  # None: the architecture's (0.1 full, 0.0 tiny)
    init_checkpoint: str | None = None  # start from these weights (a save_checkpoint dir) instead of ImageNet
    # not part of the run's identity (a resume may change them)
    max_steps: int | None = None  # stop after this many steps in total (None: all epochs)
    checkpoint_every: int = 1000  # steps
    keep_checkpoints: int = 3
    device: str = "cpu"
    num_workers: int = 0  # DataLoader workers (the reference used 8)
    deterministic: bool = False  # torch.use_deterministic_algorithms

    def __post_init__(self) -> None:
        for name in (
            "epochs",
            "lr_drop",
            "batch_size",
            "checkpoint_every",
            "keep_checkpoints",
            "num_queries",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"PretrainSettings: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_queries % 2:
            raise ValueError(
                f"PretrainSettings: num_queries {self.num_queries} must be even (subject + object)"
            )
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"PretrainSettings: max_steps must be >= 0, got {self.max_steps}")

    #: fields that do not change what is computed step by step, so a resume may change them
    RUNTIME = ("max_steps", "checkpoint_every", "keep_checkpoints", "device", "num_workers", "deterministic")

    def identity(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME}


# ------------------------------------------------------------------------------------------------- data
class VGFileDataset(torch.utils.data.Dataset):
    """VG-format relationship files (models/rlipv2/data.py) as one dataset, with RelationDataset's signature.

    What open_sources reads when every source is a VG-format file (with a labelling run among them, RunDataset
    reads all of them through the triplet reader instead): images with no relation are dropped, the
    first `max_relations` relations of an image are kept in file order, images are sharded by position
    (image i of the concatenated files goes to rank i % world_size). Human-labelled VG rows carry no
    confidence, so eta and rule change nothing here (as in the reference, which keeps every VG relation).
    File names become absolute (each file's images are relative to that file's folder).
    """

    def __init__(
        self,
        sources: Sequence[str],
        eta: float = 0.2,
        rule: str = "relation_only",
        overlap_filter: bool = False,
        max_relations: int = 100,
        rank: int = 0,
        world_size: int = 1,
    ):
        if overlap_filter:
            raise ValueError("VG-format sources: overlap_filter needs the triplet reader (RelationDataset)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size {world_size})")
        images: list[VGImage] = []
        for src in sources:
            path = Path(src)
            if path.suffix != ".json" or not path.is_file():
                raise ValueError(
                    f"source {src!r}: not a VG-format relationships .json file (labelling runs are read by "
                    "models.rlipv2.data.RelationDataset)"
                )
            if not is_json_list(_local_fs(), str(path)):  # e.g. a labelling run's record, runs/<run-key>.json
                raise ValueError(
                    f"source {src!r}: not a VG-format relationships file (a JSON list of images); labelling runs "
                    "are read by models.rlipv2.data.RelationDataset"
                )
            for im in load_vg(path):
                if not im.relationships:
                    continue
                im.file_name = str((path.parent / im.file_name).resolve())
                im.relationships = im.relationships[:max_relations]
                images.append(im)
        self.all_images = images
        self.images = images[rank::world_size]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> VGImage:
        return self.images[i]


class RunDataset(torch.utils.data.Dataset):
    """Finished labelling runs, mixed with VG-format files, through the triplet reader
    (models.rlipv2.data.RelationDataset: the reference loader's rules, this rank's contiguous block of images).

    Training indexes its data (a seeded permutation per epoch, resumable at any step), so this rank's image
    records are read once, streamed, and held in memory: boxes, texts and relations, never pixels (those are
    decoded per batch). For Objects365 on 8 ranks that is ~210k records per rank.
    """

    def __init__(
        self,
        sources: Sequence[str],
        eta: float = 0.2,
        rule: str = "relation_only",
        overlap_filter: bool = False,
        max_relations: int = 100,
        rank: int = 0,
        world_size: int = 1,
    ):
        from models.rlipv2.data import RelationDataset

        self.images = list(
            RelationDataset(
                list(sources), eta=eta, rule=rule, overlap_filter=overlap_filter, max_relations=max_relations,
                rank=rank, world_size=world_size,
            )
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> VGImage:
        return self.images[i]


def _is_vg_file(src: str) -> bool:
    path = Path(src)
    return path.suffix == ".json" and path.is_file() and is_json_list(_local_fs(), str(path))


DatasetFactory = Callable[..., torch.utils.data.Dataset]


def open_sources(
    sources: Sequence[str],
    settings: PretrainSettings,
    rank: int = 0,
    world_size: int = 1,
    factory: DatasetFactory | None = None,
) -> torch.utils.data.Dataset:
    """This rank's share of the training data: a Dataset of VGImage-compatible records.

    `factory` is called as factory(sources, eta=, rule=, overlap_filter=, max_relations=, rank=, world_size=)
    (models.rlipv2.data.RelationDataset's signature). By default, VG-format files alone are read by
    VGFileDataset (rank i % world_size), and anything with a labelling run among the sources (its plan folder,
    the path `reltag run` prints, or runs/<run-key>.json) by RunDataset (the triplet reader).
    """
    if not sources:
        raise ValueError("pre-training needs at least one source")
    make = factory or (VGFileDataset if all(_is_vg_file(str(s)) for s in sources) else RunDataset)
    return make(
        list(sources),
        eta=settings.eta,
        rule=settings.rule,
        overlap_filter=settings.overlap_filter,
        max_relations=settings.max_relations,
        rank=rank,
        world_size=world_size,
    )


class EpochBatches:
    """Batches of one epoch from `start` on: a permutation of the rank's indices seeded by (seed, epoch), cut
    into `steps` batches of `batch_size` (the rest dropped). Restarting at (epoch, start) yields exactly the
    batches an uninterrupted epoch yields from there: the data position is just (epoch, step in epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int, steps: int):
        self.n, self.bs, self.seed, self.epoch, self.start, self.steps = (
            n,
            batch_size,
            seed,
            epoch,
            start,
            steps,
        )

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        perm = self.order()
        for b in range(self.start, self.steps):
            yield perm[b * self.bs : (b + 1) * self.bs]

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


def _records(batch: list) -> list:
    return batch


# ------------------------------------------------------------------------------------------------- model
class DetectionObjective(nn.Module):
    """The model plus its loss as one forward, so DistributedDataParallel sees the whole step."""

    def __init__(self, model: RLIPv2ParSeD):
        super().__init__()
        self.model = model

    def forward(self, batch) -> dict[str, torch.Tensor]:
        return detect_loss(self.model, batch)


def build_model(settings: PretrainSettings, texts: Callable[[], list[str]]) -> RLIPv2ParSeD:
    """A fresh model (seeded by the caller): every image's texts are its own labels and predicates, so the
    entity vocabulary is empty (models.rlipv2.tagger.entity_texts appends each image's labels)."""
    if settings.init_checkpoint:
        model = load_checkpoint(settings.init_checkpoint)
        if model.cfg.n_q != settings.num_queries // 2:
            raise ValueError(
                f"init_checkpoint {settings.init_checkpoint!r} has {model.cfg.n_q} pair slots; num_queries "
                f"{settings.num_queries} needs {settings.num_queries // 2}"
            )
        return model
    over = dict(entity_names=[], n_q=settings.num_queries // 2)
    if settings.dropout is not None:
        over["dropout"] = settings.dropout
    if settings.tiny:
        from models.rlipv2.tokenizer import build_word_tokenizer

        cfg = tiny_config(**over)
        return RLIPv2ParSeD(cfg, build_word_tokenizer(texts() + [cfg.no_object_text]))
    from models.rlipv2.tokenizer import load_tokenizer

    cfg = RLIPv2Config(**over)
    return RLIPv2ParSeD(cfg, load_tokenizer(cfg.text_model), pretrained=True)


def param_groups(model: RLIPv2ParSeD, s: PretrainSettings) -> list[dict]:
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


def batch_predicates(records: Sequence[VGImage]) -> list[str]:
    """The relation texts of one batch: its images' predicates in first-seen order (each image scores them all)."""
    return list(dict.fromkeys(r.predicate for im in records for r in im.relationships))


# ------------------------------------------------------------------------------------------------- state
def rng_state() -> dict:
    """torch, numpy and python RNG states as tensors, ints and lists (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }  # fmt: skip


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if st["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    n = st["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def run_identity(sources: Sequence[str], settings: PretrainSettings, world_size: int) -> str:
    """Hash of what fixes the computation step by step: the sources, the settings (not the runtime ones) and
    the number of processes (it decides which images form a batch). A checkpoint resumes only the same."""
    blob = json.dumps(
        {"sources": list(sources), "settings": settings.identity(), "world_size": world_size},
        sort_keys=True, separators=(",", ":"),
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class CheckpointStore:
    """`<out>/checkpoints/step-00001000/` (model.safetensors, rlipv2_config.json, tokenizer/, train_state.pt),
    listed in `<out>/checkpoints/index.json`, which is written last, atomically: a directory the index does not
    list (a save killed half-way) is never read, and is overwritten when that step is saved again."""

    def __init__(self, out: str | Path):
        self.root = Path(out) / CHECKPOINTS
        self.index_path = self.root / INDEX

    def index(self) -> dict:
        if not self.index_path.is_file():
            return {"identity": None, "checkpoints": []}
        return json.loads(self.index_path.read_text())

    def latest(self) -> dict | None:
        cps = self.index()["checkpoints"]
        return cps[-1] if cps else None

    def path(self, entry: dict) -> Path:
        return self.root / entry["dir"]

    def save(self, model: RLIPv2ParSeD, state: dict, identity: str, keep: int, info: dict) -> dict:
        from storage.atomic import write_json

        step = state["step"]
        name = f"step-{step:08d}"
        d = self.root / name
        revision = save_checkpoint(model, d)
        save_training_state(state, d / STATE_NAME)
        idx = self.index()
        entries = [e for e in idx["checkpoints"] if e["step"] != step]
        entry = {"step": step, "dir": name, "revision": revision, "saved_at": _now()} | info
        entries.append(entry)
        entries = entries[-keep:]
        fs = _local_fs()
        write_json(fs, str(self.index_path), {"identity": identity, "checkpoints": entries})
        listed = {e["dir"] for e in entries}
        for old in self.root.glob("step-*"):  # only after the index no longer lists them; also what a save
            if old.is_dir() and old.name not in listed:  # killed between its index and this clean-up left
                fs.rm(str(old), recursive=True)
        return entry


def _local_fs():
    import fsspec

    return fsspec.filesystem("file")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class LossLog:
    """`<out>/loss_log.jsonl`: one JSON line per step (rank 0 writes), flushed and fsynced before a checkpoint's
    index entry is written. On resume it is cut back to the checkpoint's step: lines a killed run wrote after its
    last checkpoint (those steps are computed again), and a line cut half-way by the kill, are dropped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.f = None

    @staticmethod
    def read(path: str | Path) -> list[dict]:
        recs = []
        if Path(path).is_file():
            with open(path) as f:
                for line in f:
                    if not line.endswith("\n"):  # the last line of a killed writer
                        break
                    recs.append(json.loads(line))
        return recs

    def open(self, upto: int) -> None:
        from storage.atomic import atomic_open

        keep = [r for r in self.read(self.path) if r["step"] <= upto]
        with atomic_open(_local_fs(), str(self.path), "wb") as f:
            f.write("".join(json.dumps(r) + "\n" for r in keep).encode())
        self.f = open(self.path, "a")

    def append(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


# ------------------------------------------------------------------------------------------------- loop
@dataclass
class StepInfo:
    """What a step hands to the caller's callback: the record logged (losses averaged over ranks), this rank's
    image ids, the model (unwrapped), and the total number of steps of the run."""

    record: dict
    image_ids: list[int]
    model: RLIPv2ParSeD
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


def _dist():
    """(rank, world_size, local_rank); initialises the process group from torchrun's variables if needed."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = (
            "nccl"
            if torch.cuda.is_available() and os.environ.get("RELTAG_DIST_BACKEND") != "gloo"
            else "gloo"
        )
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return 0, 1, 0


def pretrain(
    sources: Sequence[str],
    out: str | Path,
    settings: PretrainSettings = PretrainSettings(),
    dataset_factory: DatasetFactory | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
) -> PretrainResult:
    """Train RLIPv2-ParSeD with learned queries (Hungarian matching) on `sources`; resume from `out` if it holds
    checkpoints of the same run (same sources, settings and number of processes), else start fresh.

    Every `checkpoint_every` steps and at the end: weights (safetensors) + config + tokenizer + the training
    state (optimizer, scheduler, RNG of torch/numpy/python per rank, step, epoch, position in the epoch), then
    the index. Killed at any moment, a rerun continues from the last indexed checkpoint and
    computes the same losses as an uninterrupted run (in deterministic mode; tested on CPU). Losses go to
    `<out>/loss_log.jsonl`, one line per step; the result's history holds the steps of this call.
    Under torchrun (WORLD_SIZE > 1) each process trains on its shard; rank 0 writes.
    """
    import torch.distributed as dist

    rank, world, local_rank = _dist()
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
    n_local = len(ds)
    steps_per_epoch = n_local // settings.batch_size
    if distributed:  # every rank takes the same number of steps (DDP needs it)
        t = torch.tensor([steps_per_epoch], device=device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        steps_per_epoch = int(t.item())
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
    objective: nn.Module = DetectionObjective(model)
    if distributed:
        objective = nn.parallel.DistributedDataParallel(
            objective,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # the tagger-only query projections get no gradient (as the reference)
        )
    params = [p for p in model.parameters() if p.requires_grad]

    def checkpoint() -> None:
        rngs = [rng_state()]
        if distributed:
            gathered: list = [None] * world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
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
        if distributed:
            dist.barrier()

    while step < total:
        epoch, pos = divmod(step, steps_per_epoch)
        loader = torch.utils.data.DataLoader(
            ds,
            batch_sampler=EpochBatches(
                n_local, settings.batch_size, settings.seed, epoch, pos, steps_per_epoch
            ),
            collate_fn=_records,
            num_workers=settings.num_workers,
            generator=torch.Generator(),  # its seed draw must not advance the global RNG (resume equality)
        )
        for records in loader:
            t0 = time.perf_counter()
            batch = _to_device(
                make_batch(model, records, None, batch_predicates(records), denoise=False), device
            )
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
            if distributed:
                vals = vals.to(device)
                dist.all_reduce(vals)
                vals = vals / world
            vals = vals.cpu().tolist()
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
    for f in dataclasses.fields(PretrainSettings):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, action="store_true", default=None)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" |")[0], str)
            ap.add_argument(flag, type=kind, default=None)
    a = ap.parse_args(argv)
    over = {
        f.name: getattr(a, f.name)
        for f in dataclasses.fields(PretrainSettings)
        if getattr(a, f.name) is not None
    }
    settings = PretrainSettings(**over)
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
