"""RLIPv2-ParSeD as the reference code runs it in R-Tagger mode (JacobYuan7/RLIPv2: hoi.RLIP_ParSeD with
ParSetransformer.RLIP_ParSeDTransformer_v2, the flags of scripts/verb_tagger/*.sh).

Module names follow the reference, so a converted checkpoint loads with identical key names
(`backbone.0.body.*`, `input_proj.*`, `transformer.ho_encoder.*`, `transformer.text_encoder.*`, ...).
The two decoders' box MLPs are the top-level `sub_bbox_embed.{0..5}` / `obj_bbox_embed.{0..5}` only: the
reference also registers them under `transformer.{ho,verb}_decoder.*_bbox_embed` (the same tensors twice);
models/rlipv2/convert.py checks those aliases are equal and drops them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.rlipv2.backbone import Backbone, downsample_mask, input_projections, sine_position_encoding
from models.rlipv2.boxes import inverse_sigmoid
from models.rlipv2.config import RLIPv2Config
from models.rlipv2.layers import MLP, DecoderLayer, EncoderLayer, FeatureResizer, VLFuse
from models.rlipv2.text import PhraseCache, build_roberta, roberta_config

# classification bias of every head: -log((1 - 0.01) / 0.01), a constant in the reference (not a parameter)
BIAS_C = -math.log((1 - 0.01) / 0.01)


@dataclass
class EncodedImages:
    """Backbone + encoder output, shared by every query group of an image.

    memory Tensor[B, S, d]; memory_mask Tensor[B, S] bool; spatial_shapes Tensor[L, 2]; level_start_index
    Tensor[L]; valid_ratios Tensor[B, L, 2]; text Tensor[K, B, T, d]: the fused phrases after each of the K
    fusion rounds, resized to d (entity texts first, "no objects" last of them, then relation texts);
    n_entity: entity texts per row (padded to the longest); entity_mask Tensor[B, Te], rel_mask Tensor[B, Tr]
    bool, True = padding; phrases Tensor[B, Te + Tr, R]: the pooled phrase features before the encoder (same
    layout as text, not resized; the training objective's Relation Pseudo-Labels read the relation part).
    """

    memory: torch.Tensor
    memory_mask: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    valid_ratios: torch.Tensor
    text: torch.Tensor
    n_entity: int
    entity_mask: torch.Tensor
    rel_mask: torch.Tensor
    phrases: torch.Tensor | None = None


@dataclass
class DecoderOutput:
    """Per group of Q pair slots, last decoder layer: boxes (cx, cy, w, h) in [0, 1] and logits.

    sub_boxes, obj_boxes Tensor[G, Q, 4]; sub_logits, obj_logits Tensor[G, Q, Te]; rel_logits Tensor[G, Q, Tr]
    (padded phrases -inf). aux: the same for the earlier decoder layers (training), a list of dicts.
    """

    sub_boxes: torch.Tensor
    obj_boxes: torch.Tensor
    sub_logits: torch.Tensor
    obj_logits: torch.Tensor
    rel_logits: torch.Tensor
    aux: list[dict]


class Encoder(nn.Module):
    """6 deformable layers; before layers 0, 2, 4 the coarsest level and the phrases are fused (`VLFuse_layers`)
    and the phrases then pass one RoBERTa layer (`roberta_layers`)."""

    def __init__(self, cfg: RLIPv2Config, text_conf):
        super().__init__()
        from transformers.models.roberta.modeling_roberta import RobertaLayer

        self.cfg = cfg
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.roberta_layers = nn.ModuleList(RobertaLayer(text_conf) for _ in range(cfg.n_fusion))
        self.VLFuse_layers = nn.ModuleList(VLFuse(cfg, text_conf.hidden_size) for _ in range(cfg.n_fusion))

    def forward(self, src, pos, mask, ref, spatial_shapes, level_start_index, lang, lang_mask):
        """src, pos Tensor[B, S, d]; mask Tensor[B, S]; ref Tensor[B, S, L, 2]; lang Tensor[B, T, R];
        lang_mask Tensor[B, T] (True = pad). Returns (memory Tensor[B, S, d], text Tensor[K, B, T, R])."""
        s3 = int(level_start_index[-1])  # the last level (stride 64) is the one fused with the text
        ext = None
        if bool(lang_mask.any()):
            # RoBERTa's additive mask; -10000 as transformers 4.5.1 (the reference's pin) wrote it
            ext = lang_mask[:, None, None, :].to(lang.dtype) * -10000.0
        texts = []
        for i, layer in enumerate(self.layers):
            if i % self.cfg.fusion_interval == 0:
                k = i // self.cfg.fusion_interval
                v, lang = self.VLFuse_layers[k](src[:, s3:], lang, pos[:, s3:], mask[:, s3:], lang_mask)
                src = torch.cat([src[:, :s3], v], 1)
                lang = self.roberta_layers[k](lang, attention_mask=ext)
                if isinstance(lang, tuple):
                    lang = lang[0]
                texts.append(lang)
            src = layer(src, pos, ref, spatial_shapes, level_start_index, mask)
        return src, torch.stack(texts)


class Decoder(nn.Module):
    """Decoder layers only; the box MLPs it refines with live at the top level (see the module docstring)."""

    def __init__(self, cfg: RLIPv2Config):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))


class ParSeDTransformer(nn.Module):
    """The reference's `transformer` submodule: level embeddings, fused encoder, text encoder and resizer,
    entity (`ho_decoder`) and relation (`verb_decoder`) decoders, tagger query projections."""

    def __init__(self, cfg: RLIPv2Config, pretrained: bool):
        super().__init__()
        d = cfg.d_model
        text_conf = roberta_config(cfg)
        self.level_embed = nn.Parameter(torch.empty(cfg.n_levels, d).normal_())
        self.ho_encoder = Encoder(cfg, text_conf)
        self.ho_decoder = Decoder(cfg)
        self.verb_decoder = Decoder(cfg)
        self.reference_points_sub = nn.Linear(d, 2)
        self.reference_points_obj = nn.Linear(d, 2)
        self.text_encoder = build_roberta(cfg, pretrained)
        self.resizer = FeatureResizer(text_conf.hidden_size, d, cfg.dropout)
        self.coord_proj = nn.Linear(4, d)  # R-Tagger query position: Linear of inverse-sigmoid (cx, cy, w, h)
        self.verb_tgt = nn.Embedding(2 * cfg.n_q, d)  # relation query content: rows [:Q] + rows [Q:]
        for lin in (self.reference_points_sub, self.reference_points_obj):
            nn.init.xavier_uniform_(lin.weight, gain=1.0)
            nn.init.constant_(lin.bias, 0.0)


def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """mask Tensor[B, H, W] bool (True = pad) -> Tensor[B, 2] (valid W / W, valid H / H)."""
    _, h, w = mask.shape
    vh = (~mask[:, :, 0]).sum(1).to(torch.float32) / h
    vw = (~mask[:, 0, :]).sum(1).to(torch.float32) / w
    return torch.stack([vw, vh], -1)


def _encoder_reference_points(spatial_shapes, valid_ratios, device):
    """Pixel centres of every level in [0, 1] of the valid area, seen from every level -> Tensor[B, S, L, 2]."""
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        ys, xs = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
            indexing="ij",
        )
        ry = ys.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        rx = xs.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack([rx, ry], -1))
    ref = torch.cat(refs, 1)
    return ref[:, :, None] * valid_ratios[:, None]


class FusedEncoding:
    """What RLIPv2-ParSeD and RLIPv2-ParSeDA share (the reference builds both from the same builders): pooled
    RoBERTa phrases with a cache, and encode(): backbone, input projections, the fused deformable encoder
    (each model names its own: `fused_encoder`) and the text stack. Mixed in before nn.Module."""

    @property
    def fused_encoder(self) -> nn.Module:
        raise NotImplementedError

    def _init_encoding(self, cfg, tokenizer, pretrained: bool) -> None:
        """The modules before the transformer, in registration order (which fixes the random initialisation)."""
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.phrase_cache = PhraseCache()
        self.backbone = nn.ModuleList([Backbone(cfg)])
        if pretrained:
            from models.rlipv2.backbone import load_imagenet_resnet

            load_imagenet_resnet(self.backbone[0], cfg.backbone)
        self.input_proj = input_projections(cfg, self.backbone[0].body.channels)

    def _init_heads(self, cfg) -> None:
        """The text-scored heads and the box-refinement MLPs (0..L-1 entity decoder, L..2L-1 relation decoder),
        their last layers zero."""
        d = cfg.d_model
        self.projection_text = nn.Linear(d, d)
        self.bias_obj_a = nn.Parameter(torch.zeros(d))
        self.bias_pred_a = nn.Parameter(torch.zeros(d))
        self.sub_bbox_embed = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(2 * cfg.dec_layers))
        self.obj_bbox_embed = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(2 * cfg.dec_layers))
        for m in list(self.sub_bbox_embed) + list(self.obj_bbox_embed):
            nn.init.zeros_(m.layers[-1].weight)
            nn.init.zeros_(m.layers[-1].bias)

    def train(self, mode: bool = True):
        if mode:
            self.phrase_cache.clear()  # weights will change: cached phrase features would go stale
        return super().train(mode)

    # ---------------------------------------------------------------- encoder
    def phrase_features(self, texts: list[str], use_cache: bool | None = None) -> torch.Tensor:
        """Pooled RoBERTa features, Tensor[n, R]; cached when not training and no grad (use_cache None)."""
        if use_cache is None:
            use_cache = not self.training and not torch.is_grad_enabled()
        return self.phrase_cache.encode(
            self.transformer.text_encoder, self.tokenizer, texts, self.cfg.max_text_tokens, use_cache
        )

    def encode(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor,
        entity_texts: list[list[str]],
        rel_texts: list[list[str]],
        use_phrase_cache: bool | None = None,
    ) -> EncodedImages:
        """Args: pixel_values Tensor[B, 3, H, W] normalised; pixel_mask Tensor[B, H, W] bool, True on padding;
        entity_texts per image (class keys or labels ..., "no objects" last); rel_texts per image (may be empty)."""
        b = pixel_values.shape[0]
        if len(entity_texts) != b or len(rel_texts) != b:
            raise ValueError(
                f"encode: {b} images but {len(entity_texts)} entity and {len(rel_texts)} relation text lists"
            )
        d = self.cfg.d_model
        feats = self.backbone[0].body(pixel_values)
        srcs, masks = [], []
        for lvl, f in enumerate(feats):
            srcs.append(self.input_proj[lvl](f))
            masks.append(downsample_mask(pixel_mask, f.shape[-2:]))
        extra = self.input_proj[len(feats)](feats[-1])  # level 4 from the raw last ResNet map
        srcs.append(extra)
        masks.append(downsample_mask(pixel_mask, extra.shape[-2:]))
        flat_src, flat_pos, flat_mask, shapes = [], [], [], []
        for lvl, (src, mask) in enumerate(zip(srcs, masks)):
            shapes.append(tuple(src.shape[-2:]))
            pos = sine_position_encoding(mask, d).to(src.dtype)
            flat_src.append(src.flatten(2).transpose(1, 2))  # [B, d, H, W] -> [B, H*W, d]
            flat_pos.append(pos.flatten(2).transpose(1, 2) + self.transformer.level_embed[lvl])
            flat_mask.append(mask.flatten(1))
        src, pos, mask_flat = torch.cat(flat_src, 1), torch.cat(flat_pos, 1), torch.cat(flat_mask, 1)
        device = src.device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        level_start_index = torch.cat(
            [spatial_shapes.new_zeros(1), (spatial_shapes[:, 0] * spatial_shapes[:, 1]).cumsum(0)[:-1]]
        )
        # reference points in float32 whatever the model dtype (bf16 cannot resolve 1/W of a 167-wide level)
        valid_ratios32 = torch.stack([_valid_ratio(m) for m in masks], 1)
        ref = _encoder_reference_points(spatial_shapes, valid_ratios32, device).to(src.dtype)

        lang, lang_mask, n_ent = self._phrases(entity_texts, rel_texts, src.dtype, device, use_phrase_cache)
        memory, text = self.fused_encoder(
            src, pos, mask_flat, ref, spatial_shapes, level_start_index, lang, lang_mask
        )
        return EncodedImages(
            memory=memory,
            memory_mask=mask_flat,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios32.to(src.dtype),
            text=self.transformer.resizer(text),
            n_entity=n_ent,
            entity_mask=lang_mask[:, :n_ent],
            rel_mask=lang_mask[:, n_ent:],
            phrases=lang,  # before fusion: the criterion's Relation Pseudo-Labels read the relation part
        )

    def _phrases(self, entity_texts, rel_texts, dtype, device, use_cache):
        """Pooled features laid out [B, Te_max + Tr_max, R] (entities, then relations) with a pad mask."""
        unique = list(dict.fromkeys(t for row in entity_texts + rel_texts for t in row))
        index = {t: i for i, t in enumerate(unique)}
        feats = self.phrase_features(unique, use_cache).to(dtype)  # [U, R]
        n_ent = max(len(r) for r in entity_texts)
        n_rel = max((len(r) for r in rel_texts), default=0)
        b = len(entity_texts)
        idx = torch.zeros(b, n_ent + n_rel, dtype=torch.long, device=device)
        mask = torch.ones(b, n_ent + n_rel, dtype=torch.bool, device=device)
        for i, (ents, rels) in enumerate(zip(entity_texts, rel_texts)):
            if not ents:
                raise ValueError(
                    f"encode: image {i} of the batch has no entity texts (needs at least 'no objects')"
                )
            idx[i, : len(ents)] = torch.tensor([index[t] for t in ents], device=device)
            mask[i, : len(ents)] = False
            if rels:
                idx[i, n_ent : n_ent + len(rels)] = torch.tensor([index[t] for t in rels], device=device)
                mask[i, n_ent : n_ent + len(rels)] = False
        return feats[idx], mask, n_ent

    def decoder_output(self, state, img_index, layers_out, all_layers: bool, lang_aux: bool) -> DecoderOutput:
        """Each wanted decoder layer's boxes and its logits (`_heads`) against fusion round l (lang_aux) or the
        last round; the last layer's are the output, the earlier ones `aux`."""
        wanted = range(len(layers_out)) if all_layers else [len(layers_out) - 1]
        heads = []
        for lvl in wanted:
            o = layers_out[lvl]
            rnd = lvl if lang_aux else state.text.shape[0] - 1
            (sub, obj), rel = self._heads(state, img_index, rnd, o["h_sub"], o["h_obj"], o["h_rel"])
            heads.append(
                {"sub_boxes": o["sub_boxes"], "obj_boxes": o["obj_boxes"], "sub_logits": sub, "obj_logits": obj,
                 "rel_logits": rel}
            )  # fmt: skip
        last = heads[-1]
        return DecoderOutput(
            sub_boxes=last["sub_boxes"],
            obj_boxes=last["obj_boxes"],
            sub_logits=last["sub_logits"],
            obj_logits=last["obj_logits"],
            rel_logits=last["rel_logits"],
            aux=heads[:-1],
        )


class RLIPv2ParSeD(FusedEncoding, nn.Module):
    """RLIPv2-ParSeD with R-Tagger queries (ground-truth boxes) or learned queries.

    encode(): backbone, input projections, fused deformable encoder, text stack.
    decode(): entity decoder (subject and object slots of each pair together, box refinement), relation decoder
    (query position = h_sub + h_obj, content = a learned slot embedding, reference = the mean of the pair's
    boxes, refined per layer), heads: logits = (h + a) . projection_text(L2norm(t) / 2) + BIAS_C with a =
    bias_obj_a for subjects and objects and bias_pred_a for relations, t = the text of the matching fusion
    round (decoder layer l reads fusion round l).
    """

    def __init__(self, cfg: RLIPv2Config, tokenizer, pretrained: bool = False):
        super().__init__()
        self._init_encoding(cfg, tokenizer, pretrained)
        d = cfg.d_model
        self.transformer = ParSeDTransformer(cfg, pretrained)
        # learned queries (detection mode); the tagger reads only its row count, as the reference does
        self.query_embed = nn.Embedding(2 * cfg.n_q, 3 * d)
        self._init_heads(cfg)

    @property
    def fused_encoder(self) -> nn.Module:
        return self.transformer.ho_encoder

    # ---------------------------------------------------------------- decoders
    def decode(
        self,
        state: EncodedImages,
        img_index: torch.Tensor,
        sub_boxes: torch.Tensor | None = None,
        obj_boxes: torch.Tensor | None = None,
        sub_labels: torch.Tensor | None = None,
        obj_labels: torch.Tensor | None = None,
        pair_valid: torch.Tensor | None = None,
        entity_block: torch.Tensor | None = None,
        pair_block: torch.Tensor | None = None,
        all_layers: bool = False,
        lang_aux: bool = True,
    ) -> DecoderOutput:
        """Decode G groups of Q pair slots; group g reads image img_index[g] of `state`.

        R-Tagger mode when sub_boxes is given: sub_boxes/obj_boxes Tensor[G, Q, 4] (cx, cy, w, h) in [0, 1] of
        the unpadded image, sub_labels/obj_labels Tensor[G, Q] long (index into the image's entity texts),
        pair_valid Tensor[G, Q] bool (False = empty slot: zero queries, hidden as keys from every query, as
        the reference's key padding mask does; its own outputs are never read). Learned-query mode otherwise.
        lang_aux: decoder layer l is scored against fusion round l (the reference's --lang_aux_loss, on in every
        script reltag follows); False: every layer against the last round.
        entity_block Tensor[G, 2Q, 2Q] / pair_block Tensor[G, Q, Q] bool add blocked (query, key) pairs
        (the denoising mask between noised copies of one region while training).
        """
        g = img_index.shape[0]
        d = self.cfg.d_model
        tr = self.transformer
        if sub_boxes is not None:
            q = sub_boxes.shape[1]
            if pair_valid is None:
                pair_valid = torch.ones(g, q, dtype=torch.bool, device=img_index.device)
            # query content: the detached fused text of the box's class (last fusion round, resized)
            ent = state.text[-1][img_index, : state.n_entity].detach()  # [G, Te, d]
            c_sub = torch.gather(ent, 1, sub_labels[..., None].expand(-1, -1, d))
            c_obj = torch.gather(ent, 1, obj_labels[..., None].expand(-1, -1, d))
            p_sub = tr.coord_proj(inverse_sigmoid(sub_boxes))
            p_obj = tr.coord_proj(inverse_sigmoid(obj_boxes))
            keep = torch.cat([pair_valid, pair_valid], 1)[..., None].to(c_sub.dtype)
            tgt = torch.cat([c_sub, c_obj], 1) * keep  # empty slots: zero position and content
            pos = torch.cat([p_sub, p_obj], 1) * keep
        else:
            q = self.cfg.n_q
            if pair_valid is None:
                pair_valid = torch.ones(g, q, dtype=torch.bool, device=img_index.device)
            # learned queries (reltag's detection mode): position = first d, content = second d of each row
            qe = self.query_embed.weight[None].expand(g, -1, -1)
            pos, tgt = qe[..., :d], qe[..., d : 2 * d]
        valid_ratios = state.valid_ratios[img_index]
        ent_valid = torch.cat([pair_valid, pair_valid], 1)
        ent_mask = self._attn_mask(ent_valid, entity_block)
        ref_s = tr.reference_points_sub(pos[:, :q]).sigmoid()  # 2-d points before the first layer
        ref_o = tr.reference_points_obj(pos[:, q:]).sigmoid()
        x = tgt
        layers_out = []
        for lvl, layer in enumerate(tr.ho_decoder.layers):
            ref = torch.cat([ref_s, ref_o], 1)
            scale = valid_ratios if ref.shape[-1] == 2 else torch.cat([valid_ratios, valid_ratios], -1)
            x = layer(
                x, pos, ref[:, :, None] * scale[:, None], state.memory, state.spatial_shapes,
                state.level_start_index, state.memory_mask, ent_mask, img_index,
            )  # fmt: skip
            new_s = self._refine(self.sub_bbox_embed[lvl](x[:, :q]), ref_s)
            new_o = self._refine(self.obj_bbox_embed[lvl](x[:, q:]), ref_o)
            layers_out.append({"h_sub": x[:, :q], "h_obj": x[:, q:], "sub_boxes": new_s, "obj_boxes": new_o})
            ref_s, ref_o = new_s.detach(), new_o.detach()
        # relation decoder: position = h_sub + h_obj of the last entity layer, content = verb_tgt[:Q] + verb_tgt[Q:]
        h_last = layers_out[-1]
        pos_v = h_last["h_sub"] + h_last["h_obj"]
        w = tr.verb_tgt.weight
        half = w.shape[0] // 2
        xv = (w[:half] + w[half:])[None, :q].expand(g, -1, -1)
        rel_mask = self._attn_mask(pair_valid, pair_block)
        box_scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        n_dec = len(tr.ho_decoder.layers)
        for lvl, layer in enumerate(tr.verb_decoder.layers):
            ref = 0.5 * (ref_s + ref_o)
            xv = layer(
                xv, pos_v, ref[:, :, None] * box_scale, state.memory, state.spatial_shapes,
                state.level_start_index, state.memory_mask, rel_mask, img_index,
            )  # fmt: skip
            # the relation decoder refines the pair's boxes too (MLPs L..2L-1), moving its next reference
            ref_s = self._refine(self.sub_bbox_embed[n_dec + lvl](xv), ref_s).detach()
            ref_o = self._refine(self.obj_bbox_embed[n_dec + lvl](xv), ref_o).detach()
            layers_out[lvl]["h_rel"] = xv
        return self.decoder_output(state, img_index, layers_out, all_layers, lang_aux)

    def _heads(self, state, img_index, lvl, h_sub, h_obj, h_rel):
        """Logits of decoder layer lvl against the texts of fusion round lvl (the last round if fewer rounds)."""
        k = min(lvl, state.text.shape[0] - 1)
        t = nn.functional.normalize(state.text[k][img_index], p=2, dim=-1)
        pt = self.projection_text(t / 2.0)  # [G, T, d]
        n = state.n_entity
        ent_t, rel_t = pt[:, :n], pt[:, n:]
        ent_pad = state.entity_mask[img_index][:, None, :]
        rel_pad = state.rel_mask[img_index][:, None, :]
        sub = ((h_sub + self.bias_obj_a) @ ent_t.transpose(-1, -2) + BIAS_C).masked_fill(
            ent_pad, float("-inf")
        )
        obj = ((h_obj + self.bias_obj_a) @ ent_t.transpose(-1, -2) + BIAS_C).masked_fill(
            ent_pad, float("-inf")
        )
        rel = ((h_rel + self.bias_pred_a) @ rel_t.transpose(-1, -2) + BIAS_C).masked_fill(
            rel_pad, float("-inf")
        )
        return (sub, obj), rel

    @staticmethod
    def _refine(delta: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Box refinement: sigmoid(delta + inverse_sigmoid(ref)); a 2-d reference moves only the centre and the
        size comes from delta alone (the first entity layer, as in Deformable DETR's box refinement)."""
        if ref.shape[-1] == 2:
            return torch.cat([delta[..., :2] + inverse_sigmoid(ref), delta[..., 2:]], -1).sigmoid()
        return (delta + inverse_sigmoid(ref)).sigmoid()

    @staticmethod
    def _attn_mask(valid: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """valid Tensor[G, Q] -> Tensor[G, Q, Q] bool: keys that are empty slots are hidden from every query (the
        reference's key padding mask), plus the extra blocked pairs. An empty group (no valid slot) keeps its
        diagonal open so its rows stay finite (they are never read)."""
        q = valid.shape[1]
        block = (~valid)[:, None, :].expand(-1, q, -1)
        if extra is not None:
            block = block | extra
        all_blocked = block.all(-1, keepdim=True)
        eye = torch.eye(q, dtype=torch.bool, device=valid.device)[None]
        return block & ~(eye & all_blocked)
