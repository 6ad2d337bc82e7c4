"""The evaluation metrics on fixed predictions with answers worked out by hand, and the intensity score on
curves built to have a known correlation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fer_dist.data.manifest import ImageSpec, Manifest
from fer_dist.evaluate import metrics
from fer_dist.evaluate.infer import Predictions, ShardSplits, parse_shards
from fer_dist.evaluate.intensity import intensity_report, sequence_curves
from fer_dist.evaluate.report import set_report

CLASSES = ["anger", "disgust", "fear", "happy", "neutral", "sadness", "surprise"]


def one_hot(classes: list[int], k: int = 7, p: float = 1.0) -> np.ndarray:
    out = np.full((len(classes), k), (1 - p) / (k - 1))
    out[np.arange(len(classes)), classes] = p
    return out


def test_confusion_and_scores_by_hand() -> None:
    labels = np.array([0, 0, 0, 1, 1, 2])
    preds = np.array([0, 0, 1, 1, 2, 2])
    cm = metrics.confusion_matrix(labels, preds, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    m = metrics.classification_metrics(labels, preds, 3)
    # precision 1, 1/2, 1/2; recall 2/3, 1/2, 1; f1 4/5, 1/2, 2/3
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class"]["precision"] == pytest.approx([1, 0.5, 0.5])
    assert m["per_class"]["recall"] == pytest.approx([2 / 3, 0.5, 1])
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["uar"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["per_class"]["support"] == [3, 2, 1]


def test_macro_averages_skip_classes_the_set_does_not_have() -> None:
    labels, preds = np.array([0, 0, 3]), np.array([0, 4, 3])  # class 4 predicted but never true
    m = metrics.classification_metrics(labels, preds, 7)
    assert m["uar"] == pytest.approx((0.5 + 1) / 2)  # over classes 0 and 3 only
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)


def test_perfect_and_constant_models() -> None:
    labels = np.array([0, 1, 2, 3, 3, 3, 4, 5, 6, 6])
    perfect = metrics.classification_metrics(labels, labels, 7)
    assert perfect["accuracy"] == perfect["macro_f1"] == perfect["uar"] == 1.0
    assert metrics.calibration(labels, one_hot(list(labels)))["ece"] == pytest.approx(0.0)
    constant = metrics.classification_metrics(labels, np.full(10, 3), 7)
    share = 3 / 10
    assert constant["accuracy"] == pytest.approx(share)
    assert constant["uar"] == pytest.approx(1 / 7)  # recall 1 for class 3, 0 for the 6 others
    assert constant["macro_f1"] == pytest.approx(2 * share / (1 + share) / 7)
    # always 0.6 confident, right 30 % of the time: one used bin, ECE |0.3 - 0.6|
    cal = metrics.calibration(labels, one_hot([3] * 10, p=0.6))
    assert cal["ece"] == pytest.approx(0.3)
    assert sum(cal["bin_count"]) == 10 and max(cal["bin_count"]) == 10


def test_ece_over_two_bins() -> None:
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.45, 0.55], [0.45, 0.55]])
    # bin (0.9, 1]: conf 0.95, acc 1 -> 0.05; bin (0.5, 0.6]: conf 0.55, acc 1 -> 0.45; weights 1/2 each
    assert metrics.calibration(labels, probs)["ece"] == pytest.approx(0.5 * 0.05 + 0.5 * 0.45)


def test_restrict_renormalises_over_the_classes_present() -> None:
    probs = np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    out = metrics.restrict(probs, [0, 1])
    assert out == pytest.approx(np.array([[1 / 3, 2 / 3, 0], [0.625, 0.375, 0]]))


def test_spearman_known_values() -> None:
    x = np.arange(6.0)
    assert metrics.spearman(x, x ** 3) == pytest.approx(1.0)
    assert metrics.spearman(x, -x) == pytest.approx(-1.0)
    # ranks 1..4 against 2, 1, 4, 3: d^2 = 4, rho = 1 - 6*4 / (4*15) = 0.6
    assert metrics.spearman([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    assert metrics.rankdata([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert metrics.spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(0.894427, abs=1e-6)  # ties
    assert math.isnan(metrics.spearman([1, 2, 3], [5, 5, 5]))
    assert metrics.mean_abs_jump([0.0, 0.5, 0.25]) == pytest.approx(0.375)


def test_mean_std() -> None:
    assert metrics.mean_std([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert metrics.mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}


def _predictions(probs: np.ndarray, labels: list[int]) -> Predictions:
    manifest = Manifest("synthetic", tuple(CLASSES), len(labels), ImageSpec(48, 1), {}, None, {}, {}, {}, [],
                        "")
    return Predictions(np.arange(len(labels)), np.array(labels), probs, manifest, "as stored")


def test_a_set_lacking_classes_is_reported_both_ways() -> None:
    labels = [0, 0, 3, 3]  # no neutral (4), like CK+48
    probs = one_hot([0, 4, 3, 3], p=0.5)
    probs[1, 0] = 0.4  # second face: neutral 0.5 first, anger 0.4 next
    probs[1] /= probs[1].sum()
    record = set_report(ShardSplits(Path("ck"), ("test",)), _predictions(probs, labels),
                        CLASSES)
    assert record["classes_present"] == ["anger", "happy"]
    assert record["all_classes"]["accuracy"] == pytest.approx(0.75)
    assert record["present_classes"]["accuracy"] == pytest.approx(1.0)  # anger wins once neutral is out


def _curves(prob_of_frame) -> list[dict]:
    meta, probs = [], []
    for s, expression in enumerate((0, 3, 6)):
        for frame in range(5):
            meta.append({"sequence": f"S{s}/x", "frame": frame, "seq_len": 5, "expression": expression,
                         "intensity": frame / 4})
            row = np.full(7, 0.0)
            row[expression] = prob_of_frame(frame)
            row[4] = 1 - row[expression]
            probs.append(row)
    neutral_seq = {"sequence": "S9/n", "frame": 0, "seq_len": 5, "expression": 4}  # measured as nothing
    meta.append(neutral_seq)
    probs.append(np.eye(7)[4])
    return sequence_curves(_predictions(np.array(probs), [-1] * len(meta)), meta, CLASSES)


def test_intensity_score_on_curves_with_known_correlation() -> None:
    rising = intensity_report(_curves(lambda f: f / 4))
    assert rising["sequences"] == 3 and rising["score"] == pytest.approx(1.0)
    assert rising["score_basis"] == "spearman_intensity"
    assert rising["overall"]["mean_abs_jump"]["mean"] == pytest.approx(0.25)
    falling = intensity_report(_curves(lambda f: 1 - f / 4))
    assert falling["score"] == pytest.approx(-1.0)
    # a curve that peaks in the middle: ranks 1 3 5 4 2 against 1..5 -> rho = 1 - 6*(0+1+4+0+9)/120 = 0.3
    bump = intensity_report(_curves(lambda f: [0.0, 0.5, 0.9, 0.7, 0.2][f]))
    assert bump["score"] == pytest.approx(0.3)


def test_parse_shards() -> None:
    assert parse_shards("a/b") == ShardSplits(Path("a/b"), ("test",))
    assert parse_shards("a:val,test").splits == ("val", "test")
    assert parse_shards("a:train@0,2").folds == (0, 2)
