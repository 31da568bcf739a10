"""ImageReward (Xu et al. 2023): a BLIP-based reward model. It needs the ``ImageReward`` package (its BLIP code)
and a local checkpoint; where either is missing it raises ``ScorerUnavailable`` and the report says so
(never a silent zero)."""

from pathlib import Path

import torch

from . import ScorerUnavailable


class ImageReward:
    name = "imagereward"

    def __init__(self, checkpoint, *, device="cpu"):
        try:
            import ImageReward as RM  # noqa: N813
        except ImportError as e:
            raise ScorerUnavailable(
                "ImageReward: the ImageReward package is not installed (pip install image-reward)"
            ) from e
        if not checkpoint or not Path(checkpoint).exists():
            raise ScorerUnavailable(f"ImageReward: checkpoint not found: {checkpoint!r}")
        self.model = RM.load(str(checkpoint), device=str(device))

    @torch.no_grad()
    def score(self, images, prompts):
        return torch.tensor([float(self.model.score(p, [im])) for im, p in zip(images, prompts)])
