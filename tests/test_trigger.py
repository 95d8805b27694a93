"""The trigger: a completed labelling run starts the pretrain deployment exactly once (idempotency key = run key),
from the flow (config `trigger`) or from the event trigger of prefect.yaml; tested on a real server."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import time

import pytest

from tasks.config import PipelineConfig, TriggerConfig
from tests.server_helpers import REPO, SERVER_MARKS, postgres, prefect_server  # noqa: F401  (fixture)

VG = str(REPO / "examples" / "vg_tiny" / "relationships.json")
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def test_the_trigger_section_changes_no_stage_key():
    from tasks.run.registry import chain

    inputs = {"annotations_sha256": "0" * 64}
    plain = chain(PipelineConfig(), inputs)
    trig = PipelineConfig(trigger={"deployment": "x/y", "parameters": {"a": "{run_key}"}, "via": "event"})
    assert chain(trig, inputs) == plain
    with pytest.raises(ValueError, match="via"):
        TriggerConfig(via="cron")


def test_trigger_parameters_fill_the_run_in_at_any_depth():
    from flows.label import trigger_parameters

    values = {"run_key": "abc", "run_dir": "/o/sample/p1", "run_record": "/o/sample/p1/runs/abc.json",
              "out": "/o", "dataset": "sample"}  # fmt: skip
    got = trigger_parameters(TriggerConfig().parameters, values)
    assert got == {
        "params": {"sources": ["/o/sample/p1/runs/abc.json"], "out": "/o/_pretrain", "label_run": "abc"}
    }
    tpl = {"p": {"n": 3, "s": ["{dataset}-{run_key}", "{other}", "{{ jinja }}"], "flag": True}}
    assert trigger_parameters(tpl, values) == {"p": {"n": 3, "s": ["sample-abc", "{other}", "{{ jinja }}"],
                                                     "flag": True}}  # fmt: skip


def _label_params(out, config: dict) -> dict:
    return {
        "params": {
            "annotations": str(REPO / "examples" / "sample_detections.json"),
            "images": str(REPO / "examples" / "images"),
            "captions": str(REPO / "examples" / "sample_captions.json"),
            "out": str(out),
            "dataset": "sample",
            "config": config,
        }
    }


def _run_key(out, eta: float) -> str:
    for path in glob.glob(str(out / "sample" / "*" / "runs" / "*.json")):
        rec = json.loads(open(path).read())
        if rec["config"]["threshold"]["eta"] == eta:
            return rec["run_key"]
    raise AssertionError(f"no run record with eta {eta} under {out}")


def _wait(srv, done, what: str, seconds: float = 600):
    deadline = time.time() + seconds
    while True:
        runs = srv.flow_runs()
        if done(runs):
            return runs
        if time.time() > deadline:
            states = [(fr["flow_name"], fr["name"], fr["state_type"]) for fr in runs]
            raise AssertionError(f"{what} within {seconds} s: {states}\n{srv.log('worker')[-4000:]}")
        time.sleep(2)


_RACE = """
import sys
from prefect.deployments import run_deployment
fr = run_deployment("pretrain/pretrain", parameters={"params": {"sources": [sys.argv[2]], "out": sys.argv[3]}},
                    timeout=0, idempotency_key=sys.argv[1])
print(fr.id)
"""


@SERVER_MARKS[0]
@SERVER_MARKS[1]
@SERVER_MARKS[2]
def test_labelling_twice_starts_one_pretraining_run_per_run_key(postgres, tmp_path):  # noqa: F811
    out, pt = tmp_path / "out", tmp_path / "pt"
    settings = {"tiny": True, "batch_size": 2, "max_steps": 2, "checkpoint_every": 2}
    trigger = {"deployment": "pretrain/pretrain",
               "parameters": {"params": {"sources": [VG], "out": str(pt), "label_run": "{run_key}",
                                         "settings": settings}}}  # fmt: skip
    with prefect_server(postgres, tmp_path) as srv:
        # 1. from the flow: label the same run twice (the second finds it finished), one pretrain run
        params = json.dumps(_label_params(out, {"trigger": trigger}))
        for _ in range(2):
            srv.cli("deployment", "run", "label-dataset/label-dataset", "--params", params)
        srv.worker("worker", "--limit", "3")

        def flow_path_done(runs):
            labels = [fr for fr in runs if fr["flow_name"] == "label-dataset"]
            pre = [fr for fr in runs if fr["flow_name"] == "pretrain"]
            return len(labels) == 2 and all(fr["state_type"] in FINAL for fr in labels + pre) and pre

        runs = _wait(srv, flow_path_done, "two labelling runs and their pretraining did not finish")
        key = _run_key(out, 0.2)
        labels = [fr for fr in runs if fr["flow_name"] == "label-dataset"]
        assert [fr["state_type"] for fr in labels] == ["COMPLETED", "COMPLETED"], srv.log("worker")[-4000:]
        pre = [fr for fr in runs if fr["flow_name"] == "pretrain"]
        assert [(fr["idempotency_key"], fr["name"], fr["state_type"]) for fr in pre] == [
            (key, f"pretrain {key}", "COMPLETED")
        ], srv.log("worker")[-4000:]
        assert glob.glob(str(pt / "*" / "checkpoints" / "step-00000002" / "model.safetensors"))

        # two callers at the same moment (two workers finishing one run): the server creates one flow run
        env = dict(srv.env, PYTHONPATH=str(REPO))
        racers = [subprocess.Popen([sys.executable, "-c", _RACE, key, VG, str(pt)], env=env, cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]  # fmt: skip
        ids = []
        for p in racers:
            o, e = p.communicate(timeout=120)
            assert p.returncode == 0, e[-2000:]
            ids.append(o.strip().splitlines()[-1])
        assert ids[0] == ids[1] == pre[0]["id"]
        assert len([fr for fr in srv.flow_runs() if fr["flow_name"] == "pretrain"]) == 1

        # 2. the event trigger of prefect.yaml (off by default): enable it, label another run twice
        autos = [a for a in srv.post("automations/filter") if "pretrain-on-label" in a["name"]]
        assert len(autos) == 1 and autos[0]["enabled"] is False
        srv.post(f"automations/{autos[0]['id']}", {"enabled": True}, method="PATCH")
        time.sleep(5)  # the server's triggers service picks the change up
        event_cfg = {"threshold": {"eta": 0.3}, "trigger": {**trigger, "via": "event"}}
        params = json.dumps(_label_params(out, event_cfg))
        for _ in range(2):
            srv.cli("deployment", "run", "label-dataset/label-dataset", "--params", params)

        def event_path_done(runs):
            labels = [fr for fr in runs if fr["flow_name"] == "label-dataset"]
            hooks = [fr for fr in runs if fr["flow_name"] == "pretrain-on-label"]
            pre = [fr for fr in runs if fr["flow_name"] == "pretrain"]
            return (len(labels) == 4 and len(hooks) == 2 and len(pre) == 2
                    and all(fr["state_type"] in FINAL for fr in labels + hooks + pre))  # fmt: skip

        runs = _wait(srv, event_path_done, "the event path did not finish")
        key2 = _run_key(out, 0.3)
        assert key2 != key
        hooks = [fr for fr in runs if fr["flow_name"] == "pretrain-on-label"]
        assert all(fr["state_type"] == "COMPLETED" for fr in hooks), srv.log("worker")[-4000:]
        pre = sorted(
            (fr["idempotency_key"], fr["state_type"]) for fr in runs if fr["flow_name"] == "pretrain"
        )
        assert pre == sorted([(key, "COMPLETED"), (key2, "COMPLETED")]), srv.log("worker")[-4000:]
