"""The synthetic source: listing and labels, determinism, true intensity, identities, learnability."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from fer_dist.classes import CLASSES
from fer_dist.data.sources.base import SourceOptions
from fer_dist.data.sources.synthetic import EXPRESSIONS, NEUTRAL, list_records, render_face
from fer_dist.errors import FerDistError

META_KEYS = {"path", "subject", "sequence", "frame", "seq_len", "intensity", "expression"}


def mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def spearman(a, b) -> float:
    ranks = [np.argsort(np.argsort(np.asarray(x))) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


@pytest.mark.parametrize("peak_frames", [1, 3])
def test_counts_labels_and_meta(peak_frames):
    listing = list_records([], SourceOptions(subjects=3, frames=6, peak_frames=peak_frames))
    records = listing.records
    assert len(records) == 3 * 6 * 6
    assert (listing.files, listing.skipped, listing.default_align) == ([], [], "none")
    keys = [r.key for r in records]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    for r in records:
        m = r.meta
        assert set(m) == META_KEYS and "split" not in m
        assert r.key == m["path"] == f"{m['sequence']}/frame_{m['frame']:02d}.png"
        assert m["sequence"] == f"{m['subject']}/{CLASSES[m['expression']]}"
        assert m["seq_len"] == 6 and m["intensity"] == m["frame"] / 5
        if m["frame"] == 0:
            assert r.label == NEUTRAL
        elif m["frame"] >= 6 - peak_frames:
            assert r.label == m["expression"]
        else:
            assert r.label is None
        json.dumps(m)
    assert {r.meta["expression"] for r in records} == set(EXPRESSIONS)
    assert sum(r.label is None for r in records) == 3 * 6 * (5 - peak_frames)


def test_src_is_ignored_and_subject_names_sort_in_number_order():
    listing = list_records([Path("/no/such/folder")], SourceOptions(subjects=1001, frames=2))
    subjects = list(dict.fromkeys(r.meta["subject"] for r in listing.records))
    assert subjects[0] == "S0000" and subjects[-1] == "S1000" and len(subjects) == 1001
    assert subjects == [f"S{i:04d}" for i in range(1001)]


@pytest.mark.parametrize("bad", [{"frames": 1}, {"frames": 4, "peak_frames": 4}, {"peak_frames": 0},
                                 {"subjects": 0}, {"image_size": 8}, {"seed": -1}])
def test_bad_options_are_one_line_errors(bad):
    with pytest.raises(FerDistError, match=r"^synthetic: --") as err:
        list_records([], SourceOptions(**bad))
    assert "\n" not in str(err.value)


def test_deterministic_and_picklable():
    first = list_records([], SourceOptions(subjects=2, frames=4))
    again = list_records([], SourceOptions(subjects=2, frames=4))
    other = list_records([], SourceOptions(subjects=2, frames=4, seed=1))
    for i in (0, 5, 47):
        a = first.records[i].load()
        assert np.array_equal(a, again.records[i].load())
        assert mad(a, other.records[i].load()) > 1.0
        restored = pickle.loads(pickle.dumps(first.records[i]))
        assert np.array_equal(a, restored.load())


def test_intensity_zero_is_the_neutral_face_and_the_peak_is_not():
    for subject in range(3):
        neutral = [render_face(0, subject, e, 0, 0.0, clean=True) for e in EXPRESSIONS]
        peaks = [render_face(0, subject, e, 9, 1.0, clean=True) for e in EXPRESSIONS]
        assert all(np.array_equal(neutral[0], n) for n in neutral)
        assert min(mad(neutral[0], p) for p in peaks) > 0.5
    # With nuisance, frame 0 of two sequences of one subject differ by head pose and noise only.
    zero, peak = [], []
    for subject in range(4):
        frames0 = [render_face(0, subject, e, 0, 0.0) for e in EXPRESSIONS]
        frames9 = [render_face(0, subject, e, 9, 1.0) for e in EXPRESSIONS]
        pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
        zero += [mad(frames0[i], frames0[j]) for i, j in pairs]
        peak += [mad(frames9[i], frames9[j]) for i, j in pairs]
    assert np.mean(peak) > 1.3 * np.mean(zero)


def test_difference_from_neutral_grows_with_intensity():
    listing = list_records([], SourceOptions(subjects=3, frames=8))
    by_sequence: dict[str, list] = {}
    for r in listing.records:
        by_sequence.setdefault(r.meta["sequence"], []).append(r)
    assert len(by_sequence) == 18
    for sequence, records in by_sequence.items():
        images = [r.load() for r in records]
        distances = [mad(images[0], x) for x in images[1:]]
        intensities = [r.meta["intensity"] for r in records[1:]]
        assert spearman(intensities, distances) > 0.9, sequence


def test_identities_differ_more_than_frames_of_one_subject():
    within, between = [], []
    for subject in range(5):
        mine = [render_face(0, subject, e, 0, 0.0) for e in EXPRESSIONS[:3]]
        theirs = render_face(0, subject + 5, EXPRESSIONS[0], 0, 0.0)
        within += [mad(mine[0], mine[1]), mad(mine[1], mine[2])]
        between.append(mad(mine[0], theirs))
        # Without pose and camera, the faces themselves still differ (shape, tone, features).
        own, other = (render_face(0, k, EXPRESSIONS[0], 0, 0.0, clean=True) for k in (subject, subject + 5))
        assert mad(own, other) > 10
    assert min(between) > max(within)


def test_nearest_centroid_on_pixels_is_above_chance_but_not_perfect():
    images, labels, subjects = [], [], []
    for subject in range(40):
        for e in EXPRESSIONS:
            images.append(render_face(0, subject, e, 9, 1.0))
            labels.append(e)
        images.append(render_face(0, subject, EXPRESSIONS[subject % 6], 0, 0.0))
        labels.append(NEUTRAL)
        subjects += [subject] * 7
    x = np.stack(images).reshape(len(images), -1).astype(np.float64)  # [280, 48*48]
    y, s = np.array(labels), np.array(subjects)
    train, test = s < 30, s >= 30
    centroids = np.stack([x[train & (y == k)].mean(0) for k in range(len(CLASSES))])  # [7, 48*48]
    dist = ((x[test][:, None, :] - centroids[None]) ** 2).sum(-1)  # [70, 7]
    accuracy = float((dist.argmin(1) == y[test]).mean())
    # Measured 0.60 (chance 1/7); subject-independent, so identity and camera stay nuisance.
    assert 1 / 7 + 0.2 < accuracy < 0.95


@pytest.mark.parametrize("size", [48, 96, 112, 224])
def test_image_sizes(size):
    records = list_records([], SourceOptions(subjects=1, frames=3, image_size=size)).records
    for r in (records[0], records[-1]):
        image = r.load()
        assert image.shape == (size, size) and image.dtype == np.uint8
        assert image.std() > 10
