"""RoBERTa phrase features: one pooled vector per phrase (tanh(dense(h_<s>))), cached by text at inference."""

from __future__ import annotations

import torch
from torch import nn

from models.rlipv2.config import RLIPv2Config

ROBERTA_KEYS = [
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id",
]  # fmt: skip


def roberta_config(cfg: RLIPv2Config):
    """The RobertaConfig of the text encoder (inline dict in tests / converted checkpoints, else the hub's)."""
    from transformers import RobertaConfig

    conf = (
        RobertaConfig(**cfg.text_config)
        if cfg.text_config is not None
        else RobertaConfig.from_pretrained(cfg.text_model)
    )
    conf._attn_implementation = "eager"  # additive float masks, the reference's arithmetic
    return conf


def build_roberta(cfg: RLIPv2Config, pretrained: bool) -> nn.Module:
    """transformers RobertaModel with its pooler (the pooler output is the phrase feature)."""
    from transformers import RobertaModel

    if pretrained and cfg.text_config is None:
        return RobertaModel.from_pretrained(
            cfg.text_model, add_pooling_layer=True, attn_implementation="eager", use_safetensors=True
        )
    return RobertaModel(roberta_config(cfg), add_pooling_layer=True)


def roberta_config_dict(roberta: nn.Module) -> dict:
    """The RobertaConfig fields needed to rebuild the text encoder offline (stored in checkpoints)."""
    c = roberta.config
    return {k: getattr(c, k) for k in ROBERTA_KEYS}


class PhraseCache:
    """Pooled phrase features by text, valid while the text encoder's weights do not change (eval, no grad).

    The reference re-encodes all 80/365 class keys and the relation texts in every forward; a phrase's pooled
    feature depends only on the phrase (each is tokenized as its own sequence), so caching changes nothing.
    """

    def __init__(self) -> None:
        self._cache: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def clear(self) -> None:
        self._cache.clear()

    def encode(
        self, roberta: nn.Module, tokenizer, texts: list[str], max_tokens: int, use_cache: bool
    ) -> torch.Tensor:
        """texts -> Tensor[n, R] pooled features; cached when use_cache."""
        if not texts:
            p = next(roberta.parameters())
            return p.new_zeros((0, roberta.config.hidden_size))
        if not use_cache:
            return _pooled(roberta, tokenizer, list(texts), max_tokens)
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        self.hits += len(texts) - len(missing)
        self.misses += len(missing)
        if missing:
            for t, f in zip(missing, _pooled(roberta, tokenizer, missing, max_tokens)):
                self._cache[t] = f
        return torch.stack([self._cache[t] for t in texts])


def _pooled(roberta: nn.Module, tokenizer, texts: list[str], max_tokens: int) -> torch.Tensor:
    device = next(roberta.parameters()).device
    tok = tokenizer(texts, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
    out = roberta(input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))
    return out.pooler_output  # Tensor[n, R]
