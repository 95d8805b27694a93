"""Caption stage: run the configured captioners over a batch of images, de-duplicate per image."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from models.captioners.base import Captioner
from models.captioners.oracle import OracleCaptioner
from storage.records import Caption, ImageRecord, Quarantined
from tasks.config import CaptionConfig, PipelineConfig
from tasks.images import load_image
from tasks.run.context import RunContext, process_resource, verified_images
from tasks.run.registry import FunnelRow, Stage, StageOutput, register
from tasks.run.revisions import model_dir_revision
from tasks.stats import Count, Max, Ratio, Stats, Tally


@dataclass(slots=True)
class CaptionOutput:
    captions: list[Caption]
    quarantine: list[Quarantined] = field(default_factory=list)
    stats: Stats = field(default_factory=Stats)


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(" .")


#: Generation settings of the model captioners (device is not one: it does not change the output).
_GEN = ("n_cap", "top_p", "top_k", "max_length", "min_length", "repetition_penalty", "num_beams", "prompt",
        "batch_size", "dtype")  # fmt: skip


@dataclass(frozen=True)
class CaptionerEntry:
    """A captioner as the caption stage knows it: which settings change its captions, how its revision is
    named (part of the caption stage's key), and how it is built."""

    name: str
    settings: Callable[[CaptionConfig], dict]
    revision: Callable[[CaptionConfig, str | None], str]
    build: Callable[[CaptionConfig, str | None], Captioner]


def _gen(cfg: CaptionConfig) -> dict:
    return dict(
        n_cap=cfg.n_cap, top_p=cfg.top_p, top_k=cfg.top_k, max_length=cfg.max_length, min_length=cfg.min_length,
        repetition_penalty=cfg.repetition_penalty, num_beams=cfg.num_beams, prompt=cfg.prompt, dtype=cfg.dtype,
        device=cfg.device,
    )  # fmt: skip


def _build_blip(cfg: CaptionConfig, captions_file: str | None) -> Captioner:
    from models.captioners.blip import BlipCaptioner  # torch and transformers: only when a model captions

    return BlipCaptioner.load(
        cfg.model, cfg.model_revision, image_size=cfg.image_size,
        beam_repetition_penalty=cfg.beam_repetition_penalty, **_gen(cfg),
    )  # fmt: skip


def _build_blip2(cfg: CaptionConfig, captions_file: str | None) -> Captioner:
    from models.captioners.blip2 import Blip2Captioner

    return Blip2Captioner.load(cfg.blip2_model, cfg.model_revision, **_gen(cfg))


ORACLE = "oracle"

#: Every captioner, by name. A new captioner is one entry here (and its model class in models/captioners).
CAPTIONERS: dict[str, CaptionerEntry] = {
    # human captions: the file's checksum is the whole identity; no generation setting applies
    ORACLE: CaptionerEntry(
        ORACLE,
        settings=lambda cfg: {},
        revision=lambda cfg, captions_sha: f"oracle:{captions_sha}",
        build=lambda cfg, captions_file: OracleCaptioner(require_captions_file(cfg, captions_file)),
    ),
    "blip": CaptionerEntry(
        "blip",
        settings=lambda cfg: {
            **{k: getattr(cfg, k) for k in _GEN},
            "image_size": cfg.image_size,
            "beam_repetition_penalty": cfg.beam_repetition_penalty,
        },  # fmt: skip
        revision=lambda cfg, _: "blip:" + model_dir_revision(cfg.model, cfg.model_revision),
        build=_build_blip,
    ),
    # BLIP-2's ViT-g keeps the input size of its own processor config (224), not cfg.image_size
    "blip2": CaptionerEntry(
        "blip2",
        settings=lambda cfg: {k: getattr(cfg, k) for k in _GEN},
        revision=lambda cfg, _: "blip2:" + model_dir_revision(cfg.blip2_model, cfg.model_revision),
        build=_build_blip2,
    ),
}


def uses_human_captions(cfg: CaptionConfig) -> bool:
    """Whether the run captions with the oracle captioner, which reads a captions file."""
    return ORACLE in captioner_names(cfg)


def require_captions_file(cfg: CaptionConfig, captions_file: str | None) -> str | None:
    """The captions file, or the one error a human-caption run without it gets (before any work)."""
    if uses_human_captions(cfg) and not captions_file:
        raise ValueError(
            "captioner 'oracle' needs a captions file (--captions, COCO-Captions JSON with an 'annotations' list)"
        )
    return captions_file


def captioner_names(cfg: CaptionConfig) -> tuple[str, ...]:
    return cfg.captioner if isinstance(cfg.captioner, tuple) else (cfg.captioner,)


def captioner_entries(cfg: CaptionConfig) -> list[CaptionerEntry]:
    """The config's captioners in order; an unknown or repeated name is an error naming it."""
    names = captioner_names(cfg)
    if not names:
        raise ValueError("caption config names no captioner (captioner=())")
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise ValueError(
            f"captioner {dup[0]!r} is listed {Counter(names)[dup[0]]} times in {names}; with the same batch "
            "seed it would only repeat the same captions"
        )
    unknown = [n for n in names if n not in CAPTIONERS]
    if unknown:
        raise ValueError(f"captioner {unknown[0]!r} is not one of {sorted(CAPTIONERS)}")
    return [CAPTIONERS[n] for n in names]


def build_captioners(cfg: CaptionConfig, captions_file: str | None) -> list[Captioner]:
    """The captioners of the config, in its order (their captions are concatenated per image).

    oracle reads captions_file; blip loads cfg.model and blip2 cfg.blip2_model (hub id or local directory,
    safetensors, no remote code) at cfg.model_revision, with the config's generation settings.
    """
    entries = captioner_entries(cfg)
    require_captions_file(cfg, captions_file)
    return [e.build(cfg, captions_file) for e in entries]


def batch_seed(run_key: str, shard: int, batch: int) -> int:
    """The sampling seed of one batch: sha256 of (run key, shard, batch), 63 bits.

    Promise: the same batch (shard, batch) of the same run key gets the same captions on any rerun
    on the same software and hardware class. The run key covers the config (captioners, model revisions,
    sampling settings, batch size) and the input; each image then draws from its own generator seeded by
    (this seed, image id), so its captions also do not depend on how the batch is split into generate calls.
    Different batches or run keys get unrelated seeds.
    """
    if not run_key:
        raise ValueError(
            f"batch_seed needs a non-empty run key, got {run_key!r} (shard {shard}, batch {batch})"
        )
    if shard < 0 or batch < 0:
        raise ValueError(f"batch_seed: shard {shard} and batch {batch} must be >= 0 (run key {run_key})")
    blob = f"reltag-caption:{run_key}:{int(shard)}:{int(batch)}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") & ((1 << 63) - 1)


def run_captioner(cap: Captioner, images, pixels, seed: int, micro: int, state: dict) -> list[list[str]]:
    """Captions of one captioner in micro-batches; a CUDA OOM halves the micro-batch and retries it."""
    import torch  # here, not at import: `reltag run` on a finished run decides without loading torch

    out: list[list[str]] = []
    i = 0
    while i < len(images):
        j = min(i + micro, len(images))
        try:
            texts = cap.caption(images[i:j], pixels[i:j], seed)
        except torch.OutOfMemoryError:
            # Only an out-of-memory error is retried, and only with a smaller micro-batch; at 1 image the
            # batch fails like any other error and the flow redoes it alone later.
            if micro == 1:
                raise
            micro = max(1, micro // 2)
            state["oom_halvings"] += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        if len(texts) != j - i:
            raise ValueError(
                f"captioner {cap.name} returned {len(texts)} caption lists for {j - i} images "
                f"(image ids {images[i].image_id}..{images[j - 1].image_id})"
            )
        out.extend(texts)
        i = j
    state["micro_batch"] = min(state["micro_batch"], micro)
    return out


def caption_batch(
    images: list[ImageRecord],
    captioners: list[Captioner],
    image_root: str | None,
    seed: int,
    cfg: CaptionConfig | None = None,
) -> CaptionOutput:
    """Captions for every image, numbered 0.. per image across captioners, duplicates flagged.

    Pure function (no Prefect). Images are decoded (tasks.images.load_image) only when a captioner needs
    pixels; an image that cannot be decoded is quarantined and gets no captions. A CUDA out-of-memory
    error halves the generate micro-batch (cfg.batch_size images) and retries (stats["oom_halvings"]);
    any other error propagates and the flow marks the batch failed.

    Args:
        images: the batch.
        captioners: run in order; their captions are concatenated per image.
        image_root: folder or fsspec URI the images' file names are relative to (read only when a
            captioner needs pixels).
        seed: the batch's sampling seed (batch_seed(run_key, shard, batch)).
        cfg: caption settings; only batch_size (images per generate call) is read here.
    """
    cfg = cfg or CaptionConfig()
    if not captioners:
        raise ValueError(f"caption_batch got no captioners for {len(images)} images")
    quarantine: list[Quarantined] = []
    pixels: list = [None] * len(images)
    kept = list(range(len(images)))
    if any(c.needs_pixels for c in captioners):
        if image_root is None:
            names = [c.name for c in captioners if c.needs_pixels]
            raise ValueError(f"captioners {names} read pixels but image_root is None")
        kept = []
        for i, im in enumerate(images):
            pil, q = load_image(image_root, im, stage="caption")
            if q is not None:
                quarantine.append(q)
            else:
                pixels[i] = pil
                kept.append(i)
    kimages = [images[i] for i in kept]
    kpixels = [pixels[i] for i in kept]

    state = {"oom_halvings": 0, "micro_batch": cfg.batch_size}
    per_image: list[list[tuple[str, Captioner, int | None]]] = [[] for _ in kimages]
    for cap in captioners:
        pix = kpixels if cap.needs_pixels else [None] * len(kimages)
        texts = run_captioner(cap, kimages, pix, seed, state["micro_batch"], state)
        # human captions keep their file's annotation ids (captioners without them: None)
        ids = cap.source_ids(kimages) if hasattr(cap, "source_ids") else [[None] * len(t) for t in texts]
        for k, (t, src) in enumerate(zip(texts, ids, strict=True)):
            per_image[k].extend(zip(t, [cap] * len(t), src, strict=True))

    rows: list[Caption] = []
    n_unique: list[int] = []
    sampling = {c.name: json.dumps(c.sampling(), sort_keys=True) for c in captioners}
    for im, caps in zip(kimages, per_image):
        seen: set[str] = set()
        for k, (text, cap, src) in enumerate(caps):
            key = _norm(text)
            rows.append(
                Caption(im.image_id, k, text, key in seen, cap.name, cap.revision, sampling[cap.name], src)
            )
            seen.add(key)
        n_unique.append(len(seen))
    stats = Stats(
        images=Count(len(images)),
        images_captioned=Count(len(kimages)),
        captions=Count(len(rows)),
        unique_captions=Count(sum(n_unique)),
        # N_Unique (paper Table 21): unique captions per image, as a distribution {n: images} and a mean
        top_n_unique=Tally.of((str(u) for u in n_unique), form="keys"),
        n_unique_mean=Ratio(sum(n_unique), len(n_unique)),
        images_without_captions=Count(sum(1 for u in n_unique if u == 0)),
        quarantined=Count(len(quarantine)),
        top_quarantine_reasons=Tally.of(q.reason for q in quarantine),
        oom_halvings=Count(state["oom_halvings"]),
        micro_batch=Max(state["micro_batch"]),
        top_captions_by_captioner=Tally.of(r.captioner for r in rows),
    )
    return CaptionOutput(rows, quarantine, stats)


# -- the stage ---------------------------------------------------------------------------------------------


def _stage_batch(ctx: RunContext, shard: int, batch: int) -> StageOutput:
    cfg = ctx.config.caption
    caps = process_resource(  # the run's captioners, built once per worker process
        ("captioners", ctx.config_json, ctx.captions_file), lambda: build_captioners(cfg, ctx.captions_file)
    )
    out = caption_batch(
        verified_images(ctx, shard, batch),  # only images the verify stage decoded in full
        list(caps),
        ctx.images_root,
        batch_seed(ctx.key("caption"), shard, batch),  # the caption stage's key: reused captions, same seeds
        cfg,
    )
    return StageOutput(out.captions, out.quarantine, out.stats)


def _settings(cfg: PipelineConfig) -> dict:
    return {e.name: e.settings(cfg.caption) for e in captioner_entries(cfg.caption)}


def _revisions(cfg: PipelineConfig, inputs: dict) -> list[str]:
    return [e.revision(cfg.caption, inputs.get("captions_sha256")) for e in captioner_entries(cfg.caption)]


def _device(cfg: PipelineConfig) -> str:
    # human captions alone read no pixels and load no model
    return "cpu" if set(captioner_names(cfg.caption)) == {ORACLE} else cfg.caption.device


STAGE = register(
    Stage(
        "caption", "verify", Caption, "captions", "caption",
        settings=_settings,
        revision=lambda cfg, inputs: ",".join(_revisions(cfg, inputs)),
        device=_device,
        compute=_stage_batch,
        stats=("captions", "unique_captions", "images_without_captions"),
        funnel=(
            FunnelRow("captions", "captions", "captions",
                      lambda s: {**s.tally("quarantine_reasons"), "no_captions": s.count("images_without_captions")}),
            FunnelRow("unique_captions", "unique captions (N_Unique)", "unique_captions",
                      lambda s: {"duplicate": s.count("captions") - s.count("unique_captions")}),
        ),
        revision_record=("captioners", _revisions),
    )
)  # fmt: skip
