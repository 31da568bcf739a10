"""The trainer on the fixtures' tiny models, on CPU: 2 ranks through the deepspeed launcher (gloo, ZeRO-3,
bitsandbytes AdamW8bit, bf16), learning a preference, exact resume, refusals of bad input."""

import json
import math
import os

import pytest
from trainrun import ROOT, ZERO3, common, launch, metrics, train_rows

from rpo_fast import testing as T
from rpo_fast.config import TrainConfig, parse_args, validate
from rpo_fast.data.dataset import check_dataset as _check_dataset
from rpo_fast.data.dataset import open_dataset as _open_dataset
from rpo_fast.data.schema import CacheError
from rpo_fast.data.writer import build_cache
from rpo_fast.metrics import eval_keys, row_keys
from rpo_fast.models import load_family
from rpo_fast.objectives import objective


def open_dataset(cfg: TrainConfig, data: str):
    return _open_dataset(data, family=load_family(cfg.model), resolution=cfg.resolution)


def check_dataset(cfg: TrainConfig, dataset, world: int) -> None:
    needs = objective(cfg.objective).embeddings
    _check_dataset(
        dataset, pairs_per_rank=cfg.micro_batch_size, world=world, needs_embeddings=needs, objective=cfg.objective
    )


# --------------------------------------------------------------------------------------------------
# 2 ranks, ZeRO-3, 8-bit AdamW: both model kinds, dpo and rpo
# --------------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("kind,objective", [("sd15", "dpo"), ("sd15", "rpo"), ("sdxl", "dpo"), ("sdxl", "rpo")])
def test_two_ranks_train_export_and_log(runs, tmp_path, kind, objective):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "run"
    res = launch(
        common(
            runs,
            kind,
            out,
            "--objective",
            objective,
            "--max-steps",
            "3",
            "--checkpoint-every",
            "2",
            "--gradient-checkpointing",
        )
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "2 rank(s) x 2 pairs x 1 accumulation = 4 pairs/step" in res.stdout
    log = res.stdout + res.stderr  # the known noise is dropped in the ranks (rpo_fast/logs.py)
    assert "untested optimizer" not in log and "gemm_4bit_forward" not in log and "requires torchvision" not in log
    # only the launchers' (they import deepspeed before rpo_fast runs), never the ranks'
    assert log.count("Setting accelerator to CPU") <= (0 if "DS_ACCELERATOR" in os.environ else 2), log[-3000:]
    rows = train_rows(out)
    assert sorted(rows) == [1, 2, 3]
    for step, row in rows.items():
        assert set(row) - {"step"} == set(row_keys(objective)), set(row) ^ set(row_keys(objective))  # documented
        assert all(math.isfinite(v) for v in row.values()), (step, row)
    assert rows[1]["reward/implicit_acc"] == 0.5  # step 1 runs the policy at its initial weights: all ties
    if objective == "rpo":
        assert 0 < rows[1]["reward/weight_diag"] < 1
    env = json.loads((out / "env.json").read_text())
    # `import kernels` never finds rpo_fast/kernels (rpo_fast/ is not on sys.path): it fails, or finds the hub package
    # that transformers 5.25 and later install
    assert env["world"] == 2 and str(ROOT / "rpo_fast") not in env["import_kernels"], env["import_kernels"]
    assert env["import_kernels"].startswith("fails") or "site-packages" in env["import_kernels"], env["import_kernels"]
    assert str(ROOT / "rpo_fast") not in env["sys_path"]
    assert json.loads((out / "config.json").read_text())["deepspeed"]["zero_optimization"]["stage"] == 3
    tuned = UNet2DConditionModel.from_pretrained(out / "unet")
    base = UNet2DConditionModel.from_pretrained(runs[kind], subfolder="unet")
    diffs = [
        (a - b.to(a.dtype)).abs().max().item() for a, b in zip(tuned.state_dict().values(), base.state_dict().values())
    ]
    assert max(diffs) > 0  # trained
    assert tuned.config.addition_embed_type == base.config.addition_embed_type


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_on_both(runs, tmp_path):
    out = tmp_path / "run"
    res = launch(
        common(
            runs,
            "sd15",
            out,
            "--objective",
            "dpo",
            "--max-steps",
            "4",
            "--checkpoint-every",
            "4",
            "--debug-nan-steps",
            "2@1",
            "--no-export",
        )
    )
    assert res.returncode == 0, res.stderr[-3000:]  # no hang: the ranks agreed
    rows = train_rows(out)
    assert math.isnan(rows[2]["loss/loss"]) and rows[2]["train/skipped_steps"] == 1
    assert rows[4]["train/skipped_steps"] == 1 and math.isfinite(rows[4]["loss/loss"])


def test_too_many_nonfinite_steps_stop_with_an_error(runs, tmp_path):
    out = tmp_path / "run"
    res = launch(
        common(
            runs,
            "sd15",
            out,
            "--objective",
            "dpo",
            "--max-steps",
            "5",
            "--debug-nan-steps",
            "1,2,3",
            "--max-consecutive-skips",
            "2",
            "--no-export",
        ),
        ranks=1,
    )
    assert res.returncode != 0
    assert "3 optimizer steps in a row had a non-finite loss" in res.stderr


@pytest.mark.slow
def test_training_straight_from_raw_pairs(runs, tmp_path):
    """--data a pairs.jsonl (encoded on the fly, with --clip for RPO's embeddings): trains and logs (it died at
    start-up once, in the tie check of the on-the-fly dataset)."""
    data = T.write_pairs_jsonl(tmp_path / "raw", 6, size=40)
    out = tmp_path / "run"
    args = ["--ds_config", str(ZERO3), "--model", str(runs["sd15"]), "--data", str(data), "--output", str(out)]
    args += ["--resolution", "32", "--clip", str(runs["clip"]), "--objective", "rpo", "--micro-batch-size", "2"]
    args += ["--max-steps", "2", "--log-every", "1", "--no-progress", "--no-export"]
    res = launch(args, ranks=1)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "| 6 pairs (3.0 steps/epoch; skipped rows: none)" in res.stdout
    rows = train_rows(out)
    assert sorted(rows) == [1, 2] and all(math.isfinite(r["loss/loss"]) for r in rows.values())
    assert 0 < rows[1]["reward/weight_diag"] < 1


# --------------------------------------------------------------------------------------------------
# Learning a preference
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_implicit_accuracy_rises_on_a_learnable_preference(tmp_path):
    """The demo's task (rpo_fast/demo): the shipped 1.4M-parameter base model, 200 training pairs whose winner is
    the warmer object colour, 64 held-out pairs x 2 fixed noise and timestep draws; ZeRO-3, 8-bit AdamW, one rank.
    Measured on this CPU (seeds 0, 1, 2): 0.5 at step 0, 0.95 / 0.90 / 0.91 at step 40, in about 40 s.
    (A random-weight tiny UNet learns the same preference too, but its curve wanders from seed to seed: 0.66 to
    0.89 at step 120.)"""
    from rpo_fast.demo.__main__ import ASSETS, make_caches

    cache, eval_cache = make_caches(tmp_path, str(ASSETS / "base"), rounds=2)
    out = tmp_path / "run"
    res = launch(
        [
            "--ds_config",
            str(ZERO3),
            "--model",
            str(ASSETS / "base"),
            "--data",
            str(cache),
            "--eval-data",
            str(eval_cache),
            "--output",
            str(out),
            "--objective",
            "dpo",
            "--beta",
            "500",
            "--lr",
            "5e-5",
            "--micro-batch-size",
            "8",
            "--max-steps",
            "40",
            "--eval-every",
            "40",
            "--eval-pairs",
            "64",
            "--eval-repeats",
            "2",
            "--log-every",
            "20",
            "--checkpoint-every",
            "40",
            "--no-progress",
            "--no-export",
        ],
        ranks=1,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [r for r in metrics(out) if "eval/implicit_acc" in r]
    assert all(set(r) - {"step"} == set(eval_keys("dpo")) for r in rows), rows[0]  # documented
    evals = {r["step"]: r["eval/implicit_acc"] for r in rows}
    assert evals[0] == 0.5
    assert evals[40] >= 0.7, evals


# --------------------------------------------------------------------------------------------------
# Checkpoints: exact resume, a kill during a save
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_discounted_sampling_applies_the_discount_once(runs, tmp_path):
    """--timestep-sampling discounted draws t ~ w(t) (the authors' estimator), so the loss carries no weight: on a
    policy moved off the reference, the trainer's dense-dpo loss equals the unweighted one (gamma 1) on the same draws
    (eager, rtol 1e-6) and differs from the w(t)-weighted one by more than 1% (the double discount gave that)."""
    import torch

    from rpo_fast import PreferenceLoss
    from rpo_fast.train import Trainer

    cfg = TrainConfig(
        ds_config=str(ROOT / "configs" / "single_gpu.json"), model=str(runs["sd15"]),
        data=str(runs["root"] / "cache_sd15"), output=str(tmp_path / "o"), objective="dense-dpo",
        timestep_sampling="discounted", micro_batch_size=4, mixed_precision="no", optimizer="adamw",
        loss_backend="eager", export=False, progress=False, tensorboard=False,
    )  # fmt: skip
    trainer = Trainer(cfg)
    assert trainer.loss_fn.options["timestep_sampling"] == "discounted" and trainer.timestep_probs is not None
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainer.engine.module.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g))
    picks, batch = trainer.loader.next()
    seeds = trainer.pair_seeds(picks)
    beta = trainer.loss_opts["beta"]
    losses = {}
    for name, gamma in (("trainer", None), ("unweighted", 1.0), ("weighted", 0.9)):
        if gamma is not None:
            trainer.loss_fn = PreferenceLoss("dense-dpo", backend="eager", beta=beta, gamma=gamma)
        losses[name] = trainer.forward_loss(batch, seeds).loss.item()
    trainer.close()
    assert losses["trainer"] == pytest.approx(losses["unweighted"], rel=1e-6), losses
    assert abs(losses["weighted"] - losses["unweighted"]) > 0.01 * losses["unweighted"], losses


@pytest.mark.multiprocess
@pytest.mark.slow
def test_resume_is_exact_and_survives_a_kill_during_save(runs, tmp_path):
    """6 steps straight == 2 steps, a kill, a resume that is killed while saving step 4, a resume from step 2,
    6 steps. Tolerance: the losses are equal to the bit (same machine, same ranks)."""
    args = [
        "--objective",
        "rpo",
        "--max-steps",
        "6",
        "--checkpoint-every",
        "2",
        "--keep-checkpoints",
        "2",
        "--no-export",
    ]
    straight = tmp_path / "straight"
    res = launch(common(runs, "sd15", straight, *args))
    assert res.returncode == 0, res.stderr[-3000:]

    out = tmp_path / "killed"
    res = launch(common(runs, "sd15", out, *args, "--debug-exit-after-step", "2"))
    assert res.returncode != 0 and (out / "checkpoints" / "step-2" / "COMPLETE").exists()
    res = launch(common(runs, "sd15", out, *args, "--resume", "--debug-kill-in-save", "4"))
    assert res.returncode != 0
    assert (out / "checkpoints" / "step-4").is_dir() and not (out / "checkpoints" / "step-4" / "COMPLETE").exists()
    res = launch(common(runs, "sd15", out, *args, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "step-2" in res.stdout

    a, b = train_rows(straight), train_rows(out)
    assert sorted(a) == list(range(1, 7)) and set(b) >= set(range(1, 7))
    for step in range(1, 7):
        assert a[step]["loss/loss"] == b[step]["loss/loss"], (step, a[step]["loss/loss"], b[step]["loss/loss"])
    logged = [r["step"] for r in metrics(out) if "loss/loss" in r]
    assert logged == list(range(1, 7))  # each step once: what the killed runs logged after step 2 was dropped
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept == ["step-4", "step-6"]  # the newest 2 complete ones; the broken step-4 was redone


# --------------------------------------------------------------------------------------------------
# Bad input: a clear error before any model is loaded
# --------------------------------------------------------------------------------------------------


def _cfg(runs, tmp_path, **kw) -> TrainConfig:
    base = dict(
        ds_config=str(ZERO3),
        model=str(runs["sd15"]),
        data=str(runs["root"] / "cache_sd15"),
        output=str(tmp_path / "out"),
    )
    return TrainConfig(**{**base, **kw})


def _ds(tmp_path, **entries) -> str:
    cfg = json.loads(ZERO3.read_text())
    for k, v in entries.items():
        if v is None:
            cfg.pop(k, None)
        elif isinstance(v, dict):
            cfg[k] = {**cfg.get(k, {}), **v}
        else:
            cfg[k] = v
    path = tmp_path / f"ds{len(list(tmp_path.glob('ds*.json')))}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_bad_inputs_are_refused_with_a_message(runs, tmp_path):
    cases = [
        (dict(model=str(tmp_path / "nope")), FileNotFoundError, "--model .* is not a folder"),
        (dict(data=str(tmp_path / "nope")), FileNotFoundError, "--data .* does not exist"),
        (dict(ds_config=str(tmp_path / "nope.json")), FileNotFoundError, "--ds_config .* does not exist"),
        (dict(ds_config=_ds(tmp_path, optimizer={"type": "AdamW"})), ValueError, "defines an 'optimizer' section"),
        (dict(ds_config=_ds(tmp_path, scheduler={"type": "WarmupLR"})), ValueError, "defines an 'scheduler' section"),
        (dict(ds_config=_ds(tmp_path, train_batch_size=3)), ValueError, "does not divide into micro-batch 1"),
        (
            dict(ds_config=_ds(tmp_path, train_micro_batch_size_per_gpu=4)),
            ValueError,
            "train_micro_batch_size_per_gpu=4",
        ),
        (dict(ds_config=_ds(tmp_path, zero_optimization={"sub_group_size": 2**31})), ValueError, "under 2\\^31"),
        (
            dict(ds_config=_ds(tmp_path, zero_optimization={"reduce_bucket_size": "auto"})),
            ValueError,
            "give an integer",
        ),
        (
            dict(ds_config=_ds(tmp_path, zero_optimization={"offload_optimizer": {"device": "cpu"}})),
            ValueError,
            "cannot step offloaded",
        ),
        (dict(objective="dpo", tau=0.5), ValueError, "--tau does not apply to --objective dpo"),
        (dict(objective="ppo"), ValueError, "unknown objective"),
        (dict(objective="rpo", weighting="middle"), ValueError, "weighting must be"),
        (dict(mixed_precision="fp8"), ValueError, "--mixed-precision must be"),
        (dict(ref_placement="zero4"), ValueError, "--ref-placement must be"),
        (dict(empty_caption_prob=1.5), ValueError, "--empty-caption-prob"),
        (dict(max_steps=0), ValueError, "--max-steps must be at least 1"),
        (dict(resolution=30), ValueError, "multiple of 8"),
        (dict(timestep_sampling="discounted"), ValueError, "applies to --objective dense-dpo"),
        (dict(export_only=True, resume=True), ValueError, "no complete checkpoint"),
    ]
    for kw, exc, message in cases:
        with pytest.raises(exc, match=message):
            validate(_cfg(runs, tmp_path, **kw))
    busy = tmp_path / "busy"
    (busy / "checkpoints" / "step-2").mkdir(parents=True)
    (busy / "checkpoints" / "step-2" / "COMPLETE").write_text("{}")
    with pytest.raises(ValueError, match="already holds checkpoints: pass --resume"):
        validate(_cfg(runs, tmp_path, output=str(busy)))


def test_data_mismatches_are_refused(runs, tmp_path):
    with pytest.raises(CacheError, match="another model"):
        open_dataset(_cfg(runs, tmp_path, model=str(runs["sdxl"])), str(runs["root"] / "cache_sd15"))
    with pytest.raises(CacheError, match="resolution 32, the run asks for 64"):
        open_dataset(_cfg(runs, tmp_path, resolution=64), str(runs["root"] / "cache_sd15"))
    no_clip = open_dataset(_cfg(runs, tmp_path), str(runs["root"] / "eval_sd15"))
    with pytest.raises(ValueError, match="rpo needs CLIP embeddings"):
        check_dataset(_cfg(runs, tmp_path, objective="rpo"), no_clip, 1)
    with pytest.raises(ValueError, match="fewer than one micro-batch per rank"):
        check_dataset(_cfg(runs, tmp_path, objective="dpo", micro_batch_size=40), no_clip, 2)
    rows = T.pickapic_rows(8, tie_every=2)
    T.write_pickapic_shard(tmp_path / "ties" / "a.parquet", rows)
    build_cache(
        runs["sd15"],
        tmp_path / "ties",
        tmp_path / "tie_cache",
        resolution=32,
        keep_ties=True,
        shard_size=4,
        batch_size=4,
        progress=False,
        rank=0,
        world=1,
    )
    ties = open_dataset(_cfg(runs, tmp_path), str(tmp_path / "tie_cache"))
    with pytest.raises(ValueError, match="holds 4 tie"):
        check_dataset(_cfg(runs, tmp_path, objective="dpo"), ties, 1)


def test_cli_error_is_a_message_before_loading(runs, tmp_path):
    res = launch(
        [
            "--ds_config",
            _ds(tmp_path, optimizer={"type": "Adam"}),
            "--model",
            str(runs["sd15"]),
            "--data",
            str(runs["root"] / "cache_sd15"),
            "--output",
            str(tmp_path / "o"),
        ],
        ranks=1,
        timeout=120,
    )
    assert res.returncode == 2
    assert "rpo_fast/train.py: error: --ds_config" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_flags_are_the_contract():
    cfg = parse_args(
        [
            "--ds_config",
            "c.json",
            "--model",
            "m",
            "--data",
            "d",
            "--objective",
            "rpo",
            "--beta",
            "2500",
            "--tau",
            "0.25",
            "--weighting",
            "outside",
            "--output",
            "o",
            "--max-steps",
            "7",
            "--lr",
            "1e-8",
            "--scale-lr",
            "--warmup-steps",
            "3",
            "--seed",
            "4",
            "--resume",
            "--checkpoint-every",
            "5",
            "--keep-checkpoints",
            "1",
            "--empty-caption-prob",
            "0.1",
            "--resolution",
            "512",
            "--gradient-checkpointing",
            "--mixed-precision",
            "fp16",
            "--ref-placement",
            "replicated",
            "--loss-backend",
            "eager",
            "--local_rank=1",
        ]
    )
    assert (cfg.beta, cfg.tau, cfg.weighting, cfg.max_steps, cfg.lr, cfg.scale_lr, cfg.warmup_steps) == (
        2500.0,
        0.25,
        "outside",
        7,
        1e-8,
        True,
        3,
    )
    assert (cfg.resume, cfg.checkpoint_every, cfg.keep_checkpoints, cfg.empty_caption_prob, cfg.resolution) == (
        True,
        5,
        1,
        0.1,
        512,
    )
    assert cfg.gradient_checkpointing and cfg.mixed_precision == "fp16" and cfg.loss_backend == "eager"
    assert cfg.local_rank == 1 and not parse_args(["--ds_config", "c", "--model", "m", "--data", "d"]).scale_lr
