"""Fault injection, for the tests of skipping, stopping and resuming (the trainer's ``--debug-*`` flags, hidden
from ``--help``). Everything here is a hook the trainer calls at one named point; none of it is in the step's
arithmetic.

    --debug-nan-steps "STEP[@RANK],..."   that step's loss (and so its gradient) is NaN, on one rank with @RANK
    --debug-exit-after-step N            the process dies (exit 137, as a kill) after step N and its checkpoint
    --debug-kill-in-save N               the process dies while saving the checkpoint of step N (part written)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .objectives import LossOutput


class FaultInjection:
    def __init__(self, *, nan_steps: str, exit_after_step: int, kill_in_save: int, rank: int):
        self.nan_steps = {
            int(s.split("@")[0]) for s in nan_steps.split(",") if s and ("@" not in s or int(s.split("@")[1]) == rank)
        }
        self.exit_after_step, self.kill_in_save = exit_after_step, kill_in_save

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
