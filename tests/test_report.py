"""`reltag report`: the audit page of a real run of the bundled sample (statistics, gallery, lineage), checked as
HTML and in headless Chromium over CDP; `reltag report --compare` on real runs differing in eta and in tagger."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.cli import EXAMPLES, main
from flows.status import find_runs, plan_of
from storage import schemas
from storage.atomic import read_json
from storage.records import Triplet
from tasks.audit.compare import diff_triplets
from tasks.audit.report import NOT_AVAILABLE, gallery_picks
from tests.cdp import Browser, find_chromium

#: run.json keys the report reads (stats/<run_key>/run.json); a missing key gives "not available for this run".
STATS_KEYS = (
    "funnel",
    "relation_histogram",
    "class_pair_histogram",
    "score_histograms",
    "eta_sweep",
    "unmatched_nouns",
    "classes_without_synonyms",
    "triplets_per_image",
)

SYNONYMS = (
    Path(__file__).resolve().parent.parent / "models" / "data" / "synonyms" / "o365_obj_paraphrase.json"
)
FUNNEL = (
    "images",
    "verified",
    "captions",
    "unique_captions",
    "relations",
    "matched",
    "candidate_pairs",
    "region_captions",  # the region stage (off in these runs: 0)
    "region_relations",
    "region_new_candidates",
    "tagged",
    "accepted",
)


# ------------------------------------------------------------------------------------------ independent helpers


class Page(HTMLParser):
    """What the tests read from a page: img srcs, figures' data attributes, table cells, scripts and links."""

    def __init__(self, text: str):
        super().__init__()
        self.imgs, self.figures, self.tags, self.tables = [], [], Counter(), []
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] += 1
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "figure":
            self.figures.append((a.get("data-group"), a.get("data-key"), int(a["data-image-id"])))
        if tag == "table":
            self.tables.append({"class": a.get("class", ""), "rows": []})
        if tag == "tr":
            self.tables[-1]["rows"].append([])
        if tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def table(self, cls: str) -> list[list[str]]:
        (t,) = [t for t in self.tables if t["class"] == cls]
        return t["rows"][1:]  # without the header


def _rows(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def derive_stats(run) -> dict:
    """The statistics keys the report reads, worked out plainly from the run's own Parquet files and plan (the
    fixture for runs made before run.json held them)."""
    images = _rows(run.images(0))
    verified = _rows(run.stage_batch("verify", 0, 0))
    caps = _rows(run.stage_batch("caption", 0, 0))
    parses = _rows(run.stage_batch("parse", 0, 0))
    cands = _rows(run.stage_batch("match", 0, 0))
    tags = _rows(run.stage_batch("tag", 0, 0))
    trips = _rows(run.triplets(0))
    rejects = _rows(run.rejects(0, 0))
    unique = [c for c in caps if not c["is_duplicate"]]
    with_rel = {(p["image_id"], p["caption_id"]) for p in parses}
    matched = [
        p for p in parses
        if any(c["image_id"] == p["image_id"] and c["relation"] == p["relation"] and p["caption_id"] in c["caption_ids"]
               for c in cands)
    ]  # fmt: skip
    pairs = {(c["image_id"], c["subject_ann_id"], c["object_ann_id"]) for c in cands}
    funnel_counts = [
        len(images),
        len(verified),
        len(caps),
        len(unique),
        len(parses),
        len(matched),
        len(pairs),
        0,  # region stage off
        0,
        0,
        len(tags),
        len(trips),
    ]
    dropped = [{}, {}, {}, {"duplicate": len(caps) - len(unique)},
               {"no_relation": sum((c["image_id"], c["caption_id"]) not in with_rel for c in unique)},
               {"unmatched": len(parses) - len(matched)}, {}, {}, {}, {}, {},
               dict(Counter(r["reason"] for r in rejects))]  # fmt: skip
    funnel = [
        {"stage": s, "label": s.replace("_", " "), "count": n, "dropped": d}
        for s, n, d in zip(FUNNEL, funnel_counts, dropped)
    ]
    edges = np.linspace(0.0, 1.0, 21)
    hist = {}
    for name in ("p_subject", "p_object", "p_relation", "confidence"):
        counts, _ = np.histogram([t[name] for t in tags], bins=edges)
        hist[name] = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
    sweep = []
    for rule in ("paper", "relation_only"):
        for k in range(1, 20):
            eta = round(0.05 * k, 2)
            conf = [
                (t["p_subject"] * t["p_object"] * t["p_relation"] if rule == "paper" else t["p_relation"])
                for t in tags
            ]
            kept = [t for t, c in zip(tags, conf) if c >= eta]
            sweep.append(
                {
                    "eta": eta,
                    "rule": rule,
                    "triplets": len(kept),
                    "images": len({t["image_id"] for t in kept}),
                }
            )
    labels = {im["image_id"]: {w for b in im["boxes"] for w in b["label"].lower().split()} for im in images}
    text = {(c["image_id"], c["caption_id"]): c["text"] for c in caps}
    nouns: Counter = Counter()
    examples: dict[str, list] = {}
    for p in parses:
        for head in (p["subject_head"], p["object_head"]):
            if head.lower() not in labels[p["image_id"]]:
                nouns[head.lower()] += 1
                ex = examples.setdefault(head.lower(), [])
                if len(ex) < 3 and text[(p["image_id"], p["caption_id"])] not in ex:
                    ex.append(text[(p["image_id"], p["caption_id"])])
    synonyms = json.loads(SYNONYMS.read_text())
    per_image = Counter(Counter(t["image_id"] for t in trips).get(im["image_id"], 0) for im in images)
    return {
        "funnel": funnel,
        "relation_histogram": dict(Counter(t["relation_lemma"] for t in trips)),
        "class_pair_histogram": [[s, o, n] for (s, o), n in Counter((t["subject_label"], t["object_label"]) for t in trips).items()],
        "score_histograms": hist,
        "eta_sweep": sweep,
        "unmatched_nouns": [{"noun": n, "count": c, "examples": examples[n]} for n, c in nouns.most_common()],
        "classes_without_synonyms": sorted(c["name"] for c in plan_of(run).categories if c["name"].lower() not in synonyms),
        "triplets_per_image": {str(k): v for k, v in sorted(per_image.items())},
    }  # fmt: skip


def _report(root, *extra) -> tuple[int, str]:
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["report", "--out", str(root), *extra])
    return rc, buf.getvalue()


def _written(stdout: str) -> Path:
    (line,) = [x for x in stdout.splitlines() if x.startswith("wrote ")]
    return Path(line.removeprefix("wrote "))


# ------------------------------------------------------------------------------------------------ fast units


def _t(image, s, o, rel, conf, lemma=None, sl="person", ol="horse") -> Triplet:
    return Triplet(image, s, o, 1, 2, sl, ol, [0, 0, 1, 1], [0, 0, 1, 1], rel, lemma or rel, conf, 1.0, 1.0, conf,
                   1, [0], 1, "greedy_overlap", "k")  # fmt: skip


def test_gallery_picks_are_the_top_groups_and_their_first_images():
    trips = [_t(9, 1, 2, "on", 1), _t(3, 1, 2, "on", 1), _t(5, 1, 2, "on", 1), _t(4, 1, 2, "on", 1),
             _t(4, 1, 3, "near", 1, ol="dog"), _t(2, 1, 3, "near", 1, ol="dog"), _t(7, 1, 2, "sits on", 1, "sit on"),
             _t(1, 3, 2, "under", 1, sl="dog")]  # fmt: skip
    picks = gallery_picks(schemas.to_table(trips, Triplet), top=3, per_group=2)
    # on: 4, near: 2, then "sit on" and "under" tie at 1 and the name decides
    assert picks["relation"] == [("on", 4, [3, 4]), ("near", 2, [2, 4]), ("sit on", 1, [7])]
    assert picks["class_pair"] == [(("person", "horse"), 5, [3, 4]), (("person", "dog"), 2, [2, 4]),
                                   (("dog", "horse"), 1, [1])]  # fmt: skip


def test_diff_by_triplet_key():
    a = [_t(1, 1, 2, "on", 0.9), _t(1, 1, 2, "near", 0.3), _t(2, 5, 6, "sitting on", 0.5, "sit on")]
    b = [
        _t(1, 1, 2, "on", 0.9),
        _t(2, 5, 6, "sitting on", 0.75, "sit on"),
        _t(2, 5, 6, "sits on", 0.5, "sit on"),
    ]
    d = diff_triplets(schemas.to_table(a, Triplet), schemas.to_table(b, Triplet))
    assert d.counts == {"added": 1, "dropped": 1, "rescored": 1, "unchanged": 1}
    keys = {
        k: [(r["image_id"], r["subject_ann_id"], r["object_ann_id"], r["relation"]) for r in v]
        for k, v in d.rows.items()
    }
    assert keys == {
        "added": [
            (2, 5, 6, "sits on")
        ],  # the same lemma as "sitting on", another relation text: a new triplet
        "dropped": [(1, 1, 2, "near")],
        "rescored": [(2, 5, 6, "sitting on")],
        "unchanged": [(1, 1, 2, "on")],
    }
    assert [(r["confidence_a"], r["confidence_b"]) for r in d.rows["rescored"]] == [(0.5, 0.75)]
    assert [(r["confidence_a"], r["confidence_b"]) for r in d.rows["added"]] == [(None, 0.5)]
    assert (
        d.rows["dropped"][0]["subject_label"] == "person" and d.rows["added"][0]["relation_lemma"] == "sit on"
    )
    assert d.by_relation == {"sit on": {"added": 1, "rescored": 1}, "near": {"dropped": 1}}
    # key order, and `examples` caps the rows but not the counts
    many = [_t(i % 3, i, i + 1, "on", 0.5) for i in range(10, 0, -1)]
    d = diff_triplets(schemas.to_table([], Triplet), schemas.to_table(many, Triplet), examples=4)
    assert d.counts["added"] == 10
    assert [(r["image_id"], r["subject_ann_id"]) for r in d.rows["added"]] == [(0, 3), (0, 6), (0, 9), (1, 1)]
    with pytest.raises(ValueError, match=r"run X holds 2 triplets with key \(1, 1, 2, 'on'\)"):
        diff_triplets(
            schemas.to_table(a + [_t(1, 1, 2, "on", 0.1)], Triplet), schemas.to_table(b, Triplet), "X", "Y"
        )


# ----------------------------------------------------------------------------------------- on a real run


@pytest.fixture(scope="module")
def demo_root(prefect_harness, tmp_path_factory):
    """A real run of the bundled sample (oracle captions, greedy tagger), as `reltag demo` makes it."""
    root = tmp_path_factory.mktemp("demo") / "out"
    assert main(["demo", "--out", str(root)]) == 0
    return root


@pytest.fixture
def stats_root(demo_root, tmp_path):
    """A copy of the demo run whose run.json also holds the statistics keys, derived from its Parquet files."""
    root = tmp_path / "out"
    shutil.copytree(demo_root, root)
    (run,) = find_runs(str(root))
    st = read_json(run.fs, run.run_stats)
    for k, v in derive_stats(run).items():
        st.setdefault(k, v)  # a run.json that holds a key already keeps reltag's own value
    Path(run.run_stats).write_text(json.dumps(st))
    return root


def _self_contained(text: str, page: Page) -> None:
    assert page.tags["script"] == 0 and page.tags["link"] == 0 and page.tags["iframe"] == 0
    assert page.imgs and all(
        s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in page.imgs
    )
    assert "http://" not in text and "https://" not in text and "url(" not in text


@pytest.mark.flow
def test_report_shows_the_runs_statistics_gallery_and_lineage(stats_root):
    (run,) = find_runs(str(stats_root))
    st = read_json(run.fs, run.run_stats)
    rc, out = _report(stats_root)
    assert rc == 0
    path = _written(out)
    assert path == Path(run.path("report", f"{run.run_key}.html"))
    text = path.read_text()
    page = Page(text)
    _self_contained(text, page)
    assert NOT_AVAILABLE not in text
    # the funnel table: every stage in order with its count and drop reasons
    funnel = page.table("funnel")
    assert [r[0] for r in funnel] == list(FUNNEL)
    assert [int(r[2].replace(",", "")) for r in funnel] == [f["count"] for f in st["funnel"]]
    assert funnel[-1][3] == ", ".join(f"{k}: {v}" for k, v in st["funnel"][-1]["dropped"].items())
    # unmatched nouns: most frequent first, with their counts
    nouns = page.table("nouns")
    want = sorted(st["unmatched_nouns"], key=lambda n: (-n["count"], n["noun"]))
    assert [(r[0], int(r[1])) for r in nouns] == [(n["noun"], n["count"]) for n in want]
    # gallery: the top relations and class pairs of the triplet file, each with its first images by id
    trips = _rows(run.triplets(0))
    rel = Counter(t["relation_lemma"] for t in trips)
    ids = {}
    for t in trips:
        ids.setdefault(("relation", t["relation_lemma"]), set()).add(t["image_id"])
        ids.setdefault(("class_pair", f"{t['subject_label']} -> {t['object_label']}"), set()).add(
            t["image_id"]
        )
    top_rel = sorted(rel, key=lambda r: (-rel[r], r))[:6]
    pairs = Counter(f"{t['subject_label']} -> {t['object_label']}" for t in trips)
    top_pairs = sorted(pairs, key=lambda p: (-pairs[p], p))[:6]
    expected = [("relation", r, i) for r in top_rel for i in sorted(ids[("relation", r)])[:3]]
    expected += [("class_pair", p, i) for p in top_pairs for i in sorted(ids[("class_pair", p)])[:3]]
    assert page.figures == expected
    assert len(page.imgs) == 6 + len(
        expected
    )  # funnel, relations, class pairs, triplets per image, scores, eta
    # lineage: every stage key of the run record
    lineage = page.table("lineage")
    assert [(r[0], r[1]) for r in lineage] == [(s, k) for s, k in run.stage_keys]
    # rerun: the same page, byte for byte (deterministic picks, no timestamps)
    rc, out2 = _report(stats_root, "--run", run.run_key[:6])
    assert rc == 0 and _written(out2).read_text() == text


@pytest.mark.flow
def test_report_says_what_a_run_without_the_statistics_keys_lacks(demo_root, tmp_path):
    root = tmp_path / "out"
    shutil.copytree(demo_root, root)
    (run,) = find_runs(str(root))
    st = read_json(run.fs, run.run_stats)
    Path(run.run_stats).write_text(
        json.dumps({k: v for k, v in st.items() if k not in STATS_KEYS})
    )  # an older run
    rc, out = _report(root)
    assert rc == 0
    text = _written(out).read_text()
    # one "not available" per section that reads a missing key (the classes line included), and nothing invented
    assert text.count(NOT_AVAILABLE) == len(STATS_KEYS)
    page = Page(text)
    _self_contained(text, page)
    assert page.figures  # the gallery and the lineage come from the triplets and the run record
    assert [r[1] for r in page.table("lineage")] == [k for _, k in run.stage_keys]


@pytest.mark.flow
def test_report_errors(demo_root, tmp_path, capsys):
    root = tmp_path / "out"
    shutil.copytree(demo_root, root)
    (run,) = find_runs(str(root))
    assert _report(root, "--per-group", "0")[0] == 2
    assert capsys.readouterr().err.strip() == "reltag report: error: --per-group must be at least 1, got 0"
    assert _report(root, "--run", "zzzz")[0] == 2
    assert capsys.readouterr().err.startswith(
        f"reltag report: error: no run under {root} has a key starting 'zzzz'"
    )
    assert _report(root, "--compare", run.run_key, run.run_key[:4])[0] == 2
    assert f"--compare names run {run.run_key} twice" in capsys.readouterr().err
    Path(run.run_stats).unlink()  # as if the run had not finished
    assert _report(root)[0] == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"run {run.run_key}" in err and "is not finished" in err
    assert not (Path(run.base) / "report").exists()


@pytest.mark.flow
@pytest.mark.skipif(
    find_chromium() is None, reason="no chromium on PATH (CI installs it with apt in .ci/run)"
)
def test_report_in_headless_chromium(stats_root, tmp_path):
    (run,) = find_runs(str(stats_root))
    rc, out = _report(stats_root)
    assert rc == 0
    path = _written(out)
    n_imgs = len(Page(path.read_text()).imgs)
    with Browser(find_chromium(), width=1280, height=900) as b:
        b.navigate(path.as_uri())
        state = b.evaluate(
            "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])"
        )
        shot = b.screenshot()
        errors, requests = list(b.errors), list(b.requests)
        # the page is long: scroll to the gallery, to show it in the saved picture
        b.evaluate("document.getElementById('gallery').scrollIntoView(); true")
        gallery_shot = b.screenshot()
    assert errors == []
    # nothing fetched but the page itself (and its inline data: images): it views offline
    assert requests and requests[0] == path.as_uri()
    assert [u for u in requests[1:] if not u.startswith("data:")] == []
    assert len(state) == n_imgs > 5
    broken = [s for s in state if not (s[0] and s[1] > 0 and s[2] > 0)]
    assert broken == []
    for png in (shot, gallery_shot):
        img = Image.open(io.BytesIO(png))
        assert img.format == "PNG" and img.size == (1280, 900)
        a = np.asarray(img.convert("RGB")).reshape(-1, 3)
        colours = np.unique(a, axis=0)
        assert len(colours) > 200  # text, plots and photos; a blank page is one or two colours
        assert (a != a[0]).any(axis=1).mean() > 0.05
    (tmp_path / "report.png").write_bytes(shot)
    # RELTAG_REPORT_SCREENSHOT=examples/report_screenshot.png: keep the top of the page (run, funnel, plots)
    # for the README; RELTAG_REPORT_SCREENSHOT_GALLERY=...: the gallery view
    for keep, png in ((os.environ.get("RELTAG_REPORT_SCREENSHOT"), shot),
                      (os.environ.get("RELTAG_REPORT_SCREENSHOT_GALLERY"), gallery_shot)):  # fmt: skip
        if not keep:
            continue
        img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256)
        img.save(keep, optimize=True)
        assert Path(keep).stat().st_size < 300_000


# ------------------------------------------------------------------------------------------------ compare


@pytest.fixture(scope="module")
def cut_root(demo_root, tmp_path_factory):
    """Real runs of the sample sharing plan, captions, parses and candidates: the greedy tagger (scores 0 or 1) at
    eta 0.2 and 0.0; a tiny random CLIP tagger (scores spread over 0..1; softmax of 100 x cosine, mostly near 0
    or 1) at clip_eta 0.0 and 0.5, the cut the threshold stage holds CLIP rows to in place of eta. Keyed by
    (tagger, the cut its rows were held to)."""
    from tests.test_clip_tagger import build_tiny_clip

    d = tmp_path_factory.mktemp("cuts")
    clip_dir = build_tiny_clip(str(d))
    root = d / "out"
    shutil.copytree(demo_root, root)  # the demo's run is the greedy run at eta 0.2 (the same key)
    base = ["--annotations", str(EXAMPLES / "sample_detections.json"), "--images", str(EXAMPLES / "images"),
            "--captions", str(EXAMPLES / "sample_captions.json"), "--out", str(root), "--dataset", "sample"]  # fmt: skip
    assert main(["run", *base, "--eta", "0.0"]) == 0
    for eta in ("0.0", "0.5"):
        assert main(["run", *base, "--tagger", "clip", "--clip-model", clip_dir, "--clip-eta", eta]) == 0
    runs = {}
    for r in find_runs(str(root)):
        cfg = read_json(r.fs, r.manifest)["config"]
        tagger = cfg["tag"]["tagger"]
        runs[(tagger, cfg["threshold"]["clip_eta" if tagger == "clip" else "eta"])] = r
    assert len(runs) == 4
    return root, runs


def _keyed(run) -> dict:
    return {
        (t["image_id"], t["subject_ann_id"], t["object_ann_id"], t["relation"]): t
        for t in _rows(run.triplets(0))
    }


@pytest.mark.flow
@pytest.mark.slow
@pytest.mark.parametrize("tagger, low_cut, high_cut", [("greedy_overlap", 0.0, 0.2), ("clip", 0.0, 0.5)])
def test_compare_two_cuts(cut_root, tagger, low_cut, high_cut):
    root, runs = cut_root
    low, high = runs[(tagger, low_cut)], runs[(tagger, high_cut)]
    tl, th = _keyed(low), _keyed(high)
    assert set(th) <= set(tl)  # a stricter cut keeps a subset
    dropped = sorted(k for k, t in tl.items() if t["confidence"] < high_cut)
    assert dropped and len(dropped) < len(tl), f"the scores should fall on both sides of {high_cut}"
    assert sorted(set(tl) - set(th)) == dropped
    assert all(th[k]["confidence"] == tl[k]["confidence"] for k in th)
    rc, out = _report(root, "--compare", low.run_key, high.run_key[:8])
    assert rc == 0
    assert f"0 added, {len(dropped)} dropped, 0 rescored, {len(th)} unchanged" in out
    path = _written(out)
    assert path == Path(low.path("report", f"compare-{low.run_key}-{high.run_key}.html"))
    page = Page(path.read_text())
    assert page.table("dropped") == [
        [str(k[0]), f"{tl[k]['subject_label']} ({k[1]})", k[3], f"{tl[k]['object_label']} ({k[2]})",
         f"{tl[k]['confidence']:.4f}", ""]
        for k in dropped
    ]  # fmt: skip
    counts = {r[0]: int(r[1]) for r in page.table("counts")}
    assert counts == {"added": 0, "dropped": len(dropped), "rescored": 0, "unchanged": len(th)}
    # the one setting that differs is named, with both values
    setting = "threshold.clip_eta" if tagger == "clip" else "threshold.eta"
    assert [setting, str(low_cut), str(high_cut)] in page.table("settings")


@pytest.mark.flow
@pytest.mark.slow
def test_compare_greedy_with_clip(cut_root):
    root, runs = cut_root
    greedy, clip = runs[("greedy_overlap", 0.2)], runs[("clip", 0.0)]
    tg, tc = _keyed(greedy), _keyed(clip)
    added = sorted(set(tc) - set(tg))
    dropped = sorted(set(tg) - set(tc))
    both = set(tg) & set(tc)
    rescored = sorted(k for k in both if tg[k]["confidence"] != tc[k]["confidence"])
    assert added and rescored  # clip_eta 0 keeps the pair greedy drops; greedy scores 1.0, a random CLIP less
    rc, out = _report(root, "--compare", greedy.run_key, clip.run_key)
    assert rc == 0
    assert (f"{len(added)} added, {len(dropped)} dropped, {len(rescored)} rescored, "
            f"{len(both) - len(rescored)} unchanged") in out  # fmt: skip
    page = Page(_written(out).read_text())
    assert [(int(r[0]), r[2], r[4], r[5]) for r in page.table("rescored")] == [
        (k[0], k[3], f"{tg[k]['confidence']:.4f}", f"{tc[k]['confidence']:.4f}") for k in rescored
    ]
    assert [(int(r[0]), r[2], r[4], r[5]) for r in page.table("added")] == [
        (k[0], k[3], "", f"{tc[k]['confidence']:.4f}") for k in added
    ]
    assert ["tag.tagger", "greedy_overlap", "clip"] in page.table("settings")
    if find_chromium() is not None:  # the compare page loads cleanly in the browser too
        with Browser(find_chromium()) as b:
            b.navigate(_written(out).as_uri())
            assert b.errors == [] and b.evaluate("document.querySelectorAll('table').length") >= 5


@pytest.mark.flow
def test_report_names_photos_it_cannot_read(stats_root, tmp_path):
    root = stats_root
    (run,) = find_runs(str(root))
    rec = read_json(run.fs, run.manifest)
    rec["inputs"]["images_root"] = str(tmp_path / "moved")  # the images are gone from where the run read them
    Path(run.manifest).write_text(json.dumps(rec))
    rc, out = _report(root)
    assert rc == 0
    text = _written(out).read_text()
    page = Page(text)
    assert page.figures and len(page.imgs) == 6  # plots only: no broken <img> for a photo
    assert text.count('<figure class="missing"') == len(page.figures)
    assert "photo not readable: " in text and "moved" in text


@pytest.mark.flow
def test_report_on_an_fsspec_root(demo_root):
    """The run copied to memory://: the page is written there (atomically, by fsspec) and its URI printed."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.put(str(demo_root), "/report-test", recursive=True)
    try:
        (run,) = find_runs("memory://report-test")
        rc, out = _report("memory://report-test")
        assert rc == 0
        (line,) = [x for x in out.splitlines() if x.startswith("wrote ")]
        uri = line.removeprefix("wrote ")
        assert uri == f"memory://{run.path('report', run.run_key + '.html')}"
        with fsspec.open(uri, "rt") as f:
            page = Page(f.read())
        assert page.figures and all(s.startswith("data:image/") for s in page.imgs)
        assert [p for p in fs.find("/report-test") if ".tmp-" in p] == []
    finally:
        fs.rm("/report-test", recursive=True)
