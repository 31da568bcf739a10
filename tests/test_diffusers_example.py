"""The worked example of docs/loss.md: the few lines that replace the loss block of diffusers'
examples/research_projects/diffusion_dpo/train_diffusion_dpo.py give the same value, gradient and implicit
accuracy. Its beta_dpo is our beta / 2 (its default 2500 is our 5000)."""

import torch
import torch.nn.functional as F
from helpers import assert_close

from rpo_fast import PreferenceLoss


def script_loss_block(model_pred, target, ref_preds, beta_dpo):
    """The loss block of train_diffusion_dpo.py ("sigmoid" loss type), as the script computes it."""
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():
        ref_loss = F.mse_loss(ref_preds.float(), target.float(), reduction="none")
        ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
        ref_losses_w, ref_losses_l = ref_loss.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    logits = ref_diff - model_diff
    loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
    implicit_acc = (logits > 0).sum().float() / logits.size(0)
    implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
    return loss, implicit_acc


def test_readme_replacement_matches_the_diffusers_script():
    g = torch.Generator().manual_seed(0)
    b, beta_dpo = 4, 25.0
    latents_in = torch.randn(2 * b, 4, 8, 8, generator=g)
    noise = torch.randn(b, 4, 8, 8, generator=g).repeat(2, 1, 1, 1)  # the script's shared noise
    theta0 = 1 + 0.05 * torch.randn(4, 1, 1, generator=g)
    ref_preds = latents_in * (1 + 0.05 * torch.randn(4, 1, 1, generator=g))

    theta_a = torch.nn.Parameter(theta0.clone())
    loss_a, acc_a = script_loss_block(theta_a * latents_in, noise, ref_preds, beta_dpo)
    loss_a.backward()

    # --- the replacement shown in docs/loss.md ---
    theta_b = torch.nn.Parameter(theta0.clone())
    model_pred, target = theta_b * latents_in, noise
    loss_fn = PreferenceLoss("dpo", beta=2 * beta_dpo)
    out = loss_fn(model_pred, target, ref_preds)
    loss, implicit_acc = out.loss, out.metrics["implicit_acc"]
    # ---
    loss.backward()

    assert_close("loss", loss, loss_a, atol=0, rtol=1e-5)
    assert_close("grad", theta_b.grad, theta_a.grad, atol=1e-6, rtol=1e-4)
    assert implicit_acc == acc_a
    assert 0 < acc_a < 1  # a mixed batch, so the accuracy comparison can fail
