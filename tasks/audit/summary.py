"""The auditor's statistics of a shard or a run (funnel, histograms, eta sweep, unmatched nouns), as JSON and
as one typed Parquet table per kind."""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa

from storage.rules import RULES
from tasks.run import registry
from tasks.stats import ETAS, SCORES, Group, Histogram, Stats, Tally

#: plan quarantine reasons that drop an image (the others drop annotations, counted by the plan)
_IMAGE_REASONS = (
    "malformed_image", "missing_size", "unsafe_file_name", "duplicate_image_id",
    # the header checks (tasks/images.py)
    "missing_file", "unsafe_path", "read_error", "file_too_large", "decode_error", "too_large", "size_mismatch",
)  # fmt: skip

ETA_SWEEP_NOTE = (
    "Triplets (and images with at least one) that the threshold stage would accept at each eta under each "
    "confidence rule, recomputed from the stored scores of every tagged row (accepted + rejected). The run's "
    "overlap filter and top-K per pair are re-applied at each eta; rows of the CLIP tagger are held to the "
    "swept eta in place of clip_eta. Stages before the threshold (captions, matching, tagging) are not redone."
)


def _positive(d: Mapping[str, int]) -> dict[str, int]:
    return {k: v for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0])) if v}


def funnel(stages: Mapping[str, Stats], plan_counts: Mapping | None = None) -> list[dict]:
    """The funnel rows: {"stage", "label", "count", "dropped": {reason: count}}: the planned images, then
    every registered stage's funnel rows (tasks/run/registry.py FunnelRow) in pipeline order.

    `stages` holds the stage statistics by stage name and "shard" (planned images, triplets per image); drops
    are what is lost between the previous step and this one, by reason, in the previous step's units (images
    for captions, captions for relations, relations for matched, ...)."""
    plan_counts = plan_counts or {}
    shard = stages.get("shard") or Stats()
    rows = [
        {
            "stage": "images",
            "label": "images (planned)",
            "count": shard.count("images"),
            "dropped": _positive({r: plan_counts.get(f"quarantined_{r}", 0) for r in _IMAGE_REASONS}),
        }
    ]
    for st in registry.stages():
        mine = stages.get(st.name) or Stats()
        for row in st.funnel:
            rows.append(
                {"stage": row.step, "label": row.label, "count": mine.count(row.stat),
                 "dropped": _positive(row.drops(mine))}
            )  # fmt: skip
    return rows


def eta_sweep(threshold: Stats | None) -> list[dict]:
    """[{"eta", "rule", "triplets", "images"}] for every rule, then eta ascending."""
    tri = threshold.stat("sweep_triplets") if threshold is not None else None
    img = threshold.stat("sweep_images") if threshold is not None else None
    tri = dict(tri.counts) if tri is not None else {}
    img = dict(img.counts) if img is not None else {}
    return [
        {
            "eta": eta,
            "rule": rule,
            "triplets": tri.get((rule, f"{eta:.2f}"), 0),
            "images": img.get((rule, f"{eta:.2f}"), 0),
        }
        for rule in RULES
        for eta in ETAS
    ]


def unmatched_nouns(match: Stats | None) -> list[dict]:
    """[{"noun", "count", "examples"}], count descending then noun: head nouns that named no class."""
    if match is None or match.stat("top_unmatched_heads") is None:
        return []
    ex = match.stat("unmatched_examples")
    ex = ex.items if isinstance(ex, Group) else {}
    return [
        {"noun": noun, "count": n, "examples": ex[noun].view() if noun in ex else []}
        for noun, n in match.stat("top_unmatched_heads").most_common()
    ]


def matching_yield(match: Stats | None) -> dict:
    """Parsed relations -> relations that became candidates, the losses by reason (no_subject_match,
    no_object_match, no_match_either, partitive_link), and what the partitives and each synonym extension
    matched: {"relations", "relations_with_candidates", "yield", "lost", "partitive_matches",
    "extension_candidates": [[phrase -> class, candidates]]}; {} without match statistics."""
    if match is None or match.stat("relations") is None:
        return {}

    def tally(name):
        t = match.stat(name)
        return t if isinstance(t, Tally) else Tally()

    n, got = match.count("relations"), match.count("relations_with_candidates")
    return {
        "relations": n,
        "relations_with_candidates": got,
        "yield": round(got / n, 4) if n else 0.0,
        "lost": dict(tally("relations_unmatched").most_common()),
        "partitive_matches": dict(tally("partitive_matches").most_common()),
        "extension_candidates": [[k, v] for k, v in tally("extension_candidates").most_common()],
    }


def audit(stages: Mapping[str, Stats], plan_counts: Mapping | None, no_synonyms: list[str]) -> dict:
    """The auditor's statistics of a shard or a run, from its merged statistics (stages + "shard")."""
    thr = stages.get("threshold")

    def tally(name):
        st = thr.stat(name) if thr is not None else None
        return st if isinstance(st, Tally) else Tally()

    hists = {}
    for score in SCORES:
        h = thr.stat(f"hist_{score}") if thr is not None else None
        hists[score] = (h or Histogram()).view()
    per_image = stages["shard"].stat("triplets_per_image") if "shard" in stages else None
    return {
        "funnel": funnel(stages, plan_counts),
        "relation_histogram": dict(tally("relation_lemmas").most_common()),
        "class_pair_histogram": [[s, o, n] for (s, o), n in tally("class_pairs").most_common()],
        "score_histograms": hists,
        "eta_sweep": eta_sweep(thr),
        "eta_sweep_note": ETA_SWEEP_NOTE,
        "unmatched_nouns": unmatched_nouns(stages.get("match")),
        "matching_yield": matching_yield(stages.get("match")),
        "classes_without_synonyms": list(no_synonyms),
        "triplets_per_image": per_image.view() if per_image is not None else {},
    }


def classes_without_synonyms(vocab) -> list[str]:
    """Names of the dataset's categories that have no synonym list in the vocabulary (a models.matcher
    Vocabulary; such classes match by their own names only), in category order."""
    return [c.label for c in vocab.classes if not c.synonyms]


# -- Parquet -----------------------------------------------------------------------------------------------

#: One long table per kind of statistic, written beside run.json as stats/<run_key>/<name>.parquet.
TABLE_SCHEMAS: dict[str, pa.Schema] = {
    "funnel": pa.schema(
        [("position", pa.int32()), ("stage", pa.string()), ("label", pa.string()), ("count", pa.int64())]
    ),
    "funnel_drops": pa.schema([("stage", pa.string()), ("reason", pa.string()), ("count", pa.int64())]),
    "relation_histogram": pa.schema([("relation_lemma", pa.string()), ("count", pa.int64())]),
    "class_pair_histogram": pa.schema(
        [("subject_label", pa.string()), ("object_label", pa.string()), ("count", pa.int64())]
    ),
    "score_histograms": pa.schema(
        [
            ("score", pa.string()),
            ("bin", pa.int32()),
            ("lower", pa.float64()),
            ("upper", pa.float64()),
            ("count", pa.int64()),
        ]
    ),
    "eta_sweep": pa.schema(
        [("rule", pa.string()), ("eta", pa.float64()), ("triplets", pa.int64()), ("images", pa.int64())]
    ),
    "unmatched_nouns": pa.schema(
        [("noun", pa.string()), ("count", pa.int64()), ("examples", pa.list_(pa.string()))]
    ),
    "classes_without_synonyms": pa.schema([("class_name", pa.string())]),
    "extension_candidates": pa.schema([("extension", pa.string()), ("candidates", pa.int64())]),
    "triplets_per_image": pa.schema([("triplets", pa.int32()), ("images", pa.int64())]),
}


def audit_tables(a: Mapping) -> dict[str, pa.Table]:
    """The audit as one typed Arrow table per kind (TABLE_SCHEMAS), rows in the JSON's order."""
    rows: dict[str, list[dict]] = {
        "funnel": [
            {"position": i, "stage": f["stage"], "label": f["label"], "count": f["count"]}
            for i, f in enumerate(a["funnel"])
        ],
        "funnel_drops": [
            {"stage": f["stage"], "reason": r, "count": n}
            for f in a["funnel"]
            for r, n in f["dropped"].items()
        ],
        "relation_histogram": [{"relation_lemma": k, "count": n} for k, n in a["relation_histogram"].items()],
        "class_pair_histogram": [
            {"subject_label": s, "object_label": o, "count": n} for s, o, n in a["class_pair_histogram"]
        ],
        "score_histograms": [
            {"score": score, "bin": i, "lower": h["edges"][i], "upper": h["edges"][i + 1], "count": n}
            for score, h in a["score_histograms"].items()
            for i, n in enumerate(h["counts"])
        ],
        "eta_sweep": [
            {"rule": r["rule"], "eta": r["eta"], "triplets": r["triplets"], "images": r["images"]}
            for r in a["eta_sweep"]
        ],
        "unmatched_nouns": [
            {"noun": u["noun"], "count": u["count"], "examples": u["examples"]} for u in a["unmatched_nouns"]
        ],
        "classes_without_synonyms": [{"class_name": c} for c in a["classes_without_synonyms"]],
        "extension_candidates": [
            {"extension": k, "candidates": n}
            for k, n in a.get("matching_yield", {}).get("extension_candidates", [])
        ],
        "triplets_per_image": [{"triplets": int(k), "images": n} for k, n in a["triplets_per_image"].items()],
    }
    return {name: pa.Table.from_pylist(rows[name], schema=schema) for name, schema in TABLE_SCHEMAS.items()}
