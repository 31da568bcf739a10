"""The trainer in this process (one rank): the DeepSpeed config for each scale and the step options train alike,
and ZeRO-3 on one rank warns."""

import warnings

import pytest
import torch
from trainrun import ROOT

from rpo_fast.config import TrainConfig
from rpo_fast.engine import ZeroOneRankWarning

pytestmark = pytest.mark.slow
CONFIGS = ROOT / "configs"


def _trainer(runs, out, **kw):
    from rpo_fast.train import Trainer

    cfg = dict(
        ds_config=str(CONFIGS / "single_gpu.json"),
        model=str(runs["sd15"]),
        data=str(runs["root"] / "cache_sd15"),
        output=str(out),
        objective="dpo",
        micro_batch_size=2,
        max_steps=100,
        optimizer="adamw",
        mixed_precision="no",
        export=False,
        progress=False,
        tensorboard=False,
    )
    return Trainer(TrainConfig(**(cfg | kw)))


def _losses(trainer, steps: int = 3) -> list[float]:
    out = []
    for _ in range(steps):
        trainer.train_step()
        out.append(trainer.metrics.mean(trainer.device)["loss"])
    trainer.close()
    return out


@pytest.fixture
def restore_linear():
    """ZeRO-3 replaces torch.nn.functional.linear for the whole process: put it back for the tests that follow."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


def test_engine_configs_and_recompute_train_alike(runs, tmp_path, restore_linear):
    """3 steps of DPO in fp32 with torch's AdamW: stage 0 (the one-GPU config) with each recompute choice, ZeRO-2 and
    ZeRO-3 (with recompute none and full) give the same losses. The first step's loss is before any update: equal to the
    bit. Later steps: the recompute choices on stage 0 within rtol 1e-6 (the same ops, recomputed); ZeRO-2/3 within rtol
    1e-4 (they step flat fp32 partitions and reduce gradients in buckets: the last bits differ, and beta 5000 amplifies
    them; one update moves the loss by 1.4%, so a missing or doubled update fails)."""
    zero2, zero3 = str(CONFIGS / "zero2_8bit.json"), str(CONFIGS / "zero3_8bit.json")
    groups = {
        "stage 0": [dict(), dict(recompute="selective"), dict(gradient_checkpointing=True)],
        # last: ZeRO-3 replaces F.linear for the rest of the process (restored after the test)
        "ZeRO": [dict(ds_config=zero2), dict(ds_config=zero3), dict(ds_config=zero3, recompute="full")],
    }
    losses = {}
    for group, variants in groups.items():
        for i, kw in enumerate(variants):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer = _trainer(runs, tmp_path / f"{group}-{i}".replace(" ", "_"), **kw)
            zero3_warnings = [w for w in caught if issubclass(w.category, ZeroOneRankWarning)]
            assert len(zero3_warnings) == (kw.get("ds_config") == zero3), kw
            if zero3_warnings:
                message = str(zero3_warnings[0].message)
                assert "stage 3 on one GPU only adds cost; use configs/single_gpu.json" in message
            losses[group, i] = _losses(trainer)
    first = losses["stage 0", 0]
    assert abs(first[1] - first[0]) > 1e-3 * first[0]  # the updates move the loss: the comparison means something
    for (group, i), got in losses.items():
        assert got[0] == first[0], (group, i, got, first)
        assert got == pytest.approx(first, rel=1e-4 if group == "ZeRO" else 1e-6), (group, i, got, first)


@pytest.mark.xfail(strict=True, reason="known defect, open: LoRA with recompute trains differently in the trainer")
def test_lora_with_recompute_trains_like_lora_without(runs, tmp_path):
    """LoRA rank 4, 3 steps of DPO in fp32: recompute full (and selective) should give the losses of none within
    rtol 1e-6. In the trainer they do not (step 2: 0.69016 against 0.69261; the adapters' gradients differ after the
    first backward), while the same UNet with the same adapters outside the trainer, with or without a DeepSpeed
    stage-0 engine, gives equal gradients. Found while testing --recompute (the defect predates it: full is
    --gradient-checkpointing); strict, so the fix flips this test."""
    none = _losses(_trainer(runs, tmp_path / "none", lora_rank=4))
    for mode in ("full", "selective"):
        assert _losses(_trainer(runs, tmp_path / mode, lora_rank=4, recompute=mode)) == pytest.approx(none, rel=1e-6)


def test_selective_recompute_is_refused_under_zero3(runs, tmp_path):
    """ZeRO-3: DeepSpeed's linear adds the bias in place to its matmul's output, which selective recompute keeps, so
    the bias counts twice in backward (measured: the loss 4% off after one step). Refused before loading."""
    from rpo_fast.config import validate

    base = dict(model=str(runs["sd15"]), data=str(runs["root"] / "cache_sd15"), output=str(tmp_path / "o"))
    cfg = TrainConfig(**base, ds_config=str(CONFIGS / "zero3_8bit.json"), recompute="selective")
    with pytest.raises(ValueError, match="--recompute selective does not work under ZeRO-3"):
        validate(cfg)


def test_regional_compile_trains_like_the_plain_path(runs, tmp_path):
    """3 steps of DPO in fp32 on stage 0: --compile-mode regional (each BasicTransformerBlock compiled; aot_eager on
    a CPU: Dynamo's capture and AOTAutograd without inductor's C++ build) gives the plain path's losses within rtol
    1e-5 (the captured graphs run the same ops; AOTAutograd may order the backward's sums differently)."""
    from torch._dynamo.utils import counters

    plain = _losses(_trainer(runs, tmp_path / "plain"))
    counters.clear()
    regional = _trainer(runs, tmp_path / "regional", compile_mode="regional", compile_backend="aot_eager")
    blocks = [m for m in regional.engine.module.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    got = _losses(regional)
    assert counters["stats"]["unique_graphs"] >= 1  # something was compiled
    assert got == pytest.approx(plain, rel=1e-5)
