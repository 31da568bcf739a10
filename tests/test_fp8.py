"""--fp8: torchao's float8 training of the linear layers, emulated on the CPU (the FP8 casts, a high-precision matmul):
which layers convert, the numerics against the plain layers, training through the Trainer, the tie at step 0, and
the export."""

import math
import warnings

import pytest
import torch
from trainrun import ROOT, in_process_trainer, stage0_config, step_losses, train_config

from rpo_fast.engine import ZeroOneRankWarning

pytest.importorskip("torchao", reason="torchao is a dev dependency: pip install -e '.[dev]'")
from rpo_fast.fp8 import convert_fp8, fp8_eligible, is_fp8  # noqa: E402

CONFIGS = ROOT / "configs"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_eligible_linear_layers_convert_and_keep_their_parameters(recipe):
    """On a tiny SDXL UNet: every linear layer whose dimensions are multiples of 16 becomes a Float8Linear holding the
    same parameter tensors, every other stays a plain Linear, the state dict's keys are unchanged, and the output on
    fresh random inputs is within 10% (relative L2) of the plain model's but not equal to it (FP8's e4m3 keeps 3
    mantissa bits: about 2-6% error per layer, measured 4.7% tensorwise / 7.4% rowwise on a 2-layer MLP)."""
    from rpo_fast.testing import build_unet

    plain = build_unet("sdxl", seed=3).eval()
    unet = build_unet("sdxl", seed=3).eval()
    unet.odd = torch.nn.Linear(24, 40)  # 24 is no multiple of 16: stays plain (every layer of the tiny UNet is one)
    eligible = {n for n, m in unet.named_modules() if fp8_eligible(m)}
    linear = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert eligible and linear - eligible == {"odd"}
    params = {n: p for n, p in unet.named_parameters()}
    keys = set(unet.state_dict())
    assert convert_fp8(unet, recipe=recipe, emulate=True) == len(eligible)
    assert {n for n, m in unet.named_modules() if is_fp8(m)} == eligible
    assert all(type(unet.get_submodule(n)) is torch.nn.Linear for n in linear - eligible)
    assert all(unet.get_parameter(n) is p for n, p in params.items())
    assert set(unet.state_dict()) == keys
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cfg = unet.config
    ehs = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    added = dict(text_embeds=torch.randn(2, 32, generator=g), time_ids=torch.randn(2, 6, generator=g))
    with torch.no_grad():
        want = plain(x, torch.tensor([10, 700]), encoder_hidden_states=ehs, added_cond_kwargs=added).sample
        have = unet(x, torch.tensor([10, 700]), encoder_hidden_states=ehs, added_cond_kwargs=added).sample
    err = _relative(have, want)
    assert 0 < err < 0.1, err


def _trainer(runs, out, **kw):
    """Tiny SDXL in bf16 (what --fp8 runs under), lr 1e-4 so that 3 steps move the loss."""
    return in_process_trainer(runs, out, "sdxl", **(dict(lr=1e-4, mixed_precision="bf16") | kw))


@pytest.mark.slow
def test_fp8_trains_like_bf16_ties_at_step_0_and_exports(runs, tmp_path):
    """Tiny SDXL, bf16. DPO's first step: with --fp8 the reference runs the same FP8 layers, so it is a tie (loss log 2
    to 1e-6, as on the plain path), and the step's gradient (all of the policy's, as the optimizer sees it) points
    where the plain path's does: cosine similarity above 0.9 (measured 0.960; e5m2's 2 mantissa bits in the backward
    are most of the difference), not 1 (the casts act). SFT (no reference) over 3 steps: each loss within 1% of the
    plain path's (the tolerance of FP8's casts, stated apart from the other options' 1e-4..1e-6; measured 0.14%).
    DPO's later steps are not compared: at beta 5000 a tiny model's loss after one update is dominated by rounding
    (the plain bf16 path itself goes 0.69 -> 0.48 -> 0.72). The export is the plain model's weights: converted again
    to FP8 it reproduces the trained policy's outputs to the bit, and as a plain bf16 diffusers UNet it is within FP8's
    error of them."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    grads = {}
    for name, kw in (("plain", {}), ("fp8", dict(fp8=True))):
        trainer = _trainer(runs, tmp_path / f"dpo-{name}", debug_dump_grads=str(tmp_path / f"{name}.safetensors"), **kw)
        if kw:  # the reference runs the policy's FP8 layers
            fp8_layers = [sum(1 for m in model.modules() if is_fp8(m)) for model in (trainer.engine, trainer.reference)]
            assert fp8_layers[0] == fp8_layers[1] > 0
        assert step_losses(trainer, 1)[0] == pytest.approx(math.log(2), abs=1e-6)
        grads[name] = load_file(tmp_path / f"{name}.safetensors")
    assert grads["plain"].keys() == grads["fp8"].keys()
    flat = {k: torch.cat([g.flatten().double() for _, g in sorted(v.items())]) for k, v in grads.items()}
    cosine = torch.nn.functional.cosine_similarity(flat["plain"], flat["fp8"], dim=0).item()
    assert 0.9 < cosine < 1.0, cosine

    plain = step_losses(_trainer(runs, tmp_path / "sft-plain", objective="sft"))
    trainer = _trainer(runs, tmp_path / "fp8", objective="sft", fp8=True)
    policy = trainer.engine.module
    assert trainer.n_fp8 == sum(1 for m in policy.modules() if is_fp8(m)) > 0
    got = []
    for _ in range(3):
        trainer.train_step()
        got.append(trainer.metrics.mean(trainer.device)["loss"])
    assert abs(plain[2] - plain[0]) > 1e-2 * plain[0]  # the updates move the loss
    assert got == pytest.approx(plain, rel=1e-2) and got != plain

    exported = trainer.export()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 16, 16, generator=g).bfloat16()
    ehs = torch.randn(2, 77, policy.config.cross_attention_dim, generator=g).bfloat16()
    added = dict(text_embeds=torch.randn(2, 32, generator=g), time_ids=torch.randn(2, 6, generator=g))
    added = {k: v.bfloat16() for k, v in added.items()}
    t = torch.tensor([10, 700])

    def run(unet):
        with torch.no_grad():
            return unet.eval()(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample

    want = run(policy)
    trainer.close()
    as_fp8 = UNet2DConditionModel.from_pretrained(exported, dtype=torch.bfloat16)
    convert_fp8(as_fp8, emulate=True)
    assert torch.equal(run(as_fp8), want)
    as_plain = run(UNet2DConditionModel.from_pretrained(exported, dtype=torch.bfloat16))
    assert 0 < _relative(as_plain, want) < 0.1


@pytest.mark.slow
def test_fp8_with_lora_and_under_compile_trains(runs, tmp_path):
    """LoRA rank 4 on FP8 base layers (the adapters stay plain): it ties at step 1 and trains. --fp8 under regional
    and whole compile (aot_eager: the FP8 casts traced into the graphs) gives eager FP8's losses within rtol 1e-6
    (measured: equal to the bit in bf16)."""
    lora = _trainer(runs, tmp_path / "lora", fp8=True, lora_rank=4)
    names = [n for n, m in lora.engine.module.named_modules() if is_fp8(m)]
    assert names and not any("lora_" in n for n in names)
    lora_losses = step_losses(lora)
    assert lora_losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(v) for v in lora_losses) and abs(lora_losses[2] - lora_losses[0]) > 1e-4
    eager = step_losses(_trainer(runs, tmp_path / "eager", fp8=True))
    from torch._dynamo.utils import counters

    for mode in ("regional", "whole"):
        counters.clear()
        trainer = _trainer(runs, tmp_path / mode, fp8=True, compile_mode=mode, compile_backend="aot_eager")
        assert trainer.engine.is_compiled if mode == "whole" else True
        got = step_losses(trainer)
        assert counters["stats"]["unique_graphs"] >= 1  # something was compiled
        assert got == pytest.approx(eager, rel=1e-6)


def test_fp8_refusals(runs, tmp_path, monkeypatch):
    """--fp8 without torchao, and on a GPU without FP8 matmuls: one error naming the fix, before anything loads."""
    import importlib.util

    from rpo_fast.config import validate

    find_spec = importlib.util.find_spec
    hide = lambda name, *a: None if name == "torchao" else find_spec(name, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hide)
    with pytest.raises(ValueError, match=r"--fp8 needs torchao: pip install 'rpo_fast\[fp8\]'"):
        validate(train_config(runs, tmp_path / "o", fp8=True))
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match="compute capability 8.9.*A100-SXM4-80GB is sm_80: drop --fp8"):
        validate(train_config(runs, tmp_path / "o", fp8=True))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2_8bit.json", "zero3_8bit.json"])
def test_fp8_under_zero_trains_like_stage_0(runs, tmp_path, config, restore_linear):
    """SFT with --fp8 in fp32 (the FP8 casts from fp32 weights), 3 steps: ZeRO-2 and ZeRO-3 (parameters gathered for
    each module call, the FP8 cast of the gathered weight) give stage 0's losses: the first (no update yet) within
    1e-6, the later ones within rtol 1e-3 (measured 1.2e-4 under ZeRO-3: the engines' last-bit differences in the
    updated weights flip some FP8 roundings, which the plain path's 1e-4 of test_engines does not allow for; the
    updates move the loss by 7%). In bf16 the engines' own rounding differs by more."""
    kw = dict(objective="sft", fp8=True, mixed_precision="no")
    want = step_losses(_trainer(runs, tmp_path / "stage0", ds_config=stage0_config(tmp_path), **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZeroOneRankWarning)
        got = step_losses(_trainer(runs, tmp_path / "zero", ds_config=str(CONFIGS / config), **kw))
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    assert got == pytest.approx(want, rel=1e-3)


@pytest.mark.gpu
def test_fp8_on_cuda_runs_the_scaled_matmul_close_to_bf16():
    """The real FP8 path (torch._scaled_mm, sm_89+): a tiny SDXL UNet in bf16, forward and backward on fresh random
    inputs: the output within 10% (relative L2) of the bf16 model's, every parameter's gradient finite, and the
    scaled matmul is what ran (counted with a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rpo_fast.testing import build_unet

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need compute capability 8.9+")
    plain = build_unet("sdxl", seed=3, device="cuda").to(torch.bfloat16)
    unet = build_unet("sdxl", seed=3, device="cuda").to(torch.bfloat16)
    convert_fp8(unet, emulate=False)
    g = torch.Generator("cuda").manual_seed(5)
    x = torch.randn(2, 4, 16, 16, generator=g, device="cuda", dtype=torch.bfloat16)
    ehs = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g, device="cuda", dtype=torch.bfloat16)
    added = dict(
        text_embeds=torch.randn(2, 32, generator=g, device="cuda", dtype=torch.bfloat16),
        time_ids=torch.randn(2, 6, generator=g, device="cuda", dtype=torch.bfloat16),
    )
    t = torch.tensor([10, 700], device="cuda")

    class CountScaledMM(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._scaled_mm.default:
                CountScaledMM.n += 1
            return func(*args, **(kwargs or {}))

    with CountScaledMM():
        out = unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
        out.float().square().mean().backward()
    want = plain(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
    assert CountScaledMM.n > 0
    assert 0 < _relative(out.detach(), want.detach()) < 0.1
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters() if p.requires_grad)


def _narrow(kind: str) -> tuple[torch.nn.Module, dict]:
    """A full-size model's structure at 1024 px with narrow widths (the shapes FP8 sees that do not scale with the
    width: token counts, text lengths, embedding rows), and its inputs for one row."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from rpo_fast import testing as T

    torch.manual_seed(0)
    if kind == "sdxl":
        cfg = T.FULL_UNET_CONFIGS["sdxl"] | dict(
            block_out_channels=[32, 64, 128],
            attention_head_dim=[1, 1, 2],
            transformer_layers_per_block=[1, 1, 1],
            layers_per_block=1,
        )
        inputs = dict(
            sample=(4, 128, 128), encoder_hidden_states=(77, 2048), text_embeds=(1280,), time_ids=(6,)
        )  # fmt: skip
        return UNet2DConditionModel(**cfg), inputs
    cfg = T.FULL_TRANSFORMER_CONFIGS["sd3.5-large"] | dict(
        num_attention_heads=1, caption_projection_dim=64, num_layers=2
    )
    inputs = dict(hidden_states=(16, 128, 128), encoder_hidden_states=(77 + 256, 4096), pooled_projections=(2048,))
    return SD3Transformer2DModel(**cfg), inputs


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sdxl", "sd3"])
def test_every_fp8_matmul_of_a_step_has_scaled_mm_shapes(kind, monkeypatch):
    """torch._scaled_mm takes mat1 (M, K) and mat2 (K, N) with K and N multiples of 16. Every FP8 matmul of a training
    step's forward and backward (torchao's operands as they would reach _scaled_mm, recorded in its matmul path under
    emulation) keeps the rule at 1 and 4 pairs (2 and 8 rows) at 1024 px: SDXL's structure and SD3.5-Large's with
    narrow widths. Before --fp8 padded the inner dimension (pad_inner_dim), the weight gradients of the layers that
    see 2 or 154 tokens (the embeddings, attn2's to_k/to_v over 2 x 77 text tokens) broke it."""
    import torchao.float8.float8_ops as ops

    from rpo_fast.fp8 import convert_fp8

    shapes = []
    original = ops.preprocess_addmm

    def record(a, b):
        out = original(a, b)
        shapes.append((tuple(out[0].shape), tuple(out[2].shape)))
        return out

    monkeypatch.setattr(ops, "preprocess_addmm", record)
    model, inputs = _narrow(kind)
    n = convert_fp8(model, emulate=True)
    assert n > 0
    for rows in (2, 8):
        shapes.clear()
        x = {k: torch.randn(rows, *s) for k, s in inputs.items()}
        t = torch.full((rows,), 500.0)
        if kind == "sdxl":
            cond = dict(text_embeds=x.pop("text_embeds"), time_ids=x.pop("time_ids"))
            out = model(x.pop("sample"), t, **x, added_cond_kwargs=cond).sample
        else:
            out = model(**x, timestep=t).sample
        out.float().square().mean().backward()  # the backward's dx and dW matmuls
        assert len(shapes) == 3 * n, (len(shapes), n)  # forward y, backward dx and dW, of every converted layer
        bad = sorted({(a, b) for a, b in shapes if a[1] % 16 or b[0] % 16 or b[1] % 16})
        assert not bad, f"{len(bad)} matmul shapes break _scaled_mm's rule at {rows} rows: {bad[:5]}"
        model.zero_grad()
