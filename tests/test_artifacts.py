"""Prefect artifacts of a run (flows/artifacts.py): published under stable keys per dataset, read back through
the Prefect API."""

from __future__ import annotations

import json
import os

import pytest

from flows.artifacts import TOP_RELATIONS, artifact_keys, dataset_slug, funnel_rows, summary_markdown

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def test_dataset_slug_is_a_valid_artifact_key_part():
    assert dataset_slug("Objects365 v2") == "objects365-v2"
    assert dataset_slug("COCO_val2017/") == "coco-val2017"
    assert dataset_slug("---") == "dataset" and dataset_slug("") == "dataset"
    assert artifact_keys("COCO") == {
        "summary": "reltag-coco-summary",
        "funnel": "reltag-coco-funnel",
        "relations": "reltag-coco-relations",
        "eta-sweep": "reltag-coco-eta-sweep",
        "report": "reltag-coco-report",
    }


def _summary():
    return {
        "run_key": "abc123",
        "dataset": "t",
        "output": "/x/t/p",
        "shards": 1,
        "images": 3,
        "triplets": 2,
        "images_with_triplets": 1,
        "funnel": [
            {"stage": "accepted", "label": "accepted", "count": 2, "dropped": {"below_eta": 4, "x|y": 1}}
        ],
        "relation_histogram": {"on": 2},
        "eta_sweep": [],
        "unmatched_nouns": [{"noun": "blorft", "count": 2, "examples": ["a blorft on a mat"]}],
        "classes_without_synonyms": ["Widget"],
    }


def test_summary_markdown_names_the_run_its_funnel_and_what_is_missing():
    md = summary_markdown(_summary(), "file:///x/t/p/report/abc123.html")
    assert "`abc123`" in md and "| accepted | accepted | 2 | below_eta: 4, x\\|y: 1 |" in md
    assert "| blorft | 2 | a blorft on a mat |" in md and "Widget" in md
    assert "file:///x/t/p/report/abc123.html" in md
    assert funnel_rows(_summary())[0]["dropped"] == "below_eta: 4, x|y: 1"
    assert "Matching yield: not recorded." in md  # a run from before the yield statistics


def test_summary_markdown_gives_the_matching_yield_and_the_top_extensions():
    y = {
        "relations": 10, "relations_with_candidates": 4, "yield": 0.4,
        "lost": {"no_object_match": 5, "partitive_link": 1}, "partitive_matches": {"group": 1},
        "extension_candidates": [["kid -> person", 3], ["table -> dining table", 1]],
    }  # fmt: skip
    md = summary_markdown({**_summary(), "matching_yield": y}, "r.html")
    assert (
        "Matching yield: 4 of 10 parsed relations became candidates (0.400); lost: no_object_match 5, "
        "partitive_link 1; top synonym extensions: kid -> person (3), table -> dining table (1)"
    ) in md


def _read(keys: dict[str, str]):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys.values()))),
            sort=ArtifactSort.CREATED_DESC,
        )


@pytest.mark.flow
def test_each_run_publishes_its_audit_under_the_datasets_keys(prefect_harness, tmp_path):
    from flows.label import label_dataset
    from flows.params import LabelParams
    from tasks.config import PipelineConfig

    def run(eta):
        return label_dataset(
            LabelParams(
                annotations=os.path.join(EXAMPLES, "sample_detections.json"),
                images=os.path.join(EXAMPLES, "images"),
                captions=os.path.join(EXAMPLES, "sample_captions.json"),
                out=str(tmp_path / "out"),
                dataset="Sample.Set_1",
                config=PipelineConfig.model_validate({"threshold": {"eta": eta}}),
            )
        )

    first = run(0.2)
    keys = artifact_keys("Sample.Set_1")
    assert keys["summary"] == "reltag-sample-set-1-summary"
    arts = _read(keys)
    by_key = {a.key: a for a in arts}
    assert set(by_key) == set(keys.values())
    assert {by_key[keys[k]].type for k in ("funnel", "relations", "eta-sweep")} == {"table"}
    # (Prefect stores a link artifact as markdown: "[text](link)")
    assert by_key[keys["summary"]].type == by_key[keys["report"]].type == "markdown"
    assert len({a.flow_run_id for a in arts}) == 1 and arts[0].flow_run_id is not None  # the flow run's own
    funnel = json.loads(by_key[keys["funnel"]].data)
    assert [(r["stage"], r["count"]) for r in funnel] == [(f["stage"], f["count"]) for f in first["funnel"]]
    assert funnel[-1]["count"] == first["triplets"]
    relations = json.loads(by_key[keys["relations"]].data)
    assert (
        relations
        == [{"relation": k, "count": n} for k, n in first["relation_histogram"].items()][:TOP_RELATIONS]
    )
    sweep = json.loads(by_key[keys["eta-sweep"]].data)
    assert sweep == first["eta_sweep"] and len(sweep) == 38
    report = os.path.join(first["output"], "report", f"{first['run_key']}.html")
    assert (
        by_key[keys["report"]].data == f"[report of run {first['run_key']} of Sample.Set_1](file://{report})"
    )
    assert first["run_key"] in by_key[keys["summary"]].data

    # a second run of the dataset (another eta) publishes under the same keys: the UI keeps both, newest first
    second = run(0.95)
    assert second["run_key"] != first["run_key"]
    summaries = [a for a in _read(keys) if a.key == keys["summary"]]
    assert len(summaries) == 2
    assert second["run_key"] in summaries[0].data and first["run_key"] in summaries[1].data
