"""RLIPv2-ParSeD and its R-Tagger mode (RLIPv2, ICCV 2023): network, inference, training, checkpoints."""

from models.rlipv2.config import RLIPv2Config
from models.rlipv2.model import DecoderOutput, EncodedImages, RLIPv2ParSeD

__all__ = ["DecoderOutput", "EncodedImages", "RLIPv2Config", "RLIPv2ParSeD"]
