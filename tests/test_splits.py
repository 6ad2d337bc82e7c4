"""splits.py: --split parsing, subject-independent splits, official splits kept, folds by subject."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

import pytest

from fer_dist.data.sources.base import Record
from fer_dist.data.splits import _group_counts, assign_folds, assign_splits, parse_split, split_order
from fer_dist.errors import FerDistError


def records(subjects: int, per_subject: int | list[int], *,
            official: dict[int, str] | None = None) -> list[Record]:
    """Records of `subjects` subjects (per_subject each or per_subject[s]); official[s] sets meta["split"]."""
    counts = per_subject if isinstance(per_subject, list) else [per_subject] * subjects
    out = []
    for s in range(subjects):
        for f in range(counts[s]):
            meta = {"path": f"S{s:03d}/{f}.png", "subject": f"S{s:03d}"}
            if official and s in official:
                meta["split"] = official[s]
            out.append(Record(meta["path"], None, meta, lambda: None))
    return out


def subjects_by_split(recs: list[Record], splits: list[str]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for r, s in zip(recs, splits, strict=True):
        found[s].add(r.meta["subject"])
    return found


@pytest.mark.parametrize(("spec", "expected"), [
    ("0.8,0.1,0.1", (0.8, 0.1, 0.1)),
    (" 0.7 , 0.15,0.15 ", (0.7, 0.15, 0.15)),
    ("1,0,0", (1.0, 0.0, 0.0)),
])
def test_parse_split_accepts_three_fractions_summing_to_one(spec: str, expected: tuple) -> None:
    assert parse_split(spec) == pytest.approx(expected)


@pytest.mark.parametrize("spec", ["0.8,0.2", "0.5,0.3,0.1,0.1", "a,b,c", "0.5,0.5,0.5", "-0.2,0.6,0.6",
                                  "nan,0.5,0.5", "", "0.8,,0.2"])
def test_parse_split_rejects_bad_specs_in_one_line_naming_the_option(spec: str) -> None:
    with pytest.raises(FerDistError) as err:
        parse_split(spec)
    assert str(err.value).startswith("--split:") and "\n" not in str(err.value)


def test_split_order_puts_train_val_test_first_then_others_alphabetically() -> None:
    names = ["test", "zeta", "train", "alpha", "val", "train"]
    assert split_order(names) == ["train", "val", "test", "alpha", "zeta"]
    assert split_order(["test", "train"]) == ["train", "test"]


@pytest.mark.parametrize(("n", "fractions", "expected"), [
    (10, (0.8, 0.1, 0.1), [8, 1, 1]),
    (60, (0.8, 0.1, 0.1), [48, 6, 6]),
    (7, (0.5, 0.25, 0.25), [3, 2, 2]),  # 3.5, 1.75, 1.75: the two largest remainders get the spare groups
    (8, (0.3, 0.3, 0.4), [3, 2, 3]),  # 2.4, 2.4, 3.2: one spare; tied remainders favour the earlier split
    (3, (0.8, 0.1, 0.1), [1, 1, 1]),  # every positive fraction gets a group when there are enough
    (2, (0.8, 0.1, 0.1), [1, 1, 0]),
    (1, (0.8, 0.1, 0.1), [1, 0, 0]),
    (5, (1.0, 0.0, 0.0), [5, 0, 0]),
    (0, (0.8, 0.1, 0.1), [0, 0, 0]),
])
def test_group_counts(n: int, fractions: tuple, expected: list[int]) -> None:
    assert _group_counts(n, fractions) == expected
    assert sum(_group_counts(n, fractions)) == n


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_no_subject_in_two_splits_and_sizes_follow_the_fractions(seed: int) -> None:
    rng = random.Random(seed)
    recs = records(40, [rng.randint(1, 9) for _ in range(40)])
    splits = assign_splits(recs, (0.8, 0.1, 0.1), seed)
    by_split = subjects_by_split(recs, splits)
    assert sorted(by_split) == ["test", "train", "val"]
    assert by_split["train"].isdisjoint(by_split["val"]) and by_split["train"].isdisjoint(by_split["test"])
    assert by_split["val"].isdisjoint(by_split["test"])
    assert [len(by_split[s]) for s in ("train", "val", "test")] == [32, 4, 4]


def test_splits_are_deterministic_for_a_seed_and_independent_of_listing_order() -> None:
    recs = records(30, 3)
    splits = dict(zip([r.key for r in recs], assign_splits(recs, (0.6, 0.2, 0.2), 5), strict=True))
    shuffled = recs[:]
    random.Random(1).shuffle(shuffled)
    again = dict(zip([r.key for r in shuffled], assign_splits(shuffled, (0.6, 0.2, 0.2), 5), strict=True))
    assert again == splits
    other = dict(zip([r.key for r in recs], assign_splits(recs, (0.6, 0.2, 0.2), 6), strict=True))
    assert other != splits  # 30 subjects: two seeds giving the same draw would be a 1-in-millions fluke


def test_records_without_a_subject_are_each_their_own_group() -> None:
    recs = [Record(f"{i:03d}.png", None, {"path": f"{i:03d}.png"}, lambda: None) for i in range(50)]
    assert Counter(assign_splits(recs, (0.8, 0.1, 0.1), 0)) == {"train": 40, "val": 5, "test": 5}


def test_official_splits_are_kept_and_only_the_rest_is_drawn() -> None:
    recs = records(20, 2, official={0: "test", 1: "train", 2: "val", 3: "extra"})
    splits = assign_splits(recs, (0.8, 0.1, 0.1), 3)
    for r, s in zip(recs, splits, strict=True):
        if "split" in r.meta:
            assert s == r.meta["split"]
    free = [r for r in recs if "split" not in r.meta]
    free_splits = [s for r, s in zip(recs, splits, strict=True) if "split" not in r.meta]
    assert [len(subjects_by_split(free, free_splits)[s]) for s in ("train", "val", "test")] == [13, 2, 1]


def test_all_official_splits_need_no_fractions() -> None:
    recs = records(4, 2, official={0: "train", 1: "train", 2: "val", 3: "test"})
    assert assign_splits(recs, (1.0, 0.0, 0.0), 0) == ["train"] * 4 + ["val"] * 2 + ["test"] * 2


@pytest.mark.parametrize(("subjects", "k"), [(23, 5), (10, 10), (7, 2)])
def test_folds_partition_subjects_with_balanced_subject_counts(subjects: int, k: int) -> None:
    recs = records(subjects, 3)
    folds = assign_folds(recs, k, seed=2)
    fold_of: dict[str, set[int]] = defaultdict(set)
    for r, f in zip(recs, folds, strict=True):
        fold_of[r.meta["subject"]].add(f)
    assert all(len(f) == 1 for f in fold_of.values())  # a subject never straddles two folds
    sizes = Counter(next(iter(f)) for f in fold_of.values())
    assert sorted(sizes) == list(range(k))
    assert max(sizes.values()) - min(sizes.values()) <= 1
    assert assign_folds(recs, k, seed=2) == folds


@pytest.mark.parametrize(("k", "subjects", "message"), [(1, 5, "at least 2"), (6, 5, "only 5 subjects")])
def test_bad_fold_counts_are_one_line_errors(k: int, subjects: int, message: str) -> None:
    with pytest.raises(FerDistError, match=message) as err:
        assign_folds(records(subjects, 1), k)
    assert str(err.value).startswith("--folds:")
