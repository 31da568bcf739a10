"""The Triton backend against the eager reference and both against float64, on CPU under TRITON_INTERPRET=1
(and on CUDA, where the GPU tests run): values, gradients, metrics; B = 1, 3, 7 and N = 4*5*7 = 140 (not a
multiple of any block); fp32, bf16, fp16; shared and per-sample targets; contiguous, channels_last,
mixed and strided layouts; outputs poisoned with NaN before every launcher call.

Tolerances (dtype, atol, rtol) are the rows of ``helpers.LOSS_TOL`` / ``GRAD_TOL``; triton vs eager is
held to the same rows (both accumulate in fp32, in different orders).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    BETA,
    CASE_IDS,
    CASES,
    DTYPES,
    GRAD_TOL,
    LOSS_TOL,
    assert_close,
    call_case,
    layouts,
    make_embeds,
    make_pairs,
    ref_errors,
    ref_loss_and_grad,
    run_loss,
)

from rpo_fast import PreferenceLoss
from rpo_fast.kernels import preference_loss as K

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objective,opts,needs", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("b,shared", [(1, False), (3, True), (7, False)], ids=["B1", "B3-shared", "B7"])
def test_triton_matches_eager_and_float64(objective, opts, needs, b, shared, dtype):
    p, t, q = (x.to(DEV) for x in make_pairs(b, dtype=dtype, shared_target=shared, seed=30 + b))
    tri_fn, kw, ref_kw, p, t, q = call_case(objective, opts, needs, b, p, t, q, seed=b, backend="triton")
    kw = {k: v.to(DEV) for k, v in kw.items()}
    eager_fn = PreferenceLoss(objective, backend="eager", **opts)
    tri, tri_g = run_loss(tri_fn, p, t, q, kw)
    eag, eag_g = run_loss(eager_fn, p, t, q, kw)
    ref, ref_g = ref_loss_and_grad(
        objective, p.cpu(), t.cpu(), None if q is None else q.cpu(), **ref_kw, **tri_fn.options
    )
    lt, gt = LOSS_TOL[dtype], GRAD_TOL[dtype]
    assert tri_g.dtype == dtype and tri_g.shape == p.shape
    assert_close("triton loss vs float64", tri.loss, ref, atol=lt[0], rtol=lt[1])
    assert_close("triton grad vs float64", tri_g, 1.7 * ref_g, atol=gt[0], rtol=gt[1])
    assert_close("triton loss vs eager", tri.loss, eag.loss, atol=lt[0], rtol=lt[1])
    assert_close("triton grad vs eager", tri_g, eag_g, atol=gt[0], rtol=gt[1])
    assert set(tri.metrics) == set(eag.metrics)
    for name, v in eag.metrics.items():
        assert_close(f"metric {name}", tri.metrics[name], v, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# The launchers with poisoned outputs: every element must be written
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dspo", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("chunks,block", [(None, 1024), (3, 32), (5, 16)])
def test_errors_fwd_partials_poisoned_and_chunked(shared, dspo, chunks, block):
    p, t, q = (x.to(DEV) for x in make_pairs(3, dtype=torch.bfloat16, shared_target=shared, seed=41))
    probe = K.errors_fwd(p, t, q, dspo=dspo, num_chunks=chunks, block=block)
    part = torch.full_like(probe, NAN)
    K.errors_fwd(p, t, q, dspo=dspo, num_chunks=chunks, block=block, part=part)
    assert not part.isnan().any()
    if chunks:
        assert part.shape[1] > 1  # really split
    s = part.double().sum(1) / p[0].numel()
    m, r = ref_errors(p.cpu(), t.cpu(), q.cpu())
    assert_close("m", s[:, 0], m, atol=1e-7, rtol=1e-5)
    assert_close("r", s[:, 1], r, atol=1e-7, rtol=1e-5)
    assert_close("delta", s[:, 2], m - r, atol=1e-6, rtol=1e-4)
    if dspo:
        tt = t if not shared else torch.cat([t, t])
        e, d = (p.double() - tt.double()).flatten(1), (p.double() - q.double()).flatten(1)
        assert_close("ed", s[:, 3], (e * d).mean(1), atol=1e-6, rtol=1e-4)
        assert_close("dd", s[:, 4], (d * d).mean(1), atol=1e-6, rtol=1e-4)
    else:
        assert (part[..., 3:] == 0).all()


@pytest.mark.parametrize("objective,opts,needs", CASES, ids=CASE_IDS)
def test_pair_and_backward_write_every_output(objective, opts, needs):
    b = 5
    p, t, q = (x.to(DEV) for x in make_pairs(b, seed=42))
    fn, kw, _, p, t, q = call_case(objective, opts, needs, b, p, t, q, backend="triton")
    kw = {k: v.to(DEV) for k, v in kw.items()}
    params = K.objective_params(objective, fn.options)
    part = K.errors_fwd(p, t, q, dspo=objective == "dspo")
    outs = tuple(torch.full(s, NAN, device=DEV) for s in ((), (len(K.METRIC_NAMES),), (p.shape[0],), (p.shape[0],)))
    K.pair_fwd(part, p[0].numel(), objective, params, out=outs, **kw)
    loss, met, ge, gd = outs
    names = ("loss", "mse_w") if objective == "sft" else K.METRIC_NAMES[: 10 if objective == "rpo" else 9]
    for name in names:
        assert not met[K.METRIC_NAMES.index(name)].isnan(), name
    assert not loss.isnan() and not ge.isnan().any() and not gd.isnan().any()
    grad = torch.full_like(p, NAN)
    K.errors_bwd(torch.tensor(1.0, device=DEV), p, t, q, ge, gd, has_d=objective == "dspo", out=grad)
    assert not grad.isnan().any()
    eager = run_loss(PreferenceLoss(objective, backend="eager", **opts), p, t, q, kw, grad_out=1.0)
    assert_close("poisoned-path grad", grad, eager[1], atol=1e-6, rtol=1e-4)
    assert_close("poisoned-path loss", loss, eager[0].loss, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Layouts: channels_last, mixed, strided; the right elements are paired or the input is copied
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["dpo", "dspo", "rpo"])
@pytest.mark.parametrize("shared", [False, True])
def test_layouts_pair_the_right_elements(objective, shared):
    b = 3
    p0, t0, q0 = (x.to(DEV) for x in make_pairs(b, dtype=torch.float32, shared_target=shared, seed=43))
    kw = dict(zip(("embeds_w", "embeds_l"), (e.to(DEV) for e in make_embeds(b)))) if objective == "rpo" else {}
    opts = dict(beta=BETA) if objective != "dspo" else dict(beta=BETA, lam_out=1.0)
    eager = run_loss(PreferenceLoss(objective, backend="eager", **opts), p0, t0, q0, kw)
    for name, p, t, q in layouts(p0, t0, q0):
        assert torch.equal(p, p0) and torch.equal(t, t0) and torch.equal(q, q0)
        tri = run_loss(PreferenceLoss(objective, backend="triton", **opts), p, t, q, kw)
        assert_close(f"{name} loss", tri[0].loss, eager[0].loss, atol=1e-6, rtol=1e-5)
        assert_close(f"{name} grad", tri[1], eager[1], atol=1e-6, rtol=1e-4)


def test_same_input_gives_the_same_bits():
    p, t, q = (x.to(DEV) for x in make_pairs(7, dtype=torch.bfloat16, seed=44))
    ew, el = (e.to(DEV) for e in make_embeds(7))
    fn = PreferenceLoss("rpo", backend="triton", beta=BETA, scope="local")
    runs = [run_loss(fn, p, t, q, dict(embeds_w=ew, embeds_l=el)) for _ in range(2)]
    assert torch.equal(runs[0][0].loss, runs[1][0].loss)
    assert torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("weighting", ["inside", "outside"])
def test_rpo_many_tiles(weighting):
    """B = 70: three row tiles and three column tiles of 32, the last partial."""
    b = 70
    p, t, q = (x.to(DEV) for x in make_pairs(b, 2, 3, 5, seed=45))
    ew, el = (e.to(DEV) for e in make_embeds(b, d=80))  # D = 80: two D tiles of 64, the last partial
    kw = dict(embeds_w=ew, embeds_l=el)
    opts = dict(beta=BETA, tau=0.5, weighting=weighting, scope="local")
    tri = run_loss(PreferenceLoss("rpo", backend="triton", **opts), p, t, q, kw)
    eag = run_loss(PreferenceLoss("rpo", backend="eager", **opts), p, t, q, kw)
    assert_close("loss", tri[0].loss, eag[0].loss, atol=1e-6, rtol=1e-5)
    assert_close("grad", tri[1], eag[1], atol=1e-6, rtol=1e-4)
    for name, v in eag[0].metrics.items():
        assert_close(name, tri[0].metrics[name], v, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# The custom op: opcheck and torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["dpo", "sft", "rpo", "dspo", "dense-dpo"])
def test_opcheck(objective):
    b = 2
    p, t, q = (x.to(DEV) for x in make_pairs(b, 2, 3, 3, seed=46))
    ew, el = (e.to(DEV) for e in make_embeds(b))
    opts = {"sft": {}, "rpo": dict(beta=BETA, tau=0.5, weighting="inside")}.get(objective, dict(beta=BETA))
    from rpo_fast.loss import resolve_options

    full = resolve_options(objective, opts)
    if objective == "sft":
        p, q = p[:b], None
        t = t[:b]
    args = (
        p.requires_grad_(True),
        t,
        q,
        ew if objective == "rpo" else None,
        el if objective == "rpo" else None,
        None,
        torch.randint(0, 1000, (b,), device=DEV) if objective == "dense-dpo" else None,
        objective,
        K.objective_params(objective, full),
        1,
    )
    torch.library.opcheck(K.preference_loss_op, args)


def test_compile_fullgraph():
    p, t, q = (x.to(DEV) for x in make_pairs(3, seed=47))
    ew, el = (e.to(DEV) for e in make_embeds(3))
    fn = PreferenceLoss("rpo", backend="triton", beta=BETA, scope="local")

    def step(x):
        out = fn(x, t, q, embeds_w=ew, embeds_l=el)
        return out.loss, out.metrics["implicit_acc"]

    compiled = torch.compile(step, fullgraph=True)
    x1 = p.clone().requires_grad_(True)
    x2 = p.clone().requires_grad_(True)
    l1, a1 = compiled(x1)
    l1.backward()
    l2, a2 = step(x2)
    l2.backward()
    assert_close("compiled loss", l1, l2, atol=0, rtol=1e-6)
    assert_close("compiled grad", x1.grad, x2.grad, atol=0, rtol=1e-6)
    assert a1 == a2


def test_launch_count_and_no_sync():
    """3 launches for forward + backward of a four-scalar objective (4 for RPO), counted by wrapping the
    kernels' launch, and none of them reads a value back to the host."""
    p, t, q = (x.to(DEV) for x in make_pairs(3, seed=48))
    ew, el = (e.to(DEV) for e in make_embeds(3))
    kernels = [K._errors_fwd_kernel, K._pair_kernel, K._rpo_row_kernel, K._rpo_col_kernel, K._errors_bwd_kernel]
    counts = {}
    originals = {}
    for k in kernels:
        originals[k] = k.run

        def counted(*a, _k=k, **kw):
            counts[_k.fn.__name__] = counts.get(_k.fn.__name__, 0) + 1
            return originals[_k](*a, **kw)

        k.run = counted
    try:
        for objective, kw, expected in (("dpo", {}, 3), ("rpo", dict(embeds_w=ew, embeds_l=el), 4)):
            counts.clear()
            run_loss(
                PreferenceLoss(objective, backend="triton", beta=BETA, **({"scope": "local"} if kw else {})),
                p,
                t,
                q,
                kw,
            )
            assert sum(counts.values()) == expected, counts
    finally:
        for k in kernels:
            k.run = originals[k]


def test_every_launch_compiles_for_a100_and_h100(tmp_path):
    """The interpreter accepts kernels that Triton's compiler rejects (it let a loop-carried variable change
    shape in ``_rpo_col_kernel``): every specialization the op launches, at test and production shapes,
    compiles to cubin for sm_80 and sm_90, fits the block's shared memory and spills no register."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / "compile.json"
    script = Path(__file__).parent / "compile_kernels.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--json", str(report)], env=env, capture_output=True, text=True, timeout=900
    )
    assert report.exists(), f"compile_kernels.py wrote no report (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    rows = json.loads(report.read_text())
    failed = [f"{r['arch']} {r['kernel']} {r['constexprs']}: {r['error']}" for r in rows if "error" in r]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stderr[-4000:]
    names = {"_errors_fwd_kernel", "_errors_bwd_kernel", "_pair_kernel", "_rpo_row_kernel", "_rpo_col_kernel"}
    for arch in ("sm_80", "sm_90"):
        assert {r["kernel"] for r in rows if r["arch"] == arch} == names, arch
    for r in rows:
        where = f"{r['arch']} {r['kernel']} {r['constexprs']}"
        assert r["shared"] <= r["smem_limit"], f"{where}: {r['shared']} bytes of shared memory"
        assert r["local"] == 0, f"{where}: {r['local']} bytes of spilled registers"


@pytest.mark.multiprocess
@pytest.mark.parametrize("weighting", ["inside", "outside"])
def test_global_scope_triton_equals_one_process(tmp_path, weighting):
    import dist_rpo_worker as W
    from test_global_scope import run_workers, single_process

    got = run_workers(tmp_path, "triton", weighting)
    assert got["forward_collectives"] == {
        "all_reduce": 0,
        "reduce_scatter_tensor": 0,
        "all_gather_into_tensor": 1,
    }  # errors + embeddings
    assert got["backward_collectives"] == {"all_reduce": 0, "reduce_scatter_tensor": 0, "all_gather_into_tensor": 0}
    ref, theta_grad, pred_grad = single_process(weighting)
    for loss in got["losses"]:
        assert_close("loss", loss, ref.loss, atol=1e-6, rtol=1e-5)
    assert_close("theta grad (averaged)", got["theta_grad"], theta_grad, atol=1e-6, rtol=1e-4)
    b = W.WORLD * W.B_LOCAL
    for rank, g in enumerate(got["pred_grads"]):
        assert_close(f"rank {rank} grad", g, W.local_rows(pred_grad, rank, b) * W.WORLD, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# On the GPU machine: real compilation, SDXL shapes, B = 4096
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objective,opts,needs", CASES, ids=CASE_IDS)
def test_gpu_sdxl_shape_against_float64(objective, opts, needs, dtype):
    b = 4
    p, t, q = (x.cuda() for x in make_pairs(b, 4, 128, 128, dtype=dtype, shared_target=True, ref_noise=0.02, seed=50))
    fn, kw, ref_kw, p, t, q = call_case(objective, opts, needs, b, p, t, q, backend="triton")
    kw = {k: v.cuda() for k, v in kw.items()}
    tri, tri_g = run_loss(fn, p, t, q, kw)
    ref, ref_g = ref_loss_and_grad(objective, p.cpu(), t.cpu(), None if q is None else q.cpu(), **ref_kw, **fn.options)
    assert_close("loss", tri.loss, ref, atol=LOSS_TOL[dtype][0], rtol=1e-4)
    assert_close("grad", tri_g, 1.7 * ref_g, atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])
    again = run_loss(fn, p, t, q, kw)
    assert torch.equal(again[0].loss, tri.loss) and torch.equal(again[1], tri_g)  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("weighting", ["inside", "outside"])
def test_gpu_rpo_b4096(weighting):
    b = 4096
    p, t, q = (x.cuda() for x in make_pairs(b, 4, 4, 4, seed=51))
    ew, el = (e.cuda() for e in make_embeds(b, d=768))
    kw = dict(embeds_w=ew, embeds_l=el)
    opts = dict(beta=BETA, weighting=weighting, scope="local")
    tri = run_loss(PreferenceLoss("rpo", backend="triton", **opts), p, t, q, kw)
    eag = run_loss(
        PreferenceLoss("rpo", backend="eager", **opts),
        p.double(),
        t.double(),
        q.double(),
        {k: v.double() for k, v in kw.items()},
    )
    assert_close("loss", tri[0].loss, eag[0].loss, atol=1e-6, rtol=1e-4)
    assert_close("grad", tri[1], eag[1], atol=1e-5, rtol=1e-3)
