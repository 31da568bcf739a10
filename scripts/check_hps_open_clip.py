"""Check rpo_fast's open_clip -> transformers weight mapping (the HPSv2 scorer) against open_clip's own forward,
on a CPU machine whose environment must not hold open_clip or torchvision.

    pip download open_clip_torch ftfy wcwidth --no-deps -d /tmp/oc
    for w in /tmp/oc/*.whl; do python -m zipfile -e "$w" /tmp/oc_src; done
    .venv/bin/python scripts/check_hps_open_clip.py /tmp/oc_src [ViT-H-14]

open_clip's model code runs unchanged from the unpacked wheel (nothing is installed); only torchvision, which
open_clip imports for its image transforms and a ResNet helper (neither is on this path), is replaced by an empty
stand-in while open_clip is imported. Random weights: the check is about the mapping, not the checkpoint.
Measured 2026-11-23 (open_clip 3.3.0, transformers 5.23, CPU): ViT-H-14 (986M parameters, the HPS model) image
and text features within 5e-6 of open_clip's, cosines within 4e-8; ViT-B-32 within 3e-6 and 6e-8.
"""

import sys
import time
import types

import torch
import torch.nn.functional as F
import transformers  # noqa: F401  (first: transformers probes for torchvision when imported)

from rpo_fast.scorers.hps import openclip_to_hf


class _Anything:
    def __init__(self, *args, **kwargs):
        pass


def _import_open_clip(src: str):
    sys.path.insert(0, src)
    names = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops"]
    names.append("torchvision.ops.misc")

    def attr(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything

    for name in names:
        module = types.ModuleType(name)
        module.__getattr__ = attr
        module.__file__ = f"<stand-in for {name}>"
        sys.modules[name] = module
    for name in names[1:]:
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, sys.modules[name])
    sys.modules["torchvision.transforms"].InterpolationMode = types.SimpleNamespace(
        BICUBIC="bicubic", BILINEAR="bilinear", NEAREST="nearest"
    )
    import open_clip

    for name in names:
        del sys.modules[name]
    return open_clip


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    open_clip = _import_open_clip(sys.argv[1])
    arch = sys.argv[2] if len(sys.argv) > 2 else "ViT-H-14"
    torch.manual_seed(0)
    t0 = time.time()
    model = open_clip.create_model(arch, pretrained=None).eval()
    n = sum(p.numel() for p in model.parameters())
    hf = openclip_to_hf(model.state_dict()).eval()
    pixels = torch.randn(2, 3, 224, 224)
    ids = open_clip.get_tokenizer(arch)(["a photo of a cat", "a dog on a red sofa"])
    with torch.no_grad():
        img_a, txt_a = model.encode_image(pixels), model.encode_text(ids)
        img_b = hf.visual_projection(hf.vision_model(pixel_values=pixels).pooler_output)
        txt_b = hf.text_projection(hf.text_model(input_ids=ids).pooler_output)
    cos_a = F.normalize(img_a, dim=-1) @ F.normalize(txt_a, dim=-1).T
    cos_b = F.normalize(img_b, dim=-1) @ F.normalize(txt_b, dim=-1).T
    d_img, d_txt, d_cos = ((a - b).abs().max().item() for a, b in ((img_a, img_b), (txt_a, txt_b), (cos_a, cos_b)))
    print(f"open_clip {open_clip.__version__}, {arch}, {n / 1e6:.0f}M parameters, {time.time() - t0:.0f} s")
    print(f"max |difference|: image features {d_img:.1e}, text features {d_txt:.1e}, cosines {d_cos:.1e}")
    ok = d_img < 1e-4 and d_txt < 1e-4 and d_cos < 1e-5
    print("the mapping equals open_clip's forward" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
