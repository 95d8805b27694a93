"""RLIPv2-ParSeD and its R-Tagger mode, and RLIPv2-ParSeDA (RLIPv2, ICCV 2023) as the reference code runs them:
networks, inference, conversion of the released checkpoints, training, checkpoints."""

from models.rlipv2.config import ParSeDAConfig, RLIPv2Config
from models.rlipv2.model import DecoderOutput, EncodedImages, RLIPv2ParSeD
from models.rlipv2.parseda import RLIPv2ParSeDA
from models.rlipv2.tagger import Scores, Tagger, load_tagger

__all__ = [
    "DecoderOutput",
    "EncodedImages",
    "ParSeDAConfig",
    "RLIPv2Config",
    "RLIPv2ParSeD",
    "RLIPv2ParSeDA",
    "Scores",
    "Tagger",
    "load_tagger",
]
