"""Automated preference scorers for ``python -m rpo_fast.evaluate``. Each is a small class with ``name`` and
``score(images, prompts) -> tensor (n,)``, loaded from local paths only (nothing downloads); adding one is a
file plus a line in ``SCORERS``. Any other scorer is named by its module path: ``module.path:Factory[=ARG]``
(called with ARG where given; the demo's is ``rpo_fast.demo.shapes:WarmthScorer``).

    pickscore=CLIP_DIR                 PickScore: logit_scale.exp() * cos(image, text)
    hps=CHECKPOINT[:TOKENIZER_DIR]     HPSv2 / v2.1 (open_clip ViT-H-14 weights mapped into transformers): 100 * cos
    aesthetic=MLP_FILE:CLIP_DIR        LAION aesthetic predictor v2 on L2-normalised CLIP ViT-L/14 image embeddings
    clipscore=CLIP_DIR                 CLIP score: 100 * max(cos(image, text), 0)
    imagereward=CHECKPOINT             ImageReward (needs the ImageReward package); otherwise reported as not computed
    module.path:Factory[=ARG]          any importable scorer factory
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, images: list, prompts: list[str]) -> torch.Tensor: ...


class ScorerUnavailable(RuntimeError):
    """A scorer that cannot be computed here (missing package or file): the report says why."""


def _pickscore(arg, device):
    from .pickscore import PickScore

    return PickScore(arg, device=device)


def _hps(arg, device):
    from .hps import HPSv2

    ckpt, _, tok = arg.partition(":")
    return HPSv2(ckpt, tokenizer=tok or None, device=device)


def _aesthetic(arg, device):
    from .aesthetic import AestheticV2

    mlp, _, clip = arg.partition(":")
    return AestheticV2(mlp, clip, device=device)


def _clipscore(arg, device):
    from .clipscore import CLIPScore

    return CLIPScore(arg, device=device)


def _imagereward(arg, device):
    from .imagereward import ImageReward

    return ImageReward(arg, device=device)


SCORERS = {
    "pickscore": _pickscore,
    "hps": _hps,
    "aesthetic": _aesthetic,
    "clipscore": _clipscore,
    "imagereward": _imagereward,
}


def load_scorer(spec: str, *, device: str | torch.device = "cpu") -> Scorer:
    """A scorer from ``NAME=ARG`` (or a bare NAME for scorers that need no file)."""
    name, _, arg = spec.partition("=")
    if ":" in name:  # module.path:Factory
        import importlib

        module, _, factory = name.partition(":")
        try:
            make = getattr(importlib.import_module(module), factory)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"scorer {name!r}: cannot import {factory} from {module} ({e})") from e
        return make(arg) if arg else make()
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose from {sorted(SCORERS)} or give module.path:Factory")
    return SCORERS[name](arg, device)
