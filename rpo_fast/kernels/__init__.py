"""Fused backends of ``PreferenceLoss``: ``preference_loss`` (Triton) and ``native`` (C++/CUDA from csrc/), over
``shared``. Imported lazily: the native backend and the package work where Triton is not installed."""

import importlib

__all__ = ["fused_preference_loss", "preference_loss_op", "sample_errors_op"]


def __getattr__(name):
    if name in __all__:
        return getattr(importlib.import_module(".preference_loss", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
