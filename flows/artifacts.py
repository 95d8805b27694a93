"""The audit of a run as Prefect artifacts: a markdown summary, funnel / top relations / eta sweep tables and a
link to the HTML report, under stable keys per dataset so that the Prefect UI shows every run's history."""

from __future__ import annotations

import re

#: rows of the top relations table
TOP_RELATIONS = 20
#: unmatched nouns listed in the markdown summary
TOP_NOUNS = 10


def dataset_slug(dataset: str) -> str:
    """The dataset's name as an artifact key part: lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", dataset.lower()).strip("-")
    return slug or "dataset"


def artifact_keys(dataset: str) -> dict[str, str]:
    """The keys a run of `dataset` publishes under, by artifact: summary, funnel, relations, eta-sweep, report."""
    base = f"reltag-{dataset_slug(dataset)}"
    return {k: f"{base}-{k}" for k in ("summary", "funnel", "relations", "eta-sweep", "report")}


def funnel_rows(summary: dict) -> list[dict]:
    return [
        {
            "stage": f["stage"],
            "label": f["label"],
            "count": f["count"],
            "dropped": ", ".join(f"{r}: {n}" for r, n in f["dropped"].items()),
        }
        for f in summary["funnel"]
    ]


def relation_rows(summary: dict) -> list[dict]:
    return [
        {"relation": rel, "count": n}
        for rel, n in list(summary["relation_histogram"].items())[:TOP_RELATIONS]
    ]


def sweep_rows(summary: dict) -> list[dict]:
    return [dict(r) for r in summary["eta_sweep"]]


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(summary: dict, report_link: str) -> str:
    """The run at a glance: counts, funnel, top unmatched nouns, classes without synonyms, where the rest is."""
    nouns = [
        {"noun": u["noun"], "count": u["count"], "example": (u["examples"] or [""])[0]}
        for u in summary["unmatched_nouns"][:TOP_NOUNS]
    ]
    missing = summary["classes_without_synonyms"]
    y = summary.get("matching_yield") or {}
    yield_line = (
        f"Matching yield: {y['relations_with_candidates']} of {y['relations']} parsed relations became candidates "
        f"({y['yield']:.3f}); lost: " + (", ".join(f"{k} {v}" for k, v in y["lost"].items()) or "none")
        + ("; top synonym extensions: " + ", ".join(f"{k} ({n})" for k, n in y["extension_candidates"][:5])
           if y.get("extension_candidates") else "")
        if y else "Matching yield: not recorded."
    )  # fmt: skip
    return "\n".join(
        [
            f"# reltag run `{summary['run_key']}` ({summary['dataset']})",
            "",
            f"{summary['images']} images, {summary['triplets']} accepted triplets on "
            f"{summary['images_with_triplets']} images, {summary['shards']} shard(s).",
            "",
            f"Output: `{summary['output']}`; statistics: `stats/{summary['run_key']}/run.json` and "
            f"`*.parquet` beside it; report: {report_link}",
            "",
            "## Funnel",
            "",
            _md_table(funnel_rows(summary)),
            yield_line,
            "",
            f"## Unmatched head nouns (top {TOP_NOUNS} of {len(summary['unmatched_nouns'])})",
            "",
            _md_table(nouns),
            f"## Classes without a synonym list: {len(missing)}",
            "",
            ", ".join(missing) if missing else "(none)",
            "",
        ]
    )


def publish_run_artifacts(summary: dict, report_link: str) -> dict[str, str]:
    """Publish the run's artifacts (inside a flow run, they attach to it); returns {artifact: key}.

    Args:
        summary: the run's run.json (tasks.stages.write.rollup_stats).
        report_link: URL of the run's HTML report (`<plan folder>/report/<run_key>.html`).
    """
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    keys = artifact_keys(summary["dataset"])
    run = f"run {summary['run_key']} of {summary['dataset']}"
    create_markdown_artifact(summary_markdown(summary, report_link), key=keys["summary"], description=run)
    create_table_artifact(funnel_rows(summary), key=keys["funnel"], description=f"funnel of {run}")
    create_table_artifact(
        relation_rows(summary), key=keys["relations"], description=f"top {TOP_RELATIONS} relations of {run}"
    )
    create_table_artifact(sweep_rows(summary), key=keys["eta-sweep"], description=f"eta sweep of {run}")
    create_link_artifact(
        report_link, link_text=f"report of {run}", key=keys["report"], description=f"HTML report of {run}"
    )
    return keys
