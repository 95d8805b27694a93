"""tasks.stages.tag.rtagger: the R-Tagger stage over records (grouping, factors, text modes, loading, validation)."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import pytest
import torch
from PIL import Image

from models.rlipv2.boxes import xywh_pixels_to_cxcywh
from models.rlipv2.checkpoint import save_checkpoint
from models.rlipv2.model import RLIPv2ParSeD
from models.rlipv2.tokenizer import build_word_tokenizer
from models.rlipv2.train import tiny_config
from storage.records import Box, Candidate, ImageRecord
from tasks.config import TagConfig
from tasks.stages.tag.rtagger import RTaggerRunner, tag_batch_rtagger

LABELS = ["person", "horse", "dog", "table", "cup", "car"]
RELS = ["riding on", "next to", "holding", "near", "behind"]


@pytest.fixture(scope="module")
def runner():
    torch.manual_seed(0)
    cfg = tiny_config()
    tok = build_word_tokenizer(LABELS + RELS + [cfg.no_object_text])
    return RTaggerRunner(RLIPv2ParSeD(cfg, tok), "tiny-in-memory")  # an in-memory model: any revision name


def _image(image_id: int, n_boxes: int, width=160, height=120, seed=0) -> tuple[ImageRecord, Image.Image]:
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for k in range(n_boxes):
        x, y = (torch.rand(2, generator=g) * torch.tensor([width * 0.6, height * 0.6])).tolist()
        w, h = (torch.rand(2, generator=g) * torch.tensor([width * 0.3, height * 0.3]) + 4).tolist()
        label = LABELS[k % len(LABELS)]
        boxes.append(Box(100 * image_id + k, LABELS.index(label) + 1, label, x, y, w, h))
    arr = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return ImageRecord(image_id, f"img{image_id}.jpg", width, height, 0, boxes), Image.fromarray(arr)


def _candidates(im: ImageRecord, n_pairs: int, texts_per_pair=(1, 2)) -> list[Candidate]:
    pairs = [(a, b) for a in im.boxes for b in im.boxes if a.ann_id != b.ann_id][:n_pairs]
    assert len(pairs) == n_pairs
    out = []
    for k, (a, b) in enumerate(pairs):
        n_t = texts_per_pair[k % len(texts_per_pair)]
        for j in range(n_t):
            rel = RELS[(k + j) % len(RELS)]
            out.append(
                Candidate(
                    im.image_id,
                    a.ann_id,
                    b.ann_id,
                    a.category_id,
                    b.category_id,
                    a.label,
                    b.label,
                    rel,
                    rel.split()[0],
                    [k % 3],
                    1,
                    "name",
                    "",
                    "name",
                    "",
                )  # fmt: skip
            )
    return out


def test_250_pairs_run_in_3_forwards_every_pair_once(runner):
    im, px = _image(1, 17)  # 17 boxes: 272 ordered pairs, 250 used
    cands = _candidates(im, 250)
    cfg = TagConfig(tagger="rtagger", n_q=100)
    rows, stats = tag_batch_rtagger([im], [px], cands, runner, cfg)
    assert stats["forwards"] == 3 and stats["encoder_passes"] == 1 and stats["groups"] == 3
    assert (
        stats["pairs"] == 250 and stats["forwards_per_image"] == 3.0 and stats["pairs_per_forward"] == 83.3333
    )
    # matched mode: one row per candidate, every (pair, text) exactly once
    keys = Counter((r.subject_ann_id, r.object_ann_id, r.relation) for r in rows)
    assert set(keys) == {(c.subject_ann_id, c.object_ann_id, c.relation) for c in cands}
    assert max(keys.values()) == 1 and len(rows) == len(cands)
    assert len({(r.subject_ann_id, r.object_ann_id) for r in rows}) == 250


def test_factors_in_unit_interval_confidence_product_and_ranks(runner):
    im, px = _image(2, 6, seed=2)
    cands = _candidates(im, 20, texts_per_pair=(1, 2, 3))
    rows, _ = tag_batch_rtagger([im], [px], cands, runner, TagConfig(tagger="rtagger", n_q=8))
    assert rows
    for r in rows:
        for p in (r.p_subject, r.p_object, r.p_relation, r.confidence):
            assert 0.0 <= p <= 1.0
        assert r.confidence == r.p_subject * r.p_object * r.p_relation
        assert r.tagger == "rtagger"
    by_pair = defaultdict(list)
    for r in rows:
        by_pair[(r.subject_ann_id, r.object_ann_id)].append(r)
    for group in by_pair.values():
        assert sorted(r.relation_rank for r in group) == list(range(1, len(group) + 1))
        best = min(group, key=lambda r: r.relation_rank)
        assert best.confidence == max(r.confidence for r in group)
    # provenance is carried through
    c0 = cands[0]
    r0 = next(
        r
        for r in rows
        if (r.subject_ann_id, r.object_ann_id, r.relation)
        == (c0.subject_ann_id, c0.object_ann_id, c0.relation)
    )
    assert r0.caption_ids == c0.caption_ids and r0.relation_lemma == c0.relation_lemma


def test_texts_all_scores_every_image_text_and_agrees_with_matched(runner):
    im, px = _image(3, 5, seed=3)
    cands = _candidates(im, 12, texts_per_pair=(1, 2))
    matched, _ = tag_batch_rtagger([im], [px], cands, runner, TagConfig(tagger="rtagger", texts="matched"))
    every, _ = tag_batch_rtagger([im], [px], cands, runner, TagConfig(tagger="rtagger", texts="all"))
    texts = {c.relation for c in cands}
    assert len(every) == 12 * len(texts)
    by_key = {(r.subject_ann_id, r.object_ann_id, r.relation): r for r in every}
    for r in matched:
        e = by_key[(r.subject_ann_id, r.object_ann_id, r.relation)]
        assert (e.p_subject, e.p_object, e.p_relation, e.caption_ids) == (
            r.p_subject,
            r.p_object,
            r.p_relation,
            r.caption_ids,
        )
    unmatched = [r for r in every if not r.caption_ids]
    assert len(unmatched) == len(every) - len(matched) and all(r.n_captions == 0 for r in unmatched)


def test_images_batched_and_phrases_cached(runner):
    recs = [_image(10 + k, 4, seed=10 + k) for k in range(3)]
    cands = [c for im, _ in recs for c in _candidates(im, 6)]
    cfg = TagConfig(tagger="rtagger")
    runner.model.phrase_cache.clear()
    rows, stats = tag_batch_rtagger([r[0] for r in recs], [r[1] for r in recs], cands, runner, cfg)
    assert (
        stats["images"] == 3
        and stats["images_in_batch"] == 3
        and stats["encoder_passes"] == 3
        and stats["forwards"] == 3
    )
    assert stats["phrase_cache_hits"] > 0  # later images reuse the first one's phrases
    _, again = tag_batch_rtagger([r[0] for r in recs], [r[1] for r in recs], cands, runner, cfg)
    assert again["phrase_cache_misses"] == 0
    assert {r.image_id for r in rows} == {10, 11, 12}


def test_validation_errors_name_the_record(runner):
    im, px = _image(4, 4, seed=4)
    cands = _candidates(im, 3)
    cfg = TagConfig(tagger="rtagger")
    with pytest.raises(ValueError, match="2 image records but 1 decoded"):
        tag_batch_rtagger([im, im], [px], cands, runner, cfg)
    with pytest.raises(ValueError, match=r"image 4 \(img4.jpg\): decoded size \(80, 60\)"):
        tag_batch_rtagger([im], [px.resize((80, 60))], cands, runner, cfg)
    bad = [
        Candidate(4, 999, im.boxes[0].ann_id, 1, 1, "x", "y", "near", "near", [0], 1, "name", "", "name", "")
    ]
    with pytest.raises(ValueError, match="names box 999"):
        tag_batch_rtagger([im], [px], bad, runner, cfg)
    other = [Candidate(77, 1, 2, 1, 1, "x", "y", "near", "near", [0], 1, "name", "", "name", "")]
    with pytest.raises(ValueError, match="names image 77"):
        tag_batch_rtagger([im], [px], other, runner, cfg)
    rows, stats = tag_batch_rtagger([im], [px], [], runner, cfg)
    assert rows == [] and stats["forwards"] == 0


def test_from_config_needs_a_checkpoint_and_loads_once(runner, tmp_path):
    with pytest.raises(ValueError, match="TagConfig.checkpoint is None: the R-Tagger needs trained weights"):
        RTaggerRunner.from_config(TagConfig(tagger="rtagger"))
    with pytest.raises(ValueError, match="has no rlipv2_config.json"):
        RTaggerRunner.from_config(TagConfig(tagger="rtagger", checkpoint=str(tmp_path)))
    save_checkpoint(runner.model, tmp_path / "ckpt")
    cfg = TagConfig(tagger="rtagger", checkpoint=str(tmp_path / "ckpt"))
    a = RTaggerRunner.from_config(cfg)
    assert RTaggerRunner.from_config(cfg) is a
    assert a.revision.startswith("ckpt:") and len(a.revision) == 21
    im, px = _image(5, 4, seed=5)
    cands = _candidates(im, 5)
    r1, _ = tag_batch_rtagger([im], [px], cands, runner, cfg)
    r2, _ = tag_batch_rtagger([im], [px], cands, a, cfg)
    assert [(r.p_subject, r.p_relation) for r in r1] == [(r.p_subject, r.p_relation) for r in r2]
    assert not math.isnan(r1[0].confidence)


def test_bfloat16_runner_close_to_float32(runner):
    im, px = _image(6, 5, seed=6)
    cands = _candidates(im, 8)
    model16 = RLIPv2ParSeD(runner.model.cfg, runner.model.tokenizer)
    model16.load_state_dict(runner.model.state_dict())
    r16 = RTaggerRunner(model16, "test", dtype="bfloat16")
    a, _ = tag_batch_rtagger([im], [px], cands, runner, TagConfig(tagger="rtagger"))
    b, _ = tag_batch_rtagger([im], [px], cands, r16, TagConfig(tagger="rtagger", dtype="bfloat16"))
    assert [(r.subject_ann_id, r.object_ann_id, r.relation) for r in a] == [
        (r.subject_ann_id, r.object_ann_id, r.relation) for r in b
    ]
    for x, y in zip(a, b):
        assert abs(x.p_relation - y.p_relation) < 5e-3 and abs(x.p_subject - y.p_subject) < 5e-3
    with pytest.raises(ValueError, match="dtype 'float64' is not one of"):
        RTaggerRunner(model16, "test", dtype="float64")


def test_reference_grouping_slots_forwards_and_merged_texts(runner):
    """grouping 'reference': (pair, text) slots, N_Q per group, 16 groups per forward sharing the forward's
    merged texts; a row's score is its slot's score against its own text in that forward's text list."""
    from models.rlipv2.preprocess import preprocess_image
    from models.rlipv2.tagger import tag_image
    from tasks.stages.match import reference_slot_groups

    im, px = _image(7, 9, seed=7)
    cands = _candidates(
        im, 40, texts_per_pair=(1, 2, 3)
    )  # 14 x 1 + 13 x 2 + 13 x 3 = 79 (pair, text) entries
    n_q = 4
    cfg = TagConfig(tagger="rtagger", grouping="reference", n_q=n_q)
    rows, stats = tag_batch_rtagger([im], [px], cands, runner, cfg)
    groups = reference_slot_groups(cands, n_q)
    assert len(groups) == 20 and sum(len(g.slots) for g in groups) == 79
    assert stats["slots"] == 79 and stats["groups"] == 20 and stats["encoder_passes"] == 2  # 16 + 4 groups
    assert len(rows) == len(cands)  # texts "matched": one row per (pair, text) entry
    # the second forward, computed directly: groups 16..19, texts merged in first-seen order
    chunk = groups[16:]
    texts = list(dict.fromkeys(t for g in chunk for t in g.texts))
    index = {b.ann_id: k for k, b in enumerate(im.boxes)}
    slots = [s for g in chunk for s in g.slots]
    own = [g.texts[i] for g in chunk for i in g.slot_text]
    # the stage's boxes, float32 from the same float64 arithmetic
    boxes = torch.tensor([xywh_pixels_to_cxcywh(b.x, b.y, b.w, b.h, im.width, im.height) for b in im.boxes])
    scores, _ = tag_image(
        runner.model, preprocess_image(px, runner.model.cfg), boxes, [b.label for b in im.boxes],
        [(index[s], index[o]) for s, o in slots], texts, n_q=n_q, group_sizes=[len(g.slots) for g in chunk],
    )  # fmt: skip
    got = {(r.subject_ann_id, r.object_ann_id, r.relation): r for r in rows}
    # the stage's second forward, repeated: the same slots, group sizes, texts, boxes, groups per forward and
    # cached phrase features, so the same float32 computation: equal bit for bit
    for k, ((s, o), t) in enumerate(zip(slots, own)):
        r = got[(s, o, t)]
        assert r.p_relation == float(scores.p_relation[k, texts.index(t)])
        assert r.p_subject == float(scores.p_subject[k])
    # the default grouping scores the same pairs in other groups against other texts: different numbers
    rows_pairs, _ = tag_batch_rtagger([im], [px], cands, runner, TagConfig(tagger="rtagger", n_q=n_q))
    assert {(r.subject_ann_id, r.object_ann_id, r.relation) for r in rows_pairs} == set(got)


def test_vocabulary_class_keys_and_unknown_category(runner):
    """With a vocabulary the heads score its class keys (+ 'no objects') and boxes enter with their category's
    key; a category outside the vocabulary is an error naming the image and the box."""
    from models.rlipv2.preprocess import preprocess_image
    from models.rlipv2.tagger import tag_image
    from models.rlipv2.vocab import class_keys, key_for_category

    im, px = _image(8, 4, seed=8)
    cands = _candidates(im, 3)
    rows, _ = tag_batch_rtagger([im], [px], cands, runner, TagConfig(tagger="rtagger"), vocabulary="coco")
    keys = class_keys("coco")
    labels = [key_for_category("coco", b.category_id) for b in im.boxes]
    assert labels[:2] == ["person", "bicycle"]  # COCO ids 1, 2 (the test's category ids are 1..6)
    # the stage's boxes, float32 from the same float64 arithmetic
    boxes = torch.tensor([xywh_pixels_to_cxcywh(b.x, b.y, b.w, b.h, im.width, im.height) for b in im.boxes])
    index = {b.ann_id: k for k, b in enumerate(im.boxes)}
    pairs = sorted({(c.subject_ann_id, c.object_ann_id) for c in cands})
    texts = sorted({c.relation for c in cands})
    scores, _ = tag_image(
        runner.model, preprocess_image(px, runner.model.cfg), boxes, labels,
        [(index[s], index[o]) for s, o in pairs], texts, class_keys=keys,
    )  # fmt: skip
    # the stage's forward, repeated: one group of the pairs in candidate order (here sorted), the sorted texts,
    # the same boxes and class keys, so the same float32 computation: equal bit for bit
    assert pairs == list(dict.fromkeys((c.subject_ann_id, c.object_ann_id) for c in cands))
    for r in rows:
        k = pairs.index((r.subject_ann_id, r.object_ann_id))
        assert r.p_subject == float(scores.p_subject[k])
        assert r.p_relation == float(scores.p_relation[k, texts.index(r.relation)])
    # 81 entity texts: a uniform-ish softmax over them bounds the top-1 probability from below by 1/81
    assert all(r.p_subject >= 1 / 81 - 1e-6 for r in rows)
    import dataclasses

    im.boxes[0] = dataclasses.replace(im.boxes[0], category_id=12)  # COCO has no category 12
    with pytest.raises(ValueError, match=r"image 8 \(img8.jpg\) box 800: category id 12 has no class key"):
        tag_batch_rtagger([im], [px], cands, runner, TagConfig(tagger="rtagger"), vocabulary="coco")
