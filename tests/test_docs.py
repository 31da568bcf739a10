"""What a user reads is held to the code: the README's commands run (the tiny model's) or parse and validate (the
real model's recipe), the documentation site builds strict with every page and every generated part, its pages do
not overflow a phone's width, and every command's --help is clean (no raw markup, no default said twice, no log
noise of the dependencies)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from browser import CHROMIUM, layout, noise_in

from rpo_fast.config import TrainConfig, parse_args, validate
from rpo_fast.objectives import OBJECTIVES
from rpo_fast.scorers import SCORERS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
CLIS = {  # module -> its reference page
    "rpo_fast.cache": "cli/cache.md",
    "rpo_fast.reference": "cli/reference.md",
    "rpo_fast.evaluate": "cli/evaluate.md",
    "rpo_fast.style_data": "cli/style_data.md",
    "rpo_fast.demo": "cli/demo.md",
    "rpo_fast.demo.pretrain": "cli/pretrain.md",
}
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", NO_MKDOCS_2_WARNING="1")


def bash_block(text: str, heading: str) -> list[list[str]]:
    """The commands of the first bash block after ``heading`` (continuation lines joined, comments dropped)."""
    section = text[text.index(heading) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)[1]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip() and not line.startswith("#")]


def test_readme_is_short_and_points_at_pages_that_exist():
    assert len(README.splitlines()) <= 200
    for rel in set(re.findall(r"`(docs/[\w/.-]+\.(?:md|png))`|\((docs/[\w/.-]+\.png)\)", README)):
        path = next(p for p in rel if p)
        assert (ROOT / path).exists(), path
    for name in OBJECTIVES:
        assert f"`{name}`" in README, name
    assert "README_ROWS" not in README and "../shared" not in README


def test_objectives_and_scorers_are_documented():
    objectives, evaluation = (DOCS / "objectives.md").read_text(), (DOCS / "guides" / "evaluation.md").read_text()
    for name in OBJECTIVES:
        assert f"| `{name}` |" in objectives, name
    for name in SCORERS:
        assert f"`{name}" in evaluation, name


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == set(re.findall(r": ([\w/.-]+\.md)$", nav, re.M)), pages
    for module, page in CLIS.items():  # each command's page is generated from its config
        assert "<!-- flags: " in (DOCS / page).read_text(), (module, page)
    assert "<!-- flags: rpo_fast.config:TrainConfig -->" in (DOCS / "cli" / "train.md").read_text()


@pytest.mark.slow
def test_the_site_builds_strict_and_fits_a_phone(tmp_path):
    """mkdocs build --strict (a broken link, anchor or API reference fails it); the generated flag tables, key table
    and API reference are in the pages; no page overflows 1200 or 390 px (headless Chromium, where installed)."""
    site = tmp_path / "site"
    res = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    train = (site / "cli" / "train" / "index.html").read_text()
    for text in ("--resume-or-start", "--ds_config", "rollout/reward_mean", "--lora-rank"):
        assert text in train, text
    assert "--ds-config" in (ROOT / "tests" / "cli_flags.json").read_text()
    loss = (site / "loss" / "index.html").read_text()
    for name in ("PreferenceLoss", "preference_loss", "per_sample_errors", "sample_errors", "ModelFamily"):
        assert f'id="rpo_fast.{name}' in loss or f"{name}</code>" in loss, name
    assert "<!-- flags:" not in train and "<!-- doc:" not in (site / "cli" / "cache" / "index.html").read_text()
    if CHROMIUM is None:
        pytest.skip("the layout check needs Debian's chromium (.ci/run installs it); the build passed")
    pages = sorted(p for p in site.rglob("index.html") if "assets" not in p.parts)
    assert len(pages) >= 25
    for width in (1200, 390):
        for page, got in zip(pages, layout(pages, width, tmp_path)):
            assert got["client"] == width and got["scroll"] <= width, (width, page.relative_to(site), got)


def test_help_is_clean():
    """Every command's --help: no reStructuredText ``code``, no option that states its default twice, no noise."""
    commands = [[sys.executable, str(ROOT / "rpo_fast" / "train.py")]] + [[sys.executable, "-m", m] for m in CLIS]
    runs = [
        subprocess.Popen([*c, "--help"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for c in commands
    ]
    for command, proc in zip(commands, runs):
        out, err = (s.decode() for s in proc.communicate(timeout=300))
        assert proc.returncode == 0, (command, err[-2000:])
        assert "``" not in out, command
        assert not noise_in(out + err), (command, noise_in(out + err))
        options = re.split(r"\n  (?=-)", out.split("options:", 1)[1])
        for option in options:
            assert option.count("default") <= 1 or "(default" not in option, (command, option)


def test_readme_tiny_model_commands_run_as_written(tmp_path):
    """The README's commands on the demo's model, verbatim but for the folders (runs/ in a temporary folder): the
    cache, 20 steps of RPO and an evaluation of 8 prompts, each clean of the dependencies' noise."""
    from rpo_fast.demo import shapes as S
    from rpo_fast.demo.__main__ import render_pairs

    runs = tmp_path / "runs"
    render_pairs(runs / "demo", rounds=1)  # what make demo renders (100 of its 800 pairs)
    (runs / "demo" / "heldout_prompts.txt").write_text("\n".join(S.HELDOUT_CAPTIONS) + "\n")
    commands = bash_block(README, "## Try the trainer on the demo's model")
    assert [c[:3] for c in commands] == [
        [".venv/bin/python", "-m", "rpo_fast.cache"],
        [".venv/bin/python", "rpo_fast/train.py", "--ds_config"],
        [".venv/bin/python", "-m", "rpo_fast.evaluate"],
    ]
    for command in commands:
        command = [sys.executable] + [
            a.replace("runs/", f"{runs}/", 1) if a.startswith("runs/") else a for a in command[1:]
        ]
        res = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, (command, res.stdout[-3000:], res.stderr[-3000:])
        assert not noise_in(res.stdout + res.stderr), (command[1:3], noise_in(res.stdout + res.stderr))
    assert (runs / "tiny" / "rpo" / "unet" / "config.json").exists()
    assert "warmth: base" in res.stdout and (runs / "tiny" / "eval" / "report.html").exists()


def test_readme_real_model_recipe_parses_and_validates(tmp_path, tiny_sdxl, monkeypatch):
    """The README's SDXL recipe on a tree where its folders exist (the tiny SDXL in place of the real one): each
    command parses with its command's parser, and the trainer's passes every check that runs before a model loads."""
    from rpo_fast.cache import CacheConfig
    from rpo_fast.cli import parse_config
    from rpo_fast.evaluate.command import EvaluateConfig

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "stable-diffusion-xl-base-1.0").symlink_to(tiny_sdxl)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "cache" / "pickapic-sdxl").mkdir(parents=True)
    (tmp_path / "cache" / "pickapic-sdxl" / "index.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    cache, train, evaluate = bash_block(README, "## A real model: cache, train, evaluate")
    assert cache[:3] == ["python", "-m", "rpo_fast.cache"] and evaluate[:3] == ["python", "-m", "rpo_fast.evaluate"]
    assert train[:4] == ["deepspeed", "--num_gpus", "8", "rpo_fast/train.py"]
    assert parse_config(CacheConfig, cache[3:]).resolution == 1024
    assert parse_config(EvaluateConfig, evaluate[3:]).scorers == [
        "pickscore=models/PickScore_v1",
        "hps=models/HPS_v2.1_compressed.pt:models/CLIP-ViT-H-14",
    ]
    cfg = parse_args(train[4:])
    assert isinstance(cfg, TrainConfig) and cfg.objective == "rpo"
    ds = validate(cfg, world=8)
    assert ds["zero_optimization"]["stage"] == 2


def test_resume_with_nothing_to_resume_and_raw_data_without_resolution_are_refused(tmp_path, tiny_sd15):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"caption": "a", "winner": "a.png", "loser": "b.png"}\n')
    args = ["--ds-config", str(ROOT / "configs" / "single_gpu.json"), "--model", str(tiny_sd15), "--data", str(pairs)]
    args += ["--output", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=r"raw --data .* needs --resolution"):
        validate(parse_args(args))
    with pytest.raises(ValueError, match="--resume: no complete checkpoint .* --resume-or-start"):
        validate(parse_args([*args, "--resolution", "32", "--resume"]))
    validate(parse_args([*args, "--resolution", "32", "--resume-or-start"]))  # starts a new run
    validate(parse_args([*args, "--resolution", "32", "--resume", "--resume-or-start"]))
    validate(parse_args([*args, "--resolution", "32"]))
    (tmp_path / "run" / "checkpoints" / "step-2").mkdir(parents=True)  # a complete checkpoint: it is resumed
    (tmp_path / "run" / "checkpoints" / "step-2" / "COMPLETE").write_text("")
    with pytest.raises(ValueError, match="already holds checkpoints: pass --resume"):
        validate(parse_args([*args, "--resolution", "32"]))
    for flag in ("--resume", "--resume-or-start"):
        validate(parse_args([*args, "--resolution", "32", flag]))
