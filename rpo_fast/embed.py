"""Embeddings of (image, caption) pairs for Diffusion-RPO's weights.

An embedder is anything with two methods (``Embedder``): images -> (n, D) and captions -> (n, D), in one
space. The cache stores the L2-normalised text embedding of each caption and image embedding of each
winner and loser; the mode is chosen when training (spec section 3):

    "text":        e = normalize(e_text(caption))            (winner and loser of a pair share it)
    "image":       e = normalize(e_image(image))
    "multimodal":  e = normalize(normalize(e_text) + normalize(e_image))      (default)

Ships: ``CLIPEmbedder`` (a local transformers ``CLIPModel`` folder, e.g. the layout of
openai/clip-vit-large-patch14 or laion/CLIP-ViT-H-14-laion2B-s32B-b79K) and ``OpenCLIPEmbedder`` (the
``openclip`` extra: an open_clip model name and checkpoint file; needs torchvision, so GPU machines only).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("text", "image", "multimodal")


@runtime_checkable
class Embedder(Protocol):
    """Maps images (PIL) and captions to vectors of one space, (n, D) each."""

    def encode_images(self, images: list) -> Tensor: ...

    def encode_texts(self, captions: list[str]) -> Tensor: ...


def combine(text: Tensor, image: Tensor, mode: str) -> Tensor:
    """The RPO embedding of each row from its (text, image) embeddings, L2-normalised (see module doc)."""
    if mode == "text":
        return F.normalize(text.float(), dim=-1)
    if mode == "image":
        return F.normalize(image.float(), dim=-1)
    if mode == "multimodal":
        return F.normalize(F.normalize(text.float(), dim=-1) + F.normalize(image.float(), dim=-1), dim=-1)
    raise ValueError(f"embedding mode must be one of {MODES}, got {mode!r}")


class CLIPEmbedder:
    """A transformers ``CLIPModel`` folder (weights, config, ``preprocessor_config.json``, tokenizer).

    Image features: visual_projection(vision_model(pixels).pooler_output); text features:
    text_projection(text_model(ids).pooler_output), as ``CLIPModel.forward`` computes them.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 64,
    ):
        # the PIL image processor, named: the same pixels with or without torchvision (transformers 5.17's
        # AutoImageProcessor picks a torchvision one where it is installed, and fails where it is not)
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"no CLIP model folder at {path} (config.json missing)")
        self.model = CLIPModel.from_pretrained(path, dtype=dtype).to(device).eval()
        self.processor = CLIPImageProcessorPil.from_pretrained(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size
        self.name = f"clip:{path}"

    @torch.no_grad()
    def encode_images(self, images: list) -> Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            px = self.processor(
                images=[im.convert("RGB") for im in images[i : i + self.batch_size]], return_tensors="pt"
            ).pixel_values
            pooled = self.model.vision_model(pixel_values=px.to(self.device, self.dtype)).pooler_output
            out.append(self.model.visual_projection(pooled).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> Tensor:
        out = []
        for i in range(0, len(captions), self.batch_size):
            tok = self.tokenizer(
                captions[i : i + self.batch_size],
                padding="max_length",
                truncation=True,
                max_length=self.tokenizer.model_max_length,
                return_tensors="pt",
            )
            pooled = self.model.text_model(
                input_ids=tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device)
            ).pooler_output
            out.append(self.model.text_projection(pooled).float().cpu())
        return torch.cat(out)


class OpenCLIPEmbedder:
    """An open_clip model (``pip install rpo_fast[openclip]``), e.g. ``ViT-H-14`` with a local checkpoint."""

    def __init__(
        self, model_name: str, checkpoint: str | Path, *, device: str | torch.device = "cpu", batch_size: int = 64
    ):
        try:
            import open_clip
        except ImportError as e:  # pragma: no cover - the CPU environment has no open_clip
            raise ImportError("OpenCLIPEmbedder needs the 'openclip' extra: pip install 'rpo_fast[openclip]'") from e
        if not Path(checkpoint).exists():
            raise FileNotFoundError(f"open_clip checkpoint not found: {checkpoint}")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
        self.model, self.preprocess = model.to(device).eval(), preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.device, self.batch_size = torch.device(device), batch_size
        self.name = f"openclip:{model_name}:{checkpoint}"

    @torch.no_grad()
    def encode_images(self, images: list) -> Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            px = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i : i + self.batch_size]])
            out.append(self.model.encode_image(px.to(self.device)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_texts(self, captions: list[str]) -> Tensor:
        out = []
        for i in range(0, len(captions), self.batch_size):
            out.append(
                self.model.encode_text(self.tokenizer(captions[i : i + self.batch_size]).to(self.device)).float().cpu()
            )
        return torch.cat(out)


def load_embedder(spec: str, *, device: str | torch.device = "cpu") -> Embedder:
    """An embedder from a command-line spec:

    PATH                           a transformers CLIPModel folder
    openclip:MODEL:CHECKPOINT      an open_clip model and checkpoint file
    module.path:factory[:ARG]      any factory returning an ``Embedder`` (called with ARG if given)
    """
    if spec.startswith("openclip:"):
        _, model, ckpt = spec.split(":", 2)
        return OpenCLIPEmbedder(model, ckpt, device=device)
    if Path(spec).exists():
        return CLIPEmbedder(spec, device=device)
    if ":" in spec:
        module, _, rest = spec.partition(":")
        factory, _, arg = rest.partition(":")
        try:
            fn = getattr(importlib.import_module(module), factory)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"embedder {spec!r}: cannot import {module}:{factory} ({e})") from e
        emb = fn(arg) if arg else fn()
        if not isinstance(emb, Embedder):
            raise TypeError(f"embedder factory {spec!r} returned {type(emb).__name__}, not an Embedder")
        if not hasattr(emb, "name"):
            emb.name = spec
        return emb
    raise FileNotFoundError(f"embedder {spec!r}: no such CLIP folder, and not an openclip: or module:factory spec")
