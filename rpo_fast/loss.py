"""``PreferenceLoss``: one module for every objective, validated once, dispatched to a backend.

The call chain is PreferenceLoss -> backend (eager functions in ``objectives``, or the Triton custom op in
``rpo_fast.kernels``) -> kernels. Nothing here imports deepspeed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from . import objectives as O
from .objectives import LossOutput

# Options of each objective and their defaults. ``None`` defaults are resolved in ``resolve_options``.
OPTIONS: dict[str, dict[str, Any]] = {
    "dpo": dict(beta=5000.0),
    "sft": dict(),
    "rpo": dict(beta=5000.0, tau=0.5, weighting="inside", scope="global"),
    "dspo": dict(beta=None, form="sd15", lam_in=None, lam_out=None),
    "dense-dpo": dict(beta=5000.0, gamma=0.9, num_inference_steps=50, num_train_timesteps=1000),
    "cal-dpo": dict(beta=5000.0, beta_cal=0.5, lam_cal=0.5),
}
TAKES_WEIGHTS = ("dpo", "dense-dpo", "cal-dpo")
BACKENDS = ("auto", "eager", "compile", "triton")
DSPO_DEFAULT_BETA = {"sd15": 0.001, "sdxl": 5000.0}  # the DSPO reference launchers


def _positive(name: str, v: Any, *, allow_zero: bool = False) -> float:
    ok = (
        isinstance(v, int | float)
        and not isinstance(v, bool)
        and math.isfinite(v)
        and (v >= 0 if allow_zero else v > 0)
    )
    if not ok:
        raise ValueError(f"{name} must be a finite {'non-negative' if allow_zero else 'positive'} number, got {v!r}")
    return float(v)


def _choice(name: str, v: Any, allowed: tuple[str, ...]) -> str:
    if v not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {v!r}")
    return v


def resolve_options(objective: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check an objective's options and fill in the defaults (DSPO's depend on ``form``)."""
    if objective not in OPTIONS:
        raise ValueError(f"unknown objective {objective!r}; choose one of {O.OBJECTIVES}")
    unknown = set(options) - set(OPTIONS[objective])
    if unknown:
        allowed = ", ".join(OPTIONS[objective]) or "none"
        raise ValueError(f"unknown option(s) {sorted(unknown)} for objective {objective!r} (it takes: {allowed})")
    opts = {**OPTIONS[objective], **options}
    if objective == "dspo":
        opts["form"] = _choice("form", opts["form"], ("sd15", "sdxl"))
        if opts["beta"] is None:
            opts["beta"] = DSPO_DEFAULT_BETA[opts["form"]]
        opts["lam_in"] = opts["beta"] / 2 if opts["lam_in"] is None else opts["lam_in"]
        opts["lam_out"] = opts["beta"] if opts["lam_out"] is None else opts["lam_out"]
        for k in ("beta", "lam_in", "lam_out"):
            opts[k] = _positive(k, opts[k])
    elif "beta" in opts:
        opts["beta"] = _positive("beta", opts["beta"])
    if objective == "rpo":
        opts["tau"] = _positive("tau", opts["tau"])
        opts["weighting"] = _choice("weighting", opts["weighting"], ("inside", "outside"))
        opts["scope"] = _choice("scope", opts["scope"], ("local", "global"))
    if objective == "dense-dpo":
        gamma = _positive("gamma", opts["gamma"])
        if gamma > 1:
            raise ValueError(f"gamma must be in (0, 1], got {gamma}")
        for k in ("num_inference_steps", "num_train_timesteps"):
            if not isinstance(opts[k], int) or isinstance(opts[k], bool) or opts[k] < 1:
                raise ValueError(f"{k} must be a positive integer, got {opts[k]!r}")
    if objective == "cal-dpo":
        opts["beta_cal"] = _positive("beta_cal", opts["beta_cal"])
        opts["lam_cal"] = _positive("lam_cal", opts["lam_cal"], allow_zero=True)
    return opts


def _floating(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def validate_inputs(
    objective: str,
    model_pred: Tensor,
    target: Tensor,
    ref_pred: Tensor | None,
    embeds_w: Tensor | None,
    embeds_l: Tensor | None,
    weights: Tensor | None,
    timesteps: Tensor | None,
) -> None:
    """Raise ``ValueError`` naming the problem; never broadcast silently. Costs no device sync."""
    _floating("model_pred", model_pred)
    _floating("target", target)
    if model_pred.dim() < 2:
        raise ValueError(f"model_pred must be (rows, C, H, W) or at least 2-D, got shape {tuple(model_pred.shape)}")
    rows, tail = model_pred.shape[0], tuple(model_pred.shape[1:])
    if rows == 0 or model_pred.numel() == 0:
        raise ValueError(f"model_pred is empty (shape {tuple(model_pred.shape)})")
    tensors = {"model_pred": model_pred, "target": target}
    if objective == "sft":
        if ref_pred is not None:
            raise ValueError("objective 'sft' uses no reference model: pass ref_pred=None")
        if tuple(target.shape) != tuple(model_pred.shape):
            raise ValueError(
                f"sft: target shape {tuple(target.shape)} must equal model_pred shape {tuple(model_pred.shape)} "
                "(winners only)"
            )
        b = rows
    else:
        if rows % 2:
            raise ValueError(
                f"{objective}: model_pred has an odd first dimension ({rows}); it must hold 2B rows, "
                "the B winners first and then the B losers"
            )
        b = rows // 2
        if ref_pred is None:
            raise ValueError(f"{objective} needs ref_pred, the frozen reference model's prediction")
        _floating("ref_pred", ref_pred)
        if tuple(ref_pred.shape) != tuple(model_pred.shape):
            raise ValueError(
                f"ref_pred shape {tuple(ref_pred.shape)} must equal model_pred shape {tuple(model_pred.shape)}"
            )
        tensors["ref_pred"] = ref_pred
        if tuple(target.shape) not in ((rows, *tail), (b, *tail)):
            raise ValueError(
                f"target shape {tuple(target.shape)} must be {(rows, *tail)} (per sample) or {(b, *tail)} "
                "(shared by winner and loser, epsilon-prediction only)"
            )
    if objective == "rpo":
        if embeds_w is None or embeds_l is None:
            raise ValueError("rpo needs embeds_w (B, D) for the winners (rows) and embeds_l (B, D) for the losers")
        for name, e in (("embeds_w", embeds_w), ("embeds_l", embeds_l)):
            _floating(name, e)
            if e.dim() != 2 or e.shape[0] != b:
                raise ValueError(f"{name} must be (B, D) = ({b}, D), got shape {tuple(e.shape)}")
            tensors[name] = e
        if embeds_w.shape[1] != embeds_l.shape[1]:
            raise ValueError(f"embeds_w and embeds_l differ in width: {embeds_w.shape[1]} vs {embeds_l.shape[1]}")
    elif embeds_w is not None or embeds_l is not None:
        raise ValueError(f"embeds_w / embeds_l apply to objective 'rpo' only, not {objective!r}")
    if objective == "dense-dpo":
        if timesteps is None:
            raise ValueError("dense-dpo needs timesteps (B,), the timestep of each pair")
        if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
            raise ValueError(f"timesteps must be an integer tensor, got dtype {timesteps.dtype}")
        if tuple(timesteps.shape) != (b,):
            raise ValueError(f"timesteps must be (B,) = ({b},), got shape {tuple(timesteps.shape)}")
        tensors["timesteps"] = timesteps
    elif timesteps is not None:
        raise ValueError(f"timesteps apply to objective 'dense-dpo' only, not {objective!r}")
    if weights is not None:
        if objective not in TAKES_WEIGHTS:
            raise ValueError(f"per-pair weights apply to {TAKES_WEIGHTS} only, not {objective!r}")
        _floating("weights", weights)
        if tuple(weights.shape) != (b,):
            raise ValueError(f"weights must be (B,) = ({b},), got shape {tuple(weights.shape)}")
        tensors["weights"] = weights
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"inputs are on different devices: { {k: str(t.device) for k, t in tensors.items()} }")


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherRows(torch.autograd.Function):
    """All-gather along dim 0; backward all-reduces (sums) the gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_rows(x: Tensor) -> Tensor:
    """All-gather (autograd-aware) along dim 0 across the default process group: (n, ...) -> (W*n, ...).

    Backward sums every rank's gradient for the local rows, so each rank receives W times the gradient of
    the rows it owns; the data-parallel averaging of DeepSpeed/DDP (divide by W) then gives exactly the
    single-process gradient of the concatenated batch. Micro-batches must be equal in size on every rank.
    """
    return _GatherRows.apply(x)


def eager_loss(
    objective: str,
    opts: dict[str, Any],
    model_pred: Tensor,
    target: Tensor,
    ref_pred: Tensor | None = None,
    embeds_w: Tensor | None = None,
    embeds_l: Tensor | None = None,
    weights: Tensor | None = None,
    timesteps: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The eager backend on validated inputs and resolved options: (loss, metrics)."""
    # Upcast once: two casts of model_pred would each round their part of the gradient to its dtype
    # before autograd adds them (DSPO reads model_pred twice).
    model_pred = model_pred.to(O._acc_dtype(model_pred, target, ref_pred))
    err = O.per_sample_errors(model_pred, target, ref_pred)
    if objective == "sft":
        out = O.sft_loss(err)
    elif objective == "dpo":
        out = O.dpo_loss(err, beta=opts["beta"], weights=weights)
    elif objective == "cal-dpo":
        out = O.cal_dpo_loss(
            err, beta=opts["beta"], beta_cal=opts["beta_cal"], lam_cal=opts["lam_cal"], weights=weights
        )
    elif objective == "dense-dpo":
        out = O.dense_dpo_loss(
            err,
            timesteps,
            beta=opts["beta"],
            gamma=opts["gamma"],
            num_inference_steps=opts["num_inference_steps"],
            num_train_timesteps=opts["num_train_timesteps"],
            weights=weights,
        )
    elif objective == "dspo":
        out = O.dspo_loss(
            model_pred, target, ref_pred, err, form=opts["form"], lam_in=opts["lam_in"], lam_out=opts["lam_out"]
        )
    else:  # rpo
        if opts["scope"] == "global" and _world_size() > 1:
            b = err.m.shape[0] // 2
            err = O.SampleErrors(
                *(torch.cat([gather_rows(x[:b]), gather_rows(x[b:])]) for x in (err.m, err.r, err.delta))
            )
            embeds_w, embeds_l = gather_rows(embeds_w.detach()), gather_rows(embeds_l.detach())
        out = O.rpo_loss(err, embeds_w, embeds_l, beta=opts["beta"], tau=opts["tau"], weighting=opts["weighting"])
    return out.loss, out.metrics


class PreferenceLoss(nn.Module):
    """A preference objective for diffusion UNets, as one module.

    Args:
        objective: "dpo" | "sft" | "rpo" | "dspo" | "dense-dpo" | "cal-dpo".
        backend: "auto" (Triton for CUDA tensors, eager otherwise) | "eager" | "compile" (torch.compile of
            the eager code, static shapes; past Dynamo's recompile_limit of shapes and objectives in one
            process it runs eagerly) | "triton" (the fused kernels; on CPU only under ``TRITON_INTERPRET=1``).
        **options: the objective's options (defaults in ``OPTIONS``):
            dpo: beta=5000. rpo: beta=5000, tau=0.5, weighting="inside"|"outside",
            scope="global"|"local" (global all-gathers pairs across the default process group; the same as
            local where the world size is 1). dspo: form="sd15"|"sdxl", beta (0.001 for sd15, 5000 for
            sdxl), lam_in=beta/2, lam_out=beta. dense-dpo: beta=5000, gamma=0.9, num_inference_steps=50,
            num_train_timesteps=1000. cal-dpo: beta=5000, beta_cal=0.5, lam_cal=0.5. sft: none.

    Shape:
        model_pred, ref_pred: (2B, C, H, W), winners first then losers (sft: (B, C, H, W), winners only, and
            no ref_pred). target: (2B, C, H, W), or (B, C, H, W) shared by winner and loser, which is right
            only for epsilon-prediction (a v-prediction target depends on x_0). Keyword inputs: rpo needs
            ``embeds_w`` (B, D) (rows: winners) and ``embeds_l`` (B, D) (columns: losers); dense-dpo needs
            ``timesteps`` (B,) integers; dpo, dense-dpo and cal-dpo take optional ``weights`` (B,).
        Returns ``LossOutput(loss, metrics)``: a scalar fp32 loss with gradient to ``model_pred`` only, and a
            dict of detached scalars: loss, implicit_acc, reward_margin, reward_w, reward_l, mse_w, mse_l,
            ref_mse_w, ref_mse_l (+ weight_diag for rpo; loss and mse_w for sft).

    Example::

        loss_fn = PreferenceLoss("rpo", beta=5000.0, tau=0.5)
        out = loss_fn(model_pred, noise, ref_pred, embeds_w=e_w, embeds_l=e_l)
        out.loss.backward()
    """

    def __init__(self, objective: str = "rpo", *, backend: str = "auto", **options: Any) -> None:
        super().__init__()
        self.objective = objective
        self.options = resolve_options(objective, options)
        self.backend = _choice("backend", backend, BACKENDS)
        self._compiled = None

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.objective!r}, backend={self.backend!r}" + (f", {opts}" if opts else "")

    def forward(
        self,
        model_pred: Tensor,
        target: Tensor,
        ref_pred: Tensor | None = None,
        *,
        embeds_w: Tensor | None = None,
        embeds_l: Tensor | None = None,
        weights: Tensor | None = None,
        timesteps: Tensor | None = None,
    ) -> LossOutput:
        validate_inputs(self.objective, model_pred, target, ref_pred, embeds_w, embeds_l, weights, timesteps)
        args = (model_pred, target, ref_pred, embeds_w, embeds_l, weights, timesteps)
        backend = self.backend
        if backend == "auto":
            backend = "triton" if model_pred.is_cuda and _triton_available() else "eager"
        if backend == "triton":
            from .kernels import fused_preference_loss

            loss, metrics = fused_preference_loss(self.objective, self.options, *args)
        elif backend == "compile":
            if self._compiled is None:
                self._compiled = torch.compile(eager_loss, dynamic=False)
            loss, metrics = self._compiled(self.objective, self.options, *args)
        else:
            loss, metrics = eager_loss(self.objective, self.options, *args)
        return LossOutput(loss, metrics)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def preference_loss(
    objective: str,
    model_pred: Tensor,
    target: Tensor,
    ref_pred: Tensor | None = None,
    *,
    backend: str = "auto",
    embeds_w: Tensor | None = None,
    embeds_l: Tensor | None = None,
    weights: Tensor | None = None,
    timesteps: Tensor | None = None,
    **options: Any,
) -> LossOutput:
    """Function form of ``PreferenceLoss``: ``preference_loss("dpo", model_pred, target, ref_pred, beta=5000)``."""
    fn = PreferenceLoss(objective, backend=backend, **options)
    return fn(model_pred, target, ref_pred, embeds_w=embeds_w, embeds_l=embeds_l, weights=weights, timesteps=timesteps)
