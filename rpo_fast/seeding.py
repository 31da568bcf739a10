"""One way to derive a seed from several integers, for every random draw of rpo_fast.

    seed_of(seed, step, pair) -> an int in [0, 2^63)

It is numpy's ``SeedSequence`` mix (a hash designed for this: documented, the same on every platform, Python and
numpy version, and two different tuples give unrelated seeds), truncated to 63 bits so that it fits
``torch.Generator.manual_seed`` and ``np.random.default_rng``. Used for: each training pair's draws (seed, salt,
step, pair index), the sampler's epoch order (seed, epoch), a cached pair's crop and flip (seed, pair index), and
each evaluation image (seed, prompt index, draw). Negative parts are taken modulo 2^64.

The entropy is the number of parts followed by each part as two 32-bit words, so that tuples of different
lengths, or parts that SeedSequence would otherwise split into a different number of words, cannot collide
((0, 0) and (0, 0, 0, 0), or (2^32,) and (0, 1)).
"""

from __future__ import annotations

import numpy as np


def seed_of(*parts: int) -> int:
    """A 63-bit seed from ``parts`` (at least one integer)."""
    if not parts:
        raise ValueError("seed_of needs at least one integer")
    words = [len(parts)]
    for p in parts:
        p = int(p) % 2**64
        words += [p & 0xFFFFFFFF, p >> 32]
    entropy = np.array(words, dtype=np.uint32)
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))
