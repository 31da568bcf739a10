"""What only the Triton backend (``rpo_fast.kernels.preference_loss``) has; the suite it shares with the native op is
``test_fused.py``: the launch count of a step with no value read back to the host, and every specialization it
launches compiled for sm_80 and sm_90 (the interpreter accepts kernels Triton's compiler rejects).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from helpers import (
    BETA,
    make_embeds,
    make_pairs,
    run_loss,
)

from rpo_fast import PreferenceLoss
from rpo_fast.kernels import preference_loss as K

DEV = "cuda" if torch.cuda.is_available() else "cpu"
NAN = float("nan")


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
