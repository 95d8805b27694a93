"""RLIPv2-ParSeD and its R-Tagger mode (RLIPv2, ICCV 2023) as the reference code runs it: network, inference,
conversion of the released checkpoint, training, checkpoints."""

from models.rlipv2.config import RLIPv2Config
from models.rlipv2.model import DecoderOutput, EncodedImages, RLIPv2ParSeD
from models.rlipv2.tagger import Scores, Tagger, load_tagger

__all__ = [
    "DecoderOutput",
    "EncodedImages",
    "RLIPv2Config",
    "RLIPv2ParSeD",
    "Scores",
    "Tagger",
    "load_tagger",
]
