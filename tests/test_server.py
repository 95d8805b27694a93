"""A real deployment: PostgreSQL + `prefect server` + a process work pool + `prefect deploy` + a worker.

Everything runs on loopback in temporary folders and is stopped at the end. Skipped (by marker) where the
PostgreSQL server binaries are not installed; `.ci/run` installs them.
"""

from __future__ import annotations

import glob
import json
import re
import time
import urllib.request

import pyarrow.parquet as pq

from tests.server_helpers import REPO, SERVER_MARKS, postgres, prefect_server  # noqa: F401  (fixture)

pytestmark = SERVER_MARKS


def test_deployment_runs_on_a_prefect_server_backed_by_postgres(postgres, tmp_path):  # noqa: F811
    with prefect_server(postgres, tmp_path) as srv:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/", timeout=10) as r:  # the UI is served too
            assert r.status == 200 and b"<html" in r.read(2000).lower()
        out = tmp_path / "out"
        params = {
            "params": {
                "annotations": str(REPO / "examples" / "sample_detections.json"),
                "images": str(REPO / "examples" / "images"),
                "captions": str(REPO / "examples" / "sample_captions.json"),
                "out": str(out),
                "dataset": "sample",
            }
        }
        run = srv.cli("deployment", "run", "label-dataset/label-dataset", "--params", json.dumps(params))
        assert "label-dataset/label-dataset" in run.stdout
        worker = srv.worker("worker", "--run-once")
        worker.wait(timeout=600)
        triplets = glob.glob(str(out / "sample" / "*" / "triplets" / "*" / "shard-00000.parquet"))
        assert triplets, f"no triplets written; worker log:\n{srv.log('worker')[-4000:]}"
        assert pq.read_table(triplets[0]).num_rows > 0
        runs = srv.post("flow_runs/filter")
        assert [(fr["name"], fr["state_type"]) for fr in runs] == [("label sample", "COMPLETED")]
        # the run's audit is in the server's artifacts, under the dataset's keys, attached to the flow run
        from flows.artifacts import artifact_keys

        keys = sorted(artifact_keys("sample").values())
        arts = srv.post("artifacts/filter", {"artifacts": {"key": {"any_": keys}}})
        assert sorted(a["key"] for a in arts) == keys and {a["flow_run_id"] for a in arts} == {runs[0]["id"]}

        # many workers: the fan-out flow starts one label-shard flow run per shard; two workers take them
        fan = tmp_path / "fan"
        fparams = {
            "params": {
                **params["params"],
                "out": str(fan),
                "config": {"plan": {"shard_size": 2, "batch_size": 1}},
            }
        }  # 5 images: 3 shards
        srv.cli(
            "deployment", "run", "label-dataset-fanout/label-dataset-fanout", "--params", json.dumps(fparams)
        )
        for i in (1, 2):
            srv.worker(f"fan-{i}", "--limit", "2")
        deadline = time.time() + 600
        while True:
            runs = srv.post("flow_runs/filter")
            parent = [fr for fr in runs if fr["name"] == "label sample over workers"]
            if parent and parent[0]["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert time.time() < deadline, "fan-out did not finish: " + "".join(
                srv.log(f"fan-{i}")[-2000:] for i in (1, 2)
            )
            time.sleep(2)
        logs = "".join(srv.log(f"fan-{i}") for i in (1, 2))
        assert parent[0]["state_type"] == "COMPLETED", logs[-4000:]
        shard_runs = sorted(fr["name"] for fr in runs if fr["name"].startswith("label sample shard-"))
        assert shard_runs == [f"label sample shard-0000{i}" for i in range(3)]
        assert all(fr["state_type"] == "COMPLETED" for fr in runs), [
            (fr["name"], fr["state_type"]) for fr in runs
        ]
        # the parent and the three shards were each submitted by one of the two workers (a worker may log a
        # submission attempt it then loses to the other, so ids are compared, not lines counted)
        submitted = set(re.findall(r"submitting flow run '([0-9a-f-]{36})'", logs))
        assert submitted == {fr["id"] for fr in runs if fr["name"].startswith("label sample ")} - {
            fr["id"] for fr in runs if fr["name"] == "label sample"
        }
        files = sorted(glob.glob(str(fan / "sample" / "*" / "triplets" / "*" / "shard-*.parquet")))
        assert (
            len(files) == 3
            and sum(pq.read_table(f).num_rows for f in files) == pq.read_table(triplets[0]).num_rows
        )
