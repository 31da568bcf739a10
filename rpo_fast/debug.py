"""Fault injection, for the tests of skipping, stopping and resuming (the trainer's ``--debug-*`` flags, hidden
from ``--help``). Everything here is a hook the trainer calls at one named point; none of it is in the step's
arithmetic. And ``HostSyncs``, which counts what makes the host wait for a tensor's value in a region (the step's
own code has none).

    --debug-nan-steps "STEP[@RANK],..."   that step's loss (and so its gradient) is NaN, on one rank with @RANK
    --debug-exit-after-step N            the process dies (exit 137, as a kill) after step N and its checkpoint
    --debug-kill-in-save N               the process dies while saving the checkpoint of step N (part written)
    --debug-dump-grads PATH              the policy's full (reduced, gathered) gradients of the first optimizer
                                         step, before it is taken, saved by rank 0 as safetensors (grad-sync test)
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from .objectives import LossOutput


class FaultInjection:
    def __init__(self, *, nan_steps: str, exit_after_step: int, kill_in_save: int, rank: int, dump_grads: str = ""):
        self.nan_steps = {
            int(s.split("@")[0]) for s in nan_steps.split(",") if s and ("@" not in s or int(s.split("@")[1]) == rank)
        }
        self.exit_after_step, self.kill_in_save = exit_after_step, kill_in_save
        self.rank, self.dump_grads = rank, dump_grads

    def after_backward(self, engine, step: int) -> None:
        """``--debug-dump-grads``: after the first optimizer step's last backward (before the step itself), every rank
        gathers each trainable parameter's full gradient as the optimizer will see it (reduced across ranks;
        DeepSpeed's ``safe_get_full_grad``, a collective), and rank 0 writes them to the path."""
        if not self.dump_grads or step != 0 or not engine.is_gradient_accumulation_boundary():
            return
        from deepspeed.utils import safe_get_full_grad
        from safetensors.torch import save_file

        grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
        if self.rank == 0:
            missing = [n for n, g in grads.items() if g is None]
            if missing:
                raise RuntimeError(f"--debug-dump-grads: no gradient for {missing[:3]} ({len(missing)} in all)")
            save_file({n: g.detach().float().cpu().contiguous() for n, g in grads.items()}, self.dump_grads)
        self.dump_grads = ""

    def poison_loss(self, loss_fn, step_in_progress: Callable[[], int]) -> None:
        """A forward hook on the training loss module: on the chosen steps its output is NaN."""
        if not self.nan_steps:
            return

        def hook(module, args, out: LossOutput):
            if step_in_progress() in self.nan_steps:
                nan = out.loss * float("nan")
                return LossOutput(nan, {**out.metrics, "loss": nan.detach()})
            return out

        loss_fn.register_forward_hook(hook)

    def before_save(self, step: int):
        """The checkpoint hook for ``step``: write part of the checkpoint, then die as a kill would (or None)."""
        if step != self.kill_in_save:
            return None

        def die(engine, root: Path, tag: str, state: dict):
            engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
            os._exit(137)

        return die

    def after_step(self, step: int) -> None:
        if step == self.exit_after_step:
            os._exit(137)  # a kill after this step (and its checkpoint, if one was due)


class HostSyncs:
    """Counts what in a region makes the host wait for a tensor's value, the one counter of the tests and the GPU
    check:

    - ``calls`` (``dispatch=True``, any device, a CPU included, where nothing actually waits): what needs a value on
      the host, as (what, where): ``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()``, ``.numpy()``, and the ops whose
      output size depends on the values (``nonzero``, ``masked_select``, ``unique``, indexing with a boolean mask...);
    - ``cuda_sites`` (on CUDA): CUDA's own count of synchronizing calls (``torch.cuda.set_sync_debug_mode("warn")``
      warns at each: ``.item()``, a blocking copy, ``nonzero``...) by the frame each warning names (file:line);
    - ``synchronizes`` (any device): the calls of the device-wide synchronize functions a step makes,
      ``torch.cuda.synchronize``, DeepSpeed's ``get_accelerator().synchronize`` and bitsandbytes' ``sync_gpu`` (on a
      CPU they do nothing, so their calls are what is counted; one inside another counts once);
    - ``reads``: ``calls`` without the methods that reach ``aten._local_scalar_dense`` (``.item()``, ``bool()``),
      each value read once.

    ``count`` and ``sites`` are CUDA's where it ran, else the dispatcher's. ``dispatch=False`` leaves the dispatcher
    alone (no overhead in a timed region: the GPU check's steps)::

        with HostSyncs() as syncs:
            trainer.forward_loss(...)
        assert not syncs.calls, syncs.calls          # [(what, where), ...]
    """

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__")

    def __init__(self, *, dispatch: bool = True):
        import torch

        aten = torch.ops.aten
        self.dispatch = dispatch
        self.ops = {
            aten._local_scalar_dense.default,
            aten.nonzero.default,
            aten.masked_select.default,
            aten._unique2.default,
            aten.unique_consecutive.default,
            aten.unique_dim.default,
            aten.repeat_interleave.Tensor,
        }
        self.masked = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}  # x[mask]: a nonzero
        self.calls: list[tuple[str, str]] = []
        self.cuda_sites: Counter = Counter()
        self.synchronizes: list[str] = []
        self.cuda = torch.cuda.is_available()
        self._in_sync = False

    @property
    def reads(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] not in ("Tensor.item", "Tensor.__bool__")]

    @property
    def count(self) -> int:
        return sum(self.cuda_sites.values()) if self.cuda else len(self.calls)

    @property
    def sites(self) -> Counter:
        return self.cuda_sites if self.cuda else Counter(where for _, where in self.calls)

    def _record(self, what: str) -> None:
        import threading
        import traceback

        if threading.get_ident() != self._thread:  # another thread's work (the loader's): not this region's
            return

        stack = traceback.extract_stack()[:-2]
        frames = [f for f in stack if "rpo_fast" in f.filename and "debug.py" not in f.filename]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        self.calls.append((what, where))

    def __enter__(self):
        import threading
        import warnings

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        self._thread = threading.get_ident()
        self._patch_synchronizes()
        if self.cuda:
            self._catch = warnings.catch_warnings(record=True)
            self._caught = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        if not self.dispatch:
            return self
        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in counter.ops or (func in counter.masked and _has_bool_index(args)):
                    counter._record(str(func))
                return func(*args, **(kwargs or {}))

        self._saved = {name: getattr(torch.Tensor, name) for name in self.METHODS}
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, self._wrap(name, method))
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def _wrap(self, name, method):
        def call(t, *args, **kwargs):
            self._record(f"Tensor.{name}")
            return method(t, *args, **kwargs)

        return call

    def _patch_synchronizes(self) -> None:
        """Wrap the synchronize functions that are loaded (owner, attribute name, label)."""
        import sys

        import torch

        targets = [(torch.cuda, "synchronize", "torch.cuda.synchronize")]
        if "bitsandbytes.optim.optimizer" in sys.modules:
            targets.append((sys.modules["bitsandbytes.optim.optimizer"], "sync_gpu", "bitsandbytes sync_gpu"))
        if "deepspeed.accelerator" in sys.modules:
            acc = sys.modules["deepspeed.accelerator"].get_accelerator()
            targets.append((acc, "synchronize", "deepspeed accelerator.synchronize"))
        self._synced = []
        for owner, name, label in targets:
            original = getattr(owner, name)
            self._synced.append((owner, name, original, name in vars(owner)))
            setattr(owner, name, self._wrap_sync(label, original))

    def _wrap_sync(self, label, original):
        def call(*args, **kwargs):
            if self._in_sync:
                return original(*args, **kwargs)
            self.synchronizes.append(label)
            self._in_sync = True
            try:
                return original(*args, **kwargs)
            finally:
                self._in_sync = False

        return call

    def __exit__(self, *exc):
        import torch

        for owner, name, original, own in self._synced:
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # the class's method shows through again
        if self.dispatch:
            self._mode.__exit__(*exc)
            for name, method in self._saved.items():
                setattr(torch.Tensor, name, method)
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(*exc)
            for w in self._caught:
                if "synchroniz" in str(w.message):
                    self.cuda_sites[f"{Path(w.filename).name}:{w.lineno}"] += 1
        return False


def _has_bool_index(args) -> bool:
    import torch

    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())
