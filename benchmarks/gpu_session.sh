#!/usr/bin/env bash
# A GPU slot's work: run from the repository root on the GPU machine, with `.whl` carried (scripts/device-wheels.sh
# builds it: diffusers, deepspeed, bitsandbytes, torchao, open_clip).
#
#   RPO_FAST_COMMIT=<commit> bash benchmarks/gpu_session.sh call1    first device call (485 s): worth having alone
#   RPO_FAST_COMMIT=<commit> bash benchmarks/gpu_session.sh call2    second call, at once after the first (260 s)
#   RPO_FAST_GPU_DRY=1 bash benchmarks/gpu_session.sh call1 call2 call3 call4    tiny shapes on a CPU (CI)
#
# A slot is 15 minutes of device time, start-up included, in commands of at most 10 minutes; a command started
# within about 30 s of the last one reuses the machine. call1 + call2 fit one slot: 485 + 260 s and about 2 minutes
# of start-up. Stages are ordered by value, and each call's step limits add up to at most its budget
# (benchmarks/test_gpu_session.py holds that: PLAN below is what it reads).
#
# call1 (485 s): install and import-check the wheels; every loss backend against float64 at SDXL latents (rows
#   written as they come); the native backend (csrc/) built on the CPU from the call's start (CUDA_HOME found and
#   recorded); the bf16 matmul rate; the random full-size SDXL folder (its own step, `models`, so no measured step
#   pays for it); the headline row, SDXL 1024px at 1 pair on the fast path (single_gpu.json, --recompute selective)
#   with per-phase times, peak memory and 3 profiled steps; then the reference-script baseline.
# call2 (260 s; a fresh machine spends about a minute of it on the install and the SDXL folder): the native
#   backend's loss-check rows; SDXL at 1 pair with --reference-graphs (against call1's fast row); the native
#   backend's GPU tests with the CUDA-graph capture and FP8 on CUDA (pytest, a process of its own).
# call3 (a later slot, 570 s): SDXL at 4 pairs with --recompute selective, with --fp8 (regional compile), plain,
#   regional compile, regional with --compile-resnets; ZeRO-3 on one GPU at 1 pair.
# call4 (a later slot, 405 s): SDXL at 4 pairs with --recompute full; SD1.5 at 512px, 1 pair; the loss
#   microbenchmark at SDXL latents, B = 16 and 64.
# call5 (a later slot, 510 s): SDXL 1024px at 1 pair with the live reference and with a precomputed table (the
#   reference pass over the step's cache first, its seconds in reference_pass_s): pairs/s and peak memory side by side.
# flow (a later slot, 465 s): the SD3.5-Medium 1024px step (full fine-tune, single_gpu, --recompute full) and
#   FLUX.1-dev's with LoRA rank 16 (its full states, 167 GB, exceed one GPU), each model built at random first.
# online (a later slot, 450 s): online training on the random full-size SD1.5 at 512 px (benchmarks/bench_online.py:
#   dense-reward, K = 4 samples of 2 prompts, 10 and 50 sampler steps): rollout images/s and the rollout's share of
#   the step.
# Older stages, for a longer slot: kernels (the kernel tests on CUDA, 5 min), micro-sdxl, micro-sd15.
#
# A call's gpu_check rows run in one process (`checks`, gpu_check.py's batch stage): the imports (8-15 s) are paid
# once per call (CHECKS_START), not once per row, and the FLOP count once per model and recompute mode; a row pays its
# Trainer's build (the bf16 model load) and its warm-up. Every row runs under its own time limit and the call's
# budget: no row runs past it, so a call ends with its files saved; a row stopped at its limit or out of GPU memory
# writes its row saying where, with the peak memory, and the next row runs. Each row's exit code, seconds and process
# id go to work/steps.txt as it ends, and the tarball is rewritten after it: the first GPU run's steps.txt is the
# measured cost the limits below should be set from. Benchmarks resume (RPO_FAST_BENCH_RESUME=1): a configuration
# already measured at this commit is skipped. Each step row counts the host syncs (CUDA's sync debug mode) and the
# device synchronizes of its timed steps.
#
# Writes to $OUT (default ./out): session.log (everything printed) and results.tar.gz (benchmarks/results/ and
# work/: the environment, the junit XML of the tests, each step's exit code and time), the tarball rewritten after
# every step. Unpack it in the checkout and commit benchmarks/results/.
set -uo pipefail
DRY=${RPO_FAST_GPU_DRY:-0}
# PLAN: each call's budget in seconds; its step limits below add up to at most the budget less SETUP (the wheels'
# install and import check, and the 15 s each step leaves before the deadline) and CHECKS_START for each `checks`
# (the one process's imports)
declare -A PLAN=([call1]=485 [call2]=260 [call3]=570 [call4]=405 [call5]=510 [flow]=465 [online]=450)
SETUP=45
CHECKS_START=15
DEFAULT_BUDGET=570
[ $# = 1 ] && [ -n "${PLAN[$1]:-}" ] && DEFAULT_BUDGET=${PLAN[$1]}
if [ "$DRY" = 1 ]; then
    DEFAULT_BUDGET=1500  # a 2-core CPU runs the tiny stages slower than a GPU runs the real ones
    export TRITON_INTERPRET=1
fi
DEADLINE=$((SECONDS + ${BUDGET:-$DEFAULT_BUDGET}))
OUT=${OUT:-$PWD/out}
SESSION=${RPO_FAST_GPU_ROOT:-/tmp/gpu_session}  # the dry run in CI gives its own
WORK=$SESSION/work
mkdir -p "$OUT" "$WORK"
# the commit the results are recorded with: pass RPO_FAST_COMMIT=$(git rev-parse --short HEAD) where the copied
# tree has no .git
export RPO_FAST_COMMIT=${RPO_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export RPO_FAST_BENCH_MODELS=$SESSION/models  # the random SDXL/SD1.5 folders, built once per machine
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # the native backend's CUDA build: Hopper only (shorter)
export RPO_FAST_BENCH_RESUME=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRITON_DEFAULT_FP_FUSION=1
exec > >(tee -a "$OUT/session.log") 2>&1

PY=${PYTHON:-python3}
if ! "$PY" -c "import diffusers, deepspeed, bitsandbytes" 2>/dev/null; then
    [ -d .whl ] || { echo "no .whl: build it with scripts/device-wheels.sh and carry it"; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
# every wheel imports before anything is measured: a broken install stops here, not inside a timed step
"$PY" -c "import diffusers, deepspeed, bitsandbytes, torchao, transformers, peft, rpo_fast.train" \
    || { echo "the installed packages do not import: see above"; exit 2; }

# the CUDA toolkit for the native build: nvcc on the image may be a wrapper outside a toolkit folder, so torch's guess
# from it is wrong; the first folder with bin/nvcc and include/cuda_runtime.h
if [ -z "${CUDA_HOME:-}" ]; then
    CUDA_HOME=$("$PY" benchmarks/find_cuda_home.py)
    [ -n "$CUDA_HOME" ] && export CUDA_HOME
fi

if [ ! -f "$WORK/environment.txt" ]; then
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no GPU"
        echo "commit $RPO_FAST_COMMIT"
        echo "CUDA_HOME ${CUDA_HOME:-not found (the native backend cannot build)}"
        "$PY" - <<'EOF'
import importlib
for name in ("torch", "triton", "diffusers", "transformers", "deepspeed", "bitsandbytes", "peft", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "unavailable:", e)
import torch
if torch.cuda.is_available():
    print("cuda", torch.version.cuda, "|", torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")
EOF
    } > "$WORK/environment.txt" 2>&1
    cat "$WORK/environment.txt"
fi

step() {  # step SECONDS NAME COMMAND...: run with a time limit, report how it ended, go on either way
    local limit=$1 name=$2 left=$((DEADLINE - SECONDS - 15))
    shift 2
    if [ "$left" -lt 60 ]; then
        echo "=== $name: not started, ${left}s left of BUDGET"
        echo "$name not-started" >> "$WORK/steps.txt"
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    local rc=$?
    [ "$rc" = 0 ] || FAILED=1
    echo "=== $name: rc $rc after $((SECONDS - t0))s"
    echo "$name rc=$rc seconds=$((SECONDS - t0))" >> "$WORK/steps.txt"
    archive
}

archive() {  # after every step: a call killed at any point keeps what it measured
    tar czf "$OUT/results.tar.gz" benchmarks/results -C "$WORK/.." work
}

native_build() {  # the native backend (csrc/) compiles on the CPU while the GPU stages run (cached: once a machine)
    "$PY" -m rpo_fast.kernels.native > "$WORK/native-build.log" 2>&1 &
}

checks() {  # the rows on stdin ("LIMIT NAME STAGE ARGS..." of benchmarks/gpu_check.py) in one process: its imports
    # paid once (CHECKS_START), each row under its own limit, its line in steps.txt and the archive after each
    local name=$1 rows limit=$CHECKS_START row_limit _ left=$((DEADLINE - SECONDS - 15))
    rows=$(cat)
    while read -r row_limit _; do limit=$((limit + row_limit)); done <<< "$rows"
    [ "$limit" -le "$left" ] || limit=$left
    local dry=()
    [ "$DRY" = 1 ] && dry=(--dry)
    step "$limit" "$name" "$PY" benchmarks/gpu_check.py batch --budget $((limit - 10)) --steps-file "$WORK/steps.txt" \
        --after-each archive ${dry[@]+"${dry[@]}"} <<< "$rows"
}
export -f archive
export OUT WORK

FAILED=0
for stage in "$@"; do
    case $stage in
    kernels)
        step 300 kernels-cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_kernels.py \
            tests/test_objectives.py -m "not multiprocess" -k "not compiles_for and not native" \
            --junitxml "$WORK/kernels-cuda.xml"
        step 200 gpu-marked "$PY" -m pytest -q -p no:cacheprovider tests -m gpu --junitxml "$WORK/gpu-marked.xml"
        ;;
    micro-sdxl | micro-sd15)
        step 560 "$stage" "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_bench_preference_loss.py \
            --benchmark -k "${stage#micro-}" --benchmark-json "$WORK/$stage-pytest-benchmark.json"
        ;;
    call1)
        native_build
        checks call1-checks <<'EOF'
50 loss-check loss-check --backends eager,triton,compile
25 matmul matmul
80 models models --kinds sdxl
150 sdxl-1-fast step --kind sdxl --pairs 1 --profile
105 sdxl-1-baseline step --kind sdxl --pairs 1 --baseline --recompute full
EOF
        ;;
    call2)
        native_build  # nothing to do where call1's build finished on this machine
        # models: no time where call1's machine is still warm, else about a minute; native-check waits for the build
        checks call2-checks <<'EOF'
50 models models --kinds sdxl
35 native-check loss-check --backends native
50 sdxl-1-graphs step --kind sdxl --pairs 1 --reference-graphs
EOF
        step 50 native-gpu "$PY" -m pytest -q -p no:cacheprovider tests/test_fused.py tests/test_graphs.py \
            tests/test_fp8.py -m gpu -k "native or test_graphs or test_fp8" --junitxml "$WORK/native-gpu.xml"
        ;;
    call3)
        checks call3-checks <<'EOF'
110 models models --kinds sdxl
50 sdxl-4-selective step --kind sdxl --pairs 4 --recompute selective
80 sdxl-4-fp8 step --kind sdxl --pairs 4 --recompute none --compile-mode regional --fp8
50 sdxl-4-none step --kind sdxl --pairs 4 --recompute none
80 sdxl-4-regional step --kind sdxl --pairs 4 --recompute none --compile-mode regional
80 sdxl-4-resnets step --kind sdxl --pairs 4 --recompute none --compile-mode regional --compile-resnets
50 sdxl-1-zero3 step --kind sdxl --pairs 1 --ds-config zero3_8bit --recompute full
EOF
        ;;
    call4)
        checks call4-checks <<'EOF'
140 models models --kinds sdxl,sd15
50 sdxl-4-full step --kind sdxl --pairs 4 --recompute full
50 sd15-1 step --kind sd15 --pairs 1
EOF
        if [ "$DRY" = 1 ]; then
            step 90 micro-sdxl-16-64 "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_bench_preference_loss.py \
                --benchmark
        else
            step 90 micro-sdxl-16-64 "$PY" -m pytest -q -p no:cacheprovider benchmarks/test_bench_preference_loss.py \
                --benchmark -k "sdxl-16- or sdxl-64-" --benchmark-json "$WORK/micro-pytest-benchmark.json"
        fi
        ;;
    call5)  # a later slot: the reference computed ahead (python -m rpo_fast.reference) against the live one
        checks call5-checks <<'EOF'
140 models models --kinds sdxl
150 sdxl-1-live step --kind sdxl --pairs 1 --recompute selective
160 sdxl-1-precomputed step --kind sdxl --pairs 1 --recompute selective --ref-placement precomputed
EOF
        ;;
    flow)  # a later slot: the flow models' rows (FLUX's full states exceed one GPU: LoRA)
        checks flow-checks <<'EOF'
170 sd35m-1 step --kind sd3.5-medium --pairs 1 --recompute full
230 flux-1-lora step --kind flux.1-dev --pairs 1 --recompute full --lora-rank 16
EOF
        ;;
    online)  # a later slot: online training's rollout throughput and share of a step, SD1.5 at 512 px
        checks online-checks <<'EOF'
80 models models --kinds sd15
EOF
        if [ "$DRY" = 1 ]; then
            step 300 online-sd15 "$PY" benchmarks/bench_online.py --kind sd15 --resolution 32 --quick
        else
            step 300 online-sd15 "$PY" benchmarks/bench_online.py --kind sd15 --resolution 512 --steps 2
        fi
        ;;
    *) echo "unknown stage $stage" ;;
    esac
    archive
done
cat "$WORK/steps.txt" 2>/dev/null
[ "$DRY" = 1 ] && exit $FAILED  # the CI's dry run fails on any failed step
exit 0
