"""Activation recompute for the policy denoiser, and what each choice costs, counted on the meta device.

    apply_recompute(unet, "selective")        # none | selective | full
    cost = step_cost(family, "selective")     # FLOPs and activation bytes of one policy forward + backward

``full`` is diffusers' gradient checkpointing: every resnet and transformer call of every block keeps only its
inputs and runs its forward again in backward (+1 forward of the blocks: about +33% of the policy's FLOPs).
``selective`` checkpoints the same calls with a save list (torch's selective activation checkpointing): the outputs
of the matmul-class ops (convolutions, linear layers, attention) are kept, everything else of the call
(GroupNorm/LayerNorm, SiLU/GELU, the residual adds, the attention reshapes) is recomputed in backward. Those ops
hold about half of the activation memory and almost no FLOPs: recomputing them costs memory bandwidth, not
matmuls.

Why not "recompute the highest-resolution blocks only": counted with flash attention (what SDPA runs on a GPU in
bf16), a UNet's activation bytes per FLOP are nearly the same at every resolution level (SDXL: 0.84 GiB for 6.7% of
the FLOPs at 128x128, 7.16 GiB for 57.5% at 32x32, per two images at 1024px), so checkpointing whole levels trades
memory for FLOPs at the same rate as ``full`` on a part of the model. Only with the math attention (the attention
matrix saved) does the highest resolution dominate. ``activation_profile`` gives the per-level figures.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

RECOMPUTE = ("none", "selective", "full")

aten = torch.ops.aten
# What selective recompute keeps: the ops whose FLOPs are the model's (recomputing them would cost matmul time).
SAVED_OPS = {
    aten.convolution.default,
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.baddbmm.default,
    aten._scaled_mm.default,  # --fp8's matmuls
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _policy(ctx, func, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if func in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(module, *args):
    """diffusers' checkpoint call (``module._gradient_checkpointing_func(module, *args)``) with the save list."""
    return checkpoint(
        module.__call__, *args, use_reentrant=False, context_fn=partial(create_selective_checkpoint_contexts, _policy)
    )


def apply_recompute(denoiser: torch.nn.Module, mode: str) -> None:
    """Set the recompute of a diffusers denoiser: ``none``, ``selective`` or ``full`` (see the module's doc)."""
    if mode not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}; got {mode!r}")
    if mode == "none":
        if getattr(denoiser, "is_gradient_checkpointing", False):
            denoiser.disable_gradient_checkpointing()
    elif mode == "full":
        denoiser.enable_gradient_checkpointing()
    else:  # the calls diffusers checkpoints (a UNet block's resnets, a transformer's layers), with the save list
        denoiser.enable_gradient_checkpointing(selective_checkpoint)


# --------------------------------------------------------------------------------------------------
# Counting on the meta device
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def flash_attention():
    """SDPA as the flash kernel (what a GPU runs in bf16): on the meta device SDPA otherwise decomposes into the math
    path, whose saved attention matrix would dominate every memory count, and its FLOPs are the flash kernel's."""
    F = torch.nn.functional
    plain = F.scaled_dot_product_attention

    def sdpa(q=None, k=None, v=None, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        q, k, v = kw.pop("query", q), kw.pop("key", k), kw.pop("value", v)  # diffusers' dispatcher passes keywords
        if not kw.get("enable_gqa", True):
            del kw["enable_gqa"]
        if attn_mask is not None or kw:
            return plain(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = plain


class _SavedBytes(TorchDispatchMode):
    """Counts the bytes autograd keeps for backward: tensors saved by ops outside checkpointed regions (a
    saved-tensors hook), the inputs a checkpointed call keeps, and the outputs selective recompute keeps (seen
    here, below its caching mode, when the save list says so). Storages are counted once; parameters not at all."""

    def __init__(self, params: set[int]):
        super().__init__()
        self.params, self.bytes, self.selective = params, {}, False

    def add(self, t: torch.Tensor) -> None:
        if isinstance(t, torch.Tensor):
            key = t.untyped_storage()._cdata
            if key not in self.params:
                self.bytes.setdefault(key, t.untyped_storage().nbytes())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in SAVED_OPS and self.selective:
            for o in out if isinstance(out, tuple | list) else (out,):
                self.add(o)
        return out

    def total(self) -> int:
        return sum(self.bytes.values())


def _conv_backward_flop(
    grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed, *args, **kwargs
) -> int:
    """A convolution's backward: the forward's count for each gradient asked (input, weight). torch's own formula
    counts a grouped convolution's backward as a dense one, ``groups`` times too many (SANA 1.6B's depthwise
    convolutions: a 1024 px pair's step counted 116 TFLOP for its 24); for groups = 1 the two agree."""
    from torch.utils.flop_counter import conv_flop_count

    output_mask = args[2]  # after _output_padding and _groups
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter():
    """torch's ``FlopCounterMode`` with the grouped-convolution backward counted right (``_conv_backward_flop``)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})


def step_cost(family, recompute: str, *, rows: int = 2, dtype=torch.bfloat16) -> dict:
    """One policy forward + backward of ``family``'s full-size denoiser (its config, random weights on the meta
    device) on ``rows`` images: {"forward_flops", "hardware_flops" (forward + backward + recompute, flash attention's
    backward counted as it runs), "activation_bytes" (kept for backward after the forward)}."""

    denoiser, x, t, cond = _on_meta(family, rows, dtype)
    apply_recompute(denoiser, recompute)
    counter = _SavedBytes({p.untyped_storage()._cdata for p in denoiser.parameters()})
    for m in denoiser.modules():  # a checkpointed call keeps its inputs
        if getattr(m, "gradient_checkpointing", False):
            m._gradient_checkpointing_func = _counting(m._gradient_checkpointing_func, counter)
    flops = flop_counter()
    with flash_attention(), flops, torch.autograd.graph.saved_tensors_hooks(_keep(counter), lambda t: t):
        with counter:
            out = family.predict(denoiser, x, t, cond)
        forward = flops.get_total_flops()
        saved = counter.total()
        out.float().sum().backward()
    return dict(forward_flops=forward, hardware_flops=flops.get_total_flops(), activation_bytes=saved)


def _on_meta(family, rows: int, dtype):
    """The family's denoiser from its config and random inputs of ``rows`` images, on the meta device."""
    from .models import cast_conditioning

    with torch.device("meta"):
        denoiser = family.denoiser_class().from_config(family.config(family.denoiser_folder))
        x, t, cond = family.dummy_inputs(rows)
    torch.nn.Module.to(denoiser, dtype)  # (diffusers' own .to warns about fp32 modules: this model has none)
    return denoiser, x.to(dtype), t, cast_conditioning(cond, dtype)


def _keep(counter: _SavedBytes):
    def pack(t):
        counter.add(t)
        return t

    return pack


def _counting(fn, counter: _SavedBytes):
    def call(module, *args):
        for a in args:
            counter.add(a)
        before, counter.selective = counter.selective, fn is selective_checkpoint
        try:
            return fn(module, *args)
        finally:
            counter.selective = before

    return call


def _enter(where: list, label: str, module, args) -> None:
    where.append(label)


def _leave(where: list, module, args, out) -> None:
    where.pop()


def activation_profile(family, *, rows: int = 2, dtype=torch.bfloat16) -> dict[str, tuple[int, float]]:
    """Without recompute: {block: (activation bytes, share of the forward FLOPs)} per top-level block of the
    denoiser (for a UNet: conv_in, time_embedding, down_blocks.i, mid_block, up_blocks.i, ...)."""

    denoiser, x, t, cond = _on_meta(family, rows, dtype)
    params = {p.untyped_storage()._cdata for p in denoiser.parameters()}
    where, seen = ["other"], {}
    blocks = []
    for name, child in denoiser.named_children():
        items = list(child.named_children()) if isinstance(child, torch.nn.ModuleList) else [(None, child)]
        for i, m in items:
            label = name if i is None else f"{name}.{i}"
            blocks.append(label)
            m.register_forward_pre_hook(partial(_enter, where, label))
            m.register_forward_hook(partial(_leave, where))

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            seen.setdefault(key, (where[-1], t.untyped_storage().nbytes()))
        return t

    flops = flop_counter()
    with flash_attention(), flops, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        family.predict(denoiser, x, t, cond)
    total = flops.get_total_flops()
    per_module = flops.get_flop_counts()
    by = defaultdict(int)
    for label, nbytes in seen.values():
        by[label] += nbytes
    top = type(denoiser).__name__
    return {b: (by[b], sum(per_module.get(f"{top}.{b}", {}).values()) / total) for b in blocks if by[b]}
