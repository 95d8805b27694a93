"""Parity of reltag's RLIPv2 tagger with a float64 re-statement of the reference, through the checkpoint converter."""

from __future__ import annotations

import argparse
import collections
import copy
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.rlipv2_reference import (
    FULL,
    TINY,
    reference_forward_f64,
    reference_key_table,
    reference_scores_f64,
    reference_state_dict,
    roberta_pooled_f64,
)
from tests.tolerances import (
    assert_within,
    rtagger_chain_length,
    rtagger_logit_tol,
    sigmoid_prob_tol,
    softmax_max_tol,
)

CLASS_KEYS = ["person", "dog", "bicycle", "dining table", "tv"]
NO_OBJECT = "no objects"
REL_TEXTS = ["riding", "next to", "sitting on", "holding", "looking at"]
ENTITIES = CLASS_KEYS + [NO_OBJECT]

# (image H, W, boxes, label per box (class key index), slots, relation texts)
CASES = {
    # one group: 3 pairs, the first repeated, 2 relation texts
    "one_group": dict(
        hw=(96, 128),
        n_box=4,
        labels=[0, 1, 3, 0],
        slots=[(0, 1), (2, 0), (0, 1)],
        texts=["riding", "next to"],
        seed=1,
    ),  # fmt: skip
    # 20 pairs with 16 slots per group: two groups decode from one encoder pass
    "two_groups": dict(
        hw=(80, 112),
        n_box=6,
        labels=[0, 2, 1, 4, 0, 3],
        slots=[(a, b) for a in range(6) for b in range(6) if a != b][:20],
        texts=["holding", "sitting on", "looking at"],
        seed=2,
    ),  # fmt: skip
}

ROBERTA_BASE = {
    "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 514, "type_vocab_size": 1,
    "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
}  # fmt: skip

# fp32 model vs float64 re-statement
TOL = {"prob": 1e-4, "pooled": 1e-5, "text": 1e-4, "memory": 2e-4, "logit": 4e-4, "box": 1e-5}


def batch_prob_tol(model, scores, slots) -> dict[str, np.ndarray]:
    """Bounds on |p1 - p2| for scores of the same slots decoded from one encoder state in other decoder batch
    shapes (other groups per forward, other rows of a GEMM): the logits within rtagger_logit_tol of the decoder
    chain (tests/tolerances.py), mapped through the sigmoid (p_relation) and the top-1 softmax over the entity
    texts (p_subject, p_object)."""
    z = rtagger_logit_tol(model, rtagger_chain_length(model, model.cfg.n_q))
    n_ent = len(ENTITIES)
    return {
        "p_relation": sigmoid_prob_tol(scores.p_relation, z),
        "p_subject": softmax_max_tol(scores.p_subject, z, n_ent),
        "p_object": softmax_max_tol(scores.p_object, z, n_ent),
    }


def reference_args(s=TINY) -> argparse.Namespace:
    """The reference's args for the tagger (scripts/verb_tagger/test_Tagger_resnet.sh), at sizes s."""
    return argparse.Namespace(
        hidden_dim=s.d, nheads=s.heads, enc_layers=s.enc_layers, dec_layers=s.dec_layers, dim_feedforward=s.ffn,
        num_queries=2 * s.n_q, num_feature_levels=s.levels, enc_n_points=s.points, dec_n_points=s.points,
        fusion_type="GLIP_attn", fusion_interval=s.fusion_interval, fusion_last_vis=True, with_box_refine=True,
        use_no_obj_token=True, backbone="resnet50", lang_aux_loss=True, two_stage=False, verb_tagger=True,
        subject_class=True, dropout=0.1,
    )  # fmt: skip


class NotADict(collections.OrderedDict):
    """A class outside the converter's allow-list; unpickling it must be refused."""


class WritesAFile:
    """Unpickling this would call builtins.open(path, 'w'): the converter must refuse before anything runs."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def assert_close(actual, expected, atol: float, what: str, rtol: float = 0.0) -> None:
    """Assert |actual - expected| <= atol + rtol |expected| everywhere; the message names the worst element."""
    a = torch.as_tensor(np.asarray(actual) if not isinstance(actual, torch.Tensor) else actual).to(
        torch.float64
    )
    e = torch.as_tensor(expected).to(torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if a.numel() == 0:
        return
    assert torch.isfinite(a).all(), (
        f"{what}: non-finite values at {torch.nonzero(~torch.isfinite(a))[:5].tolist()}"
    )
    excess = (a - e).abs() - (atol + rtol * e.abs())
    flat = int(excess.reshape(-1).argmax())
    idx = tuple(int(i) for i in np.unravel_index(flat, tuple(a.shape)))
    worst = float(excess.reshape(-1)[flat])
    assert worst <= 0, (
        f"{what}: worst element {idx}: reltag {float(a[idx]):.8g} vs reference {float(e[idx]):.8g} "
        f"(|diff| {abs(float(a[idx] - e[idx])):.3g} > atol {atol} + rtol {rtol}); max |diff| "
        f"{float((a - e).abs().max()):.3g}"
    )


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ref_sd():
    return reference_state_dict(TINY, seed=1)  # seed checked by test_reference_state_dict_is_not_degenerate


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    """A tiny RoBERTa config + word-level tokenizer in one directory, as --text-model takes it."""
    from transformers import RobertaConfig

    from models.rlipv2.tokenizer import build_word_tokenizer

    d = tmp_path_factory.mktemp("tiny_roberta")
    RobertaConfig(**TINY.text_config()).save_pretrained(str(d))
    tok = build_word_tokenizer(ENTITIES + REL_TEXTS, d)
    assert len(tok) <= TINY.vocab
    return d


@pytest.fixture(scope="module")
def converted(ref_sd, text_dir):
    from models.rlipv2.convert import convert_reference

    return convert_reference(dict(ref_sd), reference_args(), str(text_dir), CLASS_KEYS)


def make_case(name: str) -> dict:
    c = CASES[name]
    g = torch.Generator().manual_seed(c["seed"])
    h, w = c["hw"]
    # float32 inputs: the model sees them as they are, the float64 reference sees the same values
    pixels = torch.randn(3, h, w, generator=g).to(torch.float32)
    n = c["n_box"]
    centre = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
    size = 0.1 + 0.4 * torch.rand(n, 2, generator=g)
    boxes = torch.cat([centre, size], -1).to(torch.float32)
    return dict(c, pixels=pixels, boxes=boxes, label_names=[CLASS_KEYS[i] for i in c["labels"]])


_F64_CACHE: dict = {}


def reference_outputs(ref_sd, text_dir, name: str, entities: list[str] | None = None) -> dict:
    """f64 re-statement for a case (cached per case and entity list)."""
    from transformers import AutoTokenizer

    case = make_case(name)
    entities = entities or ENTITIES
    key = (name, tuple(entities))
    if key not in _F64_CACHE:
        tok = AutoTokenizer.from_pretrained(str(text_dir))
        texts = entities + case["texts"]
        enc = tok(texts, padding="longest", return_tensors="pt")
        pooled = roberta_pooled_f64(ref_sd, TINY, enc["input_ids"], enc["attention_mask"])
        label_index = [entities.index(lb) for lb in case["label_names"]]
        out = reference_forward_f64(
            ref_sd, TINY, case["pixels"], case["boxes"], label_index, case["slots"], pooled, len(entities)
        )
        out["pooled"] = pooled
        _F64_CACHE[key] = out
    return _F64_CACHE[key]


# ------------------------------------------------------------------------------------------- key tables
def test_reference_layout_round_trips_through_the_converter(ref_sd, converted):
    table = reference_key_table(TINY)
    assert [e.key for e in table] == list(ref_sd)
    for e in table:
        assert tuple(ref_sd[e.key].shape) == e.shape, e.key
    dropped = {e.key for e in table if e.kind in ("alias", "position_ids")}
    own = converted.state_dict()
    missing = sorted(set(ref_sd) - dropped - set(own))
    unexpected = sorted(set(own) - (set(ref_sd) - dropped))
    assert not missing and not unexpected, f"missing {missing[:10]}, unexpected {unexpected[:10]}"
    for k, v in own.items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, ref_sd[k].to(torch.float32)), (
            f"{k}: converted tensor differs from the reference's"
        )
    # converted sizes come from the shapes
    assert converted.cfg.n_q == TINY.n_q and converted.cfg.d_model == TINY.d
    assert converted.cfg.backbone_depths == TINY.depths and converted.cfg.entity_names == CLASS_KEYS
    assert not converted.training


@pytest.mark.parametrize(
    "change, key",
    [
        ("remove", "transformer.ho_encoder.VLFuse_layers.1.b_attn.gamma_l"),
        ("remove", "backbone.0.body.layer3.0.bn2.running_var"),
        ("remove", "transformer.verb_decoder.layers.2.norm3.bias"),
        ("extra", "transformer.ho_encoder.VLFuse_layers.0.b_attn.gating.weight"),
        ("extra", "class_embed.0.weight"),
        ("shape", "transformer.ho_encoder.layers.3.norm1.weight"),
        ("shape", "transformer.resizer.fc.weight"),
        ("shape", "sub_bbox_embed.4.layers.2.weight"),
        ("alias", "transformer.verb_decoder.obj_bbox_embed.1.layers.0.weight"),
    ],
)
def test_converter_names_the_offending_key(ref_sd, text_dir, change, key):
    from models.rlipv2.convert import convert_reference

    sd = dict(ref_sd)
    if change == "remove":
        del sd[key]
    elif change == "extra":
        sd[key] = torch.zeros(4, 4)
    elif change == "shape":
        t = sd[key]
        sd[key] = torch.zeros((t.shape[0] + 1,) + tuple(t.shape[1:]))
        if key.startswith("sub_bbox_embed.4"):  # keep its alias consistent: the shape itself must be refused
            sd["transformer.verb_decoder.sub_bbox_embed.1.layers.2.weight"] = sd[key]
    else:  # an alias that is not the tensor it should alias
        sd[key] = sd[key] + 1.0
    with pytest.raises(ValueError, match=re.escape(key)):
        convert_reference(sd, reference_args(), str(text_dir), CLASS_KEYS)


def test_full_size_reference_table_is_reltag_table_plus_aliases_and_position_ids():
    from models.rlipv2.config import RLIPv2Config
    from models.rlipv2.model import RLIPv2ParSeD

    table = reference_key_table(FULL)
    assert len(table) == 972  # 684 encoder-side (incl. 213 buffers) + 288 decoder-side entries
    assert sum(e.kind == "frozen_bn" for e in table) == 212
    aliases = [e for e in table if e.kind == "alias"]
    assert len(aliases) == 72
    by_key = {e.key: e for e in table}
    for e in aliases:
        assert by_key[e.alias_of].shape == e.shape, e.key
    pos_ids = [e for e in table if e.kind == "position_ids"]
    assert [(e.key, e.shape) for e in pos_ids] == [
        ("transformer.text_encoder.embeddings.position_ids", (1, 514))
    ]

    cfg = RLIPv2Config(text_config=dict(ROBERTA_BASE))
    with torch.device("meta"):
        model = RLIPv2ParSeD(cfg, tokenizer=None)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {e.key: e.shape for e in table if e.kind not in ("alias", "position_ids")}
    only_ref = sorted(set(theirs) - set(ours))
    only_ours = sorted(set(ours) - set(theirs))
    assert not only_ref and not only_ours, (
        f"only in the reference {only_ref[:10]}, only in reltag {only_ours[:10]}"
    )
    wrong = [(k, theirs[k], ours[k]) for k in theirs if theirs[k] != ours[k]]
    assert not wrong, f"shapes differ (key, reference, reltag): {wrong[:10]}"
    assert len(ours) == len(table) - 73


def test_reference_state_dict_is_not_degenerate(ref_sd, text_dir):
    out = reference_outputs(ref_sd, text_dir, "two_groups")
    p = reference_scores_f64(out)["p_relation"]
    assert p.std() > 0.05 and p.min() < 0.2 and p.max() > 0.5, (
        f"p_relation does not spread: {p.flatten()[:8]}"
    )
    assert p.std(1).mean() > 0.01, f"the relation texts get (nearly) the same scores: {p[:4]}"
    for k, t in enumerate(out["text_resized"]):  # phrases stay apart through the fusion rounds
        assert t.std(0).mean() > 0.2 * t.std(), f"fusion round {k} collapses the phrases"
    ps = out["sub_logits"][-1].softmax(-1).amax(-1)
    assert (ps < 0.995).all() and ps.std() > 1e-3, f"p_subject is saturated or constant: {ps}"
    alias = "transformer.ho_decoder.sub_bbox_embed.2.layers.1.weight"
    assert ref_sd[alias] is ref_sd["sub_bbox_embed.2.layers.1.weight"]
    assert (
        ref_sd["transformer.verb_decoder.obj_bbox_embed.0.layers.2.bias"]
        is ref_sd["obj_bbox_embed.3.layers.2.bias"]
    )


# ----------------------------------------------------------------------------------------------- parity
def _encode_with_hooks(model, case):
    """reltag's encoder output and the fused text after each round's RoBERTa layer."""
    fused = []

    def hook(_m, _inp, out):
        fused.append((out[0] if isinstance(out, tuple) else out).detach())

    handles = [m.register_forward_hook(hook) for m in model.transformer.ho_encoder.roberta_layers]
    try:
        px = case["pixels"][None]
        mask = torch.zeros(1, px.shape[2], px.shape[3], dtype=torch.bool)
        with torch.no_grad():
            state = model.encode(px, mask, [ENTITIES], [case["texts"]], use_phrase_cache=False)
    finally:
        for h in handles:
            h.remove()
    return state, torch.stack([f[0] for f in fused])


def _decode_all_layers(model, state, case):
    """All decoder layers' logits and boxes of the case's groups, concatenated over the valid slots."""
    q = model.cfg.n_q
    slots = case["slots"]
    label_idx = torch.tensor(case["labels"])
    per = collections.defaultdict(lambda: collections.defaultdict(list))
    for g0 in range(0, len(slots), q):
        grp = torch.tensor(slots[g0 : g0 + q])
        k = grp.shape[0]
        sub_b = torch.full((1, q, 4), 0.5)
        obj_b = sub_b.clone()
        sub_l = torch.zeros(1, q, dtype=torch.long)
        obj_l = sub_l.clone()
        valid = torch.zeros(1, q, dtype=torch.bool)
        sub_b[0, :k], obj_b[0, :k] = case["boxes"][grp[:, 0]], case["boxes"][grp[:, 1]]
        sub_l[0, :k], obj_l[0, :k] = label_idx[grp[:, 0]], label_idx[grp[:, 1]]
        valid[0, :k] = True
        with torch.no_grad():
            out = model.decode(state, torch.zeros(1, dtype=torch.long), sub_b, obj_b, sub_l, obj_l, valid,
                               all_layers=True)  # fmt: skip
        layers = out.aux + [dict(sub_logits=out.sub_logits, obj_logits=out.obj_logits, rel_logits=out.rel_logits,
                                 sub_boxes=out.sub_boxes, obj_boxes=out.obj_boxes)]  # fmt: skip
        for lv, o in enumerate(layers):
            for name in ("sub_logits", "obj_logits", "rel_logits", "sub_boxes", "obj_boxes"):
                per[name][lv].append(o[name][0, :k])
    return {name: [torch.cat(per[name][lv]) for lv in sorted(per[name])] for name in per}


@pytest.mark.parametrize("name", list(CASES))
def test_encoder_intermediates_match_reference(ref_sd, text_dir, converted, name):
    case = make_case(name)
    ref = reference_outputs(ref_sd, text_dir, name)
    with torch.no_grad():
        pooled = converted.phrase_features(ENTITIES + case["texts"], use_cache=False)
    assert_close(pooled, ref["pooled"], TOL["pooled"], "pooled RoBERTa phrase features")
    state, fused = _encode_with_hooks(converted, case)
    assert [tuple(s) for s in state.spatial_shapes.tolist()] == ref["shapes"]
    for k in range(TINY.n_fusion):
        assert_close(
            fused[k], ref["text_fused"][k], TOL["text"], f"fused text after fusion round {k}", rtol=1e-4
        )
        assert_close(
            state.text[k, 0], ref["text_resized"][k], TOL["text"], f"resized text of round {k}", 1e-4
        )
    assert_close(state.memory[0], ref["memory"], TOL["memory"], "encoder memory", rtol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_decoder_layers_match_reference(ref_sd, text_dir, converted, name):
    case = make_case(name)
    ref = reference_outputs(ref_sd, text_dir, name)
    state, _ = _encode_with_hooks(converted, case)
    got = _decode_all_layers(converted, state, case)
    for lv in range(TINY.dec_layers):
        for what in ("sub_boxes", "obj_boxes"):
            assert_close(got[what][lv], ref[what][lv], TOL["box"] * 10, f"decoder layer {lv} {what}")
        for what in ("sub_logits", "obj_logits", "rel_logits"):
            assert_close(got[what][lv], ref[what][lv], TOL["logit"], f"decoder layer {lv} {what}", rtol=1e-4)


@pytest.mark.parametrize("name", list(CASES))
def test_tag_image_scores_match_reference(ref_sd, text_dir, converted, name):
    from models.rlipv2.tagger import tag_image

    case = make_case(name)
    ref = reference_scores_f64(reference_outputs(ref_sd, text_dir, name))
    scores, counters = tag_image(
        converted, case["pixels"], case["boxes"], case["label_names"], case["slots"], case["texts"]
    )
    n_groups = -(-len(case["slots"]) // TINY.n_q)
    assert counters == {"encoder_passes": 1, "decoder_groups": n_groups}
    assert_close(scores.p_relation, ref["p_relation"], TOL["prob"], "p_relation")
    assert_close(scores.p_subject, ref["p_subject"], TOL["prob"], "p_subject")
    assert_close(scores.p_object, ref["p_object"], TOL["prob"], "p_object")
    if name == "one_group":
        # a repeated pair has the same entity queries, so the same entity scores; its relation scores differ,
        # as in the reference: the relation query content verb_tgt[i] + verb_tgt[Q + i] is learned per slot.
        # Slots 0 and 2 are other rows of the same GEMMs, which float32 may sum in another order (row tiles):
        # batch_prob_tol of the decoder chain (~2e-2 here, the random reference weights' |projection_text| is 21;
        # slot 1, another pair, is 0.37 away in p_subject; measured: equal)
        tol = batch_prob_tol(converted, scores, case["slots"])
        assert_within(
            scores.p_subject[2], scores.p_subject[0], tol["p_subject"][0], "repeated pair p_subject"
        )
        assert_within(scores.p_object[2], scores.p_object[0], tol["p_object"][0], "repeated pair p_object")
        assert np.abs(scores.p_relation[2] - scores.p_relation[0]).max() > 1e-3


def test_tagger_score_on_a_pil_image_matches_reference(ref_sd, text_dir, converted):
    """Tagger.score: pixel boxes and a PIL image in; compared on reltag's preprocessed pixels."""
    from PIL import Image

    from models.rlipv2.preprocess import preprocess_image
    from models.rlipv2.tagger import Tagger

    model = copy.deepcopy(converted)
    # a smaller DETR resize than the reference's 800/1333 keeps the float64 reference quick: 40x30 -> 320x240
    model.cfg.min_size, model.cfg.max_size = 240, 400
    tagger = Tagger(model, revision="test")
    rng = np.random.default_rng(5)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    boxes_px = [[2.0, 3.0, 20.0, 15.0], [18.0, 6.0, 21.0, 23.0], [5.0, 10.0, 30.0, 12.0]]
    labels = ["dog", "person", "tv"]
    pairs = [(1, 0), (0, 2), (2, 1), (1, 0)]
    texts = ["riding", "looking at"]
    scores = tagger.score(img, boxes_px, labels, pairs, texts, vocabulary=tagger.class_keys)
    pixels = preprocess_image(img, model.cfg)
    assert tuple(pixels.shape) == (3, 240, 320)
    w, h = img.size
    boxes = torch.tensor([[(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h] for x, y, bw, bh in boxes_px])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(text_dir))
    enc = tok(ENTITIES + texts, padding="longest", return_tensors="pt")
    pooled = roberta_pooled_f64(ref_sd, TINY, enc["input_ids"], enc["attention_mask"])
    out = reference_forward_f64(ref_sd, TINY, pixels, boxes.to(torch.float32), [ENTITIES.index(x) for x in labels],
                                pairs, pooled, len(ENTITIES))  # fmt: skip
    ref = reference_scores_f64(out)
    assert_close(scores.p_relation, ref["p_relation"], TOL["prob"], "Tagger.score p_relation")
    assert_close(scores.p_subject, ref["p_subject"], TOL["prob"], "Tagger.score p_subject")
    assert_close(scores.p_object, ref["p_object"], TOL["prob"], "Tagger.score p_object")


# -------------------------------------------------------------------------- checkpoint file and main()
def _save_reference_pth(path: Path, sd: dict) -> None:
    torch.save({"model": sd, "epoch": 3, "args": reference_args()}, str(path))


def test_main_writes_a_checkpoint_that_load_tagger_reads(ref_sd, text_dir, converted, tmp_path):
    from models.rlipv2.convert import main
    from models.rlipv2.tagger import load_tagger, tag_image

    pth = tmp_path / "checkpoint0019.pth"
    _save_reference_pth(pth, ref_sd)
    out_dir = tmp_path / "tagger"
    rc = main(
        [
            "--reference",
            str(pth),
            "--text-model",
            str(text_dir),
            "--out",
            str(out_dir),
            "--vocabulary",
            "none",
        ]
    )
    assert rc in (0, None)
    tagger = load_tagger(out_dir)
    assert tagger.class_keys == []
    loaded = tagger.model.state_dict()
    own = converted.state_dict()
    assert sorted(loaded) == sorted(own)
    for k in own:
        assert torch.equal(loaded[k], own[k]), k
    # without a vocabulary the entity texts are the image's labels in order of appearance, then 'no objects'
    case = make_case("two_groups")
    entities = list(dict.fromkeys(case["label_names"])) + [NO_OBJECT]
    ref = reference_scores_f64(reference_outputs(ref_sd, text_dir, "two_groups", entities))
    scores, _ = tag_image(tagger.model, case["pixels"], case["boxes"], case["label_names"], case["slots"],
                          case["texts"])  # fmt: skip
    assert_close(scores.p_relation, ref["p_relation"], TOL["prob"], "loaded checkpoint p_relation")
    assert_close(scores.p_subject, ref["p_subject"], TOL["prob"], "loaded checkpoint p_subject")


def test_main_refuses_a_pickle_with_other_classes(ref_sd, text_dir, tmp_path, capsys):
    from models.rlipv2.convert import main

    marker = tmp_path / "side_effect"
    cases = {
        "subclass": {"model": NotADict(ref_sd), "epoch": 3, "args": reference_args()},
        "reduce": {
            "model": dict(ref_sd),
            "epoch": 3,
            "args": reference_args(),
            "x": WritesAFile(str(marker)),
        },
    }
    for name, payload in cases.items():
        pth = tmp_path / f"{name}.pth"
        torch.save(payload, str(pth))
        out_dir = tmp_path / f"out_{name}"
        rc = main(["--reference", str(pth), "--text-model", str(text_dir), "--out", str(out_dir)])
        err = capsys.readouterr().err
        assert rc not in (0, None), f"{name}: main accepted a pickle holding a disallowed class"
        assert "weights_only" in err, f"{name}: the refusal does not say why: {err!r}"
        assert not (out_dir / "model.safetensors").exists()
        assert not marker.exists(), "unpickling ran the payload's __reduce__"
    # plain pickle does run the payload, so the check above can fail
    pickle.loads(pickle.dumps(WritesAFile(str(marker)))).close()
    assert marker.exists()


# ------------------------------------------------------------------------------------------- batch invariance
def test_scores_do_not_depend_on_other_images_or_grouping_of_the_encoder(ref_sd, text_dir, converted):
    from models.rlipv2.tagger import tag_image

    a, b = make_case("two_groups"), make_case("one_group")  # 80x112 and 96x128 images

    def score(c, **kw):
        return tag_image(converted, c["pixels"], c["boxes"], c["label_names"], c["slots"], c["texts"], **kw)

    alone, ca = score(a)
    assert ca == {"encoder_passes": 1, "decoder_groups": 2}  # one encoder pass per image, both groups from it
    _, cb = score(b)
    assert cb == {"encoder_passes": 1, "decoder_groups": 1}
    again, _ = score(a)  # after another image of another size, with the phrase cache warm
    # the same float32 computation: one image at its own size, its phrases read from the cache (as `alone` read
    # them or filled it), the same groups per forward: nothing of the other image can reach it, bit for bit
    for f in ("p_relation", "p_subject", "p_object"):
        assert np.array_equal(getattr(again, f), getattr(alone, f)), f"{f} after another image"
    # one group per decoder forward instead of both: the same encoder state, the decoder's GEMMs with half the
    # rows, which float32 may sum in another order: batch_prob_tol of the decoder chain (p_relation <= 3.2e-3;
    # measured 3e-7; two groups swapped move it by 0.98)
    one_per_forward, _ = score(a, groups_per_forward=1)
    tol = batch_prob_tol(converted, alone, a["slots"])
    for f in ("p_relation", "p_subject", "p_object"):
        assert_within(getattr(one_per_forward, f), getattr(alone, f), tol[f], f"{f} one group per forward")
    # the reference's cost model (the image repeated once per group, a batch of 2 through the encoder) is another
    # float32 summation order: it agrees with the float64 reference as closely as the single pass does
    batched, cr = score(a, reference_style=True)
    assert cr["encoder_passes"] == 2
    ref = reference_scores_f64(reference_outputs(ref_sd, text_dir, "two_groups"))
    assert_close(batched.p_relation, ref["p_relation"], TOL["prob"], "p_relation, image batched per group")
    assert_close(batched.p_subject, ref["p_subject"], TOL["prob"], "p_subject, image batched per group")
