"""The GPU plan (benchmarks/gpu_session.sh): each call's step limits fit its budget, and every call runs end to end in
its dry mode: every stage at tiny shapes on this CPU, each step's exit code recorded, the results tarball written."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CALLS = ("call1", "call2", "call3", "call4", "call5")
STEPS = ["loss-check", "matmul", "models", "sdxl-1-fast", "sdxl-1-baseline", "call1-checks"]
STEPS += ["models", "native-check", "sdxl-1-graphs", "call2-checks", "native-gpu"]
STEPS += [
    "models",
    "sdxl-4-selective",
    "sdxl-4-fp8",
    "sdxl-4-none",
    "sdxl-4-regional",
    "sdxl-4-resnets",
    "sdxl-1-zero3",
    "call3-checks",
]
STEPS += ["models", "sdxl-4-full", "sd15-1", "call4-checks", "micro-sdxl-16-64"]
STEPS += ["models", "sdxl-1-live", "sdxl-1-precomputed", "call5-checks"]
BATCHES = ("call1-checks", "call2-checks", "call3-checks", "call4-checks", "call5-checks")  # a process each


def plan() -> tuple[dict[str, int], int, dict[str, list[tuple[str, int]]]]:
    """gpu_session.sh read as a plan: each call's budget (PLAN), the SETUP every call spends before and between its
    steps, and each call's steps with their limits: the first number after ``check`` or ``step``, and each row of a
    ``checks`` batch (its lines "LIMIT NAME ..."), whose one process's start adds CHECKS_START."""
    import re

    text = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    budgets = {k: int(v) for k, v in re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A PLAN=\((.*)\)", text)[1])}
    setup = int(re.search(r"^SETUP=(\d+)", text, re.M)[1])
    start = int(re.search(r"^CHECKS_START=(\d+)", text, re.M)[1])
    steps = {}
    for call in budgets:
        branch = re.search(rf"^    {call}\)(.*?)^        ;;", text, re.S | re.M)[1]
        branch = re.sub(r"if \[ \"\$DRY\" = 1 \]; then.*?else", "", branch, flags=re.S)  # the GPU's branch counts
        rows = r"^\s*(?:(?:step|check) )?(\d+) ([\w$\"-]+)"
        steps[call] = [(name, int(limit)) for limit, name in re.findall(rows, branch, re.M)]
        steps[call] += [("(batch start)", start)] * len(re.findall(r"^\s*checks ", branch, re.M))
    return budgets, setup, steps


def test_each_calls_step_limits_fit_its_budget():
    """No step of the plan is cut by its call's budget: each call's step limits and its SETUP add up to at most its
    PLAN entry, and one slot (15 minutes of device time with about 2 of start-up) holds call1 and call2."""
    budgets, setup, steps = plan()
    assert set(CALLS) <= set(budgets) and steps["call1"] and steps["call2"] and setup >= 15
    for call, limits in steps.items():
        assert setup + sum(limit for _, limit in limits) <= budgets[call], (call, limits, budgets[call])
        assert budgets[call] <= 570, call  # a device command runs at most 10 minutes
    assert budgets["call1"] + budgets["call2"] + 120 <= 900
    assert [name for name, _ in steps["call1"]][0] == "loss-check"  # ordered by value: the loss check first


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
        ["bash", "benchmarks/gpu_session.sh", *CALLS], cwd=ROOT, env=env, capture_output=True, text=True
    )
    log = (tmp_path / "out" / "session.log").read_text()
    assert res.returncode == 0, log[-4000:]
    lines = (tmp_path / "session" / "work" / "steps.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == STEPS, lines
    assert all(line.split()[1] == "rc=0" for line in lines), lines
    # a call's rows share one process: its imports are paid once
    pids = {}
    for line in lines:
        if "pid=" in line:
            pids.setdefault(line.split("pid=")[1], []).append(line.split()[0])
    assert len(pids) == len(BATCHES), pids
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        assert any(n.endswith("steps.txt") for n in tar.getnames())
    assert "GPU busy" in log  # the profiled step's summary


@pytest.mark.bench
def _dry_stage(tmp_path: Path, stage: str) -> list[str]:
    """Run one stage of gpu_session.sh in its dry mode: the names of its steps in steps.txt, each asserted rc=0."""
    env = _dry_env(tmp_path)
    res = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh", stage], cwd=ROOT, env=env, capture_output=True, text=True
    )
    log = (tmp_path / "out" / "session.log").read_text()
    assert res.returncode == 0, log[-4000:]
    lines = (tmp_path / "session" / "work" / "steps.txt").read_text().splitlines()
    assert all(line.split()[1] == "rc=0" for line in lines), lines
    return [line.split()[0] for line in lines]


def test_the_online_stage_runs_in_dry_mode(tmp_path):
    """The online stage (benchmarks/bench_online.py on the random SD1.5, here the tiny one at 32 px): exits 0."""
    assert _dry_stage(tmp_path, "online") == ["models", "online-checks", "online-sd15"]


def test_the_flow_stage_runs_in_dry_mode(tmp_path):
    """The flow stage (SD3.5-Medium's step, FLUX.1-dev's with LoRA) at tiny shapes: both steps exit 0."""
    assert _dry_stage(tmp_path, "flow") == ["sd35m-1", "flux-1-lora", "flow-checks"]


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
def test_a_batch_row_past_its_limit_is_stopped_and_the_next_row_runs(tmp_path, monkeypatch):
    """In a batch (a call's rows in one process) a row that runs past its own limit is stopped there (SIGALRM, the
    same KeyboardInterrupt as the session's SIGINT), its row says where, and the next row runs in the same process;
    each row's line in steps.txt has its exit code and the process id, and the after-each command runs per row."""
    import time

    import gpu_check

    from rpo_fast.train import Trainer

    monkeypatch.setenv("RPO_FAST_BENCH_MODELS", str(tmp_path))
    monkeypatch.setattr(Trainer, "train_step", lambda self: time.sleep(60))
    steps = tmp_path / "steps.txt"
    rows = ["2 slow step --pairs 1 --recompute none", "30 matmul matmul"]
    t0 = time.monotonic()
    rc = gpu_check.batch(rows, budget=100, dry=True, steps_file=steps, after_each=f"echo x >> {tmp_path}/after")
    assert rc == 1 and time.monotonic() - t0 < 45
    slow, matmul = steps.read_text().splitlines()
    assert slow.startswith("slow rc=124 ") and matmul.startswith("matmul rc=0 "), (slow, matmul)
    assert slow.split("pid=")[1] == matmul.split("pid=")[1] == str(os.getpid())
    assert (tmp_path / "after").read_text() == "x\nx\n"


@pytest.mark.bench
def test_an_out_of_memory_step_writes_its_row_with_the_peak(tmp_path, monkeypatch):
    """A step that runs out of GPU memory writes a row that says so, in which phase, with the peak memory reached
    (NaN on a CPU), instead of a traceback and no row."""
    import gpu_check

    from rpo_fast.train import Trainer

    monkeypatch.setenv("RPO_FAST_BENCH_MODELS", str(tmp_path))

    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Trainer, "train_step", oom)
    table = gpu_check.step(gpu_check.parse_args(["step", "--dry", "--pairs", "1", "--recompute", "none"]))
    (row,) = table.rows
    assert row["error"].startswith("out of memory in the warmup phase: CUDA out of memory"), row
    assert "peak_gb" in row and row["build_s"] > 0


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
