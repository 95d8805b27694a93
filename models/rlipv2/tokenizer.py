"""Tokenizer loading: the text model's own (hub id / local dir) or a small word-level one built offline."""

from __future__ import annotations

import re
from pathlib import Path

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # RoBERTa's ids 0..3


def load_tokenizer(name_or_dir: str):
    """AutoTokenizer from a hub id or local dir (offline runs need the files on disk)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_dir)


def build_word_tokenizer(texts: list[str], out_dir: str | Path | None = None):
    """A word-level fast tokenizer over the words of `texts`, RoBERTa-style "<s> ... </s>" framing.

    Used for tiny models (tests, the examples/vg_tiny training run) where no pretrained vocabulary can be
    downloaded. Saved with save_pretrained when out_dir is given, so it loads back through AutoTokenizer.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
