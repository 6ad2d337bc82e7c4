"""What each rank and each DataLoader worker reads, computed from the manifest before anything is read.

Pure functions over id ranges and a selection mask; no I/O, no torch.distributed. fer_dist/data/stream.py
runs the plans; the tests check them directly.

Train epoch (equal steps per rank, computed, not hoped for):
- N = selected samples over the given shards; steps = ceil(N / global_batch); b = global_batch // world.
- A rank's batches are split among its W workers by round-robin position: batch j of the rank comes from
  worker role j % W, so role w yields `worker_quotas(steps, W)[w]` batches (they sum to steps), which is the
  order in which a DataLoader over an IterableDataset hands out its workers' batches.
- The selected ids are laid out in a cyclic sequence: the shards that hold selected ids, in an order
  shuffled by (seed, epoch) over those shards only, each shard's selected ids ascending. Every (rank,
  role) slot owns a contiguous window of exactly quota * b positions of that sequence; the windows tile
  [0, steps * global_batch), so every selected sample appears at least once and the
  steps * global_batch - N < global_batch repeats are taken from the sequence's start.
  A window is cut into pieces (shard, ids): whole shards where shards are many, parts of shards where they
  are few (fewer shards than ranks x workers needs no special case), so balance is by selected count.
- Resuming after k batches: worker i of the resumed DataLoader plays role (i + k) % W and skips the batches
  that role already produced, so the remaining batches come in the uninterrupted run's order.

Exhaustive pass: the selected ids in manifest order are cut into world contiguous parts (sizes differing by
at most one), each cut into W parts the same way; every sample is read exactly once, nothing is repeated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fer_dist.errors import FerDistError


@dataclass(frozen=True)
class Piece:
    """Ids to read from one shard: `shard` indexes the loader's shard list, `ids` ascending run ids."""

    shard: int
    ids: np.ndarray


@dataclass(frozen=True)
class SlotPlan:
    """One DataLoader worker's work: its pieces in order, batches to skip, then batches to yield."""

    role: int
    pieces: tuple[Piece, ...]
    skip: int
    batches: int

    @property
    def samples(self) -> int:
        """Samples this slot reads, skipped ones included."""
        return sum(int(p.ids.size) for p in self.pieces)

    def shards_read(self) -> set[int]:
        """The shards (positions in the stream's shard list) this slot reads."""
        return {p.shard for p in self.pieces}


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, epoch, rank, ...), stable across platforms and Python runs."""
    state = np.random.SeedSequence([int(p) % 2**64 for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def selected_ids(ranges: Sequence[tuple[int, int]], include: np.ndarray) -> list[np.ndarray]:
    """Per shard (first_run_id, count): the run ids `include` selects, ascending."""
    out = []
    for first, count in ranges:
        if first < 0 or first + count > include.shape[0]:
            raise FerDistError(f"include: a shard holds ids {first}..{first + count - 1}, "
                               f"the mask has only {include.shape[0]} entries")
        out.append(first + np.flatnonzero(include[first:first + count]).astype(np.int64))
    return out


def train_steps(n_selected: int, global_batch: int) -> int:
    """Batches every rank yields in one epoch: ceil(n_selected / global_batch)."""
    return -(-n_selected // global_batch)


def worker_quotas(steps: int, workers: int) -> list[int]:
    """Batches each worker role yields: round-robin positions j % workers, so the first roles get extras."""
    return [steps // workers + (1 if w < steps % workers else 0) for w in range(workers)]


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard order: a permutation drawn from (seed, epoch) only, identical on every rank."""
    return [int(i) for i in np.random.default_rng(derive_seed(seed, epoch)).permutation(num_shards)]


def window(order: Sequence[int], selected: Sequence[np.ndarray], start: int, length: int) -> list[Piece]:
    """Positions [start, start + length) of the cyclic sequence of `selected` taken in `order`, as pieces."""
    sizes = np.array([selected[i].size for i in order], dtype=np.int64)
    total = int(sizes.sum())
    if total == 0:
        raise FerDistError("no sample is selected: the include mask selects none of the given shards")
    ends = np.cumsum(sizes)
    pieces, pos, stop = [], start, start + length
    while pos < stop:
        at = pos % total
        k = int(np.searchsorted(ends, at, side="right"))  # the shard holding position `at`
        lo = at - int(ends[k] - sizes[k])
        take = min(int(sizes[k]) - lo, stop - pos)
        shard = order[k]
        pieces.append(Piece(shard, selected[shard][lo:lo + take]))
        pos += take
    return pieces


def train_plan(
    selected: Sequence[np.ndarray],
    *,
    global_batch: int,
    world: int,
    rank: int,
    workers: int,
    seed: int,
    epoch: int,
    skip: int = 0,
) -> tuple[int, list[SlotPlan]]:
    """(steps, one SlotPlan per DataLoader worker of `rank`; one plan when workers == 0)."""
    if global_batch < 1 or world < 1 or global_batch % world:
        raise FerDistError(f"global batch {global_batch} is not a positive multiple of world size {world}")
    if not 0 <= rank < world:
        raise FerDistError(f"rank {rank} is outside 0..{world - 1}")
    n = sum(int(s.size) for s in selected)
    steps, b, roles = train_steps(n, global_batch), global_batch // world, max(1, workers)
    if not 0 <= skip <= steps:
        raise FerDistError(f"skip_batches {skip} is outside 0..{steps} (the epoch's steps)")
    # Only the shards holding selected ids are shuffled: an epoch's batches depend on what it reads, not on
    # other shards of the stream's list (the warm-up's on X_l alone, whatever data.unlabelled adds).
    held = [i for i in range(len(selected)) if selected[i].size]
    order = [held[j] for j in shard_order(len(held), seed, epoch)]
    quotas = worker_quotas(steps, roles)
    done = worker_quotas(skip, roles)  # batches each role yielded before the resume point
    starts = rank * steps * b + b * np.concatenate([[0], np.cumsum(quotas)])
    plans = []
    for i in range(roles):
        role = (i + skip) % roles
        pieces = window(order, selected, int(starts[role]), quotas[role] * b) if quotas[role] else []
        plans.append(SlotPlan(role, tuple(pieces), done[role], quotas[role] - done[role]))
    return steps, plans


def _split(total: int, parts: int) -> np.ndarray:
    """Boundaries of `parts` contiguous near-equal parts of range(total) (sizes differ by at most one)."""
    sizes = [total // parts + (1 if p < total % parts else 0) for p in range(parts)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def exhaustive_plan(
    selected: Sequence[np.ndarray], *, batch_size: int, world: int, rank: int, workers: int
) -> list[SlotPlan]:
    """One SlotPlan per DataLoader worker of `rank` (one when workers == 0); each sample read exactly once."""
    if batch_size < 1:
        raise FerDistError(f"batch size {batch_size} is not positive")
    if not 0 <= rank < world:
        raise FerDistError(f"rank {rank} is outside 0..{world - 1}")
    order = [i for i in range(len(selected)) if selected[i].size]
    n = sum(int(s.size) for s in selected)
    ranks = _split(n, world)
    local = ranks[rank] + _split(int(ranks[rank + 1] - ranks[rank]), max(1, workers))
    plans = []
    for w in range(max(1, workers)):
        length = int(local[w + 1] - local[w])
        pieces = window(order, selected, int(local[w]), length) if length else []
        plans.append(SlotPlan(w, tuple(pieces), 0, -(-length // batch_size)))
    return plans
