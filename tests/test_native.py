"""What only the native backend (csrc/, ``backend="native"``) has; the suite it shares with the Triton op is
``test_fused.py``: a channels_last gradient keeps its layout; mixed dtypes and float64 go through exact fp32 copies;
the three C++ ops under opcheck and their own checks; the build (ahead of time, and a clear error without sources);
the CUDA source compiled for sm_80 and sm_90 with its ptxas figures held (no spills); the objective ids and metric
order held equal to csrc's enums.
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
    assert_close,
    make_pairs,
    op_args,
    run_loss,
)

from rpo_fast import PreferenceLoss
from rpo_fast.kernels import native as N

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")
CSRC = Path(__file__).resolve().parents[1] / "csrc"
PTXAS_FIGURES = CSRC / "ptxas_figures.json"


# --------------------------------------------------------------------------------------------------
# Layouts and dtypes the Triton op does not take
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The C++ ops: opcheck, their checks, the build
# --------------------------------------------------------------------------------------------------


def test_opcheck_the_cpp_ops():
    """The three C++ ops (schemas with their mutated outputs, fake kernels) on their own."""
    p, t, q, ew, el, *_ = op_args("rpo", DEV)
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
    loss = PreferenceLoss("dpo")
    loss.spec = dataclasses.replace(loss.spec, fused=False)
    assert (loss.backend_for("cuda"), loss.backend_for("cpu")) == ("compile", "eager")


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
