"""Two gloo ranks compute RPO with scope="global" on halves of one batch; rank 0 saves what the test
compares with one process holding the whole batch.

    python tests/dist_rpo_worker.py OUT.pt BACKEND WEIGHTING

Model: model_pred = theta * x, theta (C, 1, 1) a parameter, so parameter gradients can be compared after
the data-parallel averaging that DeepSpeed and DDP do (all-reduce sum / world size).
"""

import contextlib
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, B_LOCAL, C, H, W = 2, 3, 4, 5, 7


def global_inputs():
    g = torch.Generator().manual_seed(123)
    b = WORLD * B_LOCAL
    x = torch.randn(2 * b, C, H, W, generator=g)
    target = torch.randn(2 * b, C, H, W, generator=g)
    ref = x * 1.0 + 0.1 * torch.randn(2 * b, C, H, W, generator=g)
    ew, el = torch.randn(b, 16, generator=g), torch.randn(b, 16, generator=g)
    theta0 = 1 + 0.05 * torch.randn(C, 1, 1, generator=g)
    return x, target, ref, ew, el, theta0


def local_rows(x, rank, b_total):
    """Rank r's 2*B_LOCAL rows: its winners, then its losers (the trainer's layout)."""
    w = x[rank * B_LOCAL : (rank + 1) * B_LOCAL]
    l = x[b_total + rank * B_LOCAL : b_total + (rank + 1) * B_LOCAL]
    return torch.cat([w, l])


@contextlib.contextmanager
def count_collectives():
    """Counts the calls of torch.distributed's all-reduce, reduce-scatter and all-gather inside the block."""
    counts = {"all_reduce": 0, "reduce_scatter_tensor": 0, "all_gather_into_tensor": 0}
    originals = {name: getattr(dist, name) for name in counts}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)

        return call

    for name in counts:
        setattr(dist, name, counting(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def run(rank, out, backend, weighting, port):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    from rpo_fast import PreferenceLoss

    x, target, ref, ew, el, theta0 = global_inputs()
    b = WORLD * B_LOCAL
    theta = torch.nn.Parameter(theta0.clone())
    xl = local_rows(x, rank, b)
    pred = theta * xl
    pred.retain_grad()
    fn = PreferenceLoss("rpo", backend=backend, beta=100.0, tau=0.5, weighting=weighting, scope="global")
    with count_collectives() as forward_collectives:
        res = fn(
            pred,
            local_rows(target, rank, b),
            local_rows(ref, rank, b),
            embeds_w=ew[rank * B_LOCAL : (rank + 1) * B_LOCAL],
            embeds_l=el[rank * B_LOCAL : (rank + 1) * B_LOCAL],
        )
    with count_collectives() as backward_collectives:
        res.loss.backward()
    grad = theta.grad.clone()
    dist.all_reduce(grad)
    grad /= WORLD  # the data-parallel average
    pred_grads = [torch.empty_like(pred.grad) for _ in range(WORLD)]
    dist.all_gather(pred_grads, pred.grad.contiguous())
    losses = [torch.empty(()) for _ in range(WORLD)]
    dist.all_gather(losses, res.loss.detach().float())
    if rank == 0:
        torch.save(
            dict(
                loss=res.loss.detach(),
                losses=losses,
                metrics=res.metrics,
                theta_grad=grad,
                pred_grads=pred_grads,
                forward_collectives=forward_collectives,
                backward_collectives=backward_collectives,
            ),
            out,
        )
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    # Leave without interpreter finalization. gloo's worker thread can still hold the finished all_gather work
    # (kept by the barrier); when it drops it during finalization, freeing the gathered tensors needs the GIL,
    # the finalizing thread refuses it and the process aborts ("terminate called without an active exception";
    # seen in ~1 of 30 runs, core dump: ~AsyncBarrierWork -> ~AsyncAllgatherWork -> decref_pyobject -> take_gil
    # -> pthread_exit). Everything this process had to do is done and saved.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    out, backend, weighting = sys.argv[1], sys.argv[2], sys.argv[3]
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(run, args=(out, backend, weighting, port), nprocs=WORLD, join=True)
