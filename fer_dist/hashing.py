"""The project's integer hashing, the same on every platform and process: splitmix64's finaliser over uint64
arrays (the one stateless hash that keys per-id draws: a round's ranking of ids, each sample's augmentation
seed) and `derive_seed` (one seed from a few integers: an epoch's order, a rank's RNG)."""

from __future__ import annotations

import numpy as np

_MULTIPLIERS = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment: spreads consecutive ids before mixing


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function of each uint64 (arithmetic wraps modulo 2**64, as numpy's does)."""
    x = np.asarray(x, dtype=np.uint64)
    for shift, mult in zip((30, 27), _MULTIPLIERS, strict=True):
        x = (x ^ (x >> np.uint64(shift))) * mult
    return x ^ (x >> np.uint64(31))


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, rank, ...), stable across platforms and Python runs."""
    state = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
