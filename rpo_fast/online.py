"""Online preference training: the policy samples, a reward model ranks, the objective learns from the ranking.

    deepspeed rpo_fast/train.py --ds_config configs/zero2_8bit.json --model MODEL_DIR --data prompts.txt \\
        --objective dense-reward --reward imagereward=ImageReward.pt --output runs/dense

An online objective (``dense-reward``, ``online-dpo``, ``online-rpo``: the table's ``online``) makes
``rpo_fast/train.py`` run this trainer; ``--data`` then holds prompts. Every ``--rollout-every`` optimizer steps,
each rank samples K = ``--samples-per-prompt`` trajectories of each of its ``--rollout-prompts`` prompts with the
current policy (``rollout.sample_trajectories``: DDIM with ``--eta`` for the UNets, Flow-GRPO's SDE step for the
flow families, classifier-free guidance ``--guidance``), decodes and scores them (``--reward``, any scorer of
``python -m rpo_fast.evaluate``) and appends them to its replay buffer. Each micro-step then draws
``--micro-batch-size`` groups from the buffer and ``--steps-per-sample`` step indices k ~ gamma^k (shared by the
micro-batch, as the authors'), runs policy and reference on the S G K recorded states (guided, one forward each)
and trains the objective on the log-ratios -c delta (``rollout``).

The replay buffer (``ReplayBuffer``) lives in append-only shards ``OUTPUT/replay/rank-R/rollout-N.pt`` beside the
checkpoints; each checkpoint holds only its index into them (which groups of which rollouts are in the buffer).
Everything random is a pure function of (--seed, step, rank): the prompts of a rollout, its noise, the groups and
steps a micro-step draws. A killed run resumes to the bit.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from . import distributed
from .metrics import MetricMean
from .rollout import (
    cat_conditioning,
    index_conditioning,
    rollout_seeds,
    sample_trajectories,
    step_targets,
    transitions,
)
from .seeding import seed_of

PROMPT_STREAM, REPLAY_STREAM, STEP_STREAM = 0x50524F4D, 0x5245504C, 0x53544550  # "PROM", "REPL", "STEP"
TEXT_SUFFIXES = (".txt", ".tsv")


def read_prompt_file(path: str | Path, columns: str | None = None) -> list[str]:
    """The prompts of ``path``, duplicates dropped in order: a text file (one per line), PartiPrompts TSV, an HPSv2
    JSON list, or rows of JSONL / CSV / JSON / parquet / arrow (the training readers' formats) whose caption column
    is ``caption`` or ``--columns caption=NAME``."""
    from .data.readers import DataError, open_source
    from .evaluate.sampling import read_prompts

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist")
    column = "caption"
    if columns:
        roles = dict(part.split("=", 1) for part in columns.split(",") if "=" in part)
        if set(roles) != {"caption"} or not roles["caption"].strip():
            raise DataError(f"--columns {columns}: online objectives read prompts only; give caption=NAME")
        column = roles["caption"].strip()
    if path.suffix.lower() in TEXT_SUFFIXES or _is_prompt_list(path):
        prompts = read_prompts(path)
    else:
        src = open_source(path)
        names = src.columns_of(0)
        if column not in names:
            raise DataError(
                f"{path}: no {column!r} column (its columns: {', '.join(names)}); pass --columns caption=NAME"
            )
        prompts = [str(row[column]) for f in range(len(src.files)) for _, row in src.rows(f, 0, [column])]
    prompts = list(dict.fromkeys(p for p in prompts if p and p.strip()))
    if not prompts:
        raise ValueError(f"--data {path}: no prompts")
    return prompts


def _is_prompt_list(path: Path) -> bool:
    """An HPSv2 prompt file: a JSON list of strings, or a dict of such lists."""
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    values = [p for v in data.values() for p in v] if isinstance(data, dict) else data
    return isinstance(values, list) and all(isinstance(p, str) for p in values)


class ReplayBuffer:
    """A rank's rollouts: append-only shards ``rollout-N.pt`` (each: ``latents`` (P, K, N + 1, C, h, w) fp32,
    ``rewards`` (P, K), the prompts' ``captions`` tensors (P rows), ``seeds`` (P, K), ``prompts`` (P,) their positions
    in the run's prompt order, ``embeds`` (P, K, D) or absent) and an index of
    the (rollout, group) entries in the buffer: the newest ``size`` groups. ``state_dict`` is the index; the shards
    stay on disk (a checkpoint copies nothing)."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.size = Path(folder), size
        self.index: list[tuple[int, int]] = []
        self._cache: dict[int, dict] = {}

    def add(self, rollout: int, shard: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rollout-{rollout}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(shard, tmp)
        os.replace(tmp, path)  # atomic: a killed run leaves a whole shard or none
        groups = shard["rewards"].shape[0]
        self.index = (self.index + [(rollout, g) for g in range(groups)])[-self.size :]
        self._cache[rollout] = shard
        self._evict()

    def _evict(self) -> None:
        live = {r for r, _ in self.index}
        self._cache = {r: v for r, v in self._cache.items() if r in live}

    def _shard(self, rollout: int) -> dict:
        if rollout not in self._cache:
            self._cache[rollout] = torch.load(self.folder / f"rollout-{rollout}.pt", weights_only=True)
        return self._cache[rollout]

    def draw(self, n: int, generator: torch.Generator, mode: str) -> list[tuple[int, int]]:
        """``n`` entries: uniform with replacement (the authors' ``randint``), or the newest."""
        if mode == "newest":
            return [self.index[-1 - (i % len(self.index))] for i in range(n)]
        picks = torch.randint(len(self.index), (n,), generator=generator).tolist()
        return [self.index[i] for i in picks]

    def groups(self, entries: list[tuple[int, int]]) -> dict:
        """The entries' data stacked: latents (n, K, N + 1, ...), rewards (n, K), captions (n rows), embeds."""
        rows = [(self._shard(r), g) for r, g in entries]
        out = {
            "latents": torch.stack([s["latents"][g] for s, g in rows]),
            "rewards": torch.stack([s["rewards"][g] for s, g in rows]),
            "captions": {k: torch.stack([s["captions"][k][g] for s, g in rows]) for k in rows[0][0]["captions"]},
        }
        if "embeds" in rows[0][0]:
            out["embeds"] = torch.stack([s["embeds"][g] for s, g in rows])
        return out

    def state_dict(self) -> dict:
        return {"index": [list(e) for e in self.index]}

    def load_state_dict(self, state: dict) -> None:
        self.index = [tuple(e) for e in state["index"]]
        self._cache = {}


def step_law(trans, gamma: float) -> torch.Tensor:
    """P(k) proportional to gamma^k over the sampler's steps with a density (s_k > 0); k = 0 the noisiest (the
    authors' ``policy_loss_weights``)."""
    k = torch.arange(len(trans.std), dtype=torch.float64)
    w = torch.where(trans.std > 0, gamma**k, torch.zeros_like(k))
    return w / w.sum()


def make_trainer_class(Trainer):  # noqa: N803 (the base class, passed in: train.py runs as a script)
    """The online trainer, a subclass of ``rpo_fast/train.py``'s ``Trainer``: its wiring and loop, with the data
    (prompts, a reward model, a replay buffer) and the step (rollout, then updates from the buffer) replaced."""

    class OnlineTrainer(Trainer):
        unit = "groups"

        def _data(self) -> None:
            """Prompts, the text encoders, the VAE, the reward model (and online-rpo's image embedder) and the
            replay buffer, in place of the pair data."""
            from .scorers import load_scorer

            cfg, fam = self.cfg, self.family
            self.prompts = read_prompt_file(cfg.data, cfg.columns)
            self.table = self.loader = self.dataset = None
            self.encoders = fam.load_text_encoders(device=self.device, dtype=torch.float32)
            self.vae = fam.load_vae(device=self.device, dtype=torch.float32)
            self.scorer = load_scorer(cfg.reward, device=self.device)
            self.embedder = None
            if self.spec.embeddings:
                from .embed import load_embedder

                self.embedder = load_embedder(cfg.clip, device=self.device)
            self.resolution = cfg.resolution or fam.default_resolution
            size = self.resolution // fam.vae_scale_factor
            self.latent_shape = (fam.latent_channels, size, size)
            self.trans = transitions(
                fam, cfg.rollout_steps, eta=cfg.eta, noise_level=cfg.noise_level, latent_shape=self.latent_shape
            )
            self.law = step_law(self.trans, cfg.gamma if cfg.gamma is not None else 0.9)
            self.guidance = cfg.guidance if cfg.guidance is not None else fam.guidance
            self.rollout_prompts = cfg.rollout_prompts or cfg.micro_batch_size * cfg.grad_accum
            empty = fam.encode_texts(self.encoders, [""])
            self.empty = {k: v[0].to(self.device) for k, v in empty.items()}
            self.buffer = ReplayBuffer(self.out / "replay" / f"rank-{self.rank}", cfg.replay_size)
            self.rollouts = 0
            self.rollout_metrics = MetricMean()
            self.seconds = {"rollout": 0.0, "train": 0.0, "images": 0.0}

        def summary_data(self) -> str:
            c = self.cfg
            return (
                f"{len(self.prompts)} prompts | rollouts of {self.rollout_prompts} prompts x {c.samples_per_prompt} "
                f"samples per rank every {c.rollout_every} step(s), {c.rollout_steps} steps, guidance {self.guidance}"
                f", reward {self.scorer.name}, replay {c.replay_size} groups ({c.replay_sampling}), "
                f"{c.steps_per_sample} step(s) per sample"
            )

        # ---------------------------------------------------------------- conditioning
        def captions(self, prompts: list[str]) -> dict:
            """The family's caption tensors of ``prompts`` and a full-frame image conditioning (SDXL's time ids)."""
            from .data.preprocess import Crop

            fam = self.family
            batch = {k: v.to(self.device) for k, v in fam.encode_texts(self.encoders, prompts).items()}
            if fam.image_keys:
                crop = Crop((self.resolution, self.resolution), (0, 0))
                image = fam.image_conditioning([crop, crop], self.resolution)
                for key in fam.image_keys:
                    batch[key] = image[key][None].expand(len(prompts), *image[key].shape).to(self.device)
            return batch

        def conditioning(self, captions: dict) -> tuple[dict, dict]:
            """(cond, uncond) of n prompts' caption tensors, in the engine's dtype."""
            from .models import cast_conditioning

            n = next(iter(captions.values())).shape[0]
            keep = torch.zeros(n, dtype=torch.bool, device=self.device)
            cond = self.family.conditioning(captions, keep, self.empty, pairs=False)
            uncond = self.family.conditioning(captions, ~keep, self.empty, pairs=False)
            return cast_conditioning(cond, self.dtype), cast_conditioning(uncond, self.dtype)

        # ---------------------------------------------------------------- rollout
        @torch.no_grad()
        def rollout(self) -> None:
            """Sample, decode, score and store this rank's prompts' K trajectories each (one rollout). Under no_grad,
            not inference mode: ZeRO-3's gathered parameters must stay ordinary tensors (as the reference's), and
            the recorded states are later the updates' inputs."""
            cfg, fam = self.cfg, self.family
            t0 = time.perf_counter()
            n, k = self.rollout_prompts, cfg.samples_per_prompt
            first = (self.rollouts * self.world + self.rank) * n  # each rank its own prompts, an epoch's order
            prompts = [self.prompt_at(first + i) for i in range(n)]
            captions = self.captions(prompts)
            cond, uncond = self.conditioning(captions)
            rows = torch.arange(n, device=self.device).repeat_interleave(k)
            seeds = rollout_seeds(cfg.seed, self.rollouts, self.rank, n * k)
            self.engine.eval()
            traj = sample_trajectories(
                fam,
                self.engine,
                self.trans,
                index_conditioning(cond, rows),
                index_conditioning(uncond, rows),
                seeds,
                self.latent_shape,
                guidance=self.guidance,
                dtype=self.dtype,
            )
            self.engine.train()
            images = self.decode(traj.latents[:, -1])
            rewards = self.scorer.score(images, [prompts[i] for i in rows.tolist()]).double().cpu()
            shard = dict(
                latents=traj.latents.cpu().unflatten(0, (n, k)),
                rewards=rewards.view(n, k),
                captions={key: v.cpu() for key, v in captions.items()},
                seeds=traj.seeds.view(n, k),  # each trajectory's noise: the rollout can be sampled again
                prompts=torch.tensor([first + i for i in range(n)]),  # positions in the run's prompt order
            )
            if self.embedder is not None:
                e = torch.nn.functional.normalize(self.embedder.encode_images(images).float(), dim=-1)
                shard["embeds"] = e.cpu().unflatten(0, (n, k))
            self.buffer.add(self.rollouts, shard)
            self.rollouts += 1
            per_group = shard["rewards"]
            self.rollout_metrics.add(
                {
                    "reward_mean": per_group.mean().float(),
                    "reward_std": per_group.std(dim=1).mean().float(),  # the spread within a prompt's K samples
                    "reward_max": per_group.max(dim=1).values.mean().float(),
                }
            )
            self.seconds["rollout"] += time.perf_counter() - t0
            self.seconds["images"] += n * k

        def prompt_at(self, position: int) -> str:
            """The prompt at ``position`` of the run's prompt order: epoch e = position // P in a permutation
            seeded by (seed, e)."""
            epoch, i = divmod(position, len(self.prompts))
            if getattr(self, "_order", (None,))[0] != epoch:  # one permutation per epoch, drawn when first needed
                g = torch.Generator().manual_seed(seed_of(self.cfg.seed, PROMPT_STREAM, epoch))
                self._order = (epoch, torch.randperm(len(self.prompts), generator=g).tolist())
            return self.prompts[self._order[1][i]]

        def decode(self, latents: torch.Tensor) -> list:
            """Latents -> PIL images (the VAE in fp32, a few at a time)."""
            from PIL import Image

            out = []
            for chunk in latents.split(8):
                pixels = self.family.decode_latents(self.vae, chunk.to(self.device, torch.float32))
                arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
                out += [Image.fromarray(a) for a in arr]
            return out

        # ---------------------------------------------------------------- one step
        def micro_draws(self, micro: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
            """The groups and the S step indices of a micro-step, from (seed, step, micro-step, rank)."""
            cfg = self.cfg
            g = torch.Generator().manual_seed(seed_of(cfg.seed, REPLAY_STREAM, self.step, micro, self.rank))
            entries = self.buffer.draw(cfg.micro_batch_size, g, cfg.replay_sampling)
            g = torch.Generator().manual_seed(seed_of(cfg.seed, STEP_STREAM, self.step, micro, self.rank))
            steps = torch.multinomial(self.law, cfg.steps_per_sample, replacement=True, generator=g)
            return entries, steps

        def forward_loss_online(self, data: dict, steps: torch.Tensor):
            """Policy and reference on the S G K recorded states (guided, one forward each) and the loss."""
            fam = self.family
            lat = data["latents"]  # (G, K, N + 1, C, h, w)
            g, k = lat.shape[:2]
            flat = lat.flatten(0, 1)  # (G K, N + 1, ...)
            rows = torch.arange(g * k).repeat(len(steps))  # step-major: s G K + g K + k
            ks = steps.repeat_interleave(g * k)
            x, target, scale = step_targets(self.trans, flat[rows], ks)
            x, target = x.to(self.device, self.dtype), target.to(self.device, self.dtype)
            t = self.trans.timesteps[ks].to(self.device)
            captions = {key: v.to(self.device) for key, v in data["captions"].items()}
            cond, uncond = self.conditioning(captions)
            prompt_rows = (rows // k).to(self.device)
            cond, uncond = index_conditioning(cond, prompt_rows), index_conditioning(uncond, prompt_rows)
            both = cat_conditioning(uncond, cond)
            x2, t2 = torch.cat([x, x]), torch.cat([t, t])
            ref_u, ref_c = self.reference_forward(x2, t2, both).chunk(2)
            ref = ref_u + self.guidance * (ref_c - ref_u)
            pol_u, pol_c = fam.predict(self.engine, x2, t2, both).chunk(2)
            pred = pol_u + self.guidance * (pol_c - pol_u)
            kw = dict(rewards=data["rewards"].to(self.device).float(), log_ratio_scale=scale.to(self.device).float())
            if self.spec.embeddings:
                from .objectives import best_and_worst

                best, worst = best_and_worst(data["rewards"])
                idx = torch.arange(g)
                kw["embeds_w"] = data["embeds"][idx, best].to(self.device)
                kw["embeds_l"] = data["embeds"][idx, worst].to(self.device)
            return self.loss_fn(pred, target, ref, **kw)

        def train_step(self) -> None:
            cfg = self.cfg
            if self.step % cfg.rollout_every == 0:
                self.rollout()
            t0 = time.perf_counter()
            for micro in range(cfg.grad_accum):
                entries, steps = self.micro_draws(micro)
                out = self.forward_loss_online(self.buffer.groups(entries), steps)
                self.engine.backward(out.loss)
                self.debug.after_backward(self.engine, self.step)
                self.engine.step()
                self.metrics.add(out.metrics)
            self.seconds["train"] += time.perf_counter() - t0
            self.after_optimizer_step()

        def evaluate(self) -> dict:
            raise AssertionError("online runs do not evaluate on pairs (validate refuses --eval-every)")

        def log_row(self, *, pairs_per_s: float) -> dict:
            extra = {}
            if self.rollout_metrics.count:
                extra = {f"rollout/{k}": v for k, v in self.rollout_metrics.mean(self.device).items()}
            secs = torch.tensor([self.seconds[k] for k in ("rollout", "train", "images")], dtype=torch.float64)
            secs = distributed.all_reduce_sum(secs.to(self.device)).tolist()
            extra["time/rollout_s"], extra["time/train_s"] = secs[0] / self.world, secs[1] / self.world
            extra["time/rollout_share"] = secs[0] / max(secs[0] + secs[1], 1e-12)
            extra["time/images_per_s"] = secs[2] / max(secs[0] / self.world, 1e-12)
            self.seconds = {"rollout": 0.0, "train": 0.0, "images": 0.0}
            return super().log_row(pairs_per_s=pairs_per_s, extra=extra)

        # ---------------------------------------------------------------- checkpoints
        def extra_state(self) -> dict:
            return {"replay": self.buffer.state_dict(), "rollouts": self.rollouts}

        def load_extra_state(self, state: dict) -> None:
            self.buffer.load_state_dict(state["replay"])
            self.rollouts = state["rollouts"]

    return OnlineTrainer
