"""--recompute none|selective|full: the same losses and gradients, less memory kept, the FLOPs counted; the
cost table of docs/guides/performance.md is what benchmarks/plans/recompute_cost.py computes."""

from pathlib import Path

import pytest
import torch
from helpers import assert_close

from rpo_fast import testing as T
from rpo_fast.config import TrainConfig, recompute_mode
from rpo_fast.models import load_family
from rpo_fast.recompute import RECOMPUTE, apply_recompute, selective_checkpoint, step_cost

ROOT = Path(__file__).resolve().parents[1]


def _grads(family, mode: str):
    unet = T.build_unet(family.name, seed=3)
    apply_recompute(unet, mode)
    torch.manual_seed(1)
    x, t, cond = family.dummy_inputs(4)  # fresh random inputs, 2 pairs
    out = family.predict(unet, x, t, cond)
    loss = (out.float() * torch.randn_like(out)).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_every_recompute_choice_gives_the_same_loss_and_gradients(kind, tmp_path):
    """fp32 on CPU, tolerance 1e-6 of each gradient's range: recompute runs the same ops on the same inputs."""
    family = load_family(T.save_model_configs(tmp_path / kind, kind, full=False))
    loss0, grads0 = _grads(family, "none")
    assert all(g.abs().sum() > 0 for g in grads0.values())  # every parameter reached
    for mode in ("selective", "full"):
        loss, grads = _grads(family, mode)
        assert_close(f"{mode} loss", loss, loss0, atol=1e-6, rtol=1e-6)
        for name, g in grads.items():
            assert_close(f"{mode} {name}", g, grads0[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_selective_keeps_less_than_none_for_no_extra_matmul_flops(kind, tmp_path):
    family = load_family(T.save_model_configs(tmp_path / kind, kind, full=False))
    cost = {mode: step_cost(family, mode) for mode in RECOMPUTE}
    none, sel, full = cost["none"], cost["selective"], cost["full"]
    assert none["activation_bytes"] > sel["activation_bytes"] > full["activation_bytes"] > 0
    assert sel["hardware_flops"] == none["hardware_flops"] < full["hardware_flops"]
    assert none["forward_flops"] == sel["forward_flops"] == full["forward_flops"]
    # full recompute runs every checkpointed block's forward again: at most one more forward
    assert full["hardware_flops"] - none["hardware_flops"] <= none["forward_flops"]


def test_selective_checkpoints_every_block_with_the_save_list():
    unet = T.build_unet("sdxl")
    apply_recompute(unet, "selective")
    marked = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False)]
    assert marked and all(m._gradient_checkpointing_func is selective_checkpoint for m in marked)
    assert len(marked) == sum(hasattr(m, "gradient_checkpointing") for m in unet.modules())
    apply_recompute(unet, "none")
    assert not any(getattr(m, "gradient_checkpointing", False) for m in unet.modules())
    with pytest.raises(ValueError, match="recompute must be one of"):
        apply_recompute(unet, "some")


def test_gradient_checkpointing_is_the_alias_of_full():
    cfg = dict(ds_config="x", model="m", data="d")
    assert recompute_mode(TrainConfig(**cfg)) == "none"
    assert recompute_mode(TrainConfig(**cfg, gradient_checkpointing=True)) == "full"
    assert recompute_mode(TrainConfig(**cfg, recompute="selective")) == "selective"
    with pytest.raises(ValueError, match="conflicts with --recompute selective"):
        recompute_mode(TrainConfig(**cfg, recompute="selective", gradient_checkpointing=True))


@pytest.mark.slow
def test_readme_cost_table_is_the_counted_one():
    import recompute_cost

    assert recompute_cost.table() in (ROOT / "docs" / "guides" / "performance.md").read_text()


@pytest.mark.parametrize("groups", [1, 8])
def test_a_grouped_convolutions_backward_is_counted_as_its_arithmetic(groups):
    """The plans' FLOP counter: a convolution's backward is its forward's count per gradient (input and weight), for a
    depthwise (grouped) convolution too, where torch's own formula counts it as dense (groups x too many); with
    groups = 1 the count is torch's."""
    from torch.utils.flop_counter import FlopCounterMode

    from rpo_fast.recompute import flop_counter

    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    counts = []
    for counter in (flop_counter(), FlopCounterMode(display=False)):
        with counter:
            y = conv(x)
            forward = counter.get_total_flops()
            y.sum().backward()
        counts.append((forward, counter.get_total_flops() - forward))
    (forward, backward), (_, torch_backward) = counts
    assert forward == 2 * 2 * 36 * 8 * (8 // groups) * 9  # 2 FLOPs a multiply-add, per output element and tap
    assert backward == 2 * forward
    assert (torch_backward == backward) == (groups == 1)
