"""The families added in round three (Z-Image so far), one parametrised module: each tiny fixture round-tripped through
save, load and a 2-step sample; the cached caption conditioning and the prediction held to the family's own pipeline;
then the flow families' training pattern: every applicable objective in one process, DPO and RPO on 2 ZeRO-3 ranks
with an exact resume after a kill, the export sampled and evaluated in the pipeline, the LoRA loaded with
``load_lora_weights``; the full-size parameter counts and plan tables."""

import math

import pytest
import torch
from trainrun import ZERO3, launch, launch_many, train_rows

from rpo_fast import testing as T
from rpo_fast.config import loss_options, parse_args
from rpo_fast.models import FAMILIES, load_family, model_kind

NEW = ("zimage", "flux2-klein", "flux2", "sana", "qwenimage")
OBJECTIVES = ("dpo", "rpo", "sft", "dense-dpo", "cal-dpo")  # DSPO is refused (test_dspo_and_graphs_refused)
SINGLE, ZERO2 = ZERO3.parent / "single_gpu.json", ZERO3.parent / "zero2_8bit.json"


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """Each new family's tiny pipeline and a cache of 12 warm-beats-cool pairs (32 px)."""
    from rpo_fast.data.writer import build_cache

    root = tmp_path_factory.mktemp("families")
    d = dict(root=root, clip=T.save_tiny_clip(root / "clip"))
    pairs = T.write_warm_preference_pairs(root / "warm", 12, seed=0)
    for kind in NEW:
        d[kind] = T.save_tiny_pipeline(root / kind, kind)
        d[f"cache_{kind}"] = root / f"cache_{kind}"
        build_cache(
            d[kind], pairs, d[f"cache_{kind}"], resolution=32, embedder=str(d["clip"]), shard_size=16,
            batch_size=8, progress=False, rank=0, world=1,
        )  # fmt: skip
    return d


# --------------------------------------------------------------------------------------------------
# The family against its diffusers pipeline
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", NEW)
def test_tiny_fixture_round_trips_and_samples(fam, kind, tmp_path):
    """Detected from its folder; saved again from the loaded pipeline, the copy samples the same 2-step image."""
    assert model_kind(fam[kind]) == kind
    family = load_family(fam[kind])
    pipe = family.load_pipeline()
    pipe.save_pretrained(tmp_path / "copy")
    again = load_family(tmp_path / "copy").load_pipeline()

    def draw(p):
        g = [torch.Generator().manual_seed(3)]
        kw = dict(num_inference_steps=2, height=32, width=32, generator=g, output_type="pt", **family.sample_options)
        out = p(prompt=["a warm square"], **kw)
        return out.images

    a, b = draw(pipe), draw(again)
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b) and a.std() > 0


@pytest.mark.parametrize("kind", NEW)
def test_cached_text_conditioning_is_the_pipelines(fam, kind):
    """The cached caption parts, put back by ``conditioning`` and cut by ``predict``, are the pipeline's
    ``encode_prompt`` output; a dropped caption takes the empty caption's (within 1e-4: threaded matmuls)."""
    family = load_family(fam[kind])
    pipe = family.load_text_encoders()
    caps = ["a warm red square", "Cool blue!"]
    parts = family.encode_texts(pipe, caps)
    empty = {k: v[0] for k, v in family.encode_texts(pipe, [""]).items()}
    cond = family.conditioning(parts, torch.tensor([False, True]), empty)
    if kind == "zimage":
        prompt = list(caps)
        want, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
        (e_empty,), _ = pipe.encode_prompt([""], do_classifier_free_guidance=False)
        want = [want[0], e_empty, want[0], e_empty]
        got = [e[:n] for e, n in zip(cond["prompt_embeds"], cond["prompt_length"].tolist())]
        assert caps == ["a warm red square", "Cool blue!"]  # the family passes a copy: the pipeline rewrites its own
        assert [len(g) for g in got] == [len(w) for w in want]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
        assert cond["prompt_embeds"][:, max(len(w) for w in want) :].abs().max() == 0  # the padding is zeros
    if kind in ("flux2-klein", "flux2"):
        want, _ = pipe.encode_prompt(list(caps))
        e_empty, _ = pipe.encode_prompt([""])
        assert want.shape[1] == 512 and want.shape[2] == 3 * pipe.text_encoder.config.get_text_config().hidden_size
        want = torch.cat([want[:1], e_empty, want[:1], e_empty])
        torch.testing.assert_close(cond["encoder_hidden_states"], want, rtol=1e-4, atol=1e-4)
    if kind == "sana":  # the pipeline's prompt (with its instruction) and negative prompt "" (without)
        pe, pm, ne, nm = pipe.encode_prompt(
            list(caps), do_classifier_free_guidance=True, negative_prompt="",
            complex_human_instruction=family.instruction,
        )  # fmt: skip
        want = torch.cat([pe[:1], ne[:1], pe[:1], ne[:1]])
        torch.testing.assert_close(cond["encoder_hidden_states"], want, rtol=1e-4, atol=1e-4)
        assert torch.equal(cond["encoder_attention_mask"], torch.cat([pm[:1], nm[:1], pm[:1], nm[:1]]).long())
        assert not torch.equal(pm[0], nm[0])  # the instruction is in the caption's tokens, not the empty one's
    if kind == "qwenimage":  # the template's first 34 tokens are what the pipeline drops
        prefix = pipe.prompt_template_encode.split("{}")[0]
        assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
        pe, pm = pipe.encode_prompt(list(caps))
        ne, nm = pipe.encode_prompt([""])
        pm = torch.ones(pe.shape[:2], dtype=torch.long) if pm is None else pm
        nm = torch.ones(ne.shape[:2], dtype=torch.long) if nm is None else nm
        for row, (e, m) in enumerate([(pe[0], pm[0]), (ne[0], nm[0])] * 2):
            got_e, got_m = cond["encoder_hidden_states"][row], cond["encoder_hidden_states_mask"][row]
            torch.testing.assert_close(got_e[: len(e)] * got_m[: len(e), None], e * m[:, None], rtol=1e-4, atol=1e-4)
            assert torch.equal(got_m[: len(m)], m.long()) and got_m[len(m) :].sum() == 0
    assert family.caption_shapes() == {k: tuple(v.shape[1:]) for k, v in parts.items()}


def _family_layout(kind, latents):
    """The pipeline's latents during sampling -> the family's layout (n, C, h, w)."""
    if kind in ("flux2-klein", "flux2"):  # packed tokens (n, h w, 128) of the patchified latent
        n, hw, c4 = latents.shape
        side = int(hw**0.5)
        return FAMILIES[kind].unpatchify(latents.permute(0, 2, 1).reshape(n, c4, side, side))
    if kind == "qwenimage":  # packed tokens (n, h/2 w/2, 4C), FLUX.1's packing
        n, hw, c4 = latents.shape
        side = 2 * int(hw**0.5)
        return FAMILIES["flux"].unpack(latents, side, side)
    return latents


@pytest.mark.parametrize("kind", NEW)
def test_prediction_and_shift_are_the_pipelines(fam, kind):
    """The pipeline's sampling sigmas are the family's shift of its sampler's grid (u = 1, ..., 1/N; SANA's DPM-Solver:
    0.999 times that) at the image's token count; and at a sampling step the family's prediction, from the latent in
    its own layout and t = 1000 s, is the model output the pipeline hands its scheduler (Z-Image negates the
    transformer's output and feeds it 1 - s; FLUX.2 packs patchified tokens; SANA scales t by timestep_scale)."""
    family = load_family(fam[kind])
    pipe = family.load_pipeline()
    steps, i, seen = 4, 1, []
    step = pipe.scheduler.step

    def record(model_output, timestep, sample, *args, **kw):
        seen.append((model_output.clone(), timestep, sample.clone()))
        return step(model_output, timestep, sample, *args, **kw)

    pipe.scheduler.step = record
    pipe(
        prompt=["a warm square"], num_inference_steps=steps, height=32, width=32, guidance_scale=0,
        generator=torch.Generator().manual_seed(5), output_type="latent", **family.sample_options,
    )  # fmt: skip
    sched = pipe.scheduler
    model_output, timestep, sample = seen[i]
    sample, want = _family_layout(kind, sample), _family_layout(kind, model_output)
    family.sample_steps = steps  # FLUX.2's shift depends on the sampler's step count
    shifted = family.sampler_sigmas(steps, family.tokens(sample.shape[1:]))
    torch.testing.assert_close(sched.sigmas[:-1].double(), shifted, rtol=1e-5, atol=1e-6)
    parts = family.encode_texts(family.load_text_encoders(), ["a warm square"])
    cond = family.conditioning(parts, torch.tensor([False]), {k: v[0] for k, v in parts.items()}, pairs=False)
    if "guidance" in cond:  # FLUX.2-dev's embedded guidance: the pipeline's guidance_scale
        cond["guidance"] = torch.zeros_like(cond["guidance"])
    with torch.no_grad():
        got = family.predict(pipe.transformer, sample, timestep.reshape(1).float(), cond)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", NEW)
def test_dspo_and_graphs_refused(fam, kind):
    def opts(*extra):
        data = ["--data", str(fam[f"cache_{kind}"])]
        return parse_args(["--ds_config", str(SINGLE), "--model", str(fam[kind]), *data, *extra])

    family = load_family(fam[kind])
    assert loss_options(opts("--objective", "dpo"), family)["beta"] == 100.0
    with pytest.raises(ValueError, match=f"--objective dspo does not apply to {kind} models"):
        loss_options(opts("--objective", "dspo"), family)
    if not FAMILIES[kind].fixed_shapes:
        from rpo_fast.config import validate

        with pytest.raises(ValueError, match=f"--reference-graphs: {kind} models take each caption"):
            validate(opts("--reference-graphs"), family=family)


@pytest.mark.parametrize("kind", NEW)
def test_cache_bytes_formula_is_the_shards(fam, kind):
    """benchmarks/plans/flow_plan.py's bytes per pair (the plan's cache column), held to the tiny cache's shard."""
    import flow_plan
    from safetensors.torch import load_file

    family = load_family(fam[kind])
    shard = load_file(fam[f"cache_{kind}"] / "shard-r0-00000.safetensors")
    n, unique = len(shard["text_index"]), len(shard[family.caption_keys[0]])
    c = family.latent_channels
    per = flow_plan.cache_bytes_per_pair(
        kind, c, 16, clip_dim=16, captions_per_pair=unique / n, text_bytes=flow_plan.caption_bytes(family)
    )
    assert sum(t.numel() * t.element_size() for t in shard.values()) == pytest.approx(n * per, rel=1e-9)


def test_full_size_parameter_counts():
    """Counted on the meta device from the declared configs: Z-Image-Turbo 6.15 B."""
    for kind in NEW:
        family = FAMILIES[kind]
        for name, spec in family.full.items():
            with torch.device("meta"):
                m = family.denoiser_class()(**spec[family.denoiser_folder])
            assert sum(p.numel() for p in m.parameters()) == spec["params"], name


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _args(fam, kind, out, objective, *extra):
    args = ["--ds_config", str(ZERO3), "--model", str(fam[kind]), "--data", str(fam[f"cache_{kind}"])]
    args += ["--output", str(out), "--objective", objective, "--log-every", "1", "--no-progress"]
    return args + ["--mixed-precision", "no", "--optimizer", "adamw", *extra]


@pytest.fixture(scope="module")
def one_process(fam, tmp_path_factory):
    """Every objective but DSPO on each new family in one process, 2 pairs a step, 3 steps; and DPO in bf16 with
    8-bit AdamW (the shipped defaults) on ZeRO-3 and on ZeRO-2."""
    root = tmp_path_factory.mktemp("one")
    runs = {(k, o): root / f"{k}-{o}" for k in NEW for o in OBJECTIVES}
    argv = [_args(fam, k, out, o, "--micro-batch-size", "2", "--max-steps", "3") for (k, o), out in runs.items()]
    bf16 = ("--micro-batch-size", "2", "--max-steps", "2", "--mixed-precision", "bf16", "--optimizer", "adamw8bit")
    for k in NEW:  # the shipped defaults, bf16 with 8-bit AdamW, on ZeRO-3 and on ZeRO-2
        runs[k, "bf16"] = root / f"{k}-bf16"
        argv.append(_args(fam, k, runs[k, "bf16"], "dpo", *bf16))
        runs[k, "zero2"] = root / f"{k}-zero2"
        argv.append([*_args(fam, k, runs[k, "zero2"], "dpo", *bf16), "--ds_config", str(ZERO2)])
    res = launch_many(argv)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return runs


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", NEW)
@pytest.mark.parametrize("objective", [*OBJECTIVES, "bf16", "zero2"])
def test_every_objective_trains_in_one_process(one_process, kind, objective):
    """Finite losses; where there is a reference, step 1 ties (DPO-type losses at log 2) and step 2 has moved."""
    rows = train_rows(one_process[kind, objective])
    steps = sorted(rows)
    assert steps == ([1, 2] if objective in ("bf16", "zero2") else [1, 2, 3])
    losses = [rows[s]["loss/loss"] for s in steps]
    assert all(math.isfinite(v) for v in losses)
    if objective in ("dpo", "rpo", "dense-dpo", "bf16", "zero2"):
        assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    if objective != "sft":
        assert rows[1]["loss/mse_w"] == pytest.approx(rows[1]["loss/ref_mse_w"], rel=1e-6)
        assert rows[2]["loss/mse_w"] != rows[2]["loss/ref_mse_w"]
    assert (one_process[kind, objective] / FAMILIES[kind].denoiser_folder / "config.json").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_precomputed_reference_gives_the_live_references_losses(fam, one_process, tmp_path):
    """``python -m rpo_fast.reference`` on each new family's cache, then DPO reading the table without a reference
    model (one process for all the families): the live reference's losses (rel 1e-4) at every step."""
    from rpo_fast.reference import ReferenceConfig, run_pass

    argv = []
    for kind in NEW:
        table = run_pass(
            ReferenceConfig(
                model=str(fam[kind]), data=str(fam[f"cache_{kind}"]), reference_table=str(tmp_path / f"table-{kind}"),
                mixed_precision="no", progress=False, epochs=1, batch_size=5, objective="dpo",
            )
        )  # fmt: skip
        extra = ("--micro-batch-size", "2", "--max-steps", "3", "--ref-placement", "precomputed")
        argv.append(_args(fam, kind, tmp_path / kind, "dpo", *extra, "--reference-table", str(table)))
    res = launch_many(argv)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for kind in NEW:
        live, pre = train_rows(one_process[kind, "dpo"]), train_rows(tmp_path / kind)
        assert [pre[s]["loss/loss"] for s in (1, 2, 3)] == pytest.approx(
            [live[s]["loss/loss"] for s in (1, 2, 3)], rel=1e-4
        ), kind


@pytest.fixture(scope="module")
def two_ranks(fam, tmp_path_factory):
    """DPO and RPO on 2 ZeRO-3 ranks x 1 pair a rank, 3 steps, a checkpoint at step 2, for every new family: the ten
    runs in one deepspeed launch (tests/train_many.py on each rank)."""
    root = tmp_path_factory.mktemp("two")
    runs = {(k, o): root / f"{k}-{o}" for k in NEW for o in ("dpo", "rpo")}
    res = launch_many([_args(fam, k, out, o, *TWO_RANK_STEPS) for (k, o), out in runs.items()], ranks=2)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return runs


TWO_RANK_STEPS = ("--micro-batch-size", "1", "--max-steps", "3", "--checkpoint-every", "2")


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", NEW)
def test_two_ranks_resume_exactly_and_export_for_diffusers(fam, one_process, two_ranks, kind, tmp_path):
    """2 ZeRO-3 ranks x 1 pair: DPO's and RPO's losses equal one process holding both pairs (rel 1e-4); RPO killed
    after step 2's checkpoint and resumed gives the uninterrupted run's losses to the bit; the export loads with
    from_pretrained, has moved, samples in the family's pipeline and evaluates with its defaults."""
    from rpo_fast.evaluate import evaluate, load_pipeline, sample

    steps = list(TWO_RANK_STEPS)
    runs = {o: two_ranks[kind, o] for o in ("dpo", "rpo")}
    for objective, run in runs.items():
        one, two = train_rows(one_process[kind, objective]), train_rows(run)
        for s in (1, 2, 3):
            assert two[s]["loss/loss"] == pytest.approx(one[s]["loss/loss"], rel=1e-4), (objective, s)
    killed = tmp_path / "killed"
    res = launch(_args(fam, kind, killed, "rpo", *steps, "--debug-exit-after-step", "2"))
    assert res.returncode != 0 and (killed / "checkpoints" / "step-2" / "COMPLETE").exists()
    res = launch(_args(fam, kind, killed, "rpo", *steps, "--resume"))
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = train_rows(runs["rpo"]), train_rows(killed)
    assert sorted(b) == [1, 2, 3] and all(a[s]["loss/loss"] == b[s]["loss/loss"] for s in (1, 2, 3))

    family = load_family(fam[kind])
    folder = runs["dpo"] / family.denoiser_folder
    tuned, base = family.load_denoiser(folder), family.load_denoiser()
    assert max((p - q).abs().max().item() for p, q in zip(tuned.parameters(), base.parameters())) > 0
    pipe = load_pipeline(family, unet=folder, device="cpu")
    assert sample(pipe, ["a warm square"], tmp_path / "images", steps=2, resolution=32, progress=False)[0].exists()
    (tmp_path / "prompts.txt").write_text("a warm square\na cool circle\n")
    summary = evaluate(
        fam[kind], tmp_path / "prompts.txt", tmp_path / "eval", unet=folder, resolution=32, device="cpu", steps=2,
        progress=False,
    )  # fmt: skip
    assert summary["steps"] == 2 and len(list((tmp_path / "eval" / "images" / "tuned").glob("*.png"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("kind", NEW)
def test_lora_trains_and_loads_in_the_pipeline(fam, kind, tmp_path):
    """LoRA: ties at step 1 (the reference is the adapter-disabled policy); the adapter loads with the pipeline's
    load_lora_weights and changes the transformer's prediction."""
    from rpo_fast.evaluate import load_pipeline

    out = tmp_path / "lora"
    args = _args(fam, kind, out, "dpo", "--micro-batch-size", "2", "--max-steps", "2", "--lora-rank", "4")
    args[args.index("--ds_config") + 1] = str(SINGLE)
    res = launch([*args, "--lr", "1e-2"], ranks=1)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert train_rows(out)[1]["loss/loss"] == pytest.approx(math.log(2), abs=1e-6)
    family = load_family(fam[kind])
    from safetensors.torch import load_file

    saved = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert all(any(f".{t}.lora_A" in k for k in saved) for t in family.lora_targets)  # the family's targets, each
    base = load_pipeline(family, device="cpu").transformer
    tuned = load_pipeline(family, lora=out / "lora", device="cpu").transformer
    for key, w in saved.items():  # every saved adapter sits where it was trained
        if key.endswith(".lora_A.weight"):
            module = tuned.get_submodule(key.removeprefix("transformer.").removesuffix(".lora_A.weight"))
            assert any(torch.equal(a.weight, w) for a in module.lora_A.values()), key
    _, t, cond = family.dummy_inputs(1)
    x = torch.randn(1, family.latent_channels, 8, 8)
    cond = {k: v[:, :40] if v.dim() > 1 else torch.full_like(v, 40) for k, v in cond.items()}
    with torch.no_grad():
        assert (family.predict(tuned, x, t, cond) - family.predict(base, x, t, cond)).abs().max() > 0
