"""Typed records passed between stages; each has an explicit Arrow schema in storage.schemas."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class Box:
    """One annotated box; (x, y, w, h) in pixels, top-left origin (COCO convention)."""

    ann_id: int
    category_id: int
    label: str
    x: float
    y: float
    w: float
    h: float


@dataclass(slots=True)
class ImageRecord:
    """One image of the plan with its validated boxes."""

    image_id: int
    file_name: str
    width: int
    height: int
    shard: int
    boxes: list[Box] = field(default_factory=list)
    # What the reference matcher (match.mode "reference") needs and the validated boxes do not keep; None in
    # records not written by the planner (or planned before reltag recorded them).
    box_file_index: list[int] | None = None  # per box, its annotation's position in the file's "annotations"
    class_order: list[int] | None = None  # category ids by first annotation in the file, crowd/empty ones too


@dataclass(slots=True)
class Caption:
    """One caption of one image. caption_id is the index 0..N_Cap-1 within the image."""

    image_id: int
    caption_id: int
    text: str
    is_duplicate: bool
    captioner: str
    captioner_revision: str
    sampling: str  # JSON of the generation settings (or "oracle")
    source_id: int | None = (
        None  # the captions file's annotation id (human captions); None for generated ones
    )


@dataclass(slots=True)
class ParsedRelation:
    """One (subject, relation, object) text triple parsed from one caption."""

    image_id: int
    caption_id: int
    subject_text: str
    subject_head: str
    relation: str  # raw relation span, e.g. "sitting on"
    relation_lemma: str
    object_text: str
    object_head: str


@dataclass(slots=True)
class Candidate:
    """One ordered (subject box, object box, relation text) candidate for the tagger."""

    image_id: int
    subject_ann_id: int
    object_ann_id: int
    subject_category_id: int
    object_category_id: int
    subject_label: str
    object_label: str
    relation: str
    relation_lemma: str
    caption_ids: list[int]  # sorted caption indices that support this (pair, relation)
    n_captions: int
    subject_rule: str  # which matching rule matched the subject: name / synonym / lemma / reference
    subject_synonym: str
    object_rule: str
    object_synonym: str


@dataclass(slots=True)
class RegionCaption:
    """One caption of the union box of one candidate pair (dense captioning on pairwise union regions, paper
    Table 21, last row), with one candidate it gave that pair; a caption that gave none is one row whose
    candidate fields are null. Written by the region stage (tasks/stages/region.py)."""

    image_id: int
    box_a_ann_id: int  # the captioned pair, in the orientation the match stage met it first
    box_b_ann_id: int
    union_box: list[float]  # x, y, w, h in pixels: the crop that was captioned (union of both boxes, clamped)
    caption_id: int  # -1 - k for the image's k-th region caption: never a position in the image's captions
    text: str
    captioner: str
    captioner_revision: str
    sampling: str  # JSON of the beam-search settings
    n_relations: int  # relations parsed from the caption (matched or not)
    # the candidate: this pair in either orientation, and the relation text that names both of its classes
    subject_ann_id: int | None = None
    object_ann_id: int | None = None
    subject_category_id: int | None = None
    object_category_id: int | None = None
    subject_label: str | None = None
    object_label: str | None = None
    relation: str | None = None
    relation_lemma: str | None = None
    subject_rule: str | None = None
    subject_synonym: str | None = None
    object_rule: str | None = None
    object_synonym: str | None = None
    is_new: bool | None = None  # not among the match stage's candidates (else it adds this caption to one)


@dataclass(slots=True)
class TaggedRelation:
    """A candidate with the tagger's three confidence factors (paper Sec. 4.2.2, Eq. 5)."""

    image_id: int
    subject_ann_id: int
    object_ann_id: int
    subject_category_id: int
    object_category_id: int
    subject_label: str
    object_label: str
    relation: str
    relation_lemma: str
    caption_ids: list[int]
    n_captions: int
    p_subject: float
    p_object: float
    p_relation: float
    confidence: float
    relation_rank: int  # 1 = the pair's best-scored relation text
    tagger: str


@dataclass(slots=True)
class Triplet:
    """An accepted <subject, relation, object> triplet with its provenance."""

    image_id: int
    subject_ann_id: int
    object_ann_id: int
    subject_category_id: int
    object_category_id: int
    subject_label: str
    object_label: str
    subject_box: list[float]  # x, y, w, h in pixels
    object_box: list[float]
    relation: str
    relation_lemma: str
    confidence: float
    p_subject: float
    p_object: float
    p_relation: float
    relation_rank: int
    caption_ids: list[int]
    n_captions: int
    tagger: str
    run_key: str
    # per caption_ids entry, the captions file's annotation id (COCO-Captions `id`); None for generated captions
    caption_source_ids: list[int | None] | None = None


@dataclass(slots=True)
class Reject:
    """A tagged relation below the threshold (or otherwise dropped), with the reason."""

    image_id: int
    subject_ann_id: int
    object_ann_id: int
    subject_label: str
    object_label: str
    relation: str
    confidence: float
    p_subject: float
    p_object: float
    p_relation: float
    caption_ids: list[int]
    reason: str
    run_key: str


@dataclass(slots=True)
class Quarantined:
    """An input record set aside with the reason; the run goes on without it."""

    stage: str  # plan / caption / parse / ...
    image_id: int | None
    record: str  # file name, annotation id or caption reference that names the record
    reason: str  # short machine-countable reason, e.g. "bbox_outside_image"
    detail: str  # human-readable message with the offending values
    values: str | None = None  # the record's values as read from the input (JSON), where there is one


@dataclass(slots=True)
class VerifiedImage:
    """An image the verify stage decoded in full: what the file held (pixels are not stored)."""

    image_id: int
    file_name: str
    width: int  # stored pixel grid (EXIF orientation not applied)
    height: int
    format: str  # JPEG, PNG, ...
    mode: str  # the file's mode before conversion to RGB: RGB, L, CMYK, P, I;16, ...
    exif_orientation: int  # 1 = as stored; 2..8 reported, never applied (boxes refer to the stored grid)
    bytes: int
    sha256: str  # of the file's bytes, as verified
