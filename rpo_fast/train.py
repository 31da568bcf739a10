"""Preference training of a diffusion model's denoiser (a UNet or a transformer, of any family in
``rpo_fast/models/``) with DeepSpeed.

    deepspeed rpo_fast/train.py --ds_config configs/zero2_8bit.json --model MODEL_DIR --data CACHE_DIR \\
        --objective rpo --output runs/rpo
    python rpo_fast/train.py ...                     (one process)

The policy trains under DeepSpeed with bitsandbytes' 8-bit AdamW as a client optimizer. The frozen reference is a bf16
copy on every rank, or its own ZeRO-3 inference engine (``--ref-placement zero3``), or with ``--lora-rank`` the policy
itself with its adapters disabled, or none: its errors read from a table computed ahead (``--ref-placement
precomputed``, ``python -m rpo_fast.reference``). Winners and losers go through each model in ONE concatenated forward.
Data comes from the cache of ``python -m rpo_fast.cache`` (or raw pairs for small runs, encoded on the fly). Checkpoints
are DeepSpeed's, in ``OUTPUT/checkpoints/step-N`` with a COMPLETE marker written last; ``--resume`` continues from the
newest complete one. The trained UNet (or LoRA adapter) is exported to ``OUTPUT/unet`` (``OUTPUT/lora``).

An online objective (``dense-reward``, ``online-dpo``, ``online-rpo``) runs ``rpo_fast.online``'s subclass of the
Trainer: ``--data`` holds prompts, and each step samples, scores and replays the policy's own trajectories.

This file is the wiring and the loop: ``Trainer.__init__`` builds data, models, engine and loss in that order;
``train`` is the loop (step, log, evaluate, checkpoint). The components: ``config`` (flags and checks),
``models`` (the model family), ``dataset``, ``engine``, ``checkpoint``, ``metrics``, ``distributed``, ``debug``.
"""

import os
import sys

# Run as a script, this file's folder (rpo_fast/) would come first on sys.path and make its subpackages
# importable as top-level modules: transformers, diffusers and bitsandbytes all try `import kernels`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _HERE]
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(_HERE))  # the checkout's rpo_fast, when run from a checkout

import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from rpo_fast import PreferenceLoss, checkpoint, distributed  # noqa: E402
from rpo_fast import engine as E  # noqa: E402
from rpo_fast.cli import run_cli  # noqa: E402
from rpo_fast.config import (  # noqa: E402
    TrainConfig,
    loss_options,
    model_family,
    parse_args,
    recompute_mode,
    validate,
)
from rpo_fast.cuda_graphs import GraphedForward  # noqa: E402
from rpo_fast.data.dataset import check_dataset, collate, open_dataset  # noqa: E402
from rpo_fast.data.loader import PairSampler, Pick, PrefetchLoader  # noqa: E402
from rpo_fast.debug import FaultInjection  # noqa: E402
from rpo_fast.draws import model_inputs, pair_seeds  # noqa: E402
from rpo_fast.fp8 import convert_fp8  # noqa: E402
from rpo_fast.logs import quiet_known_noise  # noqa: E402
from rpo_fast.metrics import (  # noqa: E402
    MetricMean,
    RunLogger,
    metric_group,
    peak_memory_gb,
    progress_bar,
    run_environment,
)
from rpo_fast.objectives import PAIRS, discounted_timestep_probs, objective  # noqa: E402
from rpo_fast.recompute import apply_recompute  # noqa: E402
from rpo_fast.reference import ReferenceTable, epochs_needed, load_reference, table_key  # noqa: E402
from rpo_fast.seeding import seed_of  # noqa: E402

LORA_INIT = -1  # the seed_of salt of the LoRA adapters' init (training pairs use 0, evaluation draws 1, 2, ...)

# DeepSpeed 0.19 calls torch.distributed collectives that torch 2.13 marks deprecated, once per step
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.family = model_family(cfg)  # from the folder's JSON configs
        self.ds_config = validate(cfg, int(os.environ.get("WORLD_SIZE", 1)), self.family)  # before anything loads
        self.rank, self.world, self.local_rank = distributed.init_distributed()
        distributed.check_shared_folder(
            cfg.output,
            "--output",
            reads="Every rank writes its part of each checkpoint there and reads all of them back at resume",
        )
        E.warn_on_zero3_alone(self.ds_config, self.world)
        E.check_fp16(cfg)
        self.spec = objective(cfg.objective)
        self.loss_opts = loss_options(cfg, self.family)
        self.device = torch.device(f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.out, self.dtype = Path(cfg.output), E.PRECISIONS[cfg.mixed_precision]

        self._data()  # the pairs (an online objective: prompts, a reward model, a replay buffer)

        # models
        policy = self._policy()
        self.n_params = sum(p.numel() for p in policy.parameters())
        self.n_trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        self.reference = self._reference(policy)
        self.graphed_reference = None
        if cfg.reference_graphs:  # captured at the first reference forward
            self.graphed_reference = GraphedForward(lambda x, t, c: self.family.predict(self.reference, x, t, c))

        # engine, loss
        self.pairs_per_step = cfg.micro_batch_size * cfg.grad_accum * self.world
        self.lr = cfg.lr * (self.pairs_per_step if cfg.scale_lr else 1)
        self.engine, self.lr_scheduler = E.build_engine(policy, cfg, self.ds_config, self.lr)
        self.loss_fn = PreferenceLoss(cfg.objective, backend=cfg.loss_backend, **self.loss_opts)
        # evaluation: each rank's own pairs (equal shapes across ranks are not guaranteed there)
        eval_opts = self.loss_opts | ({"scope": "local"} if "scope" in self.loss_opts else {})
        self.eval_loss_fn = PreferenceLoss(cfg.objective, backend=cfg.loss_backend, **eval_opts)
        self.timestep_probs = None
        if self.loss_opts.get("timestep_sampling") == "discounted":  # the loss takes no weight then
            self.timestep_probs = discounted_timestep_probs(
                gamma=self.loss_opts["gamma"],
                num_inference_steps=self.loss_opts["num_inference_steps"],
                num_train_timesteps=self.family.num_train_timesteps,
            ).to(self.device)

        # state, fault injection, resume, logging
        self.step, self.consecutive_skips, self.skipped_total = 0, 0, 0
        self.metrics = MetricMean()
        self.debug = FaultInjection(
            nan_steps=cfg.debug_nan_steps,
            exit_after_step=cfg.debug_exit_after_step,
            kill_in_save=cfg.debug_kill_in_save,
            rank=self.rank,
            dump_grads=cfg.debug_dump_grads,
        )
        self.debug.poison_loss(self.loss_fn, lambda: self.step + 1)
        if (cfg.resume or cfg.resume_or_start) and checkpoint.latest_checkpoint(self.out) is not None:
            self.load(checkpoint.latest_checkpoint(self.out))
        self.logger = RunLogger(self.out, self.rank, cfg.tensorboard, self.step) if not cfg.export_only else None
        if self.rank == 0 and not cfg.export_only:
            self.out.mkdir(parents=True, exist_ok=True)
            run = dict(train=dataclasses.asdict(cfg), deepspeed=self.ds_config, loss=self.loss_opts)
            (self.out / "config.json").write_text(json.dumps(run, indent=1))
            (self.out / "env.json").write_text(json.dumps(run_environment(self.world), indent=1))
        self.log(self._summary())

    def _data(self) -> None:
        """The training pairs (a cache or raw pairs), the evaluation pairs, the precomputed reference table and the
        loader that reads ahead."""
        cfg = self.cfg
        self.dataset = self._open(cfg.data, "--data", cfg.resolution)
        check_dataset(
            self.dataset,
            pairs_per_rank=cfg.micro_batch_size,
            world=self.world,
            needs_embeddings=self.spec.embeddings,
            objective=cfg.objective,
        )
        self.sampler = PairSampler(
            len(self.dataset), seed=cfg.seed, rank=self.rank, world=self.world, twins=self.dataset.has_twins
        )
        if cfg.eval_data:  # at the training resolution
            self.eval_dataset = self._open(cfg.eval_data, "--eval-data", self.dataset.resolution)
        else:
            self.eval_dataset = self.dataset
        n_eval = min(cfg.eval_pairs, len(self.eval_dataset)) if cfg.eval_every else 0
        self.eval_set = list(range(n_eval))[self.rank :: self.world]
        self.empty = {k: v.to(self.device) for k, v in self.dataset.empty_prompt.items()}
        self.table = None
        if cfg.ref_placement == "precomputed":  # checked against this run before any model loads
            self.table = ReferenceTable(cfg.reference_table)
            self.table.check(
                table_key(cfg, self.family, self.dataset, self.eval_dataset, self.device),
                epochs=epochs_needed(
                    cfg.max_steps, cfg.micro_batch_size * cfg.grad_accum, len(self.dataset), self.world
                ),
                evaluates=bool(cfg.eval_every),
            )
        extra = None
        if self.table is not None:  # each batch's reference errors, read and pinned by the loader with the batch
            extra = lambda picks: {"ref_errors": self.table.train_errors(picks)}  # noqa: E731
        self.loader = PrefetchLoader(
            self.dataset, self.sampler, cfg.micro_batch_size, self.device, depth=cfg.prefetch, extra=extra
        )

    def _open(self, data: str, flag: str, resolution: int | None):
        cfg = self.cfg
        read = dict(columns=cfg.columns, pairs_from_ranking=cfg.pairs_from_ranking, strict=cfg.strict)
        return open_dataset(
            data, family=self.family, resolution=resolution, embedder=cfg.clip, seed=cfg.seed, flag=flag, **read
        )

    def _reference(self, policy: torch.nn.Module):
        """The frozen reference model: a replicated bf16 copy, a ZeRO-3 inference engine, or None (LoRA: the policy
        without its adapters; a precomputed table; an objective without a reference)."""
        cfg = self.cfg
        if self.table is not None and cfg.lora_rank:
            dropout = [n for n, m in policy.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
            if dropout:
                raise ValueError(
                    f"--ref-placement precomputed with --lora-rank: the reference (the policy without its adapters) "
                    f"runs with active dropout ({dropout[0]}, p > 0), so its errors are not a function of the draws"
                )
        if self.spec.reference and not cfg.lora_rank and self.table is None:
            reference = load_reference(self.family, cfg, self.device)  # the policy's kernels: step 0 still ties
            # DeepSpeed casts the policy's parameters, not its buffers (SD3's positional embedding stays fp32): the
            # reference takes the policy's buffers, so the two still tie at step 0
            policy_buffers = dict(policy.named_buffers())
            for name, buf in reference.named_buffers():
                if buf.is_floating_point() and name in policy_buffers:
                    buf.data = policy_buffers[name].detach().clone()
            # Its parameters keep requires_grad (it only runs under no_grad, and no optimizer holds them):
            # torch.matmul picks its kernel by the weight's requires_grad (a non-contiguous 3-D input is folded
            # into one mm only when it is set), so the reference runs the policy's kernels, and at step 0 the two
            # agree to the bit (every pair a tie).
            if cfg.ref_placement == "zero3":
                return E.build_reference_engine(reference, self.ds_config)
            return reference.to(self.device)
        return None

    def _policy(self) -> torch.nn.Module:
        """The trainable denoiser (with LoRA: frozen, with peft adapters that the optimizer trains), loaded in the
        engine's dtype: DeepSpeed would cast an fp32 load to it anyway (its fp32 master copies come from the cast
        weights), so the values are the same and the load skips a full fp32 copy in host memory."""
        cfg = self.cfg
        policy = self.family.load_denoiser(cfg.unet, dtype=self.dtype)
        if self.family.repeated_blocks and not getattr(policy, "_repeated_blocks", None):
            policy._repeated_blocks = list(self.family.repeated_blocks)  # what --compile-mode regional compiles
        if cfg.compile_resnets:
            policy._repeated_blocks = [*policy._repeated_blocks, *self.family.resnet_blocks]
        self.family.set_attention(policy, cfg.attention)
        if cfg.fuse_qkv:  # before DeepSpeed sees the parameters: the replaced layers are frozen
            self.family.fuse_qkv(policy)
        if cfg.fp8:  # before the adapters: LoRA's base layers run FP8, its small adapters stay bf16
            self.n_fp8 = convert_fp8(policy, recipe=cfg.fp8_recipe, emulate=self.device.type != "cuda")
        if cfg.lora_rank:
            from peft import LoraConfig

            policy.requires_grad_(False)
            given = cfg.lora_targets.split(",") if cfg.lora_targets is not None else self.family.lora_targets
            targets = [t.strip() for t in given if t.strip()]
            lora = LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, init_lora_weights="gaussian",
                target_modules=targets,
            )  # fmt: skip
            with torch.random.fork_rng(devices=[]):  # the adapters' random init from --seed, not the process's RNG
                torch.manual_seed(seed_of(cfg.seed, LORA_INIT))
                policy.add_adapter(lora)
        apply_recompute(policy, recompute_mode(cfg))
        return policy.train()

    def _summary(self) -> str:
        cfg = self.cfg
        reference = f"none ({cfg.objective})" if not self.spec.reference else cfg.ref_placement
        if self.table is not None:
            reference = f"precomputed ({self.table.folder}, {self.table.epochs} epochs)"
        elif cfg.lora_rank:
            reference = "the policy without its adapters"
        resnets = " with the resnets" if cfg.compile_resnets else ""
        trained = f"{self.n_trainable / 1e6:.2f}M trained" + (f", LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "")
        return (
            f"{self.family.name} {self.family.denoiser_folder} {self.n_params / 1e6:.1f}M params ({trained}) | "
            f"{self.world} rank(s) x {cfg.micro_batch_size} {self.unit} x {cfg.grad_accum} accumulation = "
            f"{self.pairs_per_step} {self.unit}/step | {self.summary_data()} | steps {self.step}->{cfg.max_steps}, "
            f"warm-up {cfg.warmup_steps}, lr {self.lr:.3g} | {cfg.objective} {self.loss_opts} | "
            f"{cfg.mixed_precision}, ZeRO-{E.zero_stage(self.ds_config)}, {cfg.optimizer}, reference: {reference}"
            f"{f', compiled ({E.compile_mode(cfg)}{resnets})' if E.compile_mode(cfg) else ''}"
            f", {cfg.attention} attention, recompute {recompute_mode(cfg)}"
            f"{f', fp8 {cfg.fp8_recipe} in {self.n_fp8} linear layers' if cfg.fp8 else ''}"
            f"{' (emulated on the CPU)' if cfg.fp8 and self.device.type != 'cuda' else ''}"
            f"{', reference forward from a CUDA graph' if cfg.reference_graphs else ''}"
            f", loss backend {self.loss_fn.backend_for(self.device)}"
        )

    unit = "pairs"  # what a micro-batch counts (the online trainer: groups of K samples)

    def summary_data(self) -> str:
        n = len(self.dataset)
        return f"{n} pairs ({n / self.pairs_per_step:.1f} steps/epoch; skipped rows: {self.dataset.skipped.summary()})"

    # ---------------------------------------------------------------- one step
    def batch(self, picks: list[Pick], dataset=None) -> dict:
        """The pairs ``picks`` of ``dataset`` (the training set by default), on the device."""
        dataset = self.dataset if dataset is None else dataset
        with self.loader.lock:
            items = [dataset.get(p.index, p.flip) for p in picks]
        return self.loader.to_device(collate(items))

    def pair_seeds(self, picks: list[Pick], salt: int = 0) -> list[int]:
        """One seed per pair, from (seed, salt, epoch, pair index) (``rpo_fast.draws``): a pair falls at most once in
        an epoch, so its draws are known before the run starts, whatever the ranks, micro-batch and accumulation: a
        2-rank run and one process holding the concatenated batch see the same noise, a resumed run the same draws,
        and the reference's errors can be computed ahead (``python -m rpo_fast.reference``). Evaluation draws use
        salt 1 + repeat and epoch 0."""
        return pair_seeds(self.cfg.seed, picks, salt)

    def forward_loss(self, batch: dict, seeds: list[int], *, train: bool = True, ref_errors=None):
        """One concatenated forward per model ([winners; losers]) and the preference loss; ``ref_errors``: the
        reference's per-sample errors from a precomputed table, in place of its forward."""
        fam = self.family
        x = model_inputs(
            fam,
            batch,
            seeds,
            dtype=self.dtype,
            empty=self.empty,
            drop_prob=self.cfg.empty_caption_prob if train else 0.0,
            timestep_probs=self.timestep_probs,
            pairs=self.spec.layout is PAIRS,  # else the winners only
        )
        loss_fn = self.loss_fn if train else self.eval_loss_fn
        ref = None
        if self.spec.reference and ref_errors is None:
            ref = self.reference_forward(x.noisy, x.t_rows, x.cond)
        pred = fam.predict(self.engine, x.noisy, x.t_rows, x.cond)
        kw = {}
        if self.spec.embeddings:
            from rpo_fast.embed import combine

            kw["embeds_w"] = combine(batch["clip_text"], batch["clip_image"][:, 0], self.cfg.embedding_mode)
            kw["embeds_l"] = combine(batch["clip_text"], batch["clip_image"][:, 1], self.cfg.embedding_mode)
        if self.spec.timesteps:  # integers 0..T-1 whose k(t) is t's sampler step
            kw["timesteps"] = fam.discount_timesteps(x.t, batch["latent_mean"].shape[2:])
        if ref_errors is not None:
            kw["ref_errors"] = ref_errors
        return loss_fn(pred, x.target, ref, **kw)

    @torch.no_grad()
    def reference_forward(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The frozen reference: a replicated copy (run in inference mode: no autograd or version-counter
        bookkeeping), a ZeRO-3 inference engine (every rank calls it together; under no_grad, as its gathered
        parameters must stay ordinary tensors), or, with LoRA, the policy itself with its adapters disabled (no
        second copy)."""
        if self.cfg.lora_rank:
            module = self.engine.module
            module.disable_adapters()
            try:
                return self.family.predict(module, noisy, t, cond)
            finally:
                module.enable_adapters()
        if self.cfg.ref_placement == "replicated":
            with torch.inference_mode():
                if self.graphed_reference is not None:
                    ref = self.graphed_reference(noisy, t, cond)  # the graph's output buffer: cloned below
                else:
                    ref = self.family.predict(self.reference, noisy, t, cond)
            return ref.clone()  # an ordinary tensor again: the loss may save it for its backward
        return self.family.predict(self.reference, noisy, t, cond)

    def train_step(self) -> None:
        """One optimizer step: ``grad_accum`` micro-steps, their metrics added to ``self.metrics``."""
        for _ in range(self.cfg.grad_accum):
            picks, batch = self.loader.next()  # read ahead by the loader's thread
            out = self.forward_loss(batch, self.pair_seeds(picks), ref_errors=batch.get("ref_errors"))
            self.engine.backward(out.loss)
            self.debug.after_backward(self.engine, self.step)
            self.engine.step()  # an optimizer step at the accumulation boundary
            self.metrics.add(out.metrics)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Count the step: DeepSpeed skips a step whose all-reduced global gradient norm is not finite, on every
        rank alike; too many in a row stop the run."""
        skipped = self.engine.skipped_steps - self.skipped_total
        self.skipped_total = self.engine.skipped_steps
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if self.consecutive_skips > self.cfg.max_consecutive_skips:
            raise RuntimeError(
                f"{self.consecutive_skips} optimizer steps in a row had a non-finite loss or gradient "
                f"(last at step {self.step + 1}): stopping. Lower --lr or --beta, or check the data."
            )
        self.step += 1

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
            picks = [Pick(i, False, 0) for i in idx]
            table = self.table.eval_errors(rep, idx).to(self.device) if self.table is not None else None
            out = self.forward_loss(
                self.batch(picks, self.eval_dataset), self.pair_seeds(picks, 1 + rep), train=False, ref_errors=table
            )
            names = sorted(out.metrics)
            vec = torch.stack([out.metrics[name] for name in names]) * len(real)
            sums = vec if sums is None else sums + vec
            count += len(real)
        self.engine.train()
        total = distributed.all_reduce_sum(torch.cat([sums, torch.tensor([float(count)], device=sums.device)]))
        return {f"eval/{name}": v for name, v in zip(names, (total[:-1] / total[-1]).tolist())}

    # ---------------------------------------------------------------- checkpoints and export
    def save(self) -> None:
        state = dict(
            step=self.step,
            sampler=self.loader.state_dict() if self.loader is not None else None,  # after the last batch trained on
            config=dataclasses.asdict(self.cfg),
            skipped_total=self.skipped_total,
            consecutive_skips=self.consecutive_skips,
            torch_rng=torch.get_rng_state(),
            **self.extra_state(),
        )
        checkpoint.save(
            self.engine,
            self.out,
            self.step,
            state,
            keep=self.cfg.keep_checkpoints,
            before_save=self.debug.before_save(self.step),
        )

    def load(self, step: int) -> None:
        state = checkpoint.load(self.engine, self.out, step)
        self.step = state["step"]
        if self.loader is not None:
            self.loader.load_state_dict(state["sampler"])
        self.load_extra_state(state)
        self.skipped_total, self.consecutive_skips = state["skipped_total"], state["consecutive_skips"]
        torch.set_rng_state(state["torch_rng"])
        self.log(f"resumed from {self.out / 'checkpoints' / f'step-{step}'}")

    def extra_state(self) -> dict:
        """What a subclass adds to a checkpoint's state (the online trainer: its replay index)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore ``extra_state``."""

    def export(self) -> Path:
        zero3 = E.zero_stage(self.ds_config) == 3
        dest = checkpoint.export(self.engine, self.family, self.out, zero3=zero3, lora=bool(self.cfg.lora_rank))
        self.log(
            f"exported the trained {'LoRA adapter' if self.cfg.lora_rank else self.family.denoiser_folder} to {dest}"
        )
        return dest

    # ---------------------------------------------------------------- the loop
    def train(self) -> None:
        cfg = self.cfg
        if cfg.export_only:
            self.export()
            return
        if cfg.eval_every and self.step == 0:
            self.logger.write(0, self.evaluate())
        t0, last = time.perf_counter(), self.step
        bar = progress_bar(cfg.max_steps, self.step, cfg.objective) if self.rank == 0 and cfg.progress else None
        while self.step < cfg.max_steps:
            self.train_step()
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:  # values leave the device only here
                row = self.log_row(pairs_per_s=(self.step - last) * self.pairs_per_step / (time.perf_counter() - t0))
                if bar is not None:
                    acc = row.get("reward/implicit_acc", float("nan"))
                    bar.set_postfix(
                        loss=f"{row['loss/loss']:.4f}", acc=f"{acc:.3f}", pairs_s=f"{row['time/pairs_per_s']:.2f}"
                    )
                t0, last = time.perf_counter(), self.step
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                self.logger.write(self.step, self.evaluate())
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save()
            self.debug.after_step(self.step)
        if bar is not None:
            bar.close()
        if E.compile_mode(cfg) or self.loss_fn.backend_for(self.device) == "compile":
            from torch._dynamo.utils import counters

            self.log(f"torch.compile: {counters['stats']['unique_graphs']} graphs compiled")  # 0: it fell back
        if cfg.export:
            self.export()

    def log_row(self, *, pairs_per_s: float, extra: dict | None = None) -> dict:
        """The training row of this step (the metrics' means since the last row, and ``extra``), written to the
        logger."""
        row = {f"{metric_group(k)}/{k}": v for k, v in self.metrics.mean(self.device).items()}
        row.update(extra or {})
        row["train/lr"] = self.lr_scheduler.get_last_lr()[0]
        row["train/grad_norm"] = E.grad_norm(self.engine)
        row["train/skipped_steps"] = self.skipped_total
        row["time/pairs_per_s"] = pairs_per_s
        row["memory/peak_gb"] = peak_memory_gb()
        if self.cfg.mixed_precision == "fp16":  # DeepSpeed's dynamic loss scale; its overflow steps are skipped
            row["train/loss_scale"] = float(getattr(self.engine.optimizer, "loss_scale", float("nan")))
        self.logger.write(self.step, row)
        return row

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[rpo_fast] {msg}", flush=True)

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
        if self.logger is not None:
            self.logger.close()


def main(argv: list[str] | None = None) -> None:
    quiet_known_noise()
    cfg = parse_args(argv)
    cls = Trainer
    if objective(cfg.objective).online:  # the objective declares it: rollouts, rewards and a replay buffer
        from rpo_fast.online import make_trainer_class

        cls = make_trainer_class(Trainer)
    trainer = run_cli("rpo_fast/train.py", lambda: cls(cfg))  # bad input: one line and exit 2, no traceback
    try:
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
    distributed.finish()
