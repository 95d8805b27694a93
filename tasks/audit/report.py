"""The audit report of a run, and the comparison of two runs, as self-contained HTML pages (inline CSS, plots and
photos as base64 data URIs, no script, nothing fetched at view time)."""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from storage.manifest import RunRecord
from storage.records import ImageRecord, Triplet

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
SCORES = ("p_subject", "p_object", "p_relation", "confidence")
NOT_AVAILABLE = "not available for this run"


@dataclass
class RunData:
    """What a report needs of one finished run.

    record: runs/<run_key>.json; stats: stats/<run_key>/run.json; triplets: every triplet of the run, an Arrow
    table with (at least) the TRIPLETS columns image_id, relation_lemma, subject_label, object_label;
    images: the planned records of (at least) the gallery's images, by id; gallery_rows: every TRIPLETS column
    of (at least) the gallery's images' triplets (None: `triplets` has every column).
    """

    record: RunRecord
    stats: dict
    triplets: pa.Table
    images: dict[int, ImageRecord] = field(default_factory=dict)
    output: str = ""
    gallery_rows: pa.Table | None = None

    @property
    def run_key(self) -> str:
        return self.record.run_key


# ---------------------------------------------------------------------------------------------------- helpers


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _png_uri(fig) -> str:
    """A matplotlib Figure as a PNG data URI (Agg canvas; no pyplot state, no timestamp in the file)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _jpeg_uri(img: Image.Image, quality: int = 85) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")  # margins fit the labels, without a second draw


def _img(uri: str, alt: str, cls: str = "plot") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{_e(alt)}">'


def _na(what: str) -> str:
    return f'<p class="na">{_e(what)}: {NOT_AVAILABLE} (its stats/run.json has no such entry).</p>'


def _table(head: list[str], rows: list[list], cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _hbar(labels: list[str], values: list[int], title: str, colour: str = "#4878a8"):
    """Horizontal bars, first label on top, each bar with its value."""
    fig = _figure(5.9, 0.3 * max(len(labels), 3) + 0.9)
    ax = fig.add_subplot()
    y = list(range(len(labels)))[::-1]
    ax.barh(y, values, color=colour)
    ax.set_yticks(y, labels)
    top = max(values) if values else 1
    for yi, v in zip(y, values):
        ax.text(v + top * 0.01, yi, f"{v:,}", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.15 or 1)
    ax.set_title(title, fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    return fig


# ---------------------------------------------------------------------------------------------------- sections


def _funnel(stats: dict) -> str:
    funnel = stats.get("funnel")
    if funnel is None:
        return _na("the funnel")
    labels = [f.get("label") or f["stage"] for f in funnel]
    counts = [int(f["count"]) for f in funnel]
    fig = _hbar(labels, counts, "what survives each stage")
    rows = []
    for f in funnel:
        dropped = ", ".join(
            f"{_e(k)}: {v:,}" for k, v in sorted(f.get("dropped", {}).items(), key=lambda kv: -kv[1])
        )
        rows.append(
            [_e(f["stage"]), _e(f.get("label", "")), f'<span class="num">{int(f["count"]):,}</span>', dropped]
        )
    table = _table(["stage", "what", "count", "dropped (reason: count)"], rows, "funnel")
    return f'<div class="row">{_img(_png_uri(fig), "funnel")}{table}</div>'


def _histograms(stats: dict) -> str:
    parts = []
    rel = stats.get("relation_histogram")
    if rel is None:
        parts.append(_na("the relation histogram"))
    else:
        top = sorted(rel.items(), key=lambda kv: (-kv[1], kv[0]))[:30]
        parts.append(
            _img(
                _png_uri(
                    _hbar(
                        [k for k, _ in top],
                        [v for _, v in top],
                        f"relations (lemma), top {len(top)} of {len(rel)}",
                    )
                ),
                "relation histogram",
            )  # fmt: skip
        )
    pairs = stats.get("class_pair_histogram")
    if pairs is None:
        parts.append(_na("the class-pair histogram"))
    else:
        top = sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))[:30]
        parts.append(
            _img(
                _png_uri(
                    _hbar(
                        [f"{s} -> {o}" for s, o, _ in top],
                        [c for _, _, c in top],
                        f"subject -> object classes, top {len(top)} of {len(pairs)}",
                        "#6a9f58",
                    )
                ),
                "class-pair histogram",
            )  # fmt: skip
        )
    parts = [f'<div class="row">{"".join(parts)}</div>']
    tpi = stats.get("triplets_per_image")
    if tpi is None:
        parts.append(_na("triplets per image"))
    else:
        ks = sorted(tpi, key=int)
        fig = _figure(5.9, 2.4)
        ax = fig.add_subplot()
        ax.bar([int(k) for k in ks], [tpi[k] for k in ks], color="#a86848")
        ax.set_xlabel("triplets in the image")
        ax.set_ylabel("images")
        ax.set_title("triplets per image", fontsize=10)
        parts.append(_img(_png_uri(fig), "triplets per image"))
    return "\n".join(parts)


def _scores(stats: dict) -> str:
    sh = stats.get("score_histograms")
    if sh is None:
        return _na("the score histograms")
    fig = _figure(8, 4.6)
    for i, name in enumerate(SCORES):
        ax = fig.add_subplot(2, 2, i + 1)
        h = sh.get(name)
        if h is None:
            ax.text(0.5, 0.5, NOT_AVAILABLE, ha="center", va="center", transform=ax.transAxes)
        else:
            edges, counts = h["edges"], h["counts"]
            ax.stairs(counts, edges, fill=True, color="#4878a8")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    return _img(_png_uri(fig), "score histograms")


def _eta_sweep(stats: dict, record: RunRecord) -> str:
    sweep = stats.get("eta_sweep")
    if sweep is None:
        return _na("the eta sweep")
    fig = _figure(8, 3.2)
    by_rule: dict[str, list] = defaultdict(list)
    for row in sweep:
        by_rule[row["rule"]].append(row)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    for (rule, rows), style in zip(sorted(by_rule.items()), ("-", "--", ":")):
        rows = sorted(rows, key=lambda r: r["eta"])
        etas = [r["eta"] for r in rows]
        axes[0].plot(etas, [r["triplets"] for r in rows], style, marker=".", label=rule)
        axes[1].plot(etas, [r["images"] for r in rows], style, marker=".", label=rule)
    eta = record.config.get("threshold", {}).get("eta")
    for ax, what in zip(axes, ("accepted triplets", "images with triplets")):
        if eta is not None:
            ax.axvline(eta, color="grey", ls="--", lw=1)
        ax.set_xlabel("eta")
        ax.set_ylim(bottom=0)
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_title(what, fontsize=9)
        ax.legend(fontsize=7)
    rows = [
        [f"{r['eta']:.2f}", _e(r["rule"]), f"{r['triplets']:,}", f"{r['images']:,}"]
        for r in sorted(sweep, key=lambda r: (r["rule"], r["eta"]))
    ]
    note = f"<p>The dashed line is this run's eta ({_e(eta)}, rule {_e(record.config.get('threshold', {}).get('rule'))}).</p>"
    table = f"<details><summary>the sweep as a table</summary>{_table(['eta', 'rule', 'triplets', 'images'], rows)}</details>"
    return _img(_png_uri(fig), "eta sweep") + note + table


def _nouns(stats: dict) -> str:
    parts = []
    nouns = stats.get("unmatched_nouns")
    if nouns is None:
        parts.append(_na("the unmatched nouns"))
    elif not nouns:
        parts.append("<p>Every subject and object head noun matched a class name or synonym.</p>")
    else:
        rows = [
            [_e(n["noun"]), f'<span class="num">{int(n["count"]):,}</span>',
             "<br>".join(_e(c) for c in n.get("examples", [])[:3])]
            for n in sorted(nouns, key=lambda n: (-n["count"], n["noun"]))
        ]  # fmt: skip
        parts.append(_table(["head noun", "count", "example captions"], rows, "nouns"))
    cls = stats.get("classes_without_synonyms")
    if cls is None:
        parts.append(_na("the classes without a synonym list"))
    elif cls:
        parts.append(f"<p>Classes without a synonym list ({len(cls)}): {_e(', '.join(cls))}</p>")
    else:
        parts.append("<p>Every class has a synonym list.</p>")
    return "\n".join(parts)


def _lineage(data: RunData) -> str:
    rec = data.record
    rows = [
        [_e(c.stage), f"<code>{_e(c.key)}</code>", f"<code>{_e(c.upstream)}</code>", _e(c.revision),
         f"<code>{_e(json.dumps(c.settings, sort_keys=True))}</code>"]
        for c in rec.chain
    ]  # fmt: skip
    inputs = []
    for k, v in sorted(rec.inputs.items()):
        if isinstance(v, dict):
            v = ", ".join(f"{kk}={vv}" for kk, vv in sorted(v.items()))
        inputs.append([_e(k), _e(v)])
    versions = ", ".join(f"{k} {v}" for k, v in sorted(rec.versions.items()))
    return (
        f"<p>Plan <code>{_e(rec.plan_key)}</code> &rarr; run <code>{_e(rec.run_key)}</code>, created {_e(rec.created_at)}.</p>"
        + _table(["stage", "key", "upstream", "revision", "settings"], rows, "lineage")
        + "<h3>Inputs</h3>" + _table(["input", "value"], inputs)
        + f"<details><summary>full config</summary><pre>{_e(json.dumps(rec.config, indent=2, sort_keys=True))}</pre></details>"
        + f"<p class='small'>Versions: {_e(versions)}</p>"
    )  # fmt: skip


def gallery_picks(table: pa.Table, top: int = 6, per_group: int = 3) -> dict[str, list]:
    """Deterministic gallery samples, from a table of triplets (storage.schemas.TRIPLETS columns).

    Returns {"relation": [(lemma, count, [image ids])], "class_pair": [((subject, object), count, [image ids])]}:
    the `top` most frequent relation lemmas and subject/object class pairs (ties by name), each with the first
    `per_group` image ids (ascending) that hold such a triplet. Arrow group-by and filters: no Python object per
    triplet, so a run of millions of triplets fits.
    """
    out: dict[str, list] = {}
    for name, cols in (("relation", ["relation_lemma"]), ("class_pair", ["subject_label", "object_label"])):
        out[name] = []
        if table.num_rows == 0:
            continue
        counts = table.group_by(cols).aggregate([([], "count_all")]).to_pylist()
        for r in sorted(counts, key=lambda r: (-r["count_all"], *(r[c] for c in cols)))[:top]:
            mask = pc.equal(table[cols[0]], r[cols[0]])
            for c in cols[1:]:
                mask = pc.and_(mask, pc.equal(table[c], r[c]))
            ids = sorted(pc.unique(table.filter(mask)["image_id"]).to_pylist())[:per_group]
            key = r[cols[0]] if len(cols) == 1 else tuple(r[c] for c in cols)
            out[name].append((key, r["count_all"], ids))
    return out


def gallery_image_ids(picks: dict[str, list]) -> set[int]:
    """Every image id the gallery shows."""
    return {i for groups in picks.values() for _, _, ids in groups for i in ids}


def _gallery(data: RunData, load: Callable[[ImageRecord], tuple[Image.Image | None, str]], top: int,
             per_group: int) -> str:  # fmt: skip
    from storage import schemas
    from tasks.audit.visualize import draw_triplets

    if data.triplets.num_rows == 0:
        return "<p>This run has no triplets to show.</p>"
    picks = gallery_picks(data.triplets, top, per_group)
    rows = data.triplets if data.gallery_rows is None else data.gallery_rows
    shown = rows.filter(pc.is_in(rows["image_id"], pa.array(sorted(gallery_image_ids(picks)), pa.int64())))
    by_image: dict[int, list[Triplet]] = defaultdict(list)
    for t in schemas.from_table(shown, Triplet):
        by_image[t.image_id].append(t)
    photos: dict[int, tuple[Image.Image | None, str]] = {}
    parts = []
    for kind, title, match in (
        ("relation", "By relation", lambda t, k: t.relation_lemma == k),
        ("class_pair", "By class pair", lambda t, k: (t.subject_label, t.object_label) == k),
    ):
        parts.append(f"<h3>{title}</h3>")
        for k, n, ids in picks[kind]:
            name = k if kind == "relation" else f"{k[0]} -> {k[1]}"
            figs = []
            for image_id in ids:
                rec = data.images.get(image_id)
                if rec is None:
                    raise ValueError(
                        f"image {image_id} of run {data.run_key} has triplets but no planned record"
                    )
                if image_id not in photos:
                    photos[image_id] = load(rec)
                img, why = photos[image_id]
                trips = [t for t in by_image[image_id] if match(t, k)]
                attrs = f'data-group="{_e(kind)}" data-key="{_e(name)}" data-image-id="{image_id}"'
                cap = f"image {image_id} ({_e(rec.file_name)}): {len(trips)} of {len(by_image[image_id])} triplets"
                if img is None:
                    figs.append(f'<figure class="missing" {attrs}><div class="na">photo not readable: {_e(why)}</div>'
                                f"<figcaption>{cap}</figcaption></figure>")  # fmt: skip
                    continue
                tile = draw_triplets(img, rec, trips, max_side=420, font_size=12)
                figs.append(
                    f"<figure {attrs}>{_img(_jpeg_uri(tile), cap, 'photo')}<figcaption>{cap}</figcaption></figure>"
                )
            parts.append(
                f'<h4>{_e(name)} <span class="small">({n:,} triplets)</span></h4><div class="gallery">{"".join(figs)}</div>'
            )
    return "\n".join(parts)


CSS = """
body{font-family:"DejaVu Sans",Verdana,sans-serif;margin:0 auto;max-width:1280px;padding:0 24px 48px;color:#222}
h1{font-size:22px;margin:20px 0 4px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
h3{font-size:15px}h4{font-size:13px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 6px;vertical-align:top;text-align:left}
th{background:#f2f2f2}.num{font-variant-numeric:tabular-nums}td:has(.num){text-align:right}
img.plot{max-width:100%;display:block;margin:8px 0}.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.gallery{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #ddd;padding:4px;background:#fafafa}figure img{display:block;max-width:420px}
figcaption{font-size:11px;color:#555;margin-top:4px}.na{color:#a33;font-style:italic}.small{font-size:11px;color:#666}
nav a{margin-right:12px;font-size:13px}code{font-size:11px}pre{font-size:11px;background:#f6f6f6;padding:8px;overflow:auto}
.added{color:#1a7f37}.dropped{color:#b42318}.rescored{color:#9a6700}
"""


def _page(title: str, nav: list[tuple[str, str]], sections: list[tuple[str, str, str]]) -> str:
    links = "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in nav)
    body = "".join(f'<section id="{a}"><h2>{_e(t)}</h2>{s}</section>' for a, t, s in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        f"<body><h1>{_e(title)}</h1><nav>{links}</nav>{body}</body></html>\n"
    )


def report_html(
    data: RunData,
    load: Callable[[ImageRecord], tuple[Image.Image | None, str]],
    top: int = 6,
    per_group: int = 3,
) -> str:
    """The run's audit page.

    Args:
        data: the run (record, run.json statistics, triplets, image records).
        load: image record -> (photo, "") or (None, why it cannot be read).
        top / per_group: the gallery shows the `top` relations and class pairs, `per_group` images each.
    """
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(
            "the report draws its plots with matplotlib; install the report extra (pip install 'reltag[report]')"
        )
    rec, st = data.record, data.stats
    cfg = rec.config
    summary = (
        f"<p><b>{st.get('triplets', data.triplets.num_rows):,}</b> triplets on "
        f"<b>{st.get('images_with_triplets', len(pc.unique(data.triplets['image_id']))):,}</b> of "
        f"{st.get('images', '?')} images; captioner {_e(cfg.get('caption', {}).get('captioner'))}, "
        f"tagger {_e(cfg.get('tag', {}).get('tagger'))}, eta {_e(cfg.get('threshold', {}).get('eta'))} "
        f"(rule {_e(cfg.get('threshold', {}).get('rule'))}). Output: <code>{_e(data.output)}</code></p>"
    )
    sections = [
        ("funnel", "Funnel", summary + _funnel(st)),
        ("histograms", "Relations and class pairs", _histograms(st)),
        ("scores", "Scores", _scores(st)),
        ("eta", "Eta sweep", _eta_sweep(st, rec)),
        ("gallery", "Gallery", _gallery(data, load, top, per_group)),
        ("nouns", "Unmatched nouns", _nouns(st)),
        ("lineage", "Settings and lineage", _lineage(data)),
    ]
    return _page(
        f"reltag audit: {rec.dataset} / run {rec.run_key}", [(a, t) for a, t, _ in sections], sections
    )


# ---------------------------------------------------------------------------------------------------- compare


#: A triplet's identity within a run: (image, subject box, object box, relation text). The match stage keys its
#: candidates the same way (tasks/stages/match.py), so a run never holds two triplets with one key; the lemma is not
#: enough ("sitting on" and "sits on" share the lemma "sit on" and are separate candidates).
KEY = ("image_id", "subject_ann_id", "object_ann_id", "relation")
#: The columns the gallery's picks and the page's summary read of every triplet.
PICK_COLUMNS = ["image_id", "relation_lemma", "subject_label", "object_label"]
KINDS = ("added", "dropped", "rescored", "unchanged")
DIFF_COLUMNS = [*KEY, "subject_label", "object_label", "relation_lemma", "confidence"]


@dataclass
class TripletDiff:
    """Triplets of run B against run A, by KEY: added (only in B), dropped (only in A), rescored (in both,
    confidence differs), unchanged.

    counts: per kind, how many; by_relation: per relation lemma, Counter of added / dropped / rescored;
    rows: per kind, the first rows in key order (dicts: the KEY fields, subject_label, object_label,
    relation_lemma, confidence_a, confidence_b; None where the run lacks the triplet).
    """

    counts: dict[str, int]
    by_relation: dict[str, Counter]
    rows: dict[str, list[dict]]


def _keyed(table: pa.Table, run_key: str) -> pa.Table:
    t = table.select(DIFF_COLUMNS)
    n = t.group_by(list(KEY)).aggregate([([], "count_all")])
    dup = n.filter(pc.greater(n["count_all"], 1))
    if dup.num_rows:
        d = dup.slice(0, 1).to_pylist()[0]
        raise ValueError(
            f"run {run_key} holds {d['count_all']} triplets with key {tuple(d[c] for c in KEY)} "
            "(image, subject, object, relation); a run holds each at most once"
        )
    return t


def diff_triplets(
    a: pa.Table, b: pa.Table, run_a: str = "A", run_b: str = "B", examples: int | None = None
) -> TripletDiff:
    """Compare two runs' triplet tables (storage.schemas.TRIPLETS columns) with one Arrow full outer join on KEY;
    a confidence counts as changed when it differs at all. `examples` caps the rows kept per kind (None: all)."""
    j = _keyed(a, run_a).join(
        _keyed(b, run_b), keys=list(KEY), join_type="full outer", left_suffix="_a", right_suffix="_b"
    )
    ca, cb = j["confidence_a"], j["confidence_b"]
    both = pc.and_(pc.is_valid(ca), pc.is_valid(cb))
    masks = {
        "added": pc.is_null(ca),
        "dropped": pc.is_null(cb),
        "rescored": pc.and_(both, pc.not_equal(ca, cb)),
        "unchanged": pc.and_(both, pc.equal(ca, cb)),
    }
    counts, by_relation, rows = {}, defaultdict(Counter), {}
    for kind, mask in masks.items():
        sub = j.filter(mask)
        counts[kind] = sub.num_rows
        sub = (
            sub.append_column("label_s", pc.coalesce(sub["subject_label_b"], sub["subject_label_a"]))
            .append_column("label_o", pc.coalesce(sub["object_label_b"], sub["object_label_a"]))
            .append_column("lemma", pc.coalesce(sub["relation_lemma_b"], sub["relation_lemma_a"]))
        )
        if kind != "unchanged":
            for r in sub.group_by(["lemma"]).aggregate([([], "count_all")]).to_pylist():
                by_relation[r["lemma"]][kind] = r["count_all"]
        order = [(c, "ascending") for c in KEY]
        if examples is not None and sub.num_rows > examples:  # the first N by key without sorting them all
            sub = sub.take(pc.select_k_unstable(sub, k=examples, sort_keys=order))
        sub = sub.sort_by(order)
        rows[kind] = [
            {**{c: r[c] for c in KEY}, "subject_label": r["label_s"], "object_label": r["label_o"],
             "relation_lemma": r["lemma"], "confidence_a": r["confidence_a"], "confidence_b": r["confidence_b"]}
            for r in sub.to_pylist()
        ]  # fmt: skip
    return TripletDiff(counts, dict(by_relation), rows)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(a: RunRecord, b: RunRecord) -> list[tuple[str, object, object]]:
    """(setting, value in A, value in B) for every config field that differs, plus differing model revisions."""
    fa, fb = _flat(a.config), _flat(b.config)
    fa.update({f"revision.{k}": v for k, v in _flat(a.revisions).items()})
    fb.update({f"revision.{k}": v for k, v in _flat(b.revisions).items()})
    return [(k, fa.get(k), fb.get(k)) for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)]


def shared_stages(a: RunRecord, b: RunRecord) -> list[str]:
    """The stages whose outputs the two runs share (same key), in chain order."""
    kb = dict(b.stage_keys)
    return [s for s, k in a.stage_keys if kb.get(s) == k]


def compare_html(a: RunRecord, b: RunRecord, diff: TripletDiff, examples: int = 50) -> str:
    """A page saying which triplets run B adds, drops and rescores against run A, with examples."""
    c = diff.counts
    differs = config_differences(a, b)
    shared = shared_stages(a, b)
    head = _table(
        ["", "run A", "run B"],
        [["run key", f"<code>{_e(a.run_key)}</code>", f"<code>{_e(b.run_key)}</code>"],
         ["dataset / plan", _e(f"{a.dataset} / {a.plan_key}"), _e(f"{b.dataset} / {b.plan_key}")],
         ["created", _e(a.created_at), _e(b.created_at)],
         ["triplets", f"{c['dropped'] + c['rescored'] + c['unchanged']:,}", f"{c['added'] + c['rescored'] + c['unchanged']:,}"]],
    )  # fmt: skip
    settings = (
        _table(["setting", "run A", "run B"], [[_e(k), _e(va), _e(vb)] for k, va, vb in differs], "settings")
        if differs
        else "<p>The two runs have the same settings.</p>"
    )
    shared_p = f"<p>Shared stage outputs (same key): {_e(', '.join(shared) or 'none')}.</p>"
    counts = _table(
        ["triplets", "count"],
        [[f'<span class="{k}">{k}</span>', f'<span class="num">{v:,}</span>'] for k, v in c.items()],
        "counts",
    )
    rel_rows = [
        [_e(r), *(f'<span class="num">{cnt[k]:,}</span>' for k in ("added", "dropped", "rescored"))]
        for r, cnt in sorted(diff.by_relation.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:30]
    ]
    by_rel = _table(["relation (lemma)", "added", "dropped", "rescored"], rel_rows) if rel_rows else ""

    def conf(x):
        return "" if x is None else f"{x:.4f}"

    sections = [
        ("summary", "Runs", head + settings + shared_p),
        ("counts", "Added, dropped, rescored", counts + by_rel),
    ]
    for kind in ("added", "dropped", "rescored"):
        rows = []
        for r in diff.rows[kind][:examples]:
            rows.append([str(r["image_id"]), _e(f"{r['subject_label']} ({r['subject_ann_id']})"), _e(r["relation"]),
                         _e(f"{r['object_label']} ({r['object_ann_id']})"), conf(r["confidence_a"]),
                         conf(r["confidence_b"])])  # fmt: skip
        n = diff.counts[kind]
        body = (
            f"<p>{n:,} triplets; the first {min(n, examples)} by (image, subject, object, relation).</p>"
            + _table(
                ["image", "subject (box)", "relation", "object (box)", "confidence A", "confidence B"],
                rows,
                kind,
            )
            if n
            else "<p>none</p>"
        )
        sections.append((kind, kind.capitalize(), body))
    title = f"reltag compare: run {a.run_key} (A) vs run {b.run_key} (B)"
    return _page(title, [(x, t) for x, t, _ in sections], sections)
