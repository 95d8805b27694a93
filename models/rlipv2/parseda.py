"""RLIPv2-ParSeDA as the reference code runs it (JacobYuan7/RLIPv2: hoi.RLIP_ParSeDA with
dab_deformable/deformable_transformer.RLIP_ParSeDABDeformableTransformer_v2, flags of
scripts/RLIP_ParSeDA/train_RLIP_ParSeDA_v2_mixed_vgcocoo365_resnet.sh; see ParSeDAConfig).

Shared with ParSeD (the reference builds both from the same classes): the ResNet backbone and input
projections, DETR's sine position encoding, the fused deformable encoder (RLIPv2_DeformableTransformerEncoder:
fusion of the coarsest level with the phrases before every second layer, one RoBERTa layer on the text after each
fusion), the RoBERTa text encoder and the text resizer, the deformable decoder layers and the text-scored heads.
Its own: the encoder is named `transformer.encoder`, the fusion gate is one scalar per direction
(`--gating_mechanism VXAc`: gamma[0]), and the decoders are DAB decoders. Each query is a learned anchor box
(`refpoint_embed`, sigmoid) and a learned content (`tgt_embed`); before every layer the anchor, scaled by the
valid ratios of level 0, goes through a sine embedding and `ref_point_head` to the query position, multiplied
from the second layer on by `query_scale(content)`. The relation decoder starts from the mean of each pair's
refined boxes, with content `verb_tgt_generator(h_sub, h_obj) + verb_tgt_embed[:Q] + verb_tgt_embed[Q:]`.

Module names follow the reference, so a converted checkpoint loads with identical keys; the box MLPs the
reference registers a second time under `transformer.{ho,verb}_decoder.*_bbox_embed` are dropped by
models/rlipv2/convert.py after checking they equal the top-level ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.ms_deform_attn import MSDeformAttn
from models.rlipv2.boxes import inverse_sigmoid
from models.rlipv2.config import ParSeDAConfig
from models.rlipv2.layers import MLP, BiAttentionBlock, DecoderLayer, FeatureResizer, VLFuse
from models.rlipv2.model import (
    BIAS_C,
    DecoderOutput,
    EncodedImages,
    Encoder,
    FusedEncoding,
)
from models.rlipv2.text import build_roberta, roberta_config


def box_sine_embedding(boxes: torch.Tensor, n_feats: int) -> torch.Tensor:
    """DAB-DETR's gen_sineembed_for_position for (cx, cy, w, h): Tensor[..., 4] -> Tensor[..., 4 * n_feats].

    Each coordinate times 2*pi over 10000 ** (2 * (k // 2) / n_feats), sin on even and cos on odd channels; blocks
    in the order (y, x, w, h). The reference fixes n_feats = 128 (d_model 256); reltag uses d_model / 2 so the
    small test architectures keep the same structure.
    """
    k = torch.arange(n_feats, dtype=boxes.dtype, device=boxes.device)
    dim_t = 10000.0 ** (2 * torch.div(k, 2, rounding_mode="floor") / n_feats)
    a = boxes[..., None] * (2 * math.pi) / dim_t  # [..., 4, n_feats]
    enc = torch.stack([a[..., 0::2].sin(), a[..., 1::2].cos()], -1).flatten(-2)
    x, y, w, h = enc.unbind(-2)
    return torch.cat([y, x, w, h], -1)


class MultiBranchFusion(nn.Module):
    """relu(sum_k fc_3[k](relu(fc_1[k](a) * fc_2[k](s)))) over `cardinality` branches (the reference's
    verb_tgt_generator, from spatially-conditioned-graphs). The branches run as three stacked GEMMs: the concatenated
    fc_1 / fc_2 rows, and fc_3 with its inputs concatenated (their outputs summed), biases summed."""

    def __init__(self, d_a: int, d_s: int, d_out: int, cardinality: int):
        super().__init__()
        sub = d_out // cardinality
        self.fc_1 = nn.ModuleList(nn.Linear(d_a, sub) for _ in range(cardinality))
        self.fc_2 = nn.ModuleList(nn.Linear(d_s, sub) for _ in range(cardinality))
        self.fc_3 = nn.ModuleList(nn.Linear(sub, d_out) for _ in range(cardinality))

    def forward(self, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """a Tensor[..., d_a], s Tensor[..., d_s] -> Tensor[..., d_out]."""
        w1 = torch.cat([m.weight for m in self.fc_1])  # [C * sub, d_a]
        b1 = torch.cat([m.bias for m in self.fc_1])
        w2 = torch.cat([m.weight for m in self.fc_2])
        b2 = torch.cat([m.bias for m in self.fc_2])
        w3 = torch.cat(
            [m.weight for m in self.fc_3], 1
        )  # [d_out, C * sub]: branch k reads its own sub columns
        b3 = torch.stack([m.bias for m in self.fc_3]).sum(0)
        h = F.relu(F.linear(a, w1, b1) * F.linear(s, w2, b2))
        return F.relu(F.linear(h, w3, b3))


class GatedBiAttentionBlock(BiAttentionBlock):
    """ParSeD's bi-attention block with the reference's gate choice: "VXAc" adds gamma[0] * delta (one scalar per
    direction), "GLIP" the per-channel gamma * delta. The attention dropout is the reference's fixed 0.1."""

    def __init__(self, cfg: ParSeDAConfig, d_text: int):
        super().__init__(cfg, d_text)
        self.gating = cfg.fusion_gating
        self.attn.dropout.p = cfg.fusion_dropout

    def forward(self, v, t, v_pos, v_pad, l_pad):
        v, t = self.layer_norm_v(v), self.layer_norm_l(t)
        dv, dt = self.attn(v, t, v_pos, v_pad, l_pad)
        if self.gating == "VXAc":
            return v + self.gamma_v[0] * dv, t + self.gamma_l[0] * dt
        return v + self.gamma_v * dv, t + self.gamma_l * dt


class GatedVLFuse(VLFuse):
    def __init__(self, cfg: ParSeDAConfig, d_text: int):
        super().__init__(cfg, d_text)
        self.b_attn = GatedBiAttentionBlock(cfg, d_text)


class ParSeDAEncoder(Encoder):
    """ParSeD's fused encoder (same forward) with the gated fusion blocks."""

    def __init__(self, cfg: ParSeDAConfig, text_conf):
        super().__init__(cfg, text_conf)
        self.VLFuse_layers = nn.ModuleList(
            GatedVLFuse(cfg, text_conf.hidden_size) for _ in range(cfg.n_fusion)
        )


class DABDecoder(nn.Module):
    """Decoder layers plus DAB's query-position heads: position = ref_point_head(sine(anchor)), times
    query_scale(content) from the second layer on (DABDeformableTransformerDecoderHOI with use_dab)."""

    def __init__(self, cfg: ParSeDAConfig):
        super().__init__()
        d = cfg.d_model
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.query_scale = MLP(d, d, d, 2)
        self.ref_point_head = MLP(2 * d, d, d, 2)

    def query_pos(self, lid: int, content: torch.Tensor, ref_in: torch.Tensor) -> torch.Tensor:
        """ref_in Tensor[G, Q, L, 4]: the anchors scaled per level; the reference embeds level 0's."""
        raw = self.ref_point_head(box_sine_embedding(ref_in[:, :, 0], content.shape[-1] // 2))
        return raw if lid == 0 else self.query_scale(content) * raw


class ParSeDATransformer(nn.Module):
    """The reference's `transformer` submodule of ParSeDA: level embeddings, fused encoder, DAB entity
    (`ho_decoder`) and relation (`verb_decoder`) decoders, relation query generator, text encoder and resizer."""

    def __init__(self, cfg: ParSeDAConfig, pretrained: bool):
        super().__init__()
        d = cfg.d_model
        text_conf = roberta_config(cfg)
        self.level_embed = nn.Parameter(torch.empty(cfg.n_levels, d))
        self.encoder = ParSeDAEncoder(cfg, text_conf)
        self.ho_decoder = DABDecoder(cfg)
        self.verb_decoder = DABDecoder(cfg)
        self.verb_tgt_generator = MultiBranchFusion(d, d, d, cfg.mbf_cardinality)
        # the reference's _reset_parameters (before the text encoder exists): xavier on every matrix, then the
        # deformable attentions' own init, level embeddings N(0, 1)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)
        self.text_encoder = build_roberta(cfg, pretrained)
        self.resizer = FeatureResizer(text_conf.hidden_size, d, 0.1)  # expander_dropout 0.1 in the reference


class RLIPv2ParSeDA(FusedEncoding, nn.Module):
    """RLIPv2-ParSeDA with learned DAB queries: same encode() / decode() contract as RLIPv2ParSeD, so the same
    training code (Hungarian matching, losses) trains both. There is no R-Tagger mode (the released tagger is a
    ParSeD): decode() refuses query boxes.
    """

    kind = "parseda"

    def __init__(self, cfg: ParSeDAConfig, tokenizer, pretrained: bool = False):
        super().__init__()
        if not isinstance(cfg, ParSeDAConfig):
            raise ValueError(f"RLIPv2ParSeDA needs a ParSeDAConfig, got {type(cfg).__name__}")
        self._init_encoding(cfg, tokenizer, pretrained)
        d = cfg.d_model
        self.transformer = ParSeDATransformer(cfg, pretrained)
        nq = 2 * cfg.n_q  # subject slots then object slots
        self.tgt_embed = nn.Embedding(nq, d)
        self.verb_tgt_embed = nn.Embedding(nq, d)
        self.refpoint_embed = nn.Embedding(nq, 4)  # anchors before the sigmoid (random_refpoints_xy off)
        self._init_heads(cfg)
        for m in (self.sub_bbox_embed[0], self.obj_bbox_embed[0]):
            nn.init.constant_(m.layers[-1].bias[2:], -2.0)  # the first layer's sizes start at sigmoid(-2)

    @property
    def fused_encoder(self) -> nn.Module:
        return self.transformer.encoder

    # ---------------------------------------------------------------- decoders
    def decode(
        self,
        state: EncodedImages,
        img_index: torch.Tensor,
        sub_boxes: torch.Tensor | None = None,
        *tagger_args,
        all_layers: bool = False,
        lang_aux: bool = True,
        **tagger_kwargs,
    ) -> DecoderOutput:
        """Decode one group of Q learned pair slots per entry of img_index (group g reads image img_index[g]).

        Returns the last layer's boxes (cx, cy, w, h) and logits; with all_layers, the earlier layers' in `aux`.
        lang_aux: decoder layer l is scored against fusion round l (`--lang_aux_loss`, in the released scripts);
        False: every layer against the last round (the reference's text_dec without it).
        R-Tagger arguments (query boxes, labels, masks) are refused: ParSeDA has no tagger mode.
        """
        given = [k for k, v in tagger_kwargs.items() if v is not None]
        if sub_boxes is not None or any(a is not None for a in tagger_args) or given:
            raise ValueError(
                f"RLIPv2-ParSeDA decodes learned queries only; got R-Tagger inputs {given or ['sub_boxes']} "
                f"(the released R-Tagger is an RLIPv2-ParSeD checkpoint)"
            )
        g = img_index.shape[0]
        q = self.cfg.n_q
        tr = self.transformer
        valid_ratios = state.valid_ratios[img_index]
        scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [G, 1, L, 4]
        no_mask = torch.zeros(g, 2 * q, 2 * q, dtype=torch.bool, device=img_index.device)
        anchors = self.refpoint_embed.weight.sigmoid()
        ref_s = anchors[None, :q].expand(g, -1, -1)
        ref_o = anchors[None, q:].expand(g, -1, -1)
        x = self.tgt_embed.weight[None].expand(g, -1, -1)
        layers_out = []
        for lid, layer in enumerate(tr.ho_decoder.layers):
            ref_in = torch.cat([ref_s, ref_o], 1)[:, :, None] * scale  # [G, 2Q, L, 4]
            pos = tr.ho_decoder.query_pos(lid, x, ref_in)
            x = layer(
                x, pos, ref_in, state.memory, state.spatial_shapes, state.level_start_index,
                state.memory_mask, no_mask, img_index,
            )  # fmt: skip
            new_s = (self.sub_bbox_embed[lid](x[:, :q]) + inverse_sigmoid(ref_s)).sigmoid()
            new_o = (self.obj_bbox_embed[lid](x[:, q:]) + inverse_sigmoid(ref_o)).sigmoid()
            layers_out.append({"h_sub": x[:, :q], "h_obj": x[:, q:], "sub_boxes": new_s, "obj_boxes": new_o})
            ref_s, ref_o = new_s.detach(), new_o.detach()
        # relation decoder ("vanilla_MBF"): content = MBF(h_sub, h_obj) of the last entity layer + verb_tgt_embed
        # rows [:Q] + [Q:]; anchors = the mean of the pair's refined boxes, refined per layer by MLPs L..2L-1
        w = self.verb_tgt_embed.weight
        xv = tr.verb_tgt_generator(x[:, :q], x[:, q:]) + (w[:q] + w[q:])[None]
        n_dec = len(tr.ho_decoder.layers)
        for lid, layer in enumerate(tr.verb_decoder.layers):
            ref_in = (0.5 * (ref_s + ref_o))[:, :, None] * scale
            pos = tr.verb_decoder.query_pos(lid, xv, ref_in)
            xv = layer(
                xv, pos, ref_in, state.memory, state.spatial_shapes, state.level_start_index,
                state.memory_mask, no_mask[:, :q, :q], img_index,
            )  # fmt: skip
            ref_s = (self.sub_bbox_embed[n_dec + lid](xv) + inverse_sigmoid(ref_s)).sigmoid().detach()
            ref_o = (self.obj_bbox_embed[n_dec + lid](xv) + inverse_sigmoid(ref_o)).sigmoid().detach()
            layers_out[lid]["h_rel"] = xv
        return self.decoder_output(state, img_index, layers_out, all_layers, lang_aux)

    def _heads(self, state, img_index, rnd, h_sub, h_obj, h_rel):
        """Logits of a decoder layer against the texts of fusion round rnd: (h + a) . projection_text(L2norm(t)
        / 2) + BIAS_C; padded texts -inf (the reference pads with zero features and does not mask)."""
        t = F.normalize(state.text[rnd][img_index], p=2, dim=-1)
        pt = self.projection_text(t / 2.0)  # [G, T, d]
        n = state.n_entity
        ent_t, rel_t = pt[:, :n], pt[:, n:]
        ent_pad = state.entity_mask[img_index][:, None, :]
        rel_pad = state.rel_mask[img_index][:, None, :]

        def score(h, bias, texts, pad):
            return ((h + bias) @ texts.transpose(-1, -2) + BIAS_C).masked_fill(pad, float("-inf"))

        return (
            score(h_sub, self.bias_obj_a, ent_t, ent_pad),
            score(h_obj, self.bias_obj_a, ent_t, ent_pad),
        ), score(h_rel, self.bias_pred_a, rel_t, rel_pad)
