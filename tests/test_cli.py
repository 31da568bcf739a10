"""The CLIs as a user meets them. Every error path a user can cause ends in one line naming the file, flag or value,
exit code 2, and no traceback (``RPO_FAST_DEBUG=1`` brings the traceback back); the CLIs are called in process:
what reaches the terminal is what ``main`` lets out. The dependencies' known log noise is dropped, and only it."""

import importlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

from rpo_fast import testing


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = testing.save_tiny_pipeline(tmp / "sd15")
    bad = tmp / "badjson"
    shutil.copytree(model, bad)
    (bad / "unet" / "config.json").write_text("{not json")
    data = testing.write_pairs_jsonl(tmp / "pairs", 4)
    return dict(tmp=tmp, model=model, bad=bad, data=data)


def _cases(f):
    tmp, model, bad, data = (str(f[k]) for k in ("tmp", "model", "bad", "data"))
    train = ["--ds_config", "configs/single_gpu.json", "--output", f"{tmp}/run", "--resolution", "32"]
    cache = ["--out", f"{tmp}/cache", "--resolution", "32"]
    evaluate = ["--unet", f"{model}/unet", "--out", f"{tmp}/eval"]
    return [
        ("rpo_fast.train", [*train, "--model", f"{tmp}/nope", "--data", data], f"{tmp}/nope"),
        ("rpo_fast.train", [*train, "--model", bad, "--data", data], "unet/config.json is not valid JSON"),
        ("rpo_fast.train", [*train, "--model", model, "--data", data, "--ref-placement", "moon"], "'moon'"),
        ("rpo_fast.train", [*train, "--model", model, "--data", data, "--loss-backend", "cuda"], "'cuda'"),
        ("rpo_fast.train", [*train, "--model", model, "--data", f"{tmp}/nodata"], f"--data {tmp}/nodata"),
        (
            "rpo_fast.train",
            [
                "--ds_config",
                f"{tmp}/none.json",
                "--model",
                model,
                "--data",
                data,
                "--output",
                tmp,
                "--resolution",
                "32",
            ],
            f"{tmp}/none.json",
        ),
        ("rpo_fast.train", [*train, "--model", model, "--data", data, "--objective", "rpo"], "--clip"),
        ("rpo_fast.cache", [*cache, "--model", f"{tmp}/nope", "--data", data], f"{tmp}/nope"),
        ("rpo_fast.cache", [*cache, "--model", model, "--data", f"{tmp}/nodata"], f"{tmp}/nodata"),
        ("rpo_fast.cache", [*cache, "--model", bad, "--data", data], "unet/config.json is not valid JSON"),
        ("rpo_fast.cache", [*cache, "--model", model, "--data", data, "--storage", "fp8"], "'fp8'"),
        ("rpo_fast.evaluate", [*evaluate, "--model", model, "--prompts", f"{tmp}/p.txt"], f"--prompts {tmp}/p.txt"),
        ("rpo_fast.evaluate", [*evaluate, "--model", f"{tmp}/nope", "--prompts", data], "nope"),
        (
            "rpo_fast.evaluate",
            [*evaluate, "--model", model, "--prompts", data, "--scorer", "nonsense"],
            "'nonsense'",
        ),
        (
            "rpo_fast.style_data",
            ["--src", f"{tmp}/nosrc", "--style", "sketch", "--editor", model, "--out", tmp],
            f"{tmp}/nosrc",
        ),
        ("rpo_fast.style_data", ["--src", data, "--style", "cubism", "--editor", model, "--out", tmp], "'cubism'"),
        ("rpo_fast.demo.__main__", ["--model", f"{tmp}/nope", "--out", f"{tmp}/demo"], f"{tmp}/nope"),
        ("rpo_fast.demo.__main__", ["--objective", "ppo", "--out", f"{tmp}/demo"], "'ppo'"),
    ]


def test_every_cli_error_is_one_line_with_exit_code_2(files, capsys, monkeypatch):
    monkeypatch.delenv("RPO_FAST_DEBUG", raising=False)
    for module, argv, named in _cases(files):
        main = importlib.import_module(module).main
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip()
        where = f"{module} {' '.join(argv)}"
        assert exc.value.code == 2, f"{where}: exit code {exc.value.code}\n{err}"
        last = err.splitlines()[-1]
        assert "error:" in last and named in last, f"{where}: the message does not name {named!r}: {last}"
        assert "Traceback" not in err, f"{where}: a traceback\n{err}"


def test_rpo_fast_debug_gives_the_traceback(files, monkeypatch):
    from rpo_fast import cache

    monkeypatch.setenv("RPO_FAST_DEBUG", "1")
    argv = ["--model", str(files["tmp"] / "nope"), "--data", str(files["data"]), "--out", str(files["tmp"] / "c")]
    with pytest.raises(FileNotFoundError, match="nope"):
        cache.main([*argv, "--resolution", "32"])


def test_triton_on_cpu_tensors_names_the_way_out():
    """In a fresh process: the test session runs Triton's interpreter (conftest), which has no such error."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine backend='triton' has a driver")
    code = (
        "import torch\nfrom rpo_fast import PreferenceLoss\n"
        "p = torch.randn(2, 4, 8, 8); t = torch.randn(1, 4, 8, 8)\n"
        "try:\n    PreferenceLoss('dpo', backend='triton')(p, t, p + 0.1)\n"
        "except ValueError as e:\n    print('ValueError:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "ValueError: backend='triton' found no GPU driver" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "backend='native'" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


def test_known_log_noise_is_dropped_and_nothing_else(monkeypatch, capsys):
    import logging

    from rpo_fast import logs

    monkeypatch.delenv("RPO_FAST_VERBOSE", raising=False)
    monkeypatch.setattr(logs, "_done", False)
    if not torch.cuda.is_available():
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    logs.quiet_known_noise()
    if not torch.cuda.is_available():
        assert os.environ["DS_ACCELERATOR"] == "cpu"  # DeepSpeed then does not say "Setting accelerator to CPU"
    noise = {
        "DeepSpeed": "**** You are using ZeRO with an untested optimizer, proceed with caution *****",
        "transformers.utils.import_utils": "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
        "`CLIPImageProcessorPil` for backward compatibility.",
        "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
        "'kernels'.",
    }
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    for name, message in noise.items():
        logger = logging.getLogger(name)
        handler = Keep()
        logger.addHandler(handler)
        try:
            logger.warning(message)
            logger.warning("a warning a user can act on")
        finally:
            logger.removeHandler(handler)
    assert records == ["a warning a user can act on"] * len(noise), records
    for name in noise:  # the filters stay out of the way of other sessions' tests
        for f in [f for f in logging.getLogger(name).filters if isinstance(f, logs._DropKnown)]:
            logging.getLogger(name).removeFilter(f)


def test_every_cli_keeps_its_flags():
    """Every CLI's flags, spellings, defaults, choices and types are those of ``tests/cli_flags.json`` (written by
    ``python tests/cli_flags.py``, only for a deliberate change of a CLI)."""
    import json

    from cli_flags import GOLDEN, cli_flags

    now, golden = json.loads(json.dumps(cli_flags())), json.loads(GOLDEN.read_text())
    assert set(now) == set(golden)
    for cli in golden:
        assert now[cli] == golden[cli], cli


def test_an_argparse_error_is_one_line_without_the_usage(capsys):
    """argparse printed the usage (50 lines for the trainer) before the line that matters; now it is that line."""
    from cli_flags import CLIS

    for module in CLIS:
        main = importlib.import_module(module).main
        for argv, named in ((["--seed", "x"], "'x'"), (["--seed"], "expected one argument")):
            with pytest.raises(SystemExit) as exc:
                main(argv)
            err = capsys.readouterr().err.strip().splitlines()
            assert exc.value.code == 2, module
            assert len(err) == 1 and "error:" in err[0] and named in err[0], (module, err)
            assert "usage:" not in err[0] and "--help" in err[0], (module, err)
