"""Checkpoints: safetensors weights + config.json (+ tokenizer files) in one directory; revision = content hash.

Which model a checkpoint holds: RLIPv2-ParSeDA writes `"model": "parseda"` into its config file (an RLIPv2Config
reader, such as the tag stage's, refuses it by the unknown keys); RLIPv2-ParSeD's config file is unchanged
(no key = ParSeD, as every earlier checkpoint). Both record the model in the weights' metadata too, and
load_checkpoint checks that the two agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from models.rlipv2.config import ParSeDAConfig, RLIPv2Config
from models.rlipv2.model import RLIPv2ParSeD
from models.rlipv2.parseda import RLIPv2ParSeDA
from models.rlipv2.text import roberta_config_dict
from models.rlipv2.tokenizer import load_tokenizer

CONFIG_NAME = "rlipv2_config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
MODEL_KEY = "model"
STAMP_KEY = "reltag"  # the weights file's metadata entry: {"config_hash", "model"} as JSON
#: model name -> (config class, model class)
MODELS = {"parsed": (RLIPv2Config, RLIPv2ParSeD), "parseda": (ParSeDAConfig, RLIPv2ParSeDA)}
Model = RLIPv2ParSeD | RLIPv2ParSeDA


def model_kind(model: Model) -> str:
    """'parsed' or 'parseda'."""
    for kind, (_, cls) in MODELS.items():
        if type(model) is cls:
            return kind
    raise ValueError(f"not an RLIPv2 model: {type(model).__name__}")


def offline_config(model: Model) -> RLIPv2Config:
    """The model's config with the text encoder's config inlined, so loading needs no hub access."""
    d = model.cfg.to_dict()
    d["text_config"] = roberta_config_dict(model.transformer.text_encoder)
    return type(model.cfg).from_dict(d)


def save_checkpoint(model: Model, out_dir: str | Path) -> str:
    """Write config, weights and tokenizer; files go to a temp name first and are renamed. Returns the revision."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kind = model_kind(model)
    cfg = offline_config(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    # one metadata entry: safetensors writes its metadata map in an order that varies from process to process,
    # so two entries would make byte-different files of the same weights (the revision hashes the bytes)
    stamp = json.dumps({"config_hash": cfg.hash(), MODEL_KEY: kind}, sort_keys=True)
    save_file(state, str(tmp), metadata={STAMP_KEY: stamp})
    os.replace(tmp, out / WEIGHTS_NAME)
    tmp = out / (CONFIG_NAME + ".tmp")
    stored = cfg.to_dict() | ({MODEL_KEY: kind} if kind != "parsed" else {})
    tmp.write_text(json.dumps(stored, indent=2, sort_keys=True))
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


def checkpoint_model(ckpt_dir: str | Path) -> str:
    """'parsed' or 'parseda': the model a checkpoint directory holds (its config file says; no key = ParSeD)."""
    path = Path(ckpt_dir) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"checkpoint {str(ckpt_dir)!r} has no {CONFIG_NAME}")
    kind = json.loads(path.read_text()).get(MODEL_KEY, "parsed")
    if kind not in MODELS:
        raise ValueError(
            f"checkpoint {str(ckpt_dir)!r}: {CONFIG_NAME} names model {kind!r}, not one of {list(MODELS)}"
        )
    return kind


def require_tagger_checkpoint(ckpt_dir: str | Path) -> None:
    """Refuse, by name, a checkpoint that is not an R-Tagger's: the tagger is RLIPv2-ParSeD fed with boxes;
    a ParSeDA checkpoint (pre-training, DAB queries) cannot score given pairs."""
    kind = checkpoint_model(ckpt_dir)
    if kind != "parsed":
        raise ValueError(
            f"checkpoint {str(ckpt_dir)!r} holds an RLIPv2-ParSeDA model (a pre-training checkpoint, DAB queries), "
            "which cannot score given box pairs; the R-Tagger needs an RLIPv2-ParSeD checkpoint (converted from "
            "RLIPv2_Tagger.pth, or pre-trained with --model parsed)"
        )


def load_checkpoint(ckpt_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Model:
    """Rebuild the model (ParSeD or ParSeDA, as the config file says) from its stored config and load the weights
    strictly (missing/unexpected keys raise)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    ckpt = Path(ckpt_dir)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (ckpt / name).is_file():
            raise ValueError(
                f"checkpoint {str(ckpt)!r} has no {name}; expected {CONFIG_NAME}, {WEIGHTS_NAME}, {TOKENIZER_DIR}/"
            )
    kind = checkpoint_model(ckpt)
    with safe_open(str(ckpt / WEIGHTS_NAME), framework="pt") as f:
        stamp = (f.metadata() or {}).get(STAMP_KEY)
    stamped = json.loads(stamp).get(MODEL_KEY) if stamp else None  # None: written before models were stamped
    if stamped is not None and stamped != kind:
        raise ValueError(
            f"checkpoint {str(ckpt)!r}: {CONFIG_NAME} says model {kind!r} but {WEIGHTS_NAME} was written by {stamped!r}"
        )
    cfg_cls, model_cls = MODELS[kind]
    stored = json.loads((ckpt / CONFIG_NAME).read_text())
    stored.pop(MODEL_KEY, None)
    cfg = cfg_cls.from_dict(stored)
    tok_dir = ckpt / TOKENIZER_DIR
    tokenizer = load_tokenizer(str(tok_dir) if tok_dir.is_dir() else cfg.text_model)
    model = model_cls(cfg, tokenizer, pretrained=False)
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
