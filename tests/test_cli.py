"""The command line: help, config loading and overrides, clear errors."""

from __future__ import annotations

import json

import pytest

from flows.cli import build_parser, load_config, main


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
    cfg = load_config(args.config, args)
    assert cfg.threshold.eta == 0.4 and cfg.caption.n_cap == 5
    args = build_parser().parse_args(
        ["run", "--annotations", "a", "--images", "i", "--out", "o", "--captioner", "blip,blip2"]
    )
    assert load_config(None, args).caption.captioner == ("blip", "blip2")


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
    assert main(["status", "--out", str(tmp_path)]) == 1
    assert "no runs under" in capsys.readouterr().err


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
