"""The audit page of one run, self-contained HTML (inline CSS, plots and photos as data URIs, no script)."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from storage import schemas
from storage.manifest import RunRecord
from storage.records import ImageRecord, Triplet
from tasks.audit.html import _e, _page, _table
from tasks.audit.visualize import draw_triplets

SCORES = ("p_subject", "p_object", "p_relation", "confidence")
NOT_AVAILABLE = "not available for this run"

#: The columns the gallery's picks and the page's summary read of every triplet.
PICK_COLUMNS = ["image_id", "relation_lemma", "subject_label", "object_label"]


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


def _yield(stats: dict) -> str:
    """Matching yield: how many parsed relations became candidates, what was lost and why, and what the
    partitive heads and the synonym extensions bought."""
    y = stats.get("matching_yield")
    if not y:
        return _na("the matching yield")
    lost = ", ".join(
        f"{_e(k)} {int(v):,}" for k, v in sorted(y["lost"].items(), key=lambda kv: (-kv[1], kv[0]))
    )
    parts = [
        f"<p>{int(y['relations_with_candidates']):,} of {int(y['relations']):,} parsed relations became candidates "
        f"(yield {float(y['yield']):.3f}). Lost: {lost or 'none'}.</p>"
    ]
    if y.get("partitive_matches"):
        part = ", ".join(f"{_e(k)} {int(v):,}" for k, v in y["partitive_matches"].items())
        parts.append(f"<p>Entities matched through a partitive head ('a group of sheep'): {part}.</p>")
    ext = y.get("extension_candidates") or []
    if ext:
        rows = [[_e(k), f'<span class="num">{int(n):,}</span>'] for k, n in ext]
        parts.append(_table(["synonym extension", "candidates it matched"], rows, "extensions"))
    else:
        parts.append("<p>No candidate came from a synonym extension (off, or none used).</p>")
    return "\n".join(parts)


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
        ("yield", "Matching yield", _yield(st)),
        ("nouns", "Unmatched nouns", _nouns(st)),
        ("lineage", "Settings and lineage", _lineage(data)),
    ]
    return _page(
        f"reltag audit: {rec.dataset} / run {rec.run_key}", [(a, t) for a, t, _ in sections], sections
    )
