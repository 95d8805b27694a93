"""RoBERTa phrase encoder: one feature per phrase (pooled output), cached by text at inference."""

from __future__ import annotations

import torch
from torch import nn

from models.rlipv2.config import RLIPv2Config


def build_roberta(cfg: RLIPv2Config, pretrained: bool) -> nn.Module:
    """transformers RobertaModel with its pooler: inline config (tests), or hub id / local dir."""
    from transformers import RobertaConfig, RobertaModel

    if cfg.text_config is not None:
        return RobertaModel(RobertaConfig(**cfg.text_config), add_pooling_layer=True)
    if pretrained:
        return RobertaModel.from_pretrained(cfg.text_model, add_pooling_layer=True)
    return RobertaModel(RobertaConfig.from_pretrained(cfg.text_model), add_pooling_layer=True)


def roberta_config_dict(roberta: nn.Module) -> dict:
    """The RobertaConfig fields needed to rebuild the text encoder offline (stored in checkpoints)."""
    c = roberta.config
    keys = [
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id",
        "bos_token_id", "eos_token_id",
    ]  # fmt: skip
    return {k: getattr(c, k) for k in keys}


class PhraseEncoder(nn.Module):
    """Encodes phrases (class names, relation texts) to one vector each.

    Pooling: RoBERTa's pooler on the <s> token (dense + tanh over the first position), i.e. the model's
    "pooled output" (RLIPv2 Sec. 3.1 encodes each phrase to one token). In eval mode without gradients the
    features are cached by text, so a phrase is encoded once per process instead of once per forward
    (the reference code re-encodes all 365 Objects365 names in every forward).
    """

    def __init__(self, cfg: RLIPv2Config, tokenizer, pretrained: bool = False):
        super().__init__()
        self.cfg = cfg
        self.roberta = build_roberta(cfg, pretrained)
        self.tokenizer = tokenizer
        self.hidden_size = self.roberta.config.hidden_size
        self._cache: dict[str, torch.Tensor] = {}
        self.cache_hits = 0
        self.cache_misses = 0

    def train(self, mode: bool = True):
        # weights may change while training: cached features would be stale (nothing is cached while training)
        if mode:
            self._cache.clear()
        return super().train(mode)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _encode(self, texts: list[str]) -> torch.Tensor:
        device = next(self.roberta.parameters()).device
        tok = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.cfg.max_text_tokens, return_tensors="pt"
        )
        out = self.roberta(
            input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device)
        )
        return out.pooler_output  # Tensor[n, hidden]

    def forward(self, texts: list[str], use_cache: bool | None = None) -> torch.Tensor:
        """Args: texts, n phrases. Returns Tensor[n, hidden]; cached when not training and no grad."""
        if not texts:
            p = next(self.roberta.parameters())
            return p.new_zeros((0, self.hidden_size))
        if use_cache is None:
            use_cache = not self.training and not torch.is_grad_enabled()
        if not use_cache:
            return self._encode(list(texts))
        missing = sorted({t for t in texts if t not in self._cache})
        self.cache_hits += len(texts) - len(missing)
        self.cache_misses += len(missing)
        if missing:
            feats = self._encode(missing)
            for t, f in zip(missing, feats):
                self._cache[t] = f
        return torch.stack([self._cache[t] for t in texts])
