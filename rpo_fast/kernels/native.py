"""The native backend of ``PreferenceLoss`` (``backend="native"``): the fused loss in C++ for the CPU and CUDA
C++ for NVIDIA GPUs, from ``csrc/``, as the ``torch.library`` op ``rpo_fast::preference_loss_native``.

The same algorithm as the Triton op (``rpo_fast.kernels.preference_loss``): one error pass writes chunk
partial sums m, r, delta, <e,d>, |d|^2 per sample; the pairwise step writes the loss, the metrics and
ge/gd; the backward is one elementwise pass, dL/dp = ge (p - t) + gd (p - q). The C++ ops
(``rpo_fast::native_errors_fwd``, ``native_pair_fwd``, ``native_errors_bwd``) write outputs allocated here;
this module gives them fake kernels and builds the autograd op on them with ``shared.define_fused_op``.

The library builds on first use with ``torch.utils.cpp_extension.load`` (a C++ compiler and ninja; CUDA
sources too where torch has CUDA and nvcc is found), cached in ``$RPO_FAST_NATIVE_DIR`` or a folder per torch
build and checkout under ``~/.cache/rpo_fast/native/``. ``python -m rpo_fast.kernels.native`` builds it ahead of
time. Nothing here imports Triton.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from . import shared
from .shared import K, define_errors_op, define_fused_op, fused_loss, pair_scalars, same_layout

CPU_CHUNK = 8192  # elements per chunk of the CPU error pass (fixed: the reduction order depends on shapes only)
GPU_MIN_CHUNK = 1024  # the fewest elements per chunk on a GPU (as the Triton op's BLOCK_ERR)
SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
SOURCES = ("preference_loss.cpp", "preference_loss_cuda.cu")


class NativeBuildError(RuntimeError):
    """The native library could not be built or loaded (the message says why and what to use instead)."""


def source_dir() -> Path:
    """``csrc/`` of this checkout (or ``$RPO_FAST_CSRC``): the native backend builds from source."""
    env = os.environ.get("RPO_FAST_CSRC")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "csrc"


def build_dir() -> Path:
    """``$RPO_FAST_NATIVE_DIR``, else one folder per torch build and source folder under ``~/.cache/rpo_fast/native``
    (two checkouts sharing one folder would rebuild each other's library at every first use)."""
    if os.environ.get("RPO_FAST_NATIVE_DIR"):
        return Path(os.environ["RPO_FAST_NATIVE_DIR"])
    cuda = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    src = hashlib.sha256(str(source_dir().resolve()).encode()).hexdigest()[:8]
    return Path.home() / ".cache" / "rpo_fast" / "native" / f"torch{torch.__version__.split('+')[0]}-{cuda}-{src}"


def cuda_buildable() -> bool:
    """Build the CUDA kernels too: torch has CUDA and nvcc is found."""
    if not (torch.version.cuda and torch.cuda.is_available()):
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None and Path(CUDA_HOME, "bin", "nvcc").exists()


@lru_cache(maxsize=1)
def load_library(verbose: bool = False) -> bool:
    """Build (first use) and load the native library; register its fake kernels. Returns whether the CUDA
    kernels are in it. Raises ``NativeBuildError`` with the compiler's output on failure."""
    src = source_dir()
    missing = [f for f in (*SOURCES, "preference_loss.h", "preference_loss_cuda.h") if not (src / f).exists()]
    if missing:
        raise NativeBuildError(
            f"the native backend builds from the C++ sources in csrc/, and {src} lacks {', '.join(missing)}: "
            "install rpo_fast from a source checkout (pip install -e .) or set RPO_FAST_CSRC to its csrc/ folder; "
            "backend='triton' or 'eager' need no build"
        )
    if shutil.which("ninja") is None and not _ninja_module():
        raise NativeBuildError("the native backend builds with ninja: pip install ninja")
    with_cuda = cuda_buildable()
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension

    sources = [str(src / "preference_loss.cpp")] + ([str(src / "preference_loss_cuda.cu")] if with_cuda else [])
    cflags = ["-O3"] + (["-DRPO_FAST_WITH_CUDA"] if with_cuda else [])
    built = (out / "rpo_fast_native.so").exists()
    if not built:
        print(
            f"[rpo_fast] building the native loss backend ({'CPU + CUDA' if with_cuda else 'CPU'}) in {out} ...",
            file=sys.stderr,
            flush=True,
        )
    try:
        cpp_extension.load(
            name="rpo_fast_native",
            sources=sources,
            extra_cflags=cflags,
            extra_cuda_cflags=["-O3", "--use_fast_math"] if with_cuda else None,
            extra_include_paths=[str(src)],
            build_directory=str(out),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as e:  # the compiler's message is in e
        raise NativeBuildError(
            f"the native backend failed to build in {out}: {e}\n(backend='triton' or 'eager' need no build)"
        ) from e
    _register_fakes()
    return with_cuda


def _ninja_module() -> bool:
    try:
        import ninja  # noqa: F401  (the PyPI wheel puts the binary beside the interpreter)
    except ImportError:
        return False
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


def _register_fakes() -> None:
    for name in ("native_errors_fwd", "native_pair_fwd", "native_errors_bwd"):
        torch.library.register_fake(f"rpo_fast::{name}")(lambda *args, **kwargs: None)  # they write their outputs


def _ops(device: torch.device):
    has_cuda = load_library()
    if device.type == "cuda" and not has_cuda:
        raise NativeBuildError(
            "the native backend was built without CUDA kernels (torch has no CUDA or nvcc was not found when it "
            f"built in {build_dir()}): use backend='triton', or remove that folder and rebuild with nvcc on PATH"
        )
    if device.type not in ("cpu", "cuda"):
        raise NativeBuildError(f"the native backend runs on CPU and CUDA tensors, not {device.type}")
    return torch.ops.rpo_fast


def _kernel_inputs(p: Tensor, t: Tensor, q: Tensor | None):
    """One memory format (``same_layout``) and one dtype: mixed or unsupported dtypes go to fp32 (exact)."""
    p, t, q = same_layout(p, t, q)
    dtypes = {x.dtype for x in (p, t, q) if x is not None}
    if len(dtypes) > 1 or not dtypes <= set(SUPPORTED):
        p, t, q = (None if x is None else x.float() for x in (p, t, q))
    return p, t, q


def default_num_chunks(rows: int, n: int, device: torch.device) -> int:
    """Chunks per row: on a GPU enough to cover it; on CPU one per CPU_CHUNK elements (threads never change it)."""
    if device.type == "cuda":
        return shared.gpu_num_chunks(rows, n, device, GPU_MIN_CHUNK)
    return shared.cdiv(n, CPU_CHUNK)


def errors_fwd(
    p: Tensor, t: Tensor, q: Tensor | None, *, dspo: bool = False, num_chunks: int | None = None, part=None
) -> Tensor:
    """Chunk partial sums (R, CHUNKS, 5) of m, r, delta, <e,d>, |d|^2 (not yet divided by N)."""
    p, t, q = _kernel_inputs(p, t, q)
    rows, n = p.shape[0], p[0].numel()
    chunks = min(n, num_chunks or default_num_chunks(t.shape[0], n, p.device))
    if part is None:
        part = torch.empty(rows, chunks, K, dtype=torch.float32, device=p.device)
    _ops(p.device).native_errors_fwd(p, t, q, dspo, part)
    return part


def pair_fwd(
    part: Tensor,
    n: int,
    objective: str,
    params: list[float],
    *,
    embeds_w: Tensor | None = None,
    embeds_l: Tensor | None = None,
    weights: Tensor | None = None,
    timesteps: Tensor | None = None,
    out: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
):
    """Loss, metrics (10,), ge (R,), gd (R,) from the partial sums."""
    rows, dev = part.shape[0], part.device
    if out is None:
        out = shared.pair_outputs(rows, dev)
    obj, *scalars = pair_scalars(objective, params)
    f32 = lambda x: None if x is None else x.detach().to(torch.float32).contiguous()
    ts = None if timesteps is None else timesteps.to(torch.int64).contiguous()
    _ops(dev).native_pair_fwd(
        part, n, obj, [float(s) for s in scalars], f32(embeds_w), f32(embeds_l), f32(weights), ts, *out
    )
    return out


def errors_bwd(
    grad_loss: Tensor,
    p: Tensor,
    t: Tensor,
    q: Tensor | None,
    ge: Tensor,
    gd: Tensor,
    *,
    has_d: bool,
    out: Tensor | None = None,
) -> Tensor:
    """dL/dp = grad_loss * (ge * (p - t) + gd * (p - q)), in p's dtype and memory format."""
    dtype = p.dtype
    p, t, q = _kernel_inputs(p, t, q)
    if out is not None and (out.dtype != p.dtype or out.is_contiguous() != p.is_contiguous()):
        raise ValueError(f"out must have the kernel's dtype {p.dtype} and model_pred's memory format")
    grad = torch.empty_like(p) if out is None else out
    _ops(p.device).native_errors_bwd(grad_loss.to(torch.float32).reshape(()), p, t, q, ge, gd, has_d, grad)
    return grad if grad.dtype == dtype else grad.to(dtype)


preference_loss_native_op, preference_loss_native_backward_op = define_fused_op(
    "rpo_fast::preference_loss_native", errors_fwd, pair_fwd, errors_bwd
)
sample_errors_native_op = define_errors_op("rpo_fast::sample_errors_native", errors_fwd, errors_bwd)


def fused_preference_loss(objective: str, opts: dict, *args: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    """The native backend of ``PreferenceLoss`` on validated inputs (``LossInputs`` order) and resolved
    options: (loss, metrics)."""
    return fused_loss(preference_loss_native_op, objective, opts, *args)


def main() -> None:
    """Build the native library ahead of time and say where it is."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m rpo_fast.kernels.native",
        description="Build rpo_fast's native (C++/CUDA) loss backend ahead of its first use.",
        epilog="example: RPO_FAST_NATIVE_DIR=/opt/rpo_fast_native python -m rpo_fast.kernels.native --verbose",
    )
    parser.add_argument("--verbose", action="store_true", help="print the compiler's commands (default: off)")
    args = parser.parse_args()
    try:
        has_cuda = load_library(args.verbose)
    except NativeBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"native backend ready in {build_dir()} ({'CPU + CUDA' if has_cuda else 'CPU only'} kernels)")


if __name__ == "__main__":
    main()
