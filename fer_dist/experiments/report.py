"""docs/RESULTS.md from the records in docs/results/*.json and the definitions in launch_configs/experiments/
(`fer-dist experiment report`).

Everything in the page is computed from the records: per arm the mean and spread (sample standard
deviation over seeds) of test accuracy, macro-F1 and validation accuracy, how each warm-up ended (its
patience rule, or its cap), the rounds and the confident / drawn unlabelled samples per round; gains
against the experiment's reference arm paired by seed, with the 95 % t interval of their mean and the
power of the paired t-test for a 2-point gain (both from 3 seeds up); the intensity metric where recorded;
the reading against the paper's figures where the protocol is the paper's, with the experiment's own
`reading.setting`; what the rounds selected and how right it was (diagnostics.py). With no record, it
says so; a retired experiment gets one line.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from fer_dist.experiments.diagnostics import last_round, per_round, selection, shrinking
from fer_dist.experiments.records import read_records
from fer_dist.experiments.spec import Experiment
from fer_dist.experiments.stats import (
    MIN_SEEDS,
    against_paper,
    mean_sd,
    paired_gain,
    pct,
    power_note,
    same_data,
    verdict,
)

# The paper's FER2013 figures (METHOD.md 7), in points: baseline VGG-Face 69.57 %, proposed 73.58 %.
PAPER = {"baseline": 69.57, "proposed": 73.58, "smoothing_gain": 2.0, "both_gain": 4.0, "crossdb_gain": 11.0}
PAPER_CROSSDB = ("ckplus", "rafd")  # the paper's +11: CK+ labelled, RaFD the unlabelled target and test
# What an arm is, where its name says less than its config: shown beside the name.
ARM_NOTES = {"unlabelled": "alpha rule + unlabelled data, no smoothing",
             "both_adaptive": "our class-adaptive thresholds, not Ada-CM",
             "supervised": "budget-matched control"}
_ADAPTIVE = ("per class the mean confidence of the correctly predicted labelled faces; a variant after "
             "Ada-CM, not Ada-CM")
# Which arms compare with which paper figure: (arm, reference arm, the paper's gain or None, words).
COMPARISONS = {
    "ablation": [("smoothing", "baseline", PAPER["smoothing_gain"], "label smoothing alone"),
                 ("unlabelled", "baseline", None, "the alpha rule and unlabelled data without label "
                  "smoothing (the paper gives no separate figure)"),
                 ("both", "baseline", PAPER["both_gain"], "smoothing and unlabelled data (the method)"),
                 ("both_adaptive", "both", None, f"class-adaptive thresholds ({_ADAPTIVE}) against the "
                  "paper's fixed tau"),
                 ("alpha", "supervised", None, "the alpha rule alone, no unlabelled data"),
                 ("method", "supervised", None, "the paper's method (r = 0.1) against the same budget of "
                  "supervised epochs"),
                 ("method_r", "supervised", None, "the method with a larger swap (replace_fraction)"),
                 ("method_adaptive", "supervised", None, f"the method with floored class-adaptive thresholds "
                  f"({_ADAPTIVE})"),
                 ("method_hard", "supervised", None, "the method with hard (argmax) pseudo-targets"),
                 ("method_strong", "supervised", None, "the method with U_t under strong augmentation"),
                 ("dlib_resnet", "mobilenet_v2", None, "dlib's face-recognition ResNet against ImageNet "
                  "MobileNetV2 (the backbone alone)"),
                 ("dlib_resnet_112", "dlib_resnet", None, "dlib's ResNet at 112 px against its own 150 px "
                  "(48 px faces up-sampled less)")],
    "crossdb": [("unlabelled_target", "no_unlabelled", PAPER["crossdb_gain"],
                 "unlabelled target-domain faces"),
                ("unlabelled_source", "no_unlabelled", None, "unlabelled FER2013 test faces (same domain)")],
}


def by_arm(records: list[dict[str, Any]], arms: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by arm, arms in the experiment's order (then any others), each sorted by seed."""
    out: dict[str, list[dict[str, Any]]] = {}
    for arm in arms + sorted({r["arm"] for r in records} - set(arms)):
        rows = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
        if rows:
            out[arm] = rows
    return out


_WARMUP_KEYS: dict[str, tuple[int, int] | None] = {}


def warmup_keys(exp: Experiment, arm: str) -> tuple[int, int] | None:
    """(warmup_epochs, warmup_patience) as the arm trains them (the base resolved with its overrides), or
    None for an arm the definition no longer has (resolved once per base, schedule and arm)."""
    if arm not in exp.arms:
        return None
    key = json.dumps([str(exp.base), exp.schedule, exp.arms[arm]], sort_keys=True, default=str)
    if key not in _WARMUP_KEYS:
        from fer_dist.config import load_config

        m = load_config(exp.base, exp.overrides(arm, exp.seeds[0], Path("runs") / "check")).method
        _WARMUP_KEYS[key] = (m.warmup_epochs, m.warmup_patience)
    return _WARMUP_KEYS[key]


def warmup_end(exp: Experiment, arm: str, record: dict[str, Any]) -> str:
    """How the warm-up ended: "rule" (its patience rule), "cap" (warmup_epochs), or "unknown". Older
    records lack `warmup_end`: it is derived from their validation curve and the arm's warm-up keys, as
    the trainer decides it (the rule once `patience` epochs in a row bring no better accuracy)."""
    if record.get("warmup_end") in ("patience", "cap"):
        return "rule" if record["warmup_end"] == "patience" else "cap"
    curve, keys = record.get("val_per_warmup_epoch") or [], warmup_keys(exp, arm)
    if not curve or keys is None:
        return "unknown"
    cap, patience = keys
    bad, best = 0, -1.0
    for acc in curve:
        bad, best = (0, acc) if acc > best else (bad + 1, best)
    if bad >= patience:
        return "rule"
    return "cap" if len(curve) == cap else "unknown"


def _warmup_cell(exp: Experiment, arm: str, rows: list[dict[str, Any]]) -> str:
    def cell(r: dict[str, Any]) -> str:
        epochs = r.get("warmup_epochs") or len(r.get("val_per_warmup_epoch") or [])
        end = {"rule": "rule", "cap": "capped", "unknown": "unknown"}[warmup_end(exp, arm, r)]
        return f"{epochs} {end}" if epochs else "unknown"

    return " / ".join(cell(r) for r in rows)


def provenance(records: list[dict[str, Any]]) -> str:
    """How many records, when, on which machines (host ids where recorded), with which training code."""
    dates = sorted(r.get("date", "") for r in records)
    machines = sorted({r["machine"] + ("" if ", host " in r["machine"] else ", unknown host")
                       for r in records})
    return (f"{len(records)} record{'s' * (len(records) != 1)}, {dates[0]} to {dates[-1]}; machines: "
            f"{'; '.join(machines)}; commits: {', '.join(sorted({r['commit'][:7] for r in records}))}.")


def resolution(exp: Experiment, records: list[dict[str, Any]]) -> str:
    """How finely the test set measures: one face in points, and the binomial standard error at its mean
    over the independent faces (n / frames_per_sequence where sequences give near-identical frames)."""
    sizes = sorted({r["n_test"] for r in records if "n_test" in r})
    if len(sizes) != 1:
        return ""
    n, p, k = sizes[0], statistics.fmean(r["test_accuracy"] for r in records), exp.frames_per_sequence
    se = 100 * (p * (1 - p) / (n / k)) ** 0.5
    frames = (f" counted as n / {k} = {n / k:.0f} independent faces ({k} near-identical frames per "
              "sequence)" if k > 1 else "")
    return (f" Test set: {n} faces, one face = {100 / n:.2f} points; the binomial standard error of one "
            f"model's accuracy near {100 * p:.0f} %{frames} is {se:.2f} points.")


def arm_table(exp: Experiment, groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    crossdb = exp.kind == "crossdb"
    others = sorted({t["test_set"] for rows in groups.values() for r in rows
                     for t in r.get("other_tests", [])})
    best = any("best" in r for rows in groups.values() for r in rows)
    columns = ["arm", "seeds", *(["test set"] if crossdb else []), "test acc %", "macro-F1 %",
               *(f"{name} acc %" for name in others), "val acc %", "warm-up epochs", "rounds",
               *(["best / rule stop"] if best else []), "confident per round", "drawn per round", "wall min"]
    head = "| " + " | ".join(columns) + " |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for arm, rows in groups.items():
        twins = sorted({r["trained_for"] for r in rows if "trained_for" in r})
        # a twin is tested only where its run is still on disk; seeds trained again are not "trained as" it
        some = [str(r["seed"]) for r in rows if "trained_for" in r]
        which = f"seed{'s' if len(some) > 1 else ''} {', '.join(some)} " if len(some) < len(rows) else ""
        name = arm + (f" ({ARM_NOTES[arm]})" if arm in ARM_NOTES else "")
        cells = [name + (f" ({which}trained as {', '.join(twins)})" if twins else ""),
                 ", ".join(str(r["seed"]) for r in rows)]
        if crossdb:
            cells.append(", ".join(sorted({r.get("test_set", "?") for r in rows})))
        cells += [pct([r["test_accuracy"] for r in rows]), pct([r["macro_f1"] for r in rows])]
        for other in others:
            got = [t["accuracy"] for r in rows for t in r.get("other_tests", []) if t["test_set"] == other]
            cells.append(pct(got) if got else "-")
        cells += [pct([r["val_accuracy"] for r in rows]), _warmup_cell(exp, arm, rows),
                  " / ".join(str(r["rounds"]) for r in rows)]
        if best:
            cells.append(" / ".join(f"{r.get('best') or '-'}, {r.get('rule_stop_round') or '-'}"
                                    for r in rows))
        cells += ["; ".join(per_round(r["confident_per_round"]) for r in rows),
                  "; ".join(per_round(r["drawn_per_round"]) for r in rows),
                  f"{statistics.fmean(r['wall_s'] for r in rows) / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _overrides(tree: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={json.dumps(v)}`" for k, v in tree.items())


def data_line(records: list[dict[str, Any]]) -> list[str]:
    """X_l's class counts, X_u's and the validation set's sizes, as the first record with them states."""
    rec = next((r for r in records if "labelled_per_class" in r), None)
    if rec is None:
        return []
    from fer_dist.classes import CLASSES

    per_class = ", ".join(f"{c} {n}" for c, n in zip(CLASSES, rec["labelled_per_class"], strict=False))
    # A supervised-only experiment (no rounds in any record) loads its base config's X_u but never uses it.
    unlabelled = (f"X_u {rec.get('unlabelled_samples', '?')} faces, labels hidden"
                  if any(r.get("rounds") for r in records) else "no X_u (no self-training rounds)")
    return [f"Data (seed {rec['seed']}): X_l {sum(rec['labelled_per_class'])} faces ({per_class}); "
            f"{unlabelled}; validation {rec.get('val_samples', '?')} faces.", ""]


def experiment_section(exp: Experiment, records: list[dict[str, Any]], results: Path,
                       figure: str | None = None, against: list[dict[str, Any]] | None = None) -> list[str]:
    """One experiment's section; `against`: the records of the experiment `exp.against` names."""
    if exp.retired:
        ends = [warmup_end(exp, r["arm"], r) for r in records]
        capped = f" (warm-ups: {ends.count('cap')} of {len(ends)} capped)" if ends else ""
        return [f"## {exp.name}", "", f"Retired: {exp.retired} Its {len(records)} records stay in "
                f"`{results}`{capped}; nothing is read from them here.", ""]
    lines = [f"## {exp.name}", "", exp.description.strip(), "",
             f"Definition `{exp.path}` (base `{exp.base}`; seeds {', '.join(map(str, exp.seeds))}; "
             f"every arm: {_overrides(exp.schedule) or 'the base as it is'}"
             + ("; every arm's rounds start from one shared warm-up per seed" if exp.shared_warmup else "")
             + (f"; trained with the fer_dist of commit {exp.code}" if exp.code else "")
             + f"), records `{results}`. Arms: "
             + "; ".join(f"**{arm}** {_overrides(o) or '(the base)'}" for arm, o in exp.arms.items()) + ".",
             "", "Run (skips what is recorded, resumes what was interrupted; `submit`: the same as a SLURM "
             "job array):", "", f"    fer-dist experiment run {exp.path}",
             f"    fer-dist experiment submit {exp.path}", ""]
    if not records:
        return lines + ["No runs of this experiment are recorded yet: it has no results.", ""]
    groups = by_arm(records, list(exp.arms))
    spread = "Means ± sample standard deviation over seeds."
    lines += [f"{provenance(records)} {spread}{resolution(exp, records)}", ""]
    lines += data_line(records) + arm_table(exp, groups) + [""]
    if figure:
        lines += [f"![Selected unlabelled faces and their pseudo-label precision per round, per arm, "
                  f"{exp.name}]({figure})", ""]
    lines += warmup_curves(exp, groups) + intensity(groups)
    return lines + reading(exp, groups, by_arm(against or [], [])) + selection(groups)


def warmup_curves(exp: Experiment, groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Validation accuracy per epoch of the warm-ups (3 epochs or more) that their cap ended: was the model
    still learning when the cap stopped it? A shared warm-up is shown once."""
    rows, seen = [], set()
    for arm, rs in groups.items():
        for r in rs:
            curve = tuple(r.get("val_per_warmup_epoch") or [])
            if len(curve) >= 3 and warmup_end(exp, arm, r) == "cap" and (r["seed"], curve) not in seen:
                seen.add((r["seed"], curve))
                rows.append((arm, r))
    if not rows:
        return []
    lines = ["Validation accuracy per warm-up epoch of the capped warm-ups (the cap, not the patience rule, "
             "ended them):", "", "| arm | seed | val acc % per warm-up epoch |", "| --- | --- | --- |"]
    lines += [f"| {arm} | {r['seed']} | {' '.join(f'{100 * v:.2f}' for v in r['val_per_warmup_epoch'])} |"
              for arm, r in rows]
    m, sd = mean_sd([100 * (r["val_per_warmup_epoch"][-1] - r["val_per_warmup_epoch"][-3]) for _, r in rows])
    runs = f"{len(rows)} warm-up" + ("s" if len(rows) > 1 else "")
    return lines + ["", f"Over their last two epochs validation accuracy moved by {m:+.2f} ± {sd:.2f} points "
                    f"({runs}; above 0: still learning when the cap ended the warm-up).", ""]


def intensity(groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The synthetic set's intensity metric per arm, and paired by seed against the references."""
    if not any("intensity" in r for rows in groups.values() for r in rows):
        return []
    lines = ["Intensity (synthetic test sequences: Spearman's rho between the predicted probability of the "
             "sequence's expression and the true intensity, mean over sequences; and the mean absolute step "
             "of that probability between neighbouring frames):", "",
             "| arm | seeds | rho | mean step |", "| --- | --- | --- | --- |"]
    for arm, rows in groups.items():
        got = [r for r in rows if "intensity" in r]
        if got:
            cells = [", ".join(str(r["seed"]) for r in got)]
            for key in ("spearman_mean", "mean_abs_step"):
                m, sd = mean_sd([r["intensity"][key] for r in got])
                cells.append(f"{m:.3f} ± {sd:.3f}" if len(got) > 1 else f"{m:.3f}")
            lines.append(f"| {arm} | {' | '.join(cells)} |")
    lines += ["", "Intensity, paired by seed (rho, arm minus reference):", ""]
    for arm, ref, _, words in COMPARISONS["ablation"]:
        rows = {a: [r for r in groups.get(a, []) if "intensity" in r] for a in (arm, ref)}
        gains, _ = paired_gain(rows[arm], rows[ref], lambda r: r["intensity"]["spearman_mean"])
        if gains:
            lines.append(f"- {arm} vs {ref}, {words}: {verdict(gains, unit='', digits=3)}.")
    return lines + [""]


def protocol(exp: Experiment, arm: str) -> tuple[str | None, str | None]:
    """(the data set X_l comes from, the data set of the first test set), from the experiment's shards."""
    datasets = {Path(s["out"]).as_posix(): s["dataset"] for s in exp.shards}
    from fer_dist.config import load_config

    cfg = load_config(exp.base, exp.overrides(arm, exp.seeds[0], Path("runs") / "check"))
    train = {datasets.get(Path(ref.dir).as_posix()) for ref in cfg.data.labelled}
    return (train.pop() if len(train) == 1 else None), datasets.get(Path(exp.test[0].dir).as_posix())


def _paper_words(exp: Experiment, arm: str, ref: str, paper: float, groups: dict[str, Any],
                 gains: list[float]) -> str:
    if exp.kind == "crossdb":
        ours = protocol(exp, arm)
        if ours != PAPER_CROSSDB:
            return (f"; the paper's {paper:+.0f} points is CK+ -> RaFD (few labelled, many unlabelled target "
                    f"faces) and ours is {ours[0]} -> {ours[1]}: the protocols differ, so no comparison")
    line = "; " + against_paper(gains, paper)
    if len(gains) >= MIN_SEEDS and abs(statistics.fmean(gains) - paper) > 1.0:
        line += f" (ours {statistics.fmean(gains) - paper:+.2f} points from it)"
        if shrinking(groups[arm]):
            line += "; the selection shrinks from the first round to the last (the confident counts above)"
    return line


def reading(exp: Experiment, groups: dict[str, list[dict[str, Any]]],
            against: dict[str, list[dict[str, Any]]] | None = None) -> list[str]:
    """The reading: each comparison's paired gain and its power, beside the paper's where it has one; then
    each arm against the arm of its name in `exp.against` (`against`: that experiment's groups), paired by
    seed where both trained on one X_l (`same_data`)."""
    out = ["Reading (test accuracy, paired by seed):", ""]
    for arm, ref, paper, words in COMPARISONS[exp.kind]:
        if arm not in groups or ref not in groups:
            continue
        gains, _ = paired_gain(groups[arm], groups[ref])
        if not gains:
            continue
        line = f"- {arm} vs {ref}, {words}: {verdict(gains)}{power_note(gains)}"
        if paper is not None:
            line += _paper_words(exp, arm, ref, paper, groups, gains)
        if arm.endswith("adaptive"):
            ours, theirs = (last_round(groups[a], "confident_per_round") for a in (arm, ref))
            line += f"; confident samples in the last round: {ours:.0f} (adaptive) vs {theirs:.0f} ({ref})"
            if any(r.get("thresholds_per_round") for r in groups[arm]):
                line += (f", at a mean threshold over the classes of "
                         f"{last_round(groups[arm], 'thresholds_per_round'):.2f}")
        out.append(line + ".")
    for arm in [a for a in groups if a in (against or {})]:
        gains, _ = paired_gain(groups[arm], against[arm], pair=same_data)
        if gains:
            out.append(f"- {arm} vs {exp.against}'s {arm}, the same arm and X_l per seed in the other "
                       f"experiment (each from its own warm-up): {verdict(gains)}{power_note(gains)}.")
    if exp.compare_levels and "baseline" in groups:
        level = statistics.fmean(100 * r["test_accuracy"] for r in groups["baseline"])
        out.append(f"- Levels: our baseline {level:.2f} % against the paper's {PAPER['baseline']:.2f} % "
                   f"(VGG-Face; proposed {PAPER['proposed']:.2f} %): at this scale compare gains, not "
                   "levels.")
    if len(out) == 2:
        return out + ["No comparison has both of its arms recorded yet.", ""]
    if exp.setting:
        out += ["", f"Where this setting differs from the paper's: {exp.setting}"]
    return out + [""]


INTRO = [
    "# Results", "",
    "Generated by `fer-dist experiment report` from the records in `{results}/` (one per finished arm and "
    "seed, written by `fer-dist experiment run`); do not edit by hand. Accuracies are on each experiment's "
    "test set (FER2013: PrivateTest; cross-database: the CK+48 subject-independent test split), the model "
    "chosen by validation accuracy (FER2013 PublicTest); nothing is tuned on a test split.", "",
    "The paper's figures (Happy et al. 2019, VGG-Face, METHOD.md 7): FER2013 baseline 69.57 %, +2 points "
    "with label smoothing, +4 with smoothing and unlabelled data, 73.58 % proposed; cross-database +11 "
    "points from target-domain unlabelled data (CK+ -> RaFD).", "",
    "How to read a gain: arm minus reference, paired by seed; with 3 seeds or more, the 95 % t interval of "
    "its mean (mean ± t(0.975, n-1) sd / sqrt(n)) and the power of the two-sided paired t-test at 5 % to "
    "detect a 2-point gain at the measured spread sd of the paired differences: power = P(|T| > "
    "t(0.975, n-1)), T noncentral t with n-1 degrees of freedom and noncentrality 2 sqrt(n) / sd. With "
    "fewer than 3 seeds nothing is read (2 seeds give intervals like -7 to +7).", "",
    "In the tables, warm-up epochs per seed: `rule` where the paper's patience rule ended the warm-up (the "
    "only warm-ups called converged), `capped` where its epoch cap did (the model may still have been "
    "learning), `unknown` where the record cannot tell; best / rule stop: the epoch or round whose model is "
    "the arm's, and the round at which the moving-average rule would have stopped. Machines carry a host id "
    "(a hash of /etc/machine-id; older records say `unknown host`), which virtual machines cloned from one "
    "image share, so newer records add a boot id and the CPU's family and model. Which arms pair is decided "
    "by their warm-ups, not by the machine: arms pair where their shared warm-up's validation curve is the "
    "same to the last digit.", "",
]


def render(experiments: list[Experiment], results_dir: Path, figures: dict[str, str] | None = None,
           curve_block: list[str] | None = None) -> str:
    """The whole page; `figures`: experiment -> the link of its rounds picture; `curve_block`: the
    labelled-share section (publish.curve_block)."""
    loaded = [(exp, results_dir / f"{exp.name}.json") for exp in experiments]
    loaded = [(exp, path, read_records(path)) for exp, path in loaded]
    lines = [line.format(results=results_dir) for line in INTRO]
    if sum(len(r) for _, _, r in loaded) == 0:
        lines += ["**No runs are recorded yet**: there is no measured figure on this page. The commands "
                  "below run the experiments; this page is regenerated from their records.", ""]
    if curve_block:
        lines += ["## Labelled-share curves", "", *curve_block, ""]
    named = {exp.name: records for exp, _, records in loaded}
    for exp, path, records in loaded:
        lines += experiment_section(exp, records, path, (figures or {}).get(exp.name),
                                    named.get(exp.against or ""))
    return "\n".join(lines).rstrip() + "\n"
