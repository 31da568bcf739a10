"""The style-alignment metrics (Diffusion-RPO's task, our construction: see ``rpo_fast.data.style``): CLIP-FID
against the styled references and the style score, with bootstrap intervals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .stats import bootstrap_interval, frechet_distance


def read_style_references(path: str | Path) -> list:
    """The styled images: a style_data output (parquet shards: the winners, jpg_0) or a folder of images."""
    import io

    from PIL import Image

    path = Path(path)
    shards = [path] if path.suffix == ".parquet" else sorted(path.glob("*.parquet"))
    if shards:
        import pyarrow.parquet as pq

        return [
            Image.open(io.BytesIO(b)).convert("RGB")
            for s in shards
            for b in pq.read_table(s, columns=["jpg_0"])["jpg_0"].to_pylist()
        ]
    files = sorted(p for p in path.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not files:
        raise FileNotFoundError(f"--style-refs {path}: no parquet shards or images")
    return [Image.open(f).convert("RGB") for f in files]


def style_metrics(
    base_images: list, tuned_images: list, references: list, *, style: str, clip, inception=None, n_boot: int = 200
) -> dict:
    """CLIP-FID (Fréchet distance of L2-normalised CLIP image embeddings) of base and tuned samples to the styled
    references, Inception FID where available, and the CLIP style score 100 * cos(image, style description);
    each with a 95% bootstrap interval. ``clip`` is a CLIPEmbedder."""
    import torch.nn.functional as F

    from ..data.style import STYLES

    feats = {
        k: F.normalize(clip.encode_images(v), dim=-1).numpy()
        for k, v in (("base", base_images), ("tuned", tuned_images), ("refs", references))
    }
    text = F.normalize(clip.encode_texts([STYLES[style]["description"]]), dim=-1).numpy()[0]
    out = {"style": style, "description": STYLES[style]["description"], "references": len(references)}
    for name in ("base", "tuned"):
        fid = frechet_distance(feats[name], feats["refs"])
        lo, hi = bootstrap_interval(frechet_distance, feats[name], feats["refs"], n=n_boot)
        score = 100 * feats[name] @ text
        s_lo, s_hi = bootstrap_interval(np.mean, score, n=n_boot)
        out[name] = {
            "clip_fid": fid,
            "clip_fid_low": lo,
            "clip_fid_high": hi,
            "style_score": float(score.mean()),
            "style_score_low": s_lo,
            "style_score_high": s_hi,
        }
    if inception is not None:
        try:
            import torchvision  # noqa: F401
            from pytorch_fid.inception import InceptionV3  # noqa: F401
        except ImportError as e:
            out["inception_fid"] = f"not computed: {e.name} is not installed (GPU machine: pytorch-fid + torchvision)"
        else:
            out["inception_fid"] = {
                n: _inception_fid(imgs, references, inception)
                for n, imgs in (("base", base_images), ("tuned", tuned_images))
            }
    return out


def _inception_fid(images: list, references: list, weights) -> float:  # pragma: no cover - GPU machine only
    import torchvision.transforms.functional as TF
    from pytorch_fid.inception import InceptionV3

    model = InceptionV3([3], use_fid_inception=True, inception_weights_path=str(weights)).eval()

    def feats(ims):
        with torch.no_grad():
            x = torch.stack([TF.to_tensor(im.resize((299, 299))) for im in ims])
            return model(x)[0].squeeze(-1).squeeze(-1).numpy()

    return frechet_distance(feats(images), feats(references))
