"""The pipeline's settings on the command line: the config file, the flags that override it (each declared on
its config field: tasks.flags), and the flow's parameters built from both with every input checked
(`reltag plan`, `run`, `demo`)."""

from __future__ import annotations

import argparse
import sys

from flows.params import read_config_file
from tasks.config import section_models
from tasks.flags import flags


def config_data(path: str | None, args: argparse.Namespace) -> dict:
    """The raw config mapping: the config file (YAML or JSON) with the command-line flags applied on top."""
    data: dict = read_config_file(path) if path else {}
    for f in flags():
        v = getattr(args, f.dest, None)
        if v is None:
            continue
        if f.section is None:
            data[f.field] = v
        else:
            data.setdefault(f.section, {})[f.field] = v
    return data


def _add_run_args(p: argparse.ArgumentParser, inputs: bool = True) -> None:
    if inputs:
        p.add_argument("--annotations", required=True, help="COCO / Objects365 detection JSON")
        p.add_argument("--images", required=True, help="image folder the file_name entries are relative to")
        p.add_argument("--captions", help="COCO-Captions JSON (for the oracle captioner)")
    p.add_argument("--out", required=True, help="output root (local path or fsspec URI)")
    p.add_argument(
        "--config",
        help="pipeline config, YAML or JSON (sections " + "/".join(n for n in section_models() if n) + ")",
    )
    p.add_argument(
        "--stage-threads", type=int, default=None,
        help="threads for stage units (default: one per stage, consecutive batches overlap; 1: one unit at a time)",
    )  # fmt: skip
    g = p.add_argument_group(
        "config overrides (declared on the config fields of tasks/config.py and of the stages)"
    )
    for f in flags():
        g.add_argument("--" + f.flag, dest=f.dest, type=f.type, metavar=f.metavar, help=f.help)


def _params(args, run: bool = True, dataset: str | None = None):
    """The flow's parameters from the command line, every input checked before any work (each problem one
    ValueError): the config first, then the input paths, then what the config leaves out is inferred from the
    annotation file's categories (the vocabulary, then the dataset name), said on stderr with any categories
    that have no synonym list. dataset: the name used when neither the config nor a flag gives one."""
    from flows.params import LabelParams
    from tasks.config import PipelineConfig, check_tagger_numbering, fill_inferred
    from tasks.stages.plan.start import cached_categories, check_inputs

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
