"""Deformable encoder/decoder layers and Asymmetric Language-Image Fusion (RLIPv2 Sec. 3.1, Appendix F)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.ms_deform_attn import MSDeformAttn
from models.rlipv2.config import RLIPv2Config


class FFN(nn.Module):
    """Linear -> ReLU -> Linear with residual and post-LayerNorm (Deformable DETR)."""

    def __init__(self, d: int, d_ffn: int, dropout: float):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(d, d_ffn), nn.Linear(d_ffn, d)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels + FFN."""

    def __init__(self, cfg: RLIPv2Config):
        super().__init__()
        self.self_attn = MSDeformAttn(cfg.d_model, cfg.n_levels, cfg.n_heads, cfg.n_points)
        self.dropout = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.ffn = FFN(cfg.d_model, cfg.d_ffn, cfg.dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """src, pos: Tensor[B, S, d]; reference_points Tensor[B, S, L, 2]; padding_mask Tensor[B, S] bool."""
        out = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        return self.ffn(self.norm(src + self.dropout(out)))


class ALIF(nn.Module):
    """Asymmetric Language-Image Fusion (RLIPv2 Sec. 3.1, Appendix F Eqs. 7-9).

    One attention map A = (W_q V)(W_k T)^T / sqrt(d_head) between the coarsest visual level V and the
    phrase tokens T (Eq. 7) is softmaxed over the text to update V (Eq. 8) and over the image to update T
    (Eq. 9); each update is gated by a learnable scalar alpha (Table 2's best gating). The text side then
    goes through one RoBERTa-architecture layer at width d (the sparse language layers of Eq. 4), so text
    is refined only at the N_ALIF fusion points while vision runs N_v deformable layers in between
    (the asymmetry). Padded text tokens and padded pixels are masked on both sides.
    """

    def __init__(self, cfg: RLIPv2Config):
        super().__init__()
        from transformers import RobertaConfig
        from transformers.models.roberta.modeling_roberta import RobertaLayer

        d, h = cfg.d_model, cfg.n_heads
        self.h, self.dh = h, d // h
        self.norm_v, self.norm_t = nn.LayerNorm(d), nn.LayerNorm(d)
        self.v_query, self.t_key = nn.Linear(d, d), nn.Linear(d, d)
        self.v_value, self.t_value = nn.Linear(d, d), nn.Linear(d, d)
        self.v_out, self.t_out = nn.Linear(d, d), nn.Linear(d, d)
        self.alpha_v = nn.Parameter(torch.tensor(float(cfg.alif_gate_init)))
        self.alpha_t = nn.Parameter(torch.tensor(float(cfg.alif_gate_init)))
        lang = RobertaConfig(
            hidden_size=d,
            num_attention_heads=h,
            intermediate_size=cfg.d_ffn,
            hidden_dropout_prob=cfg.dropout,
            attention_probs_dropout_prob=cfg.dropout,
        )
        lang._attn_implementation = "eager"  # additive float mask, no sdpa kernel selection surprises
        self.lang_layer = RobertaLayer(lang)

    def forward(self, v, v_mask, t, t_mask):
        """Args: v Tensor[B, Sv, d], v_mask Tensor[B, Sv] bool (True = pad), t Tensor[B, T, d], t_mask Tensor[B, T].

        Returns: (v, t) updated, same shapes.
        """
        b, sv, d = v.shape
        nt = t.shape[1]
        vn, tn = self.norm_v(v), self.norm_t(t)

        def heads(x, n):  # [B, n, d] -> [B, h, n, dh]
            return x.view(b, n, self.h, self.dh).transpose(1, 2)

        attn = heads(self.v_query(vn), sv) @ heads(self.t_key(tn), nt).transpose(-1, -2) / math.sqrt(self.dh)
        # Eq. 8: vision attends to the phrases; [B, h, Sv, T]
        a_vt = attn.masked_fill(t_mask[:, None, None, :], float("-inf")).softmax(-1)
        dv = (a_vt @ heads(self.t_value(tn), nt)).transpose(1, 2).reshape(b, sv, d)
        # Eq. 9: phrases attend to the image; [B, h, T, Sv]
        a_tv = attn.transpose(-1, -2).masked_fill(v_mask[:, None, None, :], float("-inf")).softmax(-1)
        dt = (a_tv @ heads(self.v_value(vn), sv)).transpose(1, 2).reshape(b, nt, d)
        v = v + self.alpha_v * self.v_out(dv)
        t = t + self.alpha_t * self.t_out(dt)
        ext = torch.zeros(b, 1, 1, nt, dtype=t.dtype, device=t.device)
        ext = ext.masked_fill(t_mask[:, None, None, :], torch.finfo(t.dtype).min)
        return v, self.lang_layer(t, ext)


class DecoderLayer(nn.Module):
    """Query self-attention (with a block mask) -> deformable cross-attention to the memory -> FFN."""

    def __init__(self, cfg: RLIPv2Config):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.self_attn = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.cross_attn = MSDeformAttn(d, cfg.n_levels, cfg.n_heads, cfg.n_points)
        self.dropout = nn.Dropout(cfg.dropout)
        self.ffn = FFN(d, cfg.d_ffn, cfg.dropout)

    def forward(
        self,
        tgt,
        pos,
        reference_points,
        memory,
        spatial_shapes,
        level_start_index,
        memory_mask,
        block,
        memory_index,
    ):
        """Args:
        tgt, pos: Tensor[G, Q, d]; reference_points Tensor[G, Q, L, 4] (cx, cy, w, h);
        memory Tensor[B, S, d] (one row per image); memory_mask Tensor[B, S] bool; block Tensor[G, Q, Q] bool,
        True = query i may not attend to key j (every row keeps its diagonal open); memory_index Tensor[G]
        long, the image of each group (groups of one image share the value projection).
        """
        q = k = tgt + pos
        mask = block.repeat_interleave(self.n_heads, dim=0)  # [G*h, Q, Q], MHA's per-head layout
        out = self.self_attn(q, k, tgt, attn_mask=mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout(out))
        out = self.cross_attn(
            tgt + pos, reference_points, memory, spatial_shapes, level_start_index, memory_mask, memory_index
        )
        return self.ffn(self.norm2(tgt + self.dropout(out)))


class MLP(nn.Module):
    """Box regression MLP (DETR: 3 layers, ReLU)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, n_layers: int):
        super().__init__()
        dims = [d_in] + [d_hidden] * (n_layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class PhraseSimilarityHead(nn.Module):
    """Logits as scaled dot products between projected queries and projected (fused) phrase features."""

    def __init__(self, d: int, bias_init: float = 0.0):
        super().__init__()
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d)
        self.bias = nn.Parameter(torch.tensor(float(bias_init)))
        self.scale = 1.0 / math.sqrt(d)

    def forward(self, h, phrases, phrase_mask):
        """h Tensor[G, Q, d]; phrases Tensor[G, T, d]; phrase_mask Tensor[G, T] bool -> Tensor[G, Q, T]."""
        logits = self.q(h) @ self.k(phrases).transpose(-1, -2) * self.scale + self.bias
        return logits.masked_fill(phrase_mask[:, None, :], float("-inf"))
