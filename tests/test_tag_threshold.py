"""Greedy overlap tagger (paper Table 5) and the confidence threshold."""

from __future__ import annotations

import math

import pytest

from storage.records import Box, Candidate, ImageRecord, TaggedRelation
from storage.rules import boxes_overlap
from tasks.config import ThresholdConfig
from tasks.stages.tag.common import rank_within_pairs, tag_greedy
from tasks.stages.threshold import confidence, threshold_batch

IM = ImageRecord(
    1,
    "a.jpg",
    100,
    100,
    0,
    [
        Box(1, 1, "Person", 0, 0, 50, 50),
        Box(2, 3, "Chair", 40, 40, 30, 30),
        Box(3, 3, "Chair", 80, 80, 10, 10),
    ],
)


def _cand(s, o, rel, caps=(0,)):
    return Candidate(
        1, s, o, 1, 3, "Person", "Chair", rel, rel, list(caps), len(caps), "name", "person", "name", "chair"
    )


def test_boxes_overlap_needs_positive_area():
    a = Box(1, 1, "a", 0, 0, 10, 10)
    assert boxes_overlap(a, Box(2, 1, "b", 9, 9, 5, 5))
    assert not boxes_overlap(a, Box(2, 1, "b", 10, 0, 5, 5))  # touching edges share no area


def test_greedy_assigns_relations_and_scores_overlap():
    rows, stats = tag_greedy(
        [IM], [_cand(1, 2, "sitting on", (0, 2)), _cand(1, 2, "next to"), _cand(1, 3, "sitting on")]
    )
    by = {(r.object_ann_id, r.relation): r for r in rows}
    assert by[(2, "sitting on")].confidence == 1.0 and by[(2, "next to")].confidence == 1.0
    assert by[(3, "sitting on")].p_relation == 0.0 and by[(3, "sitting on")].confidence == 0.0
    # rank within the pair: equal confidence -> more supporting captions first
    assert by[(2, "sitting on")].relation_rank == 1 and by[(2, "next to")].relation_rank == 2
    assert stats == {"pairs": 2, "overlapping_pairs": 1, "forwards": 0}
    assert all(r.tagger == "greedy_overlap" for r in rows)


def test_greedy_names_a_candidate_with_an_unknown_box():
    with pytest.raises(ValueError, match="image 1 refers to box 99"):
        tag_greedy([IM], [_cand(1, 99, "on")])


def _tag(ps, po, pr, rel="on", o=2):
    return TaggedRelation(
        1, 1, o, 1, 3, "Person", "Chair", rel, rel, [0], 1, ps, po, pr, ps * po * pr, 1, "t"
    )


def test_threshold_paper_rule_keeps_at_eta_and_rejects_below():
    tags = [_tag(1.0, 1.0, 0.2), _tag(0.4, 0.5, 0.9, rel="near"), _tag(1.0, 1.0, math.nan, rel="x")]
    acc, rej, stats = threshold_batch([IM], tags, ThresholdConfig(eta=0.2), "rk")
    assert [a.relation for a in acc] == ["on"]
    assert (
        acc[0].subject_box == [0, 0, 50, 50]
        and acc[0].object_box == [40, 40, 30, 30]
        and acc[0].run_key == "rk"
    )
    assert sorted((r.relation, r.reason) for r in rej) == [("near", "below_eta"), ("x", "nan_confidence")]
    assert (
        stats["accepted"] == 1 and stats["rejected_below_eta"] == 1 and stats["rejected_nan_confidence"] == 1
    )


def test_threshold_relation_only_rule_reproduces_the_reference_code():
    acc, rej, _ = threshold_batch(
        [IM], [_tag(0.5, 0.5, 0.9)], ThresholdConfig(eta=0.2, rule="relation_only"), "rk"
    )
    assert len(acc) == 1 and acc[0].confidence == pytest.approx(0.9) and not rej
    assert confidence(_tag(0.5, 0.5, 0.9), "paper") == pytest.approx(0.225)
    with pytest.raises(ValueError, match="unknown confidence rule 'max'"):
        confidence(_tag(1, 1, 1), "max")


def test_typed_stats_sum_counts_and_recompute_ratios():
    # (was merge_stats over raw dicts, which tasks.stats.Stats replaced: the same expectations, typed)
    from tasks.stats import Count, Max, Ratio, Stats, Tally

    a = Stats(
        relations=Count(10), relations_matched=Count(5), match_rate=Ratio(5, 10), micro_batch=Max(8),
        top_heads=Tally({"hat": 1}),
    )  # fmt: skip
    b = Stats(
        relations=Count(30), relations_matched=Count(3), match_rate=Ratio(3, 30), micro_batch=Max(4),
        top_heads=Tally({"hat": 2, "sky": 1}),
    )  # fmt: skip
    m = Stats.merge_all([a, b])
    assert m.to_json() == {
        "relations": 40,
        "relations_matched": 8,
        "match_rate": 0.2,
        "micro_batch": 8,
        "top_heads": {"hat": 3, "sky": 1},
    }


def test_rank_puts_unscored_rows_last():
    rows = [_tag(1, 1, math.nan, rel="a"), _tag(1, 1, 0.1, rel="b"), _tag(1, 1, 0.7, rel="c")]
    rank_within_pairs(rows)
    assert [(r.relation, r.relation_rank) for r in rows] == [("a", 3), ("b", 2), ("c", 1)]


def _clip(pr, rel="on", o=2):
    t = _tag(1.0, 1.0, pr, rel=rel, o=o)
    t.tagger = "clip"
    return t


def test_clip_rows_are_cut_at_clip_eta_and_the_others_at_eta():
    tags = [_clip(0.8, rel="on"), _clip(0.79, rel="near"), _tag(1.0, 1.0, 0.3, rel="by")]
    acc, rej, stats = threshold_batch([IM], tags, ThresholdConfig(), "rk")
    assert sorted(a.relation for a in acc) == ["by", "on"]  # 0.79 < 0.8 although >= eta 0.2
    assert [(r.relation, r.reason) for r in rej] == [("near", "below_eta")]
    acc, _, _ = threshold_batch([IM], tags, ThresholdConfig(clip_eta=0.5, eta=0.5), "rk")
    assert sorted(a.relation for a in acc) == ["near", "on"]


def test_overlap_filter_follows_any_tagger_with_its_reason():
    # box 1 (0,0,50,50) overlaps box 2 (40,40,30,30), not box 3 (80,80,10,10)
    tags = [_clip(0.9, rel="on", o=2), _clip(0.95, rel="near", o=3), _tag(1, 1, 0.1, rel="by", o=3)]
    acc, rej, stats = threshold_batch([IM], tags, ThresholdConfig(overlap_filter=True), "rk")
    assert [a.relation for a in acc] == ["on"]
    # the confidence cut comes first (as the reference's loader does), so "by" keeps below_eta
    assert sorted((r.relation, r.reason) for r in rej) == [("by", "below_eta"), ("near", "no_overlap")]
    assert stats["rejected_no_overlap"] == 1 and stats["rejected_below_eta"] == 1
    acc, _, _ = threshold_batch([IM], tags, ThresholdConfig(), "rk")
    assert sorted(a.relation for a in acc) == ["near", "on"]  # off by default


def test_overlap_filter_matches_the_greedy_rule():
    # the same predicate as the greedy baseline: touching edges are not an overlap
    im = ImageRecord(
        2, "b.jpg", 100, 100, 0, [Box(1, 1, "Person", 0, 0, 10, 10), Box(2, 3, "Chair", 10, 0, 5, 5)]
    )
    t = _tag(1, 1, 1.0)
    t.image_id = 2
    acc, rej, _ = threshold_batch([im], [t], ThresholdConfig(overlap_filter=True), "rk")
    assert not acc and [r.reason for r in rej] == ["no_overlap"]
    rows, _ = tag_greedy(
        [im], [Candidate(2, 1, 2, 1, 3, "Person", "Chair", "on", "on", [0], 1, "n", "", "n", "")]
    )
    assert rows[0].p_relation == 0.0


def test_top_k_keeps_the_best_relations_of_each_pair():
    tags = [
        _tag(1, 1, 0.5, rel="a"),
        _tag(1, 1, 0.9, rel="b"),
        _tag(1, 1, 0.7, rel="c"),
        _tag(1, 1, 0.1, rel="d"),  # below eta: keeps that reason, does not take a top-K place
        _tag(1, 1, 0.6, rel="e", o=3),
    ]
    acc, rej, stats = threshold_batch([IM], tags, ThresholdConfig(top_k=2), "rk")
    assert sorted((a.object_ann_id, a.relation) for a in acc) == [(2, "b"), (2, "c"), (3, "e")]
    assert sorted((r.relation, r.reason) for r in rej) == [("a", "beyond_top_k"), ("d", "below_eta")]
    assert stats["rejected_beyond_top_k"] == 1
    # ties: more supporting captions first, then text
    t1, t2 = _tag(1, 1, 0.5, rel="x"), _tag(1, 1, 0.5, rel="w")
    t1.caption_ids, t1.n_captions = [0, 1], 2
    acc, _, _ = threshold_batch([IM], [t2, t1], ThresholdConfig(top_k=1), "rk")
    assert [a.relation for a in acc] == ["x"]
    # top-K ranks by the threshold rule's confidence: relation_only ignores p_subject * p_object
    acc, _, _ = threshold_batch(
        [IM],
        [_tag(0.3, 1, 0.9, rel="p"), _tag(1, 1, 0.5, rel="q")],
        ThresholdConfig(top_k=1, rule="relation_only"),
        "rk",
    )
    assert [a.relation for a in acc] == ["p"]
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        ThresholdConfig(top_k=0)


def test_the_configs_rule_choices_are_the_rules_storage_applies():
    import typing

    from storage.rules import RULES
    from tasks.config import ThresholdConfig

    assert (
        set(typing.get_args(ThresholdConfig.model_fields["rule"].annotation))
        == set(RULES)
        == {"paper", "relation_only"}
    )


def test_the_configs_tagger_choices_are_the_registered_taggers():
    import typing

    from tasks.config import TagConfig
    from tasks.stages.tag import TAGGERS

    assert set(typing.get_args(TagConfig.model_fields["tagger"].annotation)) == set(TAGGERS)
    assert set(TAGGERS) == {"greedy_overlap", "rtagger", "clip"}
