"""The `pretrain` flow: RLIPv2-ParSeDA (or -ParSeD) pre-training on finished runs (models/rlipv2/pretrain.py does
the work), and `pretrain-on-label`, which an event trigger starts when a labelling run completes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.params import read_config_file
from models.rlipv2.pretrain import StepInfo
from models.rlipv2.pretrain_settings import PretrainSettings, to_flags
from models.rlipv2.pretrain_state import LOSS_LOG, CheckpointStore, LossLog, run_identity


class PretrainParams(BaseModel):
    """Parameters of `pretrain`: the sources, the output root and the training settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: list[str] = Field(
        min_length=1, description="finished runs / VG-format relationship files to mix"
    )
    out: str = Field(
        description="output root; training goes to <out>/<identity>/ (checkpoints/, loss_log.jsonl)"
    )
    settings: PretrainSettings = PretrainSettings()
    nproc_per_node: int = Field(
        1, ge=1, description="processes (GPUs) on this machine; > 1 launches torchrun"
    )
    log_every: int = Field(50, ge=1, description="log a loss line every N steps")
    label_run: str | None = Field(None, description="the labelling run key that started this run (a record)")

    @field_validator("sources")
    @classmethod
    def _absolute(cls, v):
        return [s if "://" in s else os.path.abspath(os.path.expanduser(s)) for s in v]

    @field_validator("out")
    @classmethod
    def _absolute_out(cls, v):
        if "://" in v:
            raise ValueError(f"out {v!r}: pre-training writes to a local (or mounted) folder, not a URI")
        return os.path.abspath(os.path.expanduser(v))

    def identity(self) -> str:
        return run_identity(self.sources, self.settings, self.nproc_per_node)

    def run_dir(self) -> str:
        return os.path.join(self.out, self.identity())


def _on_gpu(settings: PretrainSettings) -> bool:
    return not settings.device.startswith("cpu")


class _Progress:
    """A rich progress bar over the steps when stdout is a terminal; a log line every `every` steps."""

    def __init__(self, every: int):
        self.every, self.bar, self.task = every, None, None

    def __enter__(self):
        if sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
            )  # fmt: skip
            self.bar.__enter__()
        return self

    def step(self, info: StepInfo) -> None:
        r = info.record
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task(
                    "pretrain", total=info.total_steps, completed=r["step"] - 1, loss=""
                )
            self.bar.update(self.task, completed=r["step"], loss=f"{r['loss']:.4f}")
        if r["step"] % self.every == 0 or r["step"] == info.total_steps:
            get_run_logger().info(
                "step %d/%d epoch %d: loss %.4f (l1 %.4f giou %.4f cls %.4f rel %.4f noobj %.4f) lr %.3g, %.2f s",
                r["step"], info.total_steps, r["epoch"], r["loss"], r["loss_l1"], r["loss_giou"], r["loss_cls"],
                r["loss_rel"], r["loss_noobj"], r["lr"], r["seconds"],
            )  # fmt: skip

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


def _train_in_process(params: PretrainParams, run_dir: str) -> dict:
    from models.rlipv2.pretrain import pretrain

    log = get_run_logger()
    with _Progress(params.log_every) as prog:
        res = pretrain(
            params.sources,
            run_dir,
            params.settings,
            on_step=prog.step,
            on_checkpoint=lambda e: log.info("checkpoint step %d -> %s", e["step"], e["dir"]),
        )
    return {"total_steps": res.total_steps, "resumed_from": res.resumed_from}


def torchrun_command(params: PretrainParams, run_dir: str) -> list[str]:
    """python -m torch.distributed.run --nproc_per_node N -m models.rlipv2.pretrain with the settings as flags."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={params.nproc_per_node}",
    ]
    cmd += ["-m", "models.rlipv2.pretrain", "--out", run_dir]
    for s in params.sources:
        cmd += ["--source", s]
    return cmd + to_flags(params.settings)


def _train_torchrun(params: PretrainParams, run_dir: str) -> dict:
    log = get_run_logger()
    cmd = torchrun_command(params, run_dir)
    log.info("launching %d processes: %s", params.nproc_per_node, " ".join(cmd))
    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=repo
    )
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-40:]
        if line.startswith("step ") or line.startswith("checkpoint"):
            print(line, flush=True)
    rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"torchrun exited with {rc}; last output:\n" + "\n".join(tail))
    import re

    m = re.search(r"^(\d+) steps \(resumed from (None|\d+)\)", "\n".join(tail), re.M)  # rank 0's last line
    resumed = None if m is None or m[2] == "None" else int(m[2])
    return {"total_steps": int(m[1]) if m else None, "resumed_from": resumed}


def _pretrain_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters.get("params")
    p = p if isinstance(p, PretrainParams) else PretrainParams.model_validate(p)
    return f"pretrain {p.label_run}" if p.label_run else f"pretrain {p.identity()}"


@flow(name="pretrain", flow_run_name=_pretrain_run_name, log_prints=True)
def pretrain_flow(params: PretrainParams) -> dict:
    """Pre-train RLIPv2-ParSeDA or -ParSeD (settings.model) on the sources; a rerun resumes from the last
    checkpoint of the same settings."""
    from prefect.concurrency.sync import concurrency

    t0 = time.perf_counter()
    run_dir = params.run_dir()
    log = get_run_logger()
    log.info("pre-training on %d source(s) into %s", len(params.sources), run_dir)
    train = _train_in_process if params.nproc_per_node == 1 else _train_torchrun
    if _on_gpu(params.settings):
        with concurrency("gpu", occupy=params.nproc_per_node):  # one slot per GPU (a no-op without the limit)
            info = train(params, run_dir)
    else:
        info = train(params, run_dir)
    history = LossLog.read(os.path.join(run_dir, LOSS_LOG))
    checkpoints = CheckpointStore(run_dir).index()["checkpoints"]
    publish_artifacts(history, checkpoints, run_dir)
    return {
        "run_dir": run_dir,
        "identity": params.identity(),
        "steps": len(history),
        "resumed_from": info["resumed_from"],
        "final_loss": history[-1]["loss"] if history else None,
        "checkpoints": [c["dir"] for c in checkpoints],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def loss_rows(history: list[dict], max_rows: int = 200) -> list[dict]:
    """The loss curve as table rows: every k-th step (k so that at most max_rows rows) and always the last."""
    if not history:
        return []
    k = max(1, -(-len(history) // max_rows))
    picked = [h for h in history if h["step"] % k == 0]
    if picked[-1:] != history[-1:]:
        picked.append(history[-1])
    cols = ("step", "epoch", "loss", "loss_l1", "loss_giou", "loss_cls", "loss_rel", "loss_noobj", "lr")
    return [{c: (round(h[c], 6) if isinstance(h[c], float) else h[c]) for c in cols} for h in picked]


def checkpoints_markdown(checkpoints: list[dict], run_dir: str) -> str:
    lines = [f"### Checkpoints of `{run_dir}`", "", "| step | epochs done | loss | revision | folder | saved |",
             "|---:|---:|---:|---|---|---|"]  # fmt: skip
    for c in checkpoints:
        loss = "" if c.get("loss") is None else f"{c['loss']:.4f}"
        lines.append(
            f"| {c['step']} | {c.get('epochs_done', '')} | {loss} | `{c['revision']}` | "
            f"`{os.path.join(run_dir, 'checkpoints', c['dir'])}` | {c['saved_at']} |"
        )
    return "\n".join(lines) + "\n"


def publish_artifacts(history: list[dict], checkpoints: list[dict], run_dir: str) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(
        key="pretrain-loss", table=loss_rows(history), description=f"loss per step (sampled), {run_dir}"
    )
    create_markdown_artifact(
        key="pretrain-checkpoints", markdown=checkpoints_markdown(checkpoints, run_dir),
        description="checkpoints kept (newest last)",
    )  # fmt: skip


def _hook_run_name() -> str:
    from prefect.runtime import flow_run

    return "pretrain on " + str(flow_run.parameters.get("label_flow_run", "")).removeprefix(
        "prefect.flow-run."
    )


@flow(name="pretrain-on-label", flow_run_name=_hook_run_name)
def pretrain_on_label(label_flow_run: str) -> str | None:
    """Started by the deployment trigger on a labelling flow run's Completed event: reads that flow run's
    parameters, and when its config has `trigger: {via: event}` and the run is finished, starts the trigger's
    deployment once for the run key (idempotency key). Returns the started (or existing) flow run id."""
    from prefect.client.orchestration import get_client

    from flows.label import start_pretraining
    from flows.params import LabelParams
    from flows.status import finished_summary
    from tasks.stages.plan.start import run_context

    log = get_run_logger()
    fr_id = label_flow_run.removeprefix("prefect.flow-run.")
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(fr_id)
    params = LabelParams.model_validate(fr.parameters["params"])
    trig = params.config.trigger
    if trig is None or trig.via != "event":
        log.info("flow run %s: its config has no event trigger; nothing to start", fr.name)
        return None
    if finished_summary(params) is None:
        log.warning("flow run %s completed but its run is not finished; nothing started", fr.name)
        return None
    ctx = run_context(
        params.annotations, params.images, params.out, params.captions, params.dataset_name, params.config
    ).ctx
    return start_pretraining(ctx, params.out, via="event")


def params_from_cli(args) -> PretrainParams:
    """PretrainParams from `reltag pretrain` flags: --config (YAML/JSON mapping of PretrainSettings fields)
    with --steps, --device, --batch-size, --model, --tiny on top. Raises ValueError (pydantic's included) on a bad value."""
    import dataclasses

    data: dict = {}
    if args.settings:
        data = read_config_file(args.settings)
        known = {f.name for f in dataclasses.fields(PretrainSettings)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config file {args.settings}: unknown fields {unknown}; known: {sorted(known)}")
        if "loss" in data and not isinstance(data["loss"], dict):
            raise ValueError(f"config file {args.settings}: loss must be a mapping of LossSettings fields")
        from models.rlipv2.criterion import LossSettings

        loss_known = {f.name for f in dataclasses.fields(LossSettings)}
        loss_unknown = sorted(set(data.get("loss", {})) - loss_known)
        if loss_unknown:
            raise ValueError(
                f"config file {args.settings}: unknown loss fields {loss_unknown}; known: {sorted(loss_known)}"
            )
    for flag, field in (
        ("steps", "max_steps"),
        ("device", "device"),
        ("batch_size", "batch_size"),
        ("model", "model"),
    ):
        if getattr(args, flag, None) is not None:
            data[field] = getattr(args, flag)
    if args.tiny:
        data["tiny"] = True
    for src in args.source:
        if "://" not in src and not os.path.exists(src):
            raise ValueError(f"source {src!r} does not exist")
    return PretrainParams(
        sources=args.source, out=args.out, settings=data, nproc_per_node=args.nproc_per_node,
        log_every=args.log_every,
    )  # fmt: skip


def run_in_process(params: PretrainParams) -> dict:
    """Run the `pretrain` flow here (a temporary Prefect server when PREFECT_API_URL is unset, as `reltag run`)."""
    from flows.local import temporary_server_settings

    with temporary_server_settings():
        return pretrain_flow(params)
