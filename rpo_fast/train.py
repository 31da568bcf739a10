"""Preference training of a Stable Diffusion 1.5 / SDXL UNet with DeepSpeed.

    deepspeed rpo_fast/train.py --ds_config configs/zero3_8bit.json --model MODEL_DIR --data CACHE_DIR \\
        --objective rpo --output runs/rpo
    python rpo_fast/train.py ...                     (one process)

The policy UNet trains under DeepSpeed (ZeRO-3 by default) with bitsandbytes' 8-bit AdamW as a client
optimizer. The frozen reference is a bf16 copy on every rank, or its own ZeRO-3 inference engine
(``--ref-placement zero3``), or with ``--lora-rank`` the policy itself with its adapters disabled. Winners and
losers go through each model in ONE concatenated forward. Data comes from the cache of ``python -m
rpo_fast.cache`` (or raw pairs for small runs, encoded on the fly). Checkpoints are DeepSpeed's, in
``OUTPUT/checkpoints/step-N`` with a COMPLETE marker written last; ``--resume`` continues from the newest complete
one. The trained UNet (or LoRA adapter) is exported to ``OUTPUT/unet`` (``OUTPUT/lora``).

Read top to bottom: the config (``TrainConfig``), the checks that run before anything is loaded (``validate``),
then ``Trainer``: ``__init__`` builds data, models, engine and loss in that order and logs one summary line;
``forward_loss`` / ``train_step`` / ``train`` are the loop; ``save`` / ``load`` / ``export`` the checkpoints.
"""

import os
import sys

# Run as a script, this file's folder (rpo_fast/) would come first on sys.path and make its subpackages
# importable as top-level modules: transformers, diffusers and bitsandbytes all try `import kernels`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(_HERE))  # the checkout's rpo_fast, when run from a checkout

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
import typing  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from rpo_fast import PreferenceLoss  # noqa: E402
from rpo_fast.loss import BACKENDS, OPTIONS, resolve_options  # noqa: E402
from rpo_fast.objectives import OBJECTIVES, discounted_timestep_probs  # noqa: E402

# DeepSpeed 0.19 calls torch.distributed collectives that torch 2.13 marks deprecated, once per step
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
SUB_GROUP_LIMIT = 2**31  # bitsandbytes kernels take an int n: a larger ZeRO sub-group is an invalid launch


# --------------------------------------------------------------------------------------------------
# Configuration: one typed dataclass, filled from flat flags, saved as JSON in the run folder
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    ds_config: str = field(metadata=dict(help="DeepSpeed JSON config (configs/zero3_8bit.json, ...)"))
    model: str = field(metadata=dict(help="local diffusers model folder (SD1.5 or SDXL, detected)"))
    data: str = field(metadata=dict(help="a cache folder (python -m rpo_fast.cache), or raw pairs for small runs"))
    output: str = field(default="runs/rpo_fast", metadata=dict(help="run folder: checkpoints, logs, exported unet"))
    unet: str | None = field(
        default=None, metadata=dict(help="start policy and reference from this UNet folder (default: MODEL/unet)")
    )
    objective: str = field(default="rpo", metadata=dict(help=f"one of {OBJECTIVES}"))
    # loss options (those of PreferenceLoss; None: the objective's default)
    beta: float | None = field(default=None, metadata=dict(help="beta (5000 for dpo/rpo/...; DSPO by --form)"))
    tau: float | None = field(default=None, metadata=dict(help="rpo: softmax temperature (0.5)"))
    weighting: str | None = field(default=None, metadata=dict(help="rpo: inside | outside"))
    contrast_scope: str = field(default="global", metadata=dict(help="rpo: global (all ranks' pairs) | local"))
    embedding_mode: str = field(default="multimodal", metadata=dict(help="rpo: text | image | multimodal"))
    form: str | None = field(default=None, metadata=dict(help="dspo: sd15 | sdxl (default: the model's kind)"))
    lam_in: float | None = field(default=None, metadata=dict(help="dspo: lambda inside u (beta / 2)"))
    lam_out: float | None = field(default=None, metadata=dict(help="dspo: lambda outside (beta)"))
    gamma: float | None = field(default=None, metadata=dict(help="dense-dpo: temporal discount (0.9)"))
    num_inference_steps: int | None = field(default=None, metadata=dict(help="dense-dpo: N of k(t) (50)"))
    beta_cal: float | None = field(default=None, metadata=dict(help="cal-dpo: beta_cal (0.5)"))
    lam_cal: float | None = field(default=None, metadata=dict(help="cal-dpo: calibration weight (0.5)"))
    timestep_sampling: str = field(default="uniform", metadata=dict(help="uniform | discounted (dense-dpo: t ~ w(t))"))
    loss_backend: str = field(default="auto", metadata=dict(help=f"one of {BACKENDS}"))
    # schedule
    max_steps: int = field(default=2000, metadata=dict(help="optimizer steps (the DPO recipe: 2000)"))
    micro_batch_size: int = field(default=1, metadata=dict(help="pairs per rank per micro-step"))
    grad_accum: int = field(default=1, metadata=dict(help="micro-steps per optimizer step"))
    lr: float = field(default=2.048e-5, metadata=dict(help="learning rate (the recipe's 1e-8 x 2048 pairs)"))
    scale_lr: bool = field(default=False, metadata=dict(help="multiply --lr by the pairs per optimizer step"))
    warmup_steps: int = field(default=0, metadata=dict(help="linear warm-up steps (recipe: 500 SD1.5, 200 SDXL)"))
    optimizer: str = field(
        default="adamw8bit", metadata=dict(help="adamw8bit | lion8bit (bitsandbytes) | adamw (torch) | adafactor")
    )
    weight_decay: float = field(default=1e-2, metadata=dict(help="AdamW weight decay"))
    adam_beta1: float = field(default=0.9, metadata=dict(help="AdamW beta1"))
    adam_beta2: float = field(default=0.999, metadata=dict(help="AdamW beta2"))
    seed: int = field(default=0, metadata=dict(help="seed of data order, noise, timesteps, caption dropping"))
    empty_caption_prob: float = field(default=0.2, metadata=dict(help="probability a pair's caption is dropped"))
    resolution: int | None = field(default=None, metadata=dict(help="pixels (default: the cache's; 512/1024)"))
    clip: str | None = field(default=None, metadata=dict(help="raw data + rpo: the embedder (see rpo_fast.cache)"))
    # model and precision
    gradient_checkpointing: bool = field(default=False, metadata=dict(help="recompute activations in backward"))
    mixed_precision: str = field(default="bf16", metadata=dict(help="bf16 | fp16 | no"))
    ref_placement: str = field(
        default="replicated", metadata=dict(help="replicated (a bf16 copy per rank) | zero3 (sharded, its own engine)")
    )
    lora_rank: int = field(
        default=0, metadata=dict(help="LoRA rank (0: train the whole UNet); reference = no adapters")
    )
    lora_alpha: float | None = field(default=None, metadata=dict(help="LoRA alpha (default: the rank)"))
    lora_targets: str = field(
        default="to_q,to_k,to_v,to_out.0", metadata=dict(help="comma-separated module names that get adapters")
    )
    compile: bool = field(default=False, metadata=dict(help="torch.compile the UNet forward"))
    compile_backend: str = field(default="inductor", metadata=dict(help="torch.compile backend (inductor, aot_eager)"))
    attention: str = field(default="sdpa", metadata=dict(help="sdpa | xformers (when installed)"))
    # checkpoints, logging, evaluation
    resume: bool = field(default=False, metadata=dict(help="continue from the newest complete checkpoint"))
    checkpoint_every: int = field(default=500, metadata=dict(help="steps between checkpoints (and at the end)"))
    keep_checkpoints: int = field(default=3, metadata=dict(help="complete checkpoints kept (the newest)"))
    log_every: int = field(default=10, metadata=dict(help="steps between log lines"))
    eval_every: int = field(default=0, metadata=dict(help="steps between evaluations on fixed pairs (0: never)"))
    eval_pairs: int = field(default=64, metadata=dict(help="pairs of the fixed evaluation set"))
    eval_data: str | None = field(default=None, metadata=dict(help="evaluation pairs (default: the first of --data)"))
    eval_repeats: int = field(default=1, metadata=dict(help="fixed noise/timestep draws per evaluation pair"))
    max_consecutive_skips: int = field(default=20, metadata=dict(help="non-finite steps in a row before stopping"))
    export_only: bool = field(default=False, metadata=dict(help="load the newest checkpoint, export, exit"))
    export: bool = field(default=True, metadata=dict(help="export the trained unet to OUTPUT/unet at the end"))
    tensorboard: bool = field(default=True, metadata=dict(help="also log to OUTPUT/tb (if tensorboard is installed)"))
    progress: bool = field(default=True, metadata=dict(help="progress bar on rank 0"))
    # fault injection for tests (not shown in --help)
    debug_nan_steps: str = field(default="", metadata=dict(help=argparse.SUPPRESS))
    debug_exit_after_step: int = field(default=0, metadata=dict(help=argparse.SUPPRESS))
    debug_kill_in_save: int = field(default=0, metadata=dict(help=argparse.SUPPRESS))
    local_rank: int = field(default=-1, metadata=dict(help=argparse.SUPPRESS))


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    ap = argparse.ArgumentParser(prog="rpo_fast/train.py", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name}"] if f.name in ("ds_config", "local_rank") else [f"--{f.name.replace('_', '-')}"]
        if f.name == "local_rank":
            flags.append("--local-rank")
        kw = dict(help=f.metadata.get("help"), dest=f.name)
        required = f.default is dataclasses.MISSING
        if f.type in (bool, "bool"):
            ap.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default, **kw)
        else:
            typ = next(t for t in (typing.get_args(f.type) or (f.type,)) if t is not type(None))
            ap.add_argument(*flags, type=typ, required=required, default=None if required else f.default, **kw)
    return TrainConfig(**vars(ap.parse_args(argv)))


def loss_options(cfg: TrainConfig, kind: str) -> dict:
    """The PreferenceLoss options of this run (only those given, and those each objective takes)."""
    given = dict(
        beta=cfg.beta,
        tau=cfg.tau,
        weighting=cfg.weighting,
        form=cfg.form,
        lam_in=cfg.lam_in,
        lam_out=cfg.lam_out,
        gamma=cfg.gamma,
        num_inference_steps=cfg.num_inference_steps,
        beta_cal=cfg.beta_cal,
        lam_cal=cfg.lam_cal,
    )
    takes = OPTIONS.get(cfg.objective, {})
    extra = sorted(k for k, v in given.items() if v is not None and k not in takes)
    if extra:
        raise ValueError(f"--{extra[0].replace('_', '-')} does not apply to --objective {cfg.objective}")
    opts = {k: v for k, v in given.items() if k in takes and v is not None}
    if cfg.objective == "dspo":
        opts.setdefault("form", kind)
    if cfg.objective == "rpo":
        opts["scope"] = cfg.contrast_scope
    return resolve_options(cfg.objective, opts)


# --------------------------------------------------------------------------------------------------
# Checks before anything expensive
# --------------------------------------------------------------------------------------------------


def read_ds_config(cfg: TrainConfig, world: int) -> dict:
    """The DeepSpeed config with 'auto' filled from the flags; refuses what the trainer provides itself."""
    path = Path(cfg.ds_config)
    if not path.exists():
        raise FileNotFoundError(f"--ds_config {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--ds_config {path} is not valid JSON: {e}") from e
    ds = {k: v for k, v in ds.items() if not k.startswith("_")}
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ValueError(
                f"--ds_config {path} defines an {section!r} section; rpo_fast passes its own "
                f"({'--optimizer, --lr' if section == 'optimizer' else '--lr, --warmup-steps'}): remove the section"
            )
    micro, gas = cfg.micro_batch_size, cfg.grad_accum
    for key, mine in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", gas)):
        if ds.get(key, "auto") not in ("auto", mine):
            raise ValueError(f"--ds_config sets {key}={ds[key]} but the run asks for {mine}: use 'auto' or the same")
        ds[key] = mine
    total = micro * gas * world
    if ds.get("train_batch_size", "auto") not in ("auto", total):
        raise ValueError(
            f"--ds_config train_batch_size={ds['train_batch_size']} does not divide into micro-batch {micro} x "
            f"accumulation {gas} x {world} rank(s) = {total}"
        )
    ds["train_batch_size"] = total
    prec = cfg.mixed_precision
    if prec not in PRECISIONS:
        raise ValueError(f"--mixed-precision must be one of {list(PRECISIONS)}, got {prec!r}")
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": prec == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": prec == "fp16"}
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    for key in (
        "reduce_bucket_size",
        "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold",
        "allgather_bucket_size",
        "sub_group_size",
    ):
        if zero.get(key) == "auto":
            raise ValueError(
                f"--ds_config zero_optimization.{key} is 'auto': give an integer (the UNet has no hidden_size)"
            )
    if zero.get("stage", 0) == 3:
        zero.setdefault("sub_group_size", 100_000_000)
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if int(zero.get("sub_group_size", 0)) >= SUB_GROUP_LIMIT:
        raise ValueError(
            f"zero_optimization.sub_group_size {zero['sub_group_size']} must stay under 2^31 (bitsandbytes)"
        )
    if cfg.optimizer in ("adamw8bit", "lion8bit") and zero.get("offload_optimizer"):
        raise ValueError(
            "a bitsandbytes optimizer cannot step offloaded states: drop offload_optimizer or use --optimizer adamw"
        )
    ds["zero_allow_untested_optimizer"] = True
    return ds


def open_dataset(cfg: TrainConfig, data: str, resolution_hint: int | None = None):
    """The cache (refused if made for another model or resolution), or raw pairs encoded on the fly."""
    from rpo_fast.cache import CachedPairs, OnTheFlyPairs

    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    if (path / "index.json").exists() or (path / "cache.json").exists():
        ds = CachedPairs(path)
        ds.check(model=cfg.model, resolution=cfg.resolution or ds.resolution)
        return ds
    if not cfg.resolution and not resolution_hint:
        raise ValueError("raw --data needs --resolution (a cache records its own)")
    from rpo_fast.embed import load_embedder

    embedder = load_embedder(cfg.clip) if cfg.clip else None
    return OnTheFlyPairs(
        cfg.model, path, resolution=cfg.resolution or resolution_hint, embedder=embedder, seed=cfg.seed, limit=None
    )


def validate(cfg: TrainConfig, world: int = 1) -> dict:
    """Every check that needs no model: a clear error before anything is loaded. Returns the DeepSpeed config."""
    from rpo_fast.cache import model_kind

    if not Path(cfg.model).is_dir():
        raise FileNotFoundError(f"--model {cfg.model} is not a folder")
    kind = model_kind(cfg.model)
    if not (Path(cfg.model) / "unet" / "config.json").exists():
        raise FileNotFoundError(f"--model {cfg.model} has no unet/ (config.json missing)")
    if cfg.unet is not None and not (Path(cfg.unet) / "config.json").exists():
        raise FileNotFoundError(f"--unet {cfg.unet} is not a UNet folder (config.json missing)")
    if not Path(cfg.data).exists():
        raise FileNotFoundError(f"--data {cfg.data} does not exist")
    loss_options(cfg, kind)
    for name, ok, allowed in (
        ("--ref-placement", cfg.ref_placement in ("replicated", "zero3"), "replicated, zero3"),
        (
            "--optimizer",
            cfg.optimizer in ("adamw8bit", "lion8bit", "adamw", "adafactor"),
            "adamw8bit, lion8bit, adamw, adafactor",
        ),
        ("--attention", cfg.attention in ("sdpa", "xformers"), "sdpa, xformers"),
        ("--embedding-mode", cfg.embedding_mode in ("text", "image", "multimodal"), "text, image, multimodal"),
        ("--timestep-sampling", cfg.timestep_sampling in ("uniform", "discounted"), "uniform, discounted"),
        ("--loss-backend", cfg.loss_backend in BACKENDS, ", ".join(BACKENDS)),
    ):
        if not ok:
            raise ValueError(f"{name} must be one of: {allowed}")
    if cfg.attention == "xformers":
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ValueError("--attention xformers: xformers is not installed (pip install 'rpo_fast[xformers]')")
    if cfg.lora_rank < 0:
        raise ValueError(f"--lora-rank must be 0 (off) or positive, got {cfg.lora_rank}")
    if cfg.lora_rank and cfg.ref_placement != "replicated":
        raise ValueError("--lora-rank: the reference is the policy without its adapters; drop --ref-placement")
    if cfg.timestep_sampling == "discounted" and cfg.objective != "dense-dpo":
        raise ValueError("--timestep-sampling discounted applies to --objective dense-dpo")
    for name, v in (
        ("--max-steps", cfg.max_steps),
        ("--micro-batch-size", cfg.micro_batch_size),
        ("--grad-accum", cfg.grad_accum),
        ("--checkpoint-every", cfg.checkpoint_every),
        ("--keep-checkpoints", cfg.keep_checkpoints),
        ("--log-every", cfg.log_every),
        ("--eval-repeats", cfg.eval_repeats),
    ):
        if v < 1:
            raise ValueError(f"{name} must be at least 1, got {v}")
    if not 0 <= cfg.empty_caption_prob <= 1:
        raise ValueError(f"--empty-caption-prob must be in [0, 1], got {cfg.empty_caption_prob}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if cfg.resolution is not None and cfg.resolution % 8:
        raise ValueError(f"--resolution {cfg.resolution} must be a multiple of 8")
    ds_config = read_ds_config(cfg, world)
    out = Path(cfg.output)
    if not cfg.resume and latest_checkpoint(out) is not None:
        raise ValueError(
            f"--output {out} already holds checkpoints: pass --resume to continue, or use another --output"
        )
    if cfg.export_only and latest_checkpoint(out) is None:
        raise ValueError(f"--export-only: no complete checkpoint in {out / 'checkpoints'}")
    return ds_config


def check_dataset(cfg: TrainConfig, dataset, world: int) -> None:
    n = len(dataset)
    if n < cfg.micro_batch_size * world:
        raise ValueError(
            f"--data holds {n} pairs, fewer than one micro-batch per rank ({cfg.micro_batch_size} x {world})"
        )
    ties = dataset.ties()
    if ties:
        raise ValueError(
            f"--data holds {ties} tie(s) (0.5/0.5): preference objectives need a winner; rebuild the cache "
            "without --keep-ties"
        )
    if cfg.objective == "rpo" and not dataset.has_embeddings:
        raise ValueError("--objective rpo needs CLIP embeddings: build the cache with --clip (raw data: pass --clip)")


# --------------------------------------------------------------------------------------------------
# Checkpoints: step-N folders, a COMPLETE marker written last
# --------------------------------------------------------------------------------------------------


def complete_checkpoints(output: Path) -> list[int]:
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    steps = [int(p.name[5:]) for p in root.glob("step-*") if p.name[5:].isdigit() and (p / "COMPLETE").exists()]
    return sorted(steps)


def latest_checkpoint(output: Path) -> int | None:
    steps = complete_checkpoints(output)
    return steps[-1] if steps else None


def lr_at(step: int, *, lr: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then constant (the DPO recipe's constant_with_warmup)."""
    return lr * min(1.0, (step + 1) / warmup) if warmup > 0 else lr


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class Trainer:
    # configuration
    cfg: TrainConfig
    ds_config: dict
    kind: str  # sd15 | sdxl
    # components
    engine: object  # the DeepSpeed engine around the policy UNet
    reference: torch.nn.Module | None  # the frozen reference (None for sft)
    loss_fn: PreferenceLoss
    dataset: object
    sampler: object
    # state
    step: int
    consecutive_skips: int

    def __init__(self, cfg: TrainConfig):
        import deepspeed

        self.cfg = cfg
        self.ds_config = validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # before anything is loaded
        self.rank, self.world, self.local_rank = _init_distributed()
        _check_fp16(cfg)
        from rpo_fast.cache import model_kind

        self.kind = model_kind(cfg.model)
        self.loss_opts = loss_options(cfg, self.kind)
        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.out = Path(cfg.output)
        self.dtype = PRECISIONS[cfg.mixed_precision]

        # data
        from rpo_fast.data import PairSampler

        self.dataset = open_dataset(cfg, cfg.data)
        check_dataset(cfg, self.dataset, self.world)
        self.resolution = self.dataset.resolution
        self.sampler = PairSampler(
            len(self.dataset), seed=cfg.seed, rank=self.rank, world=self.world, twins=self.dataset.has_twins
        )
        self.eval_set = self._eval_indices()
        self.empty = {k: v.to(self.device) for k, v in self.dataset.empty_prompt.items()}

        # models
        from diffusers import DDPMScheduler, UNet2DConditionModel

        model = Path(cfg.model)
        self.scheduler = DDPMScheduler.from_config(
            json.loads((model / "scheduler" / "scheduler_config.json").read_text())
        )
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} in {model}/scheduler")
        vae_cfg = json.loads((model / "vae" / "config.json").read_text())
        self.scaling_factor = vae_cfg.get("scaling_factor", 0.18215)
        self.shift_factor = vae_cfg.get("shift_factor") or 0.0
        unet_at = (
            dict(pretrained_model_name_or_path=cfg.unet)
            if cfg.unet
            else dict(pretrained_model_name_or_path=model, subfolder="unet")
        )
        policy = UNet2DConditionModel.from_pretrained(**unet_at, dtype=torch.float32)
        _set_attention(policy, cfg.attention)
        if cfg.lora_rank:  # peft adapters; the base weights stay frozen and serve as the reference
            from peft import LoraConfig

            policy.requires_grad_(False)
            targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
            policy.add_adapter(
                LoraConfig(
                    r=cfg.lora_rank,
                    lora_alpha=cfg.lora_alpha or cfg.lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=targets,
                )
            )
        if cfg.gradient_checkpointing:
            policy.enable_gradient_checkpointing()
        policy.train()
        self.n_params = sum(p.numel() for p in policy.parameters())
        self.n_trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        self.reference = None
        if cfg.objective != "sft" and not cfg.lora_rank:
            reference = UNet2DConditionModel.from_pretrained(**unet_at, dtype=self.dtype)
            _set_attention(reference, cfg.attention)
            reference.eval().requires_grad_(False)
            if cfg.ref_placement == "zero3":  # sharded like the policy: its own ZeRO-3 inference engine (TRL's pattern)
                self.reference, *_ = deepspeed.initialize(model=reference, config=_reference_ds_config(self.ds_config))
                self.reference.eval()
            else:
                self.reference = reference.to(self.device)

        # optimizer, schedule, engine
        self.pairs_per_step = cfg.micro_batch_size * cfg.grad_accum * self.world
        self.lr = cfg.lr * (self.pairs_per_step if cfg.scale_lr else 1)
        optimizer = _build_optimizer(cfg, policy.parameters(), self.lr)  # the trainable ones (LoRA: the adapters)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, lr=1.0, warmup=cfg.warmup_steps))
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=policy, optimizer=optimizer, lr_scheduler=schedule, config=self.ds_config
        )
        if cfg.compile:  # torch.compile of the UNet forward, through DeepSpeed (ZeRO-3 aware)
            self.engine.compile(backend=cfg.compile_backend)
        self.loss_fn = PreferenceLoss(cfg.objective, backend=cfg.loss_backend, **self.loss_opts)
        # evaluation: each rank's own pairs (equal shapes across ranks are not guaranteed there)
        eval_opts = self.loss_opts | ({"scope": "local"} if cfg.objective == "rpo" else {})
        self.eval_loss_fn = PreferenceLoss(cfg.objective, backend=cfg.loss_backend, **eval_opts)
        self.timestep_probs = None
        if cfg.timestep_sampling == "discounted":
            self.timestep_probs = discounted_timestep_probs(
                gamma=self.loss_opts["gamma"],
                num_inference_steps=self.loss_opts["num_inference_steps"],
                num_train_timesteps=self.scheduler.config.num_train_timesteps,
            ).to(self.device)

        # state
        self.step, self.consecutive_skips, self.skipped_total = 0, 0, 0
        # fault injection: "STEP[@RANK],..." makes that step's loss NaN (on one rank only, with @RANK)
        self.nan_steps = {
            int(s.split("@")[0])
            for s in cfg.debug_nan_steps.split(",")
            if s and ("@" not in s or int(s.split("@")[1]) == self.rank)
        }
        if cfg.resume and latest_checkpoint(self.out) is not None:
            self.load(latest_checkpoint(self.out))
        self.logger = RunLogger(self.out, self.rank, cfg.tensorboard, self.step) if not cfg.export_only else None
        if self.rank == 0 and not cfg.export_only:
            self.out.mkdir(parents=True, exist_ok=True)
            run = dict(train=dataclasses.asdict(cfg), deepspeed=self.ds_config, loss=self.loss_opts)
            (self.out / "config.json").write_text(json.dumps(run, indent=1))
            (self.out / "env.json").write_text(json.dumps(_environment(self.world), indent=1))
        reference = "none (sft)" if cfg.objective == "sft" else cfg.ref_placement
        if cfg.lora_rank:
            reference = "the policy without its adapters"
        trained = f"{self.n_trainable / 1e6:.2f}M trained" + (f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "")
        self.log(
            f"{self.kind} unet {self.n_params / 1e6:.1f}M params ({trained}) | {self.world} rank(s) x "
            f"{cfg.micro_batch_size} pairs x {cfg.grad_accum} accumulation = {self.pairs_per_step} pairs/step | "
            f"{len(self.dataset)} pairs ({len(self.dataset) / self.pairs_per_step:.1f} steps/epoch) | "
            f"steps {self.step}->{cfg.max_steps}, warm-up {cfg.warmup_steps}, lr {self.lr:.3g} | "
            f"{cfg.objective} {self.loss_opts} | {cfg.mixed_precision}, "
            f"ZeRO-{self.ds_config['zero_optimization'].get('stage', 0)}, {cfg.optimizer}, reference: {reference}"
            f"{', compiled' if cfg.compile else ''}, {cfg.attention} attention"
        )

    # ---------------------------------------------------------------- one step
    def batch(self, picks: list[tuple[int, bool]], dataset=None) -> dict:
        """The pairs ``picks`` ((index, mirrored twin)) of ``dataset`` (the training set by default), on the device."""
        from rpo_fast.cache import collate

        dataset = self.dataset if dataset is None else dataset
        items = [dataset.get(i, flip) for i, flip in picks]
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in collate(items).items()}

    def pair_seeds(self, step: int, indices: list[int], salt: int = 0) -> list[int]:
        """One seed per pair: every random draw of a pair (latent sample, noise, timestep, caption drop) comes from
        (seed, step, pair index). The step is the RNG state (exact resume), and the draws do not depend on which
        rank holds the pair (a 2-rank run and one process holding the concatenated batch see the same noise)."""
        return [hash((self.cfg.seed, salt, step, i)) % (2**63) for i in indices]

    def forward_loss(self, batch: dict, seeds: list[int], *, train: bool = True):
        """One concatenated forward per model ([winners; losers]) and the preference loss."""
        cfg, b = self.cfg, batch["latent_mean"].shape[0]
        loss_fn = self.loss_fn if train else self.eval_loss_fn
        gens = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        shape = batch["latent_mean"].shape[1:]  # (2, C, h, w)
        eps = torch.stack([torch.randn(shape, generator=g, device=self.device) for g in gens])
        noise = torch.stack([torch.randn(shape[1:], generator=g, device=self.device) for g in gens])
        if self.timestep_probs is not None:
            t = torch.cat([torch.multinomial(self.timestep_probs, 1, generator=g) for g in gens])
        else:
            T = self.scheduler.config.num_train_timesteps
            t = torch.cat([torch.randint(0, T, (1,), generator=g, device=self.device) for g in gens])
        u = torch.cat([torch.rand(1, generator=g, device=self.device) for g in gens])
        drop = u < (cfg.empty_caption_prob if train else 0.0)
        z = batch["latent_mean"] + batch["latent_std"] * eps  # (B, 2, C, h, w): a sample of each latent distribution
        z = ((z - self.shift_factor) * self.scaling_factor).transpose(0, 1).flatten(0, 1)  # (2B, C, h, w)
        ehs = torch.where(drop[:, None, None], self.empty["prompt_embeds"], batch["prompt_embeds"])
        t2, noise2 = t.repeat(2), noise.repeat(2, 1, 1, 1)  # one noise draw and timestep per pair
        noisy = self.scheduler.add_noise(z, noise2, t2)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(z, noise2, t2)
        cond = dict(encoder_hidden_states=ehs.repeat(2, 1, 1).to(self.dtype))
        if self.kind == "sdxl":
            pooled = torch.where(drop[:, None], self.empty["pooled_prompt_embeds"], batch["pooled_prompt_embeds"])
            time_ids = batch["time_ids"].transpose(0, 1).flatten(0, 1)  # (2B, 6) [winners; losers]
            cond["added_cond_kwargs"] = dict(
                text_embeds=pooled.repeat(2, 1).to(self.dtype), time_ids=time_ids.to(self.dtype)
            )
        noisy = noisy.to(self.dtype)
        if cfg.objective == "sft":  # winners only, no reference
            cond = {k: v[:b] if torch.is_tensor(v) else {kk: vv[:b] for kk, vv in v.items()} for k, v in cond.items()}
            pred = self.engine(noisy[:b], t, **cond).sample
            return loss_fn(pred, target[:b])
        ref = self.reference_forward(noisy, t2, cond)
        pred = self.engine(noisy, t2, **cond).sample
        kw = {}
        if cfg.objective == "rpo":
            from rpo_fast.embed import combine

            kw["embeds_w"] = combine(batch["clip_text"], batch["clip_image"][:, 0], cfg.embedding_mode)
            kw["embeds_l"] = combine(batch["clip_text"], batch["clip_image"][:, 1], cfg.embedding_mode)
        if cfg.objective == "dense-dpo":
            kw["timesteps"] = t
        return loss_fn(pred, target, ref, **kw)

    @torch.no_grad()
    def reference_forward(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The frozen reference: a replicated copy, a ZeRO-3 inference engine (every rank calls it together), or,
        with LoRA, the policy itself with its adapters disabled (no second copy)."""
        if self.cfg.lora_rank:
            module = self.engine.module
            module.disable_adapters()
            try:
                return module(noisy, t, **cond).sample
            finally:
                module.enable_adapters()
        return self.reference(noisy, t, **cond).sample

    def train_step(self, sums: dict) -> None:
        for _ in range(self.cfg.grad_accum):
            picks = self.sampler.next_batch(self.cfg.micro_batch_size)
            batch = self.batch(picks)
            out = self.forward_loss(batch, self.pair_seeds(self.step, [i for i, _ in picks]))
            loss = out.loss * float("nan") if self.step + 1 in self.nan_steps else out.loss
            self.engine.backward(loss)
            self.engine.step()  # an optimizer step at the accumulation boundary
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0) + (loss.detach() if k == "loss" else v)
            sums["_n"] = sums.get("_n", 0) + 1
        # DeepSpeed skips a step whose all-reduced global gradient norm is not finite, on every rank alike
        skipped = self.engine.skipped_steps - self.skipped_total
        self.skipped_total = self.engine.skipped_steps
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if self.consecutive_skips > self.cfg.max_consecutive_skips:
            raise RuntimeError(
                f"{self.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient "
                f"(last at step {self.step + 1}): stopping. Lower --lr or --beta, or check the data."
            )
        self.step += 1

    # ---------------------------------------------------------------- evaluation on fixed pairs
    def _eval_indices(self) -> list[int]:
        if not self.cfg.eval_every:
            return []
        if self.cfg.eval_data:
            self.eval_dataset = open_dataset(self.cfg, self.cfg.eval_data, self.resolution)
        else:
            self.eval_dataset = self.dataset
        n = min(self.cfg.eval_pairs, len(self.eval_dataset))
        return list(range(n))[self.rank :: self.world]

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean metrics over the fixed evaluation pairs, with fixed noise and timesteps (no caption dropping)."""
        mb, sums, count, names = self.cfg.micro_batch_size, None, 0, None
        n_total = min(self.cfg.eval_pairs, len(self.eval_dataset))
        self.engine.eval()
        for k, rep in itertools.product(
            range(math.ceil(math.ceil(n_total / self.world) / mb)), range(self.cfg.eval_repeats)
        ):
            # every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively); a rank out
            # of pairs repeats one with weight 0
            real = self.eval_set[k * mb : (k + 1) * mb]
            idx = real or self.eval_set[:1]
            batch = self.batch([(i, False) for i in idx], self.eval_dataset)
            out = self.forward_loss(batch, self.pair_seeds(0, idx, salt=1 + rep), train=False)
            names = sorted(out.metrics)
            vec = torch.stack([out.metrics[name] for name in names]) * len(real)
            sums = vec if sums is None else sums + vec
            count += len(real)
        self.engine.train()
        total = torch.cat([sums, torch.tensor([float(count)], device=sums.device)])
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
        return {f"eval/{name}": v for name, v in zip(names, (total[:-1] / total[-1]).tolist())}

    # ---------------------------------------------------------------- checkpoints and export
    def save(self) -> None:
        """DeepSpeed's checkpoint in step-N, then (all ranks done) the COMPLETE marker; old ones pruned."""
        import torch.distributed as dist

        root = self.out / "checkpoints"
        tag = f"step-{self.step}"
        state = dict(
            step=self.step,
            sampler=self.sampler.state_dict(),
            config=dataclasses.asdict(self.cfg),
            skipped_total=self.skipped_total,
            consecutive_skips=self.consecutive_skips,
            torch_rng=torch.get_rng_state(),
        )
        if self.cfg.debug_kill_in_save == self.step:
            _die_during_save(self.engine, root, tag, state)
        self.engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
        dist.barrier()
        if self.rank == 0:
            marker = root / tag / "COMPLETE"
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(dict(step=self.step, time=time.time())))
            os.replace(tmp, marker)
            steps = complete_checkpoints(self.out)
            for old in steps[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(root / f"step-{old}", ignore_errors=True)
            for p in root.glob("step-*"):  # leftovers of saves killed before completion
                if p.name[5:].isdigit() and int(p.name[5:]) < steps[-1] and not (p / "COMPLETE").exists():
                    shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    def load(self, step: int) -> None:
        _, state = self.engine.load_checkpoint(str(self.out / "checkpoints"), tag=f"step-{step}")
        if state is None:
            raise RuntimeError(f"could not load checkpoint step-{step} from {self.out / 'checkpoints'}")
        self.step = state["step"]
        self.sampler.load_state_dict(state["sampler"])
        self.skipped_total = state["skipped_total"]
        self.consecutive_skips = state["consecutive_skips"]
        torch.set_rng_state(state["torch_rng"])
        self.log(f"resumed from {self.out / 'checkpoints' / f'step-{step}'}")

    def export(self) -> Path:
        """The trained weights, gathered from the ZeRO shards: the UNet as a diffusers folder (OUTPUT/unet) or,
        with LoRA, the adapter in the format diffusers' ``load_lora_weights`` reads (OUTPUT/lora)."""
        from diffusers import UNet2DConditionModel

        if self.ds_config["zero_optimization"].get("stage", 0) == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()  # collective; the full dict on rank 0
        else:
            state = self.engine.module.state_dict() if self.rank == 0 else None
        dest = self.out / ("lora" if self.cfg.lora_rank else "unet")
        if self.rank == 0:
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(dict(self.engine.module.config))
                if self.cfg.lora_rank:
                    unet.add_adapter(self.engine.module.peft_config["default"])
            unet.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, assign=True)
            tmp = self.out / f"{dest.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            if self.cfg.lora_rank:
                from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
                from diffusers.utils import convert_state_dict_to_diffusers
                from peft.utils import get_peft_model_state_dict

                layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
                pipeline = StableDiffusionXLPipeline if self.kind == "sdxl" else StableDiffusionPipeline
                pipeline.save_lora_weights(tmp, unet_lora_layers=layers, safe_serialization=True)
            else:
                unet.save_pretrained(tmp, safe_serialization=True)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)  # a finished export replaces the previous one whole
            self.log(f"exported the trained {'LoRA adapter' if self.cfg.lora_rank else 'unet'} to {dest}")
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        return dest

    # ---------------------------------------------------------------- the loop
    def train(self) -> None:
        cfg = self.cfg
        if cfg.export_only:
            self.export()
            return
        if cfg.eval_every and self.step == 0:
            self.logger.write(0, self.evaluate())
        sums, t0, last = {}, time.perf_counter(), self.step
        bar = _progress(cfg, self.rank, self.step)
        while self.step < cfg.max_steps:
            self.train_step(sums)
            log_due = self.step % cfg.log_every == 0 or self.step == cfg.max_steps
            if log_due:  # values leave the device only here
                elapsed = time.perf_counter() - t0
                row = self._reduce(sums)
                row["train/lr"] = self.lr_scheduler.get_last_lr()[0]
                row["train/grad_norm"] = _grad_norm(self.engine)
                row["train/skipped_steps"] = self.skipped_total
                row["time/pairs_per_s"] = (self.step - last) * self.pairs_per_step / elapsed
                row["memory/peak_gb"] = _peak_memory_gb()
                if cfg.mixed_precision == "fp16":  # DeepSpeed's dynamic loss scale; its overflow steps are skipped
                    row["train/loss_scale"] = float(getattr(self.engine.optimizer, "loss_scale", float("nan")))
                self.logger.write(self.step, row)
                if bar is not None:
                    acc = row.get("reward/implicit_acc", float("nan"))
                    bar.set_postfix(
                        loss=f"{row['loss/loss']:.4f}", acc=f"{acc:.3f}", pairs_s=f"{row['time/pairs_per_s']:.2f}"
                    )
                sums, t0, last = {}, time.perf_counter(), self.step
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self.logger.write(self.step, self.evaluate())
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save()
            if self.step == cfg.debug_exit_after_step:
                os._exit(137)  # fault injection: a kill after this step (and its checkpoint, if one was due)
        if bar is not None:
            bar.close()
        if cfg.export:
            self.export()

    def _reduce(self, sums: dict) -> dict:
        n = sums.pop("_n")
        names = sorted(sums)
        vec = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=self.device) for k in names]) / n
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(vec)
            vec /= self.world
        group = lambda k: "loss" if k == "loss" or k.startswith(("mse", "ref_mse")) else "reward"  # noqa: E731
        return {f"{group(k)}/{k}": v for k, v in zip(names, vec.tolist())}

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[rpo_fast] {msg}", flush=True)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _check_fp16(cfg: TrainConfig) -> None:
    """DeepSpeed runs fp16 only where its accelerator supports it (on a CPU: mkldnn fp16 hardware). Tests set
    RPO_FAST_CPU_FP16=1 to let a CPU without it run fp16 anyway (slowly), so loss scaling is tested in CI."""
    if cfg.mixed_precision != "fp16":
        return
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.is_fp16_supported():
        return
    if os.environ.get("RPO_FAST_CPU_FP16") == "1" and acc.device_name() == "cpu":
        acc.is_fp16_supported = lambda: True
        acc.supported_dtypes = lambda: [torch.float, torch.bfloat16, torch.float16]
        return
    raise ValueError(f"--mixed-precision fp16: DeepSpeed does not support fp16 on this {acc.device_name()}; use bf16")


def free_port() -> int:
    """A free TCP port on 127.0.0.1: the rendezvous of a one-process run, or a launcher's ``--master_port``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed() -> tuple[int, int, int]:
    """deepspeed.init_distributed, also for a plain `python rpo_fast/train.py` (one rank)."""
    import deepspeed

    if "RANK" not in os.environ:
        port = free_port()
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = int(os.environ["RANK"])
    _unlink_cpu_allreduce_buffer(rank)
    return rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def _unlink_cpu_allreduce_buffer(rank: int) -> None:
    """On CPU, DeepSpeed's shared-memory all-reduce (ops/csrc/cpu/comm/shm.cpp, set up when the launcher sets
    LOCAL_SIZE) creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>, about 70 MB per rank, and
    never unlinks it: each run would leave its buffers in memory until the machine reboots. Every rank has mapped
    every other rank's buffer before init_distributed returns, so after a barrier each rank removes the name of its
    own; the mappings live on until the processes exit, and a killed run leaves nothing behind."""
    if torch.cuda.is_available():
        return
    import torch.distributed as dist

    name = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}"
    name += f"_{os.environ.get('MASTER_PORT', '')}_{rank}"

    if dist.get_world_size() > 1:
        dist.barrier()  # every rank, whether or not it has a buffer: the condition is the same on all of them
    if os.path.exists(name):
        os.unlink(name)


def _build_optimizer(cfg: TrainConfig, params, lr: float):
    """The client optimizer. Under ZeRO it steps flat fp32 partitions (bitsandbytes' per-parameter options then do
    nothing, and Adafactor sees 1-D tensors: it keeps an unfactored second moment). No paged optimizers: they use
    CUDA managed memory."""
    params = [p for p in params if p.requires_grad]
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer in ("adamw8bit", "lion8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw8bit" else bnb.optim.Lion8bit
        return cls(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":  # the DiffusionDPO recipe's SDXL optimizer, with a fixed learning rate
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)


def _set_attention(unet, attention: str) -> None:
    """SDPA (the default), or xformers' memory-efficient attention where xformers is installed."""
    if attention == "xformers":  # availability checked in validate()
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


def _reference_ds_config(policy: dict) -> dict:
    """A ZeRO-3 inference config for the frozen reference: the policy's precision and ZeRO-3 buckets, no optimizer."""
    zero = policy["zero_optimization"]
    keep = ("stage3_param_persistence_threshold", "stage3_prefetch_bucket_size", "reduce_bucket_size")
    return {
        "train_micro_batch_size_per_gpu": policy["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": 1,
        "train_batch_size": policy["train_batch_size"] // policy["gradient_accumulation_steps"],
        "bf16": {"enabled": policy["bf16"]["enabled"]},
        "fp16": {"enabled": policy["fp16"]["enabled"]},
        "zero_optimization": {"stage": 3, **{k: zero[k] for k in keep if k in zero}},
        "steps_per_print": 1_000_000_000,
    }


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _progress(cfg: TrainConfig, rank: int, start: int):
    if rank != 0 or not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.max_steps, initial=start, unit="step", desc=cfg.objective, dynamic_ncols=True)


def _environment(world: int) -> dict:
    import importlib.util

    import deepspeed
    import diffusers
    import transformers

    try:
        import kernels  # noqa: F401

        kernels_import = f"works ({importlib.util.find_spec('kernels').origin})"
    except ImportError as e:
        kernels_import = f"fails ({type(e).__name__})"
    return dict(
        world=world,
        torch=torch.__version__,
        deepspeed=deepspeed.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        cuda=torch.cuda.is_available(),
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        import_kernels=kernels_import,
        sys_path=sys.path,
    )


def _die_during_save(engine, root: Path, tag: str, state: dict) -> None:
    """Fault injection: write part of a checkpoint, then die as a kill would."""
    engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
    os._exit(137)


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # a torn last line of a killed process: dropped


class RunLogger:
    """metrics.jsonl (one JSON object per log), TensorBoard when installed, on rank 0.

    The run continues from ``start_step`` (0, or the step of the checkpoint it resumed from): rows logged after
    that step by an earlier, killed process are dropped (they are about to be redone), so the file holds each step
    once. TensorBoard's events after it are purged the same way."""

    def __init__(self, out: Path, rank: int, tensorboard: bool, start_step: int = 0):
        self.rank, self.tb = rank, None
        if rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        if path.exists():
            lines = path.read_text().splitlines() if start_step else []
            kept = [line for line in lines if _logged_step(line) <= start_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        self.file = path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step + 1 if start_step else None)
            except ImportError:
                print("[rpo_fast] tensorboard is not installed: logging to metrics.jsonl only", flush=True)

    def write(self, step: int, row: dict) -> None:
        if self.rank != 0:
            return
        self.file.write(json.dumps({"step": step, **row}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.rank == 0:
            self.file.close()
            if self.tb is not None:
                self.tb.close()


def main(argv: list[str] | None = None) -> None:
    from rpo_fast.cache import CacheError
    from rpo_fast.data import DataError

    cfg = parse_args(argv)
    try:
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError, CacheError, DataError) as e:  # bad input: a message, not a traceback
        print(f"rpo_fast/train.py: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    try:
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
