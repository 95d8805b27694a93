"""The interface every captioner implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image

    from storage.records import ImageRecord


@runtime_checkable
class Captioner(Protocol):
    """Writes captions for a batch of images.

    Attributes:
        name: stable id written into every caption row, e.g. "blip:Salesforce/blip-image-captioning-large".
        revision: model revision or content hash; part of the run key.
        needs_pixels: False when the captioner never looks at the image (oracle), so nothing is decoded.
    """

    name: str
    revision: str
    needs_pixels: bool

    def sampling(self) -> dict:
        """The generation settings, recorded with every caption."""
        ...

    def caption(
        self, images: list[ImageRecord], pixels: list[Image.Image | None], seed: int
    ) -> list[list[str]]:
        """Captions per image, in image order. `seed` makes sampling reproducible for the batch.

        An image's captions should depend only on (seed, image id) and its pixels, not on the other images
        of the call: the caption stage splits a batch into smaller calls after a CUDA out-of-memory error.
        """
        ...
