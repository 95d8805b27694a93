"""The pre-training objective (models.rlipv2.criterion) against the plain float64 restatement of the reference's
loss (tests/rlipv2_loss_reference.py), term by term, and Label Sequence Extension's seeded text sampling."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from models.rlipv2.criterion import Criterion, LossSettings, PairTargets, pseudo_labels, relation_similarity
from models.rlipv2.label_sequence import batch_texts, extend_texts, split_lengths, text_frequencies
from tests import rlipv2_loss_reference as ref

RTOL = 1e-5  # float64 on both sides; only summation order differs
B, Q, TE, TR, R, L = 2, 5, 6, 4, 8, 3  # images, pair slots, entity texts ("no objects" last), relation texts
N_PAIRS = (3, 2)
TERMS = ("loss_sub_bbox", "loss_obj_bbox", "loss_sub_giou", "loss_obj_giou", "loss_obj_ce", "loss_verb_ce")
WEIGHT_OF = {"bbox_loss_coef": ("loss_sub_bbox", "loss_obj_bbox"), "giou_loss_coef": ("loss_sub_giou", "loss_obj_giou"),
             "obj_loss_coef": ("loss_obj_ce",), "verb_loss_coef": ("loss_verb_ce",)}  # fmt: skip


def _boxes(g, *shape):
    c = torch.rand(*shape, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2
    wh = torch.rand(*shape, 2, generator=g, dtype=torch.float64) * 0.4 + 0.1
    return torch.cat([c, wh], -1)


def fixed_batch(seed: int = 0):
    """A fixed (outputs, targets) pair in float64: 3 decoder layers, texts shared by both images."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(L):
        layers.append({
            "sub_boxes": _boxes(g, B, Q), "obj_boxes": _boxes(g, B, Q),
            "sub_logits": torch.randn(B, Q, TE, generator=g, dtype=torch.float64) * 2,
            "obj_logits": torch.randn(B, Q, TE, generator=g, dtype=torch.float64) * 2,
            "rel_logits": torch.randn(B, Q, TR, generator=g, dtype=torch.float64) * 2,
        })  # fmt: skip
    phrases = torch.randn(TR, R, generator=g, dtype=torch.float64)
    targets = []
    for n in N_PAIRS:
        rels = (torch.rand(n, TR, generator=g) < 0.4).double()
        rels[torch.arange(n), torch.randint(0, TR, (n,), generator=g)] = 1.0  # every pair has a relation
        targets.append(PairTargets(
            sub_boxes=_boxes(g, n), obj_boxes=_boxes(g, n),
            sub_labels=torch.randint(0, TE - 1, (n,), generator=g), obj_labels=torch.randint(0, TE - 1, (n,), generator=g),
            rels=rels,
        ))  # fmt: skip
    outputs = dict(layers[-1], aux=layers[:-1], rel_phrases=phrases[None].expand(B, TR, R))
    return outputs, targets


def as_reference(outputs, targets):
    layers = list(outputs["aux"]) + [{k: outputs[k] for k in ref_keys()}]
    return (
        {"layers": [{k: v.tolist() for k, v in lay.items()} for lay in layers], "rel_phrases": outputs["rel_phrases"][0].tolist()},
        [{f.name: getattr(t, f.name).tolist() for f in dataclasses.fields(t)} for t in targets],
    )  # fmt: skip


def ref_keys():
    return ("sub_boxes", "obj_boxes", "sub_logits", "obj_logits", "rel_logits")


def ref_kwargs(s: LossSettings) -> dict:
    return dict(
        bbox=s.bbox_loss_coef, giou_w=s.giou_loss_coef, obj=s.obj_loss_coef, verb=s.verb_loss_coef, eos_coef=s.eos_coef,
        cost_bbox=s.set_cost_bbox, cost_giou=s.set_cost_giou, cost_obj_class=s.set_cost_obj_class,
        cost_verb_class=s.set_cost_verb_class, aux_loss=s.aux_loss, giou_verb_label=s.giou_verb_label,
        pseudo_verb=s.pseudo_verb, threshold=s.pseudo_verb_threshold,
    )  # fmt: skip


def assert_terms_match(got: dict, want: dict):
    """Every reference term (and the total) within RTOL; the failure names the worst term."""
    worst = max(want, key=lambda k: abs(float(got[k]) - want[k]) / max(abs(want[k]), 1e-12))
    err = abs(float(got[worst]) - want[worst]) / max(abs(want[worst]), 1e-12)
    assert err <= RTOL, (
        f"worst term {worst}: got {float(got[worst])!r}, reference {want[worst]!r}, rel err {err:.2e}"
    )


def run_both(settings: LossSettings, seed: int = 0):
    outputs, targets = fixed_batch(seed)
    got = Criterion(settings)(outputs, targets)
    want = ref.reference_losses(*as_reference(outputs, targets), **ref_kwargs(settings))
    return got, want


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_term_matches_the_reference_restatement(seed):
    got, want = run_both(LossSettings(), seed)
    assert set(want) == {t + sfx for t in TERMS for sfx in ("", "_0", "_1")} | {"loss"}
    assert_terms_match(got, want)


def test_the_fixed_batch_exercises_pseudo_labels_and_unmatched_slots():
    """Guards the parity test's power: pseudo-labels are non-zero on this batch, so dropping them changes
    loss_verb_ce; with 5 slots and at most 3 pairs, "no objects" slots exist."""
    outputs, targets = fixed_batch(0)
    pl = pseudo_labels(relation_similarity(outputs["rel_phrases"][0]), torch.cat([t.rels for t in targets]))
    assert (pl > 0).any()
    with_pl = Criterion(LossSettings())(outputs, targets)["loss_verb_ce"]
    without = Criterion(LossSettings(pseudo_verb=False))(outputs, targets)["loss_verb_ce"]
    assert abs(float(with_pl - without)) > 1e-3


def test_summaries_add_up_to_the_total():
    got, _ = run_both(LossSettings())
    parts = got["loss_l1"] + got["loss_giou"] + got["loss_cls"] + got["loss_noobj"] + got["loss_rel"]
    torch.testing.assert_close(parts, got["loss"], rtol=1e-12, atol=0)
    torch.testing.assert_close(
        got["loss"], sum(got[t + s] for t in TERMS for s in ("", "_0", "_1")), rtol=1e-12, atol=0
    )


def test_pseudo_labels_match_the_reference():
    outputs, targets = fixed_batch(1)
    rels = torch.cat([t.rels for t in targets])
    got = pseudo_labels(relation_similarity(outputs["rel_phrases"][0]), rels, 0.3)
    want = torch.tensor(
        ref.pseudo_labels(outputs["rel_phrases"][0].tolist(), rels.tolist(), 0.3), dtype=torch.float64
    )
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-12)


def test_pseudo_labels_flow_gradient_to_the_text_features_as_the_reference():
    outputs, targets = fixed_batch(0)
    phrases = outputs["rel_phrases"].clone().requires_grad_(True)
    outputs["rel_phrases"] = phrases
    Criterion(LossSettings())(outputs, targets)["loss"].backward()
    assert phrases.grad is not None and phrases.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ each term


@pytest.mark.parametrize("weight", sorted(WEIGHT_OF))
def test_each_weight_scales_exactly_its_terms(weight):
    """Weight 0 removes exactly that weight's terms (all layers) from the total; weight x3 triples them;
    both equal the reference with that weight (matching does not depend on loss weights)."""
    base, want = run_both(LossSettings())
    names = [t + s for t in WEIGHT_OF[weight] for s in ("", "_0", "_1")]
    share = sum(want[n] for n in names)
    assert share > 0
    zero, want0 = run_both(LossSettings(**{weight: 0.0}))
    assert_terms_match(zero, want0)
    assert abs(float(base["loss"] - zero["loss"]) - share) <= RTOL * share
    three, want3 = run_both(LossSettings(**{weight: 3 * getattr(LossSettings(), weight)}))
    assert_terms_match(three, want3)
    assert abs(float(three["loss"] - base["loss"]) - 2 * share) <= RTOL * 2 * share


def test_eos_coef_weights_the_no_objects_slots():
    got, want = run_both(LossSettings(eos_coef=0.5))
    assert_terms_match(got, want)
    base, _ = run_both(LossSettings())
    assert abs(float(got["loss_obj_ce"] - base["loss_obj_ce"])) > 1e-3


def test_aux_loss_off_keeps_the_last_layer_only():
    got, want = run_both(LossSettings(aux_loss=False))
    assert set(want) == set(TERMS) | {"loss"}
    assert_terms_match(got, want)
    assert not any(k.endswith(("_0", "_1")) for k in got)
    base, want_all = run_both(LossSettings())
    aux_share = sum(v for k, v in want_all.items() if k.endswith(("_0", "_1")))
    assert abs(float(base["loss"] - got["loss"]) - aux_share) <= RTOL * aux_share


def test_quality_labels_off_is_cornernet_focal_on_hard_labels():
    got, want = run_both(LossSettings(giou_verb_label=False, pseudo_verb=False))
    assert_terms_match(got, want)
    soft, _ = run_both(LossSettings(pseudo_verb=False))
    assert abs(float(got["loss_verb_ce"] - soft["loss_verb_ce"])) > 1e-3


def test_pseudo_labels_off_matches_the_reference_without_them():
    got, want = run_both(LossSettings(pseudo_verb=False))
    assert_terms_match(got, want)


def test_matching_costs_change_the_assignment_and_still_match_the_reference():
    outputs, targets = fixed_batch(0)
    layer = {k: v.tolist() for k, v in outputs.items() if k in ref_keys()}
    tl = [{f.name: getattr(t, f.name).tolist() for f in dataclasses.fields(t)} for t in targets]
    default = {"bbox": 2.5, "giou": 1.0, "obj_class": 1.0, "verb_class": 1.0}
    class_only = {"bbox": 0.0, "giou": 0.0, "obj_class": 1.0, "verb_class": 0.0}
    a = [ref.brute_force_match(layer, i, tl[i], default)[0] for i in range(B)]
    b = [ref.brute_force_match(layer, i, tl[i], class_only)[0] for i in range(B)]
    assert [[m[:2] for m in x] for x in a] != [
        [m[:2] for m in x] for x in b
    ]  # the costs matter on this batch
    got, want = run_both(LossSettings(set_cost_bbox=0.0, set_cost_giou=0.0, set_cost_verb_class=0.0))
    assert_terms_match(got, want)


def test_padded_texts_change_nothing():
    """A padded entity / relation text (-inf logits, pad mask True) leaves every term unchanged."""
    outputs, targets = fixed_batch(0)
    want = Criterion(LossSettings())(outputs, targets)
    aux = []
    for lay in list(outputs["aux"]) + [outputs]:
        new = {k: lay[k] for k in ref_keys()}
        for k in ("sub_logits", "obj_logits", "rel_logits"):
            new[k] = torch.cat([lay[k], torch.full_like(lay[k][..., :1], float("-inf"))], -1)
        aux.append(new)
    padded = dict(aux[-1], aux=aux[:-1])
    padded["entity_pad"] = torch.tensor([[False] * TE + [True]] * B)
    padded["rel_pad"] = torch.tensor([[False] * TR + [True]] * B)
    padded["rel_phrases"] = torch.cat([outputs["rel_phrases"], torch.randn(B, 1, R, dtype=torch.float64)], 1)
    targets_p = [dataclasses.replace(t, rels=torch.cat([t.rels, torch.zeros(len(t.rels), 1, dtype=t.rels.dtype)], -1))
                 for t in targets]  # fmt: skip
    got = Criterion(LossSettings())(padded, targets_p)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12, msg=k)


def test_no_pairs_in_an_image_and_in_the_batch():
    outputs, targets = fixed_batch(0)
    empty = PairTargets(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, 4, dtype=torch.float64),
                        torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, TR, dtype=torch.float64))  # fmt: skip
    got = Criterion(LossSettings())(outputs, [targets[0], empty])
    want = ref.reference_losses(*as_reference(outputs, [targets[0], empty]), **ref_kwargs(LossSettings()))
    assert_terms_match(got, want)
    none = Criterion(LossSettings())(outputs, [empty, empty])
    assert (
        torch.isfinite(none["loss"])
        and float(none["loss_sub_bbox"]) == 0.0
        and float(none["loss_obj_ce"]) > 0
    )


def test_settings_are_validated_with_their_values():
    with pytest.raises(ValueError, match="pseudo_verb needs giou_verb_label"):
        LossSettings(giou_verb_label=False)
    with pytest.raises(ValueError, match="bbox_loss_coef must be >= 0, got -1"):
        LossSettings(bbox_loss_coef=-1)
    with pytest.raises(ValueError, match="sampling_strategy 'hard' is not one of"):
        LossSettings(sampling_strategy="hard")
    with pytest.raises(ValueError, match="all matching costs are 0"):
        LossSettings(set_cost_bbox=0, set_cost_giou=0, set_cost_obj_class=0, set_cost_verb_class=0)
    outputs, targets = fixed_batch(0)
    del outputs["rel_phrases"]
    with pytest.raises(ValueError, match="pseudo_verb needs the output 'rel_phrases'"):
        Criterion(LossSettings())(outputs, targets)


def test_defaults_are_the_reference_pretraining_flags():
    s = LossSettings()
    assert (s.bbox_loss_coef, s.giou_loss_coef, s.obj_loss_coef, s.verb_loss_coef, s.eos_coef) == (
        2.5,
        1,
        1,
        1,
        0.1,
    )
    assert (s.set_cost_bbox, s.set_cost_giou, s.set_cost_obj_class, s.set_cost_verb_class) == (2.5, 1, 1, 1)
    assert s.aux_loss and s.lang_aux_loss and s.giou_verb_label and s.pseudo_verb
    assert (s.pseudo_verb_threshold, s.negative_text_sampling, s.sampling_strategy) == (0.3, 500, "freq")


# ------------------------------------------------------------------------------------------------ label sequence

VOCAB = ["on", "has", "near", "holding", "wearing", "behind"]
COUNTS = [50, 20, 10, 10, 5, 5]


def test_split_lengths_is_the_reference_two_thirds():
    assert split_lengths(500) == (333, 167)
    assert split_lengths(0) == (0, 0)


def test_negative_texts_are_seeded():
    def draw(seed):
        return extend_texts(["near"], 4, VOCAB, COUNTS, "freq", torch.Generator().manual_seed(seed))

    assert draw(0) == draw(0)
    # pinned, checked by hand: cumulative shares on .5, has .7, near .8, holding .9, wearing .95, behind 1; seed 0
    # draws u = .970 (behind), .708 (near: present, drawn again), .459 (on), .921 (wearing)
    assert draw(0) == ["near", "behind", "on", "wearing"]
    assert draw(1) == ["near", "on", "has", "wearing"]
    got = {tuple(draw(s)) for s in range(20)}
    assert len(got) > 1 and all(t[0] == "near" and len(set(t)) == 4 for t in got)
    rnd = extend_texts([], 3, VOCAB, COUNTS, "random", torch.Generator().manual_seed(0))
    assert rnd == extend_texts([], 3, VOCAB, COUNTS, "random", torch.Generator().manual_seed(0))
    assert rnd == ["behind", "wearing", "near"]  # pinned: floor(6u) for u = .970, .708, .459


def test_frequency_sampling_follows_the_counts():
    g = torch.Generator().manual_seed(0)
    firsts = [extend_texts([], 1, VOCAB, COUNTS, "freq", g)[0] for _ in range(2000)]
    share = firsts.count("on") / len(firsts)
    assert abs(share - 50 / 100) < 0.04, share
    assert firsts.count("behind") < firsts.count("has")


def test_a_small_vocabulary_is_appended_whole_instead_of_looping():
    assert extend_texts(["x"], 10, VOCAB, COUNTS) == ["x"] + VOCAB
    assert extend_texts(VOCAB, 3, VOCAB, COUNTS) == VOCAB  # already long enough: unchanged


def test_batch_texts_merge_first_seen_then_extend():
    freq = {"object_names": ["man", "hat", "dog"], "object_freq": {"man": 3, "hat": 2, "dog": 1},
            "relationship_names": VOCAB, "relationship_freq": dict(zip(VOCAB, COUNTS))}  # fmt: skip
    ents, rels = batch_texts([["hat", "man"], ["man", "cup"]], [["on"], ["near", "on"]])
    assert (ents, rels) == (["hat", "man", "cup"], ["on", "near"])
    g = torch.Generator().manual_seed(3)
    ents, rels = batch_texts([["hat"], ["cup"]], [["near"]], freq, 9, "freq", g)
    assert split_lengths(9) == (6, 3)
    assert ents[:2] == ["hat", "cup"] and set(ents) == {"hat", "cup", "man", "dog"}  # vocabulary exhausted
    assert rels[0] == "near" and len(rels) == 3 and len(set(rels)) == 3


def test_make_batch_shares_extended_texts_in_pretraining_mode():
    from types import SimpleNamespace

    from models.rlipv2.data import load_vg
    from models.rlipv2.train import make_batch, tiny_config

    vg = os.path.join(os.path.dirname(__file__), "..", "examples", "vg_tiny", "relationships.json")
    images = load_vg(vg)[:2]
    freq = text_frequencies(load_vg(vg))
    preds = list(dict.fromkeys(r.predicate for im in images for r in im.relationships))
    model = SimpleNamespace(cfg=tiny_config(entity_names=[]))

    def build(seed):
        return make_batch(model, images, os.path.dirname(vg), preds, torch.Generator().manual_seed(seed),
                          denoise=False, frequencies=freq, negative_texts=12)  # fmt: skip

    a, b = build(0), build(0)
    assert a.entity_texts == b.entity_texts and a.rel_texts == b.rel_texts
    n_ent, n_rel = split_lengths(12)
    assert a.entity_texts[0] == a.entity_texts[1] and a.entity_texts[0][-1] == "no objects"
    assert len(a.entity_texts[0]) == min(n_ent, len(freq["object_names"])) + 1
    assert a.rel_texts[0] == a.rel_texts[1] and a.rel_texts[0][: len(preds)] == preds
    assert len(a.rel_texts[0]) == min(max(n_rel, len(preds)), len(freq["relationship_names"]))
    for i, im in enumerate(images):  # labels index the shared texts
        names = {o.object_id: o.name for o in im.objects}
        pairs = sorted({(r.subject_id, r.object_id) for r in im.relationships})
        for p, (s, o) in enumerate(pairs):
            assert a.entity_texts[i][int(a.tgt_sub_labels[i, p])] == names[s]
            assert a.entity_texts[i][int(a.tgt_obj_labels[i, p])] == names[o]
    tagger = make_batch(model, images, os.path.dirname(vg), preds, torch.Generator().manual_seed(0))
    assert tagger.entity_texts[0] != tagger.entity_texts[1]  # R-Tagger mode keeps each image's own labels


# ------------------------------------------------------------------------------------------------ the model's side


@pytest.fixture(scope="module")
def tiny_model():
    from models.rlipv2.model import RLIPv2ParSeD
    from models.rlipv2.tokenizer import build_word_tokenizer
    from models.rlipv2.train import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(entity_names=[], n_q=4)
    tok = build_word_tokenizer(["person", "horse", "cup", "riding on", "holding", "near", cfg.no_object_text])
    return RLIPv2ParSeD(cfg, tok).eval()


def _encode(model):
    g = torch.Generator().manual_seed(0)
    px = torch.randn(2, 3, 64, 96, generator=g)
    mask = torch.zeros(2, 64, 96, dtype=torch.bool)
    ents = [["person", "horse", "cup", "no objects"]] * 2
    rels = [["riding on", "holding", "near"]] * 2
    with torch.no_grad():
        return model.encode(px, mask, ents, rels)


def test_lang_aux_scores_layer_l_against_fusion_round_l(tiny_model):
    state = _encode(tiny_model)
    idx = torch.arange(2)
    with torch.no_grad():
        on = tiny_model.decode(state, idx, all_layers=True, lang_aux=True)
        off = tiny_model.decode(state, idx, all_layers=True, lang_aux=False)
        torch.testing.assert_close(
            on.rel_logits, off.rel_logits, rtol=0, atol=0
        )  # the last layer reads the last round
        assert not torch.allclose(on.aux[0]["rel_logits"], off.aux[0]["rel_logits"])
        # every round replaced by the last one: the routing no longer matters
        flat = dataclasses.replace(state, text=state.text[-1:].expand_as(state.text).clone())
        flat_on = tiny_model.decode(flat, idx, all_layers=True, lang_aux=True)
    for a, b in zip(flat_on.aux, off.aux):
        for k in ("sub_logits", "obj_logits", "rel_logits"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_model_outputs_feed_the_criterion_with_pre_fusion_phrases(tiny_model):
    from models.rlipv2.train import model_outputs

    state = _encode(tiny_model)
    idx = torch.arange(2)
    with torch.no_grad():
        out = model_outputs(tiny_model.decode(state, idx, all_layers=True), state, idx)
        pooled = tiny_model.phrase_features(["riding on", "holding", "near"], use_cache=False)
    assert len(out["aux"]) == tiny_model.cfg.dec_layers - 1
    torch.testing.assert_close(out["rel_phrases"][1], pooled)  # before fusion, not resized
    assert not out["entity_pad"].any() and not out["rel_pad"].any()
    t = PairTargets(torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.tensor([[0.4, 0.6, 0.3, 0.2]]),
                    torch.tensor([0]), torch.tensor([1]), torch.tensor([[1.0, 0.0, 0.0]]))  # fmt: skip
    terms = Criterion(LossSettings())(out, [t, t])
    assert torch.isfinite(terms["loss"]) and "loss_verb_ce_1" in terms


def test_gradcheck_in_double():
    """Analytic gradients of the total against finite differences (float64): logits and the pre-fusion phrases
    with the default objective; boxes without the quality labels (those are read without gradient, as the
    reference reads them from its no-grad matcher, so finite differences would see them move)."""
    outputs, targets = fixed_batch(0)

    def total(settings, **over):
        return lambda *xs: Criterion(settings)(dict(outputs, **dict(zip(over, xs))), targets)["loss"]

    keys = ("sub_logits", "rel_logits", "rel_phrases")
    xs = [outputs[k].clone().requires_grad_(True) for k in keys]
    assert torch.autograd.gradcheck(
        total(LossSettings(), **dict.fromkeys(keys)), xs, eps=1e-6, atol=1e-6, fast_mode=True
    )
    keys = ("sub_boxes", "obj_boxes")
    xs = [outputs[k].clone().requires_grad_(True) for k in keys]
    hard = LossSettings(giou_verb_label=False, pseudo_verb=False)
    assert torch.autograd.gradcheck(
        total(hard, **dict.fromkeys(keys)), xs, eps=1e-6, atol=1e-6, fast_mode=True
    )


def test_images_with_their_own_relation_features_get_their_own_pseudo_labels():
    """reltag's per-image texts: image 1's pseudo-labels come from its own features, not image 0's (the
    similarity matrix is reused only when an image's valid features equal the previous image's)."""
    outputs, targets = fixed_batch(0)
    other = torch.randn(TR, R, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    own = pseudo_labels(relation_similarity(other), targets[1].rels)
    shared = pseudo_labels(relation_similarity(outputs["rel_phrases"][0]), targets[1].rels)
    assert not torch.equal(own, shared)
    mixed = dict(outputs, rel_phrases=torch.stack([outputs["rel_phrases"][0], other]))
    got = Criterion(LossSettings())(mixed, targets)["loss_verb_ce"]
    base = Criterion(LossSettings())(outputs, targets)["loss_verb_ce"]
    assert abs(float(got - base)) > 1e-6
    # and image 0 alone is unaffected by image 1's features: swap them and image 0's labels follow its own
    swapped = dict(outputs, rel_phrases=torch.stack([other, outputs["rel_phrases"][0]]))
    assert abs(float(Criterion(LossSettings())(swapped, targets)["loss_verb_ce"] - got)) > 1e-6


@pytest.mark.parametrize("kind", ["parsed", "parseda"])
def test_both_models_train_through_the_same_outputs(kind):
    """RLIPv2-ParSeD and RLIPv2-ParSeDA: detect_loss gives finite terms on every layer, and the aux losses reach
    parameters the last layer alone does not (the earlier layers' box heads)."""
    from models.rlipv2.checkpoint import MODELS
    from models.rlipv2.data import load_vg
    from models.rlipv2.tokenizer import build_word_tokenizer
    from models.rlipv2.train import detect_loss, make_batch, tiny_config

    vg = os.path.join(os.path.dirname(__file__), "..", "examples", "vg_tiny", "relationships.json")
    every = load_vg(vg)
    freq = text_frequencies(every)
    cfg_cls, model_cls = MODELS[kind]
    cfg = cfg_cls.from_dict(tiny_config(entity_names=[], n_q=8).to_dict())
    torch.manual_seed(0)
    model = model_cls(
        cfg, build_word_tokenizer(freq["object_names"] + freq["relationship_names"] + ["no objects"])
    )
    model.train()
    images = every[:2]
    preds = list(dict.fromkeys(r.predicate for im in images for r in im.relationships))
    batch = make_batch(model, images, os.path.dirname(vg), preds, torch.Generator().manual_seed(0), denoise=False,
                       frequencies=freq, negative_texts=12)  # fmt: skip

    def grads(settings):
        model.zero_grad(set_to_none=True)
        terms = detect_loss(model, batch, settings)
        assert all(torch.isfinite(v) for v in terms.values()), {k: float(v) for k, v in terms.items()}
        terms["loss"].backward()
        return terms, {
            n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
        }

    terms, with_aux = grads(LossSettings())
    assert {f"loss_verb_ce_{i}" for i in range(cfg.dec_layers - 1)} <= set(terms)
    _, last_only = grads(LossSettings(aux_loss=False))
    assert last_only < with_aux, sorted(with_aux - last_only)[:5]
    assert any("text_encoder" in n for n in with_aux)
