"""The pictures the evaluation commands write (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen before pyplot is imported)
import numpy as np  # noqa: E402

from fer_dist.files import TMP_PREFIX  # noqa: E402

DPI = 100


def save(fig: Any, path: Path) -> Path:
    """Write the figure to a temp sibling, then rename: a reader never sees half a PNG."""
    path = Path(path)
    tmp = path.parent / f"{TMP_PREFIX}{path.name}"
    fig.savefig(tmp, dpi=DPI, format="png", bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def confusion(cm: np.ndarray, classes: Sequence[str], title: str, path: Path) -> Path:
    """Row-normalised confusion matrix with the counts in each cell."""
    cm = np.asarray(cm, np.float64)
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def reliability(cal: dict[str, Any], title: str, path: Path) -> Path:
    """Accuracy against confidence per bin, the diagonal of perfect calibration, and the bins' sizes."""
    bins = cal["bins"]
    edges = np.linspace(0, 1, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    count = np.asarray(cal["bin_count"])
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=(3, 1), sharex=True)
    used = count > 0
    ax.bar(centres[used], np.asarray(cal["bin_accuracy"])[used], width=1 / bins, edgecolor="black",
           alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot(centres[used], np.asarray(cal["bin_confidence"])[used], "r.", label="mean confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"{title}\nECE {cal['ece']:.3f}", fontsize=10)
    ax2.bar(centres, count, width=1 / bins, edgecolor="black", color="grey")
    ax2.set_xlabel("confidence (top-1 probability)")
    ax2.set_ylabel("samples")
    # below both panels: inside the axes the legend hid the low-confidence bars
    fig.legend(*ax.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3,
               fontsize=9, frameon=False)
    return save(fig, path)


def curve_grid(curves: list[dict[str, Any]], title: str, path: Path, columns: int = 6) -> Path:
    """The paper's Figure 1: per sequence, p(sequence's class) frame by frame (and the true intensity)."""
    rows = max(1, -(-len(curves) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.1 * rows + 0.8), sharex=True,
                             sharey=True, squeeze=False)
    for ax, curve in zip(axes.flat, curves, strict=False):
        x = np.asarray(curve["position"])
        ax.plot(x, curve["prob"], "b.-", lw=1, ms=3, label="p(sequence's class)")
        if curve.get("intensity") is not None:
            ax.plot(x, curve["intensity"], "k:", lw=1, label="true intensity")
        ax.set_title(f"{curve['sequence']} ({curve['class']})", fontsize=9)
        ax.set_ylim(-0.05, 1.05)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.supxlabel("position in the sequence (0 first frame, 1 last)", fontsize=10)
    fig.supylabel("probability of the sequence's class", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
               ncol=2, fontsize=9, frameon=False)
    return save(fig, path)


def rounds(runs: list[dict[str, Any]], path: Path) -> Path:
    """Validation accuracy and confident unlabelled samples per round, one line per run, on two axes."""
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for run in runs:
        hist = run["history"]
        x = [h["x"] for h in hist]
        line, = ax.plot(x, [h["val"] for h in hist], ".-", label=run["name"])
        conf = [(h["x"], h["confident"]) for h in hist if h.get("confident") is not None]
        if conf:
            ax2.plot(*zip(*conf, strict=True), ".-", color=line.get_color())
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=8)
    ax.set_title("warm-up epochs (<= 0) and self-training rounds (> 0)", fontsize=10)
    ax2.set_ylabel("confident unlabelled")
    ax2.set_xlabel("round (warm-up epochs counted back from 0)")
    return save(fig, path)
