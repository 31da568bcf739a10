"""The frozen reference's forward as a CUDA graph (``--reference-graphs``): captured once at the training shape, then
replayed, so a reference forward costs one launch of the host instead of one per kernel (SDXL's UNet: about 1,900
module calls and several thousand kernels per forward).

    graphed = GraphedForward(lambda x, t, cond: family.predict(reference, x, t, cond))
    with torch.inference_mode():
        ref = graphed(noisy, t, cond).clone()      # the output is the graph's buffer: clone before the next call

A call whose inputs have the captured signature (the same tree of tensors with the same shapes, dtypes and devices)
copies them into the graph's static input buffers and replays; any other call (a short last evaluation batch) runs
eagerly and is counted in ``eager_calls``. The first call captures: a few eager warm-up runs on a side stream (cuBLAS
and cuDNN choose their algorithms, lazy state is built), then the capture. The reference is frozen and runs no random
op (eval mode), so a replay computes what an eager call would, with the same kernels: policy and reference still tie
at step 0.

Only the replicated reference is graphed: a ZeRO-3 reference gathers its parameters with collectives, and with LoRA
the reference is the policy itself, whose parameters change every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

WARMUP = 3  # eager runs on the side stream before the capture


def available() -> bool:
    """Whether CUDA graphs can be captured here (a CUDA device)."""
    return torch.cuda.is_available()


def check_reference_graphs(cfg, has_reference: bool) -> None:
    """The refusals of ``--reference-graphs`` that need no model."""
    if not cfg.reference_graphs:
        return
    if not has_reference:
        raise ValueError(f"--reference-graphs: --objective {cfg.objective} has no reference model")
    if cfg.lora_rank:
        raise ValueError(
            "--reference-graphs with --lora-rank: the reference is the policy itself, which changes every step"
        )
    if cfg.ref_placement == "precomputed":
        raise ValueError("--reference-graphs with --ref-placement precomputed: there is no reference forward to replay")
    if cfg.ref_placement != "replicated":
        raise ValueError(
            "--reference-graphs needs --ref-placement replicated (a ZeRO-3 reference gathers with collectives)"
        )
    if not available():
        raise ValueError("--reference-graphs needs a CUDA GPU (CUDA graphs); drop it on this machine")


def capture_cuda_graph(fn: Callable, args: tuple, *, warmup: int = WARMUP):
    """Warm up ``fn(*args)`` on a side stream, then capture it: (replay, output), ``output`` the graph's buffers."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the loader's prefetch thread may pin memory or copy while this thread captures; in the global
    # mode any CUDA call of another thread during the capture is an error
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn(*args)
    return graph.replay, out


def _signature(leaves: list, spec) -> tuple:
    return (str(spec),) + tuple(
        (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else ("constant", x) for x in leaves
    )


class GraphedForward:
    """``fn(*args)`` replayed from a graph captured at the first call's signature (see the module's doc).
    ``capture(fn, args) -> (replay, output)`` is ``capture_cuda_graph`` by default."""

    def __init__(self, fn: Callable, *, capture: Callable | None = None):
        self.fn, self.capture = fn, capture or capture_cuda_graph
        self.signature = None
        self.static_inputs: list[torch.Tensor] = []
        self.replay = self.output = None
        self.replays = self.eager_calls = 0

    def __call__(self, *args):
        leaves, spec = tree_flatten(args)
        signature = _signature(leaves, spec)
        if self.signature is None:
            self._capture(leaves, spec, signature)
        elif signature != self.signature:
            self.eager_calls += 1
            return self.fn(*args)
        for static, x in zip(self.static_inputs, leaves):
            if isinstance(x, torch.Tensor):
                static.copy_(x)
        self.replay()
        self.replays += 1
        return self.output

    def _capture(self, leaves: list, spec, signature: tuple) -> None:
        self.static_inputs = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_args = tree_unflatten(self.static_inputs, spec)
        try:
            self.replay, self.output = self.capture(self.fn, tuple(static_args))
        except Exception as e:  # a host sync or a CPU tensor inside the forward makes capture fail
            raise RuntimeError(
                f"--reference-graphs: capturing the reference forward as a CUDA graph failed ({type(e).__name__}: "
                f"{e}); run without --reference-graphs"
            ) from e
        self.signature = signature
