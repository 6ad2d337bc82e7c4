"""The method's math (METHOD.md), as plain tensor functions with no distributed, accelerate or I/O import.

Map to /work/shared/METHOD.md:
  section 1   smooth_labels                       two-sided label smoothing
  Notation    soft_cross_entropy                  L = -sum_k q(k|x) log p(k|x)
  3.2         select_confident, confident_unlabelled   U_t = {x in X_u : max_k p_t(k|x) > tau}
  beyond      class_thresholds                    per-class tau from labelled predictions (Ada-CM), floored
  beyond      pseudo_targets                      soft (the paper), hard or sharpened targets of U_t
  diagnostic  selection_quality                   U_t per predicted class and its precision on hidden labels
  3.3         alpha_target, rewrite_targets       new targets: p for U_t, p or f for X_l (alpha rule)
  3.4         compose_round, round_members        swap a random fraction r of X_l for samples of U_t
  section 4   moving_average, should_stop         stop when the T-round moving average of Acc falls
  section 5   compose_round ranks ids by a hash of (seed, round, id): the same on 1 or 64 processes

Thresholds are strict everywhere, as in METHOD.md: a probability equal to tau (or alpha) does not pass.
Contract violations (shapes, ranges) raise ValueError: config values are validated, with the field's name,
by config.py before they reach this module.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from fer_dist.hashing import mix64

UNLABELLED = -1


def _check_labels(labels: torch.Tensor, num_classes: int, *, allow_unlabelled: bool) -> None:
    """Raise ValueError unless labels is a 1-D integer tensor of class indices (or -1 where allowed)."""
    integer = not (labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool)
    if labels.dim() != 1 or not integer:
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if labels.numel():
        low = UNLABELLED if allow_unlabelled else 0
        lo, hi = int(labels.min()), int(labels.max())
        if lo < low or hi >= num_classes:
            raise ValueError(f"labels must lie in [{low}, {num_classes}), got values in [{lo}, {hi}]")


def _check_probs(probs: torch.Tensor, rows: int | None = None) -> None:
    """Raise ValueError unless probs is [M, K] (with M == rows when given)."""
    if probs.dim() != 2 or (rows is not None and probs.shape[0] != rows):
        raise ValueError(f"probs must be [{rows if rows is not None else 'M'}, K], got {tuple(probs.shape)}")


def smooth_labels(labels: torch.Tensor, num_classes: int, eps: float) -> torch.Tensor:
    """Two-sided smoothed targets [N, K]: 1 - eps on the class, eps / (K - 1) on every other (METHOD.md 1)."""
    _check_labels(labels, num_classes, allow_unlabelled=False)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps must lie in [0, 1], got {eps}")
    targets = torch.full((labels.shape[0], num_classes), eps / (num_classes - 1), device=labels.device)
    targets.scatter_(1, labels.long().unsqueeze(1), 1.0 - eps)
    return targets


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against soft targets, -sum_k q(k) log_softmax(logits)(k), per row then reduced."""
    if logits.dim() != 2 or logits.shape != targets.shape:
        raise ValueError(f"logits and targets must both be [N, K], got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    # float32 log-softmax: under bf16 autocast the logits arrive in bf16, too coarse for a loss.
    per_row = -(targets.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        # The trainer divides by the sample count totalled over all processes (torchtitan's pattern).
        return per_row.sum()
    if reduction == "none":
        return per_row
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


Threshold = float | torch.Tensor  # one tau for every class, or a [K] tensor: the tau of each class


def select_confident(probs: torch.Tensor, tau: Threshold) -> torch.Tensor:
    """Bool [M]: max_k p(k) > tau, strictly (a maximum equal to tau is not confident).

    With a [K] tensor of thresholds, a row is compared with the threshold of its predicted class (argmax).
    """
    _check_probs(probs)
    if probs.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=probs.device)
    top = probs.max(dim=1)
    if isinstance(tau, torch.Tensor):
        if tau.shape != (probs.shape[1],):
            raise ValueError(f"per-class tau must be [{probs.shape[1]}], got {tuple(tau.shape)}")
        return top.values > tau.to(probs.device, probs.dtype)[top.indices]
    return top.values > tau


def class_thresholds(probs: torch.Tensor, labels: torch.Tensor, *, tau: float, mode: str = "fixed",
                     floor: float | None = None) -> torch.Tensor:
    """Float [K]: the confidence threshold of each predicted class for this round's selection.

    mode "fixed": tau for every class (METHOD.md 3.2, the paper). mode "class_adaptive" (a step beyond the
    paper, after Ada-CM, CVPR 2022): for class k, the mean of max_j p(j|x) over the labelled rows of the same
    prediction pass that are predicted correctly as k (argmax p == y == k); a class with no correctly
    predicted labelled row falls back to tau. Unlabelled rows (label -1) never enter the means. The means
    are taken in float64 over the rows in their given order, so every process gets the same value. With
    `floor`, no adaptive threshold is below it (unfloored, a hard class's mean fell to 0.32 on FER2013 and let
    near-chance predictions in).
    """
    _check_probs(probs, rows=labels.shape[0] if labels.dim() == 1 else None)
    _check_labels(labels, probs.shape[1], allow_unlabelled=True)
    k = probs.shape[1]
    out = torch.full((k,), float(tau), dtype=torch.float64)
    if mode == "fixed":
        return out.float()
    if mode != "class_adaptive":
        raise ValueError(f"mode must be 'fixed' or 'class_adaptive', got {mode!r}")
    if probs.shape[0]:
        top = probs.detach().to("cpu", torch.float64).max(dim=1)
        y = labels.to("cpu", torch.long)
        right = (y >= 0) & (top.indices == y)
        count = torch.bincount(y[right], minlength=k)
        total = torch.zeros(k, dtype=torch.float64).index_add_(0, y[right], top.values[right])
        out = torch.where(count > 0, total / count.clamp(min=1), out)
    if floor is not None:
        out = out.clamp(min=floor)
    return out.float()


def pseudo_targets(probs: torch.Tensor, kind: str = "soft", temperature: float | None = None) -> torch.Tensor:
    """The targets [M, K] a confident unlabelled sample gets from its prediction p [M, K].

    soft: p itself (METHOD.md 3.3, the paper). hard: the one-hot of argmax p (pseudo-labelling as FixMatch
    does). sharpen: p^(1/T) renormalised (MixMatch's sharpening; T < 1 sharpens, T = 1 is soft).
    """
    _check_probs(probs)
    if kind == "soft":
        return probs.clone()
    if kind == "hard":
        return F.one_hot(probs.argmax(dim=1), probs.shape[1]).to(probs.dtype)
    if kind == "sharpen":
        if temperature is None or temperature <= 0:
            raise ValueError(f"sharpen needs a temperature > 0, got {temperature}")
        # in log space: p^(1/T) underflows for small T and small p
        return torch.softmax(torch.log(probs.double().clamp(min=1e-30)) / temperature, dim=1).to(probs.dtype)
    raise ValueError(f"kind must be 'soft', 'hard' or 'sharpen', got {kind!r}")


class SelectionQuality(NamedTuple):
    """U_t seen against labels the method never saw: per predicted class, and overall."""

    count: list[int]                 # [K] confident samples per predicted class
    correct: list[int]               # [K] of them whose hidden label is the predicted class
    precision: float | None          # correct / count over every class with a hidden label; None: none

    def per_class(self) -> list[float | None]:
        """[K] precision per predicted class; None where no sample of it was selected."""
        return [c / n if n else None for c, n in zip(self.correct, self.count, strict=True)]


def selection_quality(probs: torch.Tensor, hidden: torch.Tensor, confident: torch.Tensor) -> SelectionQuality:
    """How good U_t's pseudo-labels are: `hidden` [M] the true labels (-1 where unknown, e.g. a truly
    unlabelled folder), `confident` [M] the U_t mask. A diagnostic only: nothing the method decides
    reads it."""
    _check_probs(probs, rows=confident.shape[0])
    k = probs.shape[1]
    pred = probs.argmax(dim=1).cpu()[confident.cpu()]
    true = hidden.cpu().long()[confident.cpu()]
    count = torch.bincount(pred, minlength=k)
    known = true >= 0
    correct = torch.bincount(pred[known & (pred == true)], minlength=k)
    n_known = int(known.sum())
    precision = float(correct.sum()) / n_known if n_known else None
    return SelectionQuality(count.tolist(), correct.tolist(), precision)


def confident_unlabelled(probs: torch.Tensor, labels: torch.Tensor, tau: Threshold) -> torch.Tensor:
    """Bool [M], the U_t mask of METHOD.md 3.2: unlabelled rows (label -1) whose max probability > tau
    (per predicted class where tau is a [K] tensor, see select_confident)."""
    _check_probs(probs, rows=labels.shape[0] if labels.dim() == 1 else None)
    _check_labels(labels, probs.shape[1], allow_unlabelled=True)
    return (labels == UNLABELLED) & select_confident(probs, tau)


def alpha_target(labels: torch.Tensor, num_classes: int, alpha: float) -> torch.Tensor:
    """The reset target f [N, K] of METHOD.md 3.3: alpha on the class, (1 - alpha) / (K - 1) elsewhere."""
    return smooth_labels(labels, num_classes, 1.0 - alpha)


class Rewrite(NamedTuple):
    """The outcome of one target rewrite; all masks are bool [M] over the same rows as the table."""

    targets: torch.Tensor  # [M, K], the new rows q_{t+1}
    confident: torch.Tensor  # unlabelled with max p > tau: U_t, target set to p
    reset: torch.Tensor  # labelled, target set to f by the alpha rule
    kept: torch.Tensor  # labelled, target set to p (max p > alpha and argmax p == y)


def rewrite_targets(
    probs: torch.Tensor,
    labels: torch.Tensor,
    current: torch.Tensor,
    *,
    tau: Threshold,
    alpha: float | None,
    pseudo: tuple[str, float | None] = ("soft", None),
) -> Rewrite:
    """New targets q_{t+1} from predictions p_t (METHOD.md 3.3); labels -1 mark unlabelled rows.

    Unlabelled: p where max p > tau (the predicted class's tau where tau is [K]), otherwise the current
    row; `pseudo` = (kind, temperature) of pseudo_targets turns p into a hard or sharpened target.
    Labelled: with alpha None (the rule off) the current row; else p where max p > alpha (strictly)
    and argmax p == y, otherwise f = alpha_target.
    argmax ties resolve to the first maximal class (torch.argmax), so a tie involving y counts as y only
    when y is the lowest tied index.
    """
    _check_probs(probs, rows=labels.shape[0] if labels.dim() == 1 else None)
    _check_labels(labels, probs.shape[1], allow_unlabelled=True)
    if current.shape != probs.shape:
        raise ValueError(f"current must be {tuple(probs.shape)} like probs, got {tuple(current.shape)}")
    labelled = labels != UNLABELLED
    confident = confident_unlabelled(probs, labels, tau)
    targets = current.clone()
    new_rows = probs.to(current.dtype)
    targets[confident] = pseudo_targets(new_rows[confident], *pseudo)
    if alpha is None:
        none = torch.zeros_like(labelled)
        return Rewrite(targets, confident, none, none.clone())
    if probs.shape[0]:
        top, arg = probs.max(dim=1).values, probs.argmax(dim=1)
        kept = labelled & (top > alpha) & (arg == labels.long())
    else:
        kept = torch.zeros_like(labelled)
    reset = labelled & ~kept
    targets[kept] = new_rows[kept]
    # clamp: unlabelled rows need some valid class to build f from; they are masked out by `reset`.
    f = alpha_target(labels.long().clamp(min=0), probs.shape[1], alpha).to(current.dtype)
    targets[reset] = f[reset]
    return Rewrite(targets, confident, reset, kept)


class RoundDraw(NamedTuple):
    """The random part of a round's composition: ids leaving X_l and ids coming from U_t, sorted."""

    removed: torch.Tensor  # LongTensor [n], a subset of the labelled ids
    added: torch.Tensor  # LongTensor [n], a subset of the confident unlabelled ids


def round_seed(seed: int, round_index: int) -> int:
    """A stable 63-bit generator seed for (seed, round): sha256, not Python's salted hash()."""
    digest = hashlib.sha256(f"fer-dist/round/{seed}/{round_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _sorted_unique(ids: torch.Tensor, name: str) -> torch.Tensor:
    """ids as a sorted CPU LongTensor; ValueError if not 1-D or if an id repeats."""
    if ids.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    out = torch.sort(ids.detach().to("cpu", torch.long)).values
    if out.numel() > 1 and bool((out[1:] == out[:-1]).any()):
        raise ValueError(f"{name} holds repeated ids")
    return out


def id_hash(ids: torch.Tensor, key: int) -> torch.Tensor:
    """A 63-bit pseudo-random rank per id, a pure function of (key, id): splitmix64 of id ^ key."""
    x = ids.to("cpu", torch.long).numpy().astype(np.uint64) ^ np.uint64(key & (2**63 - 1))
    return torch.from_numpy((mix64(x) & np.uint64(2**63 - 1)).astype(np.int64))


def _smallest(ids: torch.Tensor, key: int, n: int) -> torch.Tensor:
    """The n ids of smallest id_hash(key, id), sorted ascending (ties cannot depend on input order:
    ids are unique and ranked by (hash, id))."""
    if n == 0:
        return ids[:0]
    h = id_hash(ids, key)
    order = torch.from_numpy(np.lexsort((ids.numpy(), h.numpy())))  # by hash, then by id
    return torch.sort(ids[order[:n]]).values


def compose_round(
    labelled_ids: torch.Tensor,
    confident_ids: torch.Tensor,
    *,
    fraction: float,
    seed: int,
    round_index: int,
) -> RoundDraw:
    """Draw the ids a round swaps (METHOD.md 3.4): n labelled ids out, n confident unlabelled ids in.

    n = min(floor(fraction * |X_l| + 0.5), |U_t|), rounding halves up (Python's round() would round
    2.5 to 2). Design decision: the removed count equals the added count, so the round trains on |X_l|
    samples; when U_t is smaller than fraction * |X_l| fewer labelled samples leave ("put in its place
    the same number ... fewer if U_t is smaller"). Each draw keeps the n ids of smallest hash of
    (seed, round, which draw, id): a uniform draw without replacement that depends on no order and no
    number of processes, and is stable: one id entering or leaving U_t changes at most one added id
    (a permutation of positions would reshuffle them all), and a smaller n keeps a subset.
    Returned tensors are CPU LongTensors sorted ascending.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    labelled = _sorted_unique(labelled_ids, "labelled_ids")
    confident = _sorted_unique(confident_ids, "confident_ids")
    if bool(torch.isin(confident, labelled).any()):
        raise ValueError("confident_ids and labelled_ids overlap: U_t holds unlabelled samples only")
    n = min(int(fraction * labelled.numel() + 0.5), confident.numel())
    key = round_seed(seed, round_index)
    removed = _smallest(labelled, key, n)
    added = _smallest(confident, key ^ 0x5DEECE66D, n)  # another key: the two draws are independent
    return RoundDraw(removed, added)


def round_members(labelled_ids: torch.Tensor, draw: RoundDraw) -> torch.Tensor:
    """Sorted ids of the round's training set: X_l without draw.removed, plus draw.added."""
    labelled = _sorted_unique(labelled_ids, "labelled_ids")
    stay = labelled[~torch.isin(labelled, draw.removed.to("cpu"))]
    return torch.sort(torch.cat([stay, draw.added.to("cpu", torch.long)])).values


def moving_average(history: Sequence[float], window: int) -> list[float]:
    """A_t = mean of Acc_{t-T+1..t} for every t with T values behind it (len(history) - T + 1 entries)."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    values = [float(v) for v in history]
    # fsum is exactly rounded, so windows holding the same values give the same average in any order:
    # a plateau never reads as a fall through summation noise.
    return [math.fsum(values[t - window + 1 : t + 1]) / window for t in range(window - 1, len(values))]


def should_stop(history: Sequence[float], window: int = 5) -> bool:
    """METHOD.md 4: stop when the moving average falls, A_t < A_{t-1}; False before window + 1 values."""
    averages = moving_average(history, window)
    return len(averages) >= 2 and averages[-1] < averages[-2]
