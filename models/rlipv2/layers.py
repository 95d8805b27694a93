"""Layers of RLIPv2-ParSeD with the reference's parameter names: deformable encoder/decoder layers, the
GLIP-style bi-attention fusion (`VLFuse_layers.k.b_attn`), box MLPs and the text resizer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.ms_deform_attn import MSDeformAttn
from models.rlipv2.config import RLIPv2Config


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then FFN; post-norm (Deformable DETR)."""

    def __init__(self, cfg: RLIPv2Config):
        super().__init__()
        d = cfg.d_model
        self.self_attn = MSDeformAttn(d, cfg.n_levels, cfg.n_heads, cfg.n_points)
        self.norm1 = nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, cfg.d_ffn), nn.Linear(cfg.d_ffn, d)
        self.norm2 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """src, pos: Tensor[B, S, d]; reference_points Tensor[B, S, L, 2]; padding_mask Tensor[B, S] bool."""
        out = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout(out))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class BiMultiHeadAttention(nn.Module):
    """GLIP's image-text bi-attention: one score map, softmaxed over the text for the image update and over
    the image for the text update (reference `attn` inside `b_attn`). Widths: image d, text R, inner E."""

    def __init__(self, d: int, d_text: int, embed_dim: int, heads: int, dropout: float):
        super().__init__()
        self.h, self.dh = heads, embed_dim // heads
        self.scale = self.dh**-0.5
        self.v_proj, self.l_proj = nn.Linear(d, embed_dim), nn.Linear(d_text, embed_dim)
        self.values_v_proj, self.values_l_proj = nn.Linear(d, embed_dim), nn.Linear(d_text, embed_dim)
        self.out_v_proj, self.out_l_proj = nn.Linear(embed_dim, d), nn.Linear(embed_dim, d_text)
        self.dropout = nn.Dropout(dropout)
        for lin in (
            self.v_proj,
            self.l_proj,
            self.values_v_proj,
            self.values_l_proj,
            self.out_v_proj,
            self.out_l_proj,
        ):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, v, t, v_pos, v_pad, l_pad):
        """Args: v Tensor[B, Nv, d] and t Tensor[B, T, R] (both already layer-normed), v_pos Tensor[B, Nv, d],
        v_pad Tensor[B, Nv] / l_pad Tensor[B, T] bool, True = padding.

        Returns (dv Tensor[B, Nv, d], dl Tensor[B, T, R]).

        Masking: the reference builds its masks with `bool_mask.masked_fill(mask == 0, -9e15)` on a bool tensor,
        which leaves every entry True, so it adds +1 to every score and masks nothing. The reference tagger
        never has padding (one image, every text valid), where masking and not masking agree exactly; reltag
        masks padding properly so that batched training is not polluted by padded pixels or phrases.
        """
        b, nv, _ = v.shape
        n_t = t.shape[1]

        def heads(x, n):  # [B, n, E] -> [B, h, n, dh]
            return x.view(b, n, self.h, self.dh).transpose(1, 2)

        q = heads(self.v_proj(v + v_pos) * self.scale, nv)  # the position enters the image queries only
        k = heads(self.l_proj(t), n_t)
        vv, vl = heads(self.values_v_proj(v), nv), heads(self.values_l_proj(t), n_t)
        attn = q @ k.transpose(-1, -2)  # [B, h, Nv, T]
        # text side: softmax over image tokens (the reference subtracts the row max first; softmax-invariant)
        a_l = attn.transpose(-1, -2)
        a_l = a_l - a_l.amax(-1, keepdim=True)
        p_l = a_l.masked_fill(v_pad[:, None, None, :], float("-inf")).softmax(-1)
        p_v = attn.masked_fill(l_pad[:, None, None, :], float("-inf")).softmax(-1)
        o_v = (self.dropout(p_v) @ vl).transpose(1, 2).reshape(b, nv, -1)
        o_l = (self.dropout(p_l) @ vv).transpose(1, 2).reshape(b, n_t, -1)
        return self.out_v_proj(o_v), self.out_l_proj(o_l)


class BiAttentionBlock(nn.Module):
    """Layer norms, bi-attention and per-channel gammas (GLIP gating, init 0.25).

    The residual is added to the *layer-normed* streams, as in the reference: out = LN(x) + gamma * delta.
    The pre-fusion stream is not carried on (paper Eq. 2-3 write a residual on the raw stream; the code that
    trained the released weights does this).
    """

    def __init__(self, cfg: RLIPv2Config, d_text: int):
        super().__init__()
        d = cfg.d_model
        self.layer_norm_v, self.layer_norm_l = nn.LayerNorm(d), nn.LayerNorm(d_text)
        self.attn = BiMultiHeadAttention(d, d_text, cfg.fusion_dim, cfg.fusion_heads, cfg.dropout)
        self.gamma_v = nn.Parameter(torch.full((d,), float(cfg.fusion_gamma_init)))
        self.gamma_l = nn.Parameter(torch.full((d_text,), float(cfg.fusion_gamma_init)))

    def forward(self, v, t, v_pos, v_pad, l_pad):
        v, t = self.layer_norm_v(v), self.layer_norm_l(t)
        dv, dt = self.attn(v, t, v_pos, v_pad, l_pad)
        return v + self.gamma_v * dv, t + self.gamma_l * dt


class VLFuse(nn.Module):
    """Wrapper that names the block `b_attn`, as the reference's `RLIPv2_VLFuse` does."""

    def __init__(self, cfg: RLIPv2Config, d_text: int):
        super().__init__()
        self.b_attn = BiAttentionBlock(cfg, d_text)

    def forward(self, v, t, v_pos, v_pad, l_pad):
        return self.b_attn(v, t, v_pos, v_pad, l_pad)


class DecoderLayer(nn.Module):
    """Self-attention -> deformable cross-attention -> FFN, post-norm; norms named as in Deformable DETR
    (norm2 after self-attention, norm1 after cross-attention, norm3 after the FFN)."""

    def __init__(self, cfg: RLIPv2Config):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.cross_attn = MSDeformAttn(d, cfg.n_levels, cfg.n_heads, cfg.n_points)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, cfg.d_ffn), nn.Linear(cfg.d_ffn, d)
        self.norm3 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        tgt,
        pos,
        reference_points,
        memory,
        spatial_shapes,
        level_start_index,
        memory_mask,
        attn_mask,
        value_index,
    ):
        """tgt, pos Tensor[G, Q, d]; reference_points Tensor[G, Q, L, 2|4]; memory Tensor[B, S, d] read by group g
        at row value_index[g]; attn_mask Tensor[G, Q, Q] bool, True = query i may not attend to key j."""
        q = k = tgt + pos
        mask = attn_mask.repeat_interleave(self.n_heads, 0)  # [G, Q, Q] -> [G * heads, Q, Q]
        out = self.self_attn(q, k, tgt, attn_mask=mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout(out))
        out = self.cross_attn(
            tgt + pos, reference_points, memory, spatial_shapes, level_start_index, memory_mask, value_index
        )
        tgt = self.norm1(tgt + self.dropout(out))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout(ffn))


class MLP(nn.Module):
    """Box regression MLP (DETR: 3 layers, ReLU between)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, n_layers: int):
        super().__init__()
        dims = [d_in] + [d_hidden] * (n_layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class FeatureResizer(nn.Module):
    """Linear R -> d then LayerNorm (eps 1e-12), MDETR's resizer: applied to the fused text after the encoder."""

    def __init__(self, d_in: int, d_out: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.layer_norm = nn.LayerNorm(d_out, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.layer_norm(self.fc(x)))
