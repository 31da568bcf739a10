"""The embedded demo end to end (what `make demo` runs): RPO through the deepspeed launcher on 2 CPU ranks, then
200 held-out prompts sampled from base and tuned with the same seeds and scored by the hidden rule."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from browser import noise_in
from PIL import Image

from rpo_fast.demo import shapes as S

ASSETS = Path(__file__).resolve().parents[1] / "rpo_fast" / "demo" / "assets"


def test_shipped_assets_are_small_and_complete():
    base = sum(p.stat().st_size for p in (ASSETS / "base").rglob("*.safetensors"))
    assert 0 < base <= 4 * 2**20  # at most 4 MB of safetensors
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (ASSETS / "base" / sub).is_dir(), sub
    assert (ASSETS / "clip" / "config.json").exists() and (ASSETS / "pretrain.json").exists()


def test_grammar_and_rule():
    assert len(S.CAPTIONS) == 300 and len(S.HELDOUT_CAPTIONS) == 200
    assert not set(S.TRAIN_CAPTIONS) & set(S.HELDOUT_CAPTIONS)
    import numpy as np

    rng = np.random.default_rng(0)
    for caption in S.CAPTIONS[::37]:  # the scorer recovers the colour's warmth from a rendered picture
        hue = rng.uniform()
        assert abs(S.warmth(S.render(caption, hue, rng)) - S.hue_warmth(hue)) < 0.45
    noise = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert S.warmth(noise) == -1.0  # not a picture of an object on a plain background: never a winner
    assert S.warmth(Image.new("RGB", (32, 32), (90, 90, 90))) == -1.0  # no object


@pytest.mark.parametrize("objective", ["dpo", "sft"])
def test_training_plot_for_pair_objectives_and_sft(tmp_path, objective):
    """SFT logs no implicit accuracy (it has no reference): its right panel is the held-out loss."""
    from rpo_fast.evaluate import training_curves as plot_training

    rows = [{"step": 0, "eval/loss": 0.5, "eval/implicit_acc": 0.5}]
    for step in range(10, 50, 10):
        row = {"step": step, "loss/loss": 1.0 / step}
        if objective != "sft":
            row["reward/implicit_acc"] = 0.5 + step / 100
        rows.append(row)
    if objective == "sft":
        rows = [{k: v for k, v in r.items() if "implicit" not in k} for r in rows]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = plot_training(tmp_path / "metrics.jsonl", tmp_path / "training.png")
    assert Image.open(path).size == (990, 352)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_demo_aligns_the_model_with_the_hidden_preference(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    res = subprocess.run(
        [sys.executable, "-m", "rpo_fast.demo", "--objective", "rpo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "rpo" / "demo.json").read_text())
    assert result["prompts"] == 200
    assert result["win_low"] > 0.5, result  # the lower end of the Wilson 95% interval of tuned over base
    assert result["tuned_warmth"] > result["base_warmth"]
    for key in ("grid", "plot"):
        assert Image.open(result[key]).size[0] > 200
    assert "win rate of tuned over base" in res.stdout and "grid" in res.stdout
    # every phase announced as it starts and timed; every figure of the demo table printed
    for start in ("rendering 800 training", "caching them", "training: 240 steps", "sampling the 200 held-out"):
        assert f"[demo] {start}" in res.stdout, start
    assert set(result["phase_seconds"]) - {"build"} == {"render", "cache", "train", "evaluate"}  # build: once a machine
    for figure in (
        "mean warmth base -> tuned",
        "warm pictures (warmth > 0.3)",
        "held-out implicit accuracy: 0.",
        "minutes",
    ):
        assert figure in res.stdout, figure
    assert result["warm_tuned"] > result["warm_base"] and 0.5 < result["heldout_implicit_acc"] <= 1
    log = res.stdout + res.stderr  # the dependencies' known noise is dropped (rpo_fast/logs.py)
    assert not noise_in(log), noise_in(log)
    assert "Setting CUDA_VISIBLE_DEVICES" not in log  # the launcher's INFO lines (--log_level)
    # a rerun says it reuses the finished run, and how to start over; it samples and scores it again (resumed)
    again = subprocess.run(
        [sys.executable, "-m", "rpo_fast.demo", "--objective", "rpo", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "holds a finished run (240 steps)" in again.stdout and "--fresh" in again.stdout
    assert "[demo] training:" not in again.stdout and "this rerun, which trained nothing" in again.stdout
    rerun = json.loads((tmp_path / "rpo" / "demo.json").read_text())
    assert rerun["win_rate"] == result["win_rate"]
    assert rerun["minutes"] == result["minutes"] and rerun["phase_seconds"] == result["phase_seconds"]  # the run's
    assert rerun["rerun_minutes"] < result["minutes"]
