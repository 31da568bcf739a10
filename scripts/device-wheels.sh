#!/usr/bin/env bash
# Build .whl/ in this checkout: the Python wheels that an offline GPU machine lacks, for Python 3.12 on x86-64
# (the GPU image has torch, triton, transformers, torchvision, timm, accelerate, peft, numpy, pytest and
# pytest-benchmark, and no network). deepspeed ships only as an sdist, so it is built here into a pure-Python wheel
# (its CUDA ops compile just in time on the GPU machine). .whl/ is ignored by git (.gitignore).
#
#   usage: scripts/device-wheels.sh [EXTRA_REQUIREMENT ...]
#   then copy .whl/ to the GPU machine with the checkout and start there with the install line printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.whl
rm -rf "$out" && mkdir -p "$out"

py=${PYTHON:-}
[ -n "$py" ] || { [ -x .venv/bin/python ] && py=.venv/bin/python; } || true
[ -n "$py" ] || py=python3

wheels=(
  diffusers==0.42.1 bitsandbytes==0.50.2 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
  hjson==3.1.0 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  torchao==0.18.0
  "$@"
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done

"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$out" "${wheels[@]}"

# deepspeed: sdist -> pure-Python wheel, built with the torch of this environment
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download -q --no-deps --no-binary=:all: -d "$tmp" deepspeed==0.19.8
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$tmp"/deepspeed-*.tar.gz

# bitsandbytes: keep the CPU and CUDA 13 builds (the image's torch is cu130); the other thirteen are 34 of its 41 MiB
"$py" scripts/slim_wheel.py "$out"/bitsandbytes-*.whl 'bitsandbytes/libbitsandbytes_cuda1[12]*.so' \
  'bitsandbytes/libbitsandbytes_rocm*.so' 'bitsandbytes/libbitsandbytes_xpu*.so'

ls "$out"
# a device call carries at most 64 MiB: the working tree (tracked and untracked files git does not ignore) and .whl
tree=$(git ls-files -z -c -o --exclude-standard | xargs -0 du -cb 2>/dev/null | awk 'END { print $1 }')
whl=$(du -cb "$out" | awk 'END { print $1 }')
awk -v t="$tree" -v w="$whl" 'BEGIN { printf "carry: tree %.1f MiB + .whl %.1f MiB = %.1f of 64 MiB\n", t / 2^20, w / 2^20, (t + w) / 2^20 }'
[ $((tree + whl)) -le $((64 * 1024 * 1024)) ] || { echo "over the 64 MiB a device call carries"; exit 1; }
cat <<'MSG'

On the GPU machine, from the checkout's root, begin the command with:
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit;
(then `import rpo_fast` works from the checkout root without installing it)
MSG
