"""Run B against run A: the triplets B adds, drops and rescores, and the page that shows them."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from storage.manifest import RunRecord
from tasks.audit.html import _e, _page, _table

#: A triplet's identity within a run: (image, subject box, object box, relation text). The match stage keys its
#: candidates the same way (tasks/stages/match.py), so a run never holds two triplets with one key; the lemma is not
#: enough ("sitting on" and "sits on" share the lemma "sit on" and are separate candidates).
KEY = ("image_id", "subject_ann_id", "object_ann_id", "relation")
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
