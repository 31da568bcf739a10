"""Ranks, rendezvous and the collectives the losses use, written once for the whole package.

- ``world_size()`` / ``rank()``: of the default process group (1 / 0 where none is initialized).
- ``gather_rows(x)``: an autograd-aware all-gather along dim 0 whose backward is a reduce-scatter.
- ``all_gather_rows(x)``: the same without autograd (constants: embeddings, the kernels' partial sums).
- ``all_gather_packed(*xs)`` / ``gather_rows_packed(x, *consts)``: several tensors of one row count in ONE
  all-gather (RPO's global scope: its errors and both embeddings per micro-step), without / with autograd for x.
- ``init_distributed()``: deepspeed.init_distributed, also for a plain one-process ``python rpo_fast/train.py``;
  ``init_from_env()``: a gloo group from the launcher's variables (the cache's ranks).
- ``free_port()`` and ``unlink_cpu_allreduce_buffer()``: a one-process rendezvous, and DeepSpeed's CPU buffer.
- ``check_shared_folder(path)``: every rank sees what rank 0 writes there (a filesystem all nodes mount).
- ``finish()``: the clean end of a multi-rank CPU command (gloo's shutdown race avoided).

Nothing here imports deepspeed at module level; the kernels and the eager objectives import this module.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import torch
from torch import Tensor


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def all_gather_rows(x: Tensor) -> Tensor:
    """(n, ...) on every rank -> (W*n, ...), rank 0's rows first. No autograd. Every rank passes the same shape."""
    import torch.distributed as dist

    x = x.contiguous()
    out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x)
    return out


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0. Backward: a reduce-scatter of the gathered gradient, so rank r receives the sum
    over ranks of the gradient of its own rows, and each rank sends (W-1)/W of the buffer (an all-reduce moves
    about twice that and keeps the whole (W*n, ...) result on every rank)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return all_gather_rows(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return reduce_scatter_rows(grad)


def reduce_scatter_rows(grad: Tensor) -> Tensor:
    """(W*n, ...) on every rank -> (n, ...): rank r receives the sum over ranks of rows r*n..(r+1)*n."""
    import torch.distributed as dist

    grad = grad.contiguous()
    out = grad.new_empty((grad.shape[0] // world_size(), *grad.shape[1:]))
    dist.reduce_scatter_tensor(out, grad)
    return out


def _pack(xs: tuple[Tensor, ...]) -> tuple[Tensor, list[tuple[int, ...]], list[torch.dtype]]:
    """(n, ...) tensors side by side as one (n, sum of their row sizes) tensor of their promoted dtype (at least
    fp32: exact for bf16/fp16 values), with what ``_unpack`` needs."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    n = xs[0].shape[0]
    if any(x.shape[0] != n for x in xs):
        raise ValueError(f"packed tensors must have one row count, got {[tuple(x.shape) for x in xs]}")
    packed = torch.cat([x.reshape(n, -1).to(dtype) for x in xs], dim=1)
    return packed, [tuple(x.shape[1:]) for x in xs], [x.dtype for x in xs]


def _unpack(g: Tensor, shapes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> list[Tensor]:
    sizes = [math.prod(s) for s in shapes]
    parts = g.split(sizes, dim=1)
    return [p.reshape(g.shape[0], *s).to(d) for p, s, d in zip(parts, shapes, dtypes)]


def all_gather_packed(*xs: Tensor) -> list[Tensor]:
    """``[all_gather_rows(x) for x in xs]`` in one collective: each (n, ...) -> (W*n, ...) in its own dtype. No
    autograd."""
    packed, shapes, dtypes = _pack(xs)
    return _unpack(all_gather_rows(packed), shapes, dtypes)


class _GatherRowsPacked(torch.autograd.Function):
    """x and constants gathered in one all-gather; the backward reduce-scatters x's gradient only."""

    @staticmethod
    def forward(ctx, x: Tensor, *consts: Tensor):
        packed, shapes, dtypes = _pack((x, *consts))
        ctx.x_dtype = x.dtype
        outs = tuple(_unpack(all_gather_rows(packed), shapes, dtypes))
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad: Tensor, *const_grads):
        return (reduce_scatter_rows(grad.to(ctx.x_dtype)), *(None for _ in const_grads))


def gather_rows_packed(x: Tensor, *consts: Tensor) -> list[Tensor]:
    """``gather_rows(x)`` and ``all_gather_rows(c)`` of each constant (no gradient) in one all-gather, with the
    backward of ``gather_rows``: one reduce-scatter of x's gradient."""
    return list(_GatherRowsPacked.apply(x, *(c.detach() for c in consts)))


def gather_rows(x: Tensor) -> Tensor:
    """All-gather (autograd-aware) along dim 0 across the default process group: (n, ...) -> (W*n, ...).

    Backward sums every rank's gradient for the local rows, so each rank receives W times the gradient of
    the rows it owns; the data-parallel averaging of DeepSpeed/DDP (divide by W) then gives exactly the
    single-process gradient of the concatenated batch. Micro-batches must be equal in size on every rank.
    """
    return _GatherRows.apply(x)


def free_port() -> int:
    """A free TCP port on 127.0.0.1: the rendezvous of a one-process run, or a launcher's ``--master_port``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """deepspeed.init_distributed (NCCL on CUDA, gloo on CPU), also for a plain ``python rpo_fast/train.py``
    (one rank on a free local port). Returns (rank, world size, local rank)."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    if not torch.cuda.is_available():
        if os.environ["RANK"] == "0":
            announce_shm_op_build()
        quiet_shm_op_load()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    r = int(os.environ["RANK"])
    unlink_cpu_allreduce_buffer(r)
    return r, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def shm_op_folder() -> Path:
    """Where torch builds DeepSpeed's CPU shared-memory all-reduce op (``deepspeed_shm_comm``) on this machine."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("deepspeed_shm_comm", verbose=False))


def shm_op_built() -> bool:
    """Whether DeepSpeed's CPU all-reduce op is built on this machine."""
    return (shm_op_folder() / "deepspeed_shm_comm.so").exists()


def build_shm_op() -> None:
    """Build (or load) DeepSpeed's CPU all-reduce op in this process: what ``init_distributed`` would do in the first
    rank, done ahead so that a caller can time it (the demo's build phase)."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        builder.load(verbose=False)


def quiet_shm_op_load() -> None:
    """DeepSpeed prints "DeepSpeed deepspeed_shm_comm built successfully" (a print, no logger) in every rank of a
    CPU run at every start, built or only loaded: that line is dropped unless ``RPO_FAST_VERBOSE=1``."""
    import contextlib
    import importlib
    import io

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # not ``import ... as``: deepspeed.comm.torch is torch

    if os.environ.get("RPO_FAST_VERBOSE") == "1" or getattr(ds_torch.build_shm_op, "quiet", False):
        return
    load = ds_torch.build_shm_op

    def quiet():
        with contextlib.redirect_stdout(io.StringIO()):
            return load()

    quiet.quiet = True
    ds_torch.build_shm_op = quiet


def announce_shm_op_build() -> None:
    """Say so before DeepSpeed builds its CPU shared-memory all-reduce op (``deepspeed_shm_comm``, once per machine
    and torch build: about 2.5 minutes on 2 cores, silent otherwise), which it does on a CPU in init_distributed."""
    if not shm_op_built():
        print(
            f"[rpo_fast] DeepSpeed is building its CPU all-reduce op (deepspeed_shm_comm) in {shm_op_folder()}: once "
            "per machine, a few minutes on a small CPU",
            flush=True,
        )


def init_from_env() -> tuple[int, int]:
    """(rank, world) from RANK / WORLD_SIZE (set by deepspeed or torchrun; 0 / 1 without a launcher), with a gloo
    process group where there is more than one rank: the cache's ranks only need a barrier, on any machine."""
    r, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
    return r, world


def unlink_cpu_allreduce_buffer(rank: int) -> None:
    """On CPU, DeepSpeed's shared-memory all-reduce (ops/csrc/cpu/comm/shm.cpp, set up when the launcher sets
    LOCAL_SIZE) creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, about 70 MB per rank, and
    never unlinks it: each run would leave its buffers in memory until the machine reboots. Every rank has mapped
    every other rank's buffer before init_distributed returns, so after a barrier each rank removes the name of its
    own; the mappings live on until the processes exit, and a killed run leaves nothing behind."""
    if torch.cuda.is_available():
        return
    import torch.distributed as dist

    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}"
    name += f"_{os.environ.get('MASTER_PORT', '')}_{rank}"
    if dist.get_world_size() > 1:
        dist.barrier()  # every rank, whether or not it has a buffer: the condition is the same on all of them
    if os.path.exists(name):
        os.unlink(name)


def finish() -> None:
    """The end of a command that ran several CPU ranks (gloo): a barrier (no rank tears gloo down while another still
    talks to it), the group destroyed, and the process leaves without interpreter finalization (``os._exit(0)``).
    gloo's worker thread can still hold a finished collective whose tensors need the GIL to be freed; the finalizing
    interpreter refuses it and the process aborts ("terminate called without an active exception", exit -6: seen
    about once in 30 runs, once in CI). Called by the scripts' entry points only, after everything is saved."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1 or dist.get_backend() != "gloo":
        return
    import sys

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def barrier() -> None:
    dist = _dist()
    if dist and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum ``x`` over ranks in place (a no-op on one rank); returns ``x``."""
    dist = _dist()
    if dist and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


class SharedFolderError(ValueError):
    """A folder that every rank must share (the run's output, the cache being built) is not the same on all."""


def check_shared_folder(path: str | Path, flag: str, *, reads: str) -> None:
    """Rank 0 writes a probe with a fresh token under ``path``, every rank reads it after a barrier: a rank that does
    not see it is one clear error on every rank (naming the ranks and hosts), not a hang or a checkpoint split across
    nodes later. ``reads`` says what needs the folder shared. A no-op on one rank."""
    dist = _dist()
    if not dist or dist.get_world_size() == 1:
        return
    import secrets

    path, me = Path(path), dist.get_rank()
    token = [secrets.token_hex(8) if me == 0 else None, str(path)]
    dist.broadcast_object_list(token, src=0)  # and rank 0's path, for the message
    probe = path / f".rpo_fast-shared-probe-{token[0]}"
    if me == 0:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text(token[0])
    dist.barrier()
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (me, socket.gethostname(), seen))
    dist.barrier()  # every rank has looked before rank 0 removes it
    if me == 0:
        probe.unlink(missing_ok=True)
    blind = [(r, host) for r, host, ok in everyone if not ok]
    if blind:
        ranks = ", ".join(f"rank {r} on {host}" for r, host in blind)
        raise SharedFolderError(
            f"{flag} {token[1]} is not shared by all ranks: {ranks} cannot see the file rank 0 (on {everyone[0][1]}) "
            f"wrote there. {reads}, so it must be on a filesystem every node mounts (NFS, Lustre, a cloud file "
            "store) at the same path"
        )
