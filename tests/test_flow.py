"""The flow-matching families (SD3/SD3.5 and FLUX.1): the noising, targets, timestep shifts, text encoding and
token packing held to diffusers' own schedulers and pipelines; the full-size configs' sizes; then training on the
tiny families: every objective in one process, DPO and RPO (global scope) on 2 ZeRO-3 ranks with an exact resume,
and the exports loaded by diffusers."""

import json
import math

import pytest
import torch
from trainrun import ZERO3, launch, launch_many, step_losses, train_rows

from rpo_fast import testing as T
from rpo_fast.config import loss_options, parse_args
from rpo_fast.models import load_family, model_kind

T_ROOT = ZERO3.parents[1]
import flow_plan  # noqa: E402

FLOW = ("sd3", "flux")
OBJECTIVES = ("dpo", "rpo", "sft", "dense-dpo", "cal-dpo")  # DSPO is refused (test_beta_convention_and_dspo_refused)
SINGLE = ZERO3.parent / "single_gpu.json"


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """Tiny SD3 and FLUX pipelines, a tiny CLIP, and a cache of 24 warm-beats-cool pairs for each (32 px)."""
    from rpo_fast.data.writer import build_cache

    root = tmp_path_factory.mktemp("flow")
    d = dict(root=root, clip=T.save_tiny_clip(root / "clip"))
    pairs = T.write_warm_preference_pairs(root / "warm", 24, seed=0)
    for kind in FLOW:
        d[kind] = T.save_tiny_pipeline(root / kind, kind)
        d[f"cache_{kind}"] = root / f"cache_{kind}"
        build_cache(
            d[kind], pairs, d[f"cache_{kind}"], resolution=32, embedder=str(d["clip"]), shard_size=16,
            batch_size=8, progress=False, rank=0, world=1,
        )  # fmt: skip
    return d


# --------------------------------------------------------------------------------------------------
# The family against diffusers
# --------------------------------------------------------------------------------------------------


def test_families_are_detected(flow):
    assert model_kind(flow["sd3"]) == "sd3" and model_kind(flow["flux"]) == "flux"
    assert load_family(flow["sd3"]).denoiser_folder == "transformer"
    cfg = json.loads((flow["sd3"] / "transformer" / "config.json").read_text())
    assert cfg["_class_name"] == "SD3Transformer2DModel"


@pytest.mark.parametrize("kind", FLOW)
def test_noising_and_target_follow_the_flow_matching_scheduler(flow, kind):
    """x_t = (1 - s) x0 + s eps as FlowMatchEulerDiscreteScheduler.scale_noise; the target v = eps - x0 is what its
    Euler step integrates: one step from s to s' with the exact velocity lands on (1 - s') x0 + s' eps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    fam = load_family(flow[kind])
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    i = 3
    t = sched.timesteps[i].repeat(2).float()  # 1000 s
    noisy, target = fam.noisy_and_target(x0, eps, t)
    want = sched.scale_noise(x0, t.repeat(2), eps.repeat(2, 1, 1, 1))
    torch.testing.assert_close(noisy, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(target, eps.repeat(2, 1, 1, 1) - x0)
    s_next = sched.sigmas[i + 1]
    stepped = sched.step(target, sched.timesteps[i], noisy).prev_sample
    torch.testing.assert_close(stepped, (1 - s_next) * x0 + s_next * eps.repeat(2, 1, 1, 1), rtol=1e-5, atol=1e-5)


def test_timestep_shifts_are_the_schedulers():
    """SD3: s = S u / (1 + (S - 1) u), the scheduler's own shifted sigmas; FLUX: the resolution-dependent shift
    of FluxPipeline (calculate_shift) and the scheduler's time_shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from rpo_fast.models.flow import FluxFamily, SD3Family
    from rpo_fast.models.noising import FlowMatchingNoising

    class Fake(FlowMatchingNoising):  # a family whose scheduler is ``sched``
        def __init__(self, sched):
            self.scheduler_config = dict(sched.config)

    sd3 = FlowMatchEulerDiscreteScheduler(shift=3.0)
    u = torch.linspace(1, 1000, 1000, dtype=torch.float64).flip(0) / 1000  # the unshifted grid, 1 .. 0.001
    torch.testing.assert_close(SD3Family.shift(Fake(sd3), u, 64).float(), sd3.sigmas, rtol=1e-6, atol=1e-6)
    flux = T.flow_scheduler("flux")
    for tokens in (64, 1024, 4096):
        mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
        got = FluxFamily.shift(Fake(flux), u, tokens)
        torch.testing.assert_close(got, flux.time_shift(mu, 1.0, u), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", FLOW)
def test_timesteps_are_one_logit_normal_draw_per_pair(flow, kind):
    """Each pair's generator alone decides its t (the same pair, the same draw); the draws follow the shifted
    logit-normal: its quantiles within 0.02 of the formula's over 4,000 draws."""
    fam = load_family(flow[kind])
    shape = (16, 16, 16)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    t = fam.sample_timesteps(gens, "cpu", latent_shape=shape)
    again = fam.sample_timesteps([torch.Generator().manual_seed(i) for i in (5, 7)], "cpu", latent_shape=shape)
    assert torch.equal(again, t[[5, 7]])
    assert t.dtype == torch.float32 and 0 < t.min() and t.max() < 1000
    for q in (0.1, 0.5, 0.9):
        u = torch.sigmoid(torch.tensor(math.sqrt(2) * torch.erfinv(torch.tensor(2 * q - 1)).item()))
        want = fam.shift(u.double(), fam.tokens(shape)) * 1000
        assert abs(t.quantile(q).item() - want) < 20, (q, t.quantile(q).item(), want)


@pytest.mark.parametrize("kind", FLOW)
def test_dense_dpo_counts_the_samplers_steps(flow, kind):
    """dense-dpo's step index k(j) = ((999 - j) 50) // 1000 of a flow family's t counts the steps of the family's own
    sampler (its shifted schedule at the image's token count): the pipeline's 50 timesteps are k = 0..49 at 64, 1024
    and 4096 tokens (the plain j = floor(t) is not). Discounted sampling draws j ~ probs and a point of its step,
    which maps back to the drawn j."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    from rpo_fast.objectives import discounted_timestep_probs

    fam = load_family(flow[kind])
    sc = fam.scheduler_config
    sched = FlowMatchEulerDiscreteScheduler.from_config(sc)
    step = lambda j: ((999 - j) * 50) // 1000  # noqa: E731 (the loss's k, objectives.discount_weights)
    probs = discounted_timestep_probs(gamma=0.9)
    for side in (16, 64, 128):
        shape = (16, side, side)
        if kind == "flux":  # FluxPipeline's sigmas and mu
            mu = calculate_shift(fam.tokens(shape), *(sc[k] for k in ("base_image_seq_len", "max_image_seq_len")),
                                 sc["base_shift"], sc["max_shift"])  # fmt: skip
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 50, 50), mu=mu)
        else:
            sched.set_timesteps(50)
        assert torch.equal(step(fam.discount_timesteps(sched.timesteps, shape)), torch.arange(50)), side
        assert not torch.equal(step(sched.timesteps.long()), torch.arange(50))
        drawn = torch.cat([torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(i)) for i in range(64)])
        t = fam.sample_timesteps([torch.Generator().manual_seed(i) for i in range(64)], "cpu", probs, shape)
        assert torch.equal(fam.discount_timesteps(t, shape), drawn)


@pytest.mark.parametrize("kind", FLOW)
def test_cached_text_conditioning_is_the_pipelines(flow, kind):
    """The cache's parts put back together by ``conditioning`` equal the pipeline's encode_prompt, and a dropped
    caption takes the empty caption's encoding."""
    fam = load_family(flow[kind])
    pipe = fam.load_text_encoders()
    caps = ["a warm red square", "Cool blue!"]
    parts = fam.encode_texts(pipe, caps)
    empty = {k: v[0] for k, v in fam.encode_texts(pipe, [""]).items()}
    cond = fam.conditioning(parts, torch.tensor([False, True]), empty)
    if kind == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(caps, None, None, do_classifier_free_guidance=False)
        e_empty, _, p_empty, _ = pipe.encode_prompt([""], None, None, do_classifier_free_guidance=False)
        assert parts["t5_prompt_embeds"].shape[1] == 256
    else:
        embeds, pooled, _ = pipe.encode_prompt(caps, None)
        e_empty, p_empty, _ = pipe.encode_prompt([""], None)
        assert parts["t5_prompt_embeds"].shape[1] == 512 and "guidance" in cond
        torch.testing.assert_close(cond["guidance"], torch.full((4,), fam.train_guidance))
    # [winners; losers], the second caption dropped; within 1e-4 (two calls of the CPU's threaded matmuls round
    # apart by ~1e-5; a misplaced part or token is off by the embeddings' own size, ~1)
    want = torch.cat([embeds[:1], e_empty, embeds[:1], e_empty])
    torch.testing.assert_close(cond["encoder_hidden_states"], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cond["pooled_projections"], torch.cat([pooled[:1], p_empty] * 2), rtol=1e-4, atol=1e-4)
    assert want.abs().max() > 0.5


def test_flux_packing_is_the_pipelines():
    from diffusers import FluxPipeline

    from rpo_fast.models.flow import FluxFamily

    x = torch.randn(3, 16, 6, 10)
    packed = FluxFamily.pack(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 3, 16, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(FluxFamily.unpack(packed, 6, 10), x, rtol=0, atol=0)
    want = FluxPipeline._prepare_latent_image_ids(3, 3, 5, "cpu", torch.float32)
    torch.testing.assert_close(FluxFamily.image_ids(6, 10, "cpu", torch.float32), want, rtol=0, atol=0)


def test_beta_convention_and_dspo_refused(flow, tiny_sd15):
    """Per-sample mean errors everywhere; the default beta is 100 for the flow families (5000 for the UNets), an
    explicit --beta wins; DSPO's score form is refused on the flow families with a message naming them."""

    def opts(model, *extra):
        cfg = parse_args(["--ds_config", str(ZERO3), "--model", str(model), "--data", "x", *extra])
        return loss_options(cfg, load_family(model))

    for kind in FLOW:
        for objective in ("dpo", "rpo", "dense-dpo", "cal-dpo"):
            assert opts(flow[kind], "--objective", objective)["beta"] == 100.0
        assert opts(flow[kind], "--objective", "dpo", "--beta", "250")["beta"] == 250.0
        with pytest.raises(ValueError, match=f"does not apply to {kind} models"):
            opts(flow[kind], "--objective", "dspo")
    assert opts(tiny_sd15, "--objective", "dpo")["beta"] == 5000.0


def test_max_sequence_length_is_recorded_and_refused_without_t5(flow, tiny_sd15, tmp_path):
    from rpo_fast.data.writer import build_cache

    T.write_pairs_jsonl(tmp_path / "raw", 2)
    out = tmp_path / "c"
    build_cache(
        flow["flux"], tmp_path / "raw" / "pairs.jsonl", out, resolution=32, max_sequence_length=24,
        progress=False, rank=0, world=1,
    )  # fmt: skip
    assert json.loads((out / "index.json").read_text())["max_sequence_length"] == 24
    from safetensors.torch import load_file

    assert load_file(out / "shard-r0-00000.safetensors")["t5_prompt_embeds"].shape[1:] == (24, T.T5_TINY)
    with pytest.raises(ValueError, match="--max-sequence-length applies to models whose text encoder pads"):
        load_family(tiny_sd15, max_sequence_length=24)


def test_full_size_configs():
    """Parameters on the meta device (no memory): SD3.5-Medium 2.24 B (+ 0.23 B of positional-embedding buffer:
    the card's 2.5 B), SD3.5-Large 8.06 B, FLUX.1-dev 11.90 B."""
    want = {"sd3.5-medium": 2_243_171_520, "sd3.5-large": 8_056_627_520, "flux.1-dev": 11_901_408_320}
    for name, n in want.items():
        m = T.build_transformer(name, full=True, device="meta")
        assert sum(p.numel() for p in m.parameters()) == n == T.FULL_TRANSFORMER_PARAMS[name]


@pytest.mark.parametrize("kind", FLOW)
def test_cache_bytes_formula_is_the_shards(flow, kind):
    """benchmarks/plans/flow_plan.py's bytes per pair (docs/guides/families.md's cache column), held to a tiny shard."""
    from safetensors.torch import load_file

    shard = load_file(flow[f"cache_{kind}"] / "shard-r0-00000.safetensors")
    n, unique = len(shard["text_index"]), len(shard["t5_prompt_embeds"])
    widths = dict(t5=T.T5_TINY, pooled=2 * T.TINY_HIDDEN if kind == "sd3" else T.TINY_HIDDEN, clip=2 * T.TINY_HIDDEN)
    want = n * flow_plan.cache_bytes_per_pair(kind, 16, 16, widths, clip_dim=16, captions_per_pair=unique / n)
    assert sum(t.numel() * t.element_size() for t in shard.values()) == pytest.approx(want, rel=1e-9)


@pytest.mark.slow
def test_readme_tables_are_the_flow_plan():
    """docs/guides/families.md's model-family, size and memory tables: what benchmarks/plans/flow_plan.py prints."""
    m, unets = flow_plan.measure(), flow_plan.measure(flow_plan.UNETS, ("full",))
    readme = (T_ROOT / "docs" / "guides" / "families.md").read_text()
    assert flow_plan.families_table(unets, m) in readme
    assert flow_plan.family_table(m) in readme
    assert flow_plan.memory_table(m) in readme
    assert flow_plan.memory_table(unets, flow_plan.UNET_GPUS) in readme


# --------------------------------------------------------------------------------------------------
# Training on the tiny families
# --------------------------------------------------------------------------------------------------


def _args(flow, kind, out, objective, *extra):
    args = ["--ds_config", str(ZERO3), "--model", str(flow[kind]), "--data", str(flow[f"cache_{kind}"])]
    args += ["--output", str(out), "--objective", objective, "--log-every", "1", "--no-progress"]
    return args + ["--mixed-precision", "no", "--optimizer", "adamw", *extra]


@pytest.fixture(scope="module")
def one_process(flow, tmp_path_factory):
    """Every objective but DSPO on each tiny family, one process, 2 pairs a step, 3 steps (tests/train_many.py: the
    ten runs in one Python process)."""
    root = tmp_path_factory.mktemp("one")
    runs = {(k, o): root / f"{k}-{o}" for k in FLOW for o in OBJECTIVES}
    argv = [_args(flow, k, out, o, "--micro-batch-size", "2", "--max-steps", "3") for (k, o), out in runs.items()]
    runs["sd3", "bf16"] = root / "sd3-bf16"  # the shipped defaults: bf16 with 8-bit AdamW
    bf16 = ("--micro-batch-size", "2", "--max-steps", "2", "--mixed-precision", "bf16", "--optimizer", "adamw8bit")
    argv.append(_args(flow, "sd3", runs["sd3", "bf16"], "dpo", *bf16))
    for k in FLOW:  # FP8 linear layers (torchao, emulated on the CPU) in policy and reference
        runs[k, "fp8"] = root / f"{k}-fp8"
        argv.append(_args(flow, k, runs[k, "fp8"], "dpo", *bf16, "--fp8"))
    for k in FLOW:  # the reference in its own ZeRO-3 engine instead of replicated
        runs[k, "ref-zero3"] = root / f"{k}-ref-zero3"
        extra = ("--micro-batch-size", "2", "--max-steps", "3", "--ref-placement", "zero3")
        argv.append(_args(flow, k, runs[k, "ref-zero3"], "dpo", *extra))
    res = launch_many(argv)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return runs


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", FLOW)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_every_objective_trains_in_one_process(one_process, kind, objective):
    """Finite losses; where there is a reference, step 1 ties (the policy is the reference: DPO-type losses at
    log 2) and by step 2 the update has moved the policy away from it."""
    rows = train_rows(one_process[kind, objective])
    assert sorted(rows) == [1, 2, 3]
    losses = [rows[s]["loss/loss"] for s in (1, 2, 3)]
    assert all(math.isfinite(v) for v in losses)
    if objective in ("dpo", "rpo", "dense-dpo"):
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    if objective != "sft":
        assert rows[1]["loss/mse_w"] == pytest.approx(rows[1]["loss/ref_mse_w"], rel=1e-6)
        assert rows[2]["loss/mse_w"] != rows[2]["loss/ref_mse_w"]
    assert (one_process[kind, objective] / "transformer" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", FLOW)
def test_a_zero3_sharded_reference_gives_the_replicated_ones_losses(one_process, kind):
    a, b = train_rows(one_process[kind, "dpo"]), train_rows(one_process[kind, "ref-zero3"])
    assert [b[s]["loss/loss"] for s in (1, 2, 3)] == pytest.approx([a[s]["loss/loss"] for s in (1, 2, 3)], rel=1e-6)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bf16_policy_and_reference_tie_at_step_one(one_process):
    """In bf16 DeepSpeed casts the policy's parameters, not its buffers (SD3's positional embedding stays fp32): the
    reference takes the policy's buffers, so at step 1 the two agree to the bit (every pair a tie, loss log 2)."""
    row = train_rows(one_process["sd3", "bf16"])[1]
    assert row["loss/mse_w"] == row["loss/ref_mse_w"] and row["loss/mse_l"] == row["loss/ref_mse_l"]
    assert row["loss/loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", FLOW)
def test_fp8_ties_at_step_one_and_trains(one_process, kind):
    """--fp8 on the flow transformers (nearly all of their FLOPs are linear layers): policy and reference run the same
    FP8 layers, so step 1 ties to the bit; step 2's losses are finite and the policy has moved."""
    rows = train_rows(one_process[kind, "fp8"])
    assert rows[1]["loss/mse_w"] == rows[1]["loss/ref_mse_w"] and rows[1]["loss/loss"] == pytest.approx(math.log(2))
    assert math.isfinite(rows[2]["loss/loss"]) and rows[2]["loss/mse_w"] != rows[2]["loss/ref_mse_w"]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", FLOW)
def test_two_ranks_resume_exactly_and_export_for_diffusers(flow, one_process, kind, tmp_path):
    """2 ZeRO-3 ranks x 1 pair: DPO's and RPO's (global scope) losses equal one process holding both pairs (within
    1e-4: another reduction order); RPO killed after step 2's checkpoint and resumed gives the uninterrupted
    run's losses to the bit; the export loads with from_pretrained and samples in the family's pipeline."""
    from rpo_fast.evaluate import load_pipeline, sample

    steps = ["--micro-batch-size", "1", "--max-steps", "3", "--checkpoint-every", "2"]
    runs = {}
    for objective in ("dpo", "rpo"):
        runs[objective] = tmp_path / objective
        res = launch(_args(flow, kind, runs[objective], objective, *steps))
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        one, two = train_rows(one_process[kind, objective]), train_rows(runs[objective])
        for s in (1, 2, 3):
            assert two[s]["loss/loss"] == pytest.approx(one[s]["loss/loss"], rel=1e-4), (objective, s)
    killed = tmp_path / "killed"
    res = launch(_args(flow, kind, killed, "rpo", *steps, "--debug-exit-after-step", "2"))
    assert res.returncode != 0 and (killed / "checkpoints" / "step-2" / "COMPLETE").exists()
    res = launch(_args(flow, kind, killed, "rpo", *steps, "--resume"))
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = train_rows(runs["rpo"]), train_rows(killed)
    assert sorted(b) == [1, 2, 3] and all(a[s]["loss/loss"] == b[s]["loss/loss"] for s in (1, 2, 3))

    fam = load_family(flow[kind])
    tuned = fam.denoiser_class().from_pretrained(runs["dpo"] / "transformer")
    base = fam.load_denoiser()
    moved = max((p - q).abs().max().item() for p, q in zip(tuned.parameters(), base.parameters()))
    assert moved > 0
    pipe = load_pipeline(load_family(flow[kind]), unet=runs["dpo"] / "transformer", device="cpu")
    paths = sample(pipe, ["a warm square"], tmp_path / "images", steps=2, resolution=32, progress=False)
    assert paths[0].exists()
    # the evaluation command's path: base and tuned with paired seeds, the family's steps (28) and guidance
    from rpo_fast.evaluate import evaluate

    (tmp_path / "prompts.txt").write_text("a warm square\na cool circle\n")
    summary = evaluate(
        flow[kind], tmp_path / "prompts.txt", tmp_path / "eval", unet=runs["dpo"] / "transformer", resolution=32,
        device="cpu", progress=False,
    )  # fmt: skip
    assert summary["steps"] == 28 and len(list((tmp_path / "eval" / "images" / "tuned").glob("*.png"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", FLOW)
def test_lora_trains_and_loads_in_the_pipeline(flow, kind, tmp_path):
    """LoRA with the reference as the adapter-disabled policy: it ties at step 1, and the saved adapter loads with
    the pipeline's load_lora_weights and changes the transformer's output."""
    out = tmp_path / "lora"
    args = _args(flow, kind, out, "dpo", "--micro-batch-size", "2", "--max-steps", "2", "--lora-rank", "4")
    args[args.index("--ds_config") + 1] = str(SINGLE)
    args += ["--lr", "1e-2"]
    res = launch(args, ranks=1)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert train_rows(out)[1]["loss/loss"] == pytest.approx(math.log(2), abs=1e-6)
    from rpo_fast.evaluate import load_pipeline

    fam = load_family(flow[kind])
    x, t, cond = fam.dummy_inputs(1)
    x = torch.randn(1, x.shape[1], 8, 8)
    base = load_pipeline(load_family(flow[kind]), unet=flow[kind] / "transformer", device="cpu").transformer
    tuned = load_pipeline(load_family(flow[kind]), lora=out / "lora", device="cpu").transformer
    from safetensors.torch import load_file

    for key, w in load_file(out / "lora" / "pytorch_lora_weights.safetensors").items():  # each where it was trained
        if key.endswith(".lora_A.weight"):
            module = tuned.get_submodule(key.removeprefix("transformer.").removesuffix(".lora_A.weight"))
            assert any(torch.equal(a.weight, w) for a in module.lora_A.values()), key
    with torch.no_grad():
        diff = (fam.predict(tuned, x, t, cond) - fam.predict(base, x, t, cond)).abs().max().item()
    assert diff > 0


@pytest.mark.slow
@pytest.mark.parametrize("kind,blocks", [("sd3", ("JointTransformerBlock",)), ("flux", ("FluxTransformerBlock",))])
def test_regional_compile_compiles_the_blocks_and_trains_alike(flow, kind, blocks, tmp_path):
    """--compile-mode regional (aot_eager on a CPU) compiles each repeated block in place (SD3's named by the family:
    diffusers 0.42.1 leaves its _repeated_blocks empty) and gives the plain path's losses within rtol 1e-5."""
    from rpo_fast.config import TrainConfig
    from rpo_fast.train import Trainer

    def trainer(out, **kw):
        cfg = dict(
            ds_config=str(SINGLE), model=str(flow[kind]), data=str(flow[f"cache_{kind}"]), output=str(out),
            objective="dpo", micro_batch_size=2, max_steps=100, optimizer="adamw", mixed_precision="no", export=False,
            progress=False, tensorboard=False,
        )  # fmt: skip
        return Trainer(TrainConfig(**(cfg | kw)))

    plain = step_losses(trainer(tmp_path / "plain"), 2)
    regional = trainer(tmp_path / "regional", compile_mode="regional", compile_backend="aot_eager")
    compiled = [m for m in regional.engine.module.modules() if type(m).__name__ in blocks]
    assert compiled and all(m._compiled_call_impl is not None for m in compiled)
    assert step_losses(regional, 2) == pytest.approx(plain, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind,t5", [("sd3", "text_encoder_3"), ("flux", "text_encoder_2")])
def test_sampling_takes_the_caches_t5_length(flow, kind, t5, tmp_path):
    """evaluate's --max-sequence-length reaches the pipeline: the T5 encoder sees that many tokens per prompt (the
    family's default, the pipeline's, otherwise); on a UNet model the flag is refused before anything is sampled."""
    from rpo_fast.evaluate import evaluate, load_pipeline, sample

    def tokens(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen[length].add(ids.shape[1])

    seen = {}
    for length in (None, 12):
        seen[length] = set()
        pipe = load_pipeline(load_family(flow[kind], max_sequence_length=length), device="cpu")
        hook = getattr(pipe, t5).register_forward_pre_hook(tokens, with_kwargs=True)
        sample(pipe, ["a warm square"], tmp_path / f"images-{length}", steps=1, resolution=32, progress=False)
        hook.remove()
    assert seen == {None: {load_family(flow[kind]).max_sequence_length}, 12: {12}}
    (tmp_path / "prompts.txt").write_text("a warm square\n")
    sd15 = T.save_tiny_pipeline(tmp_path / "sd15", "sd15")
    with pytest.raises(ValueError, match="--max-sequence-length applies to models whose text encoder pads"):
        evaluate(sd15, tmp_path / "prompts.txt", tmp_path / "eval", unet=sd15 / "unet", max_sequence_length=12)
