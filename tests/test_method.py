"""The method's math (fer_dist/method.py) against METHOD.md, on hand-made tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fer_dist.config import MethodConfig
from fer_dist.method import (
    RoundDraw,
    alpha_target,
    class_thresholds,
    compose_round,
    confident_unlabelled,
    id_hash,
    moving_average,
    rewrite_targets,
    round_members,
    round_seed,
    select_confident,
    should_stop,
    smooth_labels,
    soft_cross_entropy,
)

# ---------------------------------------------------------------- section 1: two-sided smoothing


@pytest.mark.parametrize("num_classes", [2, 5, 7, 10])
@pytest.mark.parametrize("eps", [0.0, 0.02, 0.1, 0.25])
def test_smooth_labels_values_and_sums(num_classes: int, eps: float) -> None:
    labels = torch.arange(num_classes).repeat(2)
    q = smooth_labels(labels, num_classes, eps)
    assert q.shape == (2 * num_classes, num_classes)
    assert torch.allclose(q.sum(dim=1), torch.ones(2 * num_classes))
    for row, y in zip(q, labels.tolist(), strict=True):
        assert row[y].item() == pytest.approx(1 - eps)
        others = torch.cat([row[:y], row[y + 1 :]])
        assert torch.allclose(others, torch.full_like(others, eps / (num_classes - 1)))


@pytest.mark.parametrize("num_classes", [2, 7])
def test_smooth_labels_eps_zero_is_one_hot(num_classes: int) -> None:
    labels = torch.tensor([0, num_classes - 1, 1])
    assert torch.equal(smooth_labels(labels, num_classes, 0.0), F.one_hot(labels, num_classes).float())


def test_smooth_labels_k2_is_symmetric() -> None:
    assert torch.allclose(smooth_labels(torch.tensor([1]), 2, 0.1), torch.tensor([[0.1, 0.9]]))


@pytest.mark.parametrize("bad", [[-1], [7], [0, 9]])
def test_smooth_labels_rejects_out_of_range(bad: list[int]) -> None:
    with pytest.raises(ValueError, match="labels must lie"):
        smooth_labels(torch.tensor(bad), 7, 0.1)


@pytest.mark.parametrize("eps", [-0.1, 1.5])
def test_smooth_labels_rejects_bad_eps(eps: float) -> None:
    with pytest.raises(ValueError, match="eps"):
        smooth_labels(torch.tensor([0]), 7, eps)


def test_smooth_labels_rejects_float_labels_and_empty_ok() -> None:
    with pytest.raises(ValueError, match="integer"):
        smooth_labels(torch.tensor([0.0]), 7, 0.1)
    assert smooth_labels(torch.zeros(0, dtype=torch.long), 7, 0.1).shape == (0, 7)


# ---------------------------------------------------------------- the loss


@pytest.mark.parametrize("num_classes", [2, 7, 10])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_ce_equals_cross_entropy_for_one_hot(num_classes: int, reduction: str) -> None:
    gen = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(6, num_classes, generator=gen)
    labels = torch.randint(num_classes, (6,), generator=gen)
    ours = soft_cross_entropy(logits, F.one_hot(labels, num_classes).float(), reduction)
    assert torch.allclose(ours, F.cross_entropy(logits, labels, reduction=reduction), atol=1e-6)


@pytest.mark.parametrize("num_classes", [2, 7])
def test_soft_ce_matches_torch_label_smoothing_only_with_torchs_target(num_classes: int) -> None:
    # torch's label_smoothing=e puts e/K on EVERY class, the true one included (1 - e + e/K on y);
    # METHOD.md's two-sided smoothing puts eps/(K-1) on the others and 1 - eps on y: not the same loss.
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(8, num_classes, generator=gen)
    labels = torch.randint(num_classes, (8,), generator=gen)
    e = 0.1
    torch_loss = F.cross_entropy(logits, labels, label_smoothing=e)
    torch_target = F.one_hot(labels, num_classes).float() * (1 - e) + e / num_classes
    assert torch.allclose(soft_cross_entropy(logits, torch_target), torch_loss, atol=1e-6)
    ours = soft_cross_entropy(logits, smooth_labels(labels, num_classes, e))
    assert not torch.allclose(ours, torch_loss, atol=1e-4)
    # Same loss only at torch's e = eps * K / (K - 1), where both put eps/(K-1) off the class.
    same = F.cross_entropy(logits, labels, label_smoothing=e * num_classes / (num_classes - 1))
    assert torch.allclose(ours, same, atol=1e-6)


def test_soft_ce_sum_is_mean_times_n_and_none_per_row() -> None:
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(2))
    q = torch.softmax(torch.randn(5, 7, generator=torch.Generator().manual_seed(3)), dim=1)
    per_row = soft_cross_entropy(logits, q, "none")
    assert per_row.shape == (5,)
    expected = -(q * torch.log_softmax(logits, dim=1)).sum(dim=1)
    assert torch.allclose(per_row, expected)
    assert torch.allclose(soft_cross_entropy(logits, q, "sum"), per_row.sum())
    assert torch.allclose(soft_cross_entropy(logits, q, "mean"), per_row.mean())


def test_soft_ce_bf16_logits_give_float32_loss_and_gradient() -> None:
    logits = torch.randn(3, 7).bfloat16().requires_grad_()
    loss = soft_cross_entropy(logits, smooth_labels(torch.tensor([0, 1, 2]), 7, 0.1))
    assert loss.dtype == torch.float32
    loss.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16


def test_soft_ce_rejects_bad_shapes_and_reduction() -> None:
    with pytest.raises(ValueError, match="logits and targets"):
        soft_cross_entropy(torch.zeros(2, 7), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="reduction"):
        soft_cross_entropy(torch.zeros(2, 7), torch.zeros(2, 7), "batchmean")


# ---------------------------------------------------------------- 3.2: selection


def test_select_confident_is_strict_at_tau() -> None:
    probs = torch.tensor([[0.7, 0.3], [0.71, 0.29], [0.69, 0.31], [0.3, 0.7], [0.5, 0.5]])
    assert select_confident(probs, 0.7).tolist() == [False, True, False, False, False]


@pytest.mark.parametrize("tau", [0.6, 0.7, 0.8])
def test_select_confident_tie_at_tau_in_float32(tau: float) -> None:
    # The same float32 a model would output: a maximum equal to tau (as float32) is not above it.
    top = torch.tensor(tau, dtype=torch.float32)
    probs = torch.stack([top, 1 - top]).unsqueeze(0)
    assert select_confident(probs, float(top)).tolist() == [False]
    assert select_confident(probs, float(top) - 1e-6).tolist() == [True]


def test_select_confident_empty() -> None:
    assert select_confident(torch.zeros(0, 7), 0.7).shape == (0,)


def test_confident_unlabelled_masks_labelled_rows() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    labels = torch.tensor([0, -1, -1, -1])
    assert confident_unlabelled(probs, labels, 0.7).tolist() == [False, True, False, True]


def test_confident_unlabelled_rejects_bad_labels_and_rows() -> None:
    with pytest.raises(ValueError, match="labels must lie"):
        confident_unlabelled(torch.zeros(2, 2), torch.tensor([-2, 0]), 0.7)
    with pytest.raises(ValueError, match="probs must be"):
        confident_unlabelled(torch.zeros(3, 2), torch.tensor([0, 1]), 0.7)


# ---------------------------------------------------------------- 3.3: rewriting targets


@pytest.mark.parametrize("num_classes", [2, 7])
@pytest.mark.parametrize("alpha", [0.6, 0.7, 0.9])
def test_alpha_target_values(num_classes: int, alpha: float) -> None:
    f = alpha_target(torch.tensor([1]), num_classes, alpha)[0]
    assert f[1].item() == pytest.approx(alpha)
    assert f[0].item() == pytest.approx((1 - alpha) / (num_classes - 1))
    assert f.sum().item() == pytest.approx(1.0)


def _rows(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_rewrite_every_branch() -> None:
    probs = _rows(
        [0.8, 0.1, 0.1],    # 0 unlabelled, confident (0.8 > 0.7) -> p
        [0.5, 0.3, 0.2],    # 1 unlabelled, not confident -> current
        [0.7, 0.2, 0.1],    # 2 unlabelled, tie at tau -> current
        [0.1, 0.85, 0.05],  # 3 labelled y=1, max 0.85 > alpha, argmax right -> kept (p)
        [0.1, 0.6, 0.3],    # 4 labelled y=1, argmax right but 0.6 <= alpha -> reset (f)
        [0.9, 0.05, 0.05],  # 5 labelled y=1, confident but wrong argmax -> reset
        [0.2, 0.7, 0.1],    # 6 labelled y=1, tie at alpha -> reset
    )
    labels = torch.tensor([-1, -1, -1, 1, 1, 1, 1])
    current = torch.full((7, 3), -1.0)  # a sentinel: rows left alone keep it
    out = rewrite_targets(probs, labels, current, tau=0.7, alpha=0.7)
    f = alpha_target(torch.tensor([1]), 3, 0.7)[0]
    assert out.confident.tolist() == [True, False, False, False, False, False, False]
    assert out.kept.tolist() == [False, False, False, True, False, False, False]
    assert out.reset.tolist() == [False, False, False, False, True, True, True]
    assert torch.equal(out.targets[0], probs[0]) and torch.equal(out.targets[3], probs[3])
    assert torch.equal(out.targets[1], current[1]) and torch.equal(out.targets[2], current[2])
    for i in (4, 5, 6):
        assert torch.equal(out.targets[i], f)
    assert torch.equal(current, torch.full((7, 3), -1.0)), "the input table must not be modified"


def test_rewrite_alpha_none_leaves_labelled_rows() -> None:
    probs = _rows([0.9, 0.1], [0.95, 0.05], [0.1, 0.9])
    labels = torch.tensor([-1, 0, 0])
    current = _rows([0.5, 0.5], [0.9, 0.1], [0.9, 0.1])
    out = rewrite_targets(probs, labels, current, tau=0.7, alpha=None)
    assert out.confident.tolist() == [True, False, False]
    assert not out.kept.any() and not out.reset.any()
    assert torch.equal(out.targets, torch.cat([probs[:1], current[1:]]))


def test_rewrite_argmax_tie_resolves_to_first_index() -> None:
    # alpha = 0.4 so the maximum 0.45 passes; the tie between class 0 and 1 goes to class 0.
    probs = _rows([0.45, 0.45, 0.1], [0.45, 0.45, 0.1])
    out = rewrite_targets(probs, torch.tensor([0, 1]), torch.zeros(2, 3), tau=0.7, alpha=0.4)
    assert out.kept.tolist() == [True, False]
    assert out.reset.tolist() == [False, True]


def test_rewrite_all_labelled_confident() -> None:
    probs = _rows([0.95, 0.05], [0.05, 0.95])
    out = rewrite_targets(probs, torch.tensor([0, 1]), torch.zeros(2, 2), tau=0.7, alpha=0.7)
    assert out.kept.all() and not out.reset.any() and not out.confident.any()
    assert torch.equal(out.targets, probs)


def test_rewrite_no_confident_unlabelled() -> None:
    probs = _rows([0.6, 0.4], [0.55, 0.45], [0.9, 0.1])
    current = _rows([0.1, 0.9], [0.2, 0.8], [0.3, 0.7])
    out = rewrite_targets(probs, torch.tensor([-1, -1, 1]), current, tau=0.7, alpha=0.7)
    assert not out.confident.any()
    assert torch.equal(out.targets[:2], current[:2])
    assert out.reset.tolist() == [False, False, True]


def test_rewrite_masks_partition_and_keep_dtype() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 7, generator=gen), dim=1)
    labels = torch.randint(-1, 7, (200,), generator=gen)
    current = torch.rand(200, 7, dtype=torch.float64, generator=gen)
    out = rewrite_targets(probs, labels, current, tau=0.7, alpha=0.7)
    labelled = labels >= 0
    assert torch.equal(out.kept | out.reset, labelled) and not (out.kept & out.reset).any()
    assert not (out.confident & labelled).any()
    assert out.targets.dtype == torch.float64
    changed = out.confident | labelled
    assert torch.equal(out.targets[~changed], current[~changed])


def test_rewrite_empty_and_bad_shapes() -> None:
    out = rewrite_targets(torch.zeros(0, 7), torch.zeros(0, dtype=torch.long), torch.zeros(0, 7),
                          tau=0.7, alpha=0.7)
    assert out.targets.shape == (0, 7) and out.kept.shape == (0,)
    with pytest.raises(ValueError, match="current"):
        rewrite_targets(torch.zeros(2, 7), torch.tensor([0, 1]), torch.zeros(2, 5), tau=0.7, alpha=0.7)


# ---------------------------------------------------------------- 3.4: the round's composition


def _draw(labelled: torch.Tensor, confident: torch.Tensor, fraction: float = 0.1, seed: int = 0,
          round_index: int = 0) -> RoundDraw:
    return compose_round(labelled, confident, fraction=fraction, seed=seed, round_index=round_index)


LABELLED = torch.arange(0, 100)
CONFIDENT = torch.arange(1000, 1050)


def test_compose_round_subsets_counts_and_sorted() -> None:
    draw = _draw(LABELLED, CONFIDENT)
    assert len(draw.removed) == len(draw.added) == 10
    assert torch.isin(draw.removed, LABELLED).all() and torch.isin(draw.added, CONFIDENT).all()
    assert torch.equal(draw.removed, draw.removed.sort().values)
    assert torch.equal(draw.added, draw.added.sort().values)
    assert len(draw.removed.unique()) == 10 and len(draw.added.unique()) == 10
    assert draw.removed.dtype == draw.added.dtype == torch.long


@pytest.mark.parametrize(
    ("n_labelled", "n_confident", "fraction", "expected"),
    [
        (100, 0, 0.1, 0),      # no confident sample: nothing leaves either
        (100, 4, 0.1, 4),      # fewer confident than fraction * |X_l|
        (100, 50, 0.0, 0),     # fraction 0
        (25, 50, 0.1, 3),      # 2.5 rounds half up
        (24, 50, 0.1, 2),      # 2.4 rounds down
        (26, 50, 0.1, 3),      # 2.6 rounds up
        (10, 50, 0.15, 2),     # 1.5 rounds half up
        (4, 50, 1.0, 4),       # everything swapped
        (0, 50, 0.1, 0),       # no labelled samples
    ],
)
def test_compose_round_counts(n_labelled: int, n_confident: int, fraction: float, expected: int) -> None:
    draw = _draw(torch.arange(n_labelled), torch.arange(500, 500 + n_confident), fraction)
    assert len(draw.removed) == len(draw.added) == expected


def _same(a: RoundDraw, b: RoundDraw) -> bool:
    return torch.equal(a.removed, b.removed) and torch.equal(a.added, b.added)


def test_compose_round_deterministic_per_seed_and_round() -> None:
    first = _draw(LABELLED, CONFIDENT, seed=3, round_index=2)
    assert _same(first, _draw(LABELLED, CONFIDENT, seed=3, round_index=2))


def test_compose_round_differs_between_rounds_and_seeds() -> None:
    base = _draw(LABELLED, CONFIDENT, seed=3, round_index=2)
    for other in (_draw(LABELLED, CONFIDENT, seed=3, round_index=3), _draw(LABELLED, CONFIDENT, seed=4,
                                                                           round_index=2)):
        assert not torch.equal(base.removed, other.removed)
        assert not torch.equal(base.added, other.added)


def test_round_seed_is_stable_and_distinct() -> None:
    # A fixed value: Python's hash() is salted per interpreter, sha256 is not.
    assert round_seed(0, 0) == round_seed(0, 0) < 2**63
    assert len({round_seed(s, r) for s in range(10) for r in range(10)}) == 100
    assert round_seed(1, 0) != round_seed(0, 1_000_003)


def test_compose_round_ignores_input_order() -> None:
    gen = torch.Generator().manual_seed(7)
    shuffled_l = LABELLED[torch.randperm(100, generator=gen)]
    shuffled_c = CONFIDENT[torch.randperm(50, generator=gen)]
    assert _same(_draw(shuffled_l, shuffled_c, round_index=5), _draw(LABELLED, CONFIDENT, round_index=5))


def test_compose_round_every_labelled_id_removed_eventually() -> None:
    counts = torch.zeros(100)
    for r in range(200):
        counts[_draw(LABELLED, CONFIDENT, round_index=r).removed] += 1
    assert (counts > 0).all()
    # 200 rounds x 10 draws over 100 ids: 20 each on average; a uniform draw stays well within 5..40.
    assert counts.min() >= 5 and counts.max() <= 40


def test_compose_round_smaller_u_removes_prefix_of_same_draw() -> None:
    full = _draw(LABELLED, CONFIDENT, round_index=1)
    few = _draw(LABELLED, CONFIDENT[:3], round_index=1)
    assert torch.isin(few.removed, full.removed).all()


def test_compose_round_is_stable_when_one_confident_id_enters_or_leaves() -> None:
    # Ranking by a hash of (seed, round, id): one id more or less in U_t changes at most one added id
    # (a permutation of positions, as before, would have reshuffled the whole draw).
    confident = torch.arange(1000, 1400)  # n = 10 of 400: U_t is not the limit
    base = _draw(LABELLED, confident, round_index=4)
    for other in (confident[confident != int(base.added[3])], torch.cat([confident, torch.tensor([5000])]),
                  confident[confident != 1001]):
        draw = _draw(LABELLED, other, round_index=4)
        assert torch.equal(draw.removed, base.removed)
        assert int((~torch.isin(draw.added, base.added)).sum()) <= 1


def test_id_hash_is_splitmix64() -> None:
    # The rank is a fixed function of (key, id), checked against splitmix64's finaliser in Python ints.
    def reference(x: int, key: int) -> int:
        m = 2**64 - 1
        x = (x ^ (key & (2**63 - 1))) & m
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return (x ^ (x >> 31)) & (2**63 - 1)

    ids = torch.tensor([0, 1, 2, 12345, 2**40 + 7, 2**62])
    for key in (0, 99, round_seed(3, 2)):
        assert id_hash(ids, key).tolist() == [reference(int(i), key) for i in ids]


def test_compose_round_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="fraction"):
        _draw(LABELLED, CONFIDENT, fraction=1.5)
    with pytest.raises(ValueError, match="overlap"):
        _draw(LABELLED, torch.tensor([5, 1000]))
    with pytest.raises(ValueError, match="repeated"):
        _draw(torch.tensor([1, 1, 2]), CONFIDENT)


def test_round_members() -> None:
    labelled = torch.tensor([5, 1, 3, 7])
    draw = RoundDraw(removed=torch.tensor([3, 7]), added=torch.tensor([20, 10]))
    assert round_members(labelled, draw).tolist() == [1, 5, 10, 20]
    members = round_members(LABELLED, _draw(LABELLED, CONFIDENT))
    assert len(members) == 100 and len(members.unique()) == 100


# ---------------------------------------------------------------- section 4: stopping


def test_moving_average_values() -> None:
    assert moving_average([1, 2, 3, 4], 2) == [1.5, 2.5, 3.5]
    assert moving_average([1, 2], 5) == []
    with pytest.raises(ValueError, match="window"):
        moving_average([1.0], 0)


@pytest.mark.parametrize(
    ("history", "window", "expected"),
    [
        ([0.5, 0.6, 0.7, 0.8, 0.9], 5, False),             # window values only: no A_{t-1} yet
        ([0.5, 0.6, 0.7, 0.8, 0.9, 0.4], 5, True),         # falls at exactly window + 1 values
        ([0.5, 0.6, 0.7, 0.8, 0.9, 0.95], 5, False),       # rising
        ([0.5] * 8, 5, False),                             # plateau
        ([0.1, 0.43, 0.61, 0.91, 0.97, 0.1], 5, False),    # plateau; naive sum() would read a fall
        ([0.6, 0.7, 0.5], 1, True),                        # T = 1: the last accuracy fell
        ([0.7, 0.6, 0.65, 0.7], 2, False),                 # A = .65, .625, .675: rose at the end
        ([0.7, 0.6, 0.65, 0.55], 2, True),                 # A = .65, .625, .60: falling
        ([], 5, False),
    ],
)
def test_should_stop(history: list[float], window: int, expected: bool) -> None:
    assert should_stop(history, window) is expected


def test_should_stop_default_window_is_five() -> None:
    # The last accuracy rose (0.5 -> 0.6) but is below the one five rounds back (0.9): A_t fell.
    history = [0.9, 0.5, 0.5, 0.5, 0.5, 0.6]
    assert should_stop(history) is True
    assert should_stop(history, window=1) is False


# ---------------------------------------------------------------- beyond the paper: class-adaptive tau


def _adaptive_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Binary fractions, so every mean is exact: class 0's correct rows 0.875, 0.625; class 1's 0.75."""
    probs = torch.tensor([
        [0.875, 0.0625, 0.0625],   # y 0, right
        [0.625, 0.25, 0.125],      # y 0, right
        [0.5, 0.25, 0.25],         # y 1, wrong (predicted 0): left out of both means
        [0.125, 0.75, 0.125],      # y 1, right
        [0.0625, 0.0625, 0.875],   # unlabelled: never in a mean
        [0.8125, 0.125, 0.0625],   # unlabelled, predicted 0, above 0.75
        [0.75, 0.125, 0.125],      # unlabelled, predicted 0, equal to 0.75: not confident (strict)
        [0.125, 0.75, 0.125],      # unlabelled, predicted 1, equal to 0.75: not confident
        [0.25, 0.125, 0.625],      # unlabelled, predicted 2: no right labelled row, tau 0.5 applies
    ])
    return probs, torch.tensor([0, 0, 1, 1, -1, -1, -1, -1, -1])


def test_class_thresholds_known_answer_and_fallback_to_tau() -> None:
    probs, labels = _adaptive_case()
    assert class_thresholds(probs, labels, tau=0.5, mode="class_adaptive").tolist() == [0.75, 0.75, 0.5]
    assert class_thresholds(probs, labels, tau=0.5).tolist() == [0.5, 0.5, 0.5]  # fixed, the default


def test_class_adaptive_selection_and_rewrite() -> None:
    probs, labels = _adaptive_case()
    taus = class_thresholds(probs, labels, tau=0.5, mode="class_adaptive")
    assert confident_unlabelled(probs, labels, taus).nonzero().flatten().tolist() == [4, 5, 8]
    assert confident_unlabelled(probs, labels, 0.5).nonzero().flatten().tolist() == [4, 5, 6, 7, 8]
    rw = rewrite_targets(probs, labels, torch.zeros_like(probs), tau=taus, alpha=None)
    assert torch.equal(rw.targets[[4, 5, 8]], probs[[4, 5, 8]]) and not rw.targets[[6, 7]].any()


def test_class_thresholds_with_nothing_right_is_tau_everywhere() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    got = class_thresholds(probs, torch.tensor([1, 0]), tau=0.7, mode="class_adaptive")
    assert torch.equal(got, torch.full((2,), 0.7))
    assert class_thresholds(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), tau=0.6,
                            mode="class_adaptive").tolist() == pytest.approx([0.6, 0.6])


def test_class_thresholds_and_selection_reject_bad_input() -> None:
    probs, labels = _adaptive_case()
    with pytest.raises(ValueError, match="mode"):
        class_thresholds(probs, labels, tau=0.5, mode="adaptive")
    with pytest.raises(ValueError, match=r"per-class tau must be \[3\]"):
        select_confident(probs, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="labels must lie"):
        class_thresholds(probs, torch.full((9,), 3), tau=0.5, mode="class_adaptive")


def test_method_config_threshold_default_and_choices() -> None:
    assert MethodConfig().threshold == "fixed"
    assert MethodConfig(threshold="class_adaptive").threshold == "class_adaptive"
    with pytest.raises(ValueError, match="threshold"):
        MethodConfig(threshold="adaptive")
