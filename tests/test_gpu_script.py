"""The CPU side of the GPU check: benchmarks/gpu/run.sh (syntax, arguments, plan, the clean skip without a
GPU) and the --device / --results-dir options every GPU benchmark shares (benchmarks/common.py)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
STEPS = ["env", "build", "kernel-tests", "model-tests", "bench-msda", "bench-caption", "bench-tagger"]
BENCHMARKS = ["bench_msda.py", "bench_caption.py", "bench_tagger.py"]

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not on PATH")


def no_gpu_env(**extra) -> dict:
    """The environment of a child process that sees no CUDA device, whatever this machine has."""
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PYTHON")}
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **extra)
    return env


def run_script(*args: str, cwd: Path | None = None, timeout: int = 60, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=cwd or ROOT,
        env=no_gpu_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ----------------------------------------------------------------------------------------------- run.sh


@needs_bash
def test_script_parses_with_bash_n():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


@needs_bash
def test_help_names_every_step_and_option():
    done = run_script("--help")
    assert done.returncode == 0, done.stderr
    for word in [
        *STEPS,
        "--out",
        "--python",
        "--only",
        "--skip",
        "--timeout",
        "--budget",
        "--arch",
        "--dry-run",
    ]:
        assert word in done.stdout, f"--help does not mention {word}"


@needs_bash
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], r"unknown argument '--bogus'"),
        (["--only", "build,nope"], r"--only: unknown step 'nope'"),
        (["--skip", ""], r"--skip needs a comma-separated list of steps"),
        (["--timeout", "build=abc"], r"--timeout build: 'abc' is not a positive number of seconds"),
        (["--timeout", "build=0"], r"--timeout build: '0' is not a positive number of seconds"),
        (["--timeout", "compile=30"], r"--timeout: unknown step 'compile'"),
        (["--timeout", "30"], r"--timeout needs STEP=SECONDS"),
        (["--budget", "0"], r"--budget needs a positive number of seconds"),
        (["--out"], r"--out needs a folder"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    import re

    done = run_script(*args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run.sh: error: "), done.stderr
    assert re.search(message, lines[0]), lines[0]
    assert done.stdout == ""


def _plan(stdout: str) -> dict[str, str]:
    plan = {}
    for line in stdout.splitlines():
        if line.startswith("step "):
            name, rest = line[5:].split(maxsplit=1)
            plan[name.rstrip(":")] = rest
    return plan


@needs_bash
def test_dry_run_plan_has_every_step_within_the_8_minute_budget(tmp_path):
    done = run_script("--dry-run", "--out", str(tmp_path / "o"), "--python", "/opt/py/bin/python3")
    assert done.returncode == 0, done.stderr
    head = done.stdout.splitlines()[0]
    assert head.startswith(f"plan: out={tmp_path / 'o'} python=/opt/py/bin/python3 budget=")
    budget = int(head.split("budget=")[1].split("s")[0])
    assert budget < 8 * 60, f"the default budget {budget}s leaves no room inside 8 minutes"
    assert "arch=9.0 quick=0" in head
    plan = _plan(done.stdout)
    assert list(plan) == STEPS
    assert plan["kernel-tests"].endswith(
        f"-m pytest -q -p no:cacheprovider tests/test_kernels.py -m gpu --junitxml={tmp_path / 'o'}/kernel_tests.xml"
    )
    assert "tests/test_gpu_models.py -m gpu" in plan["model-tests"]
    for step, bench in zip(STEPS[4:], BENCHMARKS):
        assert plan[step].endswith(
            f"/opt/py/bin/python3 benchmarks/{bench} --device cuda --results-dir {tmp_path / 'o'}"
        ), plan[step]
    assert not (tmp_path / "o").exists(), "a dry run wrote something"


@needs_bash
def test_dry_run_only_timeout_quick_and_out_from_the_environment(tmp_path):
    out = tmp_path / "from-env"
    done = run_script(
        "--dry-run", "--only", "build,bench-msda", "--timeout", "build=300", "--quick", "--arch", "8.0;9.0",
        OUT=str(out), PYTHON="py3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"out={out} python=py3" in done.stdout and "arch=8.0;9.0 quick=1" in done.stdout
    plan = _plan(done.stdout)
    assert plan["build"] == "timeout=300s: bash -c build_extensions"
    assert (
        plan["bench-msda"]
        == f"timeout=90s: py3 benchmarks/bench_msda.py --device cuda --results-dir {out} --quick"
    )
    assert {k for k, v in plan.items() if v == "not selected"} == set(STEPS) - {"build", "bench-msda"}


@needs_bash
def test_dry_run_skip_leaves_steps_out():
    done = run_script("--dry-run", "--skip", "bench-caption,bench-tagger")
    plan = _plan(done.stdout)
    assert plan["bench-caption"] == plan["bench-tagger"] == "not selected"
    assert plan["build"].startswith("timeout=")


@needs_bash
@pytest.mark.parametrize("how", ["OUT", "--out"])
def test_without_a_gpu_the_script_skips_cleanly(tmp_path, how):
    """Run for real (no --dry-run) in an unrelated folder, with CUDA hidden: exit 0, SKIP said on stdout and
    in the log, summary.json says skipped, nothing else written, in well under the timeout."""
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = tmp_path / "out"
    args, env = (["--out", str(out)], {}) if how == "--out" else ([], {"OUT": str(out)})
    done = run_script(*args, "--python", sys.executable, cwd=work, timeout=120, **env)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "SKIP: no CUDA device here" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["run.log", "summary.json"]
    log = (out / "run.log").read_text()
    assert "SKIP: no CUDA device here" in log and f"output {out}" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] is True and summary["reason"] == "no CUDA device"
    assert not list(work.iterdir()), "the script wrote into the current folder"


@needs_bash
def test_missing_python_is_an_error_not_a_skip(tmp_path):
    done = run_script("--out", str(tmp_path), "--python", str(tmp_path / "no-such-python"))
    assert done.returncode == 2
    assert "ERROR: Python" in done.stdout and "not found" in (tmp_path / "run.log").read_text()


# ----------------------------------------------------------------------------------------------- benchmarks


def run_bench(name: str, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args],
        cwd=ROOT,
        env=no_gpu_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_benchmark_help_offers_device_and_results_dir(bench):
    done = run_bench(bench, "--help")
    assert done.returncode == 0, done.stderr
    assert "--device {cpu,cuda}" in done.stdout and "--results-dir DIR" in done.stdout


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_benchmark_refuses_cuda_without_a_gpu_in_one_line(bench, tmp_path):
    done = run_bench(bench, "--device", "cuda", "--results-dir", str(tmp_path / "res"), "--quick")
    assert done.returncode == 2, (done.stdout[-2000:], done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{bench}: error: --device cuda: ") and "CUDA" in lines[0], lines[0]
    assert "run without --device (cpu) or on a GPU machine" in lines[0]
    assert not (tmp_path / "res").exists(), "the refused run created its results folder"


@pytest.mark.parametrize("bench", BENCHMARKS)
def test_benchmark_rejects_an_unknown_device(bench):
    done = run_bench(bench, "--device", "tpu")
    assert done.returncode == 2 and "invalid choice: 'tpu'" in done.stderr


# ----------------------------------------------------------------------------------------------- common.py


def test_device_options_default_to_cpu_and_the_committed_results():
    ap = argparse.ArgumentParser(prog="bench_x.py")
    common.add_device_args(ap)
    opts = ap.parse_args([])
    assert opts.device == "cpu" and opts.results_dir == str(ROOT / "benchmarks" / "results")
    opts = ap.parse_args(["--device", "cuda", "--results-dir", "/tmp/r"])
    assert opts.device == "cuda" and opts.results_dir == "/tmp/r"
    assert common.result_path("/tmp/r", "msda", "cpu") == "/tmp/r/msda.json"
    assert common.result_path("/tmp/r", "msda", "cuda") == "/tmp/r/msda_cuda.json"


def test_check_device_exits_2_naming_why(monkeypatch, capsys):
    ap = argparse.ArgumentParser(prog="bench_x.py")
    common.check_device(ap, "cpu")  # never refused
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    with pytest.raises(SystemExit) as info:
        common.check_device(ap, "cuda")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        f"bench_x.py: error: --device cuda: torch {torch.__version__} (CUDA 12.4) sees no CUDA device; run "
        "without --device (cpu) or on a GPU machine\n"
    )
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "has no CUDA support" in common.cuda_unavailable_reason()


def test_save_result_writes_into_the_given_folder(tmp_path):
    path = common.save_result("demo", {"x": 1}, results_dir=str(tmp_path / "r"))
    assert path == str(tmp_path / "r" / "demo.json")
    assert json.loads(Path(path).read_text()) == {"x": 1}


def _small(img):
    """Picklable preprocess for the decode measurement: resize and convert to a float tensor."""
    import numpy as np

    arr = np.asarray(img.resize((32, 24)), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


@pytest.mark.parametrize("workers", [0, 1])
def test_decode_throughput_counts_images_after_the_first_batch(workers):
    files = common.bundled_images()
    assert len(files) >= 3 and all(os.path.isfile(f) for f in files)
    res = common.decode_throughput(_small, n_images=10, workers=workers, batch_size=4)
    assert res["images_timed"] == 6  # 10 images, the first batch of 4 not timed
    assert res["workers"] == workers and res["images_per_s"] > 0
    assert res["output_shapes"] == [(3, 24, 32)]
    assert res["files"] == [os.path.basename(f) for f in files]


def test_kernel_busy_time_reads_the_profiler_trace_on_cpu():
    res = common.kernel_busy_time(lambda: torch.randn(64, 64) @ torch.randn(64, 64), cuda=False)
    assert res["busy_s"] == 0.0 and res["gpu_events"] == 0 and res["profiled_wall_s"] > 0


def test_msda_roofline_bytes_count_each_tensor_once():
    from benchmarks import bench_msda as b

    s, m, d, lp = 22223, 8, 32, 4 * 4
    t = b.traffic_bytes("encoder", 4)
    value, samples, out = s * m * d, s * m * lp, s * m * d
    assert t["forward"]["compulsory"] == 4 * (value + 3 * samples + out)
    # forward + backward: grad_output and the inputs read again, the three gradients written
    assert t["forward_backward"]["compulsory"] == 4 * (
        2 * (value + 3 * samples) + 2 * out + value + 3 * samples
    )
    assert t["forward"]["gathered"] == 4 * (samples * 4 * d + 3 * samples + out)
    assert b.traffic_bytes("decoder", 2)["forward"]["compulsory"] == 2 * (
        s * m * d * 16 + 16 * 200 * m * lp * 3 + 16 * 200 * m * d
    )
