"""The GPU check's measurements, one stage per command (``benchmarks/gpu_session.sh`` runs them in two calls).

    python benchmarks/gpu_check.py loss-check [--backends eager,triton,compile,native]
                                                         each loss backend against float64 eager, SDXL latents
    python benchmarks/gpu_check.py matmul                the bf16 matmul rate: 8192^3 and UNet-like shapes
    python benchmarks/gpu_check.py step --kind sdxl --pairs 1 [--ds-config single_gpu] [--recompute selective]
        [--compile] [--baseline] [--profile]         one training-step configuration: per-phase times, peak memory
    python benchmarks/gpu_check.py batch --budget SECONDS --steps-file FILE [--after-each COMMAND] < ROWS
                                                         the rows ("LIMIT NAME STAGE ARGS...") in this one process

With ``--dry`` (or on a machine without CUDA) every stage runs at tiny shapes on the CPU (the CI's check that the
stages run end to end); its rows go to ``.benchmarks/`` (ignored by git), a GPU's to ``benchmarks/results/``.

Per-phase times of a step come from CUDA events around each phase (``time.perf_counter`` on the CPU): data (the
loader's next batch, host to device), reference forward, policy forward and loss, backward, optimizer step, summed
over the timed steps and divided by their number. ``--profile`` also records 3 steps with ``torch.profiler``: the
top kernels by GPU time and the GPU-busy fraction (the union of kernel intervals over the wall time of the 3 steps)
go to the results folder. Each row also gives ``build_s`` (the Trainer: models loaded) and ``warmup_s`` (the
warm-up steps: compile and graph capture happen there); a step stopped by gpu_session.sh's time limit (SIGINT)
writes a row that names the phase it was in, and exits 124.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_train_step as B  # noqa: E402
import torch
from bench_utils import ResultTable, matmul_rate, sync  # noqa: E402

from rpo_fast.debug import HostSyncs
from rpo_fast.models import load_family

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------
# loss-check
# --------------------------------------------------------------------------------------------------


GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # the gradient's max error over its max magnitude


BACKENDS = ("eager", "triton", "compile", "native")


def loss_check(dry: bool, backends=BACKENDS) -> ResultTable:
    """Every objective x backend at SDXL latents (B = 4 pairs, bf16; dry: 4x8x8, fp32) against float64 eager:
    the loss's absolute error and the gradient's largest error relative to its largest magnitude."""
    from rpo_fast import PreferenceLoss
    from rpo_fast.objectives import OBJECTIVES, objective

    dev = "cuda" if CUDA and not dry else "cpu"
    c, h, w = (4, 8, 8) if dry else (4, 128, 128)
    dtype = torch.float32 if dry else torch.bfloat16
    b = 4
    table = ResultTable(
        "gpu_loss_check",
        "Every loss backend against float64 eager",
        ["objective", "backend", "dtype", "shape", "loss", "loss_float64", "loss_abs_err", "grad_rel_err", "ok"],
        notes=f"Command: python benchmarks/gpu_check.py ({' '.join(sys.argv[1:])})",
        key=("objective", "backend", "dtype", "shape"),
    )  # each row written as it comes: a call cut short keeps the rows before
    g = torch.Generator(device=dev).manual_seed(0)
    p0 = torch.randn(2 * b, c, h, w, device=dev, generator=g)
    t = torch.randn(b, c, h, w, device=dev, generator=g)
    q = p0 + 0.05 * torch.randn(2 * b, c, h, w, device=dev, generator=g)
    emb = dict(
        embeds_w=torch.randn(b, 16, device=dev, generator=g), embeds_l=torch.randn(b, 16, device=dev, generator=g)
    )
    steps = torch.randint(0, 1000, (b,), device=dev, generator=g)
    for name in OBJECTIVES:
        spec = objective(name)
        if spec.online:  # the group layout: their fused part is the error pass alone (tests/test_sample_errors.py)
            continue
        opts = {k: v for k, v in (("beta", 100.0), ("scope", "local"), ("form", "sdxl")) if k in spec.options}
        kw = {}
        if spec.embeddings:
            kw |= emb
        if spec.timesteps:
            kw["timesteps"] = steps
        inputs = (p0, t, q) if spec.reference else (p0[:b], t)  # SFT: winners only
        ref_in = [x.double().requires_grad_(i == 0) for i, x in enumerate(inputs)]
        ref_kw = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
        r = PreferenceLoss(name, backend="eager", **opts)(*ref_in, **ref_kw)
        (ref_grad,) = torch.autograd.grad(r.loss, ref_in[0])
        for backend in backends:
            if backend == "triton" and not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
                continue
            p = inputs[0].to(dtype).requires_grad_(True)
            out = PreferenceLoss(name, backend=backend, **opts)(p, *(x.to(dtype) for x in inputs[1:]), **kw)
            (grad,) = torch.autograd.grad(out.loss, p)
            loss, ref_loss = float(out.loss.detach()), float(r.loss.detach())
            err = (grad.double() - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-30)
            table.add(
                objective=name,
                backend=backend,
                dtype=str(dtype).removeprefix("torch."),
                shape=f"{2 * b}x{c}x{h}x{w}",
                loss=loss,
                loss_float64=ref_loss,
                loss_abs_err=abs(loss - ref_loss),
                grad_rel_err=float(err),
                ok=bool(float(err) <= GRAD_TOL[dtype] and abs(loss - ref_loss) <= 1e-3 * abs(ref_loss) + 1e-5),
            )
    return table


# --------------------------------------------------------------------------------------------------
# matmul
# --------------------------------------------------------------------------------------------------

# (m, k, n): 8192^3, then the largest GEMMs of an SDXL 1024px step for 2 images: the 64x64 level's projections
# (8192 tokens x 640), its feed-forward (GEGLU: 640 -> 5120), the 32x32 level's (2048 tokens x 1280, 1280 -> 10240)
MATMULS = [(8192, 8192, 8192), (8192, 640, 640), (8192, 640, 5120), (2048, 1280, 1280), (2048, 1280, 10240)]


def matmul(dry: bool) -> ResultTable:
    dtype = torch.bfloat16 if CUDA and not dry else torch.float32
    rows = []
    shapes = [(256, 256, 256), (128, 64, 64)] if dry else MATMULS
    for m, k, n in shapes:
        rate = matmul_rate(m, k, n, dtype=dtype, reps=3 if dry else 50)
        rows.append(dict(shape=f"{m}x{k}x{n}", dtype=str(dtype).removeprefix("torch."), tflops=rate / 1e12))
    return _table("gpu_matmul", "Matmul rate (bf16 on a GPU)", ("shape", "dtype"), rows)


# --------------------------------------------------------------------------------------------------
# step
# --------------------------------------------------------------------------------------------------


class PhaseTimes:
    """Times of named phases of a step: CUDA events around each call on a GPU (the stream's time), perf_counter on a
    CPU. ``wrap(obj, method, phase)`` times every call of ``obj.method``."""

    def __init__(self):
        self.marks: list[tuple[str, object, object]] = []
        self.on = False

    def _now(self):
        if CUDA:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def wrap(self, obj, method: str, phase: str) -> None:
        inner = getattr(obj, method)

        def timed(*args, **kwargs):
            if not self.on:
                return inner(*args, **kwargs)
            start = self._now()
            out = inner(*args, **kwargs)
            self.marks.append((phase, start, self._now()))
            return out

        setattr(obj, method, timed)

    def totals_ms(self) -> dict[str, float]:
        sync()
        out: dict[str, float] = {}
        for phase, a, b in self.marks:
            out[phase] = out.get(phase, 0.0) + (a.elapsed_time(b) if CUDA else 1e3 * (b - a))
        return out


def random_model(kind: str, dry: bool) -> Path:
    """bench_train_step's random model folder of ``kind`` (dry: the tiny one) under $RPO_FAST_BENCH_MODELS, built
    once per machine (SDXL: 7 GB, about a minute on a GPU)."""
    root = Path(os.environ.get("RPO_FAST_BENCH_MODELS") or tempfile.mkdtemp(prefix="rpo_fast_models_"))
    return B.random_model(root, kind, tiny=dry)


def models(kinds: list[str], dry: bool) -> ResultTable:
    """The ``models`` stage: build the random folders first, in a step of their own, so that on a fresh machine no
    measured step spends its time limit building one (and leaves it half-built for the next)."""
    rows = []
    for kind in kinds:
        t0 = time.perf_counter()
        path = random_model(kind, dry)
        rows.append(dict(kind=kind, folder=str(path), seconds=time.perf_counter() - t0))
    return _table("gpu_models", "The random model folders (built once per machine)", ("kind",), rows)


def flops_once(model: Path, recompute: str) -> tuple[float, float]:
    """``bench_train_step.flops_per_pair``, counted once per model folder and recompute mode (4-9 s on the meta device)
    and kept beside the folder for the session's later steps."""
    cached = model.parent / f"{model.name}-flops-{recompute}.json"
    if cached.exists():
        return tuple(json.loads(cached.read_text()))
    flops = B.flops_per_pair(model, recompute)
    cached.write_text(json.dumps(list(flops)))
    return flops


def step(a) -> ResultTable:
    """One training-step configuration of rpo_fast's Trainer on the random full-size model (dry: the tiny one)."""
    from rpo_fast import testing as T

    dry = a.dry or not CUDA
    model = random_model(a.kind, dry)
    root = model.parent
    res = load_family(model).default_resolution  # the recipe's (the tiny folder's 32)
    cache = T.write_synthetic_cache(model, root / f"cache-{a.kind}-{a.pairs}", max(8, 2 * a.pairs), resolution=res)
    flops, hw_flops = flops_once(model, a.recompute)
    rate = B.matmul_rate()
    compiled = (a.compile_mode or ("whole" if a.compile else "none")) + ("+resnets" if a.compile_resnets else "")
    key = dict(kind=a.kind, pairs=a.pairs, ds_config=a.ds_config, recompute=a.recompute, compile=compiled)
    key.update(lora_rank=a.lora_rank, fp8=a.fp8, reference_graphs=a.reference_graphs)
    if a.ref_placement != "replicated":  # (a key rows measured before the option existed keep)
        key["ref_placement"] = a.ref_placement
    if a.baseline:
        r = B.bench_baseline(
            model, a.pairs, steps=a.steps, warmup=a.warmup, gradient_checkpointing=a.recompute != "none"
        )
        row = dict(
            **key,
            side="baseline",
            step_ms=1e3 * r["step_s"],
            pairs_per_s=r["pairs_per_s"],
            peak_gb=r["peak_gb"],
            mfu=r["pairs_per_s"] * flops / rate,
            matmul_tflops=rate / 1e12,
        )
        return _table("gpu_step", STEP_TITLE, STEP_KEY, [row])
    marks = {"build": time.perf_counter()}  # when each phase began: a row stopped by its time limit says where
    if a.ref_placement == "precomputed":  # the reference pass over the step's cache first: its own phase
        marks = {"reference_pass": time.perf_counter()}
    try:
        return _timed_step(a, dry, model, cache, key, flops, hw_flops, rate, marks)
    except KeyboardInterrupt:  # gpu_session.sh's `timeout --signal=INT`: a row that says where the time went
        phase, began = list(marks.items())[-1]
        error = f"stopped by its time limit in the {phase} phase after {time.perf_counter() - began:.0f} s"
        print(f"[gpu_check] {error}", flush=True)
        row = dict(**key, side="rpo_fast", **_phase_seconds(marks), error=error)
        return _table("gpu_step", STEP_TITLE, STEP_KEY, [row])
    except torch.OutOfMemoryError as e:  # a row with the memory it reached, not a traceback and no row
        phase = list(marks)[-1]
        peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
        error = f"out of memory in the {phase} phase: {str(e).splitlines()[0][:160]}"
        print(f"[gpu_check] {error}", flush=True)
        row = dict(**key, side="rpo_fast", peak_gb=peak, **_phase_seconds(marks), error=error)
        return _table("gpu_step", STEP_TITLE, STEP_KEY, [row])


def _phase_seconds(marks: dict[str, float]) -> dict[str, float]:
    """The seconds of each finished phase (``build_s``, ``warmup_s``...), from when each phase began."""
    times = list(marks.values())
    return {f"{name}_s": end - start for name, start, end in zip(marks, times, times[1:])}


def _timed_step(a, dry, model, cache, key, flops, hw_flops, rate, marks) -> ResultTable:
    """step's measurement: build the Trainer (the models load), warm up (compile and graph capture happen here),
    time the steps; ``marks`` records when each phase began."""
    from rpo_fast.train import Trainer

    with tempfile.TemporaryDirectory() as out:
        flags = dict(recompute=a.recompute, compile=a.compile, mixed_precision="no" if dry else "bf16")
        if a.ref_placement == "precomputed":  # a table for the steps this row takes (the profile's 3 included)
            from rpo_fast.data.dataset import CachedPairs
            from rpo_fast.reference import ReferenceConfig, epochs_needed, run_pass

            steps = a.warmup + a.steps + 3
            table = run_pass(
                ReferenceConfig(
                    model=str(model),
                    data=str(cache),
                    reference_table=str(Path(out) / "table"),
                    epochs=epochs_needed(steps, a.pairs, len(CachedPairs(cache)), 1),
                    mixed_precision=flags["mixed_precision"],
                    batch_size=8,
                    progress=False,
                )
            )
            flags.update(ref_placement="precomputed", reference_table=str(table), max_steps=steps)
            marks["build"] = time.perf_counter()
        elif a.ref_placement == "zero3":
            flags["ref_placement"] = "zero3"
        flags.update(lora_rank=a.lora_rank, **B.step_options(a))
        flags["compile_backend"] = "aot_eager" if dry else "inductor"  # dry: no C++ build of inductor's CPU code
        flags["reference_graphs"] = a.reference_graphs and not dry  # CUDA only: the dry run takes the eager path
        with contextlib.closing(
            Trainer(B.bench_config(model, cache, a.pairs, out, ds_config=a.ds_config, **flags))
        ) as trainer:
            phases = PhaseTimes()
            phases.wrap(trainer.loader, "next", "data")
            phases.wrap(trainer, "reference_forward", "reference_forward")
            phases.wrap(trainer, "forward_loss", "forward_total")
            phases.wrap(trainer.engine, "backward", "backward")
            phases.wrap(trainer.engine, "step", "optimizer")
            marks["warmup"] = time.perf_counter()
            for _ in range(a.warmup):
                trainer.train_step()
            sync()
            marks["timed"] = time.perf_counter()
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            phases.on = True
            t0 = time.perf_counter()
            with HostSyncs(dispatch=False) as syncs:  # CUDA's sync debug mode: each synchronizing call warns once
                for _ in range(a.steps):
                    trainer.train_step()
                sync()
            sec = (time.perf_counter() - t0) / a.steps
            ms = {k: v / a.steps for k, v in phases.totals_ms().items()}
            ms["policy_forward_and_loss"] = ms.pop("forward_total") - ms.get("reference_forward", 0.0)  # table: 0
            peak = torch.cuda.max_memory_allocated() / 2**30 if CUDA else float("nan")
            pairs_s = a.pairs / sec
            row = dict(
                **key,
                side="rpo_fast",
                step_ms=1e3 * sec,
                pairs_per_s=pairs_s,
                peak_gb=peak,
                mfu=pairs_s * flops / rate,
                hfu=pairs_s * hw_flops / rate,
                matmul_tflops=rate / 1e12,
                **{f"{k}_ms": v for k, v in ms.items()},
                host_syncs_per_step=syncs.count / a.steps if CUDA else float("nan"),
                synchronizes_per_step=len(syncs.synchronizes) / a.steps,
                **_phase_seconds(marks),
            )
            if CUDA and syncs.sites:
                print("[gpu_check] synchronizing calls in the step (count, where):", flush=True)
                for where, n in syncs.sites.most_common(8):
                    print(f"  {n:5d}  {where}", flush=True)
            if a.profile:
                t0 = time.perf_counter()
                try:
                    profile(trainer, a, dry)
                except KeyboardInterrupt:  # the measured row stands
                    row["error"] = f"the profile was stopped by its time limit after {time.perf_counter() - t0:.0f} s"
    return _table("gpu_step", STEP_TITLE, STEP_KEY, [row])


STEP_TITLE = "Training step: per-phase times (ms per step), peak memory, MFU/HFU, host syncs"
STEP_KEY = ("kind", "pairs", "ds_config", "recompute", "compile", "lora_rank", "fp8", "reference_graphs")
STEP_KEY += ("ref_placement", "side")


def profile(trainer, a, dry: bool) -> None:
    """3 steps under torch.profiler: the top kernels (GPU time) and the GPU-busy fraction, to the results folder."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    sync()
    t0 = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for _ in range(3):
            trainer.train_step()
        sync()
    wall_us = 1e6 * (time.perf_counter() - t0)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA] if CUDA else []
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if e > end:
            busy += e - max(s, end)
            end = e
    sort = "cuda_time_total" if CUDA else "cpu_time_total"
    summary = prof.key_averages().table(sort_by=sort, row_limit=25)
    folder = ROOT.parent / ".benchmarks" if dry else ROOT / "results"
    folder.mkdir(parents=True, exist_ok=True)
    options = "".join(
        f"-{o}"
        for o, on in (("compiled", a.compile or a.compile_mode), ("fp8", a.fp8), ("graphs", a.reference_graphs))
        if on
    )
    name = f"gpu_profile-{a.kind}-{a.pairs}-{a.ds_config}-{a.recompute}{options}"
    text = (
        f"# {name}\n\n3 training steps under torch.profiler; GPU busy {busy / wall_us:.1%} of {wall_us / 1e3:.0f} ms "
        f"wall ({len(kernels)} kernels)\n\n```\n{summary}\n```\n"
    )
    (folder / f"{name}.md").write_text(text)
    print(text, flush=True)


def _table(name: str, title: str, key: tuple[str, ...], rows: list[dict]) -> ResultTable:
    """The rows as a result table keyed by ``key`` (a later run's rows of the same configuration replace these):
    benchmarks/results/ on a GPU, .benchmarks/ on a CPU."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = ResultTable(
        name, title, columns, notes=f"Command: python benchmarks/gpu_check.py ({' '.join(sys.argv[1:])})", key=key
    )
    for r in rows:
        table.add(**r)
    return table


# --------------------------------------------------------------------------------------------------
# batch
# --------------------------------------------------------------------------------------------------


def batch(rows: list[str], *, budget: float, dry: bool, steps_file: Path, after_each: str | None = None) -> int:
    """The ``batch`` stage: each row ("LIMIT NAME STAGE ARGS...") run as ``gpu_check.py STAGE ARGS`` in this one
    process, so that a call's imports (8-15 s) are paid once, its model folders and FLOP counts are read from memory's
    page cache, not rebuilt. Each row runs under its own limit (``LIMIT`` seconds, less where the batch's ``budget``
    has less left): SIGALRM raises KeyboardInterrupt, the same as gpu_session.sh's SIGINT, so a stopped step writes
    its row saying where. Each row appends "NAME rc=R seconds=S pid=P" to ``steps_file`` (rc 124: stopped by its
    limit) and then runs ``after_each`` (the session's archive); between rows the process gets a clean slate (Dynamo
    reset, ZeRO-3's replacement of ``F.linear`` undone, the GPU's cache emptied). Returns 1 if a row failed."""
    deadline = time.monotonic() + budget
    linear = torch.nn.functional.linear
    failed = 0

    def on_alarm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, on_alarm)
    try:
        for line in rows:
            limit, name, *argv = shlex.split(line)
            left = deadline - time.monotonic()
            if left < 30:
                print(f"=== {name}: not started, {left:.0f}s left of the batch's budget", flush=True)
                _record(steps_file, f"{name} not-started")
                continue
            limit = min(float(limit), left)
            print(f"=== {name} (limit {limit:.0f}s, in process {os.getpid()}): {' '.join(argv)}", flush=True)
            t0 = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                main(argv + (["--dry"] if dry else []))
                rc = 0
            except SystemExit as e:  # a stage's own exit: 124 for a step stopped by its limit, a message otherwise
                rc = e.code if isinstance(e.code, int) else 1
                if not isinstance(e.code, int):
                    print(e.code, flush=True)
            except KeyboardInterrupt:
                rc = 124
                print(f"[gpu_check] {name} stopped by its time limit", flush=True)
            except Exception:  # noqa: BLE001  # a failed row is the row's result: the next one still runs
                import traceback

                traceback.print_exc()
                rc = 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            failed |= rc != 0
            seconds = time.monotonic() - t0
            print(f"=== {name}: rc {rc} after {seconds:.0f}s", flush=True)
            _record(steps_file, f"{name} rc={rc} seconds={seconds:.0f} pid={os.getpid()}")
            _clean_slate(linear)
            if after_each:
                subprocess.run(["bash", "-c", after_each], check=False)
    finally:
        signal.signal(signal.SIGALRM, previous)
    return int(failed)


def _record(steps_file: Path, line: str) -> None:
    with open(steps_file, "a") as f:
        f.write(line + "\n")


def _clean_slate(linear) -> None:
    """What one row leaves that the next must not see: Dynamo's compiled graphs, ZeRO-3's ``F.linear`` (it replaces it
    for the whole process), the GPU memory the row's caching allocator holds, its peak."""
    torch.nn.functional.linear = linear
    torch._dynamo.reset()
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


KINDS = list(B.KINDS)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["models", "loss-check", "matmul", "step", "batch"])
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument(
        "--backends", default=",".join(BACKENDS), help="loss-check: the loss backends, comma-separated (default: all)"
    )
    ap.add_argument("--kind", default="sdxl", choices=KINDS)
    ap.add_argument("--kinds", default="sdxl", help="models: the kinds to build, comma-separated")
    ap.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters (FLUX's full states exceed a GPU)")
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--ds-config", default="single_gpu", choices=["single_gpu", "zero2_8bit", "zero3_8bit"])
    ap.add_argument("--recompute", default="selective", choices=["none", "selective", "full"])
    ap.add_argument(
        "--ref-placement",
        default="replicated",
        choices=["replicated", "zero3", "precomputed"],
        help="precomputed: the reference pass over the step's cache first (its seconds: reference_pass_s)",
    )
    B.add_step_options(ap)
    ap.add_argument("--baseline", action="store_true", help="the reference-script step instead of rpo_fast's")
    ap.add_argument("--profile", action="store_true", help="also 3 profiled steps: top kernels, GPU-busy fraction")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--budget", type=float, default=600.0, help="batch: the seconds all its rows may take")
    ap.add_argument("--steps-file", type=Path, help="batch: the file each row's exit code and seconds go to")
    ap.add_argument("--after-each", help="batch: a bash command run after each row (the session's archive)")
    a = ap.parse_args(argv)
    if a.stage == "batch" and a.steps_file is None:
        ap.error("batch needs --steps-file")
    if a.dry or not CUDA:
        a.steps, a.warmup = min(a.steps, 2), min(a.warmup, 1)
    backends = tuple(b for b in a.backends.split(",") if b)
    unknown = [b for b in backends if b not in BACKENDS] or ([] if backends else ["(none)"])
    if unknown:
        ap.error(f"--backends {a.backends!r}: {', '.join(unknown)} is not one of {', '.join(BACKENDS)}")
    a.backends = backends
    a.kinds = [k for k in a.kinds.split(",") if k]
    if not a.kinds or any(k not in KINDS for k in a.kinds):
        ap.error(f"--kinds {','.join(a.kinds)!r}: each must be one of {', '.join(KINDS)}")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    dry = a.dry or not CUDA
    if a.stage == "batch":
        rows = [line for line in sys.stdin.read().splitlines() if line.strip()]
        sys.exit(batch(rows, budget=a.budget, dry=a.dry, steps_file=a.steps_file, after_each=a.after_each))
    stages = {
        "models": lambda: models(a.kinds, dry),
        "loss-check": lambda: loss_check(dry, a.backends),
        "matmul": lambda: matmul(dry),
        "step": lambda: step(a),
    }
    table = stages[a.stage]()
    for row in table.rows:
        print("[gpu_check]", json.dumps(row), flush=True)
    for p in table.write():
        print(f"[gpu_check] wrote {p}")
    failed = [r for r in table.rows if r.get("ok") is False]
    if failed:
        sys.exit(f"[gpu_check] {len(failed)} row(s) outside the tolerance: {failed}")
    if any("by its time limit" in str(r.get("error", "")) for r in table.rows):
        sys.exit(124)  # timeout's own code: the session's log says the step was cut, its row says where


if __name__ == "__main__":
    main()
