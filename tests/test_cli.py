"""The command line: help, config loading and overrides, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import build_parser, main
from flows.cli.config_flags import config_data
from tasks.config import PipelineConfig


def test_help_explains_each_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for cmd in ("plan", "run", "status", "demo", "stats"):
        assert cmd in text


def test_config_file_and_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("threshold:\n  eta: 0.3\ncaption:\n  n_cap: 5\n")
    args = build_parser().parse_args(
        [
            "run",
            "--annotations",
            "a",
            "--images",
            "i",
            "--out",
            "o",
            "--config",
            str(cfg_file),
            "--eta",
            "0.4",
        ]
    )
    cfg = PipelineConfig.model_validate(config_data(args.config, args))
    assert cfg.threshold.eta == 0.4 and cfg.caption.n_cap == 5
    args = build_parser().parse_args(
        ["run", "--annotations", "a", "--images", "i", "--out", "o", "--captioner", "blip,blip2"]
    )
    assert PipelineConfig.model_validate(config_data(None, args)).caption.captioner == ("blip", "blip2")


def test_bad_config_is_one_clear_line(tmp_path, capsys):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"threshold": {"eta": 3}}))
    rc = main(
        [
            "plan",
            "--annotations",
            "x.json",
            "--images",
            ".",
            "--out",
            str(tmp_path),
            "--config",
            str(cfg_file),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "reltag plan: error:" in err and "eta" in err
    rc = main(
        ["plan", "--annotations", "x.json", "--images", ".", "--out", str(tmp_path), "--captioner", "lavis"]
    )
    assert rc == 2 and "salesforce-lavis" in capsys.readouterr().err


def test_plan_command_reports_the_run(tmp_path, capsys):
    from flows.cli import EXAMPLES

    rc = main(
        [
            "plan",
            "--annotations",
            str(EXAMPLES / "sample_detections.json"),
            "--images",
            str(EXAMPLES / "images"),
            "--captions",
            str(EXAMPLES / "sample_captions.json"),
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    assert "5 images, 19 boxes in 1 shards" in capsys.readouterr().out


def test_status_without_runs(tmp_path, capsys):
    assert main(["status", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"reltag status: error: no runs under {tmp_path}\n"


def test_rtagger_without_checkpoint_is_refused_before_any_work(tmp_path, capsys):
    rc = main(
        ["plan", "--annotations", "x.json", "--images", ".", "--out", str(tmp_path), "--tagger", "rtagger"]
    )
    assert rc == 2 and "tag.checkpoint is not set" in capsys.readouterr().err


def test_bad_flag_values_are_one_line_naming_the_field(tmp_path, capsys):
    base = ["run", "--annotations", "x.json", "--images", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main([*base, "--eta", "2"]) == 2
    err = capsys.readouterr().err
    assert err == "reltag run: error: threshold.eta: Input should be less than or equal to 1 (got 2.0)\n"
    assert main([*base, "--vocabulary", "COCO"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["reltag run: error: match.vocabulary: Input should be 'o365' or 'coco' (got 'COCO')"]


def test_missing_annotations_file_fails_at_once_without_retries(tmp_path, capsys):
    """Decided before Prefect starts (the run's keys need the file's checksum): no retries, no traceback."""
    import time

    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"annotations": []}))
    t = time.perf_counter()
    rc = main(["run", "--annotations", str(tmp_path / "nope.json"), "--images", str(tmp_path),
               "--captions", str(caps), "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2 and time.perf_counter() - t < 10  # the old path retried for 2 + 5 + 15 s
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("reltag run: error: ") and "nope.json" in err[0]


# ---- help: choices and defaults from the config models ------------------------------------------------------


def _help_lines(monkeypatch, capsys, cmd: str) -> dict[str, str]:
    """`reltag CMD --help`, one line per option: its help joined onto it (argparse puts the help of a long
    option on the next line; a wide terminal keeps it from wrapping further)."""
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit):
        main([cmd, "--help"])
    lines: dict[str, str] = {}
    last = None
    for line in capsys.readouterr().out.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("-"):
            last = parts[0].rstrip(",")
            lines[last] = line.strip()
        elif parts and last and line.startswith("   "):
            lines[last] += "  " + line.strip()
        else:
            last = None
    return lines


def test_help_shows_choices_and_defaults(monkeypatch, capsys):
    h = _help_lines(monkeypatch, capsys, "run")
    assert "--vocabulary {o365,coco} " in h["--vocabulary"]
    assert h["--vocabulary"].endswith("(default: inferred from the categories)")
    assert h["--dataset"].endswith("(default: inferred with the vocabulary: coco, objects365)")
    assert "--eta ETA " in h["--eta"] and h["--eta"].endswith("(default: 0.2)")
    assert "--box-policy {clip,quarantine} " in h["--box-policy"] and h["--box-policy"].endswith(
        "(default: clip)"
    )
    assert "--tagger {greedy_overlap,rtagger,clip} " in h["--tagger"]
    assert h["--tagger"].endswith("(default: greedy_overlap)")
    assert (
        "--rule {paper,relation_only} " in h["--rule"] and "p_subject * p_object * p_relation" in h["--rule"]
    )
    assert h["--n-cap"].endswith("(default: 10)") and "captions per image" in h["--n-cap"]
    assert h["--checkpoint"].endswith("(default: none)")
    assert h["--captioner"].endswith("(default: oracle)") and "{oracle,blip,blip2" in h["--captioner"]
    assert "--stage-threads" in h and "--captions" in h
    # demo and plan share the flags
    assert _help_lines(monkeypatch, capsys, "plan")["--eta"] == h["--eta"]


# ---- inputs checked before Prefect starts ---------------------------------------------------------------------

_NO_PREFECT = r"""
import json, sys
sys.modules["prefect"] = None  # importing Prefect fails: every case must be decided before it starts
from flows.cli import main
import contextlib, io
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    out.append([rc, err.getvalue()])
print(json.dumps(out))
"""


def _no_prefect(cases: list[list[str]]) -> list[tuple[int, list[str]]]:
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    r = subprocess.run([sys.executable, "-c", _NO_PREFECT, json.dumps(cases)], capture_output=True, text=True,
                       timeout=120, env=env, cwd=root)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return [(rc, err.strip().splitlines()) for rc, err in json.loads(r.stdout)]


def _inputs(tmp_path):
    from flows.cli import EXAMPLES

    return (
        str(EXAMPLES / "sample_detections.json"),
        str(EXAMPLES / "images"),
        str(EXAMPLES / "sample_captions.json"),
    )


def test_input_errors_are_one_line_exit_2_before_prefect(tmp_path):
    det, images, caps = _inputs(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [{"id": 1,')
    no_cats = tmp_path / "nocats.json"
    no_cats.write_text(json.dumps({"images": [], "annotations": []}))
    bad_caps = tmp_path / "caps.json"
    bad_caps.write_text(json.dumps({"annotations": [{"image_id": 1}]}))
    bad_yaml = tmp_path / "c.yaml"
    bad_yaml.write_text("threshold: {eta: [0.2\n")
    out = str(tmp_path / "o")

    def run(annotations=det, images=images, captions=caps, *extra):
        argv = ["run", "--annotations", annotations, "--images", images, "--out", out, *extra]
        return argv + (["--captions", captions] if captions else [])

    cases = {
        "missing image folder": (run(det, str(tmp_path / "nope")), f"image folder {tmp_path / 'nope'} does not exist"),
        "empty image folder": (run(det, str(empty)), f"image folder {empty} is empty"),
        "image folder is a file": (run(det, det), f"image folder {det} is not a folder"),
        "annotations is a folder": (run(str(empty)), f"annotations file {empty} is a folder"),
        "broken annotations": (run(str(broken)), f"annotations file {broken}"),
        "no categories": (run(str(no_cats)), "has no 'categories'"),
        "missing captions": (run(det, images, str(tmp_path / "c.json")), f"captions file {tmp_path / 'c.json'} does not exist"),
        "captions without captions": (run(det, images, str(bad_caps)), "annotation #0 lacks image_id or caption"),
        "oracle without captions": (run(det, images, None), "captioner 'oracle' needs a captions file"),
        "missing config": (run(det, images, caps, "--config", str(tmp_path / "x.yaml")), "config file"),
        "bad yaml": (run(det, images, caps, "--config", str(bad_yaml)), f"config file {bad_yaml} is not plain YAML"),
    }  # fmt: skip
    results = _no_prefect([argv for argv, _ in cases.values()])
    for (name, (_, want)), (rc, err) in zip(cases.items(), results):
        assert rc == 2, (name, err)
        # one error line and no traceback (a line saying what was inferred may come before a late error)
        assert all(line.startswith("reltag run: ") for line in err), (name, err)
        (line,) = [line for line in err if line.startswith("reltag run: error: ")]
        assert want in line, (name, err)


def test_plan_works_without_captions(tmp_path, capsys):
    det, images, caps = _inputs(tmp_path)
    out = tmp_path / "o"
    base = ["plan", "--annotations", det, "--images", images, "--out", str(out)]
    assert main(base) == 0
    text = capsys.readouterr().out
    assert "5 images, 19 boxes in 1 shards" in text and "no run recorded" in text
    (plan,) = out.glob("*/*/plan.json")
    assert json.loads(plan.read_text())["counts"]["images_planned"] == 5
    # the same plan with captions then records the run in it
    assert main([*base, "--captions", caps]) == 0
    assert len(list(out.glob("*/*/runs/*.json"))) == 1 and len(list(out.glob("*/*/plan.json"))) == 1


# ---- the path `reltag run` prints is accepted as --out ------------------------------------------------------------


def test_status_stats_show_accept_the_output_path(prefect_harness, tmp_path, capsys):
    out = tmp_path / "root"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    (output,) = [line.split("output: ", 1)[1] for line in printed.splitlines() if line.startswith("output: ")]
    assert output.startswith(str(out)) and output != str(out)
    for where in (output, str(out / "sample")):  # the run's folder, the dataset's folder
        assert main(["status", "--out", where, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["complete"] is True
        assert main(["stats", "--out", where]) == 0
        assert json.loads(capsys.readouterr().out)["output"] == output  # one JSON document
        png = tmp_path / "s.png"
        assert main(["show", "--out", where, "--png", str(png)]) == 0 and png.stat().st_size > 0
        capsys.readouterr()
    # --json on the commands that write: what was written, as one JSON document
    png = tmp_path / "j.png"
    assert main(["show", "--out", str(out), "--png", str(png), "--n-images", "2", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["png"] == str(png) and shown["images"] == 2 == len(shown["image_ids"]) and png.stat().st_size
    assert main(["report", "--run", output, "--json"]) == 0  # the run's folder as --run, no --out
    page = json.loads(capsys.readouterr().out)
    assert page["html"].endswith(f"/report/{page['run_key']}.html") and Path(page["html"]).is_file()
    dest = tmp_path / "rel.json"
    assert main(["export", "--out", str(out), "--json", str(dest)]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert (
        exported["dest"] == str(dest) and exported["bytes"] == dest.stat().st_size and exported["images"] >= 1
    )


# ---- one CLI: every option explained, one run selector, one error form ------------------------------------------


def _subparsers(parser) -> dict:
    import argparse

    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub


def test_every_command_and_option_has_help():
    """Walks every subcommand: a help line in `reltag --help`, a description, and a help text on each option
    (hidden deprecated aliases excepted); the read commands all take --out, --run and --json."""
    import argparse

    sub = _subparsers(build_parser())
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(sub.choices) and len(sub.choices) == 10
    missing = []
    for name, p in sub.choices.items():
        if not helps[name] or not p.description:
            missing.append(f"{name}: help or description")
        for a in p._actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
                continue
            if not (a.help or "").strip():
                missing.append(f"{name} {'/'.join(a.option_strings) or a.dest}")
        text = p.format_help()
        assert "manifest.json" not in text, name  # the files are plan.json and runs/<key>.json
    assert missing == []
    for name in ("runs", "status", "stats", "show", "report", "export"):
        opts = {o for a in sub.choices[name]._actions for o in a.option_strings}
        assert {"--out", "--run", "--json"} <= opts, name
    assert "verify" in helps["run"]
    # --sample is one thing: demo's sample folder; show counts its images with --n-images
    assert "--sample" not in {o for a in sub.choices["show"]._actions for o in a.option_strings}


def test_old_spellings_are_hidden_aliases(tmp_path):
    ap = build_parser()
    a = ap.parse_args(["stats", "--out", "o", "--run-key", "abc"])
    assert a.run == "abc"
    a = ap.parse_args(["pretrain", "--source", "s", "--out", "o", "--config", "c.yaml"])
    b = ap.parse_args(["pretrain", "--source", "s", "--out", "o", "--settings", "c.yaml"])
    assert a.settings == b.settings == "c.yaml"
    assert "--settings" not in _subparsers(ap).choices["pretrain"].format_help()
    assert "--run-key" not in _subparsers(ap).choices["stats"].format_help()


@pytest.fixture
def three_runs(tmp_path):
    """Under one root: finished runs abc111 and abc222 and an unfinished def333 (plan folders t/plan-<key>)."""
    from tests.test_relations import HAT, PERSON, img, make_run, trip

    b = [(1, PERSON, 0, 0, 5, 5), (2, HAT, 0, 0, 5, 5)]
    shards = [([img(1, b)], [trip(1, 1, 2, "on", 0.9)])] * 2
    root = tmp_path / "root"
    for key, finished in (("abc111", True), ("abc222", True), ("def333", False)):
        make_run(root, shards, run_key=key, finished=finished)
    return root


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err.strip()


def test_read_commands_refuse_unknown_ambiguous_and_unfinished_runs_alike(three_runs, tmp_path, capsys):
    root = str(three_runs)
    extra = {"show": ["--png", str(tmp_path / "x.png")], "export": [str(tmp_path / "x.json")]}
    for cmd in ("stats", "show", "report", "export"):
        base = [cmd, "--out", root, *extra.get(cmd, [])]
        assert main([*base, "--run", "def"]) == 2, cmd
        err = _err(capsys)
        assert err.startswith(f"reltag {cmd}: error: run def333 under {root} is not finished: ")
        assert (
            "2 of 2 shards have no 'write' record [0, 1]" in err
            and "stats/def333/run.json are not written" in err
        )
        assert main([*base, "--run-key", "def3"]) == 2 and "def333" in _err(capsys)  # the old spelling
        assert main([*base, "--run", "zzz"]) == 2, cmd
        assert _err(capsys) == (
            f"reltag {cmd}: error: no run under {root} has a key starting 'zzz' (its runs: abc111, abc222, def333)"
        )
        assert main([*base, "--run", "abc"]) == 2, cmd
        assert _err(capsys) == (
            f"reltag {cmd}: error: --run 'abc' matches 2 runs (abc111, abc222); give more of the key"
        )
        assert main([cmd, "--out", str(tmp_path / "none"), *extra.get(cmd, [])]) == 2
        assert _err(capsys) == f"reltag {cmd}: error: no runs under {tmp_path / 'none'}"
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "x.json").exists()
    # the newest run is unfinished: without --run a finished-only command says so, naming it
    assert main(["stats", "--out", root]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("reltag stats: showing run def333 (t), the newest of 3; --run picks another")
    assert err[1].startswith("reltag stats: error: run def333 under") and len(err) == 2
    # status and runs read unfinished runs; an unknown one is the same error
    assert main(["status", "--out", root, "--run", "def", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["run_key"] == "def333" and st["complete"] is False
    assert main(["status", "--out", root, "--run", "zzz"]) == 2 and "key starting 'zzz'" in _err(capsys)
    assert main(["status", "--out", root, "--json"]) == 0  # every run, finished or not
    rows = json.loads(capsys.readouterr().out)
    assert [(r["run_key"], r["complete"], r.get("triplets")) for r in rows] == [
        ("abc111", True, 2), ("abc222", True, 2), ("def333", False, None),
    ]  # fmt: skip
    assert main(["runs", "--out", root, "--run", "zzz"]) == 2 and "key starting 'zzz'" in _err(capsys)


def test_run_selector_takes_a_key_a_record_or_a_folder(three_runs, capsys):
    root = three_runs
    plan = root / "t" / "plan-abc222"
    for how in (
        ["--out", str(root), "--run", "abc222"],
        ["--out", str(root), "--run", "abc2"],
        ["--run", str(plan / "runs" / "abc222.json")],  # the run's record: no --out needed
        ["--run", str(plan)],  # its plan folder (one run in it)
        ["--run", str(plan / "stats" / "abc222")],  # a folder of the run under its plan
        ["--out", str(plan)],  # --out at the plan folder
    ):
        assert main(["stats", *how, "--json"]) == 0, how
        assert json.loads(capsys.readouterr().out) == {"triplets": 2}, how
    assert main(["stats", "--run", str(root)]) == 2  # the root holds three runs
    assert "--run" in _err(capsys)
    assert main(["stats", "--run", str(plan / "runs" / "nope.json")]) == 2
    assert _err(capsys) == f"reltag stats: error: no run record at {plan / 'runs' / 'nope.json'}"
    assert main(["stats", "--run", "abc222"]) == 2
    assert _err(capsys) == "reltag stats: error: --out is required unless --run is a path"


def test_finished_is_one_decision(three_runs):
    """flows.status.unfinished decides for every command and flow: every shard's write unit done in the ledger
    and stats/<run-key>/run.json written; run_status's `complete` and is_finished agree with it."""
    from flows.status import find_runs, is_finished, plan_of, run_status, unfinished
    from storage.ledger import Ledger

    runs = {r.run_key: r for r in find_runs(str(three_runs))}
    done, todo = runs["abc111"], runs["def333"]
    assert unfinished(done) == [] and run_status(done)["complete"] is True
    assert is_finished(done, plan_of(done), Ledger(done).snapshot())
    gaps = unfinished(todo)
    assert len(gaps) == 2 and run_status(todo)["complete"] is False
    # the ledger says written but the statistics are missing: not finished
    Path(done.run_stats).unlink()
    assert unfinished(done) == [f"the run statistics {done.run_stats} are not written"]
    assert run_status(done)["complete"] is False and "triplets" not in run_status(done)
