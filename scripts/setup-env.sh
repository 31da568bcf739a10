#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install rpo_fast into it.
#
#   scripts/setup-env.sh [VENV_DIR]        (default: .venv; prints nothing when already up to date)
#   RPO_FAST_BUILD_NATIVE=1 scripts/setup-env.sh   also builds the native (C++/CUDA) loss backend now rather
#                                                  than on its first use (csrc/README.md)
#
# Order matters on a CPU machine: torch goes in FIRST, pinned to torch==2.13.0 (the local CPU build);
# every later install is constrained to the torch that is present, so no dependency can pull the
# multi-GB CUDA wheels. Where the system python already has torch (a GPU image), the venv sees it
# through --system-site-packages instead. torchvision, timm and open_clip_torch must never land in a
# CPU environment (they break `import transformers`): the last step checks.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-.venv}
py=$venv/bin/python
stamp=$venv/.rpo_fast-installed
want=$(cat pyproject.toml scripts/setup-env.sh | sha256sum | cut -c1-16)

build_native() {  # the opt-in build of csrc/ at install time (else it builds on first use)
  if [ "${RPO_FAST_BUILD_NATIVE:-0}" = "1" ]; then
    "$py" -m rpo_fast.kernels.native
  fi
}

if [ -x "$py" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  build_native
  exit 0
fi

if [ ! -x "$py" ]; then
  if python3 -c "import torch" 2>/dev/null; then
    echo "[setup] creating $venv (reusing the system torch $(python3 -c 'import torch; print(torch.__version__)'))"
    python3 -m venv --system-site-packages "$venv"
  else
    echo "[setup] creating $venv"
    python3 -m venv "$venv"
  fi
fi

pip() {  # quiet pip that keeps its exit status (the grep only drops a noisy index warning)
  set +e
  "$py" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored: it is neither"
  local rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}

if ! "$py" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 and numpy"
  pip install torch==2.13.0 "numpy>=1.26"  # numpy with it: torch warns at import when numpy is missing
fi
"$py" -c "import torch" || { echo "[setup] torch failed to install" >&2; exit 1; }
torch_version=$("$py" -c "import torch; print(torch.__version__.split('+')[0])")
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==$torch_version" > "$constraints"

echo "[setup] installing rpo_fast and its dependencies (torch $torch_version kept)"
pip install -c "$constraints" setuptools wheel
# deepspeed ships only as an sdist; build it against the torch that is here (no isolated build env).
if ! "$py" -c "import deepspeed" >/dev/null 2>&1; then
  DS_BUILD_OPS=0 pip install -c "$constraints" --no-build-isolation "deepspeed>=0.19.3"
fi
pip install -c "$constraints" -e ".[dev]"

if ! "$py" -c "import torch.cuda; raise SystemExit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  bad=$("$py" -m pip list --format=freeze 2>/dev/null | grep -i -E '^(nvidia-|torchvision|timm|open.clip)' || true)
  if [ -n "$bad" ]; then
    echo "[setup] refusing: packages that must not be in a CPU environment:" >&2
    echo "$bad" >&2
    exit 1
  fi
fi
"$py" -c "import rpo_fast.logs; rpo_fast.logs.quiet_known_noise(); import diffusers, transformers, deepspeed, bitsandbytes" \
  || { echo "[setup] an import failed after installation" >&2; exit 1; }
echo "$want" > "$stamp"
build_native
echo "[setup] ready: $venv"
