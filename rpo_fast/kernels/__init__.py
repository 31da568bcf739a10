"""Triton kernels. ``preference_loss``: the fused error pass, pairwise loss and backward of every objective."""

from .preference_loss import fused_preference_loss, preference_loss_op

__all__ = ["fused_preference_loss", "preference_loss_op"]
