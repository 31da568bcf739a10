"""Forward+backward of the preference loss: triton vs native vs eager vs torch.compile(eager), side by side.

Per (objective family, latent shape, pairs B, dtype): seconds per call from CUDA events over many
back-to-back calls and from CUDA-graph replay (reported separately), speedups, achieved bytes/s against the
minimum traffic, its fraction of a device-to-device copy measured in the same run, and kernel launches.

Minimum traffic (spec section 7; target shared by winner and loser, as the trainer passes it):
forward reads p and q (2B rows each) and t (B rows); backward reads p and t (and q for DSPO) and writes the
gradient (2B rows).
"""

import pytest
import torch
from bench_utils import QUICK, ResultTable, copy_bandwidth, count_launches, sync, time_graph, time_loop
from registry import DTYPES, EMBED_DIM, LATENTS, loss_configs
from torch._dynamo.utils import counters

from rpo_fast import PreferenceLoss

DEV = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = ("triton", "native", "eager", "compile")
ITERS = 2 if QUICK else 50
COLUMNS = [
    "family",
    "latents",
    "B",
    "dtype",
    "triton_ms",
    "native_ms",
    "eager_ms",
    "compile_ms",
    "triton_graph_ms",
    "native_graph_ms",
    "eager_graph_ms",
    "compile_graph_ms",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "native_vs_triton",
    "MB",
    "triton_GBps",
    "native_GBps",
    "copy_fraction",
    "launches_triton",
    "launches_native",
    "launches_eager",
    "launches_compile",
]
_copy_rate = {}


def setup_preference_loss(family: str, shape: str, b: int, dtype: str, provider: str):
    """Inputs and the timed callable (forward + backward) for one provider."""
    c, h, w = LATENTS[shape]
    dt = DTYPES[dtype]
    g = torch.Generator(device=DEV).manual_seed(0)
    p = torch.randn(2 * b, c, h, w, device=DEV, dtype=dt, generator=g).requires_grad_(True)
    t = torch.randn(b, c, h, w, device=DEV, dtype=dt, generator=g)
    q = (p.detach() + 0.02 * torch.randn(2 * b, c, h, w, device=DEV, generator=g)).to(dt)
    kw = {}
    if family == "rpo":
        kw = dict(
            embeds_w=torch.randn(b, EMBED_DIM, device=DEV, generator=g),
            embeds_l=torch.randn(b, EMBED_DIM, device=DEV, generator=g),
        )
    opts = dict(scope="local") if family == "rpo" else {}
    loss_fn = PreferenceLoss(family, backend=provider, **opts)
    one = torch.ones((), device=DEV)  # the backward's seed, allocated once: no fill kernel in the count

    def step():
        out = loss_fn(p, t, q, **kw)
        return torch.autograd.grad(out.loss, p, grad_outputs=one)

    es = p.element_size()
    n = c * h * w
    nbytes = (4 * b * n + b * n) * es + (2 * b * n * 2 + b * n + (2 * b * n if family == "dspo" else 0)) * es
    return step, nbytes


@pytest.mark.bench
@pytest.mark.parametrize("family,shape,b,dtype", list(loss_configs()), ids=lambda v: str(v))
def test_preference_loss(benchmark, results, family, shape, b, dtype):
    table = results.setdefault(
        "loss",
        ResultTable(
            "preference_loss",
            "Preference loss, forward + backward: triton vs native vs eager vs torch.compile(eager)",
            COLUMNS,
            notes="Times: ms per call, CUDA events over back-to-back calls (no sync per call); *_graph_ms: CUDA "
            "graph replay of one call. native: the C++/CUDA op of csrc/; native_vs_triton: native_ms over triton_ms. "
            "MB: minimum bytes moved (reads + writes). copy_fraction: triton_GBps over "
            "a device-to-device copy measured in the same run. Command: pytest benchmarks/ --benchmark",
            key=("family", "latents", "B", "dtype"),
        ),
    )
    row = dict(family=family, latents="x".join(map(str, LATENTS[shape])), B=b, dtype=dtype)
    if table.measured(**row):
        pytest.skip("measured earlier at this commit (RPO_FAST_BENCH_RESUME=1)")
    if "rate" not in _copy_rate:
        _copy_rate["rate"] = copy_bandwidth()
    steps = {}
    for provider in PROVIDERS:
        if provider == "compile":
            # Dynamo keeps at most recompile_limit (8) graphs per function and then runs it eagerly without
            # saying so in the timings: start every configuration from empty caches
            torch._dynamo.reset()
            graphs = counters["stats"]["unique_graphs"]
        step, nbytes = setup_preference_loss(family, shape, b, dtype, provider)
        steps[provider] = step
        row[f"{provider}_ms"] = time_loop(step, ITERS) * 1e3
        graph = time_graph(step, ITERS)
        row[f"{provider}_graph_ms"] = None if graph is None else graph * 1e3
        row[f"launches_{provider}"] = count_launches(step)

    def many():  # what pytest-benchmark times: ITERS back-to-back calls between two synchronisations
        for _ in range(ITERS):
            steps["triton"]()
        sync()

    benchmark.pedantic(many, rounds=3 if QUICK else 10, iterations=1, warmup_rounds=1)
    row["speedup_vs_eager"] = row["eager_ms"] / row["triton_ms"]
    row["speedup_vs_compile"] = row["compile_ms"] / row["triton_ms"]
    row["MB"] = nbytes / 1e6
    best = min(x for x in (row["triton_ms"], row["triton_graph_ms"]) if x is not None)
    row["triton_GBps"] = nbytes / (best / 1e3) / 1e9
    native = min(x for x in (row["native_ms"], row["native_graph_ms"]) if x is not None)
    row["native_GBps"] = nbytes / (native / 1e3) / 1e9
    row["native_vs_triton"] = row["native_ms"] / row["triton_ms"]
    rate = _copy_rate["rate"]
    row["copy_fraction"] = None if rate is None else row["triton_GBps"] * 1e9 / rate
    table.add(**row)
    assert counters["stats"]["unique_graphs"] > graphs, "torch.compile ran no compiled graph: the row would be eager"
    for provider in PROVIDERS:  # every provider really computed a finite gradient
        (grad,) = steps[provider]()
        assert torch.isfinite(grad).all(), provider
