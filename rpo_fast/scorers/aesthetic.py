"""LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor, sac+logos+ava1-l14-linearMSE):
an MLP 768-1024-128-64-16-1 (dropout between layers, no activations) on the L2-normalised CLIP ViT-L/14 image
embedding. The MLP weights file is the original state dict (keys layers.0/2/4/6/7.{weight,bias})."""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..embed import CLIPEmbedder


def aesthetic_mlp(dim: int = 768) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


class AestheticV2:
    name = "aesthetic"

    def __init__(self, mlp_path, clip_path, *, device="cpu"):
        if not Path(mlp_path).exists():
            raise FileNotFoundError(f"aesthetic MLP weights not found: {mlp_path}")
        state = torch.load(mlp_path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("layers."): v for k, v in state.items()}
        self.clip = CLIPEmbedder(clip_path, device=device)
        self.mlp = aesthetic_mlp(state["0.weight"].shape[1])
        self.mlp.load_state_dict(state)
        self.mlp.eval()

    @torch.no_grad()
    def score(self, images, prompts=None):
        emb = F.normalize(self.clip.encode_images(images).float(), dim=-1)
        return self.mlp(emb).squeeze(-1)
