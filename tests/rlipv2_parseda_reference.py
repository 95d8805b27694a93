"""Reference-layout RLIPv2-ParSeDA state dicts and a float64 re-statement of the reference's forward (test helper).

Written from JacobYuan7/RLIPv2 (hoi.RLIP_ParSeDA; dab_deformable/deformable_transformer.py:
RLIP_ParSeDABDeformableTransformer_v2, DABDeformableTransformerDecoderHOI, DeformableTransformerDecoderLayer,
MultiBranchFusion, gen_sineembed_for_position; deformable_transformer.RLIPv2_DeformableTransformerEncoder;
fuse_helper.RLIPv2_BiAttentionBlockForCheckpoint with gating_mechanism VXAc; flags of
scripts/RLIP_ParSeDA/train_RLIP_ParSeDA_v2_mixed_vgcocoo365_resnet.sh), never from reltag's model. The parts the
reference builds with the same code as ParSeD's (the ResNet, DETR's sine encoding, deformable attention, the
RoBERTa layers) come from tests/rlipv2_reference.py, which imports nothing of reltag either.

Where the reference hard-codes the sizes of d_model 256 (gen_sineembed_for_position's 128 features per coordinate,
MultiBranchFusion(256, 256, 256, 16), bias_*_a of 256), the tiny sizes here use d/2 features and d-wide branches
(16 of d/16): the same structure at any width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tests.rlipv2_reference import (
    BIAS_C,
    FULL,
    TINY,
    Entry,
    Sizes,
    _bert_layer,
    _f64,
    _inverse_sigmoid,
    _lin,
    _ln,
    _mlp,
    _ms_deform_attn,
    _resnet,
    _sine_pos,
    _std_for,
    random_state_dict,
    reference_key_table,
)


@dataclass(frozen=True)
class SizesA(Sizes):
    """ParSeD's sizes plus the relation query generator's branch count."""

    mbf: int = 16


TINY_A = SizesA(**{k: getattr(TINY, k) for k in TINY.__dataclass_fields__})
# the released ParSeDA R50: ParSeD's sizes with --dim_feedforward 2048
FULL_A = SizesA(**{k: getattr(FULL, k) for k in FULL.__dataclass_fields__} | {"ffn": 2048})


def reference_key_table_parseda(s: SizesA) -> list[Entry]:
    """Every (key, shape) of a ParSeDA checkpoint's 'model' dict for sizes s.

    The backbone and the text encoder come from the same reference builders as ParSeD's (build_DDETR_backbone,
    RobertaModel): their entries are taken from tests/rlipv2_reference.reference_key_table.
    """
    out: list[Entry] = [
        e
        for e in reference_key_table(s)
        if e.key.startswith("backbone.") or e.key.startswith("transformer.text_encoder.")
    ]

    def add(key, shape, kind="param", alias_of=None):
        out.append(Entry(key, tuple(int(x) for x in shape), kind, alias_of))

    def linear(prefix, n_out, n_in):
        add(f"{prefix}.weight", (n_out, n_in))
        add(f"{prefix}.bias", (n_out,))

    def ln(prefix, n):
        add(f"{prefix}.weight", (n,))
        add(f"{prefix}.bias", (n,))

    d, r, m = s.d, s.text_hidden, s.heads * s.levels * s.points
    # RLIP_ParSeDA.__init__ (with_box_refine, use_dab, num_patterns 0, not two_stage)
    chans = [4 * w for w in s.widths[1:]]  # torchvision Bottleneck expansion 4: layer2..4 outputs
    for i, c in enumerate(chans + [chans[-1]]):
        k = 3 if i == len(chans) else 1
        add(f"input_proj.{i}.0.weight", (d, c, k, k))
        add(f"input_proj.{i}.0.bias", (d,))
        ln(f"input_proj.{i}.1", d)  # GroupNorm
    linear("projection_text", d, d)
    add("bias_obj_a", (d,))
    add("bias_pred_a", (d,))
    add("tgt_embed.weight", (2 * s.n_q, d))
    add("verb_tgt_embed.weight", (2 * s.n_q, d))
    add("refpoint_embed.weight", (2 * s.n_q, 4))
    for which in ("sub", "obj"):
        for k in range(2 * s.dec_layers):  # _get_clones(MLP(d, d, 4, 3), num_pred * 2)
            for j in range(3):
                linear(f"{which}_bbox_embed.{k}.layers.{j}", 4 if j == 2 else d, d)
    t = "transformer"
    # RLIP_ParSeDABDeformableTransformer_v2: decoders, verb_tgt_generator, level_embed, GLIP_attn encoder
    for dec in ("ho_decoder", "verb_decoder"):
        for i in range(s.dec_layers):
            p = f"{t}.{dec}.layers.{i}"
            linear(f"{p}.cross_attn.sampling_offsets", 2 * m, d)
            linear(f"{p}.cross_attn.attention_weights", m, d)
            linear(f"{p}.cross_attn.value_proj", d, d)
            linear(f"{p}.cross_attn.output_proj", d, d)
            ln(f"{p}.norm1", d)
            add(f"{p}.self_attn.in_proj_weight", (3 * d, d))
            add(f"{p}.self_attn.in_proj_bias", (3 * d,))
            linear(f"{p}.self_attn.out_proj", d, d)
            ln(f"{p}.norm2", d)
            linear(f"{p}.linear1", s.ffn, d)
            linear(f"{p}.linear2", d, s.ffn)
            ln(f"{p}.norm3", d)
        linear(f"{t}.{dec}.query_scale.layers.0", d, d)  # MLP(d, d, d, 2)
        linear(f"{t}.{dec}.query_scale.layers.1", d, d)
        linear(f"{t}.{dec}.ref_point_head.layers.0", d, 2 * d)  # MLP(2d, d, d, 2)
        linear(f"{t}.{dec}.ref_point_head.layers.1", d, d)
        # hoi.py assigns the slices [:L] / [L:] of the top-level box MLP lists to the decoders
        for which in ("sub", "obj"):
            for i in range(s.dec_layers):
                src = i if dec == "ho_decoder" else s.dec_layers + i
                for j in range(3):
                    n_out = 4 if j == 2 else d
                    add(f"{t}.{dec}.{which}_bbox_embed.{i}.layers.{j}.weight", (n_out, d), "alias",
                        f"{which}_bbox_embed.{src}.layers.{j}.weight")  # fmt: skip
                    add(f"{t}.{dec}.{which}_bbox_embed.{i}.layers.{j}.bias", (n_out,), "alias",
                        f"{which}_bbox_embed.{src}.layers.{j}.bias")  # fmt: skip
    sub = d // s.mbf
    for fc, (n_out, n_in) in (("fc_1", (sub, d)), ("fc_2", (sub, d)), ("fc_3", (d, sub))):
        for k in range(s.mbf):
            linear(f"{t}.verb_tgt_generator.{fc}.{k}", n_out, n_in)
    add(f"{t}.level_embed", (s.levels, d))
    enc = f"{t}.encoder"
    for i in range(s.enc_layers):
        p = f"{enc}.layers.{i}"
        linear(f"{p}.self_attn.sampling_offsets", 2 * m, d)
        linear(f"{p}.self_attn.attention_weights", m, d)
        linear(f"{p}.self_attn.value_proj", d, d)
        linear(f"{p}.self_attn.output_proj", d, d)
        ln(f"{p}.norm1", d)
        linear(f"{p}.linear1", s.ffn, d)
        linear(f"{p}.linear2", d, s.ffn)
        ln(f"{p}.norm2", d)
    for k in range(s.n_fusion):
        p = f"{enc}.roberta_layers.{k}"
        for n in ("query", "key", "value"):
            linear(f"{p}.attention.self.{n}", r, r)
        linear(f"{p}.attention.output.dense", r, r)
        ln(f"{p}.attention.output.LayerNorm", r)
        linear(f"{p}.intermediate.dense", s.text_ffn, r)
        linear(f"{p}.output.dense", r, s.text_ffn)
        ln(f"{p}.output.LayerNorm", r)
    e = s.fusion_dim
    for k in range(s.n_fusion):  # VXAc adds no gating parameters
        p = f"{enc}.VLFuse_layers.{k}.b_attn"
        ln(f"{p}.layer_norm_v", d)
        ln(f"{p}.layer_norm_l", r)
        linear(f"{p}.attn.v_proj", e, d)
        linear(f"{p}.attn.l_proj", e, r)
        linear(f"{p}.attn.values_v_proj", e, d)
        linear(f"{p}.attn.values_l_proj", e, r)
        linear(f"{p}.attn.out_v_proj", d, e)
        linear(f"{p}.attn.out_l_proj", r, e)
        add(f"{p}.gamma_v", (d,))
        add(f"{p}.gamma_l", (r,))
    linear(f"{t}.resizer.fc", d, r)
    ln(f"{t}.resizer.layer_norm", d)
    return out


def _std_for_a(key: str, shape: tuple[int, ...], kind: str) -> tuple[str, float, float]:
    """ParSeD's random scales, plus ParSeDA's own tensors: anchors spread over the image, sizes 0.1-0.5."""
    if key == "refpoint_embed.weight":
        return ("normal", 1.0, 0.0)
    if key in ("tgt_embed.weight", "verb_tgt_embed.weight"):
        return ("normal", 0.5, 0.0)
    if "gamma_" in key:
        return ("normal", 0.05, 0.4)  # VXAc reads gamma[0] only: keep it away from 0
    return _std_for(key, shape, kind)


def reference_state_dict_parseda(sizes: SizesA = TINY_A, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random float32 state dict laid out exactly as a ParSeDA checkpoint's 'model' dict (aliases share)."""
    return random_state_dict(reference_key_table_parseda(sizes), _std_for_a, seed)


# ----------------------------------------------------------------------------------------- float64 re-statement
def _fusion_vxac(sd, prefix, s: Sizes, v, lang, v_pos):
    """RLIPv2_BiAttentionBlockForCheckpoint.single_attention_call with gating VXAc (eval): layer norms, GLIP
    bi-attention, then v = LN(v) + gamma_v[0] * dv, l = LN(l) + gamma_l[0] * dl. v Tensor[Nv, d], lang [T, R]."""
    v_n = _ln(sd, f"{prefix}.layer_norm_v", v)
    l_n = _ln(sd, f"{prefix}.layer_norm_l", lang)
    h, e = s.fusion_heads, s.fusion_dim
    dh = e // h
    nv, t = v_n.shape[0], l_n.shape[0]
    q = (_lin(sd, f"{prefix}.attn.v_proj", v_n + v_pos) * dh**-0.5).view(nv, h, dh).transpose(0, 1)
    k = _lin(sd, f"{prefix}.attn.l_proj", l_n).view(t, h, dh).transpose(0, 1)
    vv = _lin(sd, f"{prefix}.attn.values_v_proj", v_n).view(nv, h, dh).transpose(0, 1)
    vl = _lin(sd, f"{prefix}.attn.values_l_proj", l_n).view(t, h, dh).transpose(0, 1)
    a = q @ k.transpose(-1, -2)  # [h, Nv, T]
    # the masks are bool tensors after masked_fill(-9e15): +1 on every score, softmax-invariant
    p_v = torch.softmax(a + 1.0, -1)  # image queries over texts
    a_l = a.transpose(-1, -2)
    p_l = torch.softmax(a_l - a_l.max(-1, keepdim=True)[0] + 1.0, -1)  # text queries over image tokens
    dv = _lin(sd, f"{prefix}.attn.out_v_proj", (p_v @ vl).transpose(0, 1).reshape(nv, e))
    dl = _lin(sd, f"{prefix}.attn.out_l_proj", (p_l @ vv).transpose(0, 1).reshape(t, e))
    return v_n + sd[f"{prefix}.gamma_v"][0] * dv, l_n + sd[f"{prefix}.gamma_l"][0] * dl


def _self_attn(sd, prefix, heads, x, pos):
    """nn.MultiheadAttention(q = k = x + pos, v = x), no mask (the DAB decoders pass none). x Tensor[N, d]."""
    n, d = x.shape
    dh = d // heads
    wq, wk, wv = sd[f"{prefix}.in_proj_weight"].chunk(3)
    bq, bk, bv = sd[f"{prefix}.in_proj_bias"].chunk(3)
    q = F.linear(x + pos, wq, bq).view(n, heads, dh).transpose(0, 1)
    k = F.linear(x + pos, wk, bk).view(n, heads, dh).transpose(0, 1)
    v = F.linear(x, wv, bv).view(n, heads, dh).transpose(0, 1)
    o = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(dh), -1) @ v
    return _lin(sd, f"{prefix}.out_proj", o.transpose(0, 1).reshape(n, d))


def _dec_layer(sd, prefix, s: Sizes, x, pos, ref, memory, shapes):
    """DeformableTransformerDecoderLayer (do_self_attn): self-attn -> norm2, deformable cross-attn -> norm1,
    FFN -> norm3."""
    x = _ln(sd, f"{prefix}.norm2", x + _self_attn(sd, f"{prefix}.self_attn", s.heads, x, pos))
    x = _ln(
        sd,
        f"{prefix}.norm1",
        x + _ms_deform_attn(sd, f"{prefix}.cross_attn", s, x + pos, ref, memory, shapes),
    )
    f = _lin(sd, f"{prefix}.linear2", F.relu(_lin(sd, f"{prefix}.linear1", x)))
    return _ln(sd, f"{prefix}.norm3", x + f)


def _mlp2(sd, prefix, x):
    """MLP(., ., ., 2): Linear, ReLU, Linear."""
    return _lin(sd, f"{prefix}.layers.1", F.relu(_lin(sd, f"{prefix}.layers.0", x)))


def _gen_sine_embed(box, d):
    """gen_sineembed_for_position for (x, y, w, h) rows: Tensor[N, 4] -> Tensor[N, 2d], blocks (y, x, w, h);
    per block d/2 channels, channel k: sin if k even else cos of coord * 2 pi / 10000 ** (2 (k // 2) / (d/2))."""
    n_f = d // 2
    k = torch.arange(n_f, dtype=torch.float64)
    dim_t = 10000.0 ** (2 * torch.floor(k / 2) / n_f)
    even = torch.arange(n_f) % 2 == 0

    def enc(c):
        a = (c * 2 * math.pi)[:, None] / dim_t
        return torch.where(even, torch.sin(a), torch.cos(a))

    return torch.cat([enc(box[:, 1]), enc(box[:, 0]), enc(box[:, 2]), enc(box[:, 3])], -1)


def _mbf(sd, prefix, s: SizesA, a, b):
    """MultiBranchFusion: relu(sum over branches of fc_3(relu(fc_1(a) * fc_2(b)))), branch by branch."""
    total = 0.0
    for k in range(s.mbf):
        h = F.relu(_lin(sd, f"{prefix}.fc_1.{k}", a) * _lin(sd, f"{prefix}.fc_2.{k}", b))
        total = total + _lin(sd, f"{prefix}.fc_3.{k}", h)
    return F.relu(total)


def reference_forward_parseda_f64(
    state_dict: dict[str, torch.Tensor], sizes: SizesA, pixels: torch.Tensor, texts_pooled: torch.Tensor,
    n_entity: int,
) -> dict:  # fmt: skip
    """RLIP_ParSeDA's forward (eval) for one unpadded image in float64.

    Args: pixels Tensor[3, H, W] normalised (valid ratios 1); texts_pooled Tensor[T, R] pooled RoBERTa features of
        the entity texts (n_entity of them, 'no objects' last) then the relation texts.
    Returns: 'memory' [S, d], 'text_fused' [K, T, R] (after each round's RoBERTa layer), 'text_resized' [K, T, d],
        'shapes', and per decoder layer lists 'sub_boxes' / 'obj_boxes' [Q, 4], 'sub_logits' / 'obj_logits'
        [Q, n_entity], 'rel_logits' [Q, T - n_entity], 'h_rel' [Q, d] (relation decoder states).
    """
    sd = _f64(state_dict)
    s, d = sizes, sizes.d
    feats = _resnet(sd, s, pixels.to(torch.float64)[None])
    srcs = []
    for i, f in enumerate(feats + [feats[-1]]):
        extra = i == len(feats)  # level 4: 3x3 stride-2 conv of the raw layer4 map
        y = F.conv2d(f, sd[f"input_proj.{i}.0.weight"], sd[f"input_proj.{i}.0.bias"], stride=2 if extra else 1,
                     padding=1 if extra else 0)  # fmt: skip
        srcs.append(
            F.group_norm(y, s.gn_groups, sd[f"input_proj.{i}.1.weight"], sd[f"input_proj.{i}.1.bias"])
        )
    shapes = [(int(t.shape[2]), int(t.shape[3])) for t in srcs]
    src = torch.cat([t[0].flatten(1).T for t in srcs], 0)
    pos = torch.cat(
        [_sine_pos(h, w, d) + sd["transformer.level_embed"][lv] for lv, (h, w) in enumerate(shapes)]
    )
    refs = []
    for h, w in shapes:
        ry, rx = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float64) / h,
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float64) / w, indexing="ij",
        )  # fmt: skip
        refs.append(torch.stack([rx.reshape(-1), ry.reshape(-1)], -1))
    enc_ref = torch.cat(refs)[:, None, :].expand(-1, s.levels, -1)
    s3 = sum(h * w for h, w in shapes[:-1])  # fusion_last_vis: only the last level meets the text

    enc = "transformer.encoder"
    lang = texts_pooled.to(torch.float64)
    fused = []
    for li in range(s.enc_layers):
        if li % s.fusion_interval == 0:
            k = li // s.fusion_interval
            v, lang = _fusion_vxac(sd, f"{enc}.VLFuse_layers.{k}.b_attn", s, src[s3:], lang, pos[s3:])
            src = torch.cat([src[:s3], v], 0)
            lang = _bert_layer(sd, f"{enc}.roberta_layers.{k}", s, lang[None])[0]
            fused.append(lang)
        p = f"{enc}.layers.{li}"
        src = _ln(
            sd, f"{p}.norm1", src + _ms_deform_attn(sd, f"{p}.self_attn", s, src + pos, enc_ref, src, shapes)
        )
        src = _ln(sd, f"{p}.norm2", src + _lin(sd, f"{p}.linear2", F.relu(_lin(sd, f"{p}.linear1", src))))
    memory = src
    text_fused = torch.stack(fused)
    tau = _ln(sd, "transformer.resizer.layer_norm", _lin(sd, "transformer.resizer.fc", text_fused), 1e-12)

    # DAB decoders (one image: valid ratios 1, so reference_points_input = the anchors at every level)
    nq = sd["tgt_embed.weight"].shape[0]
    q = nq // 2
    n_dec = s.dec_layers
    anchors = torch.sigmoid(sd["refpoint_embed.weight"])
    ref_s, ref_o = anchors[:q], anchors[q:]
    x = sd["tgt_embed.weight"]
    hs, init_refs = [], []
    for lv in range(n_dec):
        init_refs.append((ref_s, ref_o))
        r = torch.cat([ref_s, ref_o], 0)
        raw = _mlp2(sd, "transformer.ho_decoder.ref_point_head", _gen_sine_embed(r, d))
        qpos = raw if lv == 0 else _mlp2(sd, "transformer.ho_decoder.query_scale", x) * raw
        x = _dec_layer(sd, f"transformer.ho_decoder.layers.{lv}", s, x, qpos, r[:, None].expand(-1, s.levels, -1),
                       memory, shapes)  # fmt: skip
        ref_s = torch.sigmoid(
            _mlp(sd, f"transformer.ho_decoder.sub_bbox_embed.{lv}", x[:q]) + _inverse_sigmoid(ref_s)
        )
        ref_o = torch.sigmoid(
            _mlp(sd, f"transformer.ho_decoder.obj_bbox_embed.{lv}", x[q:]) + _inverse_sigmoid(ref_o)
        )
        hs.append(x)
    w = sd["verb_tgt_embed.weight"]
    xv = _mbf(sd, "transformer.verb_tgt_generator", s, hs[-1][:q], hs[-1][q:]) + w[:q] + w[q:]
    hv = []
    for lv in range(n_dec):
        r = 0.5 * (ref_s + ref_o)
        raw = _mlp2(sd, "transformer.verb_decoder.ref_point_head", _gen_sine_embed(r, d))
        qpos = raw if lv == 0 else _mlp2(sd, "transformer.verb_decoder.query_scale", xv) * raw
        xv = _dec_layer(sd, f"transformer.verb_decoder.layers.{lv}", s, xv, qpos,
                        r[:, None].expand(-1, s.levels, -1), memory, shapes)  # fmt: skip
        ref_s = torch.sigmoid(
            _mlp(sd, f"transformer.verb_decoder.sub_bbox_embed.{lv}", xv) + _inverse_sigmoid(ref_s)
        )
        ref_o = torch.sigmoid(
            _mlp(sd, f"transformer.verb_decoder.obj_bbox_embed.{lv}", xv) + _inverse_sigmoid(ref_o)
        )
        hv.append(xv)
    # heads (RLIP_ParSeDA.forward, encode_and_save=False): boxes from the top-level MLPs on the entity states
    # and the layer's input anchors; logits against text_dec[lv] = the resized text of fusion round lv
    out = {k: [] for k in ("sub_boxes", "obj_boxes", "sub_logits", "obj_logits", "rel_logits", "h_rel")}
    for lv in range(n_dec):
        r_s, r_o = init_refs[lv]
        out["sub_boxes"].append(
            torch.sigmoid(_mlp(sd, f"sub_bbox_embed.{lv}", hs[lv][:q]) + _inverse_sigmoid(r_s))
        )
        out["obj_boxes"].append(
            torch.sigmoid(_mlp(sd, f"obj_bbox_embed.{lv}", hs[lv][q:]) + _inverse_sigmoid(r_o))
        )
        pt = _lin(sd, "projection_text", F.normalize(tau[lv], p=2, dim=-1) / 2.0)
        obj_t, rel_t = pt[:n_entity], pt[n_entity:]
        out["sub_logits"].append((hs[lv][:q] + sd["bias_obj_a"]) @ obj_t.T + BIAS_C)
        out["obj_logits"].append((hs[lv][q:] + sd["bias_obj_a"]) @ obj_t.T + BIAS_C)
        out["rel_logits"].append((hv[lv] + sd["bias_pred_a"]) @ rel_t.T + BIAS_C)
        out["h_rel"].append(hv[lv])
    out.update(memory=memory, text_fused=text_fused, text_resized=tau, shapes=shapes)
    return out
