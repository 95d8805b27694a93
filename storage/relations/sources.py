"""Pre-training sources: a finished reltag run, a VG-format relationships file, and naming them."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from storage.atomic import read_json
from storage.layout import RunLayout, shard_name
from storage.ledger import Ledger, run_gaps
from storage.manifest import PlanManifest, RunRecord
from storage.rules import passing_mask

#: RLIPv2's dataset names (its loader's `dataset` field), by the run's match vocabulary. Not the output folder
#: names of tasks.config.DATASET_OF_VOCABULARY ("objects365"): another thing, another name.
RLIPV2_DATASET_NAME = {"o365": "o365", "coco": "coco2017"}


class RunNotFinished(ValueError):
    """The run's ledger says some of it is not written yet."""


@dataclass
class RunSource:
    """A finished reltag run: its plan folder (path or fsspec URI) and run key."""

    plan_dir: str
    run_key: str
    fs: fsspec.AbstractFileSystem = field(init=False, repr=False)
    path: str = field(init=False, repr=False)
    record: RunRecord = field(init=False, repr=False)
    plan: PlanManifest = field(init=False, repr=False)

    def __post_init__(self):
        self.fs, self.path = url_to_fs(self.plan_dir)
        rec = posixpath.join(self.path, "runs", f"{self.run_key}.json")
        if not self.fs.exists(rec):
            raise FileNotFoundError(f"run {self.run_key}: no run record {rec}")
        self.record = RunRecord.from_dict(read_json(self.fs, rec))
        self.plan = PlanManifest.from_dict(read_json(self.fs, posixpath.join(self.path, "plan.json")))

    def __str__(self) -> str:
        return f"run {self.run_key} ({self.plan_dir})"

    @property
    def layout(self) -> RunLayout:
        root = self.fs.unstrip_protocol(posixpath.dirname(posixpath.dirname(self.path)))
        return RunLayout(
            root, self.record.dataset, self.run_key, self.record.plan_key, self.record.stage_keys
        )

    def triplets(self, shard: int) -> str:
        return posixpath.join(self.path, "triplets", self.run_key, f"{shard_name(shard)}.parquet")

    def images(self, shard: int) -> str:
        return posixpath.join(self.path, "images", f"{shard_name(shard)}.parquet")

    @property
    def vocabulary(self) -> str:
        return self.record.config.get("match", {}).get("vocabulary", "o365")

    @property
    def dataset(self) -> str:
        return RLIPV2_DATASET_NAME.get(self.vocabulary, self.vocabulary)

    @property
    def images_root(self) -> str:
        return self.record.inputs.get("images_root", "")

    def missing(self) -> list[str]:
        """What the ledger lacks for this run to count as finished (empty: finished)."""
        write = self.record.chain[-1].stage if self.record.chain else "write"  # the run's last stage
        return run_gaps(
            self.layout, [sh.shard for sh in self.plan.shards], Ledger(self.layout).snapshot(), write
        )

    def check_finished(self) -> None:
        miss = self.missing()
        if miss:
            raise RunNotFinished(
                f"{self} is not finished: {'; '.join(miss)} (`reltag status --out ROOT --run {self.run_key}` "
                "shows what is left; rerunning `reltag run` finishes it)"
            )

    def rejected_passing(self, eta: float, rule: str) -> int:
        """How many rows this run rejected below its eta would pass `rule >= eta` (read from rejects/, factor
        columns only). Rows it rejected for another reason (overlap, top-K) stay out: those are the run's choice."""
        folder = posixpath.join(self.path, "rejects", self.layout.key("threshold"))
        n = 0
        for p in sorted(self.fs.glob(posixpath.join(folder, "*", "*.parquet"))):
            if posixpath.basename(p).startswith("."):
                continue
            with self.fs.open(p, "rb") as f:
                t = pq.read_table(f, columns=["reason", "p_subject", "p_object", "p_relation"])
            t = t.filter(pc.equal(t["reason"], "below_eta"))
            n += pc.sum(passing_mask(t, eta, rule).cast(pa.int64())).as_py() or 0
        return n

    def check_settings(self, eta: float, rule: str) -> None:
        """Refuse reading at an (eta, rule) that would accept rows this run rejected: its triplets hold only the
        rows it accepted (the rest are rejects, without boxes)."""
        th = self.record.config.get("threshold", {})
        tagger = self.record.config.get("tag", {}).get("tagger")
        run_rule = th.get("rule", "paper")
        run_eta = th.get("clip_eta", 0.8) if tagger == "clip" else th.get("eta", 0.2)
        # product <= p_relation (factors in [0, 1]), so `paper` at eta is inside `relation_only` at the same eta
        if float(eta) >= float(run_eta) and (run_rule == rule or run_rule == "relation_only"):
            return
        n = self.rejected_passing(eta, rule)  # not a subset by its settings: is it one by its data?
        if n:
            raise ValueError(
                f"{self} kept rows with rule {run_rule!r} >= {run_eta}; reading at rule {rule!r} >= {eta} needs {n} "
                f"row(s) it rejected. Rerun its threshold stage with `reltag run ... --rule {rule} --eta {eta}` (only "
                "threshold and write are redone) and read that run"
            )


def is_json_list(fs, path: str) -> bool:
    """Whether a JSON file holds a list (a VG-format relationships file) rather than an object (e.g. a
    labelling run's record), from its first bytes."""
    with fs.open(path, "rb") as f:
        return f.read(256).lstrip().startswith(b"[")


@dataclass
class VGSource:
    """A VG-format relationships JSON (examples/vg_tiny), read by storage.relations.vg: a list of images with
    `image_id`, `file_name`, `width`, `height`, `objects` [{object_id, name (or names), x, y, w, h}],
    `relationships` [{subject_id, object_id, predicate, optional confidence / p_subject, p_object, p_relation}].
    Image paths are relative to the file."""

    uri: str
    fs: fsspec.AbstractFileSystem = field(init=False, repr=False)
    path: str = field(init=False, repr=False)

    def __post_init__(self):
        self.fs, self.path = url_to_fs(self.uri)
        if not self.fs.exists(self.path):
            raise FileNotFoundError(f"VG file {self.uri} does not exist")
        if not is_json_list(self.fs, self.path):
            raise ValueError(
                f"{self.uri} is not a VG-format relationships file (a JSON list of images); a labelling run is "
                "named by its plan folder (the path `reltag run` prints) or <plan folder>/runs/<run key>.json"
            )

    def __str__(self) -> str:
        return f"VG file {self.uri}"


Source = RunSource | VGSource


def resolve_source(src) -> Source:
    """A source from what a user names: a RunSource / VGSource; (plan_dir, run_key); a plan folder (with one run);
    a `runs/<key>.json` run record; a `triplets/<key>` folder; or a VG JSON file."""
    if isinstance(src, (RunSource, VGSource)):
        return src
    if isinstance(src, tuple) and len(src) == 2:
        return RunSource(str(src[0]), str(src[1]))
    s = str(src)
    fs, path = url_to_fs(s)
    path = path.rstrip("/")
    unstrip = fs.unstrip_protocol if "://" in s else (lambda p: p)
    if fs.isdir(path):
        if fs.exists(posixpath.join(path, "plan.json")):
            keys = sorted(
                posixpath.basename(p)[: -len(".json")]
                for p in fs.glob(posixpath.join(path, "runs", "*.json"))
            )
            if len(keys) != 1:
                raise ValueError(
                    f"plan folder {s} holds {len(keys)} runs {keys}; name one: (plan folder, run key) or "
                    f"{s}/runs/<run key>.json"
                )
            return RunSource(s, keys[0])
        parent = posixpath.dirname(path)
        if posixpath.basename(parent) == "triplets" and fs.exists(
            posixpath.join(posixpath.dirname(parent), "plan.json")
        ):
            return RunSource(unstrip(posixpath.dirname(parent)), posixpath.basename(path))
        raise ValueError(f"{s} is neither a plan folder (no plan.json) nor a triplets/<run key> folder")
    if not fs.exists(path):
        raise FileNotFoundError(f"source {s} does not exist")
    parent = posixpath.dirname(path)
    if (
        path.endswith(".json")
        and posixpath.basename(parent) == "runs"
        and fs.exists(posixpath.join(posixpath.dirname(parent), "plan.json"))
    ):
        return RunSource(unstrip(posixpath.dirname(parent)), posixpath.basename(path)[: -len(".json")])
    return VGSource(s)
