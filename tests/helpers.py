"""Test helpers: an independent float64 computation of every objective (loops and plain formulas, written
apart from ``rpo_fast.objectives`` so a mistake there cannot hide here), input factories, and a verbose
``assert_close``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rpo_fast import PreferenceLoss
from rpo_fast.kernels.shared import objective_params
from rpo_fast.loss import resolve_options

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BETA = 100.0  # with the inputs of make_pairs |u| ~ 1: the sigmoid is neither flat nor saturated

# (dtype, atol, rtol) rows. Loss values are fp32 computations of the same (rounded) inputs, so the dtype
# of the inputs only matters for the gradient, which is written in model_pred's dtype.
LOSS_TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-6, 1e-5), torch.float16: (1e-6, 1e-5)}
GRAD_TOL = {torch.float32: (1e-6, 1e-4), torch.bfloat16: (1e-3, 1.6e-2), torch.float16: (1e-4, 2e-3)}


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float) -> None:
    """allclose with a report: mismatch count, first indices, worst errors, RMS ratio, NaN/inf disagreement.
    ``atol`` is scaled by the largest |expected| so it reads as a fraction of the tensor's range."""
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite_a, finite_e = torch.isfinite(actual), torch.isfinite(expected)
    assert torch.equal(finite_a, finite_e), (
        f"{name}: NaN/inf pattern differs ({(~finite_a).sum()} vs {(~finite_e).sum()})"
    )
    scale = expected[finite_e].abs().max().item() if finite_e.any() else 1.0
    tol = atol * max(scale, 1e-30) + rtol * expected.abs()
    err = (actual - expected).abs()
    bad = (err > tol) & finite_e
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        rms = (err.square().mean().sqrt() / expected.square().mean().sqrt().clamp_min(1e-300)).item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off (atol={atol}*{scale:.3g}, rtol={rtol}); "
            f"first at {idx}; max err {err.max().item():.3g}; relative RMS {rms:.3g}; "
            f"actual {actual[bad][:3].tolist()} expected {expected[bad][:3].tolist()}"
        )


def make_pairs(
    b, c=4, h=5, w=7, *, dtype=torch.float32, shared_target=False, ref_noise=0.1, seed=0, channels_last=False
):
    """Fresh random model_pred (2B,C,H,W), target (2B or B rows), ref_pred = model_pred + noise."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(2 * b, c, h, w, generator=g)
    t = torch.randn(b if shared_target else 2 * b, c, h, w, generator=g)
    q = p + ref_noise * torch.randn(2 * b, c, h, w, generator=g)
    out = [x.to(dtype) for x in (p, t, q)]
    if channels_last:
        out = [x.contiguous(memory_format=torch.channels_last) for x in out]
    return out


def make_embeds(b, d=16, *, seed=0):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)


# ------------------------------------------------------------------------------------------------------
# The float64 reference: inputs are upcast, everything is a loop over samples / pairs
# ------------------------------------------------------------------------------------------------------


def ref_errors(p, t, q=None):
    """m, r (None without q) per sample in float64, each from its own loop; delta = m - r (exact enough
    in float64)."""
    rows = p.shape[0]
    t = t if t.shape[0] == rows else torch.cat([t, t])
    m = torch.stack([((p[k].double() - t[k].double()) ** 2).sum() / p[k].numel() for k in range(rows)])
    if q is None:
        return m, None
    r = torch.stack([((q[k].double() - t[k].double()) ** 2).sum() / q[k].numel() for k in range(rows)])
    return m, r


def _nls(x):  # -log sigmoid(x) = softplus(-x)
    return F.softplus(-x)


def ref_loss(objective, p, t, q=None, *, embeds=None, weights=None, timesteps=None, **o):
    """The loss of ``objective`` in float64 from loops; ``p`` may require grad (float64 leaf)."""
    m, r = ref_errors(p, t, q)
    if objective == "sft":
        return m.mean()
    b = m.shape[0] // 2
    delta = m - r
    beta = o.get("beta")
    s = weights.double() if weights is not None else torch.ones(b, dtype=torch.float64)
    if objective == "dpo":
        return sum(_nls(s[i] * (-beta / 2) * (delta[i] - delta[b + i])) for i in range(b)) / b
    if objective == "dense-dpo":
        n, T, gamma = o.get("num_inference_steps", 50), o.get("num_train_timesteps", 1000), o["gamma"]
        total = 0
        for i in range(b):
            k = ((T - 1 - int(timesteps[i])) * n) // T
            total = total + _nls(s[i] * (-beta / 2) * gamma**k * (delta[i] - delta[b + i]))
        return total / b
    if objective == "cal-dpo":
        c = 1 / (2 * o.get("beta_cal", 0.5))
        lam = o.get("lam_cal", 0.5)
        total = 0
        for i in range(b):
            hw, hl = -beta / 2 * delta[i], -beta / 2 * delta[b + i]
            total = total + _nls(s[i] * (hw - hl)) + lam * ((hw - c) ** 2 + (hl + c) ** 2)
        return total / b
    if objective == "rpo":
        ew, el = (e.double() for e in embeds)
        tau, weighting = o.get("tau", 0.5), o.get("weighting", "inside")
        total = 0
        for i in range(b):
            dist = [1 - (ew[i] @ el[j]) / (ew[i].norm() * el[j].norm()) for j in range(b)]
            ex = [math.exp(-d.item() / tau) for d in dist]
            for j in range(b):
                wij = ex[j] / sum(ex)
                dij = -beta / 2 * (delta[i] - delta[b + j])
                total = total + (_nls(wij * dij) / b if weighting == "inside" else wij * _nls(dij))
        return total / b
    if objective == "dspo":
        lam_in, lam_out, form = o["lam_in"], o["lam_out"], o["form"]
        tt = t if t.shape[0] == 2 * b else torch.cat([t, t])
        per, dds = [], []
        for i in range(b):
            u = -lam_in * (delta[i] - delta[b + i])
            si = torch.sigmoid(-u)
            e = p[i].double() - tt[i].double()
            d = p[i].double() - q[i].double()
            if form == "sd15":
                per.append(((e - lam_out * si * d) ** 2).sum() / e.numel())
            else:
                dd = (d**2).sum() / d.numel()
                dds.append(dd.item())
                per.append((si, dd))
        if form == "sd15":
            return sum(per) / b
        if sum(dds) / b >= 0.1:
            return sum(si**2 * dd for si, dd in per) / b
        return sum(si**2 for si, _ in per) / b
    raise ValueError(objective)


def ref_loss_and_grad(objective, p, t, q=None, **kw):
    """float64 loss and d loss / d model_pred."""
    p64 = p.detach().double().requires_grad_(True)
    loss = ref_loss(objective, p64, t.double(), None if q is None else q.double(), **kw)
    (g,) = torch.autograd.grad(loss, p64)
    return loss.detach(), g


# ------------------------------------------------------------------------------------------------------
# Every objective and option, as test cases
# ------------------------------------------------------------------------------------------------------


def _cases():
    # (objective, options, needs)
    yield "dpo", dict(beta=BETA), ()
    yield "dpo", dict(beta=BETA), ("weights",)
    yield "sft", dict(), ()
    yield "rpo", dict(beta=BETA, tau=0.5, weighting="inside", scope="local"), ("embeds",)
    yield "rpo", dict(beta=BETA, tau=0.25, weighting="outside", scope="local"), ("embeds",)
    yield "dspo", dict(form="sd15", beta=BETA, lam_out=1.0), ()
    yield "dspo", dict(form="sdxl", beta=BETA), ()
    yield "dense-dpo", dict(beta=BETA, gamma=0.9), ("timesteps",)
    yield "dense-dpo", dict(beta=BETA, gamma=0.8, num_inference_steps=20), ("timesteps", "weights")
    yield "cal-dpo", dict(beta=BETA), ()
    yield "cal-dpo", dict(beta=BETA, beta_cal=0.25, lam_cal=0.3), ("weights",)


CASES = list(_cases())
CASE_IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


def call_case(objective, opts, needs, b, p, t, q, seed=0, backend="eager"):
    """Module, call kwargs, reference kwargs and inputs (sft keeps the winners only) of one case."""
    kw, ref_kw = {}, {}
    if "embeds" in needs:
        kw["embeds_w"], kw["embeds_l"] = make_embeds(b, seed=seed)
        ref_kw["embeds"] = (kw["embeds_w"], kw["embeds_l"])
    if "weights" in needs:
        kw["weights"] = ref_kw["weights"] = torch.rand(b, generator=torch.Generator().manual_seed(seed)) + 0.5
    if "timesteps" in needs:
        kw["timesteps"] = ref_kw["timesteps"] = torch.randint(
            0, 1000, (b,), generator=torch.Generator().manual_seed(seed)
        )
    loss_fn = PreferenceLoss(objective, backend=backend, **opts)
    if objective == "sft":
        p, t, q = p[:b], (t[:b] if t.shape[0] == 2 * b else t), None
    return loss_fn, kw, ref_kw, p, t, q


def run_loss(loss_fn, p, t, q, kw, grad_out=1.7):
    """(the loss's output, dL/dp) of one call on a fresh leaf copy of p, with the upstream gradient grad_out."""
    p = p.clone().requires_grad_(True)
    out = loss_fn(p, t, q, **kw)
    (out.loss * grad_out).backward()
    return out, p.grad


def layouts(p, t, q):
    """(name, p, t, q) in the layouts a fused backend must pair correctly or copy: channels_last, mixed, strided,
    transposed (the values unchanged)."""
    cl = torch.channels_last
    yield (
        "channels_last",
        p.contiguous(memory_format=cl),
        t.contiguous(memory_format=cl),
        q.contiguous(memory_format=cl),
    )
    yield "mixed", p.contiguous(memory_format=cl), t, q.contiguous(memory_format=cl)
    yield "mixed2", p, t.contiguous(memory_format=cl), q
    big = torch.randn(p.shape[0], p.shape[1], p.shape[2], p.shape[3] + 3, dtype=p.dtype, device=p.device)
    big[..., 1:-2] = p
    yield "strided", big[..., 1:-2], t, q
    yield (
        "transposed",
        p.transpose(2, 3).contiguous().transpose(2, 3),
        t,
        q.transpose(2, 3).contiguous().transpose(2, 3),
    )


def op_args(objective, device, b=2):
    """The fused op's arguments for ``objective`` on small random inputs (``LossInputs`` order, then the objective,
    its parameters and the world size)."""
    p, t, q = (x.to(device) for x in make_pairs(b, 2, 3, 3, seed=46))
    ew, el = (e.to(device) for e in make_embeds(b))
    opts = {"sft": {}, "rpo": dict(beta=BETA, tau=0.5, weighting="inside")}.get(objective, dict(beta=BETA))
    if objective == "sft":
        p, t, q = p[:b], t[:b], None
    return (
        p,
        t,
        q,
        ew if objective == "rpo" else None,
        el if objective == "rpo" else None,
        torch.rand(b, device=device) + 0.5 if objective == "cal-dpo" else None,
        torch.randint(0, 1000, (b,), device=device) if objective == "dense-dpo" else None,
        objective,
        objective_params(objective, resolve_options(objective, opts)),
        1,
    )
