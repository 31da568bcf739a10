"""The native backend (csrc/, ``backend="native"``) against the eager reference and both against float64, on
CPU (the C++ kernels, built on first use) and on CUDA where the GPU tests run: values, gradients, metrics for
every objective and option; B = 1, 3, 7, N = 4*5*7 = 140 (not a multiple of the 16 lanes); fp32, bf16, fp16;
shared and per-sample targets; contiguous, channels_last, mixed and strided layouts and mixed dtypes; outputs
poisoned with NaN before every call; opcheck; torch.compile(fullgraph=True); RPO's global scope on 2 ranks;
the CUDA source compiled for sm_80 and sm_90 with its ptxas figures held (no spills).

Tolerances (dtype, atol, rtol) are the rows of ``helpers.LOSS_TOL`` / ``GRAD_TOL`` as for the Triton op: both
accumulate in fp32, in different orders.
"""

import json
import os
import re
import shutil
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
from rpo_fast.kernels import native as N
from rpo_fast.loss import resolve_options

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")
CSRC = Path(__file__).resolve().parents[1] / "csrc"
PTXAS_FIGURES = CSRC / "ptxas_figures.json"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objective,opts,needs", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("b,shared", [(1, False), (3, True), (7, False)], ids=["B1", "B3-shared", "B7"])
def test_native_matches_eager_and_float64(objective, opts, needs, b, shared, dtype):
    p, t, q = (x.to(DEV) for x in make_pairs(b, dtype=dtype, shared_target=shared, seed=30 + b))
    nat_fn, kw, ref_kw, p, t, q = call_case(objective, opts, needs, b, p, t, q, seed=b, backend="native")
    kw = {k: v.to(DEV) for k, v in kw.items()}
    nat, nat_g = run_loss(nat_fn, p, t, q, kw)
    eag, eag_g = run_loss(PreferenceLoss(objective, backend="eager", **opts), p, t, q, kw)
    ref, ref_g = ref_loss_and_grad(
        objective, p.cpu(), t.cpu(), None if q is None else q.cpu(), **ref_kw, **nat_fn.options
    )
    lt, gt = LOSS_TOL[dtype], GRAD_TOL[dtype]
    assert nat_g.dtype == dtype and nat_g.shape == p.shape
    assert_close("native loss vs float64", nat.loss, ref, atol=lt[0], rtol=lt[1])
    assert_close("native grad vs float64", nat_g, 1.7 * ref_g, atol=gt[0], rtol=gt[1])
    assert_close("native loss vs eager", nat.loss, eag.loss, atol=lt[0], rtol=lt[1])
    assert_close("native grad vs eager", nat_g, eag_g, atol=gt[0], rtol=gt[1])
    assert set(nat.metrics) == set(eag.metrics)
    for name, v in eag.metrics.items():
        assert_close(f"metric {name}", nat.metrics[name], v, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# The three C++ ops with poisoned outputs: every element must be written
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dspo", [False, True])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("chunks", [None, 3, 5, 140])
def test_errors_fwd_partials_poisoned_and_chunked(shared, dspo, chunks):
    p, t, q = (x.to(DEV) for x in make_pairs(3, dtype=torch.bfloat16, shared_target=shared, seed=41))
    probe = N.errors_fwd(p, t, q, dspo=dspo, num_chunks=chunks)
    part = torch.full_like(probe, NAN)
    N.errors_fwd(p, t, q, dspo=dspo, num_chunks=chunks, part=part)
    assert not part.isnan().any()
    if chunks:
        assert part.shape[1] == chunks  # really split (140: one element a chunk)
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
    fn, kw, _, p, t, q = call_case(objective, opts, needs, b, p, t, q, backend="native")
    kw = {k: v.to(DEV) for k, v in kw.items()}
    params = N.shared.objective_params(objective, fn.options)
    part = N.errors_fwd(p, t, q, dspo=objective == "dspo", num_chunks=3)
    outs = tuple(torch.full_like(x, NAN) for x in N.shared.pair_outputs(p.shape[0], p.device))
    N.pair_fwd(part, p[0].numel(), objective, params, out=outs, **kw)
    loss, met, ge, gd = outs
    assert not met.isnan().any(), met  # every metric written (zeros where an objective has none)
    assert not loss.isnan() and not ge.isnan().any() and not gd.isnan().any()
    grad = torch.full_like(p, NAN)
    N.errors_bwd(torch.tensor(1.0, device=DEV), p, t, q, ge, gd, has_d=objective == "dspo", out=grad)
    assert not grad.isnan().any()
    eager = run_loss(PreferenceLoss(objective, backend="eager", **opts), p, t, q, kw, grad_out=1.0)
    assert_close("poisoned-path grad", grad, eager[1], atol=1e-6, rtol=1e-4)
    assert_close("poisoned-path loss", loss, eager[0].loss, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# Layouts and dtypes: the right elements are paired or the input is copied
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
        nat = run_loss(PreferenceLoss(objective, backend="native", **opts), p, t, q, kw)
        assert nat[1].shape == p.shape
        assert_close(f"{name} loss", nat[0].loss, eager[0].loss, atol=1e-6, rtol=1e-5)
        assert_close(f"{name} grad", nat[1], eager[1], atol=1e-6, rtol=1e-4)


def test_channels_last_gradient_keeps_the_layout():
    p, t, q = (x.to(DEV).contiguous(memory_format=torch.channels_last) for x in make_pairs(2, seed=52))
    _, g = run_loss(PreferenceLoss("dpo", backend="native", beta=BETA), p, t, q, {})
    assert g.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32, torch.bfloat16), (torch.float64,) * 3])
def test_mixed_and_float64_inputs(dtypes):
    """Mixed dtypes (a bf16 prediction, an fp32 target) and float64 go through fp32 copies: exact upcasts."""
    p, t, q = make_pairs(3, seed=53)
    p, t, q = (x.to(DEV, dt) for x, dt in zip((p, t, q), dtypes))
    nat = run_loss(PreferenceLoss("dpo", backend="native", beta=BETA), p, t, q, {})
    eag = run_loss(PreferenceLoss("dpo", backend="eager", beta=BETA), p, t, q, {})
    assert nat[1].dtype == p.dtype
    assert_close("loss", nat[0].loss, eag[0].loss, atol=1e-6, rtol=1e-5)
    assert_close("grad", nat[1], eag[1], atol=1e-5 if p.dtype == torch.bfloat16 else 1e-6, rtol=1e-3)


def test_same_bits_whatever_the_thread_count():
    """The reduction order is fixed by the shapes: 1 thread and every thread give the same bits."""
    p, t, q = (x.to(DEV) for x in make_pairs(7, 4, 40, 40, dtype=torch.bfloat16, seed=44))  # 3 chunks a row
    ew, el = (e.to(DEV) for e in make_embeds(7))
    fn = PreferenceLoss("rpo", backend="native", beta=BETA, scope="local")
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            runs.append(run_loss(fn, p, t, q, dict(embeds_w=ew, embeds_l=el)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(runs[0][0].loss, runs[1][0].loss)
    assert torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("weighting", ["inside", "outside"])
def test_rpo_b70_d80(weighting):
    """B = 70 (not a multiple of the CUDA tile of 16), D = 80."""
    b = 70
    p, t, q = (x.to(DEV) for x in make_pairs(b, 2, 3, 5, seed=45))
    ew, el = (e.to(DEV) for e in make_embeds(b, d=80))
    kw = dict(embeds_w=ew, embeds_l=el)
    opts = dict(beta=BETA, tau=0.5, weighting=weighting, scope="local")
    nat = run_loss(PreferenceLoss("rpo", backend="native", **opts), p, t, q, kw)
    eag = run_loss(PreferenceLoss("rpo", backend="eager", **opts), p, t, q, kw)
    assert_close("loss", nat[0].loss, eag[0].loss, atol=1e-6, rtol=1e-5)
    assert_close("grad", nat[1], eag[1], atol=1e-6, rtol=1e-4)
    for name, v in eag[0].metrics.items():
        assert_close(name, nat[0].metrics[name], v, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------------
# The ops: opcheck, torch.compile(fullgraph=True), errors
# --------------------------------------------------------------------------------------------------


def _op_args(objective, b=2):
    p, t, q = (x.to(DEV) for x in make_pairs(b, 2, 3, 3, seed=46))
    ew, el = (e.to(DEV) for e in make_embeds(b))
    opts = {"sft": {}, "rpo": dict(beta=BETA, tau=0.5, weighting="inside")}.get(objective, dict(beta=BETA))
    full = resolve_options(objective, opts)
    if objective == "sft":
        p, t, q = p[:b], t[:b], None
    return (
        p,
        t,
        q,
        ew if objective == "rpo" else None,
        el if objective == "rpo" else None,
        torch.rand(b, device=DEV) + 0.5 if objective == "cal-dpo" else None,
        torch.randint(0, 1000, (b,), device=DEV) if objective == "dense-dpo" else None,
        objective,
        N.shared.objective_params(objective, full),
        1,
    )


@pytest.mark.parametrize("objective", ["dpo", "sft", "rpo", "dspo", "dense-dpo", "cal-dpo"])
def test_opcheck(objective):
    args = _op_args(objective)
    args = (args[0].requires_grad_(True), *args[1:])
    torch.library.opcheck(N.preference_loss_native_op, args)


def test_opcheck_the_cpp_ops():
    """The three C++ ops (schemas with their mutated outputs, fake kernels) on their own."""
    p, t, q, ew, el, *_ = _op_args("rpo")
    ops = torch.ops.rpo_fast
    N.load_library()
    part = torch.empty(p.shape[0], 2, 5, device=DEV)
    torch.library.opcheck(ops.native_errors_fwd, (p, t, q, False, part))
    outs = (
        torch.empty((), device=DEV),
        torch.empty(10, device=DEV),
        torch.empty(4, device=DEV),
        torch.empty(4, device=DEV),
    )
    obj, *scalars = N.pair_scalars("rpo", [BETA, 0.5, 1.0])
    torch.library.opcheck(ops.native_pair_fwd, (part, p[0].numel(), obj, scalars, ew, el, None, None, *outs))
    ge, gd = outs[2], outs[3]
    torch.library.opcheck(
        ops.native_errors_bwd, (torch.tensor(1.0, device=DEV), p, t, q, ge, gd, False, torch.empty_like(p))
    )


def test_compile_fullgraph():
    p, t, q = (x.to(DEV) for x in make_pairs(3, seed=47))
    ew, el = (e.to(DEV) for e in make_embeds(3))
    fn = PreferenceLoss("rpo", backend="native", beta=BETA, scope="local")

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


def test_the_cpp_checks_name_the_problem():
    p, t, q = make_pairs(2, seed=54)
    part = torch.empty(4, 1, 5)
    with pytest.raises(RuntimeError, match="target must have 4 or 2 rows"):
        torch.ops.rpo_fast.native_errors_fwd(p, t[:1], q, False, part)
    with pytest.raises(RuntimeError, match="part must be"):
        torch.ops.rpo_fast.native_errors_fwd(p, t, q, False, torch.empty(4, 1, 3))
    with pytest.raises(RuntimeError, match="ref_pred: expected dtype"):
        torch.ops.rpo_fast.native_errors_fwd(p, t, q.half(), False, part)


def test_missing_sources_name_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RPO_FAST_CSRC", str(tmp_path))
    with pytest.raises(N.NativeBuildError, match=f"{tmp_path} lacks preference_loss.cpp"):
        N.load_library.__wrapped__()


def test_build_ahead_command():
    proc = subprocess.run(
        [sys.executable, "-m", "rpo_fast.kernels.native"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "native backend ready in" in proc.stdout


def test_auto_keeps_triton_on_cuda():
    """``auto`` picks Triton on CUDA (until GPU figures say otherwise) and eager on CPU, never native; an objective
    the table declares without a fused kernel runs compiled on CUDA."""
    import dataclasses

    from rpo_fast.objectives import OBJECTIVE_TABLE

    for name in OBJECTIVE_TABLE:
        loss = PreferenceLoss(name)
        assert (loss.backend_for("cuda"), loss.backend_for("cpu")) == ("triton", "eager"), name
        assert PreferenceLoss(name, backend="native").backend_for("cuda") == "native"
    loss.spec = dataclasses.replace(loss.spec, fused=False)
    assert (loss.backend_for("cuda"), loss.backend_for("cpu")) == ("compile", "eager")


@pytest.mark.multiprocess
@pytest.mark.parametrize("weighting", ["inside", "outside"])
def test_global_scope_native_equals_one_process(tmp_path, weighting):
    import dist_rpo_worker as W
    from test_global_scope import run_workers, single_process

    N.load_library()  # build once here, not in both workers
    got = run_workers(tmp_path, "native", weighting)
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
# The CUDA source, compiled (not run) with this machine's nvcc for sm_80 and sm_90
# --------------------------------------------------------------------------------------------------


KERNELS = ("errors_fwd_kernel", "errors_bwd_kernel", "pair_kernel", "rpo_prepare_kernel", "rpo_cos_kernel")
KERNELS += ("rpo_row_kernel", "rpo_col_kernel", "rpo_final_kernel")
TYPES = {"13__nv_bfloat16": "<bf16>", "6__half": "<fp16>", "f": "<fp32>"}  # template arguments, mangled


def ptxas_figures(arch_list=(80, 90)) -> dict:
    """{"sm_80 kernel<type>": {registers, spill_stores, spill_loads, stack, smem}} from ``nvcc -Xptxas -v``."""
    from torch.utils.cpp_extension import include_paths

    nvcc = shutil.which("nvcc")
    out = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True).stdout.strip()) / "pl.o"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arch_list]
    cmd = [nvcc, "-c", str(CSRC / "preference_loss_cuda.cu"), "-o", str(out), "-std=c++20", "-O3", "--use_fast_math"]
    cmd += [*gencode, "-Xptxas", "-v", *(f"-I{p}" for p in include_paths())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures, name = {}, None
    for line in proc.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            mangled, arch = m.groups()
            kernel = next(k for k in KERNELS if f"{len(k)}{k}" in mangled)
            typ = next((t for key, t in TYPES.items() if f"{kernel}I{key}" in mangled), "")
            name = f"{arch} {kernel}{typ}"
            figures[name] = {}
        elif name and "spill stores" in line:
            s, st, ld = (int(x) for x in re.findall(r"(\d+) bytes", line))
            figures[name].update(stack=s, spill_stores=st, spill_loads=ld)
        elif name and "Used" in line and "registers" in line:
            figures[name]["registers"] = int(re.search(r"Used (\d+) registers", line).group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            figures[name]["smem"] = int(smem.group(1)) if smem else 0
    return figures


def nvcc_version() -> str:
    return subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CI machine has CUDA 13.0's)")
def test_cuda_source_compiles_for_sm80_and_sm90_without_spills():
    figures = ptxas_figures()
    kernels = set(KERNELS)
    for arch in ("sm_80", "sm_90"):
        assert {k.split()[1].split("<")[0] for k in figures if k.startswith(arch)} == kernels, arch
    for name, f in figures.items():
        assert f["spill_stores"] == 0 and f["spill_loads"] == 0 and f["stack"] == 0, f"{name}: {f}"
        assert f["smem"] <= 48 * 1024, f"{name}: {f['smem']} bytes of static shared memory"
    recorded = json.loads(PTXAS_FIGURES.read_text())
    if recorded["nvcc"] == nvcc_version():  # the same compiler: the same figures, or the record is stale
        assert figures == recorded["kernels"], (
            "ptxas figures changed: rerun `python tests/test_native.py --record` and commit csrc/ptxas_figures.json"
        )


def test_cuda_registration_compiles(tmp_path):
    """preference_loss.cpp with RPO_FAST_WITH_CUDA (the CUDA dispatch, guard and stream), checked by the C++
    compiler against torch's headers. The CPU wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h that
    c10/cuda/CUDAMacros.h includes: it is written here, as a CUDA build of torch has it."""
    from torch.utils.cpp_extension import include_paths

    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", Path(shutil.which("nvcc") or "/").resolve().parents[1]]
    cuda_include = next(
        (Path(h) / "include" for h in homes if h and Path(h, "include", "cuda_runtime_api.h").exists()), None
    )
    if cuda_include is None:
        pytest.skip("needs the CUDA toolkit's headers (the CI machine has CUDA 13.0's)")
    gen = tmp_path / "c10" / "cuda" / "impl"
    gen.mkdir(parents=True)
    (gen / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = ["c++", "-fsyntax-only", "-Wall", "-Werror", "-std=c++20", "-DRPO_FAST_WITH_CUDA", f"-I{CSRC}"]
    cmd += [f"-I{p}" for p in include_paths()] + [
        f"-I{tmp_path}",
        f"-I{cuda_include}",
        str(CSRC / "preference_loss.cpp"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


# --------------------------------------------------------------------------------------------------
# On the GPU machine: the CUDA kernels at SDXL shape, determinism, B = 4096
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("objective,opts,needs", CASES, ids=CASE_IDS)
def test_gpu_sdxl_shape_against_float64(objective, opts, needs, dtype):
    b = 4
    p, t, q = (x.cuda() for x in make_pairs(b, 4, 128, 128, dtype=dtype, shared_target=True, ref_noise=0.02, seed=50))
    fn, kw, ref_kw, p, t, q = call_case(objective, opts, needs, b, p, t, q, backend="native")
    kw = {k: v.cuda() for k, v in kw.items()}
    nat, nat_g = run_loss(fn, p, t, q, kw)
    ref, ref_g = ref_loss_and_grad(objective, p.cpu(), t.cpu(), None if q is None else q.cpu(), **ref_kw, **fn.options)
    assert_close("loss", nat.loss, ref, atol=LOSS_TOL[dtype][0], rtol=1e-4)
    assert_close("grad", nat_g, 1.7 * ref_g, atol=GRAD_TOL[dtype][0], rtol=GRAD_TOL[dtype][1])
    again = run_loss(fn, p, t, q, kw)
    assert torch.equal(again[0].loss, nat.loss) and torch.equal(again[1], nat_g)  # deterministic


@pytest.mark.gpu
@pytest.mark.parametrize("weighting", ["inside", "outside"])
def test_gpu_rpo_b4096(weighting):
    b = 4096
    p, t, q = (x.cuda() for x in make_pairs(b, 4, 4, 4, seed=51))
    ew, el = (e.cuda() for e in make_embeds(b, d=768))
    kw = dict(embeds_w=ew, embeds_l=el)
    opts = dict(beta=BETA, weighting=weighting, scope="local")
    nat = run_loss(PreferenceLoss("rpo", backend="native", **opts), p, t, q, kw)
    eag = run_loss(
        PreferenceLoss("rpo", backend="eager", **opts),
        p.double(),
        t.double(),
        q.double(),
        {k: v.double() for k, v in kw.items()},
    )
    assert_close("loss", nat[0].loss, eag[0].loss, atol=1e-6, rtol=1e-4)
    assert_close("grad", nat[1], eag[1], atol=1e-5, rtol=1e-3)


def record_figures() -> None:
    """Write csrc/ptxas_figures.json: this nvcc's figures, one kernel a line."""
    rows = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in ptxas_figures().items()]
    text = "{\n" + f' "nvcc": {json.dumps(nvcc_version())},\n "kernels": {{\n' + ",\n".join(rows) + "\n }\n}\n"
    PTXAS_FIGURES.write_text(text)
    print(f"wrote {PTXAS_FIGURES}")


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    record_figures()


def test_objective_ids_and_metric_order_are_csrc_enums():
    """The kernels' objective ids (Triton's OBJ) are the named constants of kernels.shared, and csrc's enums repeat
    them and the metrics vector's order; every objective the table declares fused has a kernel branch."""
    from rpo_fast.kernels import shared
    from rpo_fast.objectives import OBJECTIVE_TABLE

    header = (Path(N.__file__).resolve().parents[2] / "csrc" / "preference_loss.h").read_text()
    enum = re.search(r"enum Objective : int \{([^}]*)\}", header).group(1)
    ids = {k.strip(): int(v) for k, v in (item.split("=") for item in enum.split(","))}
    names = dict(kDPO="DPO", kSFT="SFT", kRPO="RPO", kDSPO="DSPO", kDense="DENSE", kCal="CAL")
    assert {names[k]: v for k, v in ids.items()} == {n: getattr(shared, n) for n in names.values()}
    assert {KB[0] for KB in shared.KERNEL_BRANCH.values()} == set(ids.values())
    metrics = re.search(r"enum Metric : int \{([^}]*)\}", header).group(1).replace("\n", " ").split(",")
    assert len(metrics) - 1 == len(shared.METRIC_NAMES) and metrics[0].strip() == "kLoss = 0"
    assert {k for k, o in OBJECTIVE_TABLE.items() if o.fused} == set(shared.KERNEL_BRANCH)
