"""Checkpoints: safetensors weights + config.json (+ tokenizer files) in one directory; revision = content hash."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from models.rlipv2.config import RLIPv2Config
from models.rlipv2.model import RLIPv2ParSeD
from models.rlipv2.text import roberta_config_dict
from models.rlipv2.tokenizer import load_tokenizer

CONFIG_NAME = "rlipv2_config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


def offline_config(model: RLIPv2ParSeD) -> RLIPv2Config:
    """The model's config with the text encoder's config inlined, so loading needs no hub access."""
    d = model.cfg.to_dict()
    d["text_config"] = roberta_config_dict(model.transformer.text_encoder)
    return RLIPv2Config.from_dict(d)


def save_checkpoint(model: RLIPv2ParSeD, out_dir: str | Path) -> str:
    """Write config, weights and tokenizer; files go to a temp name first and are renamed. Returns the revision."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = offline_config(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"config_hash": cfg.hash()})
    os.replace(tmp, out / WEIGHTS_NAME)
    tmp = out / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    os.replace(tmp, out / CONFIG_NAME)
    model.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    return checkpoint_revision(out)


def checkpoint_revision(ckpt_dir: str | Path) -> str:
    """sha256 over the config file and the weights file (first 16 hex digits); goes into the run key."""
    ckpt = Path(ckpt_dir)
    h = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        with open(ckpt / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def load_checkpoint(
    ckpt_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> RLIPv2ParSeD:
    """Rebuild the model from its stored config and load the weights strictly (missing/unexpected keys raise)."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt_dir)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (ckpt / name).is_file():
            raise ValueError(
                f"checkpoint {str(ckpt)!r} has no {name}; expected {CONFIG_NAME}, {WEIGHTS_NAME}, {TOKENIZER_DIR}/"
            )
    cfg = RLIPv2Config.from_dict(json.loads((ckpt / CONFIG_NAME).read_text()))
    tok_dir = ckpt / TOKENIZER_DIR
    tokenizer = load_tokenizer(str(tok_dir) if tok_dir.is_dir() else cfg.text_model)
    model = RLIPv2ParSeD(cfg, tokenizer, pretrained=False)
    state = load_file(str(ckpt / WEIGHTS_NAME))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(ckpt)!r} does not fit its config: missing {sorted(missing)[:10]}, "
            f"unexpected {sorted(unexpected)[:10]}"
        )
    return model.to(device=device, dtype=dtype).eval()


def save_training_state(state: dict, path: str | Path) -> None:
    """torch.save of the training state (optimizer, scheduler, RNG, step, data position, history), written
    under a temporary name and renamed. Only tensors, numbers, strings, lists and dicts: it loads with
    torch.load(weights_only=True), so resuming never unpickles code."""
    import io

    import fsspec

    from storage.atomic import atomic_open

    buf = io.BytesIO()
    torch.save(state, buf)
    with atomic_open(fsspec.filesystem("file"), str(path), "wb") as f:
        f.write(buf.getvalue())


def load_training_state(path: str | Path) -> dict:
    """The state saved by save_training_state, loaded with weights_only=True (no arbitrary unpickling)."""
    if not Path(path).is_file():
        raise ValueError(f"training state {str(path)!r} does not exist")
    return torch.load(str(path), map_location="cpu", weights_only=True)
