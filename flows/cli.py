"""The `reltag` command line: plan, run, status, stats, show, report, export, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
OUT_HELP = (
    "output root, one of its dataset folders, or the run's folder (the output: path `reltag run` prints)"
)

# flag -> (config section, field, type); every flag overrides the config file
OVERRIDES = {
    "dataset": (None, "dataset", str),
    "shard_size": ("plan", "shard_size", int),
    "batch_size": ("plan", "batch_size", int),
    "box_policy": ("plan", "box_policy", str),
    "max_pixels": ("plan", "max_pixels", int),
    "size_mismatch": ("plan", "size_mismatch", str),
    "image_threads": ("plan", "image_threads", int),
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


def config_data(path: str | None, args: argparse.Namespace) -> dict:
    """The raw config mapping: the config file (YAML or JSON) with the command-line flags applied on top."""
    data: dict = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"config file {path} cannot be read: {e.strerror or e}") from e
        kind = "plain YAML" if path.endswith((".yaml", ".yml")) else "valid JSON"
        try:
            if kind == "plain YAML":
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = json.loads(text)
        except Exception as e:  # yaml.YAMLError / json.JSONDecodeError: the parser's words, on one line
            raise ValueError(f"config file {path} is not {kind}: {' '.join(str(e).split())}") from e
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
    return data


def load_config(path: str | None, args: argparse.Namespace):
    """Config file (YAML or JSON) with the command-line flags applied on top (nothing inferred)."""
    from tasks.config import PipelineConfig

    return PipelineConfig.model_validate(config_data(path, args))


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
    from tasks.config import field_help

    g = p.add_argument_group("config overrides (choices and defaults from tasks/config.py)")
    for flag, (section, field, typ) in OVERRIDES.items():
        metavar, text = field_help(section, field)
        if field == "captioner":
            text = "several, comma-separated, concatenate their captions; " + text
        g.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, metavar=metavar, help=text)


def _params(args, run: bool = True, dataset: str | None = None):
    """The flow's parameters from the command line, every input checked before any work (each problem one
    ValueError): the config first, then the input paths, then what the config leaves out is inferred from the
    annotation file's categories (the vocabulary, then the dataset name), said on stderr with any categories
    that have no synonym list. dataset: the name used when neither the config nor a flag gives one."""
    from flows.params import LabelParams
    from tasks.config import PipelineConfig, check_tagger_numbering, fill_inferred
    from tasks.run.start import cached_categories, check_inputs

    data = config_data(args.config, args)
    if dataset is not None and data.get("dataset") is None:
        data["dataset"] = dataset
    cfg = PipelineConfig.model_validate(data)  # config errors first, named by field
    # local paths made absolute, as the flow sees them
    p = LabelParams(annotations=args.annotations, images=args.images, out=args.out, captions=args.captions)
    check_inputs(p.annotations, p.images, p.captions, cfg, run=run)
    categories = cached_categories(p.annotations, p.out)
    data, notes = fill_inferred(data, categories)
    cfg = PipelineConfig.model_validate(data)
    check_tagger_numbering(cfg, categories)
    for line in notes:
        print(f"reltag {args.cmd}: {line}", file=sys.stderr)
    _warn_without_synonyms(args.cmd, categories, cfg.match.vocabulary)
    return p.model_copy(update={"config": cfg})


def _warn_without_synonyms(cmd: str, categories: list[dict], vocabulary: str, show: int = 20) -> None:
    """One line on stderr naming the categories that have no synonym list (they match by their own names)."""
    from models.matcher import Vocabulary

    bare = [c.label for c in Vocabulary.from_categories(categories, vocabulary).classes if not c.synonyms]
    if bare:
        names = ", ".join(repr(n) for n in bare[:show]) + (
            f" and {len(bare) - show} more" if len(bare) > show else ""
        )
        print(
            f"reltag {cmd}: warning: {len(bare)} of {len(categories)} categories have no synonym list in the "
            f"{vocabulary} vocabulary (they match captions by their own names only): {names}",
            file=sys.stderr,
        )


def cmd_plan(args) -> int:
    from tasks.stages.caption import captioner_names
    from tasks.run.start import plan_run, validate_captions

    p = _params(args, run=False)
    validate_captions(p.captions, p.config)
    # human captions name the run by their file's checksum: without the file, the plan alone
    record = p.captions is not None or "oracle" not in captioner_names(p.config.caption)
    ctx, plan = plan_run(
        p.annotations, p.images, p.out, p.captions, p.dataset_name, p.config, record_run=record
    )
    c = plan.counts
    counts = (
        f"{c.get('images_planned', 0)} images, {c.get('boxes_planned', 0)} boxes in {len(plan.shards)} shards; "
        f"{plan.quarantined} records quarantined"
    )
    if not record:
        print(
            f"plan {ctx.plan_key}: {counts}; no run recorded (captioner 'oracle' needs --captions to name it)"
        )
        print(f"plan: {ctx.layout.plan_manifest}")
        return 0
    print(f"run key {ctx.run_key} (plan {ctx.plan_key}): {counts}")
    print(f"plan: {ctx.layout.plan_manifest}")
    print(f"run:  {ctx.layout.manifest}")
    return 0


#: exit status of a run stopped by SIGTERM (128 + 15, as a shell reports a process killed by it)
TERMINATED = 143


def _stop_on_sigterm() -> None:
    """SIGTERM (a scheduler's stop, `kill`, a pod's eviction) stops the run cleanly: the main thread raises
    SystemExit(143), so the flow unwinds, units in flight finish and are recorded (queued ones never start,
    and anything cut short has no ledger record), and Prefect's temporary server is shut down with the process.
    A second SIGTERM ends the process at once (still safe: nothing unrecorded is ever read as done)."""
    import signal

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, lambda *_: os._exit(TERMINATED))
        print(
            "reltag run: SIGTERM: stopping; units in flight finish or stay unrecorded, "
            "rerun the same command to resume",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(TERMINATED)

    signal.signal(signal.SIGTERM, stop)


def _run(params, stage_threads: int | None = None) -> int:
    from flows.status import finished_summary

    summary = finished_summary(params)  # a finished run is answered from the ledger, before Prefect loads
    if summary is None:
        from tasks.run.start import validate_captions

        validate_captions(
            params.captions, params.config
        )  # before Prefect: a bad file is one line, not retried

        from tasks.run.start import plan_run

        # plan here, before Prefect starts: a bad detection or captions file is one line and exit 2, not a
        # failed flow run (the flow's plan task then finds the plan and the run record written)
        plan_run(
            params.annotations, params.images, params.out, params.captions, params.dataset_name, params.config
        )
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
    return _run(_params(args, dataset="sample" if args.dataset is None else None), args.stage_threads)


def _find_runs(out: str) -> list:
    """The runs under an output root, or under one of its dataset folders, or in one plan folder (the
    `output:` path `reltag run` prints, `<root>/<dataset>/<plan_key>`): only that folder's runs."""
    import posixpath

    from fsspec.core import url_to_fs

    from flows.status import find_runs

    runs = find_runs(out)
    if runs:
        return runs
    fs, base = url_to_fs(out)
    base = base.rstrip("/")
    if fs.exists(posixpath.join(base, "plan.json")) or fs.exists(posixpath.join(base, "runs")):
        up, inside = 2, lambda r: r.base == base  # a plan folder
    elif fs.glob(posixpath.join(base, "*", "plan.json")):
        up, inside = 1, lambda r: posixpath.dirname(r.base) == base  # a dataset folder
    else:
        return []
    root = base
    for _ in range(up):
        root = posixpath.dirname(root)
    return [r for r in find_runs(fs.unstrip_protocol(root) if "://" in out else root) if inside(r)]


def _runs(args, quiet: bool = False) -> list:
    """The runs under --out, oldest first (only those whose key starts with --run-key, when given); says so on
    stderr when there are none."""
    runs = [r for r in _find_runs(args.out) if not args.run_key or r.run_key.startswith(args.run_key)]
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
    from tasks.stages.plan import shard_records
    from tasks.audit.visualize import contact_sheet, draw_triplets

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
            table = pq.read_table(f, schema=schemas.TRIPLETS)  # files older than a nullable column: nulls
        trips = schemas.from_table(table, Triplet)
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


def cmd_export(args) -> int:
    """Write a finished run's relations at an eta and rule: the reference's VG-style JSON or flat Parquet."""
    from storage.relations import RunSource
    from tasks.audit.export import export_parquet, export_vg_json

    if args.image_paths and args.format != "vg-json":
        raise ValueError("--image-paths goes with --format vg-json")
    run = _one_run(args)
    if run is None:
        return 1
    plan_dir = run.fs.unstrip_protocol(run.base) if "://" in args.out else run.base
    source = RunSource(plan_dir, run.run_key)
    if args.format == "vg-json":
        c = export_vg_json(source, args.dest, args.eta, args.rule, args.image_paths)
        what = f"{c['images']} images, {c['objects']} objects, {c['relationships']} relationships"
    else:
        c = export_parquet(source, args.dest, args.eta, args.rule)
        what = f"{c['rows']} rows"
    print(f"wrote {args.dest}: {what} of run {run.run_key} at {args.rule} >= {args.eta} ({c['bytes']} bytes)")
    return 0


def cmd_report(args) -> int:
    """The audit page of a finished run, or the comparison of two runs (flows/report.py)."""
    from flows.report import report_command

    return report_command(args, _one_run)


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
    p.add_argument("--out", required=True, help=OUT_HELP)
    p.add_argument("--run-key", help="a run key or its first characters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser(
        "runs",
        help="list the runs under a root: key, dataset, date, settings, progress, triplets",
        description="Every run under --out, oldest first, with the settings that tell runs apart.",
    )
    p.add_argument("--out", required=True, help=OUT_HELP)
    p.add_argument("--run-key", help="a run key or its first characters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser(
        "stats",
        help="print the statistics of a finished run (the newest, or --run-key's) as one JSON document",
    )
    p.add_argument("--out", required=True, help=OUT_HELP)
    p.add_argument("--run-key", help="a run key or its first characters")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser(
        "show",
        help="draw the triplets of a finished run on its images (one PNG)",
        description="Pick images with triplets (at random, or by --image-id) and draw boxes, "
        "subject->object arrows and relation labels.",
    )
    p.add_argument("--out", required=True, help=OUT_HELP)
    p.add_argument("--run-key", help="a run key or its first characters (default: the newest run)")
    p.add_argument("--png", required=True, help="PNG file to write")
    p.add_argument("--image-id", type=int, action="append", help="image id to draw (repeatable)")
    p.add_argument("--sample", type=int, default=6, help="how many random images with triplets (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_show)
    p = sub.add_parser(
        "export",
        help="write a finished run's relations at an eta and rule: the reference's JSON or flat Parquet",
        description="vg-json: the list of images RLIPv2's training code reads (image_id, dataset, data_split, "
        "objects with every box of the image, relationships with their confidence); parquet: the triplet rows "
        "that pass, loadable by HF datasets and DuckDB. Streams; the file appears complete or not at all.",
    )
    p.add_argument("--out", required=True, help="output root of the run")
    p.add_argument(
        "--run", dest="run_key", help="a run key or its first characters (default: the newest run)"
    )
    p.add_argument("--format", choices=["vg-json", "parquet"], default="vg-json")
    p.add_argument(
        "--eta", type=float, default=0.2, help="keep relations whose confidence >= eta (default 0.2)"
    )
    p.add_argument("--rule", choices=["relation_only", "paper"], default="relation_only",
                   help="confidence: p_relation (the reference code, default) or the paper's product")  # fmt: skip
    p.add_argument("--image-paths", help="vg-json: also write {image_id: file name} (the reference's "
                   "image_id_to_filepath.json for Objects365) to this file")  # fmt: skip
    p.add_argument("dest", help="file to write (local path or fsspec URI)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser(
        "report",
        help="write a run's audit page (one self-contained HTML file), or compare the triplets of two runs",
        description="Funnel, histograms, eta sweep, a gallery of images with their triplets, unmatched nouns, "
        "settings and lineage, written to <plan folder>/report/<run-key>.html. With --compare A B: which "
        "triplets run B adds, drops or rescores against run A, to <plan folder of A>/report/compare-A-B.html.",
    )
    p.add_argument("--out", required=True, help="the output root the run was written to")
    p.add_argument(
        "--run-key",
        "--run",
        dest="run_key",
        help="a run key or its first characters (default: the newest run)",
    )
    p.add_argument(
        "--compare", nargs=2, metavar=("KEY_A", "KEY_B"), help="compare two runs (keys or prefixes)"
    )
    p.add_argument(
        "--top", type=int, default=6, help="gallery: how many relations and class pairs (default 6)"
    )
    p.add_argument(
        "--per-group", type=int, default=3, help="gallery: images per relation / class pair (default 3)"
    )
    p.add_argument("--examples", type=int, default=50, help="compare: example rows per table (default 50)")
    p.set_defaults(func=cmd_report)
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
    # one line whatever the source: parsers (yajl, YAML) point at the error on extra lines
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text += f": {e.filename}"
    return text


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    if argv is None and args.cmd in ("run", "demo"):  # the command line, not a test calling main([...])
        _stop_on_sigterm()
    try:
        return args.func(args)
    except BrokenPipeError:  # `reltag stats ... | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0
    except (ValueError, OSError) as e:  # bad input or config (or an unreadable path): one line, no traceback
        print(f"reltag {args.cmd}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
