"""``PreferenceLoss``: one module for every objective, validated once, dispatched to a backend.

The call chain is PreferenceLoss -> backend (eager functions in ``objectives``, the Triton custom op in
``rpo_fast.kernels.preference_loss`` or the C++/CUDA one in ``rpo_fast.kernels.native``) -> kernels. Nothing
here imports deepspeed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import objectives as O
from .objectives import OBJECTIVE_TABLE, LossInputs, LossOutput, Objective, objective

BACKENDS = ("auto", "eager", "compile", "triton", "native")


def resolve_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """Check an objective's options and fill in the defaults (``OBJECTIVE_TABLE``)."""
    return objective(name).resolve(options)


def _floating(name: str, x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def validate_inputs(spec: Objective, x: LossInputs, ref_errors: Tensor | None = None) -> None:
    """Raise ``ValueError`` naming the problem; never broadcast silently. Costs no device sync. ``ref_errors``: the
    reference's per-sample errors given in place of ``x.ref_pred`` (a precomputed table)."""
    name, model_pred, target, ref_pred = spec.name, x.model_pred, x.target, x.ref_pred
    _floating("model_pred", model_pred)
    _floating("target", target)
    if spec.online:
        return validate_group_inputs(spec, x, ref_errors)
    for key in ("rewards", "log_ratio_scale"):
        if getattr(x, key) is not None:
            online = [k for k, o in OBJECTIVE_TABLE.items() if o.online]
            raise ValueError(f"{key} applies to the online objectives ({_names(online)}) only, not {name!r}")
    if model_pred.dim() < 2:
        raise ValueError(f"model_pred must be (rows, C, H, W) or at least 2-D, got shape {tuple(model_pred.shape)}")
    rows, tail = model_pred.shape[0], tuple(model_pred.shape[1:])
    if rows == 0 or model_pred.numel() == 0:
        raise ValueError(f"model_pred is empty (shape {tuple(model_pred.shape)})")
    tensors = {"model_pred": model_pred, "target": target}
    layout = spec.layout
    b = layout.units(rows)
    if b is None:
        odd = (
            "an odd first dimension"
            if layout.per_unit == 2
            else f"a first dimension not a multiple of {layout.per_unit}"
        )
        raise ValueError(f"{name}: model_pred has {odd} ({rows}); it must hold {layout.description}")
    if not spec.reference:
        if ref_pred is not None or ref_errors is not None:
            raise ValueError(f"objective {name!r} uses no reference model: pass ref_pred=None")
    elif ref_errors is not None:
        if ref_pred is not None:
            raise ValueError("pass ref_pred or ref_errors, not both")
        if spec.score_terms:
            raise ValueError(
                f"{name} reads the reference's prediction itself (its loss has a term in p - q), not only its "
                "per-sample errors: it cannot train from ref_errors (a precomputed reference table)"
            )
        _floating("ref_errors", ref_errors)
        if tuple(ref_errors.shape) != (rows,):
            raise ValueError(f"ref_errors must be (rows,) = ({rows},), got shape {tuple(ref_errors.shape)}")
        tensors["ref_errors"] = ref_errors
    else:
        if ref_pred is None:
            raise ValueError(f"{name} needs ref_pred, the frozen reference model's prediction")
        _floating("ref_pred", ref_pred)
        if tuple(ref_pred.shape) != tuple(model_pred.shape):
            raise ValueError(
                f"ref_pred shape {tuple(ref_pred.shape)} must equal model_pred shape {tuple(model_pred.shape)}"
            )
        tensors["ref_pred"] = ref_pred
    if layout.per_unit == 1 and tuple(target.shape) != tuple(model_pred.shape):
        raise ValueError(
            f"{name}: target shape {tuple(target.shape)} must equal model_pred shape {tuple(model_pred.shape)} "
            f"({layout.description})"
        )
    if tuple(target.shape) not in ((rows, *tail), (b, *tail)):
        raise ValueError(
            f"target shape {tuple(target.shape)} must be {(rows, *tail)} (per sample) or {(b, *tail)} "
            "(shared by the rows of a unit, epsilon-prediction only)"
        )
    embedders = [k for k, o in OBJECTIVE_TABLE.items() if o.embeddings]
    if spec.embeddings:
        if x.embeds_w is None or x.embeds_l is None:
            raise ValueError(f"{name} needs embeds_w (B, D) for the winners (rows) and embeds_l (B, D) for the losers")
        for key in ("embeds_w", "embeds_l"):
            e = getattr(x, key)
            _floating(key, e)
            if e.dim() != 2 or e.shape[0] != b:
                raise ValueError(f"{key} must be (B, D) = ({b}, D), got shape {tuple(e.shape)}")
            tensors[key] = e
        if x.embeds_w.shape[1] != x.embeds_l.shape[1]:
            raise ValueError(f"embeds_w and embeds_l differ in width: {x.embeds_w.shape[1]} vs {x.embeds_l.shape[1]}")
    elif x.embeds_w is not None or x.embeds_l is not None:
        raise ValueError(f"embeds_w / embeds_l apply to objective {_names(embedders)} only, not {name!r}")
    if spec.timesteps:
        t = x.timesteps
        if t is None:
            raise ValueError(f"{name} needs timesteps (B,), the timestep of each pair")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"timesteps must be an integer tensor, got dtype {t.dtype}")
        if tuple(t.shape) != (b,):
            raise ValueError(f"timesteps must be (B,) = ({b},), got shape {tuple(t.shape)}")
        tensors["timesteps"] = t
    elif x.timesteps is not None:
        timed = [k for k, o in OBJECTIVE_TABLE.items() if o.timesteps]
        raise ValueError(f"timesteps apply to objective {_names(timed)} only, not {name!r}")
    if x.weights is not None:
        if not spec.weights:
            weighted = tuple(k for k, o in OBJECTIVE_TABLE.items() if o.weights)
            raise ValueError(f"per-pair weights apply to {weighted} only, not {name!r}")
        _floating("weights", x.weights)
        if tuple(x.weights.shape) != (b,):
            raise ValueError(f"weights must be (B,) = ({b},), got shape {tuple(x.weights.shape)}")
        tensors["weights"] = x.weights
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"inputs are on different devices: { {k: str(t.device) for k, t in tensors.items()} }")


def validate_group_inputs(spec: Objective, x: LossInputs, ref_errors: Tensor | None = None) -> None:
    """The group layout's checks (``objectives.GROUPS``): rows = S G K step-major, ``rewards`` (G, K) with K >= 2,
    ``log_ratio_scale`` (rows,), target and ref_pred of model_pred's shape, online-rpo's embeddings (G, D)."""
    name, p = spec.name, x.model_pred
    if p.dim() < 2 or p.numel() == 0:
        raise ValueError(f"model_pred must be (rows, ...) with elements, got shape {tuple(p.shape)}")
    if ref_errors is not None:
        raise ValueError(
            f"{name} trains online against a live reference: ref_errors (a precomputed table) cannot serve"
        )
    if x.ref_pred is None:
        raise ValueError(f"{name} needs ref_pred, the frozen reference model's prediction")
    tensors = {"model_pred": p, "target": x.target, "ref_pred": x.ref_pred}
    for key in ("target", "ref_pred"):
        _floating(key, tensors[key])
        if tuple(tensors[key].shape) != tuple(p.shape):
            raise ValueError(f"{key} shape {tuple(tensors[key].shape)} must equal model_pred shape {tuple(p.shape)}")
    r = x.rewards
    if r is None:
        raise ValueError(f"{name} needs rewards (G, K): the reward of each of K samples of G prompts")
    _floating("rewards", r)
    if r.dim() != 2 or r.shape[1] < 2 or r.shape[0] < 1:
        raise ValueError(f"rewards must be (G, K) with K >= 2 samples per prompt, got shape {tuple(r.shape)}")
    rows, gk = p.shape[0], r.numel()
    if rows % gk:
        raise ValueError(
            f"{name}: model_pred has {rows} rows, not a multiple of G K = {gk}; it must hold {spec.layout.description}"
        )
    c = x.log_ratio_scale
    if c is None:
        raise ValueError(f"{name} needs log_ratio_scale (rows,): each row's c = b^2 / (2 sigma^2) of its step")
    _floating("log_ratio_scale", c)
    if tuple(c.shape) != (rows,):
        raise ValueError(f"log_ratio_scale must be (rows,) = ({rows},), got shape {tuple(c.shape)}")
    tensors.update(rewards=r, log_ratio_scale=c)
    if spec.embeddings:
        g = r.shape[0]
        for key in ("embeds_w", "embeds_l"):
            e = getattr(x, key)
            if e is None:
                raise ValueError(f"{name} needs embeds_w and embeds_l (G, D): each prompt's best and worst image")
            _floating(key, e)
            if e.dim() != 2 or e.shape[0] != g:
                raise ValueError(f"{key} must be (G, D) = ({g}, D), got shape {tuple(e.shape)}")
            tensors[key] = e
    elif x.embeds_w is not None or x.embeds_l is not None:
        raise ValueError(f"embeds_w / embeds_l do not apply to {name!r}")
    for key in ("weights", "timesteps"):
        if getattr(x, key) is not None:
            raise ValueError(f"{key} do not apply to the online objective {name!r}")
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) > 1:
        raise ValueError(f"inputs are on different devices: { {k: str(t.device) for k, t in tensors.items()} }")


def _names(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


def eager_loss(name: str, opts: dict[str, Any], *args: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    """The eager backend on validated inputs (``LossInputs`` order) and resolved options: (loss, metrics)."""
    x = LossInputs(*args)
    # Upcast once: two casts of model_pred would each round their part of the gradient to its dtype
    # before autograd adds them (DSPO reads model_pred twice).
    x = x._replace(model_pred=x.model_pred.to(O.acc_dtype(x.model_pred, x.target, x.ref_pred)))
    err = O.per_sample_errors(x.model_pred, x.target, x.ref_pred)
    out = OBJECTIVE_TABLE[name].eager(err, x, opts)
    return out.loss, out.metrics


def eager_loss_from_errors(
    name: str, opts: dict[str, Any], x: LossInputs, ref_errors: Tensor
) -> tuple[Tensor, dict[str, Tensor]]:
    """The eager loss with the reference's per-sample errors r_k given (a precomputed table) instead of its
    prediction: m_k = mean_N (p_k - t_k)^2 accumulated in float64 and delta_k = m_k - r_k in float64 (r is stored in
    float64), so the subtraction loses no digits the live path's one-expression delta keeps (m and r are about 1, the
    logit scales delta by beta / 2). The loss and metrics are returned in float32, as every backend's."""
    m = O.per_sample_errors(x.model_pred.double(), x.target.double()).m
    r = ref_errors.detach().double()
    out = OBJECTIVE_TABLE[name].eager(O.SampleErrors(m, r, m - r), x, opts)
    return out.loss.float(), {k: v.float() for k, v in out.metrics.items()}


class PreferenceLoss(nn.Module):
    """A preference objective for diffusion UNets, as one module.

    Args:
        objective: "dpo" | "sft" | "rpo" | "dspo" | "dense-dpo" | "cal-dpo", or online (the group layout, below):
            "dense-reward" | "online-dpo" | "online-rpo".
        backend: "auto" (Triton for CUDA tensors, eager otherwise; compile on CUDA for an objective the table
            declares without a fused kernel) | "eager" | "compile" (torch.compile of
            the eager code, static shapes; past Dynamo's recompile_limit of shapes and objectives in one
            process it runs eagerly) | "triton" (the fused kernels; on CPU only under ``TRITON_INTERPRET=1``) |
            "native" (the same fused algorithm in C++ for CPU and CUDA C++ for GPUs, from csrc/, built on first use).
        **options: the objective's options (defaults in ``OPTIONS``):
            dpo: beta=5000. rpo: beta=5000, tau=0.5, weighting="inside"|"outside",
            scope="global"|"local" (global all-gathers pairs across the default process group; the same as
            local where the world size is 1). dspo: form="sd15"|"sdxl", beta (0.001 for sd15, 5000 for
            sdxl), lam_in=beta/2, lam_out=beta. dense-dpo: beta=5000, gamma=0.9, num_inference_steps=50,
            num_train_timesteps=1000, timestep_sampling="uniform" (w(t) weights the logit) | "discounted" (the
            caller draws t ~ w(t), ``objectives.discounted_timestep_probs``; no weight in the loss). cal-dpo:
            beta=5000, beta_cal=0.5, lam_cal=0.5. sft: none. dense-reward: temperature=10, log_ratio_clip=1e-4.
            online-dpo: beta=10, log_ratio_clip=1e-4. online-rpo: beta=10, log_ratio_clip=1e-4, tau=0.5,
            weighting="inside"|"outside".

    Shape:
        model_pred, ref_pred: (2B, C, H, W), winners first then losers (sft: (B, C, H, W), winners only, and
            no ref_pred). target: (2B, C, H, W), or (B, C, H, W) shared by winner and loser, which is right
            only for epsilon-prediction (a v-prediction target depends on x_0). Keyword inputs: rpo needs
            ``embeds_w`` (B, D) (rows: winners) and ``embeds_l`` (B, D) (columns: losers); dense-dpo needs
            ``timesteps`` (B,) integers; dpo, dense-dpo and cal-dpo take optional ``weights`` (B,).
            ``ref_errors`` (2B,): the reference's per-sample errors r_k = mean (q_k - t_k)^2 in place of ref_pred
            (a precomputed table, ``python -m rpo_fast.reference``); the loss then runs eagerly from m - r in
            float64, whatever the backend (every objective but dspo, which reads q itself).
        Online objectives (``objectives.GROUPS``): model_pred, ref_pred and target (R, ...) hold the S G K rows of K
            samples of G prompts at S sampled steps, step-major (row s G K + g K + k); target is each row's
            e* = (x_(k+1) - a x_k) / b; ``log_ratio_scale`` (R,) its c = b^2 / (2 sigma^2) (``rollout.Transitions``);
            ``rewards`` (G, K); online-rpo's ``embeds_w`` / ``embeds_l`` (G, D) embed each prompt's best and worst
            image. The error pass runs on the backend (``sample_errors``), the combination eagerly.
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
        self.spec = O.objective(objective)
        self.objective = objective
        self.options = self.spec.resolve(options)
        self.backend = O.one_of(*BACKENDS)("backend", backend)
        if self.backend in ("triton", "native") and not (self.spec.fused or self.spec.online):
            eager_only = [k for k, o in OBJECTIVE_TABLE.items() if not o.fused]
            raise ValueError(
                f"backend={backend!r}: objective {objective!r} has no fused kernel (objectives without one: "
                f"{_names(eager_only)}); use 'auto', 'eager' or 'compile'"
            )
        self._compiled = None

    def backend_for(self, device: torch.device | str) -> str:
        """The backend a call on ``device`` runs: ``auto`` is Triton on CUDA (compile for an objective without a
        fused kernel) and eager elsewhere."""
        if self.backend != "auto":
            return self.backend
        if torch.device(device).type == "cuda" and _triton_available():
            return "triton" if self.spec.fused or self.spec.online else "compile"
        return "eager"

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
        ref_errors: Tensor | None = None,
        rewards: Tensor | None = None,
        log_ratio_scale: Tensor | None = None,
    ) -> LossOutput:
        x = LossInputs(model_pred, target, ref_pred, embeds_w, embeds_l, weights, timesteps, rewards, log_ratio_scale)
        validate_inputs(self.spec, x, ref_errors)
        backend = self.backend_for(model_pred.device)
        args = x[: O.PAIR_INPUTS]
        if self.spec.online:  # the error pass on the backend, the combination eagerly
            err = sample_errors(model_pred, target, ref_pred, backend=backend)
            return self.spec.eager(err, x, self.options)
        if ref_errors is not None:
            loss, metrics = eager_loss_from_errors(self.objective, self.options, x, ref_errors)
        elif backend == "triton":
            from .kernels import fused_preference_loss

            try:
                loss, metrics = fused_preference_loss(self.objective, self.options, *args)
            except RuntimeError as e:  # Triton's own words: "0 active drivers ([]). There should only be one."
                if "active drivers" not in str(e):
                    raise
                raise ValueError(
                    f"backend='triton' found no GPU driver for tensors on {model_pred.device}. On a CPU use "
                    "backend='native' (fused C++), 'eager' or 'auto' (eager off CUDA), or set TRITON_INTERPRET=1 "
                    "before triton is imported to run the kernels in Triton's interpreter (slow; for tests)"
                ) from e
        elif backend == "native":
            from .kernels.native import fused_preference_loss

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


def sample_errors(
    model_pred: Tensor, target: Tensor, ref_pred: Tensor | None = None, *, backend: str = "auto"
) -> O.SampleErrors:
    """The error pass alone, with autograd, on any backend: per sample k over its N elements

        m_k = mean_N (p_k - t_k)^2,   r_k = mean_N (q_k - t_k)^2,   delta_k = mean_N (p_k - q_k)(p_k + q_k - 2 t_k)

    in fp32 (float64 for float64 inputs on the eager backends), with dL/dp_k = (g^m_k + g^delta_k) (2/N)(p_k - t_k).
    The online objectives scale, clip and combine delta per sample on top of it (a Gaussian step's log-ratio is
    -c_k delta_k). ``backend``: as ``PreferenceLoss`` ("auto": the Triton op on CUDA, eager elsewhere; "native": the
    C++/CUDA op). model_pred, target and ref_pred are (R, ...) of one shape.

    Returns ``SampleErrors(m, r, delta)``; ``r`` and ``delta`` are None without ``ref_pred``.
    """
    backend = O.one_of(*BACKENDS)("backend", backend)
    _floating("model_pred", model_pred)
    _floating("target", target)
    tensors = {"model_pred": model_pred, "target": target}
    if ref_pred is not None:
        _floating("ref_pred", ref_pred)
        tensors["ref_pred"] = ref_pred
    if model_pred.dim() < 2 or model_pred.numel() == 0:
        raise ValueError(
            f"model_pred must be (rows, ...) with at least 2 dims and elements, got {tuple(model_pred.shape)}"
        )
    for key, x in tensors.items():
        if tuple(x.shape) != tuple(model_pred.shape):
            raise ValueError(f"{key} shape {tuple(x.shape)} must equal model_pred shape {tuple(model_pred.shape)}")
    if len({str(x.device) for x in tensors.values()}) > 1:
        raise ValueError(f"inputs are on different devices: { {k: str(t.device) for k, t in tensors.items()} }")
    if backend == "auto":
        backend = "triton" if model_pred.device.type == "cuda" and _triton_available() else "eager"
    target = target.detach()
    ref_pred = None if ref_pred is None else ref_pred.detach()
    if backend in ("eager", "compile"):
        fn = O.per_sample_errors if backend == "eager" else _compiled_errors()
        return fn(model_pred, target, ref_pred)
    if backend == "triton":
        from .kernels import sample_errors_op as op
    else:
        from .kernels.native import sample_errors_native_op as op
    m, r, delta = op(model_pred, target, ref_pred)
    return O.SampleErrors(m, None, None) if ref_pred is None else O.SampleErrors(m, r, delta)


_COMPILED_ERRORS = None


def _compiled_errors():
    global _COMPILED_ERRORS
    if _COMPILED_ERRORS is None:
        _COMPILED_ERRORS = torch.compile(O.per_sample_errors, dynamic=False)
    return _COMPILED_ERRORS


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
