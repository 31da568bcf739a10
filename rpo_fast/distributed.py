"""Ranks, rendezvous and the collectives the losses use, written once for the whole package.

- ``world_size()`` / ``rank()``: of the default process group (1 / 0 where none is initialized).
- ``gather_rows(x)``: an autograd-aware all-gather along dim 0 whose backward is a reduce-scatter.
- ``all_gather_rows(x)``: the same without autograd (constants: embeddings, the kernels' partial sums).
- ``init_distributed()``: deepspeed.init_distributed, also for a plain one-process ``python rpo_fast/train.py``;
  ``init_from_env()``: a gloo group from the launcher's variables (the cache's ranks).
- ``free_port()`` and ``unlink_cpu_allreduce_buffer()``: a one-process rendezvous, and DeepSpeed's CPU buffer.

Nothing here imports deepspeed at module level; the kernels and the eager objectives import this module.
"""

from __future__ import annotations

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
        import torch.distributed as dist

        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world_size(), *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad)
        return out


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
    if not torch.cuda.is_available() and os.environ["RANK"] == "0":
        announce_shm_op_build()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    r = int(os.environ["RANK"])
    unlink_cpu_allreduce_buffer(r)
    return r, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def announce_shm_op_build() -> None:
    """Say so before DeepSpeed builds its CPU shared-memory all-reduce op (``deepspeed_shm_comm``, once per machine
    and torch build: about 2.5 minutes on 2 cores, silent otherwise), which it does on a CPU in init_distributed."""
    from torch.utils.cpp_extension import _get_build_directory

    folder = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    if not (folder / "deepspeed_shm_comm.so").exists():
        print(
            f"[rpo_fast] DeepSpeed is building its CPU all-reduce op (deepspeed_shm_comm) in {folder}: once per "
            "machine, a few minutes on a small CPU",
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
