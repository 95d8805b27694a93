"""Flow parameters: one pydantic model per flow."""

from __future__ import annotations

import os

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
    config: PipelineConfig = PipelineConfig()

    @field_validator("annotations", "images", "out", "captions")
    @classmethod
    def _local_paths_absolute(cls, v):
        if v is None or "://" in v:
            return v
        return os.path.abspath(os.path.expanduser(v))

    @property
    def dataset_name(self) -> str:
        return self.dataset or self.config.dataset
