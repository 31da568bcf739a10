"""Peak host memory and time of loading the policy for bf16 training: read in fp32 and cast (what the trainer did:
DeepSpeed cast the fp32 module) against read in bf16 (what it does). Each load runs in a fresh process; the peak is
the process's anonymous resident memory (RssAnon, sampled every 5 ms) less its size after the imports: the
safetensors file is memory-mapped, and its pages are the page cache's, not the process's.

    python benchmarks/bench_policy_load.py --kind sd15 [--folder DIR]

The model is a full-size random one saved in fp32 (``rpo_fast.testing.save_random_model``; real weights load the same
way). Prints a markdown row per way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = {"fp32, then cast to bf16 (before)": "cast", "bf16 (now)": "direct"}


def _anonymous_kib() -> int:
    """The process's anonymous resident memory (what it owns; the safetensors file's mapped pages are page cache)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def _child(folder: str, way: str) -> None:
    import threading

    import torch

    from rpo_fast.models import load_family

    fam = load_family(folder)
    fam.denoiser_class()  # the imports first: they are not the load's
    base, peak, done = _anonymous_kib(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _anonymous_kib())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if way == "cast":
        model = fam.load_denoiser(dtype=torch.float32).to(torch.bfloat16)
    else:
        model = fam.load_denoiser(dtype=torch.bfloat16)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _anonymous_kib())
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps(dict(peak_gib=(peak[0] - base) / 2**20, seconds=seconds, params=params)))


def measure(folder: str, repeats: int = 3) -> dict[str, dict]:
    out = {}
    for label, way in WAYS.items():
        runs = []
        for _ in range(repeats):
            res = subprocess.run(
                [sys.executable, __file__, "--child", folder, way], capture_output=True, text=True, check=True
            )
            runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
        runs.sort(key=lambda r: r["seconds"])
        out[label] = dict(runs[len(runs) // 2], peak_gib=max(r["peak_gib"] for r in runs))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", default="sd15", choices=("sd15", "sdxl"))
    ap.add_argument("--folder", help="a saved full-size model (default: one is written to a temporary folder)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(*a.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.folder
        if folder is None:
            from rpo_fast import testing as T

            folder = str(T.save_random_model(Path(tmp) / a.kind, a.kind, full=True))
        rows = measure(folder, a.repeats)
    print("| load | peak anonymous memory (GiB) | seconds (median) |")
    print("|---|---|---|")
    for label, r in rows.items():
        name = f"{a.kind} ({r['params'] / 1e9:.2f} B parameters), {label}"
        print(f"| {name} | {r['peak_gib']:.2f} | {r['seconds']:.2f} |")


if __name__ == "__main__":
    from rpo_fast.logs import quiet_known_noise

    quiet_known_noise()  # the dependencies' known log noise (RPO_FAST_VERBOSE=1 shows it)
    main()
