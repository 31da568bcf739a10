"""The preference loss on a CPU, forward + backward: native (csrc/) vs eager vs torch.compile(eager), side by side.

A CPU figure, and only that: it says what the fused C++ path gives a CPU run (the demo, the tests, a machine
without a GPU), nothing about a GPU. Per (objective family, latent shape, pairs B, dtype): milliseconds per call,
each provider timed in turn within every round (a loaded 2-core machine drifts; the fastest round is kept), and
the ratios against native.

    python benchmarks/bench_loss_cpu.py            # SD1.5 (4x64x64) and SDXL (4x128x128) latents, B = 1 and 4,
                                                   # fp32 and bf16: benchmarks/results/loss_cpu-cpu.{json,md}
    python benchmarks/bench_loss_cpu.py --quick    # one small row per family, under pytest (CI)
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
from bench_utils import ResultTable, cpu_name, time_loop  # noqa: E402
from registry import EMBED_DIM, FAMILIES  # noqa: E402

from rpo_fast import PreferenceLoss  # noqa: E402

PROVIDERS = ("native", "eager", "compile")
LATENTS = {"sd15": (4, 64, 64), "sdxl": (4, 128, 128)}
PAIRS = (1, 4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
COLUMNS = ["family", "latents", "B", "dtype", "native_ms", "eager_ms", "compile_ms", "eager_vs_native"]
COLUMNS += ["compile_vs_native", "threads", "command"]


def setup(family: str, shape: tuple[int, int, int], b: int, dtype: torch.dtype, provider: str):
    """Inputs and the timed callable (forward + backward), as the trainer calls the loss: the target shared."""
    c, h, w = shape
    g = torch.Generator().manual_seed(0)
    p = torch.randn(2 * b, c, h, w, generator=g).to(dtype).requires_grad_(True)
    t = torch.randn(b, c, h, w, generator=g).to(dtype)
    q = (p.detach().float() + 0.02 * torch.randn(2 * b, c, h, w, generator=g)).to(dtype)
    kw = {}
    if family == "rpo":
        kw = dict(embeds_w=torch.randn(b, EMBED_DIM, generator=g), embeds_l=torch.randn(b, EMBED_DIM, generator=g))
    loss_fn = PreferenceLoss(family, backend=provider, **(dict(scope="local") if family == "rpo" else {}))

    def step():
        out = loss_fn(p, t, q, **kw)
        return torch.autograd.grad(out.loss, p)

    return step


def configs(quick: bool):
    if quick:
        return [(family, (4, 16, 16), 2, "fp32") for family in FAMILIES]
    return list(itertools.product(FAMILIES, LATENTS.values(), PAIRS, DTYPES))


def run(quick: bool = False, iters: int = 20, rounds: int = 3, command: str = "") -> ResultTable:
    table = ResultTable(
        "loss_cpu",
        "Preference loss on a CPU, forward + backward: native (C++) vs eager vs torch.compile(eager)",
        COLUMNS,
        notes=f"A CPU figure (no GPU involved). ms per call: the mean of {iters} back-to-back calls, the fastest of "
        f"{rounds} rounds, the providers timed in turn within each round; torch.compile's compilation is outside "
        "the timing (Dynamo is reset per configuration). The target is shared by winner and loser (the trainer's "
        "call); RPO in local scope with a 768-wide embedding. *_vs_native: that provider's time over native's.",
        key=("family", "latents", "B", "dtype"),
        device="" if quick else "cpu",  # the quick mode writes to .benchmarks/ (not committed)
    )
    table.env["device"] = cpu_name()
    table.env["mode"] = "CPU figures (quick: CI's check that it runs)" if quick else "CPU figures"
    for family, shape, b, dtype in configs(quick):
        torch._dynamo.reset()
        steps = {provider: setup(family, shape, b, DTYPES[dtype], provider) for provider in PROVIDERS}
        best = dict.fromkeys(PROVIDERS, float("inf"))
        for _ in range(rounds):
            for provider, step in steps.items():
                best[provider] = min(best[provider], time_loop(step, iters, warmup=2) * 1e3)
        for provider, step in steps.items():  # every provider computed a finite gradient
            (grad,) = step()
            assert torch.isfinite(grad).all(), f"{provider}: a non-finite gradient"
        table.add(
            family=family,
            latents="x".join(map(str, shape)),
            B=b,
            dtype=dtype,
            native_ms=best["native"],
            eager_ms=best["eager"],
            compile_ms=best["compile"],
            eager_vs_native=best["eager"] / best["native"],
            compile_vs_native=best["compile"] / best["native"],
            threads=torch.get_num_threads(),
            command=command,
        )
        print(f"[bench] {table.rows[-1]}", flush=True)
    return table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one small configuration per family, 2 calls (CI)")
    ap.add_argument("--iters", type=int, default=20, help="back-to-back calls per timing (default 20)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, the fastest kept (default 3)")
    a = ap.parse_args(argv)
    command = "python benchmarks/bench_loss_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = run(a.quick, 2 if a.quick else a.iters, 1 if a.quick else a.rounds, command.strip())
    for p in table.write():
        print(f"[bench] wrote {p}")


if __name__ == "__main__":
    main()
