"""The `reltag` command line: plan, run, status, stats, show, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# flag -> (config section, field, type); every flag overrides the config file
OVERRIDES = {
    "dataset": (None, "dataset", str),
    "shard_size": ("plan", "shard_size", int),
    "batch_size": ("plan", "batch_size", int),
    "box_policy": ("plan", "box_policy", str),
    "captioner": ("caption", "captioner", str),
    "caption_model": ("caption", "model", str),
    "caption_revision": ("caption", "model_revision", str),
    "n_cap": ("caption", "n_cap", int),
    "top_p": ("caption", "top_p", float),
    "top_k": ("caption", "top_k", int),
    "blip2_model": ("caption", "blip2_model", str),
    "caption_batch_size": ("caption", "batch_size", int),
    "caption_dtype": ("caption", "dtype", str),
    "caption_device": ("caption", "device", str),
    "parse_processes": ("parse", "processes", int),
    "parse_gemm": ("parse", "gemm", str),
    "vocabulary": ("match", "vocabulary", str),
    "match_mode": ("match", "mode", str),
    "tagger": ("tag", "tagger", str),
    "checkpoint": ("tag", "checkpoint", str),
    "tag_device": ("tag", "device", str),
    "tag_grouping": ("tag", "grouping", str),
    "tag_texts": ("tag", "texts", str),
    "clip_model": ("tag", "clip_model", str),
    "eta": ("threshold", "eta", float),
    "rule": ("threshold", "rule", str),
    "clip_eta": ("threshold", "clip_eta", float),
    "top_k_relations": ("threshold", "top_k", int),
}


def load_config(path: str | None, args: argparse.Namespace):
    """Config file (YAML or JSON) with the command-line flags applied on top."""
    from tasks.config import PipelineConfig

    data: dict = {}
    if path:
        text = Path(path).read_text()
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    for flag, (section, field, _) in OVERRIDES.items():
        v = getattr(args, flag, None)
        if v is None:
            continue
        if field == "captioner" and "," in v:
            v = tuple(x.strip() for x in v.split(","))
        if section is None:
            data[field] = v
        else:
            data.setdefault(section, {})[field] = v
    return PipelineConfig.model_validate(data)


def _add_run_args(p: argparse.ArgumentParser, inputs: bool = True) -> None:
    if inputs:
        p.add_argument("--annotations", required=True, help="COCO / Objects365 detection JSON")
        p.add_argument("--images", required=True, help="image folder the file_name entries are relative to")
        p.add_argument("--captions", help="COCO-Captions JSON (for the oracle captioner)")
    p.add_argument("--out", required=True, help="output root (local path or fsspec URI)")
    p.add_argument(
        "--config", help="pipeline config, YAML or JSON (sections plan/caption/parse/match/tag/threshold)"
    )
    p.add_argument(
        "--stage-threads", type=int, default=None,
        help="threads for stage units (default: one per stage, consecutive batches overlap; 1: one unit at a time)",
    )  # fmt: skip
    g = p.add_argument_group("config overrides")
    for flag, (section, field, typ) in OVERRIDES.items():
        g.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, help=f"{section or 'top'}.{field}")


def _params(args):
    from flows.params import LabelParams

    cfg = load_config(args.config, args)
    return LabelParams(
        annotations=args.annotations, images=args.images, out=args.out, captions=args.captions, config=cfg
    )


def cmd_plan(args) -> int:
    from tasks.plan_run import plan_run

    p = _params(args)
    ctx, plan = plan_run(p.annotations, p.images, p.out, p.captions, p.dataset_name, p.config)
    c = plan.counts
    print(
        f"run key {ctx.run_key} (plan {ctx.plan_key}): {c.get('images_planned', 0)} images, "
        f"{c.get('boxes_planned', 0)} boxes in {len(plan.shards)} shards; {plan.quarantined} records quarantined"
    )
    print(f"plan: {ctx.layout.plan_manifest}")
    print(f"run:  {ctx.layout.manifest}")
    return 0


def _run(params, stage_threads: int | None = None) -> int:
    from flows.status import finished_summary

    summary = finished_summary(params)  # a finished run is answered from the ledger, before Prefect loads
    if summary is None:
        from flows.label import run_in_process

        summary = run_in_process(params, stage_threads, check_finished=False)  # checked just above
    print(
        f"done: {summary['triplets']} triplets on {summary['images_with_triplets']}/{summary['images']} images "
        f"in {summary['shards']} shard(s), run key {summary['run_key']}"
    )
    print(f"output: {summary['output']}")
    return 0


def cmd_run(args) -> int:
    return _run(_params(args), args.stage_threads)


def cmd_demo(args) -> int:
    from flows.params import LabelParams

    sample = Path(args.sample or EXAMPLES)
    det = sample / "sample_detections.json"
    if not det.exists():
        raise SystemExit(
            f"reltag demo: no bundled sample at {det} (run from a source checkout, or pass --sample DIR)"
        )
    args.annotations, args.captions, args.images = (
        str(det),
        str(sample / "sample_captions.json"),
        str(sample / "images"),
    )
    cfg = load_config(args.config, args)
    if args.dataset is None:
        cfg = cfg.model_copy(update={"dataset": "sample"})
    return _run(
        LabelParams(
            annotations=args.annotations, images=args.images, out=args.out, captions=args.captions, config=cfg
        ),
        args.stage_threads,
    )


def _runs(args, quiet: bool = False) -> list:
    """The runs under --out, oldest first (only those whose key starts with --run-key, when given); says so on
    stderr when there are none."""
    from flows.status import find_runs

    runs = [r for r in find_runs(args.out) if not args.run_key or r.run_key.startswith(args.run_key)]
    if not runs and not quiet:
        which = f" with a run key starting {args.run_key!r}" if args.run_key else ""
        print(f"no runs under {args.out}{which}", file=sys.stderr)
    return runs


def _one_run(args):
    """The run a command shows: --run-key (a prefix) picks it; without it, the newest run, named on stderr."""
    runs = _runs(args)
    if not runs:
        return None
    if args.run_key and len(runs) > 1:
        keys = ", ".join(r.run_key for r in runs)
        print(
            f"run key prefix {args.run_key!r} matches {len(runs)} runs ({keys}); give more of it",
            file=sys.stderr,
        )
        return None
    run = runs[-1]
    if len(runs) > 1:
        print(f"showing run {run.run_key} ({run.dataset}), the newest of {len(runs)}; --run-key picks another",
              file=sys.stderr)  # fmt: skip
    return run


def cmd_runs(args) -> int:
    """Every run under the root: key, dataset, date, what differs, progress and triplets."""
    from flows.status import run_record, run_status

    runs = _runs(args)
    if not runs:
        return 1
    rows = []
    for r in runs:
        rec, st = run_record(r), run_status(r)
        cfg = rec.config
        rows.append({
            "run_key": r.run_key, "dataset": r.dataset, "plan_key": rec.plan_key, "created_at": rec.created_at,
            "stage_keys": dict(rec.stage_keys), "captioner": cfg["caption"]["captioner"],
            "tagger": cfg["tag"]["tagger"], "eta": cfg["threshold"]["eta"], "rule": cfg["threshold"]["rule"],
            "images": st["images"], "complete": st["complete"], "triplets": st.get("triplets"),
            "output": r.base,
        })  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        state = f"{row['triplets']} triplets" if row["complete"] else "incomplete"
        print(
            f"{row['run_key']}  {row['dataset']:<12} {row['created_at']}  captioner={row['captioner']} "
            f"tagger={row['tagger']} eta={row['eta']} rule={row['rule']}  {row['images']} images, {state}"
        )
    return 0


def cmd_status(args) -> int:
    from flows.status import run_status

    runs = [_one_run(args)] if args.run_key else _runs(args)
    if not runs or runs[0] is None:
        return 1
    report = [run_status(r) for r in runs]
    if args.json:
        print(json.dumps(report if len(report) > 1 else report[0], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for st in report:
        t = Table(
            title=f"{st['dataset']} / run {st['run_key']}  ({st['images']} images, "
            f"{'complete' if st['complete'] else 'incomplete'})",
            caption="stage keys: " + ", ".join(f"{k}={v}" for k, v in st["stage_keys"].items()),
        )
        t.add_column("shard")
        for stage in st["totals"]:
            t.add_column(stage, justify="right")
        for row in st["shards"]:
            cells = []
            for c in row["stages"].values():
                cell = f"{c['done']}/{c['done'] + c['failed'] + c['pending']}"
                if c["failed"]:
                    cell += f" [red]{c['failed']} failed[/red]"
                cells.append(cell)
            t.add_row(f"{row['shard']:05d}", *cells)
        con.print(t)
        if st["failed_units"]:
            con.print("[red]failed:[/red] " + ", ".join(st["failed_units"]))
        if st.get("triplets") is not None:
            con.print(f"triplets: {st['triplets']}")
    return 0


def cmd_stats(args) -> int:
    """The statistics of one finished run as one JSON document (the newest, or --run-key's)."""
    from storage.atomic import read_json

    run = _one_run(args)
    if run is None:
        return 1
    if not run.fs.exists(run.run_stats):
        print(
            f"run {run.run_key} under {args.out} is not finished (reltag status shows what is left)",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(read_json(run.fs, run.run_stats), indent=2))
    return 0


def cmd_show(args) -> int:
    """Draw the triplets of some images of a finished run into one PNG."""
    import random

    import pyarrow.parquet as pq

    from flows.status import plan_of, run_record
    from storage import schemas
    from storage.records import Triplet
    from tasks.images import load_image
    from tasks.plan import shard_records
    from tasks.visualize import contact_sheet, draw_triplets

    run = _one_run(args)
    if run is None:
        return 1
    images_root = run_record(run).inputs["images_root"]
    wanted = set(args.image_id or [])
    picked = []
    for sh in plan_of(run).shards:
        if not run.fs.exists(run.triplets(sh.shard)):
            continue
        with run.fs.open(run.triplets(sh.shard), "rb") as f:
            trips = schemas.from_table(pq.read_table(f), Triplet)
        by_image: dict[int, list] = {}
        for t in trips:
            by_image.setdefault(t.image_id, []).append(t)
        for rec in shard_records(run, sh.shard):
            if (wanted and rec.image_id in wanted) or (not wanted and rec.image_id in by_image):
                picked.append((rec, by_image.get(rec.image_id, [])))
    if wanted and len(picked) < len(wanted):
        missing = sorted(wanted - {r.image_id for r, _ in picked})
        print(f"reltag show: image ids {missing} are not in run {run.run_key}", file=sys.stderr)
        return 1
    if not wanted:
        random.Random(args.seed).shuffle(picked)
        picked = sorted(picked[: args.sample], key=lambda p: p[0].image_id)
    if not picked:
        print(f"run {run.run_key} has no triplets to show", file=sys.stderr)
        return 1
    tiles = []
    for rec, trips in picked:
        img, q = load_image(images_root, rec, stage="show")
        if q is not None:
            print(f"reltag show: skipping image {rec.image_id}: {q.detail}", file=sys.stderr)
            continue
        tiles.append(draw_triplets(img, rec, trips))
    contact_sheet(tiles).save(args.png)
    print(f"wrote {args.png}: {len(tiles)} image(s) with their triplets")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="reltag",
        description="Turn detection datasets (COCO, Objects365) into relation-triplet Parquet shards "
        "(RLIPv2 pseudo-labelling), as resumable Prefect flows.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "plan",
        help="validate the detection file and cut it into shards (writes the manifest)",
        description="Stream the detection JSON, quarantine bad records, write images/shard-*.parquet "
        "and manifest.json under <out>/<dataset>/<run-key>/. Idempotent.",
    )
    _add_run_args(p)
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser(
        "run",
        help="label a dataset: plan, caption, parse, match, tag, threshold, write",
        description="Run the label-dataset flow. Rerunning the same command after a crash resumes: "
        "finished batches are skipped, the rest redone.",
    )
    _add_run_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on the bundled sample (examples/)",
        description="The same pipeline as `run`, on five bundled photographs with oracle captions "
        "and the greedy overlap tagger (no model weights needed).",
    )
    _add_run_args(p, inputs=False)
    p.add_argument("--sample", help="folder with sample_detections.json, sample_captions.json, images/")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser(
        "status",
        help="per shard and stage: batches done, failed, pending",
        description="Read the ledger of every run under --out (or of the run --run-key names).",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--run-key", help="a run key or its first characters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser(
        "runs",
        help="list the runs under a root: key, dataset, date, settings, progress, triplets",
        description="Every run under --out, oldest first, with the settings that tell runs apart.",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--run-key", help="a run key or its first characters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser(
        "stats",
        help="print the statistics of a finished run (the newest, or --run-key's) as one JSON document",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--run-key", help="a run key or its first characters")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser(
        "show",
        help="draw the triplets of a finished run on its images (one PNG)",
        description="Pick images with triplets (at random, or by --image-id) and draw boxes, "
        "subject->object arrows and relation labels.",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--run-key", help="a run key or its first characters (default: the newest run)")
    p.add_argument("--png", required=True, help="PNG file to write")
    p.add_argument("--image-id", type=int, action="append", help="image id to draw (repeatable)")
    p.add_argument("--sample", type=int, default=6, help="how many random images with triplets (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_show)
    _add_pretrain_parser(sub)
    return ap


def _add_pretrain_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pre-train RLIPv2-ParSeD on relation data (the pretrain flow); a rerun resumes",
        description="Train into <out>/<identity>/ (checkpoints/, history.json); the same command after a crash "
        "resumes from the last checkpoint. Defaults: the RLIPv2 reference's pre-training settings.",
    )
    p.add_argument("--source", action="append", required=True, help="a source to mix in (repeatable)")
    p.add_argument("--out", required=True, help="output root for pre-training runs")
    p.add_argument(
        "--settings", help="YAML/JSON mapping of PretrainSettings fields (models/rlipv2/pretrain.py)"
    )
    p.add_argument("--steps", type=int, help="stop after this many steps in total (default: all epochs)")
    p.add_argument("--device", help="cpu, cuda, ...")
    p.add_argument("--batch-size", type=int, help="images per process and step (default 8)")
    p.add_argument("--tiny", action="store_true", help="the tiny test architecture (offline demo)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs); > 1 launches torchrun")
    p.add_argument("--log-every", type=int, default=50)
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args) -> int:
    from flows.pretrain import params_from_cli, run_in_process

    params = params_from_cli(args)  # a bad value fails here, before Prefect starts
    summary = run_in_process(params)
    print(json.dumps(summary, indent=2))
    return 0


def one_line(e: Exception) -> str:
    """pydantic's validation errors as one line, `field: message (got value)` joined by '; '; others as they are
    (reltag's own errors are one line already)."""
    from pydantic import ValidationError

    if isinstance(e, ValidationError):
        parts = []
        for err in e.errors():
            field = ".".join(str(x) for x in err["loc"]) or e.title
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            parts.append(f"{field}: {err['msg']}{got}")
        return "; ".join(parts)
    return str(e)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (
        ValueError,
        FileNotFoundError,
        NotADirectoryError,
    ) as e:  # bad input or config: one line, no traceback
        print(f"reltag {args.cmd}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `reltag stats ... | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
