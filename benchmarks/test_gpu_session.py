"""The GPU slot's two calls (benchmarks/gpu_session.sh call1 call2) run end to end in their dry mode: every stage
at tiny shapes on this CPU, each step's exit code recorded, the results tarball written."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["loss-check", "matmul", "models", "sdxl-1-fast", "sdxl-1-baseline", "native-check", "native-gpu", "models"]
STEPS += ["sdxl-4-none"]
STEPS += ["sdxl-4-regional", "sdxl-4-resnets", "sdxl-4-fp8", "sdxl-1-graphs", "sdxl-4-selective", "sdxl-4-full"]
STEPS += ["sdxl-1-zero3", "sd15-1", "micro-sdxl-16-64"]


def _dry_env(tmp_path: Path) -> dict:
    """The session's environment in its dry mode: tiny shapes on this CPU, its files under tmp_path."""
    return dict(
        os.environ,
        RPO_FAST_GPU_DRY="1",
        PYTHON=sys.executable,
        OUT=str(tmp_path / "out"),
        RPO_FAST_GPU_ROOT=str(tmp_path / "session"),
        OMP_NUM_THREADS="1",
    )


@pytest.mark.bench
def test_gpu_session_runs_both_calls_in_dry_mode(tmp_path):
    env = _dry_env(tmp_path)
    res = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh", "call1", "call2"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    log = (tmp_path / "out" / "session.log").read_text()
    assert res.returncode == 0, log[-4000:]
    lines = (tmp_path / "session" / "work" / "steps.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == STEPS, lines
    assert all(line.split()[1] == "rc=0" for line in lines), lines
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        assert any(n.endswith("steps.txt") for n in tar.getnames())
    assert "GPU busy" in log  # the profiled step's summary


@pytest.mark.bench
def test_the_flow_stage_runs_in_dry_mode(tmp_path):
    """The flow stage (SD3.5-Medium's step, FLUX.1-dev's with LoRA) at tiny shapes: both steps exit 0."""
    env = _dry_env(tmp_path)
    res = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh", "flow"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    log = (tmp_path / "out" / "session.log").read_text()
    assert res.returncode == 0, log[-4000:]
    lines = (tmp_path / "session" / "work" / "steps.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == ["sd35m-1", "flux-1-lora"], lines
    assert all(line.split()[1] == "rc=0" for line in lines), lines


@pytest.mark.bench
def test_a_step_stopped_by_its_time_limit_keeps_a_row_saying_where(tmp_path, monkeypatch):
    """gpu_session.sh stops a step at its limit with SIGINT (KeyboardInterrupt): the step's row says in which phase
    (here the warm-up, where compiling happens) and keeps the seconds of the phases before it."""
    import gpu_check

    from rpo_fast.train import Trainer

    monkeypatch.setenv("RPO_FAST_BENCH_MODELS", str(tmp_path))
    warmups = []

    def interrupted(self):
        warmups.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    try:
        table = gpu_check.step(gpu_check.parse_args(["step", "--dry", "--pairs", "1", "--recompute", "none"]))
    except KeyboardInterrupt:
        pytest.fail("the step let the interrupt through: no row")
    (row,) = table.rows
    assert warmups == [1]
    assert row["error"].startswith("stopped by its time limit in the warmup phase after"), row
    assert row["build_s"] > 0 and "step_ms" not in row and row["side"] == "rpo_fast"


@pytest.mark.bench
def test_a_result_table_keeps_the_columns_of_its_earlier_rows(tmp_path, monkeypatch):
    """A row with other columns (a baseline's, a stopped step's) is written after a full one: the Markdown table
    still shows the full row's columns."""
    from bench_utils import ResultTable

    monkeypatch.setattr(ResultTable, "_path", lambda self, suffix: tmp_path / f"t{suffix}")
    ResultTable("t", "T", ["kind", "step_ms", "peak_gb"], key=("kind",)).add(kind="a", step_ms=12.5, peak_gb=3.0)
    ResultTable("t", "T", ["kind", "error"], key=("kind",)).add(kind="b", error="stopped")
    md = (tmp_path / "t.md").read_text()
    assert "| kind | error | step_ms | peak_gb | run |" in md, md
    assert "| a | n/a | 12.5 | 3 |" in md and "| b | stopped | n/a | n/a |" in md, md
