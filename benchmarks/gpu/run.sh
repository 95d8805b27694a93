#!/usr/bin/env bash
# benchmarks/gpu/run.sh: the whole GPU check of reltag in one run, sized for one lease of a GPU machine.
#
# On a bare GPU machine (python3 with torch + transformers, nvcc; nothing installed from the internet):
#   env          GPU, driver, nvcc, Python packages present / missing
#   build        the CUDA extension of kernels.ms_deform_attn (TORCH_CUDA_ARCH_LIST=9.0) and the C++ CPU one,
#                in parallel, into $RELTAG_KERNELS_CACHE
#   kernel-tests pytest tests/test_kernels.py -m gpu        (CUDA kernel vs the float64 reference)
#   model-tests  pytest tests/test_gpu_models.py -m gpu     (captioner and tagger: fp32/bf16/fp16, OOM halving)
#   bench-msda, bench-caption, bench-tagger                 (benchmarks/bench_*.py --device cuda)
# Each step has its own timeout, clipped to what is left of the whole run's budget (default 450 s), so the
# script ends in under 8 minutes including the build. A failed step does not stop the others; the exit
# status is 1 when any step failed or timed out, 0 otherwise. Without a CUDA device it writes the log,
# says SKIP and exits 0. Everything it writes (the log, JUnit XML of the tests, the benchmarks' JSON,
# summary.json: 7 files) goes to --out DIR, else $OUT, else a new folder under /tmp.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
STEPS=(env build kernel-tests model-tests bench-msda bench-caption bench-tagger)
declare -A TIMEOUT=([env]=30 [build]=240 [kernel-tests]=90 [model-tests]=120 [bench-msda]=90
  [bench-caption]=150 [bench-tagger]=120)
declare -A STATUS=() SECONDS_TAKEN=() RC=()

PY=${PYTHON:-python3}
OUT_DIR=${OUT:-}
BUDGET=450
ARCH=9.0
QUICK=0
DRY_RUN=0
ONLY=""
SKIP=""

usage() {
  cat <<EOF
usage: bash benchmarks/gpu/run.sh [options]

Builds the CUDA kernel, runs the GPU tests and the --device cuda benchmarks, each step with a timeout;
writes run.log, kernel_tests.xml, model_tests.xml, msda_cuda.json, caption_cuda.json, tagger_cuda.json and
summary.json to the output folder. Without a CUDA device: SKIP, exit 0.

options:
  --out DIR          output folder (default: \$OUT if set, else a new /tmp/reltag-gpu.XXXXXX)
  --python PY        the Python with torch (default: \$PYTHON, else python3)
  --only S1,S2       run only these steps (${STEPS[*]})
  --skip S1,S2       leave these steps out
  --timeout S=SEC    one step's timeout in seconds (repeatable); defaults:
                     $(for s in "${STEPS[@]}"; do printf '%s=%s ' "$s" "${TIMEOUT[$s]}"; done)
  --budget SEC       the whole run's limit; each step's timeout is clipped to what is left (default $BUDGET)
  --arch LIST        TORCH_CUDA_ARCH_LIST for the build (default $ARCH: H100 / H200)
  --quick            the benchmarks' --quick modes (fewer repeats)
  --dry-run          print the plan (steps, timeouts, commands) and exit without running anything
  -h, --help         this help
EOF
}

die() { # one line on stderr, exit 2 (bad arguments)
  echo "run.sh: error: $*" >&2
  exit 2
}

is_step() {
  local s
  for s in "${STEPS[@]}"; do [[ $s == "$1" ]] && return 0; done
  return 1
}

check_steps() { # $1 = option name, $2 = comma-separated steps
  local s
  IFS=, read -r -a _list <<<"$2"
  [[ ${#_list[@]} -gt 0 ]] || die "$1 needs a comma-separated list of steps (${STEPS[*]})"
  for s in "${_list[@]}"; do
    is_step "$s" || die "$1: unknown step '$s' (steps: ${STEPS[*]})"
  done
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

while [[ $# -gt 0 ]]; do
  case $1 in
  --out) [[ $# -ge 2 && -n $2 ]] || die "--out needs a folder"; OUT_DIR=$2; shift 2 ;;
  --python) [[ $# -ge 2 && -n $2 ]] || die "--python needs a Python executable"; PY=$2; shift 2 ;;
  --only) [[ $# -ge 2 ]] || die "--only needs a list of steps"; check_steps --only "$2"; ONLY=$2; shift 2 ;;
  --skip) [[ $# -ge 2 ]] || die "--skip needs a list of steps"; check_steps --skip "$2"; SKIP=$2; shift 2 ;;
  --timeout)
    [[ $# -ge 2 && $2 == *=* ]] || die "--timeout needs STEP=SECONDS, e.g. --timeout build=300"
    step=${2%%=*}
    secs=${2#*=}
    is_step "$step" || die "--timeout: unknown step '$step' (steps: ${STEPS[*]})"
    { is_uint "$secs" && ((secs > 0)); } || die "--timeout $step: '$secs' is not a positive number of seconds"
    TIMEOUT[$step]=$secs
    shift 2
    ;;
  --budget)
    [[ $# -ge 2 ]] && is_uint "$2" && (($2 > 0)) || die "--budget needs a positive number of seconds"
    BUDGET=$2
    shift 2
    ;;
  --arch) [[ $# -ge 2 && -n $2 ]] || die "--arch needs a TORCH_CUDA_ARCH_LIST value, e.g. 9.0"; ARCH=$2; shift 2 ;;
  --quick) QUICK=1; shift ;;
  --dry-run) DRY_RUN=1; shift ;;
  -h | --help) usage; exit 0 ;;
  *) die "unknown argument '$1' (see --help)" ;;
  esac
done

selected() { # is step $1 to run?
  if [[ -n $ONLY && ",$ONLY," != *",$1,"* ]]; then return 1; fi
  if [[ -n $SKIP && ",$SKIP," == *",$1,"* ]]; then return 1; fi
  return 0
}

QUICK_ARG=()
[[ $QUICK -eq 1 ]] && QUICK_ARG=(--quick)

# The command of each step (arrays cannot nest: a function prints it, one word per line).
step_cmd() {
  case $1 in
  env) printf '%s\n' bash -c env_report ;;
  build) printf '%s\n' bash -c build_extensions ;;
  kernel-tests) printf '%s\n' "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py -m gpu \
    "--junitxml=$OUT_DIR/kernel_tests.xml" ;;
  model-tests) printf '%s\n' "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_models.py -m gpu \
    "--junitxml=$OUT_DIR/model_tests.xml" ;;
  bench-msda) printf '%s\n' "$PY" benchmarks/bench_msda.py --device cuda --results-dir "$OUT_DIR" "${QUICK_ARG[@]}" ;;
  bench-caption) printf '%s\n' "$PY" benchmarks/bench_caption.py --device cuda --results-dir "$OUT_DIR" \
    "${QUICK_ARG[@]}" ;;
  bench-tagger) printf '%s\n' "$PY" benchmarks/bench_tagger.py --device cuda --results-dir "$OUT_DIR" \
    "${QUICK_ARG[@]}" ;;
  esac
}

if [[ $DRY_RUN -eq 1 ]]; then
  [[ -n $OUT_DIR ]] || OUT_DIR='<new /tmp/reltag-gpu.XXXXXX>'
  echo "plan: out=$OUT_DIR python=$PY budget=${BUDGET}s arch=$ARCH quick=$QUICK"
  for s in "${STEPS[@]}"; do
    if selected "$s"; then
      mapfile -t words < <(step_cmd "$s")
      echo "step $s timeout=${TIMEOUT[$s]}s: ${words[*]}"
    else
      echo "step $s: not selected"
    fi
  done
  exit 0
fi

if [[ -z $OUT_DIR ]]; then
  OUT_DIR=$(mktemp -d /tmp/reltag-gpu.XXXXXX) || die "cannot create a folder under /tmp"
fi
mkdir -p "$OUT_DIR" || die "cannot create the output folder $OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG=$OUT_DIR/run.log
: >"$LOG" || die "cannot write $LOG"
START=$(date +%s)
DEADLINE=$((START + BUDGET))

log() { echo "[run.sh $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

command -v "$PY" >/dev/null 2>&1 || {
  log "ERROR: Python '$PY' not found (set --python or \$PYTHON)"
  exit 2
}

cd "$ROOT" || exit 2
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_CUDA_ARCH_LIST=$ARCH
export RELTAG_KERNELS_CACHE=${RELTAG_KERNELS_CACHE:-${TMPDIR:-/tmp}/reltag-kernels}
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 4)}

log "reltag GPU check: root $ROOT, output $OUT_DIR, python $PY, budget ${BUDGET}s, TORCH_CUDA_ARCH_LIST=$ARCH"

# Is there a CUDA device? (torch missing is an error, no device is a clean skip)
probe=$("$PY" - 2>&1 <<'EOF'
import sys
try:
    import torch
except Exception as e:
    print(f"NO_TORCH {type(e).__name__}: {e}")
    sys.exit(0)
if torch.cuda.is_available():
    print(f"CUDA torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s): "
          f"{torch.cuda.get_device_name(0)}")
else:
    why = "this torch build has no CUDA support" if torch.version.cuda is None else "torch.cuda.is_available() is False"
    print(f"NO_GPU torch {torch.__version__}: {why}")
EOF
)
case $probe in
CUDA*) log "${probe#CUDA }" ;;
NO_GPU*)
  log "SKIP: no CUDA device here (${probe#NO_GPU }); nothing to build or measure. Run this on a GPU machine."
  printf '{"skipped": true, "reason": "no CUDA device", "probe": "%s"}\n' "${probe#NO_GPU }" >"$OUT_DIR/summary.json"
  exit 0
  ;;
NO_TORCH*)
  log "ERROR: $PY cannot import torch (${probe#NO_TORCH }); this script needs PyTorch already installed"
  exit 1
  ;;
*)
  log "ERROR: probing torch failed: $probe"
  exit 1
  ;;
esac

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" 2>/dev/null; }

missing_of() { # prints the missing ones among the modules given
  local m out=()
  for m in "$@"; do has_module "$m" || out+=("$m"); done
  echo "${out[*]}"
}

FAILED=0
BUILD_OK=0

# run_step NAME CMD...: runs CMD with NAME's timeout (clipped to the budget left), output to the log.
run_step() {
  local name=$1
  shift
  local now left t rc t0
  now=$(date +%s)
  left=$((DEADLINE - now - 5))
  t=${TIMEOUT[$name]}
  ((t > left)) && t=$left
  if ((t < 10)); then
    log "=== $name: NOT RUN, the run's budget of ${BUDGET}s is spent"
    STATUS[$name]="not run (budget spent)"
    RC[$name]=-1
    SECONDS_TAKEN[$name]=0
    FAILED=1
    return 1
  fi
  log "=== $name (timeout ${t}s): $*"
  t0=$(date +%s)
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  SECONDS_TAKEN[$name]=$(($(date +%s) - t0))
  RC[$name]=$rc
  if ((rc == 0)); then
    STATUS[$name]=passed
  elif ((rc == 124 || rc == 137)); then
    STATUS[$name]="TIMED OUT after ${t}s"
    FAILED=1
  else
    STATUS[$name]="FAILED (exit $rc)"
    FAILED=1
  fi
  log "=== $name: ${STATUS[$name]} in ${SECONDS_TAKEN[$name]}s"
  return "$rc"
}

skip_step() { # skip_step NAME REASON [counts-as-failure]
  STATUS[$1]="skipped: $2"
  RC[$1]=-1
  SECONDS_TAKEN[$1]=0
  [[ ${3:-0} -eq 1 ]] && FAILED=1
  log "=== $1: skipped: $2"
}

env_report() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ), host cores: $(nproc 2>/dev/null), MAX_JOBS=$MAX_JOBS"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu,utilization.gpu \
      --format=csv 2>&1
  else
    echo "nvidia-smi: not on PATH"
  fi
  if command -v nvcc >/dev/null 2>&1; then nvcc --version | tail -n 2; else echo "nvcc: not on PATH"; fi
  "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys
print(f"python {platform.python_version()} at {sys.executable}")
import torch
from torch.utils import cpp_extension
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}, "
      f"CUDA_HOME {cpp_extension.CUDA_HOME}")
p = torch.cuda.get_device_properties(0)
print(f"GPU {p.name}: {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
for name in ("transformers", "tokenizers", "safetensors", "pytest", "pytest-timeout", "pillow", "numpy", "scipy",
             "psutil", "pyarrow", "fsspec", "nvidia-ml-py", "ninja", "setuptools", "pydantic"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name}: MISSING")
EOF
}

build_extensions() { # both extensions at once, one process each (the CUDA tests also load the CPU one)
  local pids=() kind rc=0
  for kind in cuda cpu; do
    "$PY" - "$kind" <<'EOF' &
import sys, time, traceback
from kernels import _build

kind = sys.argv[1]
t0 = time.perf_counter()
why = _build.missing(kind)
if why:
    print(f"{kind} extension: cannot build: {why}", flush=True)
    sys.exit(1)
try:
    mod = _build.build(kind)  # the full compiler output on failure, not the dispatcher's one-line reason
except Exception:
    print(f"{kind} extension: FAILED\n{traceback.format_exc()}", flush=True)
    sys.exit(1)
print(f"{kind} extension: built {mod.__name__} in {time.perf_counter() - t0:.0f} s into {_build.cache_dir()}", flush=True)
EOF
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  return $rc
}
export -f env_report build_extensions 2>/dev/null
export PY

for s in "${STEPS[@]}"; do
  if ! selected "$s"; then
    STATUS[$s]="not selected"
    RC[$s]=-1
    SECONDS_TAKEN[$s]=0
    continue
  fi
  case $s in
  env) run_step env bash -c env_report ;;
  build) run_step build bash -c build_extensions && BUILD_OK=1 ;;
  kernel-tests | model-tests)
    miss=$(missing_of pytest)
    if [[ -n $miss ]]; then
      skip_step "$s" "pytest is not installed for $PY (install nothing here: the step is left out)"
      continue
    fi
    if [[ $s == kernel-tests ]] && selected build && [[ $BUILD_OK -eq 0 ]]; then
      skip_step "$s" "the extensions did not build (see the build step)"
      continue
    fi
    mapfile -t cmd < <(step_cmd "$s")
    if [[ $s == model-tests ]] && selected build && [[ $BUILD_OK -eq 0 ]]; then
      log "model-tests: the CUDA extension did not build, the models use the PyTorch reference (RELTAG_MSDA_BACKEND=reference)"
      RELTAG_MSDA_BACKEND=reference run_step "$s" "${cmd[@]}"
    else
      run_step "$s" "${cmd[@]}"
    fi
    ;;
  bench-*)
    case $s in
    bench-msda) needs=(psutil) ;;
    *) needs=(psutil transformers tokenizers PIL) ;;
    esac
    miss=$(missing_of "${needs[@]}")
    if [[ -n $miss ]]; then
      skip_step "$s" "missing Python packages: $miss (install nothing here: the step is left out)"
      continue
    fi
    if [[ $s == bench-msda ]] && selected build && [[ $BUILD_OK -eq 0 ]]; then
      skip_step "$s" "the extensions did not build (see the build step)"
      continue
    fi
    mapfile -t cmd < <(step_cmd "$s")
    if [[ $s == bench-tagger ]] && selected build && [[ $BUILD_OK -eq 0 ]]; then
      RELTAG_MSDA_BACKEND=reference run_step "$s" "${cmd[@]}"
    else
      run_step "$s" "${cmd[@]}"
    fi
    ;;
  esac
done

TOTAL=$(($(date +%s) - START))
{
  echo
  echo "summary (${TOTAL}s of a ${BUDGET}s budget; output in $OUT_DIR):"
  for s in "${STEPS[@]}"; do printf '  %-14s %5ss  %s\n' "$s" "${SECONDS_TAKEN[$s]}" "${STATUS[$s]}"; done
} | tee -a "$LOG"
{
  printf '{"skipped": false, "total_s": %s, "budget_s": %s, "failed": %s, "steps": [' "$TOTAL" "$BUDGET" \
    "$([[ $FAILED -eq 1 ]] && echo true || echo false)"
  sep=""
  for s in "${STEPS[@]}"; do
    printf '%s{"step": "%s", "status": "%s", "rc": %s, "seconds": %s}' "$sep" "$s" "${STATUS[$s]}" "${RC[$s]}" \
      "${SECONDS_TAKEN[$s]}"
    sep=", "
  done
  echo "]}"
} >"$OUT_DIR/summary.json"
grep -h '^\(msda\|caption\|tagger\) (cuda' "$LOG" 2>/dev/null | sed 's/^/headline: /'
if [[ $FAILED -eq 1 ]]; then
  log "RESULT: some steps failed (see above); exit 1"
  exit 1
fi
log "RESULT: all selected steps passed"
exit 0
