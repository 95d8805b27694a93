"""Captioners behind one interface: oracle (human captions), BLIP and BLIP-2 through transformers."""

from models.captioners.base import Captioner
from models.captioners.oracle import OracleCaptioner

__all__ = ["Captioner", "OracleCaptioner"]
