"""RLIPv2-ParSeD: backbone, deformable encoder with ALIF, Parallel Entity Detection, Sequential Relation
Inference, phrase-similarity heads; queries learned (pre-training) or built from annotated boxes (R-Tagger)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from models.rlipv2.backbone import MultiLevelBackbone, sine_position_encoding
from models.rlipv2.boxes import inverse_sigmoid, union_box
from models.rlipv2.config import RLIPv2Config
from models.rlipv2.layers import ALIF, MLP, DecoderLayer, EncoderLayer, PhraseSimilarityHead
from models.rlipv2.text import PhraseEncoder


@dataclass
class EncodedImages:
    """Output of the backbone + encoder pass, shared by every query group of an image.

    memory Tensor[B, S, d]; memory_mask Tensor[B, S] bool; spatial_shapes Tensor[L, 2];
    level_start_index Tensor[L]; valid_ratios Tensor[B, L, 2];
    entity_feats Tensor[B, Te, d] (fused entity phrases, "no objects" last of each row's valid part);
    entity_mask Tensor[B, Te] bool; rel_feats Tensor[B, Tr, d]; rel_mask Tensor[B, Tr] bool.
    """

    memory: torch.Tensor
    memory_mask: torch.Tensor
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    valid_ratios: torch.Tensor
    entity_feats: torch.Tensor
    entity_mask: torch.Tensor
    rel_feats: torch.Tensor
    rel_mask: torch.Tensor


@dataclass
class DecoderOutput:
    """Per group of Q query pairs: boxes (cx, cy, w, h) in [0, 1], logits over the image's phrases.

    sub_boxes, obj_boxes Tensor[G, Q, 4]; sub_logits, obj_logits Tensor[G, Q, Te]; rel_logits Tensor[G, Q, Tr].
    """

    sub_boxes: torch.Tensor
    obj_boxes: torch.Tensor
    sub_logits: torch.Tensor
    obj_logits: torch.Tensor
    rel_logits: torch.Tensor


def _valid_ratio(mask: torch.Tensor) -> torch.Tensor:
    """mask Tensor[B, H, W] bool (True = pad) -> Tensor[B, 2] (valid W / W, valid H / H)."""
    _, h, w = mask.shape
    vh = (~mask[:, :, 0]).sum(1).to(torch.float32) / h
    vw = (~mask[:, 0, :]).sum(1).to(torch.float32) / w
    return torch.stack([vw, vh], -1)


def _encoder_reference_points(spatial_shapes, valid_ratios, device):
    """Pixel centres of every level in [0, 1] of the valid area, seen from every level. -> Tensor[B, S, L, 2]."""
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


class RLIPv2ParSeD(nn.Module):
    """The network of RLIPv2 (ParSeD variant) with two query modes.

    - learned queries (pre-training): N_Q subject and N_Q object query embeddings, matched to targets by
      the Hungarian matcher;
    - R-Tagger (Sec. 4.2.2, Eq. 5, Appendix E): queries from annotated boxes, position = Linear(4, d) of
      inverse-sigmoid (cx, cy, w, h), content = Linear(d, d) of the detached fused text feature of the box's
      class name; subjects and objects in two blocks of N_Q slots; empty slots masked.
    """

    def __init__(self, cfg: RLIPv2Config, tokenizer, pretrained: bool = False):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.backbone = MultiLevelBackbone(cfg, pretrained=pretrained)
        self.phrases = PhraseEncoder(cfg, tokenizer, pretrained=pretrained)
        self.text_proj = nn.Linear(self.phrases.hidden_size, d)  # RoBERTa width (768) -> d (256)
        self.level_embed = nn.Parameter(torch.empty(cfg.n_levels, d).normal_())
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.alif = nn.ModuleList(ALIF(cfg) for _ in range(cfg.n_alif))
        self.entity_decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.relation_decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.rel_dec_layers))
        # box refinement per entity decoder layer (Deformable DETR "with_box_refine")
        self.bbox_embed = nn.ModuleList(MLP(d, d, 4, 3) for _ in range(cfg.dec_layers))
        for m in self.bbox_embed:
            nn.init.zeros_(m.layers[-1].weight)
            nn.init.zeros_(m.layers[-1].bias)
        # R-Tagger query construction (Eq. 5)
        self.box_pos = nn.Linear(4, d)
        self.label_content = nn.Linear(d, d)
        # learned queries (pre-training mode): content + position per slot, initial box from the position
        self.sub_query = nn.Embedding(cfg.n_q, 2 * d)
        self.obj_query = nn.Embedding(cfg.n_q, 2 * d)
        self.query_box = nn.Linear(d, 4)
        # Sequential Relation Inference: relation query from its decoded subject and object queries
        self.rel_content = nn.Linear(2 * d, d)
        self.rel_pos = nn.Linear(4, d)
        self.entity_head = PhraseSimilarityHead(d)
        # focal-loss prior 0.01 for relation logits (Lin et al. 2017), as RLIP's relation classifier
        self.relation_head = PhraseSimilarityHead(d, bias_init=-math.log((1 - 0.01) / 0.01))

    # ---------------------------------------------------------------- encoder
    def encode(
        self,
        pixel_values: torch.Tensor,
        pixel_mask: torch.Tensor,
        entity_texts: list[list[str]],
        rel_texts: list[list[str]],
        use_phrase_cache: bool | None = None,
    ) -> EncodedImages:
        """Backbone + 6 deformable layers with ALIF every N_v layers.

        Args:
            pixel_values: Tensor[B, 3, H, W] normalised; pixel_mask: Tensor[B, H, W] bool, True on padding.
            entity_texts: per image, the entity phrases (class names ..., "no objects" last).
            rel_texts: per image, the relation phrases (may be empty).
            use_phrase_cache: None = cache phrase features when not training and no grad; False = re-encode.
        """
        b = pixel_values.shape[0]
        if len(entity_texts) != b or len(rel_texts) != b:
            raise ValueError(
                f"encode: {b} images but {len(entity_texts)} entity and {len(rel_texts)} relation text lists"
            )
        levels = self.backbone(pixel_values, pixel_mask)
        srcs, masks, poss, shapes = [], [], [], []
        for lvl, (src, mask) in enumerate(levels):
            h, w = src.shape[-2:]
            shapes.append((h, w))
            pos = sine_position_encoding(mask, self.cfg.d_model).to(src.dtype)
            srcs.append(src.flatten(2).transpose(1, 2))  # [B, d, H, W] -> [B, H*W, d]
            poss.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl])
            masks.append(mask.flatten(1))
        src, pos, mask_flat = torch.cat(srcs, 1), torch.cat(poss, 1), torch.cat(masks, 1)
        device = src.device
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=device)
        level_start_index = torch.cat(
            [spatial_shapes.new_zeros(1), (spatial_shapes[:, 0] * spatial_shapes[:, 1]).cumsum(0)[:-1]]
        )
        # reference points in float32 whatever the model dtype (bf16 cannot resolve 1/W of a 167-wide level)
        valid_ratios32 = torch.stack([_valid_ratio(m) for _, m in levels], 1)
        ref = _encoder_reference_points(spatial_shapes, valid_ratios32, device).to(src.dtype)
        valid_ratios = valid_ratios32.to(src.dtype)

        text, text_mask, n_ent_max = self._text_tokens(
            entity_texts, rel_texts, src.dtype, device, use_phrase_cache
        )
        coarse = int(level_start_index[-1])  # the coarsest level is fused with the text (Appendix F)
        for i, layer in enumerate(self.encoder):
            src = layer(src, pos, ref, spatial_shapes, level_start_index, mask_flat)
            if (i + 1) % self.cfg.alif_every == 0:
                fused, text = self.alif[i // self.cfg.alif_every](
                    src[:, coarse:], mask_flat[:, coarse:], text, text_mask
                )
                src = torch.cat([src[:, :coarse], fused], 1)
        return EncodedImages(
            memory=src,
            memory_mask=mask_flat,
            spatial_shapes=spatial_shapes,
            level_start_index=level_start_index,
            valid_ratios=valid_ratios,
            entity_feats=text[:, :n_ent_max],
            entity_mask=text_mask[:, :n_ent_max],
            rel_feats=text[:, n_ent_max:],
            rel_mask=text_mask[:, n_ent_max:],
        )

    def _text_tokens(self, entity_texts, rel_texts, dtype, device, use_cache=None):
        """Phrase features laid out [B, Te_max + Tr_max, d] with a pad mask; each distinct phrase encoded once."""
        unique = sorted({t for row in entity_texts + rel_texts for t in row})
        index = {t: i for i, t in enumerate(unique)}
        feats = self.text_proj(self.phrases(unique, use_cache=use_cache).to(dtype))  # [U, d]
        n_ent = max(len(r) for r in entity_texts)
        n_rel = max((len(r) for r in rel_texts), default=0)
        b, d = len(entity_texts), self.cfg.d_model
        idx = torch.zeros(b, n_ent + n_rel, dtype=torch.long, device=device)
        mask = torch.ones(b, n_ent + n_rel, dtype=torch.bool, device=device)
        for i, (ents, rels) in enumerate(zip(entity_texts, rel_texts)):
            if not ents:
                raise ValueError(
                    f"encode: image {i} of the batch has no entity phrases (needs at least 'no objects')"
                )
            idx[i, : len(ents)] = torch.tensor([index[t] for t in ents], device=device)
            mask[i, : len(ents)] = False
            if rels:
                idx[i, n_ent : n_ent + len(rels)] = torch.tensor([index[t] for t in rels], device=device)
                mask[i, n_ent : n_ent + len(rels)] = False
        text = feats[idx] if len(unique) else feats.new_zeros(b, n_ent + n_rel, d)
        return text, mask, n_ent

    # ---------------------------------------------------------------- decoders
    def tagger_queries(self, state: EncodedImages, img_index, boxes, labels):
        """R-Tagger queries (Eq. 5). boxes Tensor[G, Q, 4] (cx, cy, w, h); labels Tensor[G, Q] index into the
        image's entity phrases -> (content, position), Tensor[G, Q, d] each."""
        ent = state.entity_feats[img_index]  # [G, Te, d]
        label_feat = torch.gather(ent, 1, labels[..., None].expand(-1, -1, ent.shape[-1]))
        # the class-name feature is detached: the query must not train the text side (Appendix E)
        return self.label_content(label_feat.detach()), self.box_pos(inverse_sigmoid(boxes))

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
    ) -> DecoderOutput:
        """Decode G groups of Q query pairs; group g reads image img_index[g] of `state`.

        R-Tagger mode when sub_boxes is given: sub_boxes/obj_boxes Tensor[G, Q, 4] in [0, 1] (cx, cy, w, h),
        sub_labels/obj_labels Tensor[G, Q] long, pair_valid Tensor[G, Q] bool (False = empty slot, masked:
        no real query attends to it, so padding cannot change any score). Learned-query mode otherwise
        (Q = N_Q slots, all valid). entity_block Tensor[G, 2Q, 2Q] / pair_block Tensor[G, Q, Q] bool add
        blocked (query, key) pairs, e.g. the denoising mask between noised copies of one region.
        """
        g = img_index.shape[0]
        d = self.cfg.d_model
        if sub_boxes is not None:
            q = sub_boxes.shape[1]
            c_sub, p_sub = self.tagger_queries(state, img_index, sub_boxes, sub_labels)
            c_obj, p_obj = self.tagger_queries(state, img_index, obj_boxes, obj_labels)
            ref = torch.cat([sub_boxes, obj_boxes], 1)
        else:
            q = self.cfg.n_q
            sq = self.sub_query.weight[None].expand(g, -1, -1)
            oq = self.obj_query.weight[None].expand(g, -1, -1)
            p_sub, c_sub = sq[..., :d], sq[..., d:]
            p_obj, c_obj = oq[..., :d], oq[..., d:]
            ref = torch.cat([self.query_box(p_sub), self.query_box(p_obj)], 1).sigmoid()
        if pair_valid is None:
            pair_valid = torch.ones(g, q, dtype=torch.bool, device=img_index.device)
        tgt, pos = torch.cat([c_sub, c_obj], 1), torch.cat([p_sub, p_obj], 1)

        memory, memory_mask = state.memory, state.memory_mask  # per image; groups index into them
        valid_ratios = state.valid_ratios[img_index]
        ent_valid = torch.cat([pair_valid, pair_valid], 1)
        block = self._block(ent_valid, entity_block)
        # Parallel Entity Detection: subject and object blocks decoded together, boxes refined per layer
        for layer, bbox in zip(self.entity_decoder, self.bbox_embed):
            # box references are scaled into each level's valid area: [G, 2Q, 4] -> [G, 2Q, L, 4]
            ref_l = ref[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            tgt = layer(
                tgt,
                pos,
                ref_l,
                memory,
                state.spatial_shapes,
                state.level_start_index,
                memory_mask,
                block,
                img_index,
            )
            ref = (inverse_sigmoid(ref) + bbox(tgt)).sigmoid()
            ref_in = ref
            ref = ref.detach()
        h_sub, h_obj = tgt[:, :q], tgt[:, q:]
        boxes_sub, boxes_obj = ref_in[:, :q], ref_in[:, q:]

        # Sequential Relation Inference: relation queries from the decoded subject/object queries,
        # located at the union of the predicted boxes
        rel_tgt = self.rel_content(torch.cat([h_sub, h_obj], -1))
        rel_ref = union_box(boxes_sub, boxes_obj).detach()
        rel_pos = self.rel_pos(inverse_sigmoid(rel_ref))
        rel_block = self._block(pair_valid, pair_block)
        rel_ref_l = rel_ref[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        for layer in self.relation_decoder:
            rel_tgt = layer(
                rel_tgt,
                rel_pos,
                rel_ref_l,
                memory,
                state.spatial_shapes,
                state.level_start_index,
                memory_mask,
                rel_block,
                img_index,
            )
        ent, ent_mask = state.entity_feats[img_index], state.entity_mask[img_index]
        return DecoderOutput(
            sub_boxes=boxes_sub,
            obj_boxes=boxes_obj,
            sub_logits=self.entity_head(h_sub, ent, ent_mask),
            obj_logits=self.entity_head(h_obj, ent, ent_mask),
            rel_logits=self.relation_head(rel_tgt, state.rel_feats[img_index], state.rel_mask[img_index]),
        )

    @staticmethod
    def _block(valid: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        """valid Tensor[G, Q] -> Tensor[G, Q, Q] bool: keys that are empty slots are blocked for every query;
        the diagonal stays open so an empty slot's own row is finite (its output is never read)."""
        q = valid.shape[1]
        block = (~valid)[:, None, :].expand(-1, q, -1)
        if extra is not None:
            block = block | extra
        eye = torch.eye(q, dtype=torch.bool, device=valid.device)
        return block & ~eye
