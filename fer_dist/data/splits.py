"""Official, subject-independent splits (`--split a,b,c`) and subject folds (`--folds K`): pure functions.

A "group" is what must never straddle two splits or two folds: a record's `subject`, or the record itself
when it has none. Groups are shuffled by a seeded permutation of their sorted names, so the result depends
only on the set of groups and the seed, never on listing order or on the machine.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from fer_dist.errors import FerDistError

SPLIT_NAMES: tuple[str, str, str] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)


class HasMeta(Protocol):
    """Anything with a `key` and a `meta` mapping (sources' Record)."""

    key: str
    meta: Mapping


def parse_split(spec: str) -> tuple[float, float, float]:
    """Parse `--split` such as `0.8,0.1,0.1` into (train, val, test) fractions that sum to 1."""
    parts = [p.strip() for p in spec.split(",")]
    try:
        fractions = tuple(float(p) for p in parts)
    except ValueError:
        raise FerDistError(f"--split: {spec!r} is not three numbers such as 0.8,0.1,0.1") from None
    if len(fractions) != 3:
        raise FerDistError(f"--split: {spec!r} has {len(fractions)} fractions, expected 3 (train,val,test)")
    if any(not math.isfinite(f) or f < 0 or f > 1 for f in fractions):
        raise FerDistError(f"--split: {spec!r}: each fraction must lie in [0, 1]")
    if not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise FerDistError(f"--split: {spec!r} sums to {sum(fractions):g}, expected 1")
    return fractions  # type: ignore[return-value]


def split_order(names: Iterable[str]) -> list[str]:
    """Order split names as ids are assigned: train, val, test, then the others alphabetically."""
    unique = set(names)
    known = [n for n in SPLIT_NAMES if n in unique]
    return known + sorted(unique - set(SPLIT_NAMES))


def group_of(record: HasMeta) -> str:
    """The unit that stays within one split or fold: the subject, else the record alone."""
    subject = record.meta.get("subject")
    # Prefixes keep a subject named like a key from merging with that key's group.
    return f"subject:{subject}" if subject not in (None, "") else f"record:{record.key}"


def _shuffled(groups: Iterable[str], seed: int) -> list[str]:
    """Sorted unique groups in a seeded random order (the same for the same set and seed)."""
    ordered = sorted(set(groups))
    perm = np.random.default_rng(seed).permutation(len(ordered))
    return [ordered[i] for i in perm]


def _group_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Split n groups by largest remainder; every positive fraction gets a group when n allows it."""
    exact = [f * n for f in fractions]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    # A 0.1 share of 5 subjects rounds to nothing; an empty val or test split is worse than a smaller train.
    for i, f in enumerate(fractions):
        if f > 0 and counts[i] == 0:
            donor = max(range(len(counts)), key=lambda j: (counts[j], -j))
            if counts[donor] > 1:
                counts[donor] -= 1
                counts[i] += 1
    return counts


def assign_splits(
    records: Sequence[HasMeta], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> list[str]:
    """A split name per record: its official `meta["split"]` if set, else a subject-independent draw."""
    splits: list[str | None] = [r.meta.get("split") or None for r in records]
    free = [group_of(r) for r, s in zip(records, splits, strict=True) if s is None]
    order = _shuffled(free, seed)
    counts = _group_counts(len(order), fractions)
    group_split: dict[str, str] = {}
    start = 0
    for name, count in zip(SPLIT_NAMES, counts, strict=True):
        group_split.update((g, name) for g in order[start : start + count])
        start += count
    return [s if s is not None else group_split[group_of(r)] for r, s in zip(records, splits, strict=True)]


def assign_folds(records: Sequence[HasMeta], k: int, seed: int = 0) -> list[int]:
    """A fold id 0..k-1 per record; whole subjects per fold, subject counts balanced to within one."""
    if k < 2:
        raise FerDistError(f"--folds: {k} folds; cross-validation needs at least 2")
    groups = [group_of(r) for r in records]
    order = _shuffled(groups, seed)
    if len(order) < k:
        raise FerDistError(f"--folds: {k} folds but only {len(order)} subjects (or subject-less records)")
    fold_of = {g: i % k for i, g in enumerate(order)}
    return [fold_of[g] for g in groups]
