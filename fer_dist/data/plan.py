"""The pure plan of a pass: which run ids make each global batch, and which slice of it each rank reads.

No I/O, no torch.distributed; fer_dist/data/stream.py runs the plans, the tests check them directly.

Train epoch (MosaicML streaming's "elastic determinism"): the epoch's order is a permutation of the
selected ids drawn from (seed, epoch) alone, repeated from its start to fill steps x global_batch
positions, steps = ceil(selected / global_batch). Global batch s is positions [s * G, (s + 1) * G) of
that order whatever the number of processes W and loader workers; rank r reads its slice
[r * G / W, (r + 1) * G / W) of it, so every rank takes `steps` steps. A resume after k steps starts at
global batch k: the whole resume state is (seed, epoch, k). Augmentation draws are keyed by
(seed, epoch, run id) (`sample_seeds`), not by rank, worker or batch, so a sample is the same image on
1 or 64 processes. The order depends on the selected ids only, not on the shards listed around them (the
warm-up's batches are X_l's whatever data.unlabelled adds).

Exhaustive pass: the selected ids ascending, cut into W contiguous parts whose sizes differ by at most
one; every id is read exactly once, nothing is repeated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fer_dist.errors import FerDistError
from fer_dist.hashing import GOLDEN, derive_seed, mix64


def sample_seeds(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """Each id's augmentation seed for this (seed, epoch): splitmix64 of the epoch's key and the id, 63 bits.

    A vectorised hash rather than derive_seed per sample: SeedSequence costs more than the face's decode.
    """
    x = np.uint64(derive_seed(seed, epoch)) ^ (np.asarray(ids, dtype=np.uint64) * GOLDEN)
    return (mix64(x) >> np.uint64(1)).astype(np.int64)


def selected_ids(ranges: Sequence[tuple[int, int]], include: np.ndarray) -> np.ndarray:
    """The run ids `include` selects within the shards' (first_run_id, count) ranges, ascending."""
    within = np.zeros(include.shape[0], dtype=bool)
    for first, count in ranges:
        if first < 0 or first + count > include.shape[0]:
            raise FerDistError(f"include: a shard holds ids {first}..{first + count - 1}, "
                               f"the mask has only {include.shape[0]} entries")
        within[first:first + count] = True
    return np.flatnonzero(include & within).astype(np.int64)


def train_steps(n_selected: int, global_batch: int) -> int:
    """Steps every rank takes in one epoch: ceil(n_selected / global_batch)."""
    return -(-n_selected // global_batch)


def epoch_order(selected: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order of the selected ids: a permutation drawn from (seed, epoch) only."""
    return np.random.default_rng(derive_seed(seed, epoch)).permutation(np.sort(selected))


def train_batches(
    selected: np.ndarray, *, global_batch: int, world: int, rank: int, seed: int, epoch: int, skip: int = 0
) -> tuple[int, np.ndarray]:
    """(steps, ids [steps - skip, global_batch // world]): rank's slice of each global batch from skip."""
    if global_batch < 1 or world < 1 or global_batch % world:
        raise FerDistError(f"global batch {global_batch} is not a positive multiple of world size {world}")
    if not 0 <= rank < world:
        raise FerDistError(f"rank {rank} is outside 0..{world - 1}")
    if selected.size == 0:
        raise FerDistError("no sample is selected: the include mask selects none of the given shards")
    steps = train_steps(selected.size, global_batch)
    if not 0 <= skip <= steps:
        raise FerDistError(f"skip_batches {skip} is outside 0..{steps} (the epoch's steps)")
    # np.resize repeats the order from its start: the last global batch's fill
    order = np.resize(epoch_order(selected, seed, epoch), steps * global_batch)
    return steps, order.reshape(steps, world, global_batch // world)[skip:, rank]


def exhaustive_batches(selected: np.ndarray, *, batch_size: int, world: int, rank: int) -> list[np.ndarray]:
    """Rank's batches of the exhaustive pass: its contiguous part of the ascending ids, each id once."""
    if batch_size < 1:
        raise FerDistError(f"batch size {batch_size} is not positive")
    if not 0 <= rank < world:
        raise FerDistError(f"rank {rank} is outside 0..{world - 1}")
    n = selected.size
    lo, hi = rank * n // world, (rank + 1) * n // world  # part sizes differ by at most one
    mine = np.sort(selected)[lo:hi]
    return [mine[i:i + batch_size] for i in range(0, mine.size, batch_size)]
