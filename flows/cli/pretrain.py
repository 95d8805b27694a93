"""`reltag pretrain`: pre-train RLIPv2-ParSeDA (or -ParSeD) on finished runs and VG files (the pretrain flow)."""

from __future__ import annotations

import argparse
import json


def cmd_pretrain(args) -> int:
    from flows.pretrain import params_from_cli, run_in_process

    params = params_from_cli(args)  # a bad value fails here, before Prefect starts
    summary = run_in_process(params)
    print(json.dumps(summary, indent=2))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain",
        help="pre-train RLIPv2-ParSeDA (or -ParSeD) on relation data (the pretrain flow); a rerun resumes",
        description="Train into <out>/<identity>/ (checkpoints/, history.json); the same command after a crash "
        "resumes from the last checkpoint. Defaults: the RLIPv2 reference's pre-training settings.",
    )
    p.add_argument("--source", action="append", required=True,
                   help="a source to mix in: a finished run (its plan folder or runs/<key>.json) or a VG-style "
                   "relationships file (repeatable)")  # fmt: skip
    p.add_argument("--out", required=True, help="output root for pre-training runs")
    # dest "settings": flows.pretrain.params_from_cli reads args.settings
    p.add_argument("--config", dest="settings",
                   help="YAML/JSON mapping of PretrainSettings fields (models/rlipv2/pretrain.py)")  # fmt: skip
    p.add_argument("--settings", dest="settings", help=argparse.SUPPRESS)  # deprecated: --config
    p.add_argument("--steps", type=int, help="stop after this many steps in total (default: all epochs)")
    p.add_argument("--device", help="cpu, cuda, ... (default: the settings' device)")
    p.add_argument("--model", choices=["parseda", "parsed"],
                   help="RLIPv2-ParSeDA (default, the paper's main model) or RLIPv2-ParSeD")  # fmt: skip
    p.add_argument("--batch-size", type=int,
                   help="images per process and step (default: the model's reference script, 4 ParSeDA, 8 ParSeD)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="the tiny test architecture (offline demo)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes (GPUs); > 1 launches torchrun")
    p.add_argument("--log-every", type=int, default=50, help="log the losses every N steps (default 50)")
    p.set_defaults(func=cmd_pretrain)
