"""The flow-matching models on paper: size, FLOPs, activations, cache bytes, and the memory per GPU of a full
fine-tune under each ZeRO stage, for SD3.5-Medium, SD3.5-Large, FLUX.1-dev, Z-Image-Turbo, Qwen-Image, FLUX.2-dev,
FLUX.2-Klein 4B and 9B and SANA 1.6B and 0.6B at 1024 px. Everything is counted on the meta device from the public
configs (no weights, no GPU).

    python benchmarks/plans/flow_plan.py          # the tables of docs/guides/families.md (tests/test_flow.py)

Model states per trained parameter, in DeepSpeed's own breakdown (``estimate_zero2_model_states_mem_needs``:
2 bytes of bf16 weights + 2 of bf16 gradients + 4 of fp32 gradients + 4 of fp32 master weights + 8 of Adam states)
with bitsandbytes' 8-bit AdamW states (2 bytes: m and v at one byte each; the block scales add 1/64 of a byte):

    stage 0: 2 + 2 + 4 + 4 + 2          (everything on every GPU)
    stage 1: 2 + 2 + 4 + (4 + 2) / N    (master weights and states sharded)
    stage 2: 2 + (2 + 4 + 4 + 2) / N    (gradients too: DeepSpeed's 2 + 18/N with 8-bit states)
    stage 3: (2 + 2 + 4 + 4 + 2) / N + 4 x the largest layer (its gather buffer, as DeepSpeed's ZeRO-3 estimate)

The reference: its bf16 weights, 2 bytes a parameter replicated, 2 / N sharded (``--ref-placement zero3``), none with
a precomputed table (``--ref-placement precomputed``: the plan's last column).
Activations: one pair (2 images) per GPU with ``--recompute full``, from ``rpo_fast.recompute.step_cost``. A plan
fits where states + reference + activations stay under 68 GB (80 GB less 15% for the allocator, the CUDA context and
the block recomputed in backward); plans are tried in the order of least communication (stage 0 first), the
reference sharded only beside a ZeRO-3 policy (the combination the tests run).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

MODELS = (
    "sd3.5-medium",
    "sd3.5-large",
    "flux.1-dev",
    "z-image-turbo",
    "qwen-image",
    "flux.2-dev",
    "flux.2-klein-4b",
    "flux.2-klein-9b",
    "sana-1.6b",
    "sana-0.6b",
)
UNETS = ("sd15", "sdxl")  # the same memory plan for the UNets, at their recipes' resolutions (512, 1024 px)
RESOLUTION = 1024
GPUS = (4, 8, 16, 64)
BUDGET = 0.85 * 80e9  # an 80 GB H100/A100 less 15% (allocator, CUDA context, the recomputed block's activations)
STATE_BYTES = {"bf16 weights": 2, "bf16 grads": 2, "fp32 grads": 4, "fp32 master": 4, "8-bit AdamW": 2}
T5_TOKENS = {"sd3": 256, "flux": 512}


def model_states(params: int, largest: int, stage: int, gpus: int) -> float:
    """Bytes per GPU of the policy's weights, gradients, master copy and 8-bit states (module doc)."""
    w, g16, g32, master, states = STATE_BYTES.values()
    per = {
        0: w + g16 + g32 + master + states,
        1: w + g16 + g32 + (master + states) / gpus,
        2: w + (g16 + g32 + master + states) / gpus,
        3: (w + g16 + g32 + master + states) / gpus,
    }[stage]
    return params * per + (4 * largest if stage == 3 else 0)


def reference_bytes(params: int, sharded: bool, gpus: int) -> float:
    return 2 * params / (gpus if sharded else 1)


def largest_layer(model) -> int:
    """Parameters of the largest leaf module (DeepSpeed's ``largest_layer_params``)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def cache_bytes_per_pair(
    kind: str,
    latent_channels: int,
    latent_side: int,
    widths: dict | None = None,
    clip_dim: int = 768,
    captions_per_pair: float = 1,
    text_bytes: float | None = None,
) -> float:
    """Shard bytes one pair adds (fp16 storage): the latents' mean and std of both images, its share of its caption's
    parts (SD3/FLUX: the CLIP and T5 parts and pooled embedding from ``widths``; another family: ``text_bytes``,
    from ``caption_bytes``), RPO's CLIP embeddings (text + 2 images), the caption index (int64)."""
    latents = 2 * 2 * latent_channels * latent_side**2 * 2
    if text_bytes is None:
        text_bytes = 2 * (
            T5_TOKENS[kind] * widths["t5"] + widths["pooled"] + (77 * widths["clip"] if kind == "sd3" else 0)
        )
    return latents + text_bytes * captions_per_pair + 3 * clip_dim * 2 + 8


def caption_bytes(family) -> int:
    """Bytes of one caption's cached parts (``ModelFamily.random_captions``'s types): states in fp16, integers as
    they are (Z-Image's int64 lengths)."""
    import torch

    parts = family.random_captions(1, torch.Generator().manual_seed(0)).values()
    return sum(v.numel() * (2 if v.is_floating_point() else v.element_size()) for v in parts)


def measure(models=MODELS, modes=None) -> dict:
    """Per model: parameters, largest layer, FLOPs of one forward at the recipe's resolution, activations and FLOPs
    per pair by recompute choice (``modes``: those counted, default all; the memory plan reads ``full``)."""
    import torch

    from rpo_fast import testing as T
    from rpo_fast.models import load_family
    from rpo_fast.recompute import RECOMPUTE, step_cost

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            family = load_family(T.save_model_configs(Path(tmp) / name, name))
            with torch.device("meta"):
                model = family.denoiser_class().from_config(family.config(family.denoiser_folder))
            costs = {mode: step_cost(family, mode, rows=2) for mode in modes or RECOMPUTE}
            out[name] = dict(
                kind=family.name,
                caption_bytes=None if family.name in (*T5_TOKENS, *UNETS) else caption_bytes(family),
                latent_channels=family.latent_channels,
                latent_side=RESOLUTION // family.vae_scale_factor,
                params=sum(p.numel() for p in model.parameters()),
                largest=largest_layer(model),
                forward_flops=next(iter(costs.values()))["forward_flops"] / 2,  # the same in every mode
                costs=costs,
            )
    return out


def family_table(m: dict) -> str:
    from rpo_fast import testing as T

    rows = [
        "| model | family | parameters | forward at 1024 px | per pair: policy fwd + bwd (`none` / `full`) + "
        "reference fwd | activations per pair (`none` / `selective` / `full`) | cache per pair |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in m.items():
        c = r["costs"]
        clip = T.CLIP_L_TEXT["hidden_size"] + T.CLIP_BIGG_TEXT["hidden_size"]  # SD3's CLIP-L and CLIP-G side by side
        widths = dict(
            t5=T.T5_XXL["d_model"], pooled=clip if r["kind"] == "sd3" else T.CLIP_L_TEXT["hidden_size"], clip=clip
        )
        cache = cache_bytes_per_pair(
            r["kind"], r["latent_channels"], r["latent_side"], widths, text_bytes=r["caption_bytes"]
        )
        ref = 2 * r["forward_flops"]
        rows.append(
            f"| {name} | `{r['kind']}` | {r['params'] / 1e9:.2f} B | {r['forward_flops'] / 1e12:.1f} TFLOP | "
            f"{(c['none']['hardware_flops'] + ref) / 1e12:.0f} / {(c['full']['hardware_flops'] + ref) / 1e12:.0f} "
            f"TFLOP | {c['none']['activation_bytes'] / 2**30:.1f} / {c['selective']['activation_bytes'] / 2**30:.1f} "
            f"/ {c['full']['activation_bytes'] / 2**30:.1f} GiB | {cache / 1e6:.2f} MB |"
        )
    return "\n".join(rows)


def first_plans(r: dict, n: int) -> tuple[str, str]:
    """The first plan (least communication first) to fit ``BUDGET`` on ``n`` GPUs with one pair's activations under
    ``--recompute full``: "stage, reference" with the reference on the GPU, and the stage with it precomputed ("no"
    where none fits)."""
    act = r["costs"]["full"]["activation_bytes"]
    states = [model_states(r["params"], r["largest"], s, n) for s in range(4)]
    ref = (reference_bytes(r["params"], False, n), reference_bytes(r["params"], True, n))
    plans = [(s, False) for s in range(4)] + [(3, True)]  # a sharded reference: with a ZeRO-3 policy
    fits = [f"{s}, {'sharded' if sh else 'replicated'}" for s, sh in plans if states[s] + ref[sh] + act < BUDGET]
    alone = [str(s) for s in range(4) if states[s] + act < BUDGET]  # no reference on the GPU
    return (fits[0] if fits else "no"), (alone[0] if alone else "no")


def memory_table(m: dict, gpus=GPUS) -> str:
    rows = [
        "| model | GPUs | stage 0 | stage 1 | stage 2 | stage 3 | + reference replicated / sharded | "
        "first to fit 68 GB with activations (stage, reference) | the same with a precomputed reference (stage) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in m.items():
        for n in gpus:
            states = [model_states(r["params"], r["largest"], s, n) for s in range(4)]
            ref = (reference_bytes(r["params"], False, n), reference_bytes(r["params"], True, n))
            live, alone = first_plans(r, n)
            rows.append(
                f"| {name} | {n} | "
                + " | ".join(f"{b / 1e9:.1f} GB" for b in states)
                + f" | {ref[0] / 1e9:.1f} / {ref[1] / 1e9:.1f} GB | {live} | {alone} |"
            )
    return "\n".join(rows)


TESTED = {  # where each family's tiny model is trained on the CPU
    "sd15": "`tests/test_train.py` and most others",
    "sdxl": "`tests/test_train.py`, `tests/test_engines.py`",
    "sd3": "`tests/test_flow.py`",
    "flux": "`tests/test_flow.py`",
}


def families_table(*measured: dict) -> str:
    """One row a full-size model: its family, pipeline, prediction, objectives, the first plan that trains it on
    8 x 80 GB (reference on the GPU / precomputed), its default LoRA targets and where it is tested."""
    from rpo_fast.models import FAMILIES
    from rpo_fast.objectives import OBJECTIVE_TABLE

    rows = [
        "| model | family | pipeline | prediction | objectives | full fine-tune on 8 x 80 GB: ZeRO stage, reference "
        "/ stage with it precomputed | LoRA targets (default) | tested on the CPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in measured:
        for name, r in m.items():
            family = FAMILIES[r["kind"]]
            pipeline = family.pipeline_class().__name__
            prediction = "velocity" if family.flow_matching else "epsilon (or v)"
            objectives = [
                o
                for o, spec in OBJECTIVE_TABLE.items()
                if ("form" not in spec.options or family.dspo_form) and not (spec.online and family.no_rollouts)
            ]
            live, alone = first_plans(r, 8)
            rows.append(
                f"| {name} | `{family.name}` | `{pipeline}` | {prediction} | {', '.join(objectives)} | "
                f"{live} / {alone} | `{','.join(family.lora_targets)}` | "
                f"{TESTED.get(family.name, '`tests/test_new_families.py`')} |"
            )
    return "\n".join(rows)


UNET_GPUS = (1, 8)


if __name__ == "__main__":
    m, unets = measure(), measure(UNETS, ("full",))
    print(families_table(unets, m))
    print()
    print(family_table(m))
    print()
    print(memory_table(m))
    print()
    print(memory_table(unets, UNET_GPUS))
