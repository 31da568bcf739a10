"""What the fused backends (Triton: ``preference_loss``; C++/CUDA: ``native``) share, with no Triton import.

Every fused backend computes the loss in three steps on validated inputs: ``errors_fwd`` (one pass over
model_pred p, ref_pred q and target t writing chunk partial sums (R, CHUNKS, 5) of m, r, delta, <e,d>,
|d|^2), ``pair_fwd`` (the pairwise step: loss, metrics, and ge/gd with dL/dp = ge (p - t) + gd (p - q)) and
``errors_bwd`` (one elementwise pass). ``define_fused_op`` turns the three into a ``torch.library`` custom op
with its fake kernel and autograd formula, and inserts RPO's global-scope all-gather between the first two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor

from .. import distributed
from ..objectives import OBJECTIVE_TABLE, PAIR_METRICS

METRIC_NAMES = PAIR_METRICS + ("weight_diag",)  # the order of the metrics vector the kernels write
K = 5  # partial sums per sample and chunk: m, r, delta, <e,d>, |d|^2
DPO, SFT, RPO, DSPO, DENSE, CAL = range(6)  # the kernels' objective ids (OBJ; csrc's enum Objective)

# Each objective's kernel branch: its id, and the float parameters the op carries from its resolved options
KERNEL_BRANCH = {
    "dpo": (DPO, lambda o: [o["beta"]]),
    "sft": (SFT, lambda o: []),
    "rpo": (RPO, lambda o: [o["beta"], o["tau"], float(o["weighting"] == "inside")]),
    "dspo": (DSPO, lambda o: [o["lam_in"], o["lam_out"], float(o["form"] == "sdxl")]),
    "dense-dpo": (
        DENSE,
        lambda o: [
            o["beta"],
            o["gamma"] if o["timestep_sampling"] == "uniform" else 1.0,  # t drawn ~ w(t): no weight in the loss
            float(o["num_inference_steps"]),
            float(o["num_train_timesteps"]),
        ],
    ),
    "cal-dpo": (CAL, lambda o: [o["beta"], o["beta_cal"], o["lam_cal"]]),
}


def objective_params(objective: str, opts: dict) -> list[float]:
    """The float parameters the op carries for ``objective`` with resolved options ``opts``."""
    return KERNEL_BRANCH[objective][1](opts)


def pair_scalars(objective: str, params: list[float]) -> tuple[int, float, float, float, int, int, bool]:
    """The pairwise step's scalars (obj, a0, a1, a2, nsteps, ttrain, sdxl) from the op's parameters:
    a0 = beta/2 (dpo, dense-dpo, cal-dpo, rpo) or lam_in (dspo); a1 = log2(gamma) (dense-dpo), 1/(2 beta_cal)
    (cal-dpo), lam_out (dspo), 1/tau (rpo); a2 = lam_cal (cal-dpo), 1.0 if weighting is inside (rpo)."""
    obj = KERNEL_BRANCH[objective][0]
    a0 = a1 = a2 = 0.0
    nsteps = ttrain = 1
    if obj in (DPO, CAL, DENSE, RPO):
        a0 = params[0] / 2
    if obj == RPO:
        a1, a2 = 1.0 / params[1], params[2]
    if obj == DENSE:
        a1, nsteps, ttrain = math.log2(params[1]), int(params[2]), int(params[3])
    if obj == CAL:
        a1, a2 = 1.0 / (2.0 * params[1]), params[2]
    if obj == DSPO:
        a0, a1 = params[0], params[1]
    return obj, a0, a1, a2, nsteps, ttrain, obj == DSPO and bool(params[2])


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def grid_target(device: torch.device) -> int:
    """Programs that cover the device: 4 per SM (4 on CPU, where Triton's interpreter runs)."""
    return 4 * _sm_count(device.index or 0) if device.type == "cuda" else 4


def gpu_num_chunks(rows: int, n: int, device: torch.device, min_chunk: int) -> int:
    """Split each row into chunks so that the grid covers the GPU (4 programs per SM), at least ``min_chunk``
    elements a chunk. Depends only on shapes and the device, so results are reproducible bit for bit."""
    return max(1, min(cdiv(n, min_chunk), cdiv(grid_target(device), rows)))


def same_layout(p: Tensor, t: Tensor, q: Tensor | None):
    """Pair the right elements: all three in p's memory format (contiguous or channels_last), each row a
    dense block of N elements in the same order. Anything else is copied, never reinterpreted."""
    fmt = torch.contiguous_format
    if p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last

    def fix(x):
        return x if x is None or x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)

    return fix(p), fix(t), fix(q)


def gather_pair_inputs(part: Tensor, embeds_w: Tensor, embeds_l: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """RPO's global inputs in ONE all-gather per micro-step: the partial sums (2b, K) -> (2bW, K), all ranks'
    winners then all ranks' losers, and both embeddings (b, E) -> (bW, E)."""
    b = part.shape[0] // 2
    pw, pl, embeds_w, embeds_l = distributed.all_gather_packed(part[:b], part[b:], embeds_w, embeds_l)
    return torch.cat([pw, pl]), embeds_w, embeds_l


def local_rows(g: Tensor, world: int, b: int) -> Tensor:
    """This rank's rows of a gathered per-sample tensor, times W (the all-gather's summed backward)."""
    r = distributed.rank()
    total = world * b
    return torch.cat([g[r * b : (r + 1) * b], g[total + r * b : total + (r + 1) * b]]) * world


def pair_outputs(rows: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The pairwise step's outputs, unwritten: loss (), metrics (len(METRIC_NAMES),), ge (rows,), gd (rows,), fp32."""
    loss, metrics = (torch.empty(shape, dtype=torch.float32, device=device) for shape in ((), len(METRIC_NAMES)))
    ge, gd = (torch.empty(rows, dtype=torch.float32, device=device) for _ in range(2))
    return loss, metrics, ge, gd


def define_fused_op(name: str, errors_fwd: Callable, pair_fwd: Callable, errors_bwd: Callable):
    """Register ``name`` (forward: (loss, metrics, ge, gd)) and ``name + "_backward"`` as custom ops over one
    backend's three steps, with fake kernels and the autograd formula. Returns (op, backward_op)."""

    @torch.library.custom_op(name, mutates_args=())
    def op(
        model_pred: Tensor,
        target: Tensor,
        ref_pred: Tensor | None,
        embeds_w: Tensor | None,
        embeds_l: Tensor | None,
        weights: Tensor | None,
        timesteps: Tensor | None,
        objective: str,
        params: list[float],
        world: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(loss, metrics, ge, gd). ``world`` > 1: RPO's global scope, pairs all-gathered across ranks."""
        part = errors_fwd(model_pred, target, ref_pred, dspo=OBJECTIVE_TABLE[objective].score_terms)
        n = model_pred[0].numel()
        if world > 1:
            b = model_pred.shape[0] // 2
            part, embeds_w, embeds_l = gather_pair_inputs(part, embeds_w, embeds_l)
            loss, met, ge, gd = pair_fwd(part, n, objective, params, embeds_w=embeds_w, embeds_l=embeds_l)
            return loss, met, local_rows(ge, world, b), local_rows(gd, world, b)
        return pair_fwd(
            part, n, objective, params, embeds_w=embeds_w, embeds_l=embeds_l, weights=weights, timesteps=timesteps
        )

    @op.register_fake
    def _(model_pred, target, ref_pred, embeds_w, embeds_l, weights, timesteps, objective, params, world):
        return pair_outputs(model_pred.shape[0], model_pred.device)

    @torch.library.custom_op(name + "_backward", mutates_args=())
    def backward_op(
        grad_loss: Tensor,
        model_pred: Tensor,
        target: Tensor,
        ref_pred: Tensor | None,
        ge: Tensor,
        gd: Tensor,
        has_d: bool,
    ) -> Tensor:
        return errors_bwd(grad_loss, model_pred, target, ref_pred, ge, gd, has_d=has_d)

    @backward_op.register_fake
    def _(grad_loss, model_pred, target, ref_pred, ge, gd, has_d):
        return torch.empty_like(model_pred)

    def setup_context(ctx, inputs, output):
        model_pred, target, ref_pred = inputs[:3]
        _, _, ge, gd = output
        ctx.save_for_backward(model_pred, target, ref_pred, ge, gd)
        ctx.has_d = OBJECTIVE_TABLE[inputs[7]].score_terms

    def backward(ctx, grad_loss, grad_metrics, grad_ge, grad_gd):
        model_pred, target, ref_pred, ge, gd = ctx.saved_tensors
        grad = backward_op(grad_loss, model_pred, target, ref_pred, ge, gd, ctx.has_d)
        return grad, None, None, None, None, None, None, None, None, None

    op.register_autograd(backward, setup_context=setup_context)
    return op, backward_op


def fused_loss(
    op,
    objective: str,
    opts: dict,
    model_pred: Tensor,
    target: Tensor,
    ref_pred: Tensor | None = None,
    embeds_w: Tensor | None = None,
    embeds_l: Tensor | None = None,
    weights: Tensor | None = None,
    timesteps: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """A fused backend of ``PreferenceLoss`` (``op`` from ``define_fused_op``) on validated inputs and resolved
    options: (loss, metrics)."""
    spec = OBJECTIVE_TABLE[objective]
    world = distributed.world_size() if opts.get("scope") == "global" else 1
    if embeds_w is not None:
        embeds_w, embeds_l = embeds_w.detach(), embeds_l.detach()
    loss, met, _, _ = op(
        model_pred,
        target.detach(),
        None if ref_pred is None else ref_pred.detach(),
        embeds_w,
        embeds_l,
        weights,
        timesteps,
        objective,
        objective_params(objective, opts),
        world,
    )
    met = met.detach()
    return loss, {name: met[METRIC_NAMES.index(name)] for name in spec.metrics}


def define_errors_op(name: str, errors_fwd: Callable, errors_bwd: Callable):
    """Register ``name``: the error pass alone as a custom op with autograd, per sample k over N elements

        m_k = mean_N (p_k - t_k)^2,   r_k = mean_N (q_k - t_k)^2,   delta_k = mean_N (p_k - q_k)(p_k + q_k - 2 t_k)

    returned as three fp32 (R,) tensors (r and delta are zeros without a reference), and its backward

        dL/dp_k = (g^m_k + g^delta_k) * (2 / N) * (p_k - t_k)        (r carries no gradient: q is a constant)

    one elementwise pass (``errors_bwd`` with ge = (g^m + g^delta) 2/N, gd = 0). The objectives that combine the
    per-sample errors themselves (the online ones) sit on it. Returns the op."""

    @torch.library.custom_op(name, mutates_args=())
    def op(model_pred: Tensor, target: Tensor, ref_pred: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        part = errors_fwd(model_pred, target, ref_pred)
        sums = part.sum(1) * (1.0 / model_pred[0].numel())  # (R, K), chunks reduced in a fixed order
        return sums[:, 0].clone(), sums[:, 1].clone(), sums[:, 2].clone()  # clones: outputs may not alias

    @op.register_fake
    def _(model_pred, target, ref_pred):
        rows = model_pred.shape[0]
        return tuple(torch.empty(rows, dtype=torch.float32, device=model_pred.device) for _ in range(3))

    @torch.library.custom_op(name + "_backward", mutates_args=())
    def backward_op(model_pred: Tensor, target: Tensor, ge: Tensor) -> Tensor:
        one = torch.ones((), dtype=torch.float32, device=model_pred.device)
        return errors_bwd(one, model_pred, target, None, ge, ge, has_d=False)

    @backward_op.register_fake
    def _(model_pred, target, ge):
        return torch.empty_like(model_pred)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])

    def backward(ctx, g_m, g_r, g_delta):
        model_pred, target = ctx.saved_tensors
        g = torch.zeros(model_pred.shape[0], dtype=torch.float32, device=model_pred.device)
        for part in (g_m, g_delta):
            if part is not None:
                g = g + part.float()
        return backward_op(model_pred, target, g * (2.0 / model_pred[0].numel())), None, None

    op.register_autograd(backward, setup_context=setup_context)
    return op
