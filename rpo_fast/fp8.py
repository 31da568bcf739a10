"""FP8 matmuls for the denoiser's linear layers (``--fp8``): torchao's float8 training.

    check_fp8()                                   # torchao present, the GPU able (sm_89+), before anything loads
    n = convert_fp8(denoiser, recipe="tensorwise", emulate=False)   # policy and reference alike

Every ``nn.Linear`` whose in and out features are multiples of 16 (what the FP8 matmul takes) becomes torchao's
``Float8Linear``. In each forward the input x and the weight W, and in backward the output's gradient g, are scaled
and cast to FP8, and the matmul runs on the FP8 tensor cores (``torch._scaled_mm``, whose inner and output dimensions
must be multiples of 16: the token count, dW's inner dimension, is padded with zeros where it is not):

    s_x = max_e4m3 / amax(|x|)           (tensorwise: one scale per tensor; rowwise: one per row)
    x8 = e4m3(x * s_x),  W8 = e4m3(W * s_W),  g8 = e5m2(g * s_g)
    y = (x8 @ W8^T) / (s_x s_W) + b,     dx = (g8 @ W8) / (s_g s_W),  dW = (g8^T @ x8) / (s_g s_x)

The parameters stay what they were (bf16 under the engine, fp32 master weights in the optimizer): only the matmuls
change, so checkpoints and the export are the plain model's. Convolutions, norms and attention stay bf16. The layers
converted hold 64% of SDXL's forward FLOPs at 1024px and 29% of SD1.5's at 512px (counted on the meta device with
torch's FlopCounterMode and flash attention), and nearly all of a flow transformer's.

The reference gets the same conversion, so policy and reference still agree to the bit at step 0. FP8 needs an
Ada/Hopper-class GPU or newer (compute capability 8.9+). On a CPU (the tests) torchao emulates it: the same FP8
casts, the matmul in higher precision; it shows the numerics, not the speed. In eager mode each cast is a few small
kernels: use it with ``--compile-mode regional`` or ``whole``, which fuses them into their neighbours.
"""

from __future__ import annotations

import importlib.util

import torch

RECIPES = ("tensorwise", "rowwise")
MULTIPLE = 16  # torch._scaled_mm's dimension rule


def check_fp8() -> None:
    """The errors of ``--fp8`` that need no model: torchao missing, or a CUDA GPU without FP8 matmuls."""
    if importlib.util.find_spec("torchao") is None:
        raise ValueError("--fp8 needs torchao: pip install 'rpo_fast[fp8]' (or pip install torchao)")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name()
            raise ValueError(
                f"--fp8 needs FP8 matmuls (compute capability 8.9+: Ada, Hopper or newer); this {name} is "
                f"sm_{major}{minor}: drop --fp8"
            )


def fp8_eligible(module: torch.nn.Module, name: str = "") -> bool:
    """Whether a layer gets FP8 matmuls: a linear layer whose both dimensions are multiples of 16."""
    return (
        isinstance(module, torch.nn.Linear)
        and module.in_features % MULTIPLE == 0
        and module.out_features % MULTIPLE == 0
    )


def convert_fp8(model: torch.nn.Module, *, recipe: str = "tensorwise", emulate: bool = False) -> int:
    """Swap the eligible linear layers of ``model`` for torchao's ``Float8Linear`` in place (the parameters are the
    same tensors); returns how many were swapped. ``emulate``: the FP8 casts with a high-precision matmul (CPU)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    if recipe not in RECIPES:
        raise ValueError(f"--fp8-recipe must be one of {', '.join(RECIPES)}; got {recipe!r}")
    config = Float8LinearConfig.from_recipe_name(recipe)
    # pad_inner_dim: the weight gradient's inner dimension is the token count (2 for the time embeddings, 2 x 77
    # for SDXL's cross-attention keys at one pair), which _scaled_mm refuses unless it is a multiple of 16
    config = Float8LinearConfig(**{**config.__dict__, "emulate": emulate, "pad_inner_dim": True})
    before = sum(1 for m in model.modules() if fp8_eligible(m))
    convert_to_float8_training(model, module_filter_fn=fp8_eligible, config=config)
    if recipe == "rowwise":  # torchao 0.18's rowwise cast fails on a non-contiguous input (a permuted view)
        for m in model.modules():
            if is_fp8(m):
                m.__class__ = _contiguous_input_class()
    return before


def is_fp8(module: torch.nn.Module) -> bool:
    from torchao.float8.float8_linear import Float8Linear

    return isinstance(module, Float8Linear)


_CONTIGUOUS = None


def _contiguous_input_class():
    """Float8Linear that makes its input contiguous first: diffusers' transformer blocks hand ``proj_in`` a permuted
    view, which torchao's rowwise cast refuses ("aten.clone.default with axiswise scaling is not supported yet")."""
    global _CONTIGUOUS
    if _CONTIGUOUS is None:
        from torchao.float8.float8_linear import Float8Linear

        class Float8LinearContiguousInput(Float8Linear):
            def forward(self, input: torch.Tensor) -> torch.Tensor:
                return super().forward(input.contiguous())

        _CONTIGUOUS = Float8LinearContiguousInput
    return _CONTIGUOUS
