"""The communication table of docs/guides/deepspeed.md is what benchmarks/plans/comm_plan.py computes, and its model of
the collectives gives what the collectives' sizes say."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
import comm_plan as C  # noqa: E402


def test_the_readme_table_is_the_scripts():
    assert C.table() in (ROOT / "docs" / "guides" / "deepspeed.md").read_text()


def test_the_model_of_the_collectives():
    p = 2_567_463_684  # SDXL's UNet, counted on the meta device
    assert C.policy_params("sdxl") == p
    w = 2 * p  # bf16 parameters; the gradients are as large
    # ZeRO-3 with recompute at 64 GPUs: three all-gathers of the parameters and a reduce-scatter of the gradients
    t = C.traffic(p, 64, 3, False, recompute=True)
    assert t.inter == pytest.approx(4 * w * 63 / 64) and t.intra == 0
    assert t.seconds(64) == pytest.approx(4 * w * 63 / 64 / 45e9)
    # stage 0 all-reduces once per optimizer step: accumulation divides it; stage 2 reduce-scatters every micro-step
    assert C.traffic(p, 64, 0, False, recompute=False, accum=16).inter == pytest.approx(2 * w * 63 / 64 / 16)
    assert C.traffic(p, 64, 2, False, recompute=False, accum=16).inter == pytest.approx(w * 63 / 64 * (1 + 1 / 16))
    # ZeRO++: int8 weights and int4 gradients across nodes, the backward's gathers within the node
    zpp = C.traffic(p, 64, 3, True, recompute=True)
    assert zpp.inter == pytest.approx((w / 2 + w / 4) * 63 / 64) and zpp.intra == pytest.approx(2 * w * 7 / 8)
    assert zpp.seconds(64) < t.seconds(64) / 3
    # one node: every byte over NVLink
    assert C.traffic(p, 8, 3, False, recompute=False).seconds(8) == pytest.approx(3 * w * 7 / 8 / 450e9)


def test_rpo_global_scope_at_scale():
    assert C.rpo_table() in (ROOT / "docs" / "guides" / "deepspeed.md").read_text()
    # per pair: both samples' 5 fp32 partial sums and both 768-wide embeddings, packed as fp32, in one all-gather
    assert C.rpo_global(256)["gather_bytes"] == 256 * 2 * (5 + 768) * 4 == 1_583_104
    from rpo_fast.kernels.shared import K

    assert C.PARTIAL_SUMS == K
    r = C.rpo_global(4096)
    assert r["matrix_flops"] == 2 * 4096**2 * 768 and r["matrix_bytes"] == 4096**2 * 4
