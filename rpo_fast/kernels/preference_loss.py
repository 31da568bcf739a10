"""Fused Triton kernels for every objective of ``rpo_fast.objectives``, as one ``torch.library`` custom op.

Every objective is a function of per-sample fp32 scalars from ONE pass over model_pred p, ref_pred q and
target t (spec section 7). With N = C*H*W, e = p - t, d = p - q:

    m = sum(e^2)/N,  r = sum((q - t)^2)/N,  delta = sum(d * (p + q - 2t))/N,  ed = sum(e*d)/N,  dd = sum(d^2)/N

and the gradient with respect to p is elementwise with two scalars per sample:

    dL/dp_k = ge_k * (p_k - t_k) + gd_k * (p_k - q_k)        (gd = 0 except for DSPO's winners)

Launches (forward + backward): ``_errors_fwd_kernel`` (grid: target rows x chunks; partial sums, no atomics)
-> ``_pair_kernel`` (one program: reduces the partials in a fixed order, computes the loss, the metrics and
ge/gd; RPO: ``_rpo_row_kernel`` + ``_rpo_col_kernel`` instead) -> backward ``_errors_bwd_kernel`` (one
elementwise pass that multiplies by grad_output). 3 launches, 4 for RPO. The same input gives the same
bits: every reduction runs in a fixed order. When the target is shared by winner and loser (B rows), one
program handles both rows of a pair and reads the target once.

Nothing of size C*H*W is saved for backward beyond the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import shared
from .shared import (
    METRIC_NAMES,
    K,
    define_errors_op,
    define_fused_op,
    fused_loss,
    objective_params,
    pair_scalars,
    same_layout,
)

__all__ = [
    "METRIC_NAMES",
    "errors_bwd",
    "errors_fwd",
    "fused_preference_loss",
    "objective_params",
    "pair_fwd",
    "sample_errors_op",
]

K_PARTS = tl.constexpr(K)  # partial sums per sample and chunk, as the kernels may read a global (constexpr only)
# The objective ids the kernels branch on (OBJ), as globals a kernel may read (constexpr only): shared's numbering,
# which csrc's enum Objective repeats (a test holds the two equal)
_SFT, _DSPO, _DENSE, _CAL = (tl.constexpr(i) for i in (shared.SFT, shared.DSPO, shared.DENSE, shared.CAL))


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _softplus(x):
    """log(1 + exp(x)), stable for any x (log1p written out for small arguments)."""
    z = tl.exp(-tl.abs(x))
    return tl.maximum(x, 0.0) + tl.where(z < 1e-4, z - 0.5 * z * z, tl.log(1.0 + z))


@triton.jit
def _accumulate(P, Q, offs, mask, t, m, r, dl, ed, dd, HAS_REF: tl.constexpr, DSPO: tl.constexpr):
    # m += e^2; r += (q - t)^2; dl += (p - q)(p + q - 2t); ed += e (p - q); dd += (p - q)^2
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    e = p - t
    m += e * e
    if HAS_REF:
        q = tl.load(Q + offs, mask=mask, other=0.0).to(tl.float32)
        f = q - t
        r += f * f
        d = p - q
        dl += d * (p + q - 2.0 * t)
        if DSPO:
            ed += e * d
            dd += d * d
    return m, r, dl, ed, dd


@triton.jit
def _store_partials(OUT, m, r, dl, ed, dd):
    tl.store(OUT + 0, tl.sum(m, axis=0))
    tl.store(OUT + 1, tl.sum(r, axis=0))
    tl.store(OUT + 2, tl.sum(dl, axis=0))
    tl.store(OUT + 3, tl.sum(ed, axis=0))
    tl.store(OUT + 4, tl.sum(dd, axis=0))


@triton.jit
def _errors_fwd_kernel(
    P,  # [R, N] model_pred (any float dtype; rows N apart)
    T,  # [T_ROWS, N] target: R rows, or R/2 shared by rows i and i + R/2 (SHARED)
    Q,  # [R, N] ref_pred (read only if HAS_REF)
    PART,  # [R, CHUNKS, 5] fp32 out: chunk partial sums of m, r, delta, <e,d>, |d|^2
    N,
    CHUNK,  # elements per program, a multiple of BLOCK
    T_ROWS,
    CHUNKS,
    HAS_REF: tl.constexpr,
    DSPO: tl.constexpr,
    SHARED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tr = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    start = c * CHUNK
    base = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.float32)
    m0, r0, d0, e0, s0 = zero, zero, zero, zero, zero
    m1, r1, d1, e1, s1 = zero, zero, zero, zero, zero
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + base
        mask = idx < N
        t = tl.load(T + tr * N + idx, mask=mask, other=0.0).to(tl.float32)
        m0, r0, d0, e0, s0 = _accumulate(P, Q, tr * N + idx, mask, t, m0, r0, d0, e0, s0, HAS_REF, DSPO)
        if SHARED:
            m1, r1, d1, e1, s1 = _accumulate(P, Q, (tr + T_ROWS) * N + idx, mask, t, m1, r1, d1, e1, s1, HAS_REF, DSPO)
    _store_partials(PART + (tr * CHUNKS + c) * K_PARTS, m0, r0, d0, e0, s0)
    if SHARED:
        _store_partials(PART + ((tr + T_ROWS) * CHUNKS + c) * K_PARTS, m1, r1, d1, e1, s1)


@triton.jit
def _errors_bwd_kernel(
    GO,  # [] upstream gradient of the loss
    P,  # [R, N] model_pred
    T,  # [T_ROWS, N] target
    Q,  # [R, N] ref_pred (read only if HAS_D)
    GE,  # [R] fp32 coefficient of (p - t)
    GD,  # [R] fp32 coefficient of (p - q)
    OUT,  # [R, N] gradient, model_pred's dtype
    N,
    T_ROWS,
    HAS_D: tl.constexpr,
    SHARED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # dL/dp = go * (ge * (p - t) + gd * (p - q))
    tr = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    go = tl.load(GO).to(tl.float32)
    t = tl.load(T + tr * N + idx, mask=mask, other=0.0).to(tl.float32)
    _grad_row(P, Q, GE, GD, OUT, tr, tr * N + idx, mask, t, go, HAS_D)
    if SHARED:
        _grad_row(P, Q, GE, GD, OUT, tr + T_ROWS, (tr + T_ROWS) * N + idx, mask, t, go, HAS_D)


@triton.jit
def _grad_row(P, Q, GE, GD, OUT, row, offs, mask, t, go, HAS_D: tl.constexpr):
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GE + row) * (p - t)
    if HAS_D:
        q = tl.load(Q + offs, mask=mask, other=0.0).to(tl.float32)
        g += tl.load(GD + row) * (p - q)
    tl.store(OUT + offs, (go * g).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _stats(PART, rows, mask, CHUNKS, inv_n):
    """Per-sample m, r, delta, <e,d>/N, |d|^2/N of ``rows``, reducing the chunk partials in order."""
    m = tl.zeros(rows.shape, dtype=tl.float32)
    r, dl, ed, dd = m, m, m, m
    for c in range(0, CHUNKS):
        base = PART + (rows * CHUNKS + c) * K_PARTS
        m += tl.load(base + 0, mask=mask, other=0.0)
        r += tl.load(base + 1, mask=mask, other=0.0)
        dl += tl.load(base + 2, mask=mask, other=0.0)
        ed += tl.load(base + 3, mask=mask, other=0.0)
        dd += tl.load(base + 4, mask=mask, other=0.0)
    return m * inv_n, r * inv_n, dl * inv_n, ed * inv_n, dd * inv_n


@triton.jit
def _pair_sums(mask, u, hw, hl, mw, ml, rw, rl, s_acc, s_u, s_hw, s_hl, s_mw, s_ml, s_rw, s_rl):
    """Running per-lane sums of the pair metrics over valid pairs (implicit accuracy counts ties half)."""
    s_acc += tl.where(mask, tl.where(u > 0, 1.0, tl.where(u == 0, 0.5, 0.0)), 0.0)
    s_u += tl.where(mask, u, 0.0)
    s_hw += tl.where(mask, hw, 0.0)
    s_hl += tl.where(mask, hl, 0.0)
    s_mw += tl.where(mask, mw, 0.0)
    s_ml += tl.where(mask, ml, 0.0)
    s_rw += tl.where(mask, rw, 0.0)
    s_rl += tl.where(mask, rl, 0.0)
    return s_acc, s_u, s_hw, s_hl, s_mw, s_ml, s_rw, s_rl


@triton.jit
def _store_metrics(MET, LOSS, inv_b, loss, s_acc, s_u, s_hw, s_hl, s_mw, s_ml, s_rw, s_rl, s_wd):
    # loss: already the mean; s_*: per-lane sums over the B pairs, reduced here (in a fixed order)
    tl.store(LOSS, loss)
    tl.store(MET + 0, loss)
    tl.store(MET + 1, tl.sum(s_acc, axis=0) * inv_b)
    tl.store(MET + 2, tl.sum(s_u, axis=0) * inv_b)
    tl.store(MET + 3, tl.sum(s_hw, axis=0) * inv_b)
    tl.store(MET + 4, tl.sum(s_hl, axis=0) * inv_b)
    tl.store(MET + 5, tl.sum(s_mw, axis=0) * inv_b)
    tl.store(MET + 6, tl.sum(s_ml, axis=0) * inv_b)
    tl.store(MET + 7, tl.sum(s_rw, axis=0) * inv_b)
    tl.store(MET + 8, tl.sum(s_rl, axis=0) * inv_b)
    tl.store(MET + 9, tl.sum(s_wd, axis=0) * inv_b)


@triton.jit
def _pair_kernel(
    PART,  # [R, CHUNKS, 5] partial sums
    W,  # [B] per-pair weights (HAS_W)
    TS,  # [B] int timesteps (dense-dpo)
    GE,  # [R] out: coefficient of (p - t) in dL/dp
    GD,  # [R] out: coefficient of (p - q) in dL/dp
    LOSS,  # [] out
    MET,  # [10] out: METRIC_NAMES
    B,  # pairs (sft: winners)
    N,
    CHUNKS,
    a0,  # dpo/dense/cal: beta / 2; dspo: lam_in
    a1,  # dense: log2(gamma); cal: c = 1/(2 beta_cal); dspo: lam_out
    a2,  # cal: lam_cal
    NSTEPS,  # dense: num_inference_steps
    TTRAIN,  # dense: num_train_timesteps
    OBJ: tl.constexpr,
    HAS_W: tl.constexpr,
    SDXL: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    inv_n = 1.0 / N
    two_n = 2.0 / N
    inv_b = 1.0 / B
    ar = tl.arange(0, BLOCK_B)
    zero = tl.zeros([BLOCK_B], dtype=tl.float32)
    big = tl.sum(zero, axis=0) > 0.0  # DSPO sdxl switches on the batch mean of |d^w|^2 / N
    if SDXL:  # (only set for DSPO)
        acc_dd = zero
        for i0 in range(0, B, BLOCK_B):
            iw = (i0 + ar).to(tl.int64)
            ddw = _stats(PART, iw, iw < B, CHUNKS, inv_n)[4]
            acc_dd += tl.where(iw < B, ddw, 0.0)
        big = tl.sum(acc_dd, axis=0) * inv_b >= 0.1
    s_loss, s_acc, s_u, s_hw, s_hl = zero, zero, zero, zero, zero
    s_mw, s_ml, s_rw, s_rl = zero, zero, zero, zero
    for i0 in range(0, B, BLOCK_B):
        iw = (i0 + ar).to(tl.int64)
        mask = iw < B
        mw, rw, dw, edw, ddw = _stats(PART, iw, mask, CHUNKS, inv_n)
        if OBJ == _SFT:  # sft: L = mean m^w, dL/dp = (2 / N B) (p - t)
            s_loss += tl.where(mask, mw, 0.0)
            s_mw += tl.where(mask, mw, 0.0)
            tl.store(GE + iw, zero + two_n * inv_b, mask=mask)
            tl.store(GD + iw, zero, mask=mask)
        else:
            il = iw + B
            ml, rl, dl = _stats(PART, il, mask, CHUNKS, inv_n)[:3]
            scale = zero + a0  # h = -scale * delta
            if OBJ == _DENSE:  # dense-dpo: w(t) = gamma ** (((T - 1 - t) * N_steps) // T)
                t = tl.load(TS + iw, mask=mask, other=0).to(tl.int64)
                k = ((TTRAIN - 1 - t) * NSTEPS) // TTRAIN
                scale = scale * tl.exp2(k.to(tl.float32) * a1)
            hw = -scale * dw
            hl = -scale * dl
            u = hw - hl
            sw = zero + 1.0
            if HAS_W:
                sw = tl.load(W + iw, mask=mask, other=0.0).to(tl.float32)
                u = sw * u
            gdw = zero  # dL/d delta^w (times B)
            gdl = zero
            gd_w = zero  # coefficient of (p - q) for the winner, before 2/N
            ge_w = zero  # extra coefficient of (p - t) for the winner, before 2/N
            if OBJ == _DSPO:  # DSPO
                sg = tl.sigmoid(-u)
                dsg_du = -sg * (1.0 - sg)
                if SDXL:
                    li = tl.where(big, sg * sg * ddw, sg * sg)
                    dli_du = tl.where(big, 2.0 * sg * ddw, 2.0 * sg) * dsg_du
                    gd_w = tl.where(big, sg * sg, 0.0)
                else:
                    a = a1 * sg
                    li = mw - 2.0 * a * edw + a * a * ddw
                    dli_du = (-2.0 * edw + 2.0 * a * ddw) * a1 * dsg_du
                    ge_w = 1.0 - a
                    gd_w = a * a - a
                gdw = dli_du * -scale
                gdl = dli_du * scale
            else:
                li = _softplus(-u)
                dli_du0 = -tl.sigmoid(-u) * sw  # d/d(h^w - h^l) of -log sigmoid(s u)
                ghw = dli_du0
                ghl = -dli_du0
                if OBJ == _CAL:  # cal-dpo: + lam ((h^w - c)^2 + (h^l + c)^2)
                    li += a2 * ((hw - a1) * (hw - a1) + (hl + a1) * (hl + a1))
                    ghw += 2.0 * a2 * (hw - a1)
                    ghl += 2.0 * a2 * (hl + a1)
                gdw = ghw * -scale
                gdl = ghl * -scale
            tl.store(GE + iw, two_n * inv_b * (ge_w + gdw), mask=mask)
            tl.store(GD + iw, two_n * inv_b * gd_w, mask=mask)
            tl.store(GE + il, two_n * inv_b * gdl, mask=mask)
            tl.store(GD + il, zero, mask=mask)
            s_loss += tl.where(mask, li, 0.0)
            s_acc, s_u, s_hw, s_hl, s_mw, s_ml, s_rw, s_rl = _pair_sums(
                mask, u, hw, hl, mw, ml, rw, rl, s_acc, s_u, s_hw, s_hl, s_mw, s_ml, s_rw, s_rl
            )
    _store_metrics(
        MET, LOSS, inv_b, tl.sum(s_loss, axis=0) * inv_b, s_acc, s_u, s_hw, s_hl, s_mw, s_ml, s_rw, s_rl, zero
    )


@triton.jit
def _cosine_tile(EW, EL, rows, cols, B, D, inv_nw, BLOCK_D: tl.constexpr):
    """cos(e^w_i, e^l_j) for a (rows x cols) tile, tiled over D; F.normalize's eps of 1e-12."""
    dot = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    nl = tl.zeros([cols.shape[0]], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(EW + rows[:, None] * D + dk[None, :], mask=(rows[:, None] < B) & (dk[None, :] < D), other=0.0)
        c = tl.load(EL + cols[:, None] * D + dk[None, :], mask=(cols[:, None] < B) & (dk[None, :] < D), other=0.0)
        a = a.to(tl.float32)
        c = c.to(tl.float32)
        dot += tl.dot(a, tl.trans(c), input_precision="ieee")
        nl += tl.sum(c * c, axis=1)
    inv_nl = 1.0 / tl.maximum(tl.sqrt(nl), 1e-12)
    return dot * inv_nw[:, None] * inv_nl[None, :]


@triton.jit
def _row_inv_norm(EW, rows, B, D, BLOCK_D: tl.constexpr):
    nw = tl.zeros([rows.shape[0]], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(EW + rows[:, None] * D + dk[None, :], mask=(rows[:, None] < B) & (dk[None, :] < D), other=0.0)
        a = a.to(tl.float32)
        nw += tl.sum(a * a, axis=1)
    return 1.0 / tl.maximum(tl.sqrt(nw), 1e-12)


@triton.jit
def _rpo_terms(cos, rmax, rsum, dw, dl, valid, half_beta, inv_tau, inv_b, INSIDE: tl.constexpr):
    """w_ij, -log sigmoid term and dL/dD_ij of a tile (already divided by the mean's B or B^2)."""
    w = tl.where(valid, tl.exp(cos * inv_tau - rmax[:, None]) / rsum[:, None], 0.0)
    dd = -half_beta * (dw[:, None] - dl[None, :])  # D_ij
    if INSIDE:  # mean_ij -log sigmoid(w D)
        x = w * dd
        term = _softplus(-x) * inv_b * inv_b
        g = -tl.sigmoid(-x) * w * inv_b * inv_b
    else:  # mean_i sum_j w (-log sigmoid(D))
        term = w * _softplus(-dd) * inv_b
        g = -tl.sigmoid(-dd) * w * inv_b
    return w, tl.where(valid, term, 0.0), tl.where(valid, g, 0.0)


@triton.jit
def _rpo_row_kernel(
    PART,  # [2B, CHUNKS, 5]
    EW,  # [B, D] row (winner) embeddings
    EL,  # [B, D] column (loser) embeddings
    GE,  # [2B] out (rows 0..B-1 written here)
    GD,  # [2B] out (rows 0..B-1 written here: zeros)
    ROW,  # [B, 4] fp32 out: softmax max, softmax sum, loss part, w_ii
    B,
    D,
    N,
    CHUNKS,
    half_beta,
    inv_tau,
    INSIDE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # D_ij = -(beta/2)(delta^w_i - delta^l_j); w_ij = softmax_j(cos_ij / tau); row sums of dL/dD give g^w_i
    inv_n = 1.0 / N
    inv_b = 1.0 / B
    rows = (tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
    rmask = rows < B
    inv_nw = _row_inv_norm(EW, rows, B, D, BLOCK_D)
    dw = _stats(PART, rows, rmask, CHUNKS, inv_n)[2]
    rmax = tl.full([BLOCK_I], float("-inf"), dtype=tl.float32)
    rsum = tl.zeros([BLOCK_I], dtype=tl.float32)
    for j0 in range(0, B, BLOCK_J):  # pass 1: online softmax statistics
        cols = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        z = _cosine_tile(EW, EL, rows, cols, B, D, inv_nw, BLOCK_D) * inv_tau
        z = tl.where(cols[None, :] < B, z, float("-inf"))
        new_max = tl.maximum(rmax, tl.max(z, axis=1))
        rsum = rsum * tl.exp(rmax - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        rmax = new_max
    loss = tl.zeros([BLOCK_I], dtype=tl.float32)
    grow = tl.zeros([BLOCK_I], dtype=tl.float32)
    wdiag = tl.zeros([BLOCK_I], dtype=tl.float32)
    for j0 in range(0, B, BLOCK_J):  # pass 2: loss and row sums of dL/dD
        cols = (j0 + tl.arange(0, BLOCK_J)).to(tl.int64)
        cmask = cols < B
        dl = _stats(PART, cols + B, cmask, CHUNKS, inv_n)[2]
        cos = _cosine_tile(EW, EL, rows, cols, B, D, inv_nw, BLOCK_D)
        valid = rmask[:, None] & cmask[None, :]
        w, term, g = _rpo_terms(cos, rmax, rsum, dw, dl, valid, half_beta, inv_tau, inv_b, INSIDE)
        loss += tl.sum(term, axis=1)
        grow += tl.sum(g, axis=1)
        wdiag += tl.sum(tl.where(rows[:, None] == cols[None, :], w, 0.0), axis=1)
    tl.store(GE + rows, 2.0 * inv_n * -half_beta * grow, mask=rmask)
    tl.store(GD + rows, tl.zeros([BLOCK_I], dtype=tl.float32), mask=rmask)
    tl.store(ROW + rows * 4 + 0, rmax, mask=rmask)
    tl.store(ROW + rows * 4 + 1, rsum, mask=rmask)
    tl.store(ROW + rows * 4 + 2, loss, mask=rmask)
    tl.store(ROW + rows * 4 + 3, wdiag, mask=rmask)


@triton.jit
def _rpo_col_kernel(
    PART,  # [2B, CHUNKS, 5]
    EW,  # [B, D]
    EL,  # [B, D]
    ROW,  # [B, 4] from the row kernel
    GE,  # [2B] out (rows B..2B-1 written here)
    GD,  # [2B] out (rows B..2B-1: zeros)
    LOSS,  # [] out (program 0)
    MET,  # [10] out (program 0)
    B,
    D,
    N,
    CHUNKS,
    half_beta,
    inv_tau,
    INSIDE: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # column sums of dL/dD give g^l_j (a deterministic second launch instead of atomics)
    inv_n = 1.0 / N
    inv_b = 1.0 / B
    cols = (tl.program_id(0) * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)
    cmask = cols < B
    dl = _stats(PART, cols + B, cmask, CHUNKS, inv_n)[2]
    gcol = tl.zeros([BLOCK_J], dtype=tl.float32)
    for i0 in range(0, B, BLOCK_I):
        rows = (i0 + tl.arange(0, BLOCK_I)).to(tl.int64)
        rmask = rows < B
        dw = _stats(PART, rows, rmask, CHUNKS, inv_n)[2]
        rmax = tl.load(ROW + rows * 4 + 0, mask=rmask, other=0.0)
        rsum = tl.load(ROW + rows * 4 + 1, mask=rmask, other=1.0)
        inv_nw = _row_inv_norm(EW, rows, B, D, BLOCK_D)
        cos = _cosine_tile(EW, EL, rows, cols, B, D, inv_nw, BLOCK_D)
        valid = rmask[:, None] & cmask[None, :]
        g = _rpo_terms(cos, rmax, rsum, dw, dl, valid, half_beta, inv_tau, inv_b, INSIDE)[2]
        gcol += tl.sum(g, axis=0)
    tl.store(GE + B + cols, 2.0 * inv_n * half_beta * gcol, mask=cmask)
    tl.store(GD + B + cols, tl.zeros([BLOCK_J], dtype=tl.float32), mask=cmask)
    if tl.program_id(0) == 0:  # the scalar reductions, in a fixed order
        zero = tl.zeros([BLOCK_J], dtype=tl.float32)
        s_loss, s_acc, s_u, s_hw, s_hl, s_wd = zero, zero, zero, zero, zero, zero
        s_mw, s_ml, s_rw, s_rl = zero, zero, zero, zero
        for i0 in range(0, B, BLOCK_J):
            iw = (i0 + tl.arange(0, BLOCK_J)).to(tl.int64)
            mask = iw < B
            mw, rw, dw = _stats(PART, iw, mask, CHUNKS, inv_n)[:3]
            ml, rl, dl2 = _stats(PART, iw + B, mask, CHUNKS, inv_n)[:3]
            hw = -half_beta * dw
            hl = -half_beta * dl2
            u = hw - hl
            s_loss += tl.load(ROW + iw * 4 + 2, mask=mask, other=0.0)
            s_wd += tl.load(ROW + iw * 4 + 3, mask=mask, other=0.0)
            s_acc, s_u, s_hw, s_hl, s_mw, s_ml, s_rw, s_rl = _pair_sums(
                mask, u, hw, hl, mw, ml, rw, rl, s_acc, s_u, s_hw, s_hl, s_mw, s_ml, s_rw, s_rl
            )
        # the loss is already the mean: row terms carry 1/B (outside) or 1/B^2 (inside)
        _store_metrics(MET, LOSS, inv_b, tl.sum(s_loss, axis=0), s_acc, s_u, s_hw, s_hl, s_mw, s_ml, s_rw, s_rl, s_wd)


# --------------------------------------------------------------------------------------------------
# Launchers: no .item(), no branching on tensor values; outputs may be passed in (tests poison them)
# --------------------------------------------------------------------------------------------------

BLOCK_ERR = 1024
BLOCK_BWD = 2048


def _grid_target(device: torch.device) -> int:
    """Programs that cover the device (tests/compile_kernels.py replaces it to chunk as on an H100)."""
    return shared.grid_target(device)


def default_num_chunks(rows: int, n: int, device: torch.device) -> int:
    """Split each row into chunks so that the grid covers the GPU (4 programs per SM), at least BLOCK_ERR
    elements a chunk. Depends only on shapes and the device, so results are reproducible bit for bit."""
    return max(1, min(triton.cdiv(n, BLOCK_ERR), triton.cdiv(_grid_target(device), rows)))


def errors_fwd(
    p: Tensor,
    t: Tensor,
    q: Tensor | None,
    *,
    dspo: bool = False,
    num_chunks: int | None = None,
    block: int = BLOCK_ERR,
    part: Tensor | None = None,
) -> Tensor:
    """Chunk partial sums (R, CHUNKS, 5) of m, r, delta, <e,d>, |d|^2 (not yet divided by N).
    ``num_chunks`` and ``block`` default to the tuned values; tests set them to exercise the chunking."""
    p, t, q = same_layout(p, t, q)
    rows, n = p.shape[0], p[0].numel()
    t_rows = t.shape[0]
    block = min(block, triton.next_power_of_2(n))
    chunks = num_chunks or default_num_chunks(t_rows, n, p.device)
    chunk = triton.cdiv(triton.cdiv(n, chunks), block) * block  # elements per program, a multiple of block
    chunks = triton.cdiv(n, chunk)
    if part is None:
        part = torch.empty(rows, chunks, K, dtype=torch.float32, device=p.device)
    _errors_fwd_kernel[(t_rows, chunks)](
        p,
        t,
        p if q is None else q,
        part,
        n,
        chunk,
        t_rows,
        chunks,
        HAS_REF=q is not None,
        DSPO=dspo,
        SHARED=t_rows != rows,
        BLOCK=block,
        num_warps=4,
    )
    return part


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
    p, t, q = same_layout(p, t, q)
    rows, n = p.shape[0], p[0].numel()
    t_rows = t.shape[0]
    if out is None:
        out = torch.empty_like(p)
    block = min(BLOCK_BWD, triton.next_power_of_2(n))
    _errors_bwd_kernel[(t_rows, triton.cdiv(n, block))](
        grad_loss,
        p,
        t,
        p if q is None else q,
        ge,
        gd,
        out,
        n,
        t_rows,
        HAS_D=has_d,
        SHARED=t_rows != rows,
        BLOCK=block,
        num_warps=8,
    )
    return out


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
    rows, chunks = part.shape[0], part.shape[1]
    dev = part.device
    if out is None:
        out = shared.pair_outputs(rows, dev)
    loss, met, ge, gd = out
    obj = shared.KERNEL_BRANCH[objective][0]
    if obj == shared.RPO:
        b, d = embeds_w.shape
        beta, tau, inside = params
        ew, el = embeds_w.contiguous(), embeds_l.contiguous()
        row = torch.empty(b, 4, dtype=torch.float32, device=dev)
        bi = bj = 32 if b > 16 else 16
        bd = min(64, max(16, triton.next_power_of_2(d)))
        meta = dict(INSIDE=bool(inside), BLOCK_I=bi, BLOCK_J=bj, BLOCK_D=bd, num_warps=4)
        _rpo_row_kernel[(triton.cdiv(b, bi),)](part, ew, el, ge, gd, row, b, d, n, chunks, beta / 2, 1 / tau, **meta)
        _rpo_col_kernel[(triton.cdiv(b, bj),)](
            part, ew, el, row, ge, gd, loss, met, b, d, n, chunks, beta / 2, 1 / tau, **meta
        )
        return out
    b = rows if obj == shared.SFT else rows // 2
    obj, a0, a1, a2, nsteps, ttrain, sdxl = pair_scalars(objective, params)
    _pair_kernel[(1,)](
        part,
        ge if weights is None else weights,
        ge if timesteps is None else timesteps,
        ge,
        gd,
        loss,
        met,
        b,
        n,
        chunks,
        a0,
        a1,
        a2,
        nsteps,
        ttrain,
        OBJ=obj,
        HAS_W=weights is not None,
        SDXL=sdxl,
        BLOCK_B=min(1024, max(16, triton.next_power_of_2(b))),
        num_warps=4,
    )
    return out


# --------------------------------------------------------------------------------------------------
# The custom op (torch.library: opaque to torch.compile, checked with opcheck)
# --------------------------------------------------------------------------------------------------

preference_loss_op, preference_loss_backward_op = define_fused_op(
    "rpo_fast::preference_loss", errors_fwd, pair_fwd, errors_bwd
)
sample_errors_op = define_errors_op("rpo_fast::sample_errors", errors_fwd, errors_bwd)  # (m, r, delta) per sample


def fused_preference_loss(objective: str, opts: dict, *args: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
    """The Triton backend of ``PreferenceLoss`` on validated inputs (``LossInputs`` order) and resolved
    options: (loss, metrics)."""
    return fused_loss(preference_loss_op, objective, opts, *args)
