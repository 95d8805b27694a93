"""Build one captioner by name: "oracle", "blip" or "blip2" (lavis is refused with the reason)."""

from __future__ import annotations

from models.captioners.base import Captioner

NAMES = ("oracle", "blip", "blip2")


def make_captioner(
    name: str,
    *,
    model: str | None = None,
    revision: str = "main",
    captions_file: str | None = None,
    **settings,
) -> Captioner:
    """One captioner.

    Args:
        name: "oracle" (needs captions_file), "blip" or "blip2" (need model: hub id or local directory).
        model: hub id or local directory of the weights (safetensors), for blip / blip2.
        revision: hub revision of the weights.
        captions_file: COCO-Captions JSON (local path or fsspec URI), for oracle.
        **settings: generation settings of BlipCaptioner.load / Blip2Captioner.load (n_cap, top_p, ...,
            image_size, dtype, device).
    """
    if name == "oracle":
        if not captions_file:
            raise ValueError(
                "captioner 'oracle' needs a captions file (COCO-Captions JSON with an 'annotations' list), "
                "got captions_file=None"
            )
        from models.captioners.oracle import OracleCaptioner

        return OracleCaptioner(captions_file)
    if name in ("blip", "blip2"):
        if not model:
            raise ValueError(f"captioner {name!r} needs a model (hub id or local directory), got {model!r}")
        if name == "blip":
            from models.captioners.blip import BlipCaptioner

            return BlipCaptioner.load(model, revision, **settings)
        from models.captioners.blip2 import Blip2Captioner

        return Blip2Captioner.load(model, revision, **settings)
    if name == "lavis":
        raise ValueError(
            "captioner 'lavis' is not supported: salesforce-lavis pins old transformers and replaces torch, "
            "so it cannot be installed beside this stack; use 'blip' or 'blip2'"
        )
    raise ValueError(f"unknown captioner {name!r}; expected one of {NAMES}")
