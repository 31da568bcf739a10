"""Known log noise of the dependencies, silenced where it says nothing a user can act on.

``quiet_known_noise()`` runs first in every CLI of rpo_fast (``RPO_FAST_VERBOSE=1`` turns it off and shows
everything). It drops exactly these messages and nothing else of their loggers:

- DeepSpeed's "Setting accelerator to CPU" at every import on a machine without CUDA (one per process: six in a
  2-rank demo): ``DS_ACCELERATOR=cpu`` is set where torch sees no CUDA device, which is what DeepSpeed detects
  anyway, so it is not said again in every rank;
- DeepSpeed's "You are using ZeRO with an untested optimizer": bitsandbytes' 8-bit optimizers and Adafactor under
  ZeRO are what rpo_fast tests (on CPU ranks, ZeRO-2 and ZeRO-3);
- transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..." (and the same
  for other processors): torchvision is kept out of CPU environments on purpose, and the PIL processor is the one
  the models were trained with;
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community": a 4-bit inference kernel that
  rpo_fast never calls, and the kernels hub's "Skipping publisher trust check" for it with ``HF_HUB_OFFLINE=1``;
- DeepSpeed's "DeepSpeed deepspeed_shm_comm built successfully", printed by every CPU rank at every start
  (``distributed.quiet_shm_op_load``);
- transformers' and diffusers' loading bars ("Loading weights", "Loading pipeline components"): a bar for a load
  that a command announces itself (``quiet_loading_bars``);
- with torchao installed (``--fp8``): torchao's "Failed to load .../torchao/_C_...so" for its CUDA-only libraries
  on a machine without CUDA, diffusers' "Unable to import `torchao` Tensor objects" (loading torchao-quantized
  checkpoints, which rpo_fast does not do) and torch's "... is an Enum subclass and is now natively supported" at
  torchao's import (a deprecation inside torchao).
"""

from __future__ import annotations

import logging
import os

# logger name -> the part of a message that marks it as the noise above
NOISE = {
    "DeepSpeed": "You are using ZeRO with an untested optimizer",
    "transformers.utils.import_utils": "requires torchvision (not installed); falling back to",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "kernels._internals.hf_hub": "Skipping publisher trust check",
    "torchao": "/torchao/_C",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
    "torch.utils._pytree": "is an Enum subclass and is now natively supported by torch.compile",
}


class _DropKnown(logging.Filter):
    def __init__(self, part: str):
        super().__init__()
        self.part = part

    def filter(self, record: logging.LogRecord) -> bool:
        return self.part not in record.getMessage()


_done = False


def quiet_known_noise() -> None:
    """Install the filters and ``DS_ACCELERATOR`` (once per process; child processes inherit the variable)."""
    global _done
    if _done or os.environ.get("RPO_FAST_VERBOSE") == "1":
        return
    _done = True
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    for name, part in NOISE.items():
        logging.getLogger(name).addFilter(_DropKnown(part))
    quiet_loading_bars()


def quiet_loading_bars() -> None:
    """Drop transformers' and diffusers' progress bars ("Loading weights", "Loading pipeline components")."""
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
