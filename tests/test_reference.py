"""The precomputed reference (rpo_fast/reference.py): the pass's table, the trainer without a reference model, and
the checks that refuse a table made for other settings.

Bound: at beta 5000 in fp32 the per-image implicit rewards h = -(beta / 2)(m - r), and so the pair logits, of a run
reading the table agree with the live reference's within 1e-3 (the live path's delta comes from one fp32 expression,
the table's from m and r accumulated in float64); the loss within 1e-4 relative, and its gradient with respect to the
policy's prediction within 1e-4 of its largest element."""

from pathlib import Path

import numpy as np
import pytest
import torch
from trainrun import in_process_trainer, step_losses

from rpo_fast.reference import ReferenceConfig, run_pass

LOGIT_TOL = 1e-3  # absolute, on h_w, h_l and u at beta 5000, fp32
GRAD_TOL = 1e-4  # relative to the largest element of the gradient with respect to the prediction
LOSS_RTOL = 1e-4  # cal-dpo's loss grows with h^2 (17 at these settings): 1.1e-5 relative measured


def table_for(runs, folder: Path, kind: str = "sd15", **kw) -> Path:
    """The pass on the ``runs`` fixture's cache of ``kind`` (fp32, the tests' trainer settings), into ``folder``."""
    cfg = dict(
        model=str(runs[kind]),
        data=str(runs["root"] / f"cache_{kind}"),
        reference_table=str(folder),
        mixed_precision="no",
        progress=False,
        epochs=1,
        batch_size=5,  # odd: the chunks do not divide the 48 pairs
    )
    return run_pass(ReferenceConfig(**(cfg | kw)))


@pytest.fixture(scope="module")
def sd15_table(runs, tmp_path_factory):
    return table_for(runs, tmp_path_factory.mktemp("table") / "sd15")


@pytest.fixture(scope="module")
def with_flows(runs, tmp_path_factory):
    """The ``runs`` fixture and tiny SD3 and FLUX pipelines, each with a synthetic cache of 24 pairs."""
    from rpo_fast import testing as T

    root, out = tmp_path_factory.mktemp("flows"), dict(runs)
    for kind in ("sd3", "flux"):
        out[kind] = T.save_tiny_pipeline(root / kind, kind)
        T.write_synthetic_cache(out[kind], runs["root"] / f"cache_{kind}", 24, resolution=32, embed_dim=16)
    return out


def _perturb(trainer, seed: int = 3) -> None:
    """The same small change of the policy in every trainer built alike: the policy and the reference differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainer.engine.module.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g))


def _loss_and_grad(trainer, batch, seeds, ref_errors=None):
    """The loss's metrics and its gradient with respect to the policy's prediction (a leaf: every parameter's gradient
    is a linear function of it)."""
    predict, leaf = trainer.family.predict, {}

    def predict_leaf(model, *a, **kw):
        out = predict(model, *a, **kw)
        if model is trainer.engine:
            leaf["pred"] = out = out.detach().requires_grad_(True)
        return out

    trainer.family.predict = predict_leaf
    try:
        out = trainer.forward_loss(batch, seeds, ref_errors=ref_errors)
    finally:
        trainer.family.predict = predict
    (grad,) = torch.autograd.grad(out.loss, leaf["pred"])
    return {k: float(v) for k, v in out.metrics.items()}, grad


# (family, objective, the pass's and the run's further settings): every objective a table serves, on a UNet and a flow
# family, the dense-dpo case with the discounted timestep law (the pass draws t as the run does)
CASES = [
    ("sd15", "dpo", {}),
    ("sd15", "rpo", {}),
    ("sdxl", "cal-dpo", {}),
    ("sd3", "dense-dpo", dict(timestep_sampling="discounted")),
    ("flux", "dpo", {}),
]


@pytest.mark.parametrize("kind, objective, extra", CASES, ids=[f"{k}-{o}" for k, o, _ in CASES])
def test_the_table_gives_the_live_references_loss_and_gradient(with_flows, tmp_path, kind, objective, extra):
    """One process, beta 5000, fp32: the run reading the table and the run with the live reference give the same
    implicit rewards (within LOGIT_TOL), loss and gradient (GRAD_TOL), on the same picks and draws; then the run
    without a reference model trains a step of finite loss."""
    runs = with_flows
    table = table_for(runs, tmp_path / "table", kind, objective=objective, **extra)
    kw = dict(objective=objective, max_steps=10, beta=5000.0, **extra)
    if kind in ("sd3", "flux"):
        kw |= dict(model=str(runs[kind]), data=str(runs["root"] / f"cache_{kind}"))
    live = in_process_trainer(runs, tmp_path / "live", kind, **kw)
    pre = in_process_trainer(
        runs, tmp_path / "pre", kind, ref_placement="precomputed", reference_table=str(table), **kw
    )
    assert live.reference is not None and pre.reference is None and "precomputed" in pre._summary()
    for t in (live, pre):
        _perturb(t)
    for _ in range(3):
        picks, batch = live.loader.next()
        pre.loader.next()
        seeds = live.pair_seeds(picks)
        a, grad_a = _loss_and_grad(live, batch, seeds)
        b, grad_b = _loss_and_grad(pre, batch, seeds, pre.table.train_errors(picks))
        for key in ("reward_w", "reward_l", "reward_margin"):
            assert abs(a[key] - b[key]) <= LOGIT_TOL, (key, a[key], b[key])
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL, abs=1e-6), (a["loss"], b["loss"])
        assert abs(a["ref_mse_w"] - b["ref_mse_w"]) <= 1e-6 * a["ref_mse_w"]
        err = (grad_a - grad_b).abs().max() / grad_a.abs().max()
        assert err <= GRAD_TOL, err
        assert a["reward_margin"] != 0.0  # the policy was perturbed: the check compares something
    pre.train_step()
    assert np.isfinite(pre.metrics.mean(pre.device)["loss"])
    live.close()
    pre.close()


def test_a_killed_pass_resumes_to_the_same_table(runs, sd15_table, tmp_path, monkeypatch):
    """A pass killed after a few chunks keeps them (each written atomically) and, run again, computes only the rest:
    its table equals the uninterrupted pass's, to the bit."""
    import rpo_fast.reference as R

    write, written = R._write_atomic, []

    def dies_after_three(path, data):
        if path.parent.name == "parts":
            if len(written) == 3:
                raise KeyboardInterrupt
            written.append(path)
        write(path, data)

    monkeypatch.setattr(R, "_write_atomic", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        table_for(runs, tmp_path / "t")
    monkeypatch.setattr(R, "_write_atomic", write)
    assert len(list((tmp_path / "t" / "parts").glob("*.npy"))) == 3 and not (tmp_path / "t" / "COMPLETE").exists()
    table_for(runs, tmp_path / "t")
    for name in ("train.npy", "eval.npy"):
        assert np.array_equal(np.load(tmp_path / "t" / name), np.load(sd15_table / name)), name


def test_a_finished_table_grows_by_the_epochs_asked_for(runs, sd15_table, tmp_path):
    """A finished table run again with more --epochs keeps its chunks and computes only the new epoch's."""
    import shutil

    table = tmp_path / "t"
    shutil.copytree(sd15_table, table)
    table_for(runs, table, epochs=2)
    grown = np.load(table / "train.npy")
    assert grown.shape == (2, 48, 2) and np.array_equal(grown[:1], np.load(sd15_table / "train.npy"))
    assert not np.array_equal(grown[0], grown[1])  # epoch 1: other flips and draws


def test_a_compiled_pass_gives_the_eager_table(runs, sd15_table, tmp_path):
    """--compile (here Dynamo with the aot_eager backend: no C++ build on a CPU) computes the same errors as the eager
    pass within 1e-6 (another kernel order rounds differently; well inside the logit bound at beta 5000); with
    --eval-pairs 0 the table has no evaluation entries."""
    import torch._dynamo

    table = table_for(runs, tmp_path / "t", compile=True, compile_backend="aot_eager", eval_pairs=0)
    torch._dynamo.reset()
    np.testing.assert_allclose(np.load(table / "train.npy"), np.load(sd15_table / "train.npy"), rtol=1e-6)
    assert np.load(table / "eval.npy").shape == (1, 0, 2)  # --eval-pairs 0: no evaluation entries


def test_one_table_serves_a_sweep_and_the_objectives_that_need_only_r(runs, sd15_table, tmp_path):
    """What does not invalidate a table: beta, the learning rate, the optimizer, the micro-batch and accumulation, and
    a switch among dpo, rpo, cal-dpo and dense-dpo with the same (uniform) timestep law."""
    from trainrun import train_config

    from rpo_fast.config import TrainConfig, model_family
    from rpo_fast.data.dataset import open_dataset
    from rpo_fast.reference import ReferenceTable, epochs_needed, table_key

    table = ReferenceTable(sd15_table)
    runs_ = [
        dict(objective="dpo", beta=100.0, lr=1e-6),
        dict(objective="rpo", beta=8000.0, micro_batch_size=4, optimizer="adamw8bit"),
        dict(objective="cal-dpo", grad_accum=2),
        dict(objective="dense-dpo", gamma=0.8),
    ]
    for kw in runs_:
        table_flags = dict(ref_placement="precomputed", reference_table=str(sd15_table), mixed_precision="no")
        cfg = train_config(runs, tmp_path / "run", **table_flags, **kw)
        assert isinstance(cfg, TrainConfig)
        family = model_family(cfg)
        ds = open_dataset(cfg.data, family=family, resolution=None)
        key = table_key(cfg, family, ds, ds, torch.device("cpu"))
        table.check(key, epochs=epochs_needed(4, cfg.micro_batch_size * cfg.grad_accum, len(ds), 1), evaluates=True)


@pytest.mark.parametrize("field", ["seed", "family", "reference", "cache", "resolution", "pairs", "twins", "device"])
def test_check_names_each_kind_of_difference(sd15_table, field):
    """Every field of the key is compared and named, those no flag of the tests' runs can change included (the twin
    flips, the device the draws were made on, ...): one error naming it."""
    from rpo_fast.reference import KEY_NAMES, ReferenceTable

    table = ReferenceTable(sd15_table)
    other = dict(table.key)
    other[field] = "something else"
    with pytest.raises(ValueError, match="other settings") as e:
        table.check(other, epochs=1, evaluates=False)
    assert KEY_NAMES[field] in str(e.value) and str(e.value).count(": table ") == 1, str(e.value)


# Each way a table can be made for other settings, as the run's or the pass's flags differ: (pass, run, the words).
MISMATCHES = {
    "seed": (dict(seed=1), {}, "--seed"),
    "caption drop": (dict(empty_caption_prob=0.5), {}, "--empty-caption-prob"),
    "timestep law": ({}, dict(objective="dense-dpo", timestep_sampling="discounted"), "the timestep law"),
    "precision": ({}, dict(mixed_precision="bf16"), "precision"),
    "kernels": (dict(fuse_qkv=True), {}, "kernels"),
    "evaluation": ({}, dict(eval_every=5, eval_pairs=8), "evaluation pairs"),
    "epochs": ({}, dict(max_steps=100), "rerun the pass with --epochs 5"),
    "weights": ({}, dict(unet="OTHER_UNET"), "the reference's weights"),
    "cache": ({}, dict(data="OTHER_CACHE"), "the cache"),
}


@pytest.mark.parametrize("kind", list(MISMATCHES))
def test_a_table_for_other_settings_is_refused_before_any_model_loads(runs, sd15_table, tmp_path, kind, monkeypatch):
    """One error naming what differs, raised before the policy loads."""
    from rpo_fast.models import ModelFamily

    pass_kw, run_kw, words = MISMATCHES[kind]
    table = table_for(runs, tmp_path / "t", **pass_kw) if pass_kw else sd15_table
    if run_kw.get("unet") == "OTHER_UNET":  # a copy of the UNet with one weight changed
        import shutil

        from safetensors.torch import load_file, save_file

        other = tmp_path / "unet"
        shutil.copytree(runs["sd15"] / "unet", other)
        (f,) = other.glob("*.safetensors")
        w = load_file(f)
        w[next(iter(w))].add_(1.0)
        save_file(w, f)
        run_kw = dict(unet=str(other))
    if run_kw.get("data") == "OTHER_CACHE":
        run_kw = dict(data=str(runs["root"] / "eval_sd15"), objective="dpo")

    def no_load(*a, **kw):
        raise AssertionError("a model was loaded before the table was checked")

    monkeypatch.setattr(ModelFamily, "load_denoiser", no_load)
    kw = dict(objective="dpo", max_steps=20) | run_kw
    with pytest.raises(ValueError, match="--reference-table") as e:
        in_process_trainer(runs, tmp_path / "run", ref_placement="precomputed", reference_table=str(table), **kw)
    assert words in str(e.value), str(e.value)


def test_lora_with_active_dropout_is_refused(runs, sd15_table, tmp_path, monkeypatch):
    """With LoRA the live reference is the policy without its adapters, run in training mode: a dropout with p > 0
    would make its errors random, not a function of the draws, so a table cannot stand in for it."""
    from rpo_fast.train import Trainer

    policy = Trainer._policy

    def with_dropout(self):
        module = policy(self)
        next(m for m in module.modules() if isinstance(m, torch.nn.Dropout)).p = 0.1
        return module

    monkeypatch.setattr(Trainer, "_policy", with_dropout)
    with pytest.raises(ValueError, match="active dropout"):
        in_process_trainer(
            runs,
            tmp_path / "run",
            lora_rank=4,
            max_steps=20,
            ref_placement="precomputed",
            reference_table=str(sd15_table),
        )


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(objective="dspo"), "reads the reference's prediction itself"),
        (dict(objective="sft"), "uses no reference"),
        (dict(reference_table=None), "go together"),
        (dict(data="RAW"), "needs a cache"),
    ],
)
def test_what_a_table_cannot_serve_is_refused(runs, sd15_table, tmp_path, kw, words):
    from trainrun import train_config

    from rpo_fast.config import validate

    if kw.get("data") == "RAW":
        kw = dict(data=str(runs["root"] / "warm" / "pairs.jsonl"), resolution=32)
    cfg = train_config(runs, tmp_path / "run", ref_placement="precomputed", reference_table=str(sd15_table))
    for k, v in kw.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=words):
        validate(cfg)


def test_at_step_0_the_table_reads_log_2_within_the_bound(runs, sd15_table, tmp_path):
    """Unchanged, the policy is the reference, but the table's r comes from another forward (the pass's batch of 5):
    the loss is log 2 and every implicit reward 0 within LOGIT_TOL (the implicit accuracy reads the sign of rounding
    noise, not 0.5)."""
    import math

    pre = in_process_trainer(
        runs, tmp_path / "pre", max_steps=20, beta=5000.0, ref_placement="precomputed", reference_table=str(sd15_table)
    )
    picks, batch = pre.loader.next()
    with torch.no_grad():
        out = pre.forward_loss(batch, pre.pair_seeds(picks), ref_errors=pre.table.train_errors(picks))
    m = {k: float(v) for k, v in out.metrics.items()}
    assert abs(m["loss"] - math.log(2)) <= LOGIT_TOL / 2 and abs(m["reward_w"]) <= LOGIT_TOL, m
    assert abs(m["reward_l"]) <= LOGIT_TOL and 0.0 <= m["implicit_acc"] <= 1.0
    pre.close()


# --------------------------------------------------------------------------------------------------
# Several ranks, LoRA, resume
# --------------------------------------------------------------------------------------------------


def _ok(res):
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res


RPO_ARGS = ["--objective", "rpo", "--mixed-precision", "no", "--beta", "500", "--optimizer", "adamw", "--lr", "1e-3"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_rpo_on_two_zero2_ranks_reads_the_table_resumes_exactly_and_equals_one_live_process(runs, tmp_path):
    """RPO (global scope) on 2 ZeRO-2 ranks x 2 pairs with the table: its losses equal one process's with the live
    reference on the same 4 pairs a step (rtol 1e-4, as the live 2-rank test: batched convolutions round differently
    for 2 and 4 rows); killed after step 2 and resumed, its losses equal the uninterrupted run's to the bit. The
    table was computed by the pass on 2 ranks (deepspeed --module) and equals the one-process pass's within 1e-6
    (each rank's convolutions run on one thread, this process's on two: another summation order)."""
    from trainrun import DEEPSPEED, ROOT, launch, train_rows

    from rpo_fast.distributed import free_port

    table = tmp_path / "table"
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "rpo_fast.reference"]
    cmd += ["--model", str(runs["sd15"]), "--data", str(runs["root"] / "cache_sd15"), "--reference-table", str(table)]
    cmd += ["--mixed-precision", "no", "--no-progress", "--batch-size", "5"]
    import os
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    _ok(subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT))
    one = table_for(runs, tmp_path / "table-one")
    for name in ("train.npy", "eval.npy"):  # the same chunks; the ranks run 1 thread each, this process 2
        np.testing.assert_allclose(np.load(table / name), np.load(one / name), rtol=1e-6, err_msg=name)

    zero2 = str(ROOT / "configs" / "zero2_8bit.json")
    args = ["--ds_config", zero2, "--model", str(runs["sd15"]), "--data", str(runs["root"] / "cache_sd15")]
    args += [*RPO_ARGS, "--micro-batch-size", "2", "--max-steps", "4", "--checkpoint-every", "2", "--log-every", "1"]
    args += ["--no-progress", "--no-export", "--ref-placement", "precomputed", "--reference-table", str(table)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    res = _ok(launch([*args, "--output", str(straight)]))
    assert "reference: precomputed" in res.stdout
    res = launch([*args, "--output", str(killed), "--debug-exit-after-step", "2"])
    assert res.returncode != 0 and (killed / "checkpoints" / "step-2" / "COMPLETE").exists()
    _ok(launch([*args, "--output", str(killed), "--resume"]))
    a, b = train_rows(straight), train_rows(killed)
    for step in (1, 2, 3, 4):
        assert a[step]["loss/loss"] == b[step]["loss/loss"], (step, a[step]["loss/loss"], b[step]["loss/loss"])

    live = in_process_trainer(
        runs, tmp_path / "live", objective="rpo", micro_batch_size=4, beta=500.0, lr=1e-3, max_steps=4
    )
    losses = step_losses(live, 2)
    assert a[1]["loss/loss"] == pytest.approx(losses[0], rel=1e-5)
    assert a[2]["loss/loss"] == pytest.approx(losses[1], rel=1e-4)
    assert abs(a[2]["loss/loss"] - a[1]["loss/loss"]) > 1e-4  # the update moved the policy: step 2 compares it


@pytest.mark.slow
@pytest.mark.multiprocess
def test_lora_dpo_on_two_zero3_ranks_reads_the_base_models_table(runs, sd15_table, tmp_path):
    """DPO with LoRA on 2 ZeRO-3 ranks x 2 pairs reading the table (the base model's errors): its losses equal one
    process's with the live reference (the policy without its adapters) on the same 4 pairs (rtol 1e-4)."""
    from trainrun import ZERO3, launch, train_rows

    args = ["--ds_config", str(ZERO3), "--model", str(runs["sd15"]), "--data", str(runs["root"] / "cache_sd15")]
    args += ["--objective", "dpo", "--mixed-precision", "no", "--optimizer", "adamw", "--lr", "1e-2"]
    args += ["--lora-rank", "4", "--micro-batch-size", "2", "--max-steps", "2", "--log-every", "1"]
    args += ["--no-progress", "--no-export", "--output", str(tmp_path / "two")]
    res = _ok(launch([*args, "--ref-placement", "precomputed", "--reference-table", str(sd15_table)]))
    assert "LoRA rank 4" in res.stdout and "reference: precomputed" in res.stdout
    two = train_rows(tmp_path / "two")
    live = in_process_trainer(runs, tmp_path / "live", micro_batch_size=4, lr=1e-2, lora_rank=4, max_steps=2)
    losses = step_losses(live, 2)
    # step 1: the live run ties exactly (log 2); the table's r comes from another forward (beta 5000: LOGIT_TOL)
    assert abs(two[1]["loss/loss"] - losses[0]) <= LOGIT_TOL
    assert two[2]["loss/loss"] == pytest.approx(losses[1], rel=1e-4)
    assert abs(two[2]["loss/loss"] - two[1]["loss/loss"]) > 1e-4
