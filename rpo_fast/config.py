"""The trainer's configuration: ``TrainConfig`` is ``rpo_fast/train.py``'s command line (through ``rpo_fast.cli``),
``validate`` runs every check that needs no model, before anything is loaded, and ``loss_options`` resolves the
objective's options for the run's family.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .cli import check_choices, parse_config
from .data import COLUMNS_HELP, RANKING_HELP, RANKING_RULES, Columns
from .embed import MODES
from .engine import OPTIMIZERS, PRECISIONS, read_ds_config
from .fp8 import RECIPES as FP8_RECIPES
from .loss import BACKENDS
from .objectives import OBJECTIVE_TABLE, objective
from .recompute import RECOMPUTE


def _options(name: str, option: str) -> tuple:
    return OBJECTIVE_TABLE[name].options[option][1].choices


# --------------------------------------------------------------------------------------------------
# The trainer's configuration
# --------------------------------------------------------------------------------------------------

LOSS_FLAGS = ("beta", "tau", "weighting", "form", "lam_in", "lam_out", "gamma", "num_inference_steps")
LOSS_FLAGS += ("beta_cal", "lam_cal", "temperature", "log_ratio_clip")


def _help(text: str, **kw) -> dict:
    return dict(metadata=dict(help=text), **kw)


@dataclass
class TrainConfig:
    ds_config: str = field(
        metadata=dict(
            help="DeepSpeed JSON config: configs/single_gpu.json (one GPU), zero2_8bit.json (one node), "
            "zero3_8bit.json (the policy's states do not fit), zero1_8bit.json or zero3pp_8bit.json (many nodes)",
            flags=("--ds_config", "--ds-config"),
        )
    )
    model: str = field(
        metadata=dict(help="local diffusers model folder (its family is detected: SD1.5, SDXL, SD3/SD3.5 or FLUX.1)")
    )
    data: str = field(
        metadata=dict(
            help="a cache folder (python -m rpo_fast.cache), or raw pairs for small runs; online objectives: prompts "
            "(text, PartiPrompts TSV, HPSv2 JSON, or JSONL / CSV / parquet rows with --columns caption=NAME)"
        )
    )
    output: str = field(default="runs/rpo_fast", **_help("run folder: checkpoints, logs, the exported model"))
    unet: str | None = field(default=None, **_help("start policy and reference from this UNet folder (MODEL/unet)"))
    objective: str = field(
        default="rpo", metadata=dict(help="the preference objective", choices=lambda: tuple(OBJECTIVE_TABLE))
    )
    # loss options (those of PreferenceLoss; None: the objective's default)
    beta: float | None = field(default=None, **_help("beta (default 5000; sd3/flux: 100; dspo: by --form)"))
    tau: float | None = field(default=None, **_help("rpo: softmax temperature (default 0.5)"))
    weighting: Literal[_options("rpo", "weighting")] | None = field(
        default=None, **_help("rpo: the weight inside or outside the log-sigmoid (default inside)")
    )
    contrast_scope: Literal[_options("rpo", "scope")] = field(
        default="global", **_help("rpo: the matrix spans all ranks' pairs (global) or this rank's (local)")
    )
    embedding_mode: Literal[MODES] = field(default="multimodal", **_help("rpo: the embedding of a pair's image"))
    form: Literal[_options("dspo", "form")] | None = field(
        default=None, **_help("dspo: the SD1.5 or SDXL loss (default: the model's family)")
    )
    lam_in: float | None = field(default=None, **_help("dspo: lambda inside u (default beta / 2)"))
    lam_out: float | None = field(default=None, **_help("dspo: lambda outside (default beta)"))
    gamma: float | None = field(
        default=None, **_help("dense-dpo, online: temporal discount (default 0.9; online: steps drawn ~ gamma^k)")
    )
    num_inference_steps: int | None = field(default=None, **_help("dense-dpo: N of k(t) (default 50)"))
    beta_cal: float | None = field(default=None, **_help("cal-dpo: beta_cal (default 0.5)"))
    lam_cal: float | None = field(default=None, **_help("cal-dpo: calibration weight (default 0.5)"))
    timestep_sampling: Literal["uniform", "discounted"] = field(
        default="uniform",
        **_help("dense-dpo: t uniform and w(t) weights the logit, or t drawn ~ w(t) and no weight (the authors')"),
    )
    temperature: float | None = field(default=None, **_help("dense-reward: the logits' temperature (default 10)"))
    log_ratio_clip: float | None = field(
        default=None, **_help("online: the per-step log-ratio's clip (default 1e-4; the authors' multi-prompt: 5e-4)")
    )
    loss_backend: Literal[BACKENDS] = field(
        default="auto", **_help("auto: triton on CUDA, eager otherwise; native: the C++/CUDA op of csrc/")
    )
    # online training (dense-reward, online-dpo, online-rpo): --data holds prompts
    reward: str | None = field(
        default=None,
        **_help("online: the reward model, a scorer as evaluate's --scorer (NAME=ARG, or module.path:Factory[=ARG])"),
    )
    samples_per_prompt: int = field(default=4, **_help("online: K samples of each prompt (a group)"))
    rollout_prompts: int | None = field(
        default=None, **_help("online: prompts each rank samples per rollout (default: micro-batch x accumulation)")
    )
    rollout_every: int = field(default=1, **_help("online: optimizer steps between rollouts"))
    rollout_steps: int = field(default=50, **_help("online: sampler steps of a rollout (the authors: 50)"))
    guidance: float | None = field(
        default=None, **_help("online: classifier-free guidance of rollouts and log-ratios (default: the family's)")
    )
    eta: float = field(default=1.0, **_help("online, UNets: DDIM's eta (the authors: 1.0)"))
    noise_level: float = field(default=0.7, **_help("online, flow families: Flow-GRPO's SDE noise level"))
    steps_per_sample: int = field(
        default=3, **_help("online: sampled steps per trajectory per update (the authors: 3; multi-prompt: 1)")
    )
    replay_size: int = field(default=64, **_help("online: prompts (groups of K) kept in the replay buffer, the newest"))
    replay_sampling: Literal["uniform", "newest"] = field(
        default="uniform", **_help("online: a micro-step's groups drawn uniformly from the buffer, or the newest")
    )
    # schedule
    max_steps: int = field(default=2000, **_help("optimizer steps (the DPO recipe: 2000)"))
    micro_batch_size: int = field(default=1, **_help("pairs per rank per micro-step (online: groups of K samples)"))
    grad_accum: int = field(default=1, **_help("micro-steps per optimizer step"))
    lr: float = field(default=2.048e-5, **_help("learning rate (the recipe's 1e-8 x 2048 pairs)"))
    scale_lr: bool = field(default=False, **_help("multiply --lr by the pairs per optimizer step"))
    warmup_steps: int = field(
        default=0, **_help("linear warm-up from 0, diffusers' constant_with_warmup (recipe: 500 SD1.5, 200 SDXL)")
    )
    optimizer: Literal[OPTIMIZERS] = field(
        default="adamw8bit", **_help("adamw8bit, lion8bit (bitsandbytes), adamw (torch), adafactor (transformers)")
    )
    weight_decay: float = field(default=1e-2, **_help("weight decay"))
    adam_beta1: float = field(default=0.9, **_help("AdamW beta1"))
    adam_beta2: float = field(default=0.999, **_help("AdamW beta2"))
    seed: int = field(default=0, **_help("seed of data order, noise, timesteps, caption dropping"))
    empty_caption_prob: float = field(default=0.2, **_help("probability a pair's caption is dropped"))
    resolution: int | None = field(default=None, **_help("pixels (default: the cache's; raw data: required)"))
    clip: str | None = field(default=None, **_help("raw data + rpo: the embedder (as python -m rpo_fast.cache's)"))
    columns: str | None = field(default=None, **_help("raw data: " + COLUMNS_HELP))
    pairs_from_ranking: Literal[RANKING_RULES] = field(default="all", **_help("raw data: " + RANKING_HELP))
    strict: bool = field(default=False, **_help("raw data: a bad row is an error instead of skipped and counted"))
    prefetch: int = field(default=2, **_help("micro-batches read ahead by a background thread (0: on the main thread)"))
    # model and precision
    recompute: Literal[RECOMPUTE] = field(
        default="none",
        **_help(
            "activation recompute of the policy: selective keeps the matmul/conv/attention outputs and recomputes "
            "norms, activations and adds (SDXL: a third less activation memory, no extra matmul FLOPs); full "
            "recomputes every block (a tenth of the memory, a quarter more FLOPs)"
        ),
    )
    gradient_checkpointing: bool = field(default=False, **_help("the same as --recompute full"))
    mixed_precision: Literal[tuple(PRECISIONS)] = field(default="bf16", **_help("the engine's precision"))
    ref_placement: Literal["replicated", "zero3", "precomputed"] = field(
        default="replicated",
        **_help(
            "a bf16 copy of the reference per rank, sharded in its own ZeRO-3 engine, or none: its errors read from "
            "--reference-table (python -m rpo_fast.reference)"
        ),
    )
    reference_table: str | None = field(
        default=None, **_help("with --ref-placement precomputed: the table of python -m rpo_fast.reference")
    )
    lora_rank: int = field(default=0, **_help("LoRA rank (0: train the whole denoiser); reference = no adapters"))
    lora_alpha: float | None = field(default=None, **_help("LoRA alpha (default: the rank)"))
    lora_targets: str | None = field(
        default=None,
        **_help(
            "module names that get adapters, comma-separated (default: the family's; most: to_q,to_k,to_v,to_out.0)"
        ),
    )
    compile: bool = field(default=False, **_help("torch.compile the denoiser's forward (--compile-mode whole)"))
    compile_mode: Literal["whole", "regional"] | None = field(
        default=None,
        **_help(
            "whole: the denoiser's forward through DeepSpeed's engine.compile; regional: diffusers' "
            "compile_repeated_blocks, each BasicTransformerBlock compiled alone for the run's fixed shapes (one static "
            "graph per block shape, reused by every block of it; resnets stay eager), before DeepSpeed wraps the "
            "model (implies --compile)"
        ),
    )
    compile_resnets: bool = field(
        default=False,
        **_help(
            "with --compile-mode regional, also compile each ResnetBlock2D (UNets; one graph per channel and "
            "resolution shape, where inductor can also pick channels-last convolutions)"
        ),
    )
    compile_backend: str = field(default="inductor", **_help("torch.compile backend (inductor, aot_eager)"))
    attention: Literal["sdpa", "xformers"] = field(default="sdpa", **_help("xformers: when installed"))
    fuse_qkv: bool = field(
        default=False,
        **_help(
            "fuse each attention's q/k/v projections into one matmul (diffusers' fuse_qkv_projections) in policy "
            "and reference; the export splits them back"
        ),
    )
    fp8: bool = field(
        default=False,
        **_help(
            "FP8 matmuls in the linear layers of policy and reference (torchao's float8 training; GPUs of compute "
            "capability 8.9+; emulated on a CPU); best with --compile-mode regional or whole"
        ),
    )
    fp8_recipe: Literal[FP8_RECIPES] = field(
        default="tensorwise", **_help("--fp8 scaling: one scale per tensor (fastest) or per row (closer to bf16)")
    )
    reference_graphs: bool = field(
        default=False,
        **_help(
            "replay the replicated reference's forward from a CUDA graph captured at the training shape (one host "
            "launch per reference forward; other shapes run eagerly); CUDA only"
        ),
    )
    # checkpoints, logging, evaluation
    resume: bool = field(default=False, **_help("continue from the newest complete checkpoint (refused where none is)"))
    resume_or_start: bool = field(
        default=False,
        metadata=dict(
            help="continue from the newest complete checkpoint if there is one, else start a new run (for job "
            "scripts that are requeued)",
            switch=True,
        ),
    )
    checkpoint_every: int = field(default=500, **_help("steps between checkpoints (and at the end)"))
    keep_checkpoints: int = field(default=3, **_help("complete checkpoints kept (the newest)"))
    log_every: int = field(default=10, **_help("steps between log lines"))
    eval_every: int = field(default=0, **_help("steps between evaluations on fixed pairs (0: never)"))
    eval_pairs: int = field(default=64, **_help("pairs of the fixed evaluation set"))
    eval_data: str | None = field(default=None, **_help("evaluation pairs (default: the first of --data)"))
    eval_repeats: int = field(default=1, **_help("fixed noise/timestep draws per evaluation pair"))
    max_consecutive_skips: int = field(default=20, **_help("non-finite steps in a row before stopping"))
    export_only: bool = field(default=False, **_help("load the newest checkpoint, export, exit"))
    export: bool = field(
        default=True, **_help("export the trained model to OUTPUT/unet or OUTPUT/transformer (OUTPUT/lora) at the end")
    )
    tensorboard: bool = field(default=True, **_help("also log to OUTPUT/tb (if tensorboard is installed)"))
    progress: bool = field(default=True, **_help("progress bar on rank 0"))
    # fault injection for tests (rpo_fast.debug; not shown in --help)
    debug_nan_steps: str = field(default="", **_help(argparse.SUPPRESS))
    debug_exit_after_step: int = field(default=0, **_help(argparse.SUPPRESS))
    debug_kill_in_save: int = field(default=0, **_help(argparse.SUPPRESS))
    debug_dump_grads: str = field(default="", **_help(argparse.SUPPRESS))
    local_rank: int = field(default=-1, metadata=dict(help=argparse.SUPPRESS, flags=("--local_rank", "--local-rank")))


EXAMPLE = """example (one node, 8 GPUs; the cache from python -m rpo_fast.cache):
  deepspeed --num_gpus 8 rpo_fast/train.py --ds_config configs/zero2_8bit.json \\
      --model MODELS/stable-diffusion-xl-base-1.0 --data CACHE --objective rpo --output runs/rpo \\
      --micro-batch-size 1 --grad-accum 128"""


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return parse_config(
        TrainConfig,
        argv,
        prog="rpo_fast/train.py",
        description="Preference training of a diffusion model's denoiser with DeepSpeed.",
        epilog=EXAMPLE,
    )


def loss_options(cfg: TrainConfig, family) -> dict:
    """The PreferenceLoss options of this run: those given and taken by the objective, resolved (DSPO's form
    defaults to the model family's)."""
    spec = objective(cfg.objective)
    given = {k: getattr(cfg, k) for k in LOSS_FLAGS if getattr(cfg, k) is not None}
    if spec.online:
        given.pop("gamma", None)  # the trainer's: it draws the sampled steps ~ gamma^k
    extra = sorted(k for k in given if k not in spec.options)
    if extra:
        raise ValueError(f"--{extra[0].replace('_', '-')} does not apply to --objective {cfg.objective}")
    if "form" in spec.options and "form" not in given:
        if family.dspo_form is None:
            raise ValueError(f"--objective {cfg.objective} does not apply to {family.name} models")
        given["form"] = family.dspo_form
    if "scope" in spec.options:
        given["scope"] = cfg.contrast_scope
    if "timestep_sampling" in spec.options:  # t drawn ~ w(t): the loss then carries no weight (one discount)
        given["timestep_sampling"] = cfg.timestep_sampling
    if (
        "beta" in spec.options
        and "beta" not in given
        and family.default_beta is not None
        and "form" not in spec.options
        and not spec.online
    ):
        given["beta"] = family.default_beta
    return spec.resolve(given)


def recompute_mode(cfg: TrainConfig) -> str:
    """--recompute, with --gradient-checkpointing as the alias of full."""
    if cfg.gradient_checkpointing and cfg.recompute not in ("none", "full"):
        raise ValueError(f"--gradient-checkpointing is --recompute full; it conflicts with --recompute {cfg.recompute}")
    return "full" if cfg.gradient_checkpointing else cfg.recompute


def model_family(cfg: TrainConfig):
    """The family of ``--model`` (read from its JSON configs; nothing is loaded), or an error naming the folder."""
    from .models import load_family

    if not Path(cfg.model).is_dir():
        raise FileNotFoundError(f"--model {cfg.model} is not a folder")
    family = load_family(cfg.model)
    if not (Path(cfg.model) / family.denoiser_folder / "config.json").exists():
        raise FileNotFoundError(f"--model {cfg.model} has no {family.denoiser_folder}/ (config.json missing)")
    return family


ONLINE_FLAGS = ("reward", "samples_per_prompt", "rollout_prompts", "rollout_every", "rollout_steps", "guidance", "eta")
ONLINE_FLAGS += ("noise_level", "steps_per_sample", "replay_size", "replay_sampling")  # off their defaults: online only


def check_online(cfg: TrainConfig, family) -> None:
    """The online trainer's checks (``rpo_fast.online``), before anything loads: the prompts read, a reward named,
    counts and the sampler's noise in range, and what online runs do not do refused."""
    from .online import read_prompt_file

    if cfg.reward is None:
        raise ValueError(f"--objective {cfg.objective} trains online: name the reward model with --reward (a scorer)")
    read_prompt_file(cfg.data, cfg.columns)
    for name in ("samples_per_prompt", "rollout_steps"):
        if getattr(cfg, name) < 2:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 2, got {getattr(cfg, name)}")
    for name in ("rollout_every", "steps_per_sample", "replay_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.rollout_prompts is not None and cfg.rollout_prompts < 1:
        raise ValueError(f"--rollout-prompts must be at least 1, got {cfg.rollout_prompts}")
    if not family.flow_matching and not cfg.eta > 0:
        raise ValueError(f"--eta must be positive (eta = 0 is deterministic DDIM: no log-probability), got {cfg.eta}")
    if family.flow_matching and not cfg.noise_level > 0:
        raise ValueError(f"--noise-level must be positive, got {cfg.noise_level}")
    if cfg.gamma is not None and not 0 < cfg.gamma <= 1:
        raise ValueError(f"--gamma must be in (0, 1], got {cfg.gamma}")
    if cfg.ref_placement == "precomputed":
        raise ValueError("--ref-placement precomputed: an online run's reference sees states no table can hold")
    if cfg.eval_every:
        raise ValueError(
            "--eval-every: online runs log the rewards of every rollout (rollout/reward_*); evaluate the export "
            "with python -m rpo_fast.evaluate"
        )
    if cfg.reference_graphs:
        raise ValueError("--reference-graphs: online runs do not capture the reference's forward")
    if cfg.objective == "online-rpo" and cfg.clip is None:
        raise ValueError("--objective online-rpo weighs prompts by their images' similarity: pass --clip EMBEDDER")
    if family.no_rollouts:
        raise ValueError(f"--objective {cfg.objective} trains online: {family.name} models {family.no_rollouts}")


def validate(cfg: TrainConfig, world: int = 1, family=None) -> dict:
    """Every check that needs no model: a clear error before anything is loaded. Returns the DeepSpeed config.
    ``family``: the run's ``model_family(cfg)`` where the caller has it."""
    from .checkpoint import latest_checkpoint
    from .data.dataset import is_cache

    family = family or model_family(cfg)
    if cfg.unet is not None and not (Path(cfg.unet) / "config.json").exists():
        raise FileNotFoundError(f"--unet {cfg.unet} is not a UNet folder (config.json missing)")
    if not Path(cfg.data).exists():
        raise FileNotFoundError(f"--data {cfg.data} does not exist")
    if objective(cfg.objective).online:
        check_online(cfg, family)
    else:
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        given = [f for f in ONLINE_FLAGS if getattr(cfg, f) != defaults[f]]
        if given:
            raise ValueError(
                f"--{given[0].replace('_', '-')} applies to the online objectives "
                f"({', '.join(k for k, o in OBJECTIVE_TABLE.items() if o.online)}), not --objective {cfg.objective}"
            )
        if cfg.columns:
            Columns.parse(cfg.columns)  # a bad mapping is an error here, before anything loads
    loss_options(cfg, family)
    check_choices(cfg)
    recompute_mode(cfg)
    if cfg.attention == "xformers":
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ValueError("--attention xformers: xformers is not installed (pip install 'rpo_fast[xformers]')")
    if cfg.fuse_qkv and cfg.lora_rank:
        raise ValueError("--fuse-qkv with --lora-rank: the adapters sit on to_q/to_k/to_v, which --fuse-qkv replaces")
    if cfg.fuse_qkv and cfg.attention == "xformers":
        raise ValueError("--fuse-qkv runs diffusers' fused SDPA processor: drop --attention xformers")
    if cfg.fp8:
        from .fp8 import check_fp8

        check_fp8()
    if cfg.compile_resnets and cfg.compile_mode != "regional":
        raise ValueError("--compile-resnets adds the resnets to regional compile: pass --compile-mode regional")
    if cfg.compile_resnets and not family.resnet_blocks:
        raise ValueError(f"--compile-resnets: {family.name} models have no resnet blocks")
    from .cuda_graphs import check_reference_graphs

    if cfg.reference_graphs and not family.fixed_shapes:
        raise ValueError(f"--reference-graphs: {family.name} models take each caption at its own length (shapes vary)")
    check_reference_graphs(cfg, objective(cfg.objective).reference)
    if cfg.lora_rank < 0:
        raise ValueError(f"--lora-rank must be 0 (off) or positive, got {cfg.lora_rank}")
    if cfg.lora_rank and cfg.ref_placement == "zero3":
        raise ValueError("--lora-rank: the reference is the policy without its adapters; drop --ref-placement")
    if (cfg.ref_placement == "precomputed") != (cfg.reference_table is not None):
        raise ValueError("--ref-placement precomputed and --reference-table TABLE_DIR go together")
    if cfg.ref_placement == "precomputed":
        spec = objective(cfg.objective)
        if not spec.reference:
            raise ValueError(f"--objective {cfg.objective} uses no reference: drop --ref-placement precomputed")
        if spec.score_terms:
            raise ValueError(
                f"--objective {cfg.objective} reads the reference's prediction itself, not only its errors: "
                "a precomputed table cannot serve it (use --ref-placement replicated or zero3)"
            )
        if not (Path(cfg.data) / "index.json").exists():
            raise ValueError(
                "--ref-placement precomputed needs a cache as --data (python -m rpo_fast.cache): raw data has no "
                "cache to key the table to"
            )
    timed = [k for k, o in OBJECTIVE_TABLE.items() if o.timesteps]
    if cfg.timestep_sampling == "discounted" and cfg.objective not in timed:
        raise ValueError(f"--timestep-sampling discounted applies to --objective {', '.join(timed)}")
    at_least_one = ("max_steps", "micro_batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints")
    if cfg.prefetch < 0:
        raise ValueError(f"--prefetch must be 0 (off) or more, got {cfg.prefetch}")
    for name in (*at_least_one, "log_every", "eval_repeats"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.empty_caption_prob <= 1:
        raise ValueError(f"--empty-caption-prob must be in [0, 1], got {cfg.empty_caption_prob}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"--lr must be positive, got {cfg.lr}")
    if not objective(cfg.objective).online and cfg.resolution is None and not is_cache(cfg.data):
        raise ValueError(f"raw --data {cfg.data} needs --resolution (a cache records its own)")
    if cfg.resolution is not None and cfg.resolution % 8:
        raise ValueError(f"--resolution {cfg.resolution} must be a multiple of 8")
    ds_config = read_ds_config(cfg, world)
    if recompute_mode(cfg) == "selective" and ds_config["zero_optimization"].get("stage", 0) == 3:
        raise ValueError(
            "--recompute selective does not work under ZeRO-3: DeepSpeed's ZeRO-3 linear adds the bias in place to "
            "the matmul output that selective recompute keeps, so the bias would count twice; use --recompute full, "
            "or ZeRO-2 (configs/zero2_8bit.json) with selective"
        )
    out = Path(cfg.output)
    if not (cfg.resume or cfg.resume_or_start) and latest_checkpoint(out) is not None:
        raise ValueError(
            f"--output {out} already holds checkpoints: pass --resume to continue, or use another --output"
        )
    if cfg.resume and not (cfg.resume_or_start or cfg.export_only) and latest_checkpoint(out) is None:
        raise ValueError(
            f"--resume: no complete checkpoint in {out / 'checkpoints'} to continue from (drop --resume to start a new "
            "run there, or pass --resume-or-start to do either)"
        )
    if cfg.export_only and latest_checkpoint(out) is None:
        raise ValueError(f"--export-only: no complete checkpoint in {out / 'checkpoints'}")
    return ds_config
