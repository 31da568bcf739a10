"""The frozen reference's errors computed ahead, once for every run that shares them: the reference pass and its table.

    python -m rpo_fast.reference --model MODEL_DIR --data CACHE_DIR --reference-table TABLE_DIR --epochs 3
    deepspeed --num_gpus 8 -m rpo_fast.reference ...     (data-parallel: each rank its share of the table)
    deepspeed rpo_fast/train.py ... --ref-placement precomputed --reference-table TABLE_DIR

Every draw of a pair is a function of (seed, pair, epoch) (``rpo_fast.draws``), so the reference's error on each image
of each (pair, epoch) a run can use is known before it starts: r_k = mean_N (q_k - t_k)^2 over the latent, q the
reference's prediction, t the target, accumulated and stored in float64. The pass computes them for ``--epochs`` epochs
of the training cache (twin flips included) and for the evaluation's fixed draws (``--eval-pairs`` x
``--eval-repeats``), inference only, in batches of ``--batch-size`` pairs, compiled with ``--compile``; the trainer then
loads no reference model and the loss sees delta = m - r (``PreferenceLoss(ref_errors=...)``). Every objective that
needs only r trains from it: dpo, rpo, dense-dpo, cal-dpo (not dspo, which reads q itself).

The table is the folder TABLE_DIR: ``settings.json`` (its key, written first), ``parts/`` (one file per chunk of
pairs, each written atomically: a killed pass resumes from the chunks it finished), then ``train.npy`` (epochs, pairs,
2) and ``eval.npy`` (repeats, pairs, 2), [winner, loser] per pair, and ``COMPLETE`` last. A training run checks the
key against its own settings before anything loads and names what differs: the seed, the reference's weights, the
cache, the resolution, the caption-drop probability, the timestep law, the twin flips, the family, the reference's
precision and kernels, the device the draws were made on, the evaluation settings, or too few epochs. What does not
invalidate it: beta and the other loss options, the objective among dpo, rpo, cal-dpo and dense-dpo with the same
timestep law, the learning rate and optimizer, the ranks, micro-batch and accumulation.
"""

import argparse
import json
import math
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .config import TrainConfig
from .data.loader import PairSampler, Pick
from .draws import model_inputs, pair_seeds
from .objectives import OBJECTIVE_TABLE, discounted_timestep_probs, per_sample_errors

VERSION = 1
_T = typing.get_type_hints(TrainConfig, include_extras=True)  # the training flags' types: the pass takes the same


def _same(name: str):
    """A field declared like TrainConfig's ``name`` (its default, help and choices)."""
    (f,) = [f for f in fields(TrainConfig) if f.name == name]
    return field(default=f.default, metadata=f.metadata)


@dataclass
class ReferenceConfig:
    """``python -m rpo_fast.reference``: the training run's own flags for what the draws and the reference depend on,
    and where the table goes."""

    model: str = field(metadata=dict(help="local diffusers model folder (the reference is its denoiser)"))
    data: str = field(metadata=dict(help="the training cache (python -m rpo_fast.cache): raw data has no cache to key"))
    reference_table: str = field(metadata=dict(help="the table's folder (resumed where a killed pass left it)"))
    epochs: int = field(
        default=1, metadata=dict(help="epochs of the cache to cover (a run needs max steps x pairs per step / pairs)")
    )
    batch_size: int = field(default=8, metadata=dict(help="pairs per reference forward"))
    compile: bool = field(
        default=False,
        metadata=dict(help="torch.compile the reference's forward (its rounding differs from the run's eager forward)"),
    )
    unet: _T["unet"] = _same("unet")
    objective: _T["objective"] = _same("objective")
    gamma: _T["gamma"] = _same("gamma")
    num_inference_steps: _T["num_inference_steps"] = _same("num_inference_steps")
    timestep_sampling: _T["timestep_sampling"] = _same("timestep_sampling")
    seed: _T["seed"] = _same("seed")
    empty_caption_prob: _T["empty_caption_prob"] = _same("empty_caption_prob")
    mixed_precision: _T["mixed_precision"] = _same("mixed_precision")
    attention: _T["attention"] = _same("attention")
    fuse_qkv: _T["fuse_qkv"] = _same("fuse_qkv")
    fp8: _T["fp8"] = _same("fp8")
    fp8_recipe: _T["fp8_recipe"] = _same("fp8_recipe")
    compile_backend: _T["compile_backend"] = _same("compile_backend")
    eval_pairs: _T["eval_pairs"] = _same("eval_pairs")
    eval_repeats: _T["eval_repeats"] = _same("eval_repeats")
    eval_data: _T["eval_data"] = _same("eval_data")
    progress: _T["progress"] = _same("progress")
    local_rank: int | None = field(
        default=None, metadata=dict(help=argparse.SUPPRESS, flags=("--local_rank", "--local-rank"))
    )


def reference_folder(cfg, family) -> Path:
    """The reference's weights: --unet, else MODEL/<denoiser folder>."""
    return Path(cfg.unet) if cfg.unet else family.path / family.denoiser_folder


def draws_device(device: torch.device) -> str:
    """Where the draws are made: CPU and CUDA generators differ; on CUDA large randn draws depend on the SM count."""
    if device.type != "cuda":
        return device.type
    props = torch.cuda.get_device_properties(device)
    return f"cuda {props.name} {props.multi_processor_count} SMs"


def timestep_law(cfg, family) -> dict:
    """How t is drawn: uniform (every objective but dense-dpo with --timestep-sampling discounted), or ∝ w(t)."""
    spec = OBJECTIVE_TABLE.get(cfg.objective)
    if spec is None or not spec.timesteps or cfg.timestep_sampling != "discounted":
        return dict(law="uniform")
    opts = spec.resolve(
        {k: v for k, v in (("gamma", cfg.gamma), ("num_inference_steps", cfg.num_inference_steps)) if v is not None}
    )
    return dict(law="discounted", gamma=opts["gamma"], num_inference_steps=opts["num_inference_steps"])


def table_key(cfg, family, dataset, eval_dataset, device: torch.device) -> dict:
    """What every entry of a table depends on; a run uses a table only where its own key is the same."""
    from .data.encode import folder_fingerprint

    ref = reference_folder(cfg, family)
    key = dict(
        version=VERSION,
        seed=cfg.seed,
        family=family.name,
        reference=folder_fingerprint(ref.parent, (ref.name,)),
        cache=_cache_fingerprint(dataset),
        resolution=dataset.resolution,
        pairs=len(dataset),
        empty_caption_prob=cfg.empty_caption_prob,
        timesteps=timestep_law(cfg, family),
        twins=bool(dataset.has_twins),
        precision=cfg.mixed_precision,
        kernels=dict(attention=cfg.attention, fuse_qkv=cfg.fuse_qkv, fp8=cfg.fp8 and cfg.fp8_recipe),
        device=draws_device(device),
        eval=dict(
            pairs=min(cfg.eval_pairs, len(eval_dataset)),
            repeats=cfg.eval_repeats,
            data=_cache_fingerprint(eval_dataset),
        ),
    )
    return key


def _cache_fingerprint(dataset) -> str:
    import hashlib

    index = getattr(dataset, "path", None)
    if index is None or not (Path(index) / "index.json").exists():
        raise ValueError(
            "a precomputed reference needs a cache (python -m rpo_fast.cache): raw --data has no cache to key the "
            "table to"
        )
    return hashlib.sha256((Path(index) / "index.json").read_bytes()).hexdigest()[:16]


KEY_NAMES = dict(
    version="the table's format",
    seed="--seed",
    family="the model family",
    reference="the reference's weights (--model / --unet)",
    cache="the cache (--data)",
    resolution="the resolution",
    pairs="the cache's pairs",
    empty_caption_prob="--empty-caption-prob",
    timesteps="the timestep law (--timestep-sampling, --gamma, --num-inference-steps)",
    twins="the twin flips (the cache's --flip-twin)",
    precision="the reference's precision (--mixed-precision)",
    kernels="the reference's kernels (--attention, --fuse-qkv, --fp8)",
    device="the device the draws were made on",
    eval="the evaluation pairs (--eval-pairs, --eval-repeats, --eval-data)",
)


class ReferenceTable:
    """A finished table (``COMPLETE``): its key and the errors r, float64, looked up by (pair, epoch)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not (self.folder / "COMPLETE").exists():
            state = "an unfinished pass: rerun it to finish" if (self.folder / "settings.json").exists() else "no table"
            raise FileNotFoundError(f"--reference-table {self.folder}: {state} (python -m rpo_fast.reference)")
        self.key = json.loads((self.folder / "settings.json").read_text())
        self.train = torch.from_numpy(np.load(self.folder / "train.npy"))  # (epochs, pairs, 2)
        self.eval = torch.from_numpy(np.load(self.folder / "eval.npy"))  # (repeats, pairs, 2)

    @property
    def epochs(self) -> int:
        return self.train.shape[0]

    def check(self, key: dict, *, epochs: int, evaluates: bool) -> None:
        """One error naming every setting in which this run differs from the table, or too few epochs."""
        differ = [k for k in KEY_NAMES if k != "eval" and self.key.get(k) != key.get(k)]
        if evaluates and self.key.get("eval") != key.get("eval"):
            differ.append("eval")
        if differ:
            said = "; ".join(f"{KEY_NAMES[k]}: table {self.key.get(k)!r}, run {key.get(k)!r}" for k in differ)
            raise ValueError(
                f"--reference-table {self.folder} was computed for other settings ({said}): rerun the pass"
            )
        if epochs > self.epochs:
            raise ValueError(
                f"--reference-table {self.folder} covers {self.epochs} epoch(s) of the cache; this run's --max-steps "
                f"reaches epoch {epochs}: rerun the pass with --epochs {epochs}"
            )

    def train_errors(self, picks: list[Pick]) -> torch.Tensor:
        """(2B,) [winners; losers] of the picks' (pair, epoch) entries, on the CPU (the loader copies them)."""
        rows = self.train[[p.epoch for p in picks], [p.index for p in picks]]
        return rows.T.reshape(-1).contiguous()

    def eval_errors(self, repeat: int, indices: list[int]) -> torch.Tensor:
        """(2B,) of the evaluation's fixed draws ``repeat`` of pairs ``indices``, on the CPU."""
        return self.eval[repeat, indices].T.reshape(-1).contiguous()


def epochs_needed(max_steps: int, pairs_per_rank_step: int, pairs: int, world: int) -> int:
    """The epochs a run reaches: each rank takes pairs // world picks per epoch."""
    return math.ceil(max_steps * pairs_per_rank_step / (pairs // world))


def load_reference(family, cfg, device: torch.device) -> torch.nn.Module:
    """The frozen reference as the trainer runs it: the denoiser of --unet or MODEL in the run's precision, with the
    policy's attention, fused QKV and FP8, in eval mode."""
    from .engine import PRECISIONS
    from .fp8 import convert_fp8

    reference = family.load_denoiser(cfg.unet, dtype=PRECISIONS[cfg.mixed_precision]).eval()
    family.set_attention(reference, cfg.attention)
    if cfg.fuse_qkv:
        family.fuse_qkv(reference)
    if cfg.fp8:
        convert_fp8(reference, recipe=cfg.fp8_recipe, emulate=device.type != "cuda")
    return reference


# --------------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------------


def run_pass(cfg: ReferenceConfig) -> Path:
    """Compute the table of ``cfg`` (every rank its share of the chunks), resuming a killed pass; returns its folder."""
    from .config import model_family
    from .data.dataset import collate, open_dataset
    from .engine import PRECISIONS
    from .metrics import progress_bar

    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError(f"--epochs and --batch-size must be at least 1, got {cfg.epochs} and {cfg.batch_size}")
    spec = OBJECTIVE_TABLE[cfg.objective]
    if spec.score_terms:
        raise ValueError(f"--objective {cfg.objective} reads the reference's prediction itself: no table serves it")
    family = model_family(cfg)
    dataset = open_dataset(cfg.data, family=family, resolution=None, flag="--data")
    eval_dataset = (
        open_dataset(cfg.eval_data, family=family, resolution=dataset.resolution, flag="--eval-data")
        if cfg.eval_data
        else dataset
    )
    rank, world = distributed.init_from_env()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    key = table_key(cfg, family, dataset, eval_dataset, device)
    out = Path(cfg.reference_table)
    distributed.check_shared_folder(out, "--reference-table", reads="Rank 0 joins every rank's chunks there")
    settings = out / "settings.json"
    if settings.exists() and json.loads(settings.read_text()) != key:
        raise ValueError(f"--reference-table {out} holds a table for other settings: use another folder")
    if (out / "COMPLETE").exists():
        epochs = ReferenceTable(out).epochs
        if epochs >= cfg.epochs:
            print(f"[reference] {out} is complete ({epochs} epochs)", flush=True)
            return out
        (out / "COMPLETE").unlink(missing_ok=True)  # more epochs: the finished chunks stay (every rank unlinks)
    if rank == 0:
        (out / "parts").mkdir(parents=True, exist_ok=True)
        _write_atomic(settings, json.dumps(key, indent=1).encode())
    distributed.barrier()

    dtype = PRECISIONS[cfg.mixed_precision]
    reference = load_reference(family, cfg, device).to(device)
    forward = torch.compile(reference, backend=cfg.compile_backend) if cfg.compile else reference
    empty = {k: v.to(device) for k, v in dataset.empty_prompt.items()}
    law = key["timesteps"]
    probs = None
    if law["law"] == "discounted":
        probs = discounted_timestep_probs(
            gamma=law["gamma"],
            num_inference_steps=law["num_inference_steps"],
            num_train_timesteps=family.num_train_timesteps,
        ).to(device)
    sampler = PairSampler(len(dataset), seed=cfg.seed, twins=dataset.has_twins)
    n, n_eval, bs = len(dataset), key["eval"]["pairs"], cfg.batch_size
    chunks = [("train", e, s, min(s + bs, n)) for e in range(cfg.epochs) for s in range(0, n, bs)]
    chunks += [("eval", r, s, min(s + bs, n_eval)) for r in range(cfg.eval_repeats) for s in range(0, n_eval, bs)]
    mine = [c for j, c in enumerate(chunks) if j % world == rank]
    todo = [c for c in mine if not _part(out, *c).exists()]
    bar = progress_bar(len(mine), len(mine) - len(todo), "reference pass") if cfg.progress and rank == 0 else None
    flips = {}
    for kind, e, start, end in todo:
        if kind == "train":
            if e not in flips:
                flips[e] = sampler.order_and_flips(e)[1].tolist()
            picks, salt, ds, drop = (
                [Pick(i, flips[e][i], e) for i in range(start, end)],
                0,
                dataset,
                cfg.empty_caption_prob,
            )
        else:
            picks, salt, ds, drop = [Pick(i, False, 0) for i in range(start, end)], 1 + e, eval_dataset, 0.0
        batch = collate([ds.get(p.index, p.flip) for p in picks])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        x = model_inputs(
            family,
            batch,
            pair_seeds(cfg.seed, picks, salt),
            dtype=dtype,
            empty=empty,
            drop_prob=drop,
            timestep_probs=probs,
        )
        with torch.inference_mode():
            q = family.predict(forward, x.noisy, x.t_rows, x.cond)
        r = per_sample_errors(q.double(), x.target.double()).m  # (2B,) [winners; losers]
        buf = r.view(2, -1).T.contiguous().cpu().numpy()  # (B, 2)
        _write_atomic(_part(out, kind, e, start, end), _npy(buf))
        if bar is not None:
            bar.update(world)
    if bar is not None:
        bar.close()
    distributed.barrier()
    if rank == 0:
        train = np.stack(
            [
                np.concatenate([np.load(_part(out, *c)) for c in chunks if c[:2] == ("train", e)])
                for e in range(cfg.epochs)
            ]
        )
        evals = [
            np.concatenate([np.load(_part(out, *c)) for c in chunks if c[:2] == ("eval", r)] or [np.zeros((0, 2))])
            for r in range(cfg.eval_repeats)
        ]  # (no evaluation pairs with --eval-pairs 0)
        _write_atomic(out / "train.npy", _npy(train))
        _write_atomic(out / "eval.npy", _npy(np.stack(evals)))
        _write_atomic(out / "COMPLETE", b"")
        print(
            f"[reference] wrote {out}: {cfg.epochs} epoch(s) x {n} pairs, {cfg.eval_repeats} x {n_eval} eval pairs",
            flush=True,
        )
    distributed.barrier()
    return out


def _part(out: Path, kind: str, e: int, start: int, end: int) -> Path:
    return out / "parts" / f"{kind}-{e}-{start}-{end}.npy"


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    from .cli import run

    run(ReferenceConfig, argv, run_pass, prog="python -m rpo_fast.reference", description=__doc__)
    distributed.finish()


if __name__ == "__main__":
    main()
