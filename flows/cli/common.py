"""What the commands share: the one run selector (`--out`, `--run KEY|PREFIX|PATH`) and the one error form."""

from __future__ import annotations

import argparse
import posixpath
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
OUT_HELP = (
    "output root, one of its dataset folders, or a plan folder (the output: path `reltag run` prints); "
    "not needed when --run is a path"
)
RUN_HELP = (
    "the run: its key, the first characters of it, or a path (its plan folder, or its runs/<key>.json record); "
    "default: the newest run under --out, named on stderr"
)
SHOWN = 10  # candidates named in an error


def add_run_selector(p: argparse.ArgumentParser, run_help: str = RUN_HELP) -> None:
    """--out and --run on a command that reads runs (--run-key: the old spelling, hidden)."""
    p.add_argument("--out", help=OUT_HELP)
    p.add_argument("--run", metavar="KEY|PREFIX|PATH", help=run_help)
    p.add_argument("--run-key", dest="run", help=argparse.SUPPRESS)  # deprecated: --run


def add_json(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--json", action="store_true", help=text)


def note(args, text: str) -> None:
    """A line on stderr that is not an error (which run was picked)."""
    print(f"reltag {args.cmd}: {text}", file=sys.stderr)


def _keys(runs: list) -> str:
    keys = [r.run_key for r in runs]
    return ", ".join(keys[:SHOWN]) + (f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


def is_path(selector: str) -> bool:
    """A --run value names a path when it has a '/' (or is a URI, a .json file, '.' or '..'); else a key."""
    return "/" in selector or selector.endswith(".json") or selector in (".", "..")


def find_runs_in(out: str) -> list:
    """The runs under an output root, or under one of its dataset folders, or in one plan folder (the
    `output:` path `reltag run` prints, `<root>/<dataset>/<plan_key>`): only that folder's runs. Oldest first."""
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


def _runs_at_path(path: str) -> list:
    """The runs a path names: a run record `<plan>/runs/<key>.json`, a run's own folder under its plan
    (`stats/<key>`, `triplets/<key>`, ...), or a plan folder (each of its runs)."""
    from fsspec.core import url_to_fs

    fs, p = url_to_fs(path)
    p = p.rstrip("/")
    key = None
    if p.endswith(".json") and posixpath.basename(posixpath.dirname(p)) == "runs":
        key, plan = posixpath.basename(p)[: -len(".json")], posixpath.dirname(posixpath.dirname(p))
        if not fs.exists(p):
            raise ValueError(f"no run record at {path}")
    elif not fs.exists(posixpath.join(p, "plan.json")) and fs.exists(
        posixpath.join(posixpath.dirname(posixpath.dirname(p)), "runs", posixpath.basename(p) + ".json")
    ):
        key, plan = posixpath.basename(p), posixpath.dirname(posixpath.dirname(p))
    else:
        plan = p
    runs = find_runs_in(fs.unstrip_protocol(plan) if "://" in path else plan)
    return [r for r in runs if key is None or r.run_key == key]


def select_runs(args) -> list:
    """Every run that --out and --run name, oldest first; a ValueError (one line, exit 2) when none does."""
    sel = args.run
    if sel and is_path(sel):
        runs = _runs_at_path(sel)
        if not runs:
            raise ValueError(f"no run at {sel} (a plan folder, a run's runs/<key>.json, or a key with --out)")
        return runs
    if not args.out:
        raise ValueError("--out is required unless --run is a path")
    runs = find_runs_in(args.out)
    if not runs:
        raise ValueError(f"no runs under {args.out}")
    if sel:
        exact = [r for r in runs if r.run_key == sel]
        matching = exact or [r for r in runs if r.run_key.startswith(sel)]
        if not matching:
            raise ValueError(f"no run under {args.out} has a key starting {sel!r} (its runs: {_keys(runs)})")
        runs = matching
    return runs


def one_run(args, finished: bool = True):
    """The one run a command reads: --run picks it (a key, a prefix of one, or a path); without --run, the
    newest under --out, named on stderr. finished: refuse a run that is not finished (flows.status.unfinished).
    Every problem is a ValueError, which main() prints as `reltag <command>: error: ...` with exit code 2."""
    from flows.status import check_finished

    runs = select_runs(args)
    if args.run and len(runs) > 1:
        raise ValueError(f"--run {args.run!r} matches {len(runs)} runs ({_keys(runs)}); give more of the key")
    run = runs[-1]
    if len(runs) > 1:
        note(
            args, f"showing run {run.run_key} ({run.dataset}), the newest of {len(runs)}; --run picks another"
        )
    if finished:
        check_finished(run)
    return run


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
