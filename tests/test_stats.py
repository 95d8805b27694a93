"""Typed statistics (tasks/stats/): merges in any order and grouping, the audit of a run checked against an
independent computation from its Parquet outputs."""

from __future__ import annotations

import glob
import json
import math
import os
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.matcher import Vocabulary
from storage.records import Box, ImageRecord, ParsedRelation, TaggedRelation
from tasks.audit.summary import TABLE_SCHEMAS, audit, audit_tables, classes_without_synonyms, funnel
from tasks.config import MatchConfig, ThresholdConfig
from tasks.stages.match import match_batch
from tasks.stages.threshold import sweep_counts, threshold_batch
from tasks.stats import (
    ETAS,
    SCORE_EDGES,
    Count,
    Examples,
    Group,
    Histogram,
    Label,
    Max,
    Ratio,
    Seconds,
    Stats,
    Tally,
)

# -- merging ------------------------------------------------------------------------------------------------

_words = st.sampled_from(["on", "near", "holding", "next to", "under"])
_part = st.fixed_dictionaries(
    {},
    optional={
        "n": st.integers(0, 50).map(Count),
        "m": st.integers(-5, 50).map(Max),
        "t": st.integers(0, 10**7).map(Seconds),
        "lab": st.sampled_from(["correct", "reference", {"v": 1}]).map(Label.of),
        "r": st.tuples(st.integers(0, 40), st.integers(0, 40)).map(lambda p: Ratio(*p)),
        "tally": st.dictionaries(_words, st.integers(1, 9), max_size=4).map(lambda d: Tally(d, top=2)),
        "pairs": st.dictionaries(st.tuples(_words, _words), st.integers(1, 9), max_size=4).map(
            lambda d: Tally(d, form="pairs")
        ),
        "h": st.lists(
            st.one_of(st.floats(-0.5, 1.5), st.just(math.nan), st.sampled_from(SCORE_EDGES)), max_size=8
        ).map(Histogram.of),
        "ex": st.lists(
            st.tuples(st.tuples(st.integers(0, 5), st.integers(0, 3)), st.sampled_from("abcd")), max_size=5
        ).map(lambda items: Examples.of(items, k=3)),
        "g": st.dictionaries(
            _words,
            st.lists(
                st.tuples(st.tuples(st.integers(0, 9)), st.sampled_from("xyz")), min_size=1, max_size=3
            ).map(lambda items: Examples.of(items, k=2)),
            max_size=3,
        ).map(lambda d: Group(d, hidden=True)),
    },
).map(Stats)


def _merge_tree(parts: list[Stats], rng: random.Random) -> Stats:
    """Merge in a random grouping: split at a random point, merge each side, then the two results."""
    if len(parts) <= 1:
        return parts[0] if parts else Stats()
    cut = rng.randint(1, len(parts) - 1)
    return _merge_tree(parts[:cut], rng).merge(_merge_tree(parts[cut:], rng))


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(_part, max_size=7), seed=st.integers(0, 2**32 - 1))
def test_merge_of_any_permutation_and_grouping_equals_merge_of_all(parts, seed):
    rng = random.Random(seed)
    whole = Stats.merge_all(parts)
    shuffled = list(parts)
    rng.shuffle(shuffled)
    grouped = _merge_tree(shuffled, rng)
    assert grouped.dump() == whole.dump()
    assert grouped.to_json() == whole.to_json()
    # the lossless form reads back to the same statistics, which merge on as before
    assert Stats.load(json.loads(json.dumps(whole.dump()))).dump() == whole.dump()
    # counts, histograms and tallies equal a plain sum over the parts
    if any("n" in p.names() for p in parts):
        assert whole["n"] == sum(p["n"] for p in parts if "n" in p.names())
    hs = [p.stat("h") for p in parts if p.stat("h") is not None]
    if hs:
        assert whole["h"]["counts"] == [sum(c) for c in zip(*(h.counts for h in hs))]


def test_kinds_merge_as_pinned():
    a = Stats(
        n=Count(3), m=Max(8), r=Ratio(1, 4), t=Tally({"on": 2, "near": 1}, top=1), lab=Label.of("correct"),
        s=Seconds.of(0.25),
    )  # fmt: skip
    b = Stats(n=Count(4), m=Max(2), r=Ratio(2, 2), t=Tally({"near": 5}, top=1), lab=Label.of("reference"))
    m = a.merge(b)
    assert m.to_json() == {
        "n": 7, "m": 8, "r": 0.5, "t": {"near": 6}, "lab": ["correct", "reference"], "s": 0.25,
    }  # fmt: skip
    assert m.stat("t").counts == {"on": 2, "near": 6}  # every key kept; the view shows the top 1
    assert Stats(r=Ratio(0, 0))["r"] == 0.0
    assert Stats(r=Ratio(2, 3))["r"] == 0.6667


def test_merging_different_kinds_names_the_statistic():
    with pytest.raises(ValueError, match="statistic 'x': cannot merge a count with a max"):
        Stats(x=Count(1)).merge(Stats(x=Max(1)))
    with pytest.raises(ValueError, match="cannot merge histograms with edges"):
        Histogram.of([0.5]).merge(Histogram.of([0.5], edges=(0.0, 1.0)))
    with pytest.raises(ValueError, match="Count must be an int, got 1.5"):
        Count(1.5)


def test_untyped_stats_are_refused_with_the_record_named():
    with pytest.raises(ValueError, match=r"ledger record caption/x: statistic 'captions' is 19, not a typed"):
        Stats.load({"captions": 19}, "ledger record caption/x")


def test_histogram_bins_are_half_open_and_the_last_closed():
    h = Histogram.of([0.0, 0.049, 0.05, 0.5, 0.9999, 1.0, math.nan, 1.5, -0.1])
    assert h.counts[0] == 2 and h.counts[1] == 1 and h.counts[10] == 1 and h.counts[19] == 2
    assert sum(h.counts) == 6 and h.nan == 1 and h.outside == 2
    assert h.view()["edges"] == [round(0.05 * k, 2) for k in range(21)] and len(h.view()["counts"]) == 20


def test_examples_keep_the_first_by_key_not_by_arrival():
    late = Examples.of([((9, 0), "z"), ((1, 2), "b")], k=2)
    early = Examples.of([((1, 0), "a"), ((5, 5), "y")], k=2)
    assert late.merge(early).view() == early.merge(late).view() == ["a", "b"]


def test_hidden_statistics_merge_but_stay_out_of_the_view():
    s = Stats(n=Count(1), g=Group({"x": Count(2)}, hidden=True))
    assert s.to_json() == {"n": 1} and dict(s) == {"n": 1} and s["g"] == {"x": 2}
    assert set(s.names()) == {"n", "g"} and "g" in s.dump()


# -- the stages' statistics ---------------------------------------------------------------------------------


def _img(image_id, boxes):
    return ImageRecord(
        image_id, f"{image_id}.jpg", 640, 480, 0, [Box(a, c, lab, *xywh) for a, c, lab, xywh in boxes]
    )


def _rel(image_id, cid, s, rel, o):
    return ParsedRelation(image_id, cid, s, s.split()[-1], rel, rel, o, o.split()[-1])


def test_match_stats_count_unmatched_nouns_with_their_first_captions():
    vocab = Vocabulary.load("o365")
    im1 = _img(1, [(10, 1, "Person", (0, 0, 10, 10)), (11, 3, "Chair", (0, 0, 10, 10))])
    im2 = _img(2, [(20, 1, "Person", (0, 0, 10, 10))])
    rels = [
        _rel(2, 1, "a blorft", "on", "a chair"),  # subject names no class, no chair in image 2: both fail
        _rel(1, 3, "a man", "near", "a blorft"),  # object names no class
        _rel(1, 0, "a blorft", "under", "a zorp"),  # both sides name no class
        _rel(1, 1, "a man", "on", "a chair"),  # matched, one pair
        _rel(2, 0, "a man", "next to", "a man"),  # matched, one person box: no pair
        _rel(2, 2, "a man", "on", "a chair"),  # a chair, but not in image 2
    ]
    texts = {(r.image_id, r.caption_id): f"caption {r.image_id}/{r.caption_id}" for r in rels}
    out = match_batch([im1, im2], rels, MatchConfig(), vocab, texts)
    s = out.stats
    assert s["relations_unmatched"] == {"no_object_match": 2, "no_match_either": 2}
    assert s["entity_unmatched"] == {"no_class": 4, "class_not_in_image": 2}
    assert s["relations_matched"] == 2 and s["relations_without_pairs"] == 1 and s["pairs"] == 1
    assert s["relations_with_candidates"] == 1 and s["yield_rate"] == 0.1667  # 1 of 6, as the view rounds it
    assert s["top_unmatched_heads"] == [["blorft", 3], ["zorp", 1]]
    assert "unmatched_examples" not in s  # hidden: in the run's audit only
    # examples: the first 3 by (image_id, caption_id), whatever the order of the relations
    nouns = audit({"match": s}, None, [])["unmatched_nouns"]
    assert nouns == [
        {"noun": "blorft", "count": 3, "examples": ["caption 1/0", "caption 1/3", "caption 2/1"]},
        {"noun": "zorp", "count": 1, "examples": ["caption 1/0"]},
    ]
    # the same relations split over two batches of one image each merge to the same statistics
    parts = [
        match_batch([im], [r for r in rels if r.image_id == im.image_id], MatchConfig(), vocab, texts).stats
        for im in (im2, im1)
    ]
    assert Stats.merge_all(parts).dump() == s.dump()


def _tag(image_id, o, ps, po, pr, rel, tagger="t", s=1):
    return TaggedRelation(image_id, s, o, 1, 3, "Person", "Chair", rel, rel + "-lemma", [0], 1, ps, po, pr,
                          ps * po * pr, 1, tagger)  # fmt: skip


_IMAGES = [
    _img(
        i,
        [
            (1, 1, "Person", (0, 0, 50, 50)),
            (2, 3, "Chair", (40, 40, 30, 30)),
            (3, 3, "Chair", (80, 80, 10, 10)),
        ],
    )
    for i in (1, 2, 3)
]

_p = st.one_of(st.floats(0, 1), st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.5, 1.0]))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from([2, 3]), _p, _p, _p, st.sampled_from("abcd")),
        max_size=25,
        unique_by=lambda r: (r[0], r[1], r[5]),
    ),
    overlap=st.booleans(),
    top_k=st.sampled_from([None, 1, 2]),
)
def test_eta_sweep_equals_the_threshold_stage_run_at_each_eta(rows, overlap, top_k):
    tags = [_tag(i, o, ps, po, pr, rel) for i, o, ps, po, pr, rel in rows]
    cfg = ThresholdConfig(overlap_filter=overlap, top_k=top_k)
    triplets, images = sweep_counts(_IMAGES, tags, cfg)
    for rule in ("paper", "relation_only"):
        for eta in ETAS:
            cut = cfg.model_copy(update={"eta": eta, "rule": rule})
            acc, _, _ = threshold_batch(_IMAGES, tags, cut, "rk")
            key = (rule, f"{eta:.2f}")
            assert (triplets[key], images[key]) == (len(acc), len({a.image_id for a in acc})), key


def test_threshold_audit_stats_pinned():
    tags = [
        _tag(1, 2, 1.0, 0.5, 0.5, "on"),  # paper 0.25, relation_only 0.5
        _tag(1, 2, 1.0, 1.0, 0.1, "near"),  # 0.1 / 0.1
        _tag(2, 3, 0.9, 1.0, 1.0, "on"),  # 0.9 / 1.0
        _tag(2, 3, 1.0, 1.0, math.nan, "under"),  # NaN: never accepted, counted apart in the histograms
    ]
    acc, rej, s = threshold_batch(_IMAGES, tags, ThresholdConfig(eta=0.2), "rk")
    assert s["accepted"] == 2 and s["reject_reasons"] == {"below_eta": 1, "nan_confidence": 1}
    assert s["relation_lemmas"] == {"on-lemma": 2}
    assert s.stat("class_pairs").counts == {("Person", "Chair"): 2}
    conf = s["hist_confidence"]
    assert conf["counts"][2] == 1 and conf["counts"][5] == 1 and conf["counts"][18] == 1 and conf["nan"] == 1
    assert s["hist_p_subject"]["counts"][18] == 1 and s["hist_p_subject"]["counts"][19] == 3
    a = audit({"threshold": s}, None, [])
    sweep = {(r["rule"], r["eta"]): (r["triplets"], r["images"]) for r in a["eta_sweep"]}
    assert (
        sweep[("paper", 0.2)] == (2, 2)
        and sweep[("paper", 0.3)] == (1, 1)
        and sweep[("paper", 0.95)] == (0, 0)
    )
    assert sweep[("relation_only", 0.5)] == (2, 2) and sweep[("relation_only", 0.95)] == (1, 1)
    assert sweep[("relation_only", 0.1)] == (3, 2)
    assert len(a["eta_sweep"]) == 38 and a["class_pair_histogram"] == [["Person", "Chair", 2]]


def test_funnel_rows_and_drops_pinned():
    stages = {
        "shard": Stats(images=Count(5)),
        "verify": Stats(verified=Count(4), quarantine_reasons=Tally({"decode_error": 1})),
        "caption": Stats(
            captions=Count(19),
            unique_captions=Count(17),
            images_without_captions=Count(1),
            quarantine_reasons=Tally({"unreadable_image": 1}),
        ),  # fmt: skip
        "parse": Stats(
            relations=Count(30), captions_not_parsed=Count(1), captions_without_relations=Count(2)
        ),
        "match": Stats(
            relations_matched=Count(12),
            pairs=Count(9),
            relations_without_pairs=Count(1),
            relations_unmatched=Tally({"no_subject_match": 10, "no_object_match": 8}),
        ),  # fmt: skip
        "tag": Stats(tag_rows=Count(11)),
        "threshold": Stats(accepted=Count(7), reject_reasons=Tally({"below_eta": 4})),
    }
    f = funnel(
        stages,
        {
            "quarantined_duplicate_image_id": 2,
            "quarantined_bbox_outside_image": 3,
            "quarantined_missing_file": 1,
        },
    )
    assert [(r["stage"], r["count"], r["dropped"]) for r in f] == [
        ("images", 5, {"duplicate_image_id": 2, "missing_file": 1}),  # not the boxes' bbox_outside_image
        ("verified", 4, {"decode_error": 1}),
        ("captions", 19, {"no_captions": 1, "unreadable_image": 1}),
        ("unique_captions", 17, {"duplicate": 2}),
        ("relations", 30, {"no_relation": 2, "not_parsed": 1}),
        ("matched", 12, {"no_subject_match": 10, "no_object_match": 8}),
        ("candidate_pairs", 9, {"no_distinct_box_pair": 1}),
        ("region_captions", 0, {}),  # the region stage: no statistics given here
        ("region_relations", 0, {}),
        ("region_new_candidates", 0, {}),
        ("tagged", 11, {}),
        ("accepted", 7, {"below_eta": 4}),
    ]
    assert f[0]["label"] == "images (planned)"


def test_classes_without_synonyms_lists_names_with_no_list():
    cats = [{"id": 1, "name": "Person"}, {"id": 2, "name": "blorft machine"}, {"id": 3, "name": "Chair"}]
    assert classes_without_synonyms(Vocabulary.from_categories(cats, "o365")) == ["blorft machine"]


def test_audit_tables_have_their_schemas_even_when_empty():
    tables = audit_tables(audit({}, None, []))
    assert set(tables) == set(TABLE_SCHEMAS)
    assert all(t.schema.equals(TABLE_SCHEMAS[n]) for n, t in tables.items())
    assert tables["eta_sweep"].num_rows == 38 and tables["score_histograms"].num_rows == 80
    assert tables["funnel"].column("stage").to_pylist()[0] == "images"


# -- a real labelling, checked against the Parquet outputs ------------------------------------------------


EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _label(tmp_path, name, **plan):
    from flows.label import label_dataset
    from flows.params import LabelParams
    from tasks.config import PipelineConfig

    cfg = {"dataset": "sample", "threshold": {"top_k": 1}}
    if plan:
        cfg["plan"] = plan
    params = LabelParams(
        annotations=os.path.join(EXAMPLES, "sample_detections.json"),
        images=os.path.join(EXAMPLES, "images"),
        captions=os.path.join(EXAMPLES, "sample_captions.json"),
        out=str(tmp_path / name),
        config=PipelineConfig.model_validate(cfg),
    )
    return label_dataset(params)


def _files(base, folder):
    return sorted(glob.glob(os.path.join(base, folder, "*", "shard-*", "*.parquet")) or glob.glob(
        os.path.join(base, folder, "*", "shard-*.parquet")
    ))  # fmt: skip


def _read(files):
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


@pytest.mark.flow
def test_run_audit_matches_an_independent_computation_from_the_parquet_outputs(
    prefect_harness, tmp_path, capsys
):
    import duckdb

    run = _label(tmp_path, "one")
    base = run["output"]
    stats_dir = os.path.join(base, "stats", run["run_key"])
    with open(os.path.join(stats_dir, "run.json")) as f:
        assert json.load(f) == {k: v for k, v in run.items() if k != "seconds"}  # what the flow returned
    captions = _read(_files(base, "captions"))
    parses = _read(_files(base, "parses"))
    cands = _read(_files(base, "candidates"))
    triplets = _read(_files(base, "triplets"))
    rejects = _read(_files(base, "rejects"))
    tagged = triplets + rejects
    assert triplets and rejects  # top_k=1 rejects some rows (beyond_top_k) of the sample
    counts = {r["stage"]: r["count"] for r in run["funnel"]}
    assert counts == {
        "images": 5,
        "verified": len(_read(_files(base, "verified"))),
        "captions": len(captions),
        "unique_captions": sum(not c["is_duplicate"] for c in captions),
        "relations": len(parses),
        "matched": run["stages"]["match"]["relations_matched"],
        "candidate_pairs": len({(c["image_id"], c["subject_ann_id"], c["object_ann_id"]) for c in cands}),
        **dict.fromkeys(
            ("region_captions", "region_relations", "region_new_candidates"), 0
        ),  # region stage off
        "tagged": len(tagged),
        "accepted": len(triplets),
    }
    reasons = {}
    for r in rejects:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    assert run["funnel"][-1]["dropped"] == reasons and reasons.get("beyond_top_k")
    # histograms
    rel = {}
    for t in triplets:
        rel[t["relation_lemma"]] = rel.get(t["relation_lemma"], 0) + 1
    assert run["relation_histogram"] == rel
    pairs = {}
    for t in triplets:
        pairs[(t["subject_label"], t["object_label"])] = (
            pairs.get((t["subject_label"], t["object_label"]), 0) + 1
        )
    assert run["class_pair_histogram"] == [
        [s, o, n] for (s, o), n in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    for score in ("p_subject", "p_object", "p_relation", "confidence"):
        want, _ = np.histogram([t[score] for t in tagged], bins=np.array(SCORE_EDGES))
        assert run["score_histograms"][score]["counts"] == want.tolist(), score
    # the eta sweep, plainly: per pair, rows whose confidence passes, at most top_k (1) of them
    for row in run["eta_sweep"]:
        per_pair = {}
        for t in tagged:
            c = t["p_relation"] * (t["p_subject"] * t["p_object"] if row["rule"] == "paper" else 1.0)
            if c >= row["eta"]:
                key = (t["image_id"], t["subject_ann_id"], t["object_ann_id"])
                per_pair[key] = min(1, per_pair.get(key, 0) + 1)
        assert (row["triplets"], row["images"]) == (sum(per_pair.values()), len({k[0] for k in per_pair})), (
            row
        )
    assert next(r for r in run["eta_sweep"] if r["eta"] == 0.2 and r["rule"] == "paper")["triplets"] == len(
        triplets
    )
    per_image = {}
    for t in triplets:
        per_image[t["image_id"]] = per_image.get(t["image_id"], 0) + 1
    hist = {"0": 5 - len(per_image)}
    for n in per_image.values():
        hist[str(n)] = hist.get(str(n), 0) + 1
    assert run["triplets_per_image"] == hist
    # unmatched nouns: counts add up to the stage's, examples are captions of the run
    texts = {c["text"] for c in captions}
    assert run["unmatched_nouns"] and all(
        set(u["examples"]) <= texts and u["examples"] for u in run["unmatched_nouns"]
    )
    assert [u["count"] for u in run["unmatched_nouns"]] == sorted(
        (u["count"] for u in run["unmatched_nouns"]), reverse=True
    )
    assert run["classes_without_synonyms"] == []  # the sample uses Objects365 v2 names
    # the Parquet tables, read with DuckDB, hold the same figures as run.json
    sql = duckdb.connect()

    def q(text):
        return sql.execute(text.replace("{d}", stats_dir)).fetchall()

    assert q("select stage, count from '{d}/funnel.parquet' order by position") == [
        (r["stage"], r["count"]) for r in run["funnel"]
    ]
    assert dict(q("select reason, count from '{d}/funnel_drops.parquet' where stage = 'accepted'")) == reasons
    assert q("select rule, eta, triplets, images from '{d}/eta_sweep.parquet' order by rule, eta") == [
        (r["rule"], r["eta"], r["triplets"], r["images"]) for r in run["eta_sweep"]
    ]
    assert dict(q("select relation_lemma, count from '{d}/relation_histogram.parquet'")) == rel
    assert q("select sum(count) from '{d}/score_histograms.parquet' where score = 'confidence'") == [
        (len(tagged),)
    ]
    assert q("select noun, count from '{d}/unmatched_nouns.parquet' order by count desc, noun") == [
        (u["noun"], u["count"]) for u in run["unmatched_nouns"]
    ]
    # the sweep straight from the stored scores with DuckDB, at the run's own eta and rule
    tri = os.path.join(base, "triplets", run["run_key"], "*.parquet")
    rej = os.path.join(base, "rejects", "*", "*", "*.parquet")
    (n,) = sql.execute(
        f"select count(*) from (select image_id, subject_ann_id, object_ann_id from ("
        f"select image_id, subject_ann_id, object_ann_id, p_subject * p_object * p_relation as c from '{tri}' "
        f"union all select image_id, subject_ann_id, object_ann_id, p_subject * p_object * p_relation from '{rej}'"
        f") where c >= 0.5 group by all)"
    ).fetchone()
    assert next(r for r in run["eta_sweep"] if r["eta"] == 0.5 and r["rule"] == "paper")["triplets"] == n
    # `reltag stats` prints the one JSON document
    from flows.cli import main

    capsys.readouterr()
    assert main(["stats", "--out", str(tmp_path / "one")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["funnel"] == run["funnel"] and printed["eta_sweep"] == run["eta_sweep"]

    # the same data in 3 shards of 1-image batches: the merged statistics do not depend on the split
    split = _label(tmp_path, "split", shard_size=2, batch_size=1)
    assert split["shards"] == 3
    for key in ("funnel", "relation_histogram", "class_pair_histogram", "score_histograms", "eta_sweep",
                "unmatched_nouns", "classes_without_synonyms", "triplets_per_image"):  # fmt: skip
        assert split[key] == run[key], key
    for name, stage_stats in run["stages"].items():  # distinct texts are counted within a batch
        assert {k: v for k, v in split["stages"][name].items() if k != "distinct_texts"} == {
            k: v for k, v in stage_stats.items() if k != "distinct_texts"
        }, name
    shard0 = json.load(open(os.path.join(split["output"], "stats", split["run_key"], "shard-00000.json")))
    assert shard0["funnel"][0]["count"] == 2 and "state" in shard0 and "eta_sweep" in shard0
