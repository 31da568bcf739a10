"""HPSv2 / HPSv2.1 (Wu et al. 2023, tgxs002/HPSv2): an open_clip ViT-H-14 fine-tuned on human preferences.

    score = 100 * cos(image embedding, text embedding)

The checkpoint (HPS_v2_compressed.pt, HPS_v2.1_compressed.pt) holds open_clip weights; ``openclip_to_hf`` maps
them into a transformers ``CLIPModel``, so neither open_clip nor torchvision is needed (CPU machines). The
tokenizer is a local CLIP tokenizer folder (e.g. from laion/CLIP-ViT-H-14-laion2B-s32B-b79K). Preprocessing is
HPS's: resize the longest side to the model's size (bicubic), pad to a square with black, normalise with the
OpenAI CLIP mean and std (no center crop).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])


def _heads(width: int, vision: bool) -> int:
    # ViT-H-14 (HPS): vision 1280 wide with 80-wide heads, text 1024 wide with 64-wide heads (open_clip config)
    if vision and width == 1280:
        return 16
    return max(1, width // 64)


def openclip_to_hf(state: dict, *, vision_heads: int | None = None, text_heads: int | None = None):
    """A transformers ``CLIPModel`` holding the weights of an open_clip CLIP state dict (ViT vision tower)."""
    from transformers import CLIPConfig, CLIPModel

    state = {k.removeprefix("module."): v for k, v in state.items()}
    v_width, _, patch, _ = state["visual.conv1.weight"].shape
    v_layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("visual.transformer.resblocks."))
    t_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks."))
    t_width = state["token_embedding.weight"].shape[1]
    grid = int(round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    config = CLIPConfig(
        text_config=dict(
            vocab_size=state["token_embedding.weight"].shape[0],
            hidden_size=t_width,
            intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=t_layers,
            num_attention_heads=text_heads or _heads(t_width, False),
            max_position_embeddings=state["positional_embedding"].shape[0],
            hidden_act="gelu",
            # eos_token_id=2 selects transformers' legacy pooling at argmax(input_ids): open_clip's
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=v_width,
            intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=v_layers,
            num_attention_heads=vision_heads or _heads(v_width, True),
            image_size=grid * patch,
            patch_size=patch,
            hidden_act="gelu",
        ),
        projection_dim=state["text_projection"].shape[1],
    )
    out = {
        "logit_scale": state["logit_scale"].reshape(()),
        "text_projection.weight": state["text_projection"].T,
        "visual_projection.weight": state["visual.proj"].T,
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
    }
    for src, dst, n in (("transformer", "text_model", t_layers), ("visual.transformer", "vision_model", v_layers)):
        for i in range(n):
            s, d = f"{src}.resblocks.{i}.", f"{dst}.encoder.layers.{i}."
            for a, b in (
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("attn.out_proj", "self_attn.out_proj"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                out[d + b + ".weight"], out[d + b + ".bias"] = state[s + a + ".weight"], state[s + a + ".bias"]
            for name, w, bias in zip(
                ("q", "k", "v"), state[s + "attn.in_proj_weight"].chunk(3), state[s + "attn.in_proj_bias"].chunk(3)
            ):
                out[d + f"self_attn.{name}_proj.weight"], out[d + f"self_attn.{name}_proj.bias"] = w, bias
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"open_clip -> transformers mapping left missing {missing[:5]} / unexpected {unexpected[:5]}")
    return model.eval()


def hps_preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """Resize the longest side to ``size`` (bicubic), pad to size x size with black (centered), normalise."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / max(w, h)
    nw, nh = round(w * scale), round(h * scale)
    image = image.resize((nw, nh), Image.BICUBIC)
    canvas = np.zeros((size, size, 3), dtype=np.float64)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top : top + nh, left : left + nw] = np.asarray(image, dtype=np.float64) / 255.0
    return torch.from_numpy((canvas - MEAN) / STD).permute(2, 0, 1).float()


class HPSv2:
    name = "hps"

    def __init__(self, checkpoint, *, tokenizer=None, device="cpu"):
        from transformers import CLIPTokenizer

        if not Path(checkpoint).exists():
            raise FileNotFoundError(f"HPS checkpoint not found: {checkpoint}")
        if tokenizer is None:
            raise ValueError("hps needs a CLIP tokenizer folder: hps=CHECKPOINT:TOKENIZER_DIR")
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
        self.model = openclip_to_hf(state).to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer)
        self.size, self.device = self.model.config.vision_config.image_size, torch.device(device)

    @torch.no_grad()
    def score(self, images, prompts):
        px = torch.stack([hps_preprocess(im, self.size) for im in images]).to(self.device)
        ids = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=77, return_tensors="pt"
        ).input_ids
        img = self.model.visual_projection(self.model.vision_model(pixel_values=px).pooler_output)
        txt = self.model.text_projection(self.model.text_model(input_ids=ids.to(self.device)).pooler_output)
        return 100.0 * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1).float().cpu()
