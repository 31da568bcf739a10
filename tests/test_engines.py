"""The trainer in this process (one rank): the DeepSpeed config for each scale and the step options train alike,
and ZeRO-3 on one rank warns."""

import warnings

import pytest
import torch
from trainrun import ROOT, in_process_trainer, stage0_config, step_losses, train_config

from rpo_fast.config import TrainConfig
from rpo_fast.engine import ZeroOneRankWarning

pytestmark = pytest.mark.slow
CONFIGS = ROOT / "configs"


def _trainer(runs, out, **kw):
    return in_process_trainer(runs, out, **kw)


def test_engine_configs_and_recompute_train_alike(runs, tmp_path, restore_linear):
    """3 steps of DPO in fp32 with torch's AdamW: the one-GPU config (ZeRO-2 on one rank) with each recompute choice,
    stage 0, ZeRO-1, ZeRO-2 and ZeRO-3 (with recompute none and full) give the same losses. The first step's loss is
    before any update: equal to the bit. Later steps: the recompute choices on single_gpu within rtol 1e-6 of each
    other (the same ops), and every engine within rtol 1e-4 of stage 0's (ZeRO steps flat fp32 partitions and reduces
    gradients in buckets: the last bits differ, and beta 5000 amplifies them; one update moves the loss by 1.4%, so a
    missing or doubled update fails)."""
    zero1, zero2, zero3 = (str(CONFIGS / f"zero{k}_8bit.json") for k in (1, 2, 3))
    groups = {
        "single_gpu": [dict(), dict(recompute="selective"), dict(gradient_checkpointing=True)],
        # last: ZeRO-3 replaces F.linear for the rest of the process (restored after the test)
        "ZeRO": [
            dict(ds_config=stage0_config(tmp_path)),
            dict(ds_config=zero1),
            dict(ds_config=zero2),
            dict(ds_config=zero3),
            dict(ds_config=zero3, recompute="full"),
        ],
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
            losses[group, i] = step_losses(trainer)
    first, plain = losses["single_gpu", 0], losses["ZeRO", 0]  # plain: stage 0
    assert abs(first[1] - first[0]) > 1e-3 * first[0]  # the updates move the loss: the comparison means something
    for (group, i), got in losses.items():
        assert got[0] == first[0], (group, i, got, first)
        assert got == pytest.approx(plain, rel=1e-4), (group, i, got, plain)
        if group == "single_gpu":
            assert got == pytest.approx(first, rel=1e-6), (group, i, got, first)


def test_lora_with_recompute_trains_like_lora_without(runs, tmp_path):
    """LoRA rank 4, 3 steps of DPO in fp32: recompute full and selective give the losses of none within rtol 1e-6.
    The adapters' init comes from --seed (it came from the process's RNG: a second Trainer in one process started
    from other adapters, which first looked like recompute training differently)."""
    none = step_losses(_trainer(runs, tmp_path / "none", lora_rank=4))
    assert none[1] != none[0]
    for mode in ("full", "selective"):
        assert step_losses(_trainer(runs, tmp_path / mode, lora_rank=4, recompute=mode)) == pytest.approx(
            none, rel=1e-6
        )
    torch.manual_seed(12345)  # the process's RNG elsewhere: the same adapters, the same losses
    assert step_losses(_trainer(runs, tmp_path / "again", lora_rank=4)) == none


def test_selective_recompute_is_refused_under_zero3(runs, tmp_path):
    """ZeRO-3: DeepSpeed's linear adds the bias in place to its matmul's output, which selective recompute keeps, so
    the bias counts twice in backward (measured: the loss 4% off after one step). Refused before loading."""
    from rpo_fast.config import validate

    cfg = train_config(runs, tmp_path / "o", ds_config=str(CONFIGS / "zero3_8bit.json"), recompute="selective")
    with pytest.raises(ValueError, match="--recompute selective does not work under ZeRO-3"):
        validate(cfg)


def test_compile_resnets_is_refused_without_regional_compile(runs, tmp_path):
    from rpo_fast.config import validate

    cfg = train_config(runs, tmp_path / "o", compile=True, compile_resnets=True)
    with pytest.raises(ValueError, match="--compile-resnets adds the resnets to regional compile"):
        validate(cfg)


def test_regional_compile_trains_like_the_plain_path(runs, tmp_path):
    """3 steps of DPO in fp32 on single_gpu.json: --compile-mode regional (each BasicTransformerBlock compiled;
    aot_eager on a CPU: Dynamo's capture and AOTAutograd without inductor's C++ build) gives the plain path's
    losses within rtol 1e-5 (the captured graphs run the same ops; AOTAutograd may order the backward's sums
    differently); so does regional with --compile-resnets, which compiles every ResnetBlock2D too: the first loss
    within 1e-6, the later within rtol 1e-4 (measured 6.7e-5: AOTAutograd's decomposed GroupNorm and convolution
    backward sum in another order, and beta 5000 amplifies the last bits; one update moves the loss by 1.4%)."""
    from torch._dynamo.utils import counters

    plain = step_losses(_trainer(runs, tmp_path / "plain"))
    counters.clear()
    regional = _trainer(runs, tmp_path / "regional", compile_mode="regional", compile_backend="aot_eager")
    blocks = [m for m in regional.engine.module.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    got = step_losses(regional)
    assert counters["stats"]["unique_graphs"] >= 1  # something was compiled
    assert got == pytest.approx(plain, rel=1e-5)
    counters.clear()
    resnets = _trainer(
        runs, tmp_path / "resnets", compile_mode="regional", compile_resnets=True, compile_backend="aot_eager"
    )
    compiled = [m for m in resnets.engine.module.modules() if m._compiled_call_impl is not None]
    kinds = {type(m).__name__ for m in compiled}
    assert kinds == {"BasicTransformerBlock", "ResnetBlock2D"}
    assert all(m in compiled for m in resnets.engine.module.modules() if type(m).__name__ == "ResnetBlock2D")
    got = step_losses(resnets)
    assert got[0] == pytest.approx(plain[0], rel=1e-6)
    assert got == pytest.approx(plain, rel=1e-4)
    assert counters["stats"]["unique_graphs"] >= 2  # the resnets' graphs too


def test_regional_compile_builds_static_graphs_that_evaluation_reuses_or_adds_to(runs, tmp_path, caplog):
    """Regional compile specialises each block to the run's fixed shapes (dynamic=False): no graph takes a symbolic
    size (torch.compile's default would make the second block shape's graph dynamic, and in SDXL that shape holds 60
    of the 70 transformer layers). An evaluation whose last batch is shorter compiles more graphs without reaching
    Dynamo's recompile limit (past which blocks would run eagerly), and gives the plain path's metrics."""
    from torch._dynamo import register_backend
    from torch._dynamo.backends.debugging import aot_eager
    from torch._dynamo.utils import counters

    graphs = []

    @register_backend(name="rpo_fast_test_shapes")
    def record(gm, example_inputs, **kw):
        sizes = [s for x in example_inputs if isinstance(x, torch.Tensor) for s in x.shape]
        graphs.append(
            any(isinstance(s, torch.SymInt) for s in sizes) or any(isinstance(x, torch.SymInt) for x in example_inputs)
        )
        return aot_eager(gm, example_inputs, **kw)

    kw = dict(eval_every=100, eval_pairs=3)  # micro-batch 2: evaluation batches of 2 and 1 pairs
    plain = _trainer(runs, tmp_path / "plain", **kw)
    plain.train_step()
    want = plain.evaluate()
    plain.close()
    counters.clear()
    trainer = _trainer(
        runs, tmp_path / "regional", compile_mode="regional", compile_backend="rpo_fast_test_shapes", **kw
    )
    trainer.train_step()
    trained = len(graphs)
    got = trainer.evaluate()
    trainer.close()
    assert trained >= 2 and len(graphs) > trained, graphs  # two block shapes, then evaluation's own
    assert not any(graphs), f"graphs with symbolic sizes: {graphs}"
    assert "recompile_limit" not in caplog.text and "cache_size_limit" not in caplog.text
    assert got == pytest.approx(want, rel=1e-5)


def test_fuse_qkv_trains_alike_and_exports_the_trained_policy(runs, tmp_path):
    """--fuse-qkv: 3 steps of DPO in fp32 give the plain path's losses within rtol 1e-4 (the fused matmul sums the same
    products in another blocking: the last bits differ, and beta 5000 amplifies them), the replaced layers get no
    gradient, and the exported UNet (the fused weights split back into to_q/to_k/to_v, loaded by diffusers'
    from_pretrained) gives the trained policy's outputs on fresh random inputs within 1e-5 of their range."""
    from diffusers import UNet2DConditionModel
    from helpers import assert_close

    plain = step_losses(_trainer(runs, tmp_path / "plain"))
    trainer = _trainer(runs, tmp_path / "fused", fuse_qkv=True)
    policy = trainer.engine.module
    assert any(hasattr(m, "to_qkv") for m in policy.modules()) and any(hasattr(m, "to_kv") for m in policy.modules())
    stale = [n for n, p in policy.named_parameters() if not p.requires_grad]
    assert stale and all(".to_q." in n or ".to_k." in n or ".to_v." in n for n in stale)
    got = []
    for _ in range(3):
        trainer.train_step()
        got.append(trainer.metrics.mean(trainer.device)["loss"])
    assert got == pytest.approx(plain, rel=1e-4)
    assert all(policy.get_parameter(n).grad is None for n in stale)
    exported = UNet2DConditionModel.from_pretrained(trainer.export()).eval()
    assert not any(hasattr(m, "to_qkv") or hasattr(m, "to_kv") for m in exported.modules())
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ehs = torch.randn(2, 77, policy.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = policy.eval()(x, torch.tensor([10, 700]), encoder_hidden_states=ehs).sample
        have = exported(x, torch.tensor([10, 700]), encoder_hidden_states=ehs).sample
    trainer.close()
    assert_close("exported vs trained", have, want, atol=1e-5, rtol=1e-5)


def test_every_shipped_config_is_one_deepspeed_accepts(runs, tmp_path, monkeypatch):
    """Each configs/*.json, filled by the trainer, passes DeepSpeed's own ZeRO config model (it refuses unknown keys);
    ZeRO++'s hpZ 'auto' becomes the ranks per node from the launcher, and a size that does not divide is refused."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from rpo_fast.engine import read_ds_config

    names = sorted(p.name for p in CONFIGS.glob("*.json"))
    assert names == ["single_gpu.json", "zero1_8bit.json", "zero2_8bit.json", "zero3_8bit.json", "zero3pp_8bit.json"]
    monkeypatch.setenv("LOCAL_SIZE", "8")  # as deepspeed's launcher sets it: 8 ranks on this node
    for name in names:
        cfg = TrainConfig(ds_config=str(CONFIGS / name), model=str(runs["sd15"]), data=str(tmp_path))
        ds = read_ds_config(cfg, 16)
        zero = DeepSpeedZeroConfig(**ds["zero_optimization"])
        assert zero.stage == {"single": 2, "zero1": 1, "zero2": 2, "zero3": 3, "zero3pp": 3}[name.split("_")[0]]
        if name == "zero3pp_8bit.json":
            assert zero.zero_hpz_partition_size == 8 and zero.zero_quantized_weights and zero.zero_quantized_gradients
            with pytest.raises(ValueError, match="zero_hpz_partition_size 8 must divide the 12 rank"):
                read_ds_config(cfg, 12)
