"""Reference-layout RLIPv2 tagger state dicts and a float64 re-statement of the reference's forward (test helper).

Written from the specs of JacobYuan7/RLIPv2 (hoi.RLIP_ParSeD + ParSetransformer.RLIP_ParSeDTransformer_v2, tagger
flags), never from reltag's model: key names and shapes follow the reference checkpoint's 'model' dict, and the
forward below reads only those keys with torch functional ops. Nothing here imports models/rlipv2, kernels/ or
models/ms_deform_attn, so a mistake there cannot hide in the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BIAS_C = -math.log((1 - 0.01) / 0.01)  # hoi.py: bias_c = -log((1 - 0.01) / 0.01), a float, not a parameter
EXPANSION = 4  # torchvision Bottleneck


@dataclass(frozen=True)
class Sizes:
    """Architecture sizes of a reference checkpoint. The defaults are a tiny model for tests."""

    depths: tuple[int, ...] = (1, 1, 1, 1)
    widths: tuple[int, ...] = (4, 8, 16, 32)
    stem: int = 8
    d: int = 32
    heads: int = 4
    levels: int = 4
    points: int = 4
    ffn: int = 64
    gn_groups: int = 32
    fusion_dim: int = 64
    fusion_heads: int = 8  # hard-coded 8 in RLIPv2_VLFuse
    text_hidden: int = 32
    text_layers: int = 1
    text_heads: int = 2
    text_ffn: int = 64
    vocab: int = 128
    max_pos: int = 40
    type_vocab: int = 1
    text_eps: float = 1e-5
    pad_id: int = 1
    enc_layers: int = 6
    fusion_interval: int = 2
    dec_layers: int = 3
    n_q: int = 16  # pair slots per group; num_queries = 2 * n_q

    @property
    def n_fusion(self) -> int:
        return self.enc_layers // self.fusion_interval

    def text_config(self) -> dict:
        """RobertaConfig fields of the text encoder."""
        return {
            "vocab_size": self.vocab, "hidden_size": self.text_hidden, "num_hidden_layers": self.text_layers,
            "num_attention_heads": self.text_heads, "intermediate_size": self.text_ffn,
            "max_position_embeddings": self.max_pos, "type_vocab_size": self.type_vocab,
            "layer_norm_eps": self.text_eps, "pad_token_id": self.pad_id, "bos_token_id": 0, "eos_token_id": 2,
        }  # fmt: skip


TINY = Sizes()
# the released tagger: ResNet-50, d 256, 8 heads x 4 levels x 4 points, FFN 1024, fusion 2048, roberta-base, 200 queries
FULL = Sizes(
    depths=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem=64, d=256, heads=8, ffn=1024, fusion_dim=2048,
    text_hidden=768, text_layers=12, text_heads=12, text_ffn=3072, vocab=50265, max_pos=514, n_q=100,
)  # fmt: skip


@dataclass(frozen=True)
class Entry:
    """One state-dict entry: kind is 'param', 'frozen_bn' (buffer), 'position_ids' (int64 buffer) or 'alias'
    (a second name of the tensor `alias_of`, registered by the decoders' slices of the box-MLP lists)."""

    key: str
    shape: tuple[int, ...]
    kind: str = "param"
    alias_of: str | None = None


def reference_key_table(s: Sizes) -> list[Entry]:
    """Every (key, shape) of the reference checkpoint's 'model' dict for sizes s, in registration order."""
    out: list[Entry] = []

    def add(key, shape, kind="param", alias_of=None):
        out.append(Entry(key, tuple(int(x) for x in shape), kind, alias_of))

    def fbn(prefix, n):
        for name in ("weight", "bias", "running_mean", "running_var"):
            add(f"{prefix}.{name}", (n,), "frozen_bn")

    def linear(prefix, n_out, n_in):
        add(f"{prefix}.weight", (n_out, n_in))
        add(f"{prefix}.bias", (n_out,))

    def ln(prefix, n):
        add(f"{prefix}.weight", (n,))
        add(f"{prefix}.bias", (n,))

    d, r = s.d, s.text_hidden
    # backbone: torchvision ResNet body (IntermediateLayerGetter drops avgpool/fc), FrozenBatchNorm2d buffers
    body = "backbone.0.body"
    add(f"{body}.conv1.weight", (s.stem, 3, 7, 7))
    fbn(f"{body}.bn1", s.stem)
    c_in = s.stem
    for li, (n_blocks, p) in enumerate(zip(s.depths, s.widths), start=1):
        for b in range(n_blocks):
            pre = f"{body}.layer{li}.{b}"
            cin = c_in if b == 0 else EXPANSION * p
            add(f"{pre}.conv1.weight", (p, cin, 1, 1))
            fbn(f"{pre}.bn1", p)
            add(f"{pre}.conv2.weight", (p, p, 3, 3))
            fbn(f"{pre}.bn2", p)
            add(f"{pre}.conv3.weight", (EXPANSION * p, p, 1, 1))
            fbn(f"{pre}.bn3", EXPANSION * p)
            if b == 0 and (li > 1 or cin != EXPANSION * p):
                add(f"{pre}.downsample.0.weight", (EXPANSION * p, cin, 1, 1))
                fbn(f"{pre}.downsample.1", EXPANSION * p)
        c_in = EXPANSION * p
    chans = [EXPANSION * w for w in s.widths[1:]]
    # RLIP_ParSeD.__init__ order: transformer, then heads; state_dict order is irrelevant to the tests
    for i, c in enumerate(chans + [chans[-1]]):
        k = 3 if i == len(chans) else 1
        add(f"input_proj.{i}.0.weight", (d, c, k, k))
        add(f"input_proj.{i}.0.bias", (d,))
        ln(f"input_proj.{i}.1", d)  # GroupNorm(32, d) weight/bias
    add("query_embed.weight", (2 * s.n_q, 3 * d))
    linear("projection_text", d, d)
    add("bias_obj_a", (d,))
    add("bias_pred_a", (d,))
    n_pred = s.dec_layers
    for which in ("sub", "obj"):
        for k in range(2 * n_pred):
            for j in range(3):
                linear(f"{which}_bbox_embed.{k}.layers.{j}", 4 if j == 2 else d, d)
    t = "transformer"

    def dec_layer(prefix):
        m = s.heads * s.levels * s.points
        linear(f"{prefix}.cross_attn.sampling_offsets", 2 * m, d)
        linear(f"{prefix}.cross_attn.attention_weights", m, d)
        linear(f"{prefix}.cross_attn.value_proj", d, d)
        linear(f"{prefix}.cross_attn.output_proj", d, d)
        ln(f"{prefix}.norm1", d)
        add(f"{prefix}.self_attn.in_proj_weight", (3 * d, d))
        add(f"{prefix}.self_attn.in_proj_bias", (3 * d,))
        linear(f"{prefix}.self_attn.out_proj", d, d)
        ln(f"{prefix}.norm2", d)
        linear(f"{prefix}.linear1", s.ffn, d)
        linear(f"{prefix}.linear2", d, s.ffn)
        ln(f"{prefix}.norm3", d)

    for dec in ("ho_decoder", "verb_decoder"):
        for i in range(s.dec_layers):
            dec_layer(f"{t}.{dec}.layers.{i}")
        # with_box_refine: the decoders hold slices [:L] / [L:] of the top-level lists, renumbered from 0
        for which in ("sub", "obj"):
            for i in range(s.dec_layers):
                src = i if dec == "ho_decoder" else s.dec_layers + i
                for j in range(3):
                    for name in ("weight", "bias"):
                        shape = (4 if j == 2 else d, d) if name == "weight" else (4 if j == 2 else d,)
                        add(f"{t}.{dec}.{which}_bbox_embed.{i}.layers.{j}.{name}", shape, "alias",
                            f"{which}_bbox_embed.{src}.layers.{j}.{name}")  # fmt: skip
    add(f"{t}.level_embed", (s.levels, d))
    enc = f"{t}.ho_encoder"
    for i in range(s.enc_layers):
        pre = f"{enc}.layers.{i}"
        m = s.heads * s.levels * s.points
        linear(f"{pre}.self_attn.sampling_offsets", 2 * m, d)
        linear(f"{pre}.self_attn.attention_weights", m, d)
        linear(f"{pre}.self_attn.value_proj", d, d)
        linear(f"{pre}.self_attn.output_proj", d, d)
        ln(f"{pre}.norm1", d)
        linear(f"{pre}.linear1", s.ffn, d)
        linear(f"{pre}.linear2", d, s.ffn)
        ln(f"{pre}.norm2", d)

    def bert_layer(prefix):
        for n in ("query", "key", "value"):
            linear(f"{prefix}.attention.self.{n}", r, r)
        linear(f"{prefix}.attention.output.dense", r, r)
        ln(f"{prefix}.attention.output.LayerNorm", r)
        linear(f"{prefix}.intermediate.dense", s.text_ffn, r)
        linear(f"{prefix}.output.dense", r, s.text_ffn)
        ln(f"{prefix}.output.LayerNorm", r)

    for k in range(s.n_fusion):
        bert_layer(f"{enc}.roberta_layers.{k}")
    e = s.fusion_dim
    for k in range(s.n_fusion):
        pre = f"{enc}.VLFuse_layers.{k}.b_attn"
        add(f"{pre}.gamma_v", (d,))
        add(f"{pre}.gamma_l", (r,))
        ln(f"{pre}.layer_norm_v", d)
        ln(f"{pre}.layer_norm_l", r)
        linear(f"{pre}.attn.v_proj", e, d)
        linear(f"{pre}.attn.l_proj", e, r)
        linear(f"{pre}.attn.values_v_proj", e, d)
        linear(f"{pre}.attn.values_l_proj", e, r)
        linear(f"{pre}.attn.out_v_proj", d, e)
        linear(f"{pre}.attn.out_l_proj", r, e)
    linear(f"{t}.reference_points_sub", 2, d)
    linear(f"{t}.reference_points_obj", 2, d)
    te = f"{t}.text_encoder"
    add(f"{te}.embeddings.position_ids", (1, s.max_pos), "position_ids")  # persistent in transformers 4.5.1
    add(f"{te}.embeddings.word_embeddings.weight", (s.vocab, r))
    add(f"{te}.embeddings.position_embeddings.weight", (s.max_pos, r))
    add(f"{te}.embeddings.token_type_embeddings.weight", (s.type_vocab, r))
    ln(f"{te}.embeddings.LayerNorm", r)
    for j in range(s.text_layers):
        bert_layer(f"{te}.encoder.layer.{j}")
    linear(f"{te}.pooler.dense", r, r)
    linear(f"{t}.resizer.fc", d, r)
    ln(f"{t}.resizer.layer_norm", d)
    linear(f"{t}.coord_proj", d, 4)
    add(f"{t}.verb_tgt.weight", (2 * s.n_q, d))
    return out


def _std_for(key: str, shape: tuple[int, ...], kind: str) -> tuple[str, float, float]:
    """(distribution, scale, centre) of a random tensor: chosen so no stage saturates or collapses."""
    last = key.rsplit(".", 1)[-1]
    if kind == "frozen_bn":
        return {"weight": ("uniform", 0.5, 0.5), "bias": ("normal", 0.1, 0.0),
                "running_mean": ("normal", 0.1, 0.0), "running_var": ("uniform", 1.0, 0.5)}[last]  # fmt: skip
    if "conv" in key or "downsample.0" in key or (key.startswith("input_proj") and key.endswith(".0.weight")):
        fan_in = shape[1] * shape[2] * shape[3]
        return ("normal", math.sqrt(2.0 / fan_in), 0.0)  # He init keeps the ResNet's activations O(1)
    if "gamma_" in key:
        return ("normal", 0.05, 0.25)
    if last == "weight" and ("LayerNorm" in key or ".norm" in key or "layer_norm" in key):
        return ("normal", 0.1, 1.0)
    if key.startswith("input_proj") and key.endswith(".1.weight"):
        return ("normal", 0.1, 1.0)
    if "sampling_offsets.bias" in key:
        return ("normal", 1.5, 0.0)  # several pixels away, some samples fall outside the map (zero padding)
    if "attention_weights.bias" in key:
        return ("normal", 0.5, 0.0)
    if key.startswith("projection_text"):
        return ("normal", 2.0 if last == "weight" else 0.2, 0.0)
    # text side: keep the phrases apart. Sharp attention in the text encoder gives distinct pooled features;
    # small value/output weights in the fusion-side RoBERTa layers and out_l_proj keep the rounds from
    # averaging the phrases into one vector.
    if "text_encoder" in key and last == "weight":
        if "attention.self.query" in key or "attention.self.key" in key:
            return ("normal", 1.0, 0.0)
        if "attention.self.value" in key or "attention.output.dense" in key or "pooler.dense" in key:
            return ("normal", 0.5, 0.0)
    if (
        "roberta_layers" in key
        and last == "weight"
        and ("value" in key or "dense" in key)
        and "intermediate" not in key
    ):
        return ("normal", 0.05, 0.0)
    if "out_l_proj.weight" in key:
        return ("normal", 0.05, 0.0)
    if key in ("bias_obj_a", "bias_pred_a"):
        return ("normal", 0.3, 0.0)
    if "embeddings" in key or key.endswith(("verb_tgt.weight", "query_embed.weight", "level_embed")):
        return ("normal", 0.5, 0.0)
    if "reference_points" in key:
        return ("normal", 0.3, 0.0)
    if "coord_proj" in key:
        return ("normal", 0.3, 0.0)
    if last == "bias" or key.endswith("in_proj_bias"):
        return ("normal", 0.05, 0.0)
    fan_in = shape[-1] if len(shape) > 1 else 1
    return ("normal", min(0.25, 1.2 / math.sqrt(fan_in)), 0.0)


def reference_state_dict(sizes: Sizes = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random float32 state dict laid out exactly as the reference checkpoint's 'model' dict.

    Aliased box-MLP keys hold the very tensor of the key they alias (torch.save keeps the sharing).
    """
    return random_state_dict(reference_key_table(sizes), _std_for, seed)


def random_state_dict(table, std_for, seed: int) -> dict[str, torch.Tensor]:
    """Random float32 tensors for a key table (std_for(key, shape, kind) -> (dist, scale, centre)), the
    position-ids buffer as 0..N-1, aliases sharing the tensor of the key they alias; in the table's order."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for e in table:
        if e.kind == "alias":
            continue
        if e.kind == "position_ids":
            sd[e.key] = torch.arange(e.shape[1], dtype=torch.int64)[None]
            continue
        dist, scale, centre = std_for(e.key, e.shape, e.kind)
        if dist == "uniform":
            t = centre + scale * torch.rand(e.shape, generator=g, dtype=torch.float64)
        else:
            t = centre + scale * torch.randn(e.shape, generator=g, dtype=torch.float64)
        sd[e.key] = t.to(torch.float32)
    for e in table:
        if e.kind == "alias":
            sd[e.key] = sd[e.alias_of]
    return {e.key: sd[e.key] for e in table}


# ----------------------------------------------------------------------------------------- float64 re-statement
def _f64(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.to(torch.float64) if v.is_floating_point() else v) for k, v in sd.items()}


def _lin(sd, prefix, x):
    return F.linear(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])


def _ln(sd, prefix, x, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps)


def _frozen_bn(sd, prefix, x):
    # DETR FrozenBatchNorm2d: x * w / sqrt(rv + eps) + (b - rm * w / sqrt(rv + eps)), eps 1e-5
    scale = sd[f"{prefix}.weight"] / torch.sqrt(sd[f"{prefix}.running_var"] + 1e-5)
    shift = sd[f"{prefix}.bias"] - sd[f"{prefix}.running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def _inverse_sigmoid(x, eps=1e-5):
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def _resnet(sd, s: Sizes, x):
    """x Tensor[1, 3, H, W] -> [layer2, layer3, layer4] outputs (strides 8, 16, 32)."""
    b = "backbone.0.body"
    x = F.relu(_frozen_bn(sd, f"{b}.bn1", F.conv2d(x, sd[f"{b}.conv1.weight"], stride=2, padding=3)))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    outs = []
    for li, n_blocks in enumerate(s.depths, start=1):
        for j in range(n_blocks):
            p = f"{b}.layer{li}.{j}"
            stride = 2 if (j == 0 and li > 1) else 1
            y = F.relu(_frozen_bn(sd, f"{p}.bn1", F.conv2d(x, sd[f"{p}.conv1.weight"])))
            y = F.relu(
                _frozen_bn(sd, f"{p}.bn2", F.conv2d(y, sd[f"{p}.conv2.weight"], stride=stride, padding=1))
            )
            y = _frozen_bn(sd, f"{p}.bn3", F.conv2d(y, sd[f"{p}.conv3.weight"]))
            if f"{p}.downsample.0.weight" in sd:
                x = _frozen_bn(
                    sd, f"{p}.downsample.1", F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride)
                )
            x = F.relu(y + x)
        if li > 1:
            outs.append(x)
    return outs


def _sine_pos(h: int, w: int, d: int) -> torch.Tensor:
    """DETR PositionEmbeddingSine(d/2, 10000, normalize=True) of an all-valid h x w map -> Tensor[h*w, d]."""
    n = d // 2
    y = torch.arange(1, h + 1, dtype=torch.float64)[:, None].expand(h, w)  # cumsum of not_mask along H
    x = torch.arange(1, w + 1, dtype=torch.float64)[None, :].expand(h, w)
    y = y / (h + 1e-6) * 2 * math.pi
    x = x / (w + 1e-6) * 2 * math.pi
    k = torch.arange(n, dtype=torch.float64)
    dim_t = 10000.0 ** (2 * torch.floor(k / 2) / n)
    even = torch.arange(n) % 2 == 0

    def enc(v):
        a = v[..., None] / dim_t
        return torch.where(even, torch.sin(a), torch.cos(a))  # channel k: sin if k even else cos

    return torch.cat([enc(y), enc(x)], -1).reshape(h * w, d)  # first d/2 channels y, last d/2 x


def _ms_deform_attn(sd, prefix, s: Sizes, query, ref, value_in, shapes):
    """Plain multi-scale deformable attention for one image.

    query Tensor[N, d]; ref Tensor[N, L, 2] (x, y) or Tensor[N, L, 4] (cx, cy, w, h); value_in Tensor[S, d].
    """
    n, d = query.shape
    m, lv, p = s.heads, s.levels, s.points
    dh = d // m
    value = _lin(sd, f"{prefix}.value_proj", value_in)
    off = _lin(sd, f"{prefix}.sampling_offsets", query).view(n, m, lv, p, 2)
    aw = torch.softmax(_lin(sd, f"{prefix}.attention_weights", query).view(n, m, lv * p), -1).view(
        n, m, lv, p
    )
    out = torch.zeros(n, m, dh, dtype=query.dtype)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        if ref.shape[-1] == 2:
            loc = ref[:, None, lvl, None, :] + off[:, :, lvl] / torch.tensor([w, h], dtype=query.dtype)
        else:
            loc = ref[:, None, lvl, None, :2] + off[:, :, lvl] / p * ref[:, None, lvl, None, 2:] * 0.5
        v = value[start : start + h * w].view(h, w, m, dh).permute(2, 3, 0, 1)  # [M, dh, h, w]
        grid = (2 * loc - 1).permute(1, 0, 2, 3)  # [M, N, P, 2]
        sampled = F.grid_sample(
            v, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )  # [M,dh,N,P]
        out = out + torch.einsum("mcnp,nmp->nmc", sampled, aw[:, :, lvl])
        start += h * w
    return _lin(sd, f"{prefix}.output_proj", out.reshape(n, d))


def _bert_layer(sd, prefix, s: Sizes, x, add_mask=None):
    """Post-norm BERT layer; x Tensor[N, T, R]; add_mask Tensor[N, T] additive (0 / -10000) or None."""
    nb, t, r = x.shape
    nh = s.text_heads
    dh = r // nh

    def heads(y):
        return y.view(nb, t, nh, dh).transpose(1, 2)

    q = heads(_lin(sd, f"{prefix}.attention.self.query", x))
    k = heads(_lin(sd, f"{prefix}.attention.self.key", x))
    v = heads(_lin(sd, f"{prefix}.attention.self.value", x))
    sc = q @ k.transpose(-1, -2) / math.sqrt(dh)
    if add_mask is not None:
        sc = sc + add_mask[:, None, None, :]
    c = (torch.softmax(sc, -1) @ v).transpose(1, 2).reshape(nb, t, r)
    a = _ln(sd, f"{prefix}.attention.output.LayerNorm", _lin(sd, f"{prefix}.attention.output.dense", c) + x,
            s.text_eps)  # fmt: skip
    f = _lin(sd, f"{prefix}.output.dense", F.gelu(_lin(sd, f"{prefix}.intermediate.dense", a)))
    return _ln(sd, f"{prefix}.output.LayerNorm", f + a, s.text_eps)


def roberta_pooled_f64(state_dict, sizes: Sizes, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """Pooled RoBERTa features (tanh(pooler(h_<s>))) of each sequence -> Tensor[N, R] float64."""
    sd = _f64(state_dict)
    te = "transformer.text_encoder"
    valid = (input_ids != sizes.pad_id).long()
    pos_ids = torch.cumsum(valid, 1) * valid + sizes.pad_id  # create_position_ids_from_input_ids
    x = (sd[f"{te}.embeddings.word_embeddings.weight"][input_ids]
         + sd[f"{te}.embeddings.position_embeddings.weight"][pos_ids]
         + sd[f"{te}.embeddings.token_type_embeddings.weight"][0])  # fmt: skip
    x = _ln(sd, f"{te}.embeddings.LayerNorm", x, sizes.text_eps)
    add_mask = (1.0 - attention_mask.to(torch.float64)) * -10000.0  # transformers 4.5.1 extended mask
    for j in range(sizes.text_layers):
        x = _bert_layer(sd, f"{te}.encoder.layer.{j}", sizes, x, add_mask)
    return torch.tanh(_lin(sd, f"{te}.pooler.dense", x[:, 0]))


def _fusion(sd, prefix, s: Sizes, v, lang, v_pos):
    """GLIP bi-attention block (RLIPv2_BiAttentionBlockForCheckpoint, eval). v Tensor[Nv, d], lang Tensor[T, R]."""
    v_n = _ln(sd, f"{prefix}.layer_norm_v", v)
    l_n = _ln(sd, f"{prefix}.layer_norm_l", lang)
    h = s.fusion_heads
    e = s.fusion_dim
    dh = e // h
    nv, t = v_n.shape[0], l_n.shape[0]
    q = (_lin(sd, f"{prefix}.attn.v_proj", v_n + v_pos) * dh**-0.5).view(nv, h, dh).transpose(0, 1)
    k = _lin(sd, f"{prefix}.attn.l_proj", l_n).view(t, h, dh).transpose(0, 1)
    vv = _lin(sd, f"{prefix}.attn.values_v_proj", v_n).view(nv, h, dh).transpose(0, 1)
    vl = _lin(sd, f"{prefix}.attn.values_l_proj", l_n).view(t, h, dh).transpose(0, 1)
    a = q @ k.transpose(-1, -2)  # [h, Nv, T]
    a_l = a.transpose(-1, -2)
    a_l = a_l - a_l.max(-1, keepdim=True)[0]
    # the reference's bool masks turn into +1 on every score (masked_fill of a bool tensor): softmax-invariant
    p_l = torch.softmax(a_l + 1.0, -1)  # over image tokens
    p_v = torch.softmax(a + 1.0, -1)  # over texts
    o_v = (p_v @ vl).transpose(0, 1).reshape(nv, e)
    o_l = (p_l @ vv).transpose(0, 1).reshape(t, e)
    dv = _lin(sd, f"{prefix}.attn.out_v_proj", o_v)
    dl = _lin(sd, f"{prefix}.attn.out_l_proj", o_l)
    return v_n + sd[f"{prefix}.gamma_v"] * dv, l_n + sd[f"{prefix}.gamma_l"] * dl


def _mha(sd, prefix, heads, x, pos, key_pad):
    """nn.MultiheadAttention(q = k = x + pos, v = x) with a key padding mask; x Tensor[N, d]."""
    n, d = x.shape
    dh = d // heads
    wq, wk, wv = sd[f"{prefix}.in_proj_weight"].chunk(3)
    bq, bk, bv = sd[f"{prefix}.in_proj_bias"].chunk(3)
    q = F.linear(x + pos, wq, bq).view(n, heads, dh).transpose(0, 1)
    k = F.linear(x + pos, wk, bk).view(n, heads, dh).transpose(0, 1)
    v = F.linear(x, wv, bv).view(n, heads, dh).transpose(0, 1)
    sc = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
    sc = sc.masked_fill(key_pad[None, None, :], float("-inf"))
    o = (torch.softmax(sc, -1) @ v).transpose(0, 1).reshape(n, d)
    return _lin(sd, f"{prefix}.out_proj", o)


def _dec_layer(sd, prefix, s: Sizes, x, pos, ref, memory, shapes, key_pad):
    a = _mha(sd, f"{prefix}.self_attn", s.heads, x, pos, key_pad)
    x = _ln(sd, f"{prefix}.norm2", x + a)
    c = _ms_deform_attn(sd, f"{prefix}.cross_attn", s, x + pos, ref, memory, shapes)
    x = _ln(sd, f"{prefix}.norm1", x + c)
    f = _lin(sd, f"{prefix}.linear2", F.relu(_lin(sd, f"{prefix}.linear1", x)))
    return _ln(sd, f"{prefix}.norm3", x + f)


def _mlp(sd, prefix, x):
    for j in range(3):
        x = _lin(sd, f"{prefix}.layers.{j}", x)
        if j < 2:
            x = F.relu(x)
    return x


def _refine(delta, ref):
    if ref.shape[-1] == 2:
        return torch.sigmoid(torch.cat([delta[..., :2] + _inverse_sigmoid(ref), delta[..., 2:]], -1))
    return torch.sigmoid(delta + _inverse_sigmoid(ref))


def reference_forward_f64(
    state_dict: dict[str, torch.Tensor],
    sizes: Sizes,
    pixels: torch.Tensor,
    boxes_cxcywh: torch.Tensor,
    label_index: list[int],
    slots: list[tuple[int, int]],
    texts_pooled: torch.Tensor,
    n_entity: int,
) -> dict:
    """The reference tagger's forward for one image in float64.

    Args:
        pixels: Tensor[3, H, W] normalised, unpadded (the reference's batch of one: no padding, valid ratios 1).
        boxes_cxcywh: Tensor[n, 4] normalised by the image size; label_index: per box, the index of its class
            text; slots: (subject, object) box indices, consecutive groups of sizes.n_q slots.
        texts_pooled: Tensor[T, R] pooled RoBERTa features of (class keys, 'no objects', relation texts).
        n_entity: O, the number of entity texts (class keys + 'no objects') at the head of texts_pooled.
    Returns: dict with 'memory' [S, d], 'text_fused' [K, T, R] (after each fusion round's RoBERTa layer),
        'text_resized' [K, T, d], 'shapes', and per decoder layer lists 'sub_logits' / 'obj_logits' [P, O],
        'rel_logits' [P, R], 'sub_boxes' / 'obj_boxes' [P, 4].
    """
    sd = _f64(state_dict)
    s = sizes
    d = s.d
    x = pixels.to(torch.float64)[None]
    feats = _resnet(sd, s, x)
    srcs = []
    for i, f in enumerate(feats):
        y = F.conv2d(f, sd[f"input_proj.{i}.0.weight"], sd[f"input_proj.{i}.0.bias"])
        srcs.append(
            F.group_norm(y, s.gn_groups, sd[f"input_proj.{i}.1.weight"], sd[f"input_proj.{i}.1.bias"], 1e-5)
        )
    i = len(feats)
    y = F.conv2d(feats[-1], sd[f"input_proj.{i}.0.weight"], sd[f"input_proj.{i}.0.bias"], stride=2, padding=1)
    srcs.append(
        F.group_norm(y, s.gn_groups, sd[f"input_proj.{i}.1.weight"], sd[f"input_proj.{i}.1.bias"], 1e-5)
    )
    shapes = [(int(t.shape[2]), int(t.shape[3])) for t in srcs]
    src = torch.cat([t[0].flatten(1).T for t in srcs], 0)  # [S, d]
    pos = torch.cat(
        [_sine_pos(h, w, d) + sd["transformer.level_embed"][lv] for lv, (h, w) in enumerate(shapes)]
    )
    refs = []
    for h, w in shapes:  # pixel centres, valid ratios 1
        ry, rx = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float64) / h,
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float64) / w, indexing="ij",
        )  # fmt: skip
        refs.append(torch.stack([rx.reshape(-1), ry.reshape(-1)], -1))
    enc_ref = torch.cat(refs)[:, None, :].expand(-1, s.levels, -1)  # [S, L, 2]
    s3 = sum(h * w for h, w in shapes[:-1])

    enc = "transformer.ho_encoder"
    lang = texts_pooled.to(torch.float64)
    fused = []
    for li in range(s.enc_layers):
        if li % s.fusion_interval == 0:
            k = li // s.fusion_interval
            v, lang = _fusion(sd, f"{enc}.VLFuse_layers.{k}.b_attn", s, src[s3:], lang, pos[s3:])
            src = torch.cat([src[:s3], v], 0)
            lang = _bert_layer(sd, f"{enc}.roberta_layers.{k}", s, lang[None])[0]
            fused.append(lang)
        p = f"{enc}.layers.{li}"
        a = _ms_deform_attn(sd, f"{p}.self_attn", s, src + pos, enc_ref, src, shapes)
        src = _ln(sd, f"{p}.norm1", src + a)
        src = _ln(sd, f"{p}.norm2", src + _lin(sd, f"{p}.linear2", F.relu(_lin(sd, f"{p}.linear1", src))))
    memory = src
    text_fused = torch.stack(fused)  # [K, T, R]
    tau = _ln(sd, "transformer.resizer.layer_norm", _lin(sd, "transformer.resizer.fc", text_fused), 1e-12)

    # decoder, one group of Q slots at a time (groups never interact)
    q_slots = sd["transformer.verb_tgt.weight"].shape[0] // 2
    n_dec = s.dec_layers
    ent_table = tau[-1, :n_entity]  # detached label text of the last fusion round
    boxes = boxes_cxcywh.to(torch.float64)
    labels = torch.as_tensor(label_index, dtype=torch.long)
    per_layer = {k: [[] for _ in range(n_dec)] for k in ("sub_logits", "obj_logits", "rel_logits", "sub_boxes",
                                                        "obj_boxes")}  # fmt: skip
    texts_proj = []
    for lv in range(n_dec):
        t = F.normalize(tau[lv], p=2, dim=-1)
        texts_proj.append(_lin(sd, "projection_text", t / 2.0))
    for g0 in range(0, len(slots), q_slots):
        grp = slots[g0 : g0 + q_slots]
        n = len(grp)
        si = torch.tensor([a for a, _ in grp], dtype=torch.long)
        oi = torch.tensor([b for _, b in grp], dtype=torch.long)
        query = torch.zeros(2 * q_slots, 2 * d, dtype=torch.float64)
        query[:n, :d] = _lin(sd, "transformer.coord_proj", _inverse_sigmoid(boxes[si]))
        query[:n, d:] = ent_table[labels[si]]
        query[q_slots : q_slots + n, :d] = _lin(sd, "transformer.coord_proj", _inverse_sigmoid(boxes[oi]))
        query[q_slots : q_slots + n, d:] = ent_table[labels[oi]]
        kpm = torch.ones(2 * q_slots, dtype=torch.bool)
        kpm[:n] = False
        kpm[q_slots : q_slots + n] = False
        qpos, tgt = query[:, :d], query[:, d:]
        ref_s = torch.sigmoid(_lin(sd, "transformer.reference_points_sub", qpos[:q_slots]))
        ref_o = torch.sigmoid(_lin(sd, "transformer.reference_points_obj", qpos[q_slots:]))
        xh = tgt
        hs, boxes_l = [], []
        for lv in range(n_dec):
            r_in = torch.cat([ref_s, ref_o], 0)[:, None, :].expand(-1, s.levels, -1)
            xh = _dec_layer(sd, f"transformer.ho_decoder.layers.{lv}", s, xh, qpos, r_in, memory, shapes, kpm)
            ref_s = _refine(_mlp(sd, f"transformer.ho_decoder.sub_bbox_embed.{lv}", xh[:q_slots]), ref_s)
            ref_o = _refine(_mlp(sd, f"transformer.ho_decoder.obj_bbox_embed.{lv}", xh[q_slots:]), ref_o)
            hs.append(xh)
            boxes_l.append((ref_s, ref_o))
        pos_v = hs[-1][:q_slots] + hs[-1][q_slots:]
        w = sd["transformer.verb_tgt.weight"]
        xv = w[:q_slots] + w[q_slots:]
        hv = []
        for lv in range(n_dec):
            r_in = (0.5 * (ref_s + ref_o))[:, None, :].expand(-1, s.levels, -1)
            xv = _dec_layer(sd, f"transformer.verb_decoder.layers.{lv}", s, xv, pos_v, r_in, memory, shapes,
                            kpm[:q_slots])  # fmt: skip
            ref_s = _refine(_mlp(sd, f"transformer.verb_decoder.sub_bbox_embed.{lv}", xv), ref_s)
            ref_o = _refine(_mlp(sd, f"transformer.verb_decoder.obj_bbox_embed.{lv}", xv), ref_o)
            hv.append(xv)
        for lv in range(n_dec):
            pt = texts_proj[lv]
            obj_t, rel_t = pt[:n_entity], pt[n_entity:]
            h_s, h_o = hs[lv][:q_slots], hs[lv][q_slots:]
            per_layer["sub_logits"][lv].append(((h_s + sd["bias_obj_a"]) @ obj_t.T + BIAS_C)[:n])
            per_layer["obj_logits"][lv].append(((h_o + sd["bias_obj_a"]) @ obj_t.T + BIAS_C)[:n])
            per_layer["rel_logits"][lv].append(((hv[lv] + sd["bias_pred_a"]) @ rel_t.T + BIAS_C)[:n])
            per_layer["sub_boxes"][lv].append(boxes_l[lv][0][:n])
            per_layer["obj_boxes"][lv].append(boxes_l[lv][1][:n])
    out = {k: [torch.cat(v) for v in lists] for k, lists in per_layer.items()}
    out.update(memory=memory, text_fused=text_fused, text_resized=tau, shapes=shapes)
    return out


def reference_scores_f64(out: dict) -> dict[str, torch.Tensor]:
    """The tagger's scores from the last decoder layer: p_relation = sigmoid; p_subject / p_object = top-1 of the
    softmax over the O entity texts (class keys + 'no objects')."""
    return {
        "p_subject": torch.softmax(out["sub_logits"][-1], -1).amax(-1),
        "p_object": torch.softmax(out["obj_logits"][-1], -1).amax(-1),
        "p_relation": torch.sigmoid(out["rel_logits"][-1]),
    }
