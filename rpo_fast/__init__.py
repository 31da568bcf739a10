"""rpo_fast: preference alignment of text-to-image diffusion models (SD1.5 and SDXL UNets, SD3/SD3.5 and FLUX.1
transformers; a model family is one file in ``rpo_fast/models/``).

    from rpo_fast import PreferenceLoss
    loss_fn = PreferenceLoss("rpo", beta=5000.0, tau=0.5)
    out = loss_fn(model_pred, target, ref_pred, embeds_w=e_w, embeds_l=e_l)   # out.loss, out.metrics

Light to import: diffusers, deepspeed and bitsandbytes are imported where they are used.
"""

from .loss import PreferenceLoss, preference_loss, sample_errors
from .objectives import LossOutput, SampleErrors, per_sample_errors

__version__ = "0.1.0"
__all__ = ["PreferenceLoss", "preference_loss", "per_sample_errors", "sample_errors", "LossOutput", "SampleErrors"]
