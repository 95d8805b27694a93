"""Pre-training checkpoints and resume: RNG states, the run's identity, the checkpoint index, the loss log."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.rlipv2.checkpoint import Model, save_checkpoint, save_training_state
from models.rlipv2.pretrain_settings import PretrainSettings

CHECKPOINTS = "checkpoints"
INDEX = "index.json"
STATE_NAME = "train_state.pt"
LOSS_LOG = "loss_log.jsonl"


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

    def save(self, model: Model, state: dict, identity: str, keep: int, info: dict) -> dict:
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
