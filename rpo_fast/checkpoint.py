"""Checkpoints and export.

    OUTPUT/checkpoints/step-N/      DeepSpeed's checkpoint (every rank's shards) + client state, then COMPLETE
    OUTPUT/unet/ or OUTPUT/lora/    the trained denoiser as a diffusers folder, or the LoRA adapter

A checkpoint counts only once its COMPLETE marker exists: the marker is written (atomically, by rank 0) after every
rank has saved, so a run killed during a save resumes from the previous complete one. The newest ``keep`` complete
checkpoints are kept, and leftovers of killed saves are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from . import distributed


def complete_checkpoints(output: Path) -> list[int]:
    root = Path(output) / "checkpoints"
    if not root.is_dir():
        return []
    steps = [int(p.name[5:]) for p in root.glob("step-*") if p.name[5:].isdigit() and (p / "COMPLETE").exists()]
    return sorted(steps)


def latest_checkpoint(output: Path) -> int | None:
    steps = complete_checkpoints(output)
    return steps[-1] if steps else None


def save(engine, output: Path, step: int, state: dict, *, keep: int, before_save=None) -> None:
    """DeepSpeed's checkpoint of ``engine`` in step-N with ``state`` (the client state), then (all ranks done) the
    COMPLETE marker; old ones pruned. ``before_save(engine, root, tag, state)``: the fault injection's hook."""
    root = Path(output) / "checkpoints"
    tag = f"step-{step}"
    if before_save is not None:
        before_save(engine, root, tag, state)
    engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
    distributed.barrier()
    if distributed.rank() == 0:
        marker = root / tag / "COMPLETE"
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(step=step, time=time.time())))
        os.replace(tmp, marker)
        steps = complete_checkpoints(output)
        for old in steps[:-keep]:
            shutil.rmtree(root / f"step-{old}", ignore_errors=True)
        for p in root.glob("step-*"):  # leftovers of saves killed before completion
            if p.name[5:].isdigit() and int(p.name[5:]) < steps[-1] and not (p / "COMPLETE").exists():
                shutil.rmtree(p, ignore_errors=True)
    distributed.barrier()


def load(engine, output: Path, step: int) -> dict:
    """Load step-N into ``engine`` (weights, optimizer, schedule); returns the client state."""
    _, state = engine.load_checkpoint(str(Path(output) / "checkpoints"), tag=f"step-{step}")
    if state is None:
        raise RuntimeError(f"could not load checkpoint step-{step} from {Path(output) / 'checkpoints'}")
    return state


def unfused_state(state: dict) -> dict:
    """A state dict with diffusers' fused projections (``--fuse-qkv``) split back into the layers a plain model has:
    ``X.to_qkv.{weight,bias}`` -> ``X.to_q``, ``X.to_k``, ``X.to_v`` (equal thirds of the rows), ``X.to_kv`` ->
    ``X.to_k``, ``X.to_v`` (halves). The stale copies of those layers, frozen during training, are overwritten."""
    out = dict(state)
    for key in list(state):
        for fused, parts in ((".to_qkv.", ("to_q", "to_k", "to_v")), (".to_kv.", ("to_k", "to_v"))):
            if fused in key:
                prefix, suffix = key.split(fused)
                for name, chunk in zip(parts, state[key].chunk(len(parts), dim=0)):
                    out[f"{prefix}.{name}.{suffix}"] = chunk.clone()
                del out[key]
    return out


def export(engine, family, output: Path, *, zero3: bool, lora: bool) -> Path:
    """The trained weights, gathered from the ZeRO shards: the denoiser as a diffusers folder (OUTPUT/unet) or,
    with LoRA, the adapter in the format diffusers' ``load_lora_weights`` reads (OUTPUT/lora). A finished export
    replaces the previous one whole."""
    if zero3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective; the full dict on rank 0
    else:
        state = engine.module.state_dict() if distributed.rank() == 0 else None
    dest = Path(output) / ("lora" if lora else family.denoiser_folder)
    if distributed.rank() == 0:
        state = unfused_state(state)  # --fuse-qkv: the plain layers a diffusers model loads
        with torch.device("meta"):
            model = family.denoiser_class().from_config(dict(engine.module.config))
            if lora:
                model.add_adapter(engine.module.peft_config["default"])
        model.load_state_dict({k: v.detach().cpu() for k, v in state.items()}, assign=True)
        tmp = Path(output) / f"{dest.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if lora:
            from peft.utils import get_peft_model_state_dict

            family.save_lora(tmp, get_peft_model_state_dict(model))
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    distributed.barrier()
    return dest
