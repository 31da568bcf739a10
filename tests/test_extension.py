"""What an extension costs, with nothing else edited to admit it: a new objective is one table row (its eager function
and its float64 test here) and trains a step; it has no fused kernel, so ``auto`` runs it eagerly on a CPU (compiled
on CUDA), and the fused backends refuse it by name. A new model family is one class (here, in this file): it is
detected, cached through its declarations and trains a step."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from trainrun import in_process_trainer

from rpo_fast import PreferenceLoss
from rpo_fast.models import FAMILIES, ModelFamily, load_family
from rpo_fast.models.noising import DDPMNoising
from rpo_fast.objectives import (
    BETA,
    OBJECTIVE_TABLE,
    LossOutput,
    Objective,
    SampleErrors,
    pair_metrics,
    register,
)


def squared_margin_loss(err: SampleErrors, *, beta: float, margin: float) -> LossOutput:
    """A throwaway IPO-like objective: L = mean_i (u_i - margin)^2, u_i = -(beta / 2)(delta^w_i - delta^l_i)."""
    b = err.m.shape[0] // 2
    h_w, h_l = -(beta / 2) * err.delta[:b], -(beta / 2) * err.delta[b:]
    u = h_w - h_l
    loss = (u - margin).square().mean()
    return LossOutput(loss, pair_metrics(loss, u, h_w, h_l, err))


ROW = Objective(
    "squared-margin",
    lambda err, x, o: squared_margin_loss(err, beta=o["beta"], margin=o["margin"]),
    dict(beta=BETA, margin=(1.0, lambda name, v: float(v))),
    fused=False,
)


@pytest.fixture
def squared_margin():
    register(ROW)
    yield ROW
    del OBJECTIVE_TABLE[ROW.name]


def _float64_reference(p, t, q, beta, margin):
    """The objective from the predictions, in float64, written out independently of rpo_fast."""
    p, t, q = (x.double().flatten(1) for x in (p, t, q))
    m, r = (p - t).square().mean(1), (q - t).square().mean(1)
    b = p.shape[0] // 2
    u = -(beta / 2) * ((m[:b] - r[:b]) - (m[b:] - r[b:]))
    return (u - margin).square().mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["eager", "compile", "auto"])
def test_a_table_row_is_an_objective_against_float64(squared_margin, dtype, backend):
    """Fresh random inputs (odd sizes, a non-contiguous model_pred), loss and gradient against float64.
    Tolerances: the loss 1e-4 relative for every dtype (bf16 / fp16 inputs are rounded before both sides see
    them, and the loss accumulates in fp32); the gradient 1e-4 in fp32, 2e-2 in bf16 / fp16 (it is rounded to the
    input's dtype)."""
    g = torch.Generator().manual_seed(7)
    b, shape = 3, (3, 5, 7)
    q = torch.randn(2 * b, *shape, generator=g).to(dtype)
    t = torch.randn(2 * b, *shape, generator=g).to(dtype)
    p = (q.float() + 0.01 * torch.randn(2 * b, *shape, generator=g)).to(dtype)
    p = p.transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_(True)  # not contiguous
    assert not p.is_contiguous()
    want_p = p.detach().double().requires_grad_(True)
    want = _float64_reference(want_p, t, q, beta=500.0, margin=0.3)
    want.backward()
    loss_fn = PreferenceLoss("squared-margin", backend=backend, beta=500.0, margin=0.3)
    out = loss_fn(p, t, q)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), want, rtol=1e-4, atol=0)
    torch.testing.assert_close(p.grad.double(), want_p.grad, rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=1e-6)
    assert set(out.metrics) == set(ROW.metrics)


def test_the_fused_backends_refuse_an_objective_without_a_kernel(squared_margin):
    for backend in ("triton", "native"):
        with pytest.raises(ValueError, match="'squared-margin' has no fused kernel"):
            PreferenceLoss("squared-margin", backend=backend)


def test_a_table_row_trains_a_step(squared_margin, runs, tmp_path, capsys):
    """The trainer takes the new --objective (its choices are the table's), runs it on the eager backend on a
    CPU and says so; at step 0 the policy is the reference, u = 0 and the loss is margin^2 = 1."""
    trainer = in_process_trainer(runs, tmp_path / "run", objective="squared-margin", max_steps=2)
    assert "loss backend eager" in trainer._summary()
    trainer.train_step()
    first = trainer.metrics.mean(trainer.device)
    trainer.train_step()
    second = trainer.metrics.mean(trainer.device)
    trainer.close()
    assert first["loss"] == pytest.approx(1.0, abs=1e-6) and first["implicit_acc"] == 0.5
    assert second["loss"] != first["loss"] and torch.isfinite(torch.tensor(second["loss"]))


# --------------------------------------------------------------------------------------------------
# A throwaway family, in this file only: a per-caption attention mask (a per-caption tensor whose name is not
# "...prompt_embeds") and a deterministic latent encoder (no latent_dist, as SANA's DC-AE), on the tiny SD1.5 parts.
# --------------------------------------------------------------------------------------------------


class _DeterministicEncoder(torch.nn.Module):
    """A VAE whose ``encode`` gives ``.latent`` (the KL VAE's mode), as a deterministic autoencoder does."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def encode(self, pixels):
        return SimpleNamespace(latent=self.vae.encode(pixels).latent_dist.mode())


class MaskedTextFamily(DDPMNoising, ModelFamily):
    name = "masked-text"
    encoder_folders = ("text_encoder", "tokenizer")
    caption_keys = ("prompt_embeds", "prompt_mask")
    latent_distribution = False

    @classmethod
    def detect(cls, model_index, denoiser_config):
        return model_index is not None and model_index.get("_class_name") == "MaskedTextPipeline"

    def denoiser_class(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def load_vae(self, *, device="cpu", dtype=torch.float32):
        return _DeterministicEncoder(super().load_vae(device=device, dtype=dtype))

    def load_text_encoders(self, *, device="cpu", dtype=torch.float32):
        from transformers import CLIPTextModel, CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(self.path, subfolder="tokenizer")
        return tok, CLIPTextModel.from_pretrained(self.path, subfolder="text_encoder", dtype=dtype).to(device).eval()

    @torch.no_grad()
    def encode_texts(self, encoders, captions):
        tok, enc = encoders
        ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        mask = ids.attention_mask.to(enc.device)
        return {"prompt_embeds": enc(ids.input_ids.to(enc.device), attention_mask=mask)[0].float(), "prompt_mask": mask}

    def caption_shapes(self):
        return {"prompt_embeds": (77, self.config("text_encoder")["hidden_size"]), "prompt_mask": (77,)}

    def conditioning(self, batch, drop, empty, *, pairs=True):
        n = 2 if pairs else 1
        ehs = torch.where(drop[:, None, None], empty["prompt_embeds"], batch["prompt_embeds"])
        mask = torch.where(drop[:, None], empty["prompt_mask"], batch["prompt_mask"])
        return dict(encoder_hidden_states=ehs.repeat(n, 1, 1), encoder_attention_mask=mask.repeat(n, 1))


del FAMILIES[MaskedTextFamily.name]  # registered by the fixture below, for its tests only


@pytest.fixture(scope="module")
def masked_text(tmp_path_factory):
    """The family registered, a tiny model folder of it, and a cache of the warm-preference pairs built by it."""
    from rpo_fast import testing as T
    from rpo_fast.data.writer import build_cache

    FAMILIES[MaskedTextFamily.name] = MaskedTextFamily
    root = tmp_path_factory.mktemp("masked")
    model = T.save_tiny_pipeline(root / "masked", "sd15")
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps(index | {"_class_name": "MaskedTextPipeline"}))
    pairs = T.write_warm_preference_pairs(root / "warm", 8, seed=0)
    build_cache(model, pairs, root / "cache_masked", resolution=32, progress=False, rank=0, world=1)
    yield dict(root=root, masked=model)
    del FAMILIES[MaskedTextFamily.name]


def test_a_family_in_one_file_caches_its_declared_conditioning(masked_text):
    """The cache keeps the declared per-caption mask per caption (not per pair, an integer tensor not cast to the
    storage dtype), the latents of a deterministic encoder with a zero std, and records the caption keys."""
    from rpo_fast.data.dataset import CachedPairs

    assert load_family(masked_text["masked"]).name == "masked-text"
    cache = CachedPairs(masked_text["root"] / "cache_masked")
    assert cache.caption_keys == ("prompt_embeds", "prompt_mask")
    item = cache[3]
    assert item["prompt_mask"].shape == (77,) and 0 < item["prompt_mask"].sum() < 77
    assert item["latent_std"].abs().max() == 0 and item["latent_mean"].abs().max() > 0
    assert cache._handle(0).get_slice("prompt_mask").get_dtype() == "I64"


def test_a_family_in_one_file_trains_a_step(masked_text, tmp_path):
    """DPO on the throwaway family: at step 0 the policy is the reference (loss log 2), then it moves."""
    trainer = in_process_trainer(masked_text, tmp_path / "run", kind="masked", max_steps=2)
    assert trainer.family.name == "masked-text"
    trainer.train_step()
    first = trainer.metrics.mean(trainer.device)
    trainer.train_step()
    second = trainer.metrics.mean(trainer.device)
    trainer.close()
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert second["loss"] != first["loss"] and math.isfinite(second["loss"])
