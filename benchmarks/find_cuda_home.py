"""Print the CUDA toolkit folder the native build needs (CUDA_HOME), or nothing: the first candidate with bin/nvcc and
include/cuda_runtime.h. On the GPU image ``nvcc`` may be a wrapper outside a toolkit folder (so torch's guess from it
is wrong) and the toolkit may come as pip packages (nvidia/cu13, cuda-toolkit); benchmarks/gpu_session.sh runs this
where CUDA_HOME is unset and records the answer in work/environment.txt."""

from __future__ import annotations

import glob
import os
import shutil
import site
import sys


def candidates() -> list[str]:
    out = ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        out.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in [*site.getsitepackages(), *sys.path]:
        out += sorted(glob.glob(os.path.join(root, "nvidia", "cu*")), reverse=True)
        out.append(os.path.join(root, "nvidia", "cuda_nvcc"))
    return out


def find() -> str | None:
    for c in candidates():
        if os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isfile(
            os.path.join(c, "include", "cuda_runtime.h")
        ):
            return c
    return None


if __name__ == "__main__":
    print(find() or "")
