"""A finished run's audit page, or two runs' comparison (tasks/audit/report.py), written under <plan>/report/."""

from __future__ import annotations

import pyarrow as pa

from flows.status import check_finished, plan_of, run_record
from storage.atomic import atomic_open, read_json
from storage.layout import RunLayout
from storage.records import ImageRecord


def read_triplets(run: RunLayout, columns: list[str] | None = None) -> pa.Table:
    """Every triplet of a finished run, shard by shard, as one Arrow table (TRIPLETS schema, or `columns` of it)."""
    import pyarrow.parquet as pq

    from storage import schemas

    schema = schemas.TRIPLETS if columns is None else pa.schema([schemas.TRIPLETS.field(c) for c in columns])
    tables = []
    for sh in plan_of(run).shards:
        path = run.triplets(sh.shard)
        if not run.fs.exists(path):
            raise ValueError(f"run {run.run_key}: triplet file {path} of shard {sh.shard} is missing")
        with run.fs.open(path, "rb") as f:
            tables.append(pq.read_table(f, schema=schemas.TRIPLETS, columns=columns).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def load_run(run: RunLayout, top: int = 6, per_group: int = 3):
    """The RunData of a finished run: its record, run.json, the triplets' pick columns, and every column of the
    gallery's images' triplets with their image records (read shard by shard, so memory holds only those)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from storage import schemas
    from storage.layout import shard_records
    from tasks.audit.report import PICK_COLUMNS, RunData, gallery_image_ids, gallery_picks

    check_finished(run)
    slim = read_triplets(run, PICK_COLUMNS)
    wanted = gallery_image_ids(gallery_picks(slim, top, per_group))
    ids = pa.array(sorted(wanted), pa.int64())
    images: dict[int, ImageRecord] = {}
    rows = []
    for sh in plan_of(run).shards:
        if len(images) == len(wanted):
            break
        recs = [r for r in shard_records(run, sh.shard) if r.image_id in wanted]
        if not recs:
            continue
        images.update((r.image_id, r) for r in recs)
        with run.fs.open(run.triplets(sh.shard), "rb") as f:
            t = pq.read_table(f, schema=schemas.TRIPLETS)
        rows.append(t.filter(pc.is_in(t["image_id"], ids)))
    gallery = pa.concat_tables(rows) if rows else schemas.TRIPLETS.empty_table()
    return RunData(run_record(run), read_json(run.fs, run.run_stats), slim, images, run.base, gallery)


def _loader(images_root: str):
    from tasks.images import load_image

    def load(rec: ImageRecord):
        img, q = load_image(images_root, rec, stage="report")
        return (img, "") if q is None else (None, q.detail)

    return load


def write_page(run: RunLayout, name: str, text: str) -> str:
    """Write one page to <plan folder>/report/<name> atomically; returns its path (a URI on a remote root)."""
    path = run.path("report", name)
    with atomic_open(run.fs, path, "wb") as f:
        f.write(text.encode("utf-8"))
    protocols = (run.fs.protocol,) if isinstance(run.fs.protocol, str) else tuple(run.fs.protocol)
    return path if "file" in protocols else run.fs.unstrip_protocol(path)


def build_report(run: RunLayout, top: int = 6, per_group: int = 3) -> str:
    """Write the run's audit page; returns its path."""
    from tasks.audit.report import report_html

    data = load_run(run, top, per_group)
    page = report_html(data, _loader(data.record.inputs.get("images_root", "")), top, per_group)
    return write_page(run, f"{run.run_key}.html", page)


def build_compare(a: RunLayout, b: RunLayout, examples: int = 50) -> tuple[str, dict]:
    """Write the comparison page of two finished runs (under run A's plan folder); returns (path, counts)."""
    from tasks.audit.compare import DIFF_COLUMNS, compare_html, diff_triplets

    for r in (a, b):
        check_finished(r)
    cols = list(DIFF_COLUMNS)
    diff = diff_triplets(read_triplets(a, cols), read_triplets(b, cols), a.run_key, b.run_key, examples)
    page = compare_html(run_record(a), run_record(b), diff, examples)
    return write_page(a, f"compare-{a.run_key}-{b.run_key}.html", page), diff.counts
