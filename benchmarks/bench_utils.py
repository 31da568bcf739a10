"""Timing, bandwidth, launch counting and result tables shared by the benchmarks.

Timing: CUDA events around ``iters`` back-to-back calls (one synchronisation before and after, never one
per call), and separately the replay of a CUDA graph of one call; on CPU, wall time around the same loop.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path

import torch
import triton

from rpo_fast.logs import quiet_known_noise

quiet_known_noise()  # every benchmark imports this module: the known log noise is dropped (RPO_FAST_VERBOSE=1)
ROOT = Path(__file__).resolve().parent
QUICK = not torch.cuda.is_available()  # the CPU quick mode


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_rate(m: int = 8192, k: int = 8192, n: int = 8192, *, dtype=torch.bfloat16, reps: int = 20) -> float:
    """Measured FLOP/s of an (m x k) @ (k x n) matmul on this device: the one matmul timer of the benchmarks
    (``reps`` back-to-back after 3 warm-up calls; fp32 on a CPU, whatever ``dtype``)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype if dev == "cuda" else torch.float32
    a, b = torch.randn(m, k, device=dev, dtype=dtype), torch.randn(k, n, device=dev, dtype=dtype)
    return 2 * m * k * n / time_loop(lambda: a @ b, reps)


def time_loop(fn, iters: int, warmup: int = 3) -> float:
    """Mean seconds per call over ``iters`` back-to-back calls between two synchronisations."""
    for _ in range(warmup):
        fn()
    sync()
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def time_graph(fn, iters: int) -> float | None:
    """Mean seconds per replay of a CUDA graph that captured one call; None where capture fails or on CPU."""
    if not torch.cuda.is_available():
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_loop(graph.replay, iters)
    except Exception as e:  # noqa: BLE001 - a provider that cannot be captured is reported as n/a, with why
        warnings.warn(f"CUDA graph capture failed, *_graph_ms is n/a: {type(e).__name__}: {e}", stacklevel=2)
        return None


def copy_bandwidth(nbytes: int = 1 << 30) -> float | None:
    """Device-to-device copy rate in bytes/s (read + write counted), measured now on this device."""
    if not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    sec = time_loop(lambda: dst.copy_(src), 20)
    return nbytes / sec


def count_launches(fn) -> int | None:
    """GPU kernels launched by one call (torch.profiler); None on CPU."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def stage0_config(folder: Path) -> str:
    """configs/single_gpu.json with ZeRO stage 0 (what the one-GPU config was before it became ZeRO-2 on one rank),
    written into ``folder``: the plain engine others are compared with (fp32, or one micro-step: the trainer refuses
    stage 0 with 16-bit accumulation)."""
    ds = json.loads((ROOT.parent / "configs" / "single_gpu.json").read_text())
    ds["zero_optimization"] = {"stage": 0}
    path = Path(folder) / "stage0.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds))
    return str(path)


def cpu_name() -> str:
    """'CPU: <model name>, <n> cores', for tables of CPU figures."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next(x.split(":", 1)[1].strip() for x in lines if x.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown"
    return f"CPU: {name}, {os.cpu_count()} cores"


def commit() -> str:
    """The code's commit: RPO_FAST_COMMIT where set (a copied tree without .git, as on the GPU machine), else git's."""
    if os.environ.get("RPO_FAST_COMMIT"):
        return os.environ["RPO_FAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def environment() -> dict:
    return dict(
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'})",
        mode="quick (CPU, Triton interpreter: not a speed reference)" if QUICK else "full",
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        commit=commit(),
    )


class ResultTable:
    """Rows of one benchmark, written as JSON and Markdown. GPU runs go to benchmarks/results/ (committed);
    the CPU quick mode writes to .benchmarks/ (ignored by git).

    ``key`` names the columns that identify a configuration: several runs (separate commands, or a rerun) add
    their rows to the same file, a row replacing the earlier row of its configuration. Every row carries the
    commit and time of its run and, where given, its command."""

    def __init__(
        self, name: str, title: str, columns: list[str], notes: str = "", key: tuple[str, ...] = (), device: str = ""
    ):
        """``device``: a name for the file (``NAME-DEVICE``) that puts it in benchmarks/results/ even on a CPU: for
        figures a CPU gives honestly (host overhead, counts), not the quick mode's."""
        self.name, self.title, self.notes, self.key, self.device = name, title, notes, key, device
        self.columns = [*columns, "run"]
        self.rows: list[dict] = []
        self.env = environment()

    def _path(self, suffix: str) -> Path:
        if self.device:
            return ROOT / "results" / f"{self.name}-{self.device}{suffix}"
        folder = ROOT.parent / ".benchmarks" if QUICK else ROOT / "results"
        return folder / f"{self.name}-{'quick-cpu' if QUICK else self.env['device'].replace(' ', '_')}{suffix}"

    def _key(self, row: dict) -> tuple:
        return tuple(row.get(k) for k in self.key)

    def _earlier(self) -> dict:
        path = self._path(".json")
        return json.loads(path.read_text()) if path.exists() else dict(rows=[], columns=[])

    def _earlier_rows(self) -> list[dict]:
        return self._earlier()["rows"]

    def measured(self, **key) -> bool:
        """With RPO_FAST_BENCH_RESUME=1: whether the results file already holds this configuration, measured at
        this commit (a GPU call that ran out of time is resumed by the next one instead of starting over)."""
        if os.environ.get("RPO_FAST_BENCH_RESUME") != "1":
            return False
        return any(
            self._key(r) == self._key(key) and r.get("run", "").split()[0] == self.env["commit"]
            for r in self._earlier_rows()
        )

    def add(self, **row):
        """Append a row and rewrite the files: a run stopped part way keeps every row measured so far."""
        row["run"] = f"{self.env['commit']} {self.env['date']}"
        self.rows.append(row)
        self.write()

    def write(self) -> list[Path]:
        if not self.rows:
            return []
        json_path, md_path = self._path(".json"), self._path(".md")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        rows, columns = self.rows, self.columns
        if self.key:  # the earlier rows stay, and their columns (a row of another kind may have fewer or others)
            earlier, ours = self._earlier(), {self._key(r) for r in rows}
            rows = [r for r in earlier["rows"] if self._key(r) not in ours] + rows
            columns = [*columns[:-1], *(c for c in earlier["columns"] if c not in columns), "run"]
        data = dict(title=self.title, environment=self.env, notes=self.notes, columns=columns, rows=rows)
        json_path.write_text(json.dumps(data, indent=1))
        lines = [
            f"# {self.title}",
            "",
            *(f"- {k}: {v}" for k, v in self.env.items()),
            "",
            self.notes,
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns),
        ]
        for row in rows:
            lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
        md_path.write_text("\n".join(lines) + "\n")
        return [json_path, md_path]


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
