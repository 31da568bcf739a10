"""Compile every Triton kernel launch of the op ahead of time for real GPUs, on a machine without one.

The interpreter (TRITON_INTERPRET=1, what CPU tests run) executes kernels as numpy and accepts code that
Triton's compiler rejects: a loop-carried variable whose type changes, a shared-memory tile too big for the
device. This script runs every objective and option of ``PreferenceLoss(backend="triton")`` (forward and
backward) on CPU tensors of test and production shapes with the kernels replaced by recorders, then
compiles each distinct specialization (argument types, alignment and ``== 1`` specialization, constexprs,
warps: what ``JITFunction.run`` would compile) to PTX and cubin with Triton's own ptxas, for sm_80 (A100)
and sm_90 (H100/H200), and reads registers, spills and shared memory from the cubin.

    python tests/compile_kernels.py [--arch 80 90] [--json FILE]

It must run without TRITON_INTERPRET (``@triton.jit`` decides at import); tests/test_kernels.py runs it in
a subprocess and checks its report.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_kernels.py: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default of Triton 3.9, stated to silence its warning

import torch  # noqa: E402
import triton  # noqa: E402
from helpers import CASES, call_case, make_pairs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

import rpo_fast.kernels.preference_loss as K  # noqa: E402

KERNELS = ("_errors_fwd_kernel", "_errors_bwd_kernel", "_pair_kernel", "_rpo_row_kernel", "_rpo_col_kernel")
SMEM_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory a block may opt in to (A100, H100/H200)
SM_COUNT = 132  # the H100's SMs: the chunking of the error pass depends on it


class Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` records, for each backend, what
    ``JITFunction.run`` would compile (argument types, alignment and ``== 1`` specialization, constexprs,
    options), keeping no tensor."""

    def __init__(self, fn, backends, specs):
        self.fn, self.backends, self.specs = fn, backends, specs
        self.binder = {arch: create_function_from_signature(fn.signature, fn.params, b) for arch, b in backends.items()}

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, **kw):
        for arch, backend in self.backends.items():
            bound, spec, opts = self.binder[arch](*args, **kw)
            options, sig, consts, attrs = self.fn._pack_args(backend, kw, bound, spec, opts)
            key = repr((arch, self.fn.__name__, sorted(sig.items()), sorted(consts.items()), sorted(attrs.items())))
            self.specs.setdefault(key + repr(options.num_warps), (arch, self.fn, sig, consts, attrs, options))


def record_specializations(backends: dict) -> list:
    """Every distinct specialization launched by forward + backward over the cases of tests/helpers.py (odd
    test shapes, both layouts, three dtypes) and production shapes (SD1.5 and SDXL latents, B up to 64;
    the pairwise kernels up to B = 4096 with CLIP-sized embeddings)."""
    specs = {}
    saved = {name: getattr(K, name) for name in KERNELS}
    saved_target = K._grid_target
    for name in KERNELS:
        setattr(K, name, Recorder(saved[name], backends, specs))
    K._grid_target = lambda device: 4 * SM_COUNT  # chunk the error pass as on an H100
    try:
        shapes = [(b, (4, 5, 7), False) for b in (1, 3, 7)] + [(3, (4, 5, 7), True)]  # the CPU tests' shapes
        shapes += [(b, hw, False) for b in (1, 4, 16, 64) for hw in ((4, 64, 64), (4, 128, 128))]
        shapes += [(4, (4, 128, 128), True)]
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for b, (c, h, w), channels_last in shapes:
                for shared in (False, True):
                    for objective, opts, needs in CASES:
                        p, t, q = make_pairs(b, c, h, w, dtype=dtype, shared_target=shared, channels_last=channels_last)
                        fn, kw, _, p, t, q = call_case(objective, opts, needs, b, p, t, q, backend="triton")
                        p.requires_grad_(True)
                        fn(p, t, q, **kw).loss.backward()
        for b in (256, 4096):  # the pairwise kernels alone at global-scope batch sizes
            part = torch.rand(2 * b, 4, K.K)
            for d, edtype in ((768, torch.float32), (1024, torch.float16), (1024, torch.bfloat16)):
                e = torch.randn(b, d, dtype=edtype)
                for inside in (0.0, 1.0):
                    K.pair_fwd(part, 65536, "rpo", [5000.0, 0.1, inside], embeds_w=e, embeds_l=e.clone())
            for objective, params in (("dpo", [5000.0]), ("dspo", [1.0, 1.0, 1.0]), ("cal-dpo", [5000.0, 0.001, 1.0])):
                K.pair_fwd(part, 65536, objective, params, weights=torch.rand(b))
    finally:
        for name, fn in saved.items():
            setattr(K, name, fn)
        K._grid_target = saved_target
    return list(specs.values())


def resource_usage(cubin: bytes, tool: str) -> dict:
    """Registers, spill stores/loads and shared memory from ``cuobjdump -res-usage``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    assert m, f"cuobjdump output not understood:\n{text}"
    reg, stack, shared, local = map(int, m.groups())
    return {"regs": reg, "stack": stack, "static_shared": shared, "local": local}


def compile_all(archs: list[int]) -> list[dict]:
    targets = {arch: GPUTarget("cuda", arch, 32) for arch in archs}
    specs = record_specializations({arch: make_backend(t) for arch, t in targets.items()})
    tool = str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")
    rows = []
    for arch, fn, sig, consts, attrs, options in specs:
        row = {
            "arch": f"sm_{arch}",
            "kernel": fn.__name__,
            "constexprs": {fn.arg_names[k[0]]: v for k, v in consts.items() if len(k) == 1},
            "signature": {k: v for k, v in sig.items() if v != "constexpr"},
            "num_warps": options.num_warps,
        }
        t0 = time.perf_counter()
        try:
            k = compile(ASTSource(fn, sig, consts, attrs), target=targets[arch], options=options.__dict__)
        except Exception as e:  # report every failure, not just the first
            row["error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            continue
        row["compile_s"] = round(time.perf_counter() - t0, 3)
        row["shared"] = k.metadata.shared
        row.update(resource_usage(k.asm["cubin"], tool))
        row["smem_limit"] = SMEM_LIMIT[arch]
        rows.append(row)
    return sorted(rows, key=lambda r: (r["arch"], r["kernel"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--json", type=Path, help="write the report here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # compile for real, not from an earlier run's cache
        rows = compile_all(args.arch)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(f"{'arch':6} {'kernel':20} {'warps':>5} {'regs':>4} {'local':>5} {'shared':>6}  constexprs")
    for r in rows:
        if "error" in r:
            print(f"{r['arch']:6} {r['kernel']:20} ERROR {r['error'][:300]}")
            continue
        cx = ",".join(f"{k}={v}" for k, v in r["constexprs"].items())
        print(f"{r['arch']:6} {r['kernel']:20} {r['num_warps']:5} {r['regs']:4} {r['local']:5} {r['shared']:6}  {cx}")
    errors = sum("error" in r for r in rows)
    print(f"{len(rows)} specializations, {errors} failed to compile")
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
