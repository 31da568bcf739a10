"""Trainer variants on 2 CPU ranks with the tiny models: a ZeRO-3-sharded reference, LoRA, the optimizers, fp16
loss scaling, RPO's global contrast scope, compile, the attention choice, and the loss backends."""

import json
import math
import os
import re

import pytest
import torch
from trainrun import ZERO3, common, launch, train_rows

from rpo_fast.config import TrainConfig, validate

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _ok(res):
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


def test_zero3_reference_gives_the_losses_of_the_replicated_one(runs, tmp_path):
    """Tolerance: equal to the bit. Both references compute in bf16 from the same bf16-rounded weights; sharding
    changes where the weights live, not the arithmetic."""
    args = ["--objective", "dpo", "--max-steps", "3", "--no-export", "--mixed-precision", "bf16"]
    rep = _ok(launch(common(runs, "sd15", tmp_path / "rep", *args)))
    z3 = _ok(launch(common(runs, "sd15", tmp_path / "z3", *args, "--ref-placement", "zero3")))
    assert "reference: zero3" in z3.stdout and "reference: replicated" in rep.stdout
    a, b = train_rows(tmp_path / "rep"), train_rows(tmp_path / "z3")
    for step in (1, 2, 3):
        assert a[step]["loss/loss"] == b[step]["loss/loss"], step


def test_lora_trains_adapters_and_exports_what_diffusers_loads(runs, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "lora"
    res = _ok(
        launch(common(runs, "sd15", out, "--objective", "dpo", "--max-steps", "3", "--lora-rank", "4", "--lr", "1e-2"))
    )
    assert "LoRA rank 4" in res.stdout and "the policy without its adapters" in res.stdout
    rows = train_rows(out)
    assert rows[1]["reward/implicit_acc"] == 0.5  # B = 0 at init: policy == reference
    assert not (out / "unet").exists() and (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    pipe = StableDiffusionPipeline.from_pretrained(runs["sd15"], safety_checker=None)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    ehs = torch.randn(1, 77, 32)
    with torch.no_grad():
        before = pipe.unet(x, t, ehs).sample
        pipe.load_lora_weights(out / "lora")
        after = pipe.unet(x, t, ehs).sample
    assert (after - before).abs().max() > 1e-6  # the trained adapter is loaded and acts


@pytest.mark.parametrize("optimizer", ["lion8bit", "adafactor", "adamw"])
def test_other_optimizers_step(runs, tmp_path, optimizer):
    from diffusers import UNet2DConditionModel

    out = tmp_path / optimizer
    res = _ok(launch(common(runs, "sd15", out, "--objective", "dpo", "--max-steps", "2", "--optimizer", optimizer)))
    assert f"ZeRO-3, {optimizer}" in res.stdout
    assert all(math.isfinite(r["loss/loss"]) for r in train_rows(out).values())
    tuned = UNet2DConditionModel.from_pretrained(out / "unet")
    base = UNet2DConditionModel.from_pretrained(runs["sd15"], subfolder="unet")
    assert any((a - b.to(a.dtype)).abs().max() > 0 for a, b in zip(tuned.parameters(), base.parameters()))


def test_fp16_loss_scaling_counts_and_logs_overflows(runs, tmp_path):
    cfg = json.loads(ZERO3.read_text())
    cfg["fp16"]["initial_scale_power"] = 40  # 2^40: the first steps overflow, the scale comes down
    cfg["fp16"]["hysteresis"] = 1
    path = tmp_path / "fp16.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    args = common(
        runs, "sd15", out, "--objective", "dpo", "--max-steps", "5", "--mixed-precision", "fp16", "--no-export"
    )
    args[args.index("--ds_config") + 1] = str(path)
    os.environ["RPO_FAST_CPU_FP16"] = "1"  # this CPU lacks mkldnn fp16: let DeepSpeed run fp16 anyway (see train.py)
    try:
        _ok(launch(args))
    finally:
        del os.environ["RPO_FAST_CPU_FP16"]
    rows = train_rows(out)
    assert rows[5]["train/skipped_steps"] >= 1
    assert rows[1]["train/loss_scale"] > rows[5]["train/loss_scale"]
    assert all(math.isfinite(r["loss/loss"]) for r in rows.values())


def test_global_scope_on_two_ranks_equals_one_process_on_the_whole_batch(runs, tmp_path):
    """2 ranks x 2 pairs with --contrast-scope global against 1 rank x 4 pairs: the same pairs each step, with the
    same noise. Step 1 runs the initial policy (every scope gives log 2); step 1's update averages the same
    gradient on both (the all-gather convention), so step 2's loss compares the scopes. fp32 and torch AdamW (no
    8-bit rounding to amplify). Tolerance: rtol 1e-4 (batched convolutions round differently for 2 and 4 rows)."""
    args = [
        "--objective",
        "rpo",
        "--max-steps",
        "2",
        "--no-export",
        "--mixed-precision",
        "no",
        "--beta",
        "500",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
    ]
    _ok(launch(common(runs, "sd15", tmp_path / "two", *args, "--contrast-scope", "global")))
    one = common(runs, "sd15", tmp_path / "one", *args, "--contrast-scope", "global")
    one[one.index("--micro-batch-size") + 1] = "4"
    _ok(launch(one, ranks=1))
    _ok(launch(common(runs, "sd15", tmp_path / "local", *args, "--contrast-scope", "local")))
    two, single, local = (train_rows(tmp_path / n) for n in ("two", "one", "local"))
    assert two[2]["loss/loss"] == pytest.approx(single[2]["loss/loss"], rel=1e-4)
    assert two[2]["reward/reward_margin"] == pytest.approx(single[2]["reward/reward_margin"], rel=1e-3, abs=1e-6)
    assert abs(local[2]["loss/loss"] - single[2]["loss/loss"]) > 1e-3 * single[2]["loss/loss"]  # each rank alone


def test_loss_backends_give_the_same_losses(runs, tmp_path):
    """eager vs triton (the interpreter on CPU), 3 steps of RPO in fp32. Tolerance: rtol 1e-5 (the kernels and
    eager accumulate in a different order; the small differences in gradients carry into later steps)."""
    args = ["--objective", "rpo", "--max-steps", "3", "--no-export", "--mixed-precision", "no", "--beta", "500"]
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()  # set by conftest on CPU
    for backend in ("eager", "triton"):
        _ok(launch(common(runs, "sd15", tmp_path / backend, *args, "--loss-backend", backend)))
    a, b = train_rows(tmp_path / "eager"), train_rows(tmp_path / "triton")
    for step in (1, 2, 3):
        assert b[step]["loss/loss"] == pytest.approx(a[step]["loss/loss"], rel=1e-5), step


def test_compile(runs, tmp_path):
    """torch.compile through DeepSpeed's engine.compile on 2 ranks with ZeRO-3. On CPU the aot_eager backend checks
    the graph capture (dynamo + AOTAutograd) without inductor's C++ code generation, which takes minutes here;
    GPU runs use inductor (the default). The trainer reports Dynamo's count of the graphs it compiled."""
    out = tmp_path / "compiled"
    args = ["--objective", "dpo", "--max-steps", "2", "--compile", "--compile-backend", "aot_eager", "--no-export"]
    res = _ok(launch(common(runs, "sd15", out, *args), timeout=1200))
    graphs = re.search(r"torch\.compile: (\d+) graphs compiled", res.stdout)
    assert graphs and int(graphs.group(1)) >= 1, res.stdout[-2000:]
    assert all(math.isfinite(r["loss/loss"]) for r in train_rows(out).values())


def test_variant_flags_are_checked_before_loading(runs, tmp_path):
    base = dict(
        ds_config=str(ZERO3), model=str(runs["sd15"]), data=str(runs["root"] / "cache_sd15"), output=str(tmp_path / "o")
    )
    for kw, message in (
        (dict(attention="xformers"), "xformers is not installed"),
        (dict(attention="flash"), "--attention must be one of"),
        (dict(optimizer="paged_adamw8bit"), "--optimizer must be one of"),
        (dict(ref_placement="cpu"), "--ref-placement must be one of"),
        (dict(lora_rank=-1), "--lora-rank must be"),
        (dict(lora_rank=4, ref_placement="zero3"), "the reference is the policy without its adapters"),
    ):
        with pytest.raises(ValueError, match=message):
            validate(TrainConfig(**base, **kw))
