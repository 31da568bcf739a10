"""The fused backends, Triton (``rpo_fast.kernels.preference_loss``, on CPU under TRITON_INTERPRET=1) and native
(``rpo_fast.kernels.native``, csrc/'s C++ on CPU, built on first use), against the eager reference and both against
float64, one suite parametrised over the two (and on CUDA, where the GPU tests run): values, gradients, metrics for
every objective and option; B = 1, 3, 7 and N = 4*5*7 = 140 (not a multiple of any block or of the 16 lanes); fp32,
bf16, fp16; shared and per-sample targets; contiguous, channels_last, mixed and strided layouts; outputs poisoned
with NaN before every launcher call; opcheck; torch.compile(fullgraph=True); RPO's global scope on 2 ranks.
What only one backend has is in ``test_kernels.py`` (Triton: launch counts, compilation for sm_80/sm_90) and
``test_native.py`` (the C++ ops, mixed dtypes, the build, nvcc).

Tolerances (dtype, atol, rtol) are the rows of ``helpers.LOSS_TOL`` / ``GRAD_TOL``; fused vs eager is held to the
same rows (both accumulate in fp32, in different orders).
"""

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
    op_args,
    ref_errors,
    ref_loss_and_grad,
    run_loss,
)

from rpo_fast import PreferenceLoss
from rpo_fast.kernels import native as N
from rpo_fast.kernels import preference_loss as K

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")
BACKENDS = ("triton", "native")
OPS = {"triton": K, "native": N}  # each module's errors_fwd, pair_fwd, errors_bwd and its custom op
FUSED_OP = {"triton": K.preference_loss_op, "native": N.preference_loss_native_op}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objective,opts,needs", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("b,shared", [(1, False), (3, True), (7, False)], ids=["B1", "B3-shared", "B7"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_matches_eager_and_float64(backend, objective, opts, needs, b, shared, dtype):
    p, t, q = (x.to(DEV) for x in make_pairs(b, dtype=dtype, shared_target=shared, seed=30 + b))
    fused_fn, kw, ref_kw, p, t, q = call_case(objective, opts, needs, b, p, t, q, seed=b, backend=backend)
    kw = {k: v.to(DEV) for k, v in kw.items()}
    eager_fn = PreferenceLoss(objective, backend="eager", **opts)
    fus, fus_g = run_loss(fused_fn, p, t, q, kw)
    eag, eag_g = run_loss(eager_fn, p, t, q, kw)
    ref, ref_g = ref_loss_and_grad(
        objective, p.cpu(), t.cpu(), None if q is None else q.cpu(), **ref_kw, **fused_fn.options
    )
    lt, gt = LOSS_TOL[dtype], GRAD_TOL[dtype]
    assert fus_g.dtype == dtype and fus_g.shape == p.shape
    assert_close(f"{backend} loss vs float64", fus.loss, ref, atol=lt[0], rtol=lt[1])
    assert_close(f"{backend} grad vs float64", fus_g, 1.7 * ref_g, atol=gt[0], rtol=gt[1])
    assert_close(f"{backend} loss vs eager", fus.loss, eag.loss, atol=lt[0], rtol=lt[1])
    assert_close(f"{backend} grad vs eager", fus_g, eag_g, atol=gt[0], rtol=gt[1])
    assert set(fus.metrics) == set(eag.metrics)
    for name, v in eag.metrics.items():
        assert_close(f"metric {name}", fus.metrics[name], v, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# The three steps with poisoned outputs: every element must be written
# --------------------------------------------------------------------------------------------------

# (backend, chunks, launcher options): Triton's block sizes; the native op down to one element a chunk (N = 140)
CHUNKINGS = [("triton", None, dict(block=1024)), ("triton", 3, dict(block=32)), ("triton", 5, dict(block=16))]
CHUNKINGS += [("native", None, {}), ("native", 3, {}), ("native", 5, {}), ("native", 140, {})]


@pytest.mark.parametrize("dspo", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("backend,chunks,launch", CHUNKINGS)
def test_errors_fwd_partials_poisoned_and_chunked(backend, chunks, launch, shared, dspo):
    op = OPS[backend]
    p, t, q = (x.to(DEV) for x in make_pairs(3, dtype=torch.bfloat16, shared_target=shared, seed=41))
    probe = op.errors_fwd(p, t, q, dspo=dspo, num_chunks=chunks, **launch)
    part = torch.full_like(probe, NAN)
    op.errors_fwd(p, t, q, dspo=dspo, num_chunks=chunks, part=part, **launch)
    assert not part.isnan().any()
    if chunks:
        assert part.shape[1] > 1  # really split
        if backend == "native":
            assert part.shape[1] == chunks  # exactly as asked (140: one element a chunk)
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
@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_and_backward_write_every_output(backend, objective, opts, needs):
    op = OPS[backend]
    b = 5
    p, t, q = (x.to(DEV) for x in make_pairs(b, seed=42))
    fn, kw, _, p, t, q = call_case(objective, opts, needs, b, p, t, q, backend=backend)
    kw = {k: v.to(DEV) for k, v in kw.items()}
    params = K.objective_params(objective, fn.options)
    part = op.errors_fwd(p, t, q, dspo=objective == "dspo", num_chunks=None if backend == "triton" else 3)
    outs = tuple(torch.full_like(x, NAN) for x in N.shared.pair_outputs(p.shape[0], p.device))
    op.pair_fwd(part, p[0].numel(), objective, params, out=outs, **kw)
    loss, met, ge, gd = outs
    names = ("loss", "mse_w") if objective == "sft" else K.METRIC_NAMES[: 10 if objective == "rpo" else 9]
    for name in names:
        assert not met[K.METRIC_NAMES.index(name)].isnan(), name
    if backend == "native":
        assert not met.isnan().any(), met  # every metric written (zeros where an objective has none)
    assert not loss.isnan() and not ge.isnan().any() and not gd.isnan().any()
    grad = torch.full_like(p, NAN)
    op.errors_bwd(torch.tensor(1.0, device=DEV), p, t, q, ge, gd, has_d=objective == "dspo", out=grad)
    assert not grad.isnan().any()
    eager = run_loss(PreferenceLoss(objective, backend="eager", **opts), p, t, q, kw, grad_out=1.0)
    assert_close("poisoned-path grad", grad, eager[1], atol=1e-6, rtol=1e-4)
    assert_close("poisoned-path loss", loss, eager[0].loss, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Layouts: channels_last, mixed, strided; the right elements are paired or the input is copied
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["dpo", "dspo", "rpo"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_pair_the_right_elements(backend, objective, shared):
    b = 3
    p0, t0, q0 = (x.to(DEV) for x in make_pairs(b, dtype=torch.float32, shared_target=shared, seed=43))
    kw = dict(zip(("embeds_w", "embeds_l"), (e.to(DEV) for e in make_embeds(b)))) if objective == "rpo" else {}
    opts = dict(beta=BETA) if objective != "dspo" else dict(beta=BETA, lam_out=1.0)
    eager = run_loss(PreferenceLoss(objective, backend="eager", **opts), p0, t0, q0, kw)
    for name, p, t, q in layouts(p0, t0, q0):
        assert torch.equal(p, p0) and torch.equal(t, t0) and torch.equal(q, q0)
        fus = run_loss(PreferenceLoss(objective, backend=backend, **opts), p, t, q, kw)
        assert fus[1].shape == p.shape
        assert_close(f"{name} loss", fus[0].loss, eager[0].loss, atol=1e-6, rtol=1e-5)
        assert_close(f"{name} grad", fus[1], eager[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_input_gives_the_same_bits_whatever_the_thread_count(backend):
    """The reduction order is fixed by the shapes: the same input twice, on 1 thread and on every thread, gives
    the same bits."""
    p, t, q = (x.to(DEV) for x in make_pairs(7, 4, 40, 40, dtype=torch.bfloat16, seed=44))  # 3 chunks a row
    ew, el = (e.to(DEV) for e in make_embeds(7))
    fn = PreferenceLoss("rpo", backend=backend, beta=BETA, scope="local")
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 1, max(2, threads)):
            torch.set_num_threads(n)
            runs.append(run_loss(fn, p, t, q, dict(embeds_w=ew, embeds_l=el)))
    finally:
        torch.set_num_threads(threads)
    for again in runs[1:]:
        assert torch.equal(runs[0][0].loss, again[0].loss)
        assert torch.equal(runs[0][1], again[1])


@pytest.mark.parametrize("weighting", ["inside", "outside"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rpo_many_tiles(backend, weighting):
    """B = 70: three Triton row and column tiles of 32, the last partial; not a multiple of the CUDA tile of 16.
    D = 80: two D tiles of 64, the last partial."""
    b = 70
    p, t, q = (x.to(DEV) for x in make_pairs(b, 2, 3, 5, seed=45))
    ew, el = (e.to(DEV) for e in make_embeds(b, d=80))
    kw = dict(embeds_w=ew, embeds_l=el)
    opts = dict(beta=BETA, tau=0.5, weighting=weighting, scope="local")
    fus = run_loss(PreferenceLoss("rpo", backend=backend, **opts), p, t, q, kw)
    eag = run_loss(PreferenceLoss("rpo", backend="eager", **opts), p, t, q, kw)
    assert_close("loss", fus[0].loss, eag[0].loss, atol=1e-6, rtol=1e-5)
    assert_close("grad", fus[1], eag[1], atol=1e-6, rtol=1e-4)
    for name, v in eag[0].metrics.items():
        assert_close(name, fus[0].metrics[name], v, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# The custom ops: opcheck and torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["dpo", "sft", "rpo", "dspo", "dense-dpo", "cal-dpo"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, objective):
    args = op_args(objective, DEV)
    args = (args[0].requires_grad_(True), *args[1:])
    torch.library.opcheck(FUSED_OP[backend], args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    p, t, q = (x.to(DEV) for x in make_pairs(3, seed=47))
    ew, el = (e.to(DEV) for e in make_embeds(3))
    fn = PreferenceLoss("rpo", backend=backend, beta=BETA, scope="local")

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


@pytest.mark.multiprocess
@pytest.mark.parametrize("weighting", ["inside", "outside"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_global_scope_equals_one_process(tmp_path, backend, weighting):
    import dist_rpo_worker as W
    from test_global_scope import run_workers, single_process

    if backend == "native":
        N.load_library()  # build once here, not in both workers
    got = run_workers(tmp_path, backend, weighting)
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
# On the GPU machine: real compilation, SDXL shapes, determinism, B = 4096
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objective,opts,needs", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_sdxl_shape_against_float64(backend, objective, opts, needs, dtype):
    b = 4
    p, t, q = (x.cuda() for x in make_pairs(b, 4, 128, 128, dtype=dtype, shared_target=True, ref_noise=0.02, seed=50))
    fn, kw, ref_kw, p, t, q = call_case(objective, opts, needs, b, p, t, q, backend=backend)
    kw = {k: v.cuda() for k, v in kw.items()}
    fus, fus_g = run_loss(fn, p, t, q, kw)
    ref, ref_g = ref_loss_and_grad(objective, p.cpu(), t.cpu(), None if q is None else q.cpu(), **ref_kw, **fn.options)
    assert_close("loss", fus.loss, ref, atol=LOSS_TOL[dtype][0], rtol=1e-4)
    assert_close("grad", fus_g, 1.7 * ref_g, atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])
    again = run_loss(fn, p, t, q, kw)
    assert torch.equal(again[0].loss, fus.loss) and torch.equal(again[1], fus_g)  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("weighting", ["inside", "outside"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_rpo_b4096(backend, weighting):
    b = 4096
    p, t, q = (x.cuda() for x in make_pairs(b, 4, 4, 4, seed=51))
    ew, el = (e.cuda() for e in make_embeds(b, d=768))
    kw = dict(embeds_w=ew, embeds_l=el)
    opts = dict(beta=BETA, weighting=weighting, scope="local")
    fus = run_loss(PreferenceLoss("rpo", backend=backend, **opts), p, t, q, kw)
    eag = run_loss(
        PreferenceLoss("rpo", backend="eager", **opts),
        p.double(),
        t.double(),
        q.double(),
        {k: v.double() for k, v in kw.items()},
    )
    assert_close("loss", fus[0].loss, eag[0].loss, atol=1e-6, rtol=1e-4)
    assert_close("grad", fus[1], eag[1], atol=1e-5, rtol=1e-3)
