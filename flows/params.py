"""Flow parameters: one pydantic model per flow."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.config import PipelineConfig


class LabelParams(BaseModel):
    """Parameters of `label-dataset`: inputs, output root and the whole pipeline config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    annotations: str = Field(description="COCO / Objects365 detection JSON (local path or fsspec URI)")
    images: str = Field(description="folder the images' file_name entries are relative to")
    out: str = Field(description="output root (local path or fsspec URI)")
    captions: str | None = Field(None, description="COCO-Captions JSON, needed by the oracle captioner")
    dataset: str | None = Field(
        None, description="dataset name in the output layout; default: config.dataset"
    )
    # a factory, not an instance made at import: stages imported later register their sections
    config: PipelineConfig = Field(default_factory=PipelineConfig)

    @field_validator("annotations", "images", "out", "captions")
    @classmethod
    def _local_paths_absolute(cls, v):
        if v is None or "://" in v:
            return v
        return os.path.abspath(os.path.expanduser(v))

    @property
    def dataset_name(self) -> str:
        return self.dataset or self.config.dataset


def read_config_file(path: str) -> dict:
    """A config file (YAML by its .yaml/.yml ending, JSON otherwise) as a mapping; every problem is one
    ValueError naming the file: unreadable, not parseable (the parser's words on one line), or not a mapping."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"config file {path} cannot be read: {e.strerror or e}") from e
    kind = "plain YAML" if path.endswith((".yaml", ".yml")) else "valid JSON"
    try:
        if kind == "plain YAML":
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: the parser's words, on one line
        raise ValueError(f"config file {path} is not {kind}: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    return data
