"""Bytes each GPU sends per micro-step for the full-size SD1.5 and SDXL UNets under each ZeRO stage, at 8, 64 and
256 GPUs: a model of DeepSpeed's collectives computed from the parameter counts (counted on the meta device) and
the configs, not a measurement.

    python benchmarks/plans/comm_plan.py      # the tables of docs/guides/deepspeed.md (tests/test_comm_plan.py)

Per GPU, with N GPUs, k GPUs a node, W = 2 P bytes of bf16 parameters and G = 2 P bytes of bf16 gradients (P the
trainable parameters of the policy), a ring collective sends (N - 1) / N of its size for an all-gather or a
reduce-scatter and twice that for an all-reduce. With A micro-steps per optimizer step:

- stage 0: the gradients all-reduced once per optimizer step: 2 G (N-1)/N / A;
- stage 1: reduce-scattered once per optimizer step, the updated parameters all-gathered: (G + W)(N-1)/N / A;
- stage 2: reduce-scattered in every micro-step's backward, the parameters all-gathered per step:
  G (N-1)/N + W (N-1)/N / A;
- stage 3: every micro-step all-gathers the parameters in the forward, again in the backward, and once more for
  the recomputed forward (``--recompute full`` or ``selective``), and reduce-scatters the gradients:
  (2 + r) W (N-1)/N + G (N-1)/N;
- stage 3 with ZeRO++ (``zero_hpz_partition_size`` = k, ``zero_quantized_weights``, ``zero_quantized_gradients``):
  the forward's gather crosses nodes in int8 (W / 2), the backward's and the recompute's gather only within the
  node from the secondary partition, the gradients cross nodes in int4 (G / 4); inter-node
  W/2 (N-1)/N + G/4 (N-1)/N, intra-node (1 + r) W (k-1)/k;
- the frozen reference: nothing when replicated (the default); ``--ref-placement zero3`` all-gathers its W once
  per micro-step (one forward, no backward).

RPO's global scope (``rpo_global``) adds ONE all-gather per micro-step carrying, per pair, both samples' K = 5 fp32
partial sums (the fused kernels'; the eager path sends 3 error values) and both 768-wide embeddings packed as fp32:
6,184 bytes a pair, every rank receiving all of them; the fused backward sends nothing, the eager one a
reduce-scatter of 24 bytes a pair. Its B x B matrix costs B^2 x E multiply-adds for the cosines and B^2 fp32
entries a handful of times over; ``rpo_table`` counts both at 256 and 4,096 pairs per micro-step.

Times assume 45 GB/s per GPU between nodes (a 400 Gb/s
InfiniBand port per GPU, as the scale-out issue does) and 450 GB/s within a node (NVLink); intra-node traffic is
counted at NVLink speed only where every GPU of the ring is in one node (N <= k).
"""

from __future__ import annotations

from dataclasses import dataclass

GPUS = (8, 64, 256)
PER_NODE = 8
INTER_GBPS, INTRA_GBPS = 45.0, 450.0
PLANS = [  # (plan, ZeRO stage, ZeRO++, micro-steps per optimizer step, recompute)
    ("stage 0", 0, False, 1, False),
    ("stage 0, `--grad-accum 16`", 0, False, 16, False),
    ("stage 1 (`zero1_8bit.json`), `--grad-accum 16`", 1, False, 16, False),
    ("stage 2 (`zero2_8bit.json`)", 2, False, 1, False),
    ("stage 2, `--grad-accum 16`", 2, False, 16, False),
    ("stage 3 (`zero3_8bit.json`)", 3, False, 1, False),
    ("stage 3, `--recompute full`", 3, False, 1, True),
    ("stage 3 + ZeRO++ (hpZ = 8, qwZ, qgZ)", 3, True, 1, False),
    ("stage 3 + ZeRO++, `--recompute full`", 3, True, 1, True),
]


@dataclass
class Traffic:
    inter: float  # bytes per GPU per micro-step over the links between nodes (all of it when N > k)
    intra: float  # bytes per GPU per micro-step within a node

    def seconds(self, n: int) -> float:
        if n <= PER_NODE:  # one node: every collective runs over NVLink
            return (self.inter + self.intra) / (INTRA_GBPS * 1e9)
        return self.inter / (INTER_GBPS * 1e9) + self.intra / (INTRA_GBPS * 1e9)


def traffic(params: int, n: int, stage: int, zeropp: bool, *, recompute: bool, accum: int = 1) -> Traffic:
    """Bytes one GPU sends per micro-step for ``params`` trainable bf16 parameters (see the module's formulas)."""
    w = g = 2.0 * params
    ring = (n - 1) / n
    r = 1 if recompute else 0
    if stage == 0:
        return Traffic(2 * g * ring / accum, 0.0)
    if stage == 1:
        return Traffic((g + w) * ring / accum, 0.0)
    if stage == 2:
        return Traffic(g * ring + w * ring / accum, 0.0)
    if not zeropp:
        return Traffic((2 + r) * w * ring + g * ring, 0.0)
    k = min(PER_NODE, n)
    return Traffic(w / 2 * ring + g / 4 * ring, (1 + r) * w * (k - 1) / k)


def policy_params(kind: str) -> int:
    from rpo_fast import testing as T

    return sum(p.numel() for p in T.build_unet(kind, full=True, device="meta").parameters())


PARTIAL_SUMS = 5  # rpo_fast.kernels.shared.K
RPO_PAIRS = (256, 4096)


def rpo_global(pairs: int, embed_dim: int = 768) -> dict:
    """RPO's global scope per micro-step with ``pairs`` pairs on all ranks together: bytes of its one all-gather (each
    rank receives about all of it), FLOPs of the B x B cosine matrix (multiply-adds x 2) and bytes of one B x B
    fp32 matrix."""
    per_pair = 2 * (PARTIAL_SUMS + embed_dim) * 4
    return dict(
        gather_bytes=pairs * per_pair,
        matrix_flops=2 * pairs * pairs * embed_dim,
        matrix_bytes=pairs * pairs * 4,
    )


def rpo_table() -> str:
    rows = ["| pairs per micro-step (all ranks) | all-gather per micro-step | cosine matrix | one B x B fp32 matrix |"]
    rows.append("|---|---|---|---|")
    for b in RPO_PAIRS:
        r = rpo_global(b)
        rows.append(
            f"| {b:,} | {r['gather_bytes'] / 1e6:.1f} MB ({r['gather_bytes'] / (INTER_GBPS * 1e9) * 1e3:.2f} ms at "
            f"{INTER_GBPS:.0f} GB/s) | {r['matrix_flops'] / 1e9:.1f} GFLOP | {r['matrix_bytes'] / 1e6:.1f} MB |"
        )
    return "\n".join(rows)


def table() -> str:
    rows = [
        "| model (trainable parameters) | plan | "
        + " | ".join(f"{n} GPUs: GB per GPU per micro-step (ms)" for n in GPUS)
        + " |",
        "|---|---|" + "---|" * len(GPUS),
    ]
    for kind in ("sd15", "sdxl"):
        params = policy_params(kind)
        for plan, stage, zeropp, accum, recompute in PLANS:
            cells = []
            for n in GPUS:
                t = traffic(params, n, stage, zeropp, recompute=recompute, accum=accum)
                ms = t.seconds(n) * 1e3
                cells.append(
                    f"{(t.inter + t.intra) / 1e9:.2f} ({ms:.0f})"
                    if ms >= 10
                    else f"{(t.inter + t.intra) / 1e9:.2f} ({ms:.1f})"
                )
            rows.append(f"| {kind} ({params / 1e9:.2f} B) | {plan} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
    print()
    print(rpo_table())
