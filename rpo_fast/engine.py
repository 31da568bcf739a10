"""The DeepSpeed side of training: the JSON config filled from the flags, the client optimizer, the learning-rate
schedule, and the engines of the policy and of a ZeRO-3-sharded reference.

    ds = read_ds_config(cfg, world)                   # 'auto' filled, what the trainer provides refused
    engine, schedule = build_engine(policy, cfg, ds, lr)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}
OPTIMIZERS = ("adamw8bit", "lion8bit", "adamw", "adafactor")  # bitsandbytes 8-bit, torch, transformers
EIGHT_BIT = ("adamw8bit", "lion8bit")
SUB_GROUP_LIMIT = 2**31  # bitsandbytes kernels take an int n: a larger ZeRO sub-group is an invalid launch
# The most elements of one parameter group: ZeRO-1/2 (and BF16_Optimizer) hand the optimizer one flat partition per
# group and rank, and bitsandbytes' CUDA kernels take its element count as an int32 (ct.c_int32(g.numel())). 2^31 - 1
# less a margin for DeepSpeed's alignment padding; a test lowers it to check the split on a tiny run.
GROUP_ELEMENTS = 2**31 - 1 - 2**16
BUCKET_KEYS = (
    "reduce_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "allgather_bucket_size",
    "sub_group_size",
)


def read_ds_config(cfg, world: int) -> dict:
    """The DeepSpeed config of ``cfg.ds_config`` with 'auto' filled from the flags; refuses what the trainer
    provides itself (optimizer, scheduler) and what cannot work (bucket sizes 'auto', huge sub-groups,
    bitsandbytes with an offloaded optimizer)."""
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
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.mixed_precision == "bf16"}
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": cfg.mixed_precision == "fp16"}
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    for key in BUCKET_KEYS:
        if zero.get(key) == "auto":
            raise ValueError(
                f"--ds_config zero_optimization.{key} is 'auto': give an integer (the UNet has no hidden_size)"
            )
    if zero.get("zero_hpz_partition_size") == "auto":  # ZeRO++'s secondary partition: one node's ranks
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
        zero["zero_hpz_partition_size"] = per_node
    hpz = int(zero.get("zero_hpz_partition_size", 1))
    if hpz < 1 or world % hpz:
        raise ValueError(f"zero_optimization.zero_hpz_partition_size {hpz} must divide the {world} rank(s)")
    if zero.get("stage", 0) == 3:
        zero.setdefault("sub_group_size", 100_000_000)
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    if int(zero.get("sub_group_size", 0)) >= SUB_GROUP_LIMIT:
        raise ValueError(
            f"zero_optimization.sub_group_size {zero['sub_group_size']} must stay under 2^31 (bitsandbytes)"
        )
    if cfg.optimizer in EIGHT_BIT and zero.get("offload_optimizer"):
        raise ValueError(
            "a bitsandbytes optimizer cannot step offloaded states: drop offload_optimizer or use --optimizer adamw"
        )
    check_grad_accumulation(ds, cfg)
    ds.setdefault("timers", {"throughput": {"enabled": False}})  # else it synchronizes twice per micro-step
    ds["zero_allow_untested_optimizer"] = True
    return ds


# The relative error of a bf16 sum of micro-step gradients against their fp32 sum (tiny MLP, CPU, DeepSpeed 0.19.8:
# benchmarks/results/one_gpu_step_cpu.md)
BF16_ACCUMULATION_ERROR = {4: 0.0023, 64: 0.0075, 256: 0.02}


def check_grad_accumulation(ds: dict, cfg) -> None:
    """Gradients accumulate in fp32 in 16-bit training: ``data_types.grad_accum_dtype`` is filled with fp32 where a
    config leaves it out (ZeRO-1 then runs DeepSpeed's BF16_Optimizer, ZeRO-2/3 an fp32 accumulation buffer). Stage
    0 can only add each micro-step into the 16-bit ``param.grad``: refused with --grad-accum > 1; an explicit 16-bit
    accumulation dtype is warned about with the measured error."""
    if cfg.mixed_precision == "no":
        return
    dtype = ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    if cfg.grad_accum == 1:
        return
    if zero_stage(ds) == 0:
        raise ValueError(
            f"--ds_config {cfg.ds_config}: ZeRO stage 0 accumulates the {cfg.grad_accum} micro-steps' gradients in "
            f"{cfg.mixed_precision} (DeepSpeed refuses fp32 accumulation there); use {CONFIG_FOR_SCALE['one GPU']} "
            "(ZeRO-2 on one rank, fp32 accumulation) or --grad-accum 1"
        )
    if dtype not in ("fp32", "float32", "float"):
        import warnings

        figures = ", ".join(f"{100 * e:.2g}% at {n}" for n, e in BF16_ACCUMULATION_ERROR.items())
        warnings.warn(
            f"--ds_config data_types.grad_accum_dtype is {dtype}: the {cfg.grad_accum} micro-steps' gradients add up "
            f"in 16 bits (relative error against the fp32 sum, measured: {figures} micro-steps); fp32 avoids it",
            stacklevel=3,
        )


def zero_stage(ds: dict) -> int:
    return ds["zero_optimization"].get("stage", 0)


# Which config for which scale (docs/guides/deepspeed.md says the same):
CONFIG_FOR_SCALE = {
    "one GPU": "configs/single_gpu.json",  # ZeRO-2 on one rank: fp32 accumulation, flat partitions, no hooks
    "one node": "configs/zero2_8bit.json",  # gradients and optimizer states sharded, parameters replicated
    "policy states do not fit": "configs/zero3_8bit.json",  # parameters sharded too: hooks and gathers per module
}


class ZeroOneRankWarning(UserWarning):
    """ZeRO-3 in a run of one rank: nothing is sharded, and every module call pays a hook and a gather."""


def warn_on_zero3_alone(ds: dict, world: int) -> None:
    if zero_stage(ds) == 3 and world == 1:
        import warnings

        warnings.warn(
            f"stage 3 on one GPU only adds cost; use {CONFIG_FOR_SCALE['one GPU']} (ZeRO-3 shards nothing on one "
            "rank, and still hooks every module call to fetch and release its parameters)",
            ZeroOneRankWarning,
            stacklevel=3,
        )


def reference_ds_config(policy: dict) -> dict:
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


def _groups(numels: list[int], limit: int) -> list[list[int]]:
    """Indices of ``numels`` in consecutive groups of at most ``limit`` elements each."""
    groups, size = [[]], 0
    for i, n in enumerate(numels):
        if n > limit:
            raise ValueError(f"a parameter of {n:,} elements is more than an optimizer kernel takes ({limit:,})")
        if size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return [g for g in groups if g]


def parameter_groups(params, limit: int | None = None) -> list[dict]:
    """The trainable parameters in order, in consecutive groups of at most ``limit`` (``GROUP_ELEMENTS``) elements
    each: under ZeRO-1/2 no flat partition handed to an optimizer kernel can pass the int32 range, whatever the
    rank count."""
    params = [p for p in params if p.requires_grad]
    groups = _groups([p.numel() for p in params], GROUP_ELEMENTS if limit is None else limit)
    return [{"params": [params[i] for i in g]} for g in groups]


def largest_optimizer_call(numels: list[int], ds: dict, world: int, limit: int | None = None) -> int:
    """The most elements one optimizer kernel receives per rank under ``ds`` (arithmetic, DeepSpeed 0.19's rules) for
    parameters of ``numels`` elements grouped by ``parameter_groups``: stage 0 steps each parameter; ZeRO-1/2 one flat
    partition per group and rank (the group padded to a multiple of 2 x world); ZeRO-3 one per sub-group (each
    parameter's partition ceil(n / world), a sub-group closed once it reaches sub_group_size)."""
    import math

    stage = zero_stage(ds)
    if stage == 0:
        return max(numels)
    if stage in (1, 2):
        groups = _groups(numels, GROUP_ELEMENTS if limit is None else limit)
        return max(math.ceil(sum(numels[i] for i in g) / (2 * world)) * 2 for g in groups)
    sub = int(ds["zero_optimization"].get("sub_group_size", 1_000_000_000_000))
    largest, size = 0, 0
    for n in numels:
        size += math.ceil(n / world)
        if size >= sub:
            largest, size = max(largest, size), 0
    return max(largest, size)


def build_optimizer(cfg, params, lr: float):
    """The client optimizer over ``parameter_groups``. Under ZeRO it steps flat fp32 partitions (bitsandbytes'
    per-parameter options then do nothing, and Adafactor sees 1-D tensors: it keeps an unfactored second moment). No
    paged optimizers: they use CUDA managed memory."""
    params = parameter_groups(params)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer in EIGHT_BIT:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw8bit" else bnb.optim.Lion8bit
        return cls(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":  # the DiffusionDPO recipe's SDXL optimizer, with a fixed learning rate
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=cfg.weight_decay)


def lr_schedule(optimizer, warmup_steps: int):
    """diffusers' ``get_constant_schedule_with_warmup`` (the DPO recipe's "constant_with_warmup"): the learning
    rate is lr * s / warmup at optimizer step s < warmup (0 at the first step), then lr."""
    from diffusers.optimization import get_constant_schedule_with_warmup

    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps)


def compile_mode(cfg) -> str | None:
    """--compile-mode, with --compile meaning whole; None: eager."""
    return cfg.compile_mode or ("whole" if cfg.compile else None)


def build_engine(policy: torch.nn.Module, cfg, ds_config: dict, lr: float):
    """The policy's DeepSpeed engine with the client optimizer and schedule: (engine, lr scheduler)."""
    import deepspeed

    if compile_mode(cfg) == "regional":  # each repeated block compiled in place, before DeepSpeed's hooks
        import torch._dynamo as dynamo  # here, not at start-up: imported only where compile is used

        # static graphs (a run's shapes are fixed, so every kernel is specialised): one per block shape and grad
        # mode, an evaluation's short last batch adding its own, the resnets a dozen more. Past Dynamo's recompile
        # limit (8 per block class) the rest would silently run eagerly.
        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64 if cfg.compile_resnets else 16)
        policy.compile_repeated_blocks(backend=cfg.compile_backend, dynamic=False)
    optimizer = build_optimizer(cfg, policy.parameters(), lr)  # the trainable ones (LoRA: the adapters)
    engine, _, _, schedule = deepspeed.initialize(
        model=policy, optimizer=optimizer, lr_scheduler=lr_schedule(optimizer, cfg.warmup_steps), config=ds_config
    )
    if compile_mode(cfg) == "whole":  # torch.compile of the UNet forward, through DeepSpeed (ZeRO-3 aware)
        engine.compile(backend=cfg.compile_backend)
    return engine, schedule


def build_reference_engine(reference: torch.nn.Module, ds_config: dict):
    """The frozen reference sharded like the policy: its own ZeRO-3 inference engine (TRL's pattern); every rank
    calls it together."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=reference, config=reference_ds_config(ds_config))
    engine.eval()  # DeepSpeedEngine.eval returns None
    return engine


def check_fp16(cfg) -> None:
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


def grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")
