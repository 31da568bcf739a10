"""The training order and its reading: the seeded, resumable sampler of pair indices across data-parallel ranks
(``PairSampler``) and the loader that reads its batches ahead on a background thread (``PrefetchLoader``)."""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch

from ..seeding import seed_of
from .dataset import collate


class Pick(NamedTuple):
    """One pair of a batch: its index in the dataset, whether its mirrored twin is used, and the epoch it falls in.
    A pair is drawn at most once per epoch, so (index, epoch) names each of its uses: the key of its random draws
    (``Trainer.pair_seeds``) and of its reference errors in a precomputed table."""

    index: int
    flip: bool
    epoch: int


class PairSampler:
    """Shuffles pair indices by seed and epoch and splits them across data-parallel ranks (each rank gets
    n // world per epoch, the tail dropped). Stateful: ``state_dict`` (epoch, position) resumes exactly.
    With ``twins`` it also draws, per epoch and pair, which of the cached flip variants to use."""

    def __init__(
        self, n: int, *, seed: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True, twins: bool = False
    ):
        if n < world:
            raise ValueError(f"{n} pairs cannot be split across {world} ranks")
        self.n, self.seed, self.rank, self.world, self.shuffle, self.twins = n, seed, rank, world, shuffle, twins
        self.epoch, self.position = 0, 0
        self._order = None

    def order_and_flips(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's permutation of all pairs and each pair's twin flip (indexed by pair), from (seed, epoch)."""
        g = torch.Generator().manual_seed(seed_of(self.seed, epoch))
        perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        flips = torch.rand(self.n, generator=g) < 0.5 if self.twins else torch.zeros(self.n, dtype=torch.bool)
        return perm, flips

    def _epoch_order(self) -> tuple[list[int], list[bool]]:
        """This rank's pairs of the epoch and their twin flips, as Python lists (read once per epoch, not per batch)."""
        perm, flips = self.order_and_flips(self.epoch)
        per_rank = self.n // self.world
        mine = perm[self.rank :: self.world][:per_rank]
        return mine.tolist(), flips[mine].tolist()

    def next_batch(self, size: int) -> list[Pick]:
        """The next ``size`` picks of this rank, crossing epoch boundaries as needed."""
        out = []
        while len(out) < size:
            if self._order is None:
                self._order = self._epoch_order()
            idx, flips = self._order
            take = min(size - len(out), len(idx) - self.position)
            span = slice(self.position, self.position + take)
            out += [Pick(i, f, self.epoch) for i, f in zip(idx[span], flips[span])]
            self.position += take
            if self.position == len(idx):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return out

    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, position=self.position, seed=self.seed, n=self.n, world=self.world)

    def load_state_dict(self, state: dict) -> None:
        if (state["n"], state["world"], state["seed"]) != (self.n, self.world, self.seed):
            raise ValueError(
                f"sampler state is for {state['n']} pairs, {state['world']} ranks, seed {state['seed']}; "
                f"this run has {self.n}, {self.world}, {self.seed}"
            )
        self.epoch, self.position, self._order = state["epoch"], state["position"], None


class PrefetchLoader:
    """The training batches, read ahead: each micro-step's pairs are drawn from the sampler on the main thread (so
    its order is the sampler's), read from the dataset by a background thread ``depth`` batches ahead, pinned when
    the device is a GPU, and copied with ``non_blocking``: the step never waits for the disk, and no copy waits for
    the stream. ``depth=0`` reads on the main thread.

    ``state_dict`` is the sampler's position after the last batch handed out, not after the ones read ahead: a run
    resumed from a checkpoint continues at the exact pair. ``extra(picks)``: further tensors of a batch, looked up
    from its picks (a precomputed reference's errors), read, pinned and copied with the rest.
    """

    def __init__(
        self, dataset, sampler: PairSampler, batch_size: int, device: torch.device, *, depth: int = 2, extra=None
    ):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        if depth < 0:
            raise ValueError(f"prefetch depth must be 0 or more, got {depth}")
        self.dataset, self.sampler, self.batch_size, self.device = dataset, sampler, batch_size, device
        self.depth, self.extra = depth, extra
        self.pin = device.type == "cuda"
        self.lock = threading.Lock()  # one reader of the dataset at a time (evaluation reads it too)
        self._ahead: deque = deque()  # (picks, sampler state after them, future batch)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rpo_fast_prefetch") if depth else None
        self._state = sampler.state_dict()

    def _read(self, picks: list[Pick]) -> dict:
        with self.lock:
            batch = collate([self.dataset.get(p.index, p.flip) for p in picks])
        if self.extra is not None:
            batch |= self.extra(picks)
        if self.pin:
            batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
        return batch

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def next(self) -> tuple[list[tuple[int, bool]], dict]:
        """The next batch's (picks, tensors on the device)."""
        if not self.depth:
            picks = self.sampler.next_batch(self.batch_size)
            self._state = self.sampler.state_dict()
            return picks, self.to_device(self._read(picks))
        while len(self._ahead) < self.depth:
            picks = self.sampler.next_batch(self.batch_size)
            self._ahead.append((picks, self.sampler.state_dict(), self._pool.submit(self._read, picks)))
        picks, self._state, future = self._ahead.popleft()
        return picks, self.to_device(future.result())

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._drop_ahead()
        self.sampler.load_state_dict(state)
        self._state = self.sampler.state_dict()

    def _drop_ahead(self) -> None:
        for _, _, future in self._ahead:
            future.cancel()
            if not future.cancelled():
                future.result()  # wait for a read in flight (its batch is dropped)
        self._ahead.clear()

    def close(self) -> None:
        self._drop_ahead()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
