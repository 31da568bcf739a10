"""The package's structure: which module may import which, one seeding helper, the learning-rate schedule, the
model-family interface and the objective table, and a project that stands alone."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_flags import parser_of

from rpo_fast.models import FAMILIES, family_class, load_family, model_kind
from rpo_fast.objectives import OBJECTIVE_TABLE
from rpo_fast.seeding import seed_of

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rpo_fast"


def _imports(path: Path) -> set[str]:
    """Every rpo_fast module a file imports, at any depth of the file (function-level imports included)."""
    mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    if path.name == "__init__.py":
        mod = package
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("rpo_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.startswith("rpo_fast"):
                out.add(name)
                out |= {f"{name}.{a.name}" for a in node.names}  # `from . import data` imports rpo_fast.data
    return out


def _modules() -> dict[str, set[str]]:
    files = [p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): _imports(p) for p in files}


def _reaches(imports: set[str], target: str) -> bool:
    return any(i == target or i.startswith(target + ".") for i in imports)


def test_layering():
    mods = _modules()
    for mod, imports in mods.items():
        if mod != "rpo_fast.train":
            assert not _reaches(imports, "rpo_fast.train"), f"{mod} imports the trainer"
        if not mod.startswith(("rpo_fast.testing", "rpo_fast.demo")):
            assert not _reaches(imports, "rpo_fast.testing"), f"{mod} imports the test fixtures"
        if not mod.startswith("rpo_fast.demo"):
            assert not _reaches(imports, "rpo_fast.demo"), f"{mod} imports the demo (the one upward dependency)"
        if mod.startswith(("rpo_fast.kernels", "rpo_fast.objectives", "rpo_fast.loss")):
            for lower in ("rpo_fast.data", "rpo_fast.cache", "rpo_fast.models"):
                assert not _reaches(imports, lower), f"{mod} imports {lower}"
        # the data package, bottom up: readers < preprocess < encode < writer; the reader (dataset) beside the
        # writer, never importing it; schema shared by both and importing neither
        data = {f"rpo_fast.data.{m}" for m in ("readers", "preprocess", "encode", "schema")}
        if mod in data:
            for upper in ("writer", "dataset", "loader", "style"):
                assert not _reaches(imports, f"rpo_fast.data.{upper}"), f"{mod} imports rpo_fast.data.{upper}"
        if mod in ("rpo_fast.data.readers", "rpo_fast.data.preprocess"):
            assert not _reaches(imports, "rpo_fast.data.encode"), f"{mod} imports the encoder"
            assert not _reaches(imports, "rpo_fast.models"), f"{mod} imports the model families"
        if mod in ("rpo_fast.data.dataset", "rpo_fast.data.loader"):
            assert not _reaches(imports, "rpo_fast.data.writer"), f"{mod} (the reader) imports the cache writer"
            assert not _reaches(imports, "rpo_fast.cache"), f"{mod} (the reader) imports the cache's command"
        if mod.startswith("rpo_fast.data"):
            assert not _reaches(imports, "rpo_fast.cache") and not _reaches(imports, "rpo_fast.style_data"), mod
        # the CLI layer is generic: no CLI but the trainer imports the trainer's configuration (and what it imports);
        # the reference pass declares its flags from the trainer's, as a table must mean what the run's flags mean
        if mod not in ("rpo_fast.train", "rpo_fast.reference"):
            assert "rpo_fast.config" not in imports, f"{mod} imports the trainer's configuration"
        if mod == "rpo_fast.cli":
            assert all(_reaches({"rpo_fast.logs"}, i) or i.startswith("rpo_fast.logs") for i in imports), imports


def test_no_module_reaches_into_another_modules_private_names():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("rpo_fast")):
                aliases |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname or a.name for a in node.names if a.name.startswith("rpo_fast")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                private = node.attr.startswith("_") and not node.attr.startswith("__")
                assert not private, f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}"


def test_collectives_live_in_one_module():
    """World size, ranks and collectives are written once (rpo_fast.distributed)."""
    for path in PACKAGE.rglob("*.py"):
        if path.name == "distributed.py":
            continue
        text = path.read_text()
        assert "import torch.distributed" not in text, f"{path.relative_to(ROOT)} talks to torch.distributed"


def test_seed_of_is_one_documented_mix():
    assert seed_of(0, 1, 2, 3) == seed_of(0, 1, 2, 3)  # deterministic
    # pinned: a change of the mix changes every run's noise, data order and crops; it must be deliberate
    assert seed_of(0, 0) == 1945321144695561289 and seed_of(0, 1, 2, 3) == 8941597753993413033
    distinct = [(0,), (0, 0), (0, 0, 0, 0), (1, 0), (0, 1), (2**32,), (1 << 40, 0), (-1,)]
    assert len({seed_of(*p) for p in distinct}) == len(distinct)  # lengths and word splits do not collide
    assert all(0 <= seed_of(*p) < 2**63 for p in distinct)
    torch.Generator().manual_seed(seed_of(2**64 - 1, 5))  # fits the generators
    with pytest.raises(ValueError, match="at least one"):
        seed_of()


def test_seeding_idioms_go_through_seed_of():
    """No other way of mixing seeds in the package: every generator of a run is seeded with seed_of."""
    for path in PACKAGE.rglob("*.py"):
        if path.name == "seeding.py" or "testing" in path.parts or "demo" in path.parts:
            continue  # fixtures and the demo's renderer seed their own toy generators
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "manual_seed",
                "default_rng",
            ):
                arg = node.args[0] if node.args else None
                ok = isinstance(arg, ast.Call) and getattr(arg.func, "id", "") == "seed_of"
                ok = ok or (isinstance(arg, ast.Name) and arg.id in ("s", "seed"))  # a seed_of value or the user's
                assert ok, f"{path.relative_to(ROOT)}:{node.lineno} seeds a generator without seed_of"


def test_lr_schedule_is_diffusers_constant_with_warmup():
    from diffusers.optimization import get_constant_schedule_with_warmup

    from rpo_fast.engine import lr_schedule

    def rates(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched, out = make(opt), []
        for _ in range(6):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    ours = rates(lambda o: lr_schedule(o, 4))
    assert ours == rates(lambda o: get_constant_schedule_with_warmup(o, num_warmup_steps=4))
    assert ours[0] == 0 and ours[2] == pytest.approx(0.05) and ours[4:] == [0.1, 0.1]  # starts at 0, not lr / 4
    assert rates(lambda o: lr_schedule(o, 0)) == [0.1] * 6


def test_model_families_are_detected_and_give_their_conditioning(tiny_sd15, tiny_sdxl):
    assert set(FAMILIES) >= {"sd15", "sdxl"}
    assert model_kind(tiny_sd15) == "sd15" and model_kind(tiny_sdxl) == "sdxl"
    assert family_class(tiny_sdxl).dspo_form == "sdxl"
    b = 3
    for path in (tiny_sd15, tiny_sdxl):
        fam = load_family(path)
        enc = fam.load_text_encoders()
        texts = fam.encode_texts(enc, ["a", "b", "c"])
        assert all(k.endswith("prompt_embeds") for k in texts)
        batch = dict(texts)
        for k, v in fam.image_conditioning([_Crop()] * 2, 32).items():
            batch[k] = v.expand(b, *v.shape)
        empty = {k: v[0] * 0 for k, v in texts.items()}
        drop = torch.tensor([True, False, False])
        cond = fam.conditioning(batch, drop, empty)
        ehs = cond["encoder_hidden_states"]
        assert ehs.shape[0] == 2 * b and torch.equal(ehs[0], empty["prompt_embeds"]) and torch.equal(ehs[3], ehs[0])
        assert torch.equal(ehs[1], texts["prompt_embeds"][1])
        winners = fam.conditioning(batch, drop, empty, pairs=False)
        assert winners["encoder_hidden_states"].shape[0] == b
        x0, noise, t = torch.randn(2 * b, 4, 8, 8), torch.randn(b, 4, 8, 8), torch.tensor([0, 500, 999])
        noisy, target = fam.noisy_and_target(x0, noise, t)
        assert noisy.shape == x0.shape and torch.equal(target, noise)  # epsilon: shared by winner and loser
        unet = fam.load_denoiser()
        x, tt, c = fam.dummy_inputs(2)
        assert fam.predict(unet, x, tt, c).shape == x.shape


class _Crop:
    def time_ids(self, resolution):
        return [resolution, resolution, 0, 0, resolution, resolution]


def test_a_folder_of_no_known_family_is_a_clear_error(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "SomethingElse"}')
    with pytest.raises(ValueError, match="not a model family rpo_fast knows"):
        model_kind(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        model_kind(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a diffusers model folder"):
        model_kind(tmp_path / "nothing")


def test_objective_table_declares_what_each_objective_needs():
    t = OBJECTIVE_TABLE
    assert not t["sft"].reference and all(o.reference for k, o in t.items() if k != "sft")
    assert [k for k, o in t.items() if o.embeddings] == ["rpo", "online-rpo"]
    assert [k for k, o in t.items() if o.online] == ["dense-reward", "online-dpo", "online-rpo"]
    assert all(o.layout.name == "groups" and not o.fused for o in t.values() if o.online)
    assert [k for k, o in t.items() if o.timesteps] == ["dense-dpo"]
    assert [k for k, o in t.items() if o.weights] == ["dpo", "dense-dpo", "cal-dpo"]
    assert [k for k, o in t.items() if o.score_terms] == ["dspo"]
    for name, spec in t.items():  # every default passes its own check
        assert spec.resolve({}) or name == "sft"


def test_the_project_stands_alone():
    for rel in ("README.md", "docs/objectives.md", "scripts/device-wheels.sh", "benchmarks/gpu_session.sh"):
        assert (ROOT / rel).exists()
    for path in [
        ROOT / "README.md",
        *PACKAGE.rglob("*.py"),
        *(ROOT / "scripts").iterdir(),
        *(ROOT / "benchmarks").iterdir(),
    ]:
        if path.is_file() and path.suffix in (".md", ".py", ".sh"):
            text = path.read_text()
            assert "../shared" not in text and "shared/reference" not in text, f"{path} points outside the project"
    out = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "device-wheels.sh")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_slim_wheel_drops_members_and_their_record_lines_and_pip_installs_the_rest(tmp_path):
    """scripts/slim_wheel.py (device-wheels.sh's cut of bitsandbytes' other CUDA builds) on a small real wheel."""
    import zipfile

    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    files = {
        "demo_pkg/__init__.py": b"VALUE = 7\n",
        "demo_pkg/lib_cuda118.so": b"x" * 1000,
        "demo_pkg/lib_cuda130.so": b"y" * 10,
        "demo_pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
        "demo_pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "demo_pkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("demo_pkg-1.0.dist-info/RECORD", record)
    script = ROOT / "scripts" / "slim_wheel.py"
    out = subprocess.run([sys.executable, script, wheel, "*_cuda11*.so"], capture_output=True, text=True)
    assert out.returncode == 0 and "dropped 1 files" in out.stdout, out.stderr
    with zipfile.ZipFile(wheel) as z:
        assert "demo_pkg/lib_cuda118.so" not in z.namelist() and "demo_pkg/lib_cuda130.so" in z.namelist()
        assert "lib_cuda118" not in z.read("demo_pkg-1.0.dist-info/RECORD").decode()
        assert z.read("demo_pkg/lib_cuda130.so") == b"y" * 10
    target = tmp_path / "site"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--target",
        target,
        wheel,
    ]
    assert subprocess.run(pip, capture_output=True, text=True).returncode == 0
    assert sorted(p.name for p in (target / "demo_pkg").iterdir()) == ["__init__.py", "lib_cuda130.so"]
    out = subprocess.run([sys.executable, script, wheel, "*_rocm*.so"], capture_output=True, text=True)
    assert out.returncode != 0 and "no member matches" in out.stderr  # a pattern that matches nothing is an error


def test_train_help_shows_defaults_and_choices():
    out = subprocess.run(
        [sys.executable, str(PACKAGE / "train.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    text = " ".join(out.stdout.split())
    assert out.returncode == 0
    objectives = "dpo,sft,rpo,dspo,dense-dpo,cal-dpo,dense-reward,online-dpo,online-rpo"
    assert f"--objective {{{objectives}}}" in text and "(default: rpo)" in text
    assert "--optimizer {adamw8bit,lion8bit,adamw,adafactor}" in text and "(default: adamw8bit)" in text
    assert "example" in text and "--debug" not in text


def test_every_flag_of_every_cli_has_help_and_shows_its_default():
    import argparse
    import importlib

    from rpo_fast.cache import CacheConfig
    from rpo_fast.cli import HelpFormatter, parser_for
    from rpo_fast.config import TrainConfig
    from rpo_fast.demo.__main__ import DemoConfig
    from rpo_fast.demo.pretrain import PretrainConfig
    from rpo_fast.evaluate import EvaluateConfig
    from rpo_fast.style_data import StyleDataConfig

    parsers = [(cls.__name__, parser_for(cls)) for cls in (TrainConfig, CacheConfig)]
    for name, cls in (
        ("rpo_fast.evaluate", EvaluateConfig),
        ("rpo_fast.style_data", StyleDataConfig),
        ("rpo_fast.demo.__main__", DemoConfig),
        ("rpo_fast.demo.pretrain", PretrainConfig),
    ):
        parsers.append((name, parser_of(name)))
        assert "example" in (parsers[-1][1].epilog or ""), f"{name}: no example in its --help"
        assert {a.dest for a in parsers[-1][1]._actions} - {"help"} == {f.name for f in dataclasses.fields(cls)}
    assert "example" in importlib.import_module("rpo_fast.cache").EXAMPLE
    for name, ap in parsers:
        assert ap.formatter_class is HelpFormatter, name
        for action in ap._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name}: {action.option_strings} has no help"
        text = ap.format_help()
        switches = (argparse._StoreTrueAction, argparse._StoreFalseAction)  # --fresh, --no-progress: no default
        shown = [
            a
            for a in ap._actions
            if a.option_strings
            and a.help != argparse.SUPPRESS
            and a.default not in (None, False, argparse.SUPPRESS)
            and not isinstance(a, switches)
        ]
        flat = " ".join(text.split())
        for action in shown:  # once: the help's own words where they say it, else "(default: ...)"
            if "default" in action.help.lower():
                assert flat.count(" ".join(action.help.split())) == 1, (name, action.option_strings)
                continue
            if isinstance(action, argparse.BooleanOptionalAction):
                on, off = action.option_strings[:2]
                assert f"(default: {on if action.default else off})" in flat, (name, action.option_strings)
                continue
            assert f"(default: {action.default})" in flat, (name, action.option_strings)
