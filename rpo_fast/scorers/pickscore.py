"""PickScore (Kirstain et al. 2023, yuvalkirstain/PickScore): a CLIP-H fine-tuned on Pick-a-Pic choices.

    score = logit_scale.exp() * cos(image embedding, text embedding)

From a local transformers ``CLIPModel`` folder (the layout of yuvalkirstain/PickScore_v1, with the image
processor and tokenizer of laion/CLIP-ViT-H-14-laion2B-s32B-b79K saved beside it).
"""

import torch
import torch.nn.functional as F

from ..embed import CLIPEmbedder


class PickScore:
    name = "pickscore"

    def __init__(self, path, *, device="cpu"):
        self.clip = CLIPEmbedder(path, device=device)

    @torch.no_grad()
    def score(self, images, prompts):
        img = F.normalize(self.clip.encode_images(images), dim=-1)
        txt = F.normalize(self.clip.encode_texts(prompts), dim=-1)
        return self.clip.model.logit_scale.exp().float().cpu() * (img * txt).sum(-1)
