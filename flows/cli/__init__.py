"""The `reltag` command line: the parser of every command and `main` (the console script's entry point)."""

from __future__ import annotations

import argparse
import os
import sys

from flows.cli.common import EXAMPLES, one_line

__all__ = ["EXAMPLES", "build_parser", "main", "one_line"]


def build_parser() -> argparse.ArgumentParser:
    from flows.cli import pretrain, read, run

    ap = argparse.ArgumentParser(
        prog="reltag",
        description="Turn detection datasets (COCO, Objects365) into relation-triplet Parquet shards "
        "(RLIPv2 pseudo-labelling), as resumable Prefect flows. Commands that read a run take --out ROOT "
        "and --run KEY|PREFIX|PATH; every error is one line, `reltag <command>: error: ...`, exit code 2.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    run.add_parsers(sub)  # plan, run, demo
    read.add_parsers(sub)  # runs, status, stats, show, report, export
    pretrain.add_parser(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = build_parser().parse_args(argv)
    if argv is None and args.cmd in ("run", "demo"):  # the command line, not a test calling main([...])
        from flows.cli.run import _stop_on_sigterm

        _stop_on_sigterm()
    try:
        return args.func(args)
    except BrokenPipeError:  # `reltag stats ... | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0
    except (
        ValueError,
        OSError,
    ) as e:  # bad input, config or run (or an unreadable path): one line, no traceback
        print(f"reltag {args.cmd}: error: {one_line(e)}", file=sys.stderr)
        return 2
