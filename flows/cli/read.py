"""The commands that read runs: `reltag runs`, `status`, `stats`, `show`, `report`, `export`."""

from __future__ import annotations

import argparse
import json
import sys

from flows.cli.common import add_json, add_run_selector, one_run, select_runs


def _print_json(data) -> None:
    print(json.dumps(data, indent=2))


def cmd_runs(args) -> int:
    """Every run under the root: key, dataset, date, what differs, progress and triplets."""
    from flows.status import run_record, run_status

    rows = []
    for r in select_runs(args):
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
        _print_json(rows)
        return 0
    for row in rows:
        state = f"{row['triplets']} triplets" if row["complete"] else "unfinished"
        print(
            f"{row['run_key']}  {row['dataset']:<12} {row['created_at']}  captioner={row['captioner']} "
            f"tagger={row['tagger']} eta={row['eta']} rule={row['rule']}  {row['images']} images, {state}"
        )
    return 0


def cmd_status(args) -> int:
    """Per shard and stage of every run under --out (or of the run --run names): done, failed, pending."""
    from flows.status import run_status

    runs = [one_run(args, finished=False)] if args.run else select_runs(args)
    report = [run_status(r) for r in runs]
    if args.json:
        _print_json(report if len(report) > 1 else report[0])
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for st in report:
        t = Table(
            title=f"{st['dataset']} / run {st['run_key']}  ({st['images']} images, "
            f"{'finished' if st['complete'] else 'unfinished'})",
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
    """The statistics of one finished run as one JSON document (with or without --json)."""
    from storage.atomic import read_json

    run = one_run(args)
    _print_json(read_json(run.fs, run.run_stats))
    return 0


def cmd_show(args) -> int:
    """Draw the triplets of some images of a finished run into one PNG."""
    import random

    import pyarrow.parquet as pq

    from flows.status import plan_of, run_record
    from storage import schemas
    from storage.layout import shard_records
    from storage.records import Triplet
    from tasks.audit.visualize import contact_sheet, draw_triplets
    from tasks.images import load_image

    if args.n_images < 1:
        raise ValueError(f"--n-images must be at least 1, got {args.n_images}")
    run = one_run(args)
    images_root = run_record(run).inputs["images_root"]
    wanted = set(args.image_id or [])
    picked = []
    for sh in plan_of(run).shards:
        with run.fs.open(run.triplets(sh.shard), "rb") as f:
            table = pq.read_table(f, schema=schemas.TRIPLETS)  # files older than a nullable column: nulls
        by_image: dict[int, list] = {}
        for t in schemas.from_table(table, Triplet):
            by_image.setdefault(t.image_id, []).append(t)
        for rec in shard_records(run, sh.shard):
            if (wanted and rec.image_id in wanted) or (not wanted and rec.image_id in by_image):
                picked.append((rec, by_image.get(rec.image_id, [])))
    if wanted and len(picked) < len(wanted):
        missing = sorted(wanted - {r.image_id for r, _ in picked})
        raise ValueError(f"image ids {missing} are not in run {run.run_key}")
    if not wanted:
        random.Random(args.seed).shuffle(picked)
        picked = sorted(picked[: args.n_images], key=lambda p: p[0].image_id)
    if not picked:
        raise ValueError(f"run {run.run_key} has no triplets to show (--image-id draws an image's boxes)")
    tiles, drawn, skipped = [], [], []
    for rec, trips in picked:
        img, q = load_image(images_root, rec, stage="show")
        if q is not None:
            print(f"reltag show: skipping image {rec.image_id}: {q.detail}", file=sys.stderr)
            skipped.append(rec.image_id)
            continue
        tiles.append(draw_triplets(img, rec, trips))
        drawn.append(rec.image_id)
    contact_sheet(tiles).save(args.png)
    if args.json:
        _print_json({"run_key": run.run_key, "png": args.png, "images": len(tiles), "image_ids": drawn,
                     "skipped": skipped})  # fmt: skip
    else:
        print(f"wrote {args.png}: {len(tiles)} image(s) with their triplets")
    return 0


def cmd_export(args) -> int:
    """Write a finished run's relations at an eta and rule: the reference's VG-style JSON or flat Parquet."""
    from storage.relations import RunSource
    from tasks.audit.export import export_parquet, export_vg_json

    if args.image_paths and args.format != "vg-json":
        raise ValueError("--image-paths goes with --format vg-json")
    run = one_run(args)
    plan_dir = run.fs.unstrip_protocol(run.base) if "://" in run.root else run.base
    source = RunSource(plan_dir, run.run_key)
    if args.format == "vg-json":
        c = export_vg_json(source, args.dest, args.eta, args.rule, args.image_paths)
        what = f"{c['images']} images, {c['objects']} objects, {c['relationships']} relationships"
    else:
        c = export_parquet(source, args.dest, args.eta, args.rule)
        what = f"{c['rows']} rows"
    if args.json:
        _print_json({"run_key": run.run_key, "dest": args.dest, "format": args.format, "eta": args.eta,
                     "rule": args.rule, **c})  # fmt: skip
    else:
        print(
            f"wrote {args.dest}: {what} of run {run.run_key} at {args.rule} >= {args.eta} ({c['bytes']} bytes)"
        )
    return 0


def cmd_report(args) -> int:
    """The audit page of a finished run, or the comparison of two runs (flows/report.py)."""
    from flows.report import build_compare, build_report

    for flag in ("top", "per_group", "examples"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.compare:
        if args.run:
            raise ValueError("--compare names both runs; --run goes without it")
        a, b = (one_run(argparse.Namespace(**{**vars(args), "run": key})) for key in args.compare)
        if a.run_key == b.run_key:
            raise ValueError(f"--compare names run {a.run_key} twice")
        path, counts = build_compare(a, b, args.examples)
        if args.json:
            _print_json({"run_a": a.run_key, "run_b": b.run_key, "html": path, "counts": counts})
            return 0
        print(f"run {b.run_key} against {a.run_key}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        print(f"wrote {path}")
        return 0
    run = one_run(args)
    path = build_report(run, args.top, args.per_group)
    if args.json:
        _print_json({"run_key": run.run_key, "html": path})
    else:
        print(f"wrote {path}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "runs",
        help="list the runs under a root: key, dataset, date, settings, progress, triplets",
        description="Every run under --out (those whose key starts with --run, or at the --run path), oldest "
        "first, with the settings that tell runs apart.",
    )
    add_run_selector(p, "only the runs whose key starts with this (a key or a prefix), or at this path")
    add_json(p, "one JSON list, a mapping per run")
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser(
        "status",
        help="per shard and stage: batches done, failed, pending",
        description="Read the ledger of every run under --out (or of the one run --run names), finished or not.",
    )
    add_run_selector(p, "only this run: its key, a prefix of it, or a path (default: every run under --out)")
    add_json(p, "one JSON document per run (a list when there are several)")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser(
        "stats",
        help="print the statistics of a finished run as one JSON document",
        description="Print stats/<run-key>/run.json of a finished run (the newest under --out, named on stderr, "
        "unless --run picks one): the funnel, histograms, eta sweep, unmatched nouns.",
    )
    add_run_selector(p)
    add_json(p, "accepted for uniformity: the output is one JSON document either way")
    p.set_defaults(func=cmd_stats)
    p = sub.add_parser(
        "show",
        help="draw the triplets of a finished run on its images (one PNG)",
        description="Pick images with triplets (at random, or by --image-id) and draw boxes, "
        "subject->object arrows and relation labels into one contact sheet.",
    )
    add_run_selector(p)
    p.add_argument("--png", required=True, help="PNG file to write")
    p.add_argument(
        "--image-id", type=int, action="append", help="image id to draw (repeatable; default: random)"
    )
    p.add_argument("--n-images", type=int, default=6, metavar="N",
                   help="how many random images with triplets, without --image-id (default 6)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the random pick (default 0)")
    add_json(p, 'print {"png", "images", "image_ids", "skipped"} as JSON instead of a line')
    p.set_defaults(func=cmd_show)
    p = sub.add_parser(
        "report",
        help="write a run's audit page (one self-contained HTML file), or compare the triplets of two runs",
        description="Funnel, histograms, eta sweep, a gallery of images with their triplets, unmatched nouns, "
        "settings and lineage, written to <plan folder>/report/<run-key>.html. With --compare A B: which "
        "triplets run B adds, drops or rescores against run A, to <plan folder of A>/report/compare-A-B.html.",
    )
    add_run_selector(p)
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="compare two finished runs (each a key, a prefix or a path, as --run takes)")  # fmt: skip
    p.add_argument(
        "--top", type=int, default=6, help="gallery: how many relations and class pairs (default 6)"
    )
    p.add_argument(
        "--per-group", type=int, default=3, help="gallery: images per relation / class pair (default 3)"
    )
    p.add_argument("--examples", type=int, default=50, help="compare: example rows per table (default 50)")
    add_json(p, 'print {"html", ...} (and the counts of a comparison) as JSON instead of lines')
    p.set_defaults(func=cmd_report)
    p = sub.add_parser(
        "export",
        help="write a finished run's relations at an eta and rule: the reference's JSON or flat Parquet",
        description="vg-json: the list of images RLIPv2's training code reads (image_id, dataset, data_split, "
        "objects with every box of the image, relationships with their confidence); parquet: the triplet rows "
        "that pass, loadable by HF datasets and DuckDB. Streams; the file appears complete or not at all.",
    )
    add_run_selector(p)
    p.add_argument("--format", choices=["vg-json", "parquet"], default="vg-json",
                   help="vg-json: RLIPv2's relation JSON (default); parquet: flat triplet rows")  # fmt: skip
    p.add_argument(
        "--eta", type=float, default=0.2, help="keep relations whose confidence >= eta (default 0.2)"
    )
    p.add_argument("--rule", choices=["relation_only", "paper"], default="relation_only",
                   help="confidence: p_relation (the reference code, default) or the paper's product")  # fmt: skip
    p.add_argument("--image-paths", help="vg-json: also write {image_id: file name} (the reference's "
                   "image_id_to_filepath.json for Objects365) to this file")  # fmt: skip
    add_json(p, 'print {"dest", "format", counts, "bytes"} as JSON instead of a line')
    p.add_argument("dest", help="file to write (local path or fsspec URI)")
    p.set_defaults(func=cmd_export)
