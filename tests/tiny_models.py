"""Tiny random-weight BLIP / BLIP-2 models and drawn images for tests: no pydantic, Prefect or spaCy needed,
so the GPU machine's tests (tests/test_gpu_models.py) share them with the CPU ones."""

from __future__ import annotations

import os

import torch
from PIL import Image, ImageDraw

from storage.records import ImageRecord

WORDS = (
    "a picture of dog cat man woman riding sitting on in the with holding ball table car street grass "
    "red blue small big two horse bike tree sky water boat people standing next to"
).split()
SIZE = 64  # tiny ViT input: (64/16)^2 + 1 = 17 image tokens


def _tokenizer(extra: list[str]):
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *extra]
    vocab = {t: i for i, t in enumerate(specials + WORDS + ["."])}
    return BertTokenizer(
        vocab=vocab, do_lower_case=True, bos_token="[DEC]" if "[DEC]" in extra else "[CLS]"
    ), vocab


def build_tiny_blip(path: str, seed: int = 0) -> str:
    """A BLIP with a 2-layer ViT and a 2-layer BERT decoder, random weights, saved as safetensors."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor

    torch.manual_seed(seed)
    tok, vocab = _tokenizer(["[DEC]"])
    cfg = BlipConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=SIZE,
            patch_size=16,
        ),
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            encoder_hidden_size=32,
            max_position_embeddings=64,
            bos_token_id=vocab["[DEC]"],
            sep_token_id=vocab["[SEP]"],
            eos_token_id=vocab["[SEP]"],
            pad_token_id=0,
            initializer_range=0.2,  # larger than default so that captions depend visibly on the image
        ),
    )
    model = BlipForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    BlipProcessor(BlipImageProcessorPil(size={"height": SIZE, "width": SIZE}), tok).save_pretrained(path)
    return path


def build_tiny_blip2(path: str, seed: int = 0) -> str:
    """A BLIP-2 with a 1-layer ViT, a 1-layer Q-Former (4 queries) and a 2-layer OPT, random weights."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil

    torch.manual_seed(seed)
    tok, vocab = _tokenizer(["<image>"])
    cfg = Blip2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=32,
            patch_size=16,
        ),
        qformer_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            intermediate_size=64,
            encoder_hidden_size=32,
            max_position_embeddings=64,
        ),
        text_config=dict(
            model_type="opt",
            vocab_size=len(vocab),
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            bos_token_id=vocab["[CLS]"],
            eos_token_id=vocab["[SEP]"],
            pad_token_id=0,
        ),
        num_query_tokens=4,
        image_token_index=vocab["<image>"],
    )
    model = Blip2ForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    Blip2Processor(
        BlipImageProcessorPil(size={"height": 32, "width": 32}), tok, num_query_tokens=4
    ).save_pretrained(path)
    return path


def draw_images(root, n: int, size=(80, 60)) -> list[ImageRecord]:
    """n distinct drawings saved as JPEG under root; their ImageRecords."""
    recs = []
    for i in range(n):
        im = Image.new("RGB", size, (20 * i % 255, 120, 255 - 30 * i % 255))
        d = ImageDraw.Draw(im)
        d.rectangle([5 + 3 * i, 5, 40 + 4 * i, 30 + 2 * i], fill=(255, 255 - 40 * i % 255, 0))
        d.ellipse([30, 20 + i, 70, 55], fill=(0, 40 * i % 255, 200))
        name = f"img_{i:03d}.jpg"
        im.save(os.path.join(root, name), quality=95)
        recs.append(ImageRecord(1000 + i, name, size[0], size[1], 0))
    return recs
