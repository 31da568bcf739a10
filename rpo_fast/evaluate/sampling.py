"""The prompt sets evaluation reads and the paired sampling of a base and a tuned model: the family's pipeline from
a local folder with the tuned denoiser or LoRA swapped in; image j of prompt i from ``seed_of(seed, i, j)``, batched
and resumable."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch

from ..seeding import seed_of

PROMPT_COLUMNS = ("caption", "prompt", "text")  # a parquet's prompt column: Pick-a-Pic's name, then mirrors' names


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Prompts of a PartiPrompts TSV/CSV, HPSv2 JSON file or folder, Pick-a-Pic (or mirror) parquet, or text
    file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--prompts {path} does not exist")
    if path.is_dir():
        files = sorted(path.glob("*.json")) or sorted(path.glob("*.parquet"))
        if not files:
            raise ValueError(f"--prompts {path}: a folder must hold HPSv2 .json files or parquet shards")
        prompts = [p for f in files for p in read_prompts(f)]
    elif path.suffix in (".tsv", ".csv"):
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
        if not rows or "Prompt" not in rows[0]:
            raise ValueError(f"{path}: no 'Prompt' column (PartiPrompts format)")
        prompts = [r["Prompt"] for r in rows]
    elif path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {style: [prompts]}
            data = [p for v in data.values() for p in v]
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise ValueError(f"{path}: expected a JSON list of prompts (HPSv2 benchmark format)")
        prompts = data
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        column = next((c for c in PROMPT_COLUMNS if c in names), None)
        if column is None:
            raise ValueError(
                f"{path}: no prompt column ({', '.join(PROMPT_COLUMNS)}); its columns are {', '.join(names)}"
            )
        prompts = list(dict.fromkeys(pq.read_table(path, columns=[column])[column].to_pylist()))
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts[:limit] if limit else prompts


# --------------------------------------------------------------------------------------------------
# Pipelines and sampling
# --------------------------------------------------------------------------------------------------


def load_pipeline(
    family,
    *,
    unet: str | Path | None = None,
    lora: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler: str = "auto",
):
    """The sampling pipeline of ``family``'s folder (``rpo_fast.models.load_family(MODEL)``; give it the
    ``max_sequence_length`` the cache was built with, so that sampling sees the captions as training did), with the
    tuned ``unet`` folder or ``lora`` swapped in. ``pipe.family`` is the family (its ``guidance`` is the papers'
    default)."""
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler

    if family.flow_matching and scheduler not in ("auto", "folder"):
        raise ValueError(f"--scheduler {scheduler}: {family.name} models sample with their flow-matching scheduler")
    pipe = family.load_pipeline(dtype=dtype)
    if unet is not None:
        setattr(pipe, family.denoiser_folder, family.load_denoiser(unet, dtype=dtype))
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    choice = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "pndm": PNDMScheduler}.get(scheduler)
    if scheduler == "auto" and isinstance(pipe.scheduler, DDPMScheduler):
        choice = DDIMScheduler  # a training scheduler in the folder: sample with DDIM
    if choice is not None:
        pipe.scheduler = choice.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.family = family
    return pipe.to(device)


def sample(
    pipe,
    prompts: list[str],
    folder: Path,
    *,
    seed: int = 0,
    per_prompt: int = 1,
    steps: int | None = None,
    guidance: float | None = None,
    batch_size: int = 8,
    resolution: int | None = None,
    desc: str = "sampling",
    progress: bool = True,
) -> list[Path]:
    """Images ``folder/{i:05d}_{j}.png`` for every prompt i and draw j, each from its own seeded generator: the
    same seeds and batch size give the same bits, another batch size at most one 8-bit level here and there
    (float rounding of batched matmuls). Existing files are kept (resume)."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    guidance = pipe.family.guidance if guidance is None else guidance
    steps = pipe.family.sample_steps if steps is None else steps
    jobs = [(i, j) for i in range(len(prompts)) for j in range(per_prompt)]
    paths = [folder / f"{i:05d}_{j}.png" for i, j in jobs]
    todo = [(job, path) for job, path in zip(jobs, paths) if not path.exists()]
    size = resolution or pipe.family.default_resolution
    device = pipe.device
    with tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="img", desc=desc, disable=not progress) as bar:
        for k in range(0, len(todo), batch_size):
            chunk = todo[k : k + batch_size]
            gens = [torch.Generator(device).manual_seed(seed_of(seed, i, j)) for (i, j), _ in chunk]
            t5 = (
                {}
                if pipe.family.max_sequence_length is None
                else dict(max_sequence_length=pipe.family.max_sequence_length)
            )
            out = pipe(
                prompt=[prompts[i] for (i, _), _ in chunk],
                **t5,
                **pipe.family.sample_options,
                num_inference_steps=steps,
                **pipe.family.guidance_kwargs(guidance, len(chunk)),
                generator=gens,
                height=size,
                width=size,
                output_type="pil",
            )
            for img, (_, path) in zip(out.images, chunk):
                tmp = path.with_suffix(".tmp.png")
                img.save(tmp)
                os.replace(tmp, path)
            bar.update(len(chunk))
    return paths
