"""Train the demo's base model and embedder from scratch on the synthetic task (about 50 minutes on 2 CPU cores).

    python -m rpo_fast.demo.pretrain --out rpo_fast/demo/assets

Writes ``OUT/base`` (a diffusers StableDiffusionPipeline folder: UNet, VAE, CLIP text encoder with the
byte-level tokenizer, DDPM scheduler; fp16 safetensors, under 4 MB) and ``OUT/clip`` (a tiny transformers
CLIPModel trained contrastively on (picture, caption), the embedder RPO's weights use), plus
``OUT/pretrain.json`` with the settings and final losses. Pictures are rendered on the fly from the whole
grammar of ``shapes`` with uniformly random colours, so the base model has no colour preference.

Stages: (1) the VAE (32px -> 4x16x16, MSE + 1e-5 KL), its scaling factor set to 1 / std of the latents;
(2) the UNet and the text encoder together on frozen-VAE latents (epsilon prediction, min-SNR-5 weights,
10% empty captions for classifier-free guidance, EMA 0.999 of the UNet kept and saved); (3) the embedder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import testing as T
from ..cli import run
from . import shapes as S

RES = 32
UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 48, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=RES,
)
TEXT = dict(
    T.TINY_TEXT_CONFIG,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=64,
    hidden_act="quick_gelu",
)
CLIP_TEXT = dict(TEXT, projection_dim=32)
CLIP_VISION = dict(
    image_size=RES,
    patch_size=4,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    hidden_act="quick_gelu",
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the OpenAI CLIP normalisation (CLIPImageProcessor's default)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def batch_of_pictures(rng: np.random.Generator, n: int, captions: list[str] | None = None):
    """n (caption, picture) with uniformly random colours: pixels (n, 3, 32, 32) in [-1, 1] and captions."""
    caps = captions if captions is not None else [S.CAPTIONS[i] for i in rng.integers(0, len(S.CAPTIONS), n)]
    imgs = [S.render(c, rng.uniform(), rng, RES) for c in caps]
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in imgs])).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0, caps


def _lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def _log(stage: str, step: int, total: int, loss: float, t0: float) -> None:
    rate = (step + 1) / (time.time() - t0)
    print(
        f"[pretrain] {stage} {step + 1}/{total} loss {loss:.4f} ({rate:.2f} steps/s, "
        f"{(total - step - 1) / rate / 60:.1f} min left)",
        flush=True,
    )


def train_vae(steps: int, rng: np.random.Generator, batch: int = 32):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=5e-4, weight_decay=0.0)
    t0, ema = time.time(), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, 5e-4, 100)
        x, _ = batch_of_pictures(rng, batch)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        loss = F.mse_loss(rec, x) + 1e-5 * dist.kl().mean() / (4 * 16 * 16)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if (step + 1) % 100 == 0:
            _log("vae", step, steps, ema, t0)
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(batch_of_pictures(rng, 256)[0]).latent_dist.sample() for _ in range(8)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae, ema


def train_unet(steps: int, vae, rng: np.random.Generator, batch: int = 64, lr: float = 3e-4):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(int(rng.integers(1 << 31)))
    unet = UNet2DConditionModel(**UNET)
    text = CLIPTextModel(CLIPTextConfig(**TEXT))
    tok = T.byte_level_clip_tokenizer()
    sched = T.build_scheduler("epsilon")
    ema = UNet2DConditionModel(**UNET)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    sf = vae.config.scaling_factor
    t0, avg = time.time(), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr)
        x, caps = batch_of_pictures(rng, batch)
        caps = ["" if rng.uniform() < 0.1 else c for c in caps]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample() * sf
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        t = torch.from_numpy(rng.integers(0, 1000, batch))
        noise = torch.randn_like(z)
        pred = unet(sched.add_noise(z, noise, t), t, text(ids)[0]).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 weighting (epsilon prediction)
        loss = (w * (pred - noise).square().mean(dim=(1, 2, 3))).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if (step + 1) % 100 == 0:
            _log("unet", step, steps, avg, t0)
    return ema.eval(), text.eval(), tok, sched, avg


def train_clip(steps: int, rng: np.random.Generator, batch: int = 128, lr: float = 1e-3):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(int(rng.integers(1 << 31)))
    model = CLIPModel(CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=32))
    tok = T.byte_level_clip_tokenizer()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    t0, avg = time.time(), None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, 100)
        caps = [S.CAPTIONS[i] for i in rng.choice(len(S.CAPTIONS), batch, replace=False)]
        x, _ = batch_of_pictures(rng, batch, caps)
        px = ((x + 1) / 2 - mean) / std  # CLIPImageProcessor at 32px: rescale, normalise (no resize, no crop)
        ids = tok(caps, padding="max_length", max_length=77, return_tensors="pt")
        loss = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask, pixel_values=px, return_loss=True).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if (step + 1) % 100 == 0:
            _log("clip", step, steps, avg, t0)
    return model.eval(), tok, avg


def save(out: Path, vae, unet, text, tok, sched, clip, clip_tok) -> None:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor

    out.mkdir(parents=True, exist_ok=True)
    pipe = StableDiffusionPipeline(
        vae=vae.half(),
        text_encoder=text.half(),
        tokenizer=tok,
        unet=unet.half(),
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "base")
    clip.half().save_pretrained(out / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": RES},
        crop_size={"height": RES, "width": RES},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(out / "clip")
    clip_tok.save_pretrained(out / "clip")


@dataclass
class PretrainConfig:
    """``python -m rpo_fast.demo.pretrain``'s command line."""

    out: str = field(
        default=str(Path(__file__).parent / "assets"), metadata=dict(help="where base/ and clip/ are written")
    )
    vae_steps: int = field(default=2000, metadata=dict(help="training steps of the VAE"))
    unet_steps: int = field(default=4500, metadata=dict(help="training steps of the UNet (with the text encoder)"))
    clip_steps: int = field(default=1000, metadata=dict(help="training steps of the CLIP embedder"))
    seed: int = field(default=0, metadata=dict(help="seed of the data and the initial weights"))
    threads: int = field(default=2, metadata=dict(help="torch threads (fixed: results do not follow the machine)"))


def main(argv: list[str] | None = None) -> None:
    run(
        PretrainConfig,
        argv,
        pretrain,
        prog="python -m rpo_fast.demo.pretrain",
        description=__doc__.split("\n\n")[0],
        epilog="example (rebuild the shipped assets in a scratch folder):\n"
        "  python -m rpo_fast.demo.pretrain --out /tmp/demo_assets",
        quiet=False,
    )


def pretrain(a: PretrainConfig) -> None:
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    t0 = time.time()
    vae, vae_loss = train_vae(a.vae_steps, rng)
    vae.requires_grad_(False)
    unet, text, tok, sched, unet_loss = train_unet(a.unet_steps, vae, rng)
    clip, clip_tok, clip_loss = train_clip(a.clip_steps, rng)
    out = Path(a.out)
    save(out, vae, unet, text, tok, sched, clip, clip_tok)
    info = dict(
        args=dataclasses.asdict(a),
        minutes=(time.time() - t0) / 60,
        final_loss=dict(vae=vae_loss, unet=unet_loss, clip=clip_loss),
        torch=torch.__version__,
        unet=UNET,
        vae=VAE,
        text=TEXT,
    )
    (out / "pretrain.json").write_text(json.dumps(info, indent=1, default=str))
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*.safetensors")}
    print(f"[pretrain] done in {info['minutes']:.1f} min; safetensors: {sizes}", flush=True)


if __name__ == "__main__":
    main()
