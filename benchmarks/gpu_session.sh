#!/usr/bin/env bash
# A GPU slot's work, in stages: run from the repository root on the GPU machine, with `.whl` carried
# (scripts/device-wheels.sh builds it: diffusers, deepspeed, bitsandbytes, open_clip).
#
#   bash benchmarks/gpu_session.sh STAGE [STAGE ...]
#
# Stages, in the order of the issues' priorities (give one device call the stages that fit in its 10 minutes;
# each step has its own time limit so that a call always ends with its results saved):
#   kernels      the kernel tests on CUDA: tests/test_kernels.py and tests/test_objectives.py on the GPU (every
#                objective vs eager and float64, poisoned outputs, opcheck, fullgraph compile, launch counts) and
#                the gpu-marked tests (SDXL shapes, determinism, RPO at B = 4096)
#   micro-sdxl   the loss microbenchmarks at SDXL latents (4x128x128): the targets are stated there
#   micro-sd15   the same at SD1.5 latents (4x64x64)
#   train1       priority 1 of the end-to-end benchmark: SDXL, ZeRO-3 + AdamW8bit, replicated reference,
#                gradient checkpointing, 1 pair, and the reference-script baseline
#   train2       SDXL without gradient checkpointing at 1, 2, 4 pairs; with it at 2 and 4
#   train3       --compile (SDXL, 1 pair); SD1.5 at 512px with 1 and 4 pairs
#   train4       the sharded reference (--ref-placement zero3) and LoRA (rank 8), SDXL, 1 pair
#
# BUDGET (seconds, default 570) is the call's time: no step runs past it, so the call ends with its files saved.
# Benchmarks resume (RPO_FAST_BENCH_RESUME=1): a configuration already in benchmarks/results/ from this commit is
# not measured again, so after a call that ran out of time, unpack its tarball here (do not commit in between) and
# give the next call the same stage.
#
# Writes two files to $OUT (default ./out): session.log (everything printed) and results.tar.gz (benchmarks/results/
# and work/: the environment, the junit XML of the tests, each step's exit code and time). Unpack the tarball in
# the checkout and commit benchmarks/results/.
set -uo pipefail
DEADLINE=$((SECONDS + ${BUDGET:-570}))
OUT=${OUT:-$PWD/out}
WORK=/tmp/gpu_session/work
mkdir -p "$OUT" "$WORK"
# the commit the results are recorded with: pass RPO_FAST_COMMIT=$(git rev-parse --short HEAD) where the copied
# tree has no .git
export RPO_FAST_COMMIT=${RPO_FAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export RPO_FAST_BENCH_MODELS=/tmp/gpu_session/models  # the random SDXL/SD1.5 folders, built once per machine
export RPO_FAST_BENCH_RESUME=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRITON_DEFAULT_FP_FUSION=1
exec > >(tee -a "$OUT/session.log") 2>&1

if ! python3 -c "import diffusers, deepspeed, bitsandbytes" 2>/dev/null; then
    [ -d .whl ] || { echo "no .whl: build it with scripts/device-wheels.sh and carry it"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}

if [ ! -f "$WORK/environment.txt" ]; then
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
        echo "commit $RPO_FAST_COMMIT"
        python3 - <<'EOF'
import importlib
for name in ("torch", "triton", "diffusers", "transformers", "deepspeed", "bitsandbytes", "peft", "numpy"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "unavailable:", e)
import torch
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
    echo "=== $name: rc $rc after $((SECONDS - t0))s"
    echo "$name rc=$rc seconds=$((SECONDS - t0))" >> "$WORK/steps.txt"
}

bench() {  # bench SECONDS NAME ARGS...: one run of the end-to-end benchmark
    local limit=$1 name=$2
    shift 2
    step "$limit" "$name" python3 benchmarks/bench_train_step.py "$@"
}

for stage in "$@"; do
    case $stage in
    kernels)
        step 300 kernels-cuda python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_objectives.py \
            -m "not multiprocess" -k "not compiles_for" --junitxml "$WORK/kernels-cuda.xml"
        step 200 gpu-marked python3 -m pytest -q -p no:cacheprovider tests -m gpu --junitxml "$WORK/gpu-marked.xml"
        ;;
    micro-sdxl | micro-sd15)
        step 560 "$stage" python3 -m pytest -q -p no:cacheprovider benchmarks/test_bench_preference_loss.py \
            --benchmark -k "${stage#micro-}" --benchmark-json "$WORK/$stage-pytest-benchmark.json"
        ;;
    train1) bench 420 train1 --kind sdxl --pairs 1 ;;
    train2)
        bench 300 train2-nockpt --kind sdxl --pairs 1 2 4 --no-gradient-checkpointing
        bench 240 train2-ckpt --kind sdxl --pairs 2 4
        ;;
    train3)
        bench 330 train3-compile --kind sdxl --pairs 1 --compile
        bench 240 train3-sd15 --kind sd15 --pairs 1 4
        ;;
    train4)
        bench 280 train4-zero3ref --kind sdxl --pairs 1 --ref-placement zero3
        bench 280 train4-lora --kind sdxl --pairs 1 --lora-rank 8
        ;;
    *) echo "unknown stage $stage" ;;
    esac
    tar czf "$OUT/results.tar.gz" benchmarks/results -C "$WORK/.." work  # after every stage: a killed call keeps the rest
done
cat "$WORK/steps.txt" 2>/dev/null
