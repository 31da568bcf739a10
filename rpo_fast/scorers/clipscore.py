"""CLIP score (Hessel et al. 2021; the torchmetrics convention): 100 * max(cos(image, text), 0), with the CLIP
named by the folder (the papers use openai/clip-vit-large-patch14)."""

import torch
import torch.nn.functional as F

from ..embed import CLIPEmbedder


class CLIPScore:
    name = "clipscore"

    def __init__(self, path, *, device="cpu"):
        self.clip = CLIPEmbedder(path, device=device)

    @torch.no_grad()
    def score(self, images, prompts):
        cos = (
            F.normalize(self.clip.encode_images(images), dim=-1) * F.normalize(self.clip.encode_texts(prompts), dim=-1)
        ).sum(-1)
        return 100.0 * cos.clamp_min(0)
