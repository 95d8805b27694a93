"""Verify stage: every planned image of a batch is decoded in full (threads) before any other stage sees it.

Planning checks headers only; a JPEG cut after its header, or corrupt entropy-coded data, passes a header
check and fails only when its pixels are decoded. With human captions and the greedy tagger no model stage
opens an image, so without this stage such a file would reach the triplets (and crash the pre-training
loader). Decoding goes through tasks.images.decode_image, the function the BLIP caption stage and the pixel
taggers use, so an image fails here for the same reasons and with the same message as it would there.

Kept, and counted by mode: CMYK, palette, grey, 16-bit and alpha images (converted to 8-bit RGB by every
stage that reads pixels; the file is not rewritten). EXIF orientation is reported (exif_orientation, counted
as exif_rotated) and not applied: COCO and Objects365 boxes refer to the stored pixel grid, which is what
every reltag stage decodes, so boxes and pixels stay aligned; rotating would misplace every box.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from storage.records import ImageRecord, Quarantined, VerifiedImage
from tasks.images import BadImage, decode_image, quarantine_row
from tasks.run.context import RunContext, batch_images
from tasks.run.registry import FunnelRow, Stage, StageOutput, register
from tasks.stats import Count, Ratio, Stats, Tally


def _verify_one(image_root: str, record: ImageRecord, max_pixels: int) -> VerifiedImage | Quarantined:
    try:
        d = decode_image(image_root, record, max_pixels=max_pixels)
    except BadImage as e:
        return quarantine_row("verify", record, e.reason, e.detail)
    return VerifiedImage(
        record.image_id, record.file_name, d.rgb.size[0], d.rgb.size[1], d.format, d.mode, d.orientation,
        d.nbytes, d.sha256,
    )  # fmt: skip


def verify_batch(
    images: list[ImageRecord], image_root: str, max_pixels: int, threads: int = 8
) -> tuple[list[VerifiedImage], list[Quarantined], dict]:
    """Decode every image of a batch in full; (verified rows, quarantined rows, stats), both in batch order.

    Pure function (no Prefect). Pillow's decoders release the GIL, so threads decode side by side.

    Args:
        images: the batch, as planned.
        image_root: folder or fsspec URI the file names are relative to.
        max_pixels: images with more pixels are quarantined (too_large) without being decoded.
        threads: decoding threads (does not change the output).
    """
    if threads > 1 and len(images) > 1:
        with ThreadPoolExecutor(min(threads, len(images)), "reltag-verify") as pool:
            results = list(pool.map(lambda im: _verify_one(image_root, im, max_pixels), images))
    else:
        results = [_verify_one(image_root, im, max_pixels) for im in images]
    verified = [r for r in results if isinstance(r, VerifiedImage)]
    quarantined = [r for r in results if isinstance(r, Quarantined)]
    # quarantine counts and reasons are added for every stage by run_batch_stage
    stats = Stats(
        images=Count(len(images)),
        verified=Count(len(verified)),
        verified_rate=Ratio(len(verified), len(images)),
        converted_to_rgb=Count(sum(1 for v in verified if v.mode != "RGB")),
        exif_rotated=Count(sum(1 for v in verified if v.exif_orientation not in (0, 1))),
        bytes_decoded=Count(sum(v.bytes for v in verified)),
        top_modes=Tally.of(v.mode for v in verified),
    )
    return verified, quarantined, stats


def _stage_batch(ctx: RunContext, shard: int, batch: int) -> StageOutput:
    plan = ctx.config.plan
    rows, quarantined, stats = verify_batch(
        batch_images(ctx, shard, batch), ctx.images_root, plan.max_pixels, plan.decode_threads()
    )
    return StageOutput(rows, quarantined, stats)


# every planned image decoded in full before any other stage sees it; its settings are the plan's pixel limit
STAGE = register(
    Stage(
        "verify", None, VerifiedImage, "verified", "plan",
        settings=lambda cfg: {"max_pixels": cfg.plan.max_pixels},
        compute=_stage_batch,
        stats=("verified",),
        funnel=(
            FunnelRow("verified", "images decoded in full", "verified", lambda s: s.tally("quarantine_reasons")),
        ),
    )
)  # fmt: skip
