"""docs/RESULTS.md from the records in docs/results/*.json and the definitions in launch_configs/experiments/.

    .venv/bin/python tools/experiments/report.py [--experiments launch_configs/experiments]
        [--results-dir docs/results] [--out docs/RESULTS.md] [--readme README.md]

Everything in the page is computed from the records: per arm the mean and spread (sample standard
deviation over seeds) of test accuracy, macro-F1 and validation accuracy, the rounds and the confident /
drawn unlabelled samples per round; gains against the experiment's reference arm paired by seed, with the
95 % t interval of their mean; the intensity metric where recorded; the reading against the paper's
figures, with the experiment's own `reading.setting`. With no record, it says so. The README's results
block (between its two markers) gets the summary table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from records import read_records  # noqa: E402
from spec import Experiment, read_experiment  # noqa: E402

from fer_dist.errors import FerDistError  # noqa: E402
from fer_dist.files import write_text_atomic  # noqa: E402

# The paper's FER2013 figures (METHOD.md 7), in points: baseline VGG-Face 69.57 %, proposed 73.58 %.
PAPER = {"baseline": 69.57, "proposed": 73.58, "smoothing_gain": 2.0, "both_gain": 4.0, "crossdb_gain": 11.0}
# Which arms compare with which paper figure: (arm, reference arm, the paper's gain or None, words).
COMPARISONS = {
    "ablation": [("smoothing", "baseline", PAPER["smoothing_gain"], "label smoothing alone"),
                 ("unlabelled", "baseline", None,
                  "unlabelled data alone (the paper gives no separate figure)"),
                 ("both", "baseline", PAPER["both_gain"], "smoothing and unlabelled data (the method)"),
                 ("both_adaptive", "both", None, "class-adaptive thresholds against the paper's fixed tau")],
    "crossdb": [("unlabelled_target", "no_unlabelled", PAPER["crossdb_gain"],
                 "unlabelled target-domain (CK+48) faces; the paper's +11 is CK+ -> RaFD"),
                ("unlabelled_source", "no_unlabelled", None, "unlabelled FER2013 test faces (same domain)")],
}


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pct(values: list[float]) -> str:
    m, s = mean_sd([100 * v for v in values])
    return f"{m:.2f} ± {s:.2f}" if len(values) > 1 else f"{m:.2f}"


def by_arm(records: list[dict[str, Any]], arms: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Records grouped by arm, arms in the experiment's order (then any others), each sorted by seed."""
    out: dict[str, list[dict[str, Any]]] = {}
    for arm in arms + sorted({r["arm"] for r in records} - set(arms)):
        rows = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
        if rows:
            out[arm] = rows
    return out


def paired_gain(arm: list[dict[str, Any]], ref: list[dict[str, Any]],
                value: Callable[[dict[str, Any]], float] = lambda r: 100 * r["test_accuracy"],
                ) -> tuple[list[float], list[int]]:
    """Arm minus reference over the seeds both have (default: test accuracy in points)."""
    ref_by_seed = {r["seed"]: value(r) for r in ref}
    both = [r for r in arm if r["seed"] in ref_by_seed]
    return [value(r) - ref_by_seed[r["seed"]] for r in both], [r["seed"] for r in both]


# Two-sided 95 % quantiles of Student's t for 1..10 degrees of freedom; beyond, 1.96 + 2.5/df is within 0.01.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def interval(gains: list[float]) -> tuple[float, float]:
    """The 95 % t interval of the mean of paired gains (at least two)."""
    m, s = mean_sd(gains)
    df = len(gains) - 1
    half = (T975[df - 1] if df <= len(T975) else 1.96 + 2.5 / df) * s / len(gains) ** 0.5
    return m - half, m + half


def verdict(gains: list[float], unit: str = " points", digits: int = 2) -> str:
    """Plain words for a paired gain: a sign only where the 95 % interval of its mean excludes 0."""
    m, s = mean_sd(gains)
    f = f"+.{digits}f"
    if len(gains) < 2:
        return f"{m:{f}}{unit} from one seed: no spread to judge it by"
    lo, hi = interval(gains)
    word = ("a gain" if m > 0 else "a loss") if lo > 0 or hi < 0 else "not distinguishable from seed noise"
    return (f"{m:{f}} ± {s:.{digits}f}{unit} over {len(gains)} paired seeds ({word}; per seed "
            f"{', '.join(f'{g:{f}}' for g in gains)}; 95 % interval {lo:{f}} to {hi:{f}})")


def paper_side(gains: list[float], paper: float) -> str:
    """Where the paper's gain lies against ours: inside, above or below our interval (two seeds or more)."""
    lo, hi = interval(gains)
    return "inside" if lo <= paper <= hi else ("above" if paper > hi else "below")


def against_paper(gains: list[float], paper: float) -> str:
    """Where the paper's gain lies against ours: inside or outside our interval, or by sign for one seed."""
    m = statistics.fmean(gains)
    if len(gains) < 2:
        agree = "the same sign as" if (m > 0) == (paper > 0) else "the opposite sign of"
        return f"the paper reports {paper:+.1f} points, ours has {agree} it"
    return f"the paper reports {paper:+.1f} points, {paper_side(gains, paper)} our interval"


def provenance(records: list[dict[str, Any]]) -> str:
    """How many records, when, on which machines, with which training code."""
    dates = sorted(r.get("date", "") for r in records)
    return (f"{len(records)} record{'s' * (len(records) != 1)}, {dates[0]} to {dates[-1]}; machines: "
            f"{'; '.join(sorted({r['machine'] for r in records}))}; commits: "
            f"{', '.join(sorted({r['commit'][:7] for r in records}))}.")


def resolution(records: list[dict[str, Any]]) -> str:
    """How finely the test set measures: one face in points, and the binomial standard error at its mean."""
    sizes = sorted({r["n_test"] for r in records if "n_test" in r})
    if len(sizes) != 1:
        return ""
    n, p = sizes[0], statistics.fmean(r["test_accuracy"] for r in records)
    return (f" Test set: {n} faces, one face = {100 / n:.2f} points; the binomial standard error of one "
            f"model's accuracy near {100 * p:.0f} % is {100 * (p * (1 - p) / n) ** 0.5:.2f} points.")


def arm_table(groups: dict[str, list[dict[str, Any]]], crossdb: bool) -> list[str]:
    others = sorted({t["test_set"] for rows in groups.values() for r in rows
                     for t in r.get("other_tests", [])})
    columns = ["arm", "seeds", *(["test set"] if crossdb else []), "test acc %", "macro-F1 %",
               *(f"{name} acc %" for name in others), "val acc %", "rounds", "confident per round",
               "drawn per round", "wall min"]
    head = "| " + " | ".join(columns) + " |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for arm, rows in groups.items():
        conf = [r["confident_per_round"] for r in rows]
        drawn = [r["drawn_per_round"] for r in rows]
        twins = sorted({r["trained_for"] for r in rows if "trained_for" in r})
        # a twin is tested only where its run is still on disk; seeds trained again are not "trained as" it
        some = [str(r["seed"]) for r in rows if "trained_for" in r]
        which = f"seed{'s' if len(some) > 1 else ''} {', '.join(some)} " if len(some) < len(rows) else ""
        cells = [arm + (f" ({which}trained as {', '.join(twins)})" if twins else ""),
                 ", ".join(str(r["seed"]) for r in rows)]
        if crossdb:
            cells.append(", ".join(sorted({r.get("test_set", "?") for r in rows})))
        cells += [pct([r["test_accuracy"] for r in rows]), pct([r["macro_f1"] for r in rows])]
        for name in others:
            got = [t["accuracy"] for r in rows for t in r.get("other_tests", []) if t["test_set"] == name]
            cells.append(pct(got) if got else "-")
        cells += [pct([r["val_accuracy"] for r in rows]), " / ".join(str(r["rounds"]) for r in rows),
                  "; ".join(" ".join(str(c) for c in x) or "-" for x in conf),
                  "; ".join(" ".join(str(c) for c in x) or "-" for x in drawn),
                  f"{statistics.fmean(r['wall_s'] for r in rows) / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _overrides(tree: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={json.dumps(v)}`" for k, v in tree.items())


def experiment_section(exp: Experiment, records: list[dict[str, Any]], results: Path) -> list[str]:
    crossdb = exp.kind == "crossdb"
    lines = [f"## {exp.name}", "", exp.description.strip(), "",
             f"Definition `{exp.path}` (base `{exp.base}`; seeds {', '.join(map(str, exp.seeds))}; "
             f"every arm: {_overrides(exp.schedule) or 'the base as it is'}"
             + (f"; trained with the fer_dist of commit {exp.code}" if exp.code else "")
             + f"), records `{results}`. Arms: "
             + "; ".join(f"**{arm}** {_overrides(o) or '(the base)'}" for arm, o in exp.arms.items()) + ".",
             "", "Run (skips what is recorded, resumes what was interrupted):", "",
             f"    .venv/bin/python tools/experiments/run.py {exp.path}", ""]
    if not records:
        return lines + ["No runs of this experiment are recorded yet.", ""]
    groups = by_arm(records, list(exp.arms))
    lines += [f"{provenance(records)} Means ± sample standard deviation over seeds.{resolution(records)}", ""]
    lines += arm_table(groups, crossdb) + [""] + warmup_curves(exp, groups)
    if any("intensity" in r for r in records):
        lines += ["Intensity (synthetic test sequences: Spearman's rho between the predicted probability of "
                  "the sequence's expression and the true intensity, mean over sequences; and the mean "
                  "absolute step of that probability between neighbouring frames):", "",
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
        lines.append("")
    lines += reading(exp, groups)
    return lines


def warmup_curves(exp: Experiment, groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Validation accuracy per epoch of the warm-ups that ran their whole budget of 3 epochs or more: was
    the model still learning when the budget stopped it?"""
    def ran_whole_budget(arm: str, record: dict[str, Any]) -> bool:
        budget = {**exp.schedule, **exp.arms.get(arm, {})}.get("method.warmup_epochs")
        curve = record.get("val_per_warmup_epoch") or []
        return isinstance(budget, int) and budget >= 3 and len(curve) == budget

    rows = [(arm, r) for arm, rs in groups.items() for r in rs if ran_whole_budget(arm, r)]
    if not rows:
        return []
    lines = ["Validation accuracy per warm-up epoch, of the runs whose warm-up ran its whole budget (where "
             "the record has it):", "", "| arm | seed | val acc % per warm-up epoch |", "| --- | --- | --- |"]
    lines += [f"| {arm} | {r['seed']} | {' '.join(f'{100 * v:.2f}' for v in r['val_per_warmup_epoch'])} |"
              for arm, r in rows]
    m, sd = mean_sd([100 * (r["val_per_warmup_epoch"][-1] - r["val_per_warmup_epoch"][-3]) for _, r in rows])
    runs = f"{len(rows)} run" + ("s" if len(rows) > 1 else "")
    return lines + ["", f"Over their last two epochs validation accuracy moved by {m:+.2f} ± {sd:.2f} points "
                    f"({runs}; above 0: still learning when the budget ended the warm-up).", ""]


def shrinking(rows: list[dict[str, Any]]) -> bool:
    """Whether the confident count of the last round is below the first's, on average over seeds."""
    runs = [r["confident_per_round"] for r in rows if len(r["confident_per_round"]) > 1]
    return bool(runs) and statistics.fmean(c[-1] - c[0] for c in runs) < 0


def _last_round(rows: list[dict[str, Any]], key: str) -> float:
    """The mean over seeds of a per-round list's last value (thresholds: their mean over classes)."""
    last = [r[key][-1] for r in rows if r.get(key)]
    return statistics.fmean(statistics.fmean(v) if isinstance(v, list) else v for v in last) if last else 0.0


def reading(exp: Experiment, groups: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The reading against the paper: each comparison's paired gain, beside the paper's where it has one."""
    out = ["Reading (test accuracy, paired by seed):", ""]
    for arm, ref, paper, words in COMPARISONS[exp.kind]:
        if arm not in groups or ref not in groups:
            continue
        gains, _ = paired_gain(groups[arm], groups[ref])
        if not gains:
            continue
        line = f"- {arm} vs {ref}, {words}: {verdict(gains)}"
        if paper is not None:
            line += "; " + against_paper(gains, paper)
            if abs(statistics.fmean(gains) - paper) > 1.0:
                line += f" (ours {statistics.fmean(gains) - paper:+.2f} points from it)"
                if shrinking(groups[arm]):
                    line += ("; the selection shrinks from the first round to the last (the confident "
                             "counts above)")
        if arm == "both_adaptive":
            ours, theirs = (_last_round(groups[a], "confident_per_round") for a in (arm, ref))
            line += f"; confident samples in the last round: {ours:.0f} (adaptive) vs {theirs:.0f} (fixed)"
            if any(r.get("thresholds_per_round") for r in groups[arm]):
                line += (f", at a mean threshold over the classes of "
                         f"{_last_round(groups[arm], 'thresholds_per_round'):.2f} against "
                         f"{_last_round(groups[ref], 'thresholds_per_round'):.2f}")
        out.append(line + ".")
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


def render(experiments: list[Experiment], results_dir: Path) -> str:
    """The whole page."""
    loaded = [(exp, results_dir / f"{exp.name}.json") for exp in experiments]
    loaded = [(exp, path, read_records(path)) for exp, path in loaded]
    total = sum(len(r) for _, _, r in loaded)
    lines = ["# Results", "",
             "Generated by `.venv/bin/python tools/experiments/report.py` from the records in "
             f"`{results_dir}/` (one per finished arm and seed, written by `tools/experiments/run.py`); "
             "do not edit by hand. Accuracies are on each experiment's test set (FER2013: PrivateTest; "
             "cross-database: the CK+48 subject-independent test split), the model chosen by validation "
             "accuracy (FER2013 PublicTest); nothing is tuned on a test split.", "",
             "The paper's figures (Happy et al. 2019, VGG-Face, METHOD.md 7): FER2013 baseline 69.57 %, "
             "+2 points with label smoothing, +4 with smoothing and unlabelled data, 73.58 % proposed; "
             "cross-database +11 points from target-domain unlabelled data (CK+ -> RaFD).", ""]
    if total == 0:
        lines += ["**No runs are recorded yet**: there is no measured figure on this page. The commands "
                  "below run the experiments; this page is regenerated from their records.", ""]
    for exp, path, records in loaded:
        lines += experiment_section(exp, records, path)
    return "\n".join(lines).rstrip() + "\n"


README_BEGIN = "<!-- results: made by tools/experiments/report.py from docs/results/; do not edit by hand -->"
README_END = "<!-- results end -->"


def gain_cell(gains: list[float]) -> str:
    if not gains:
        return "-"
    m = statistics.fmean(gains)
    if len(gains) < 2:
        return f"{m:+.2f} (1 seed)"
    lo, hi = interval(gains)
    return f"{m:+.2f} ({lo:+.2f} to {hi:+.2f})"


def summary(experiments: list[Experiment], results_dir: Path) -> str:
    """The README's table: each recorded arm's test accuracy and its paired gain over its reference."""
    lines = ["| experiment (test set) | arm | seeds | test acc % | gain over | points (95 % interval) | "
             "the paper's gain | intensity rho |", "|" + " --- |" * 8]
    every: list[dict[str, Any]] = []
    for exp in experiments:
        records = read_records(results_dir / f"{exp.name}.json")
        if not records:
            continue
        every += records
        groups = by_arm(records, list(exp.arms))
        refs = {arm: (ref, paper) for arm, ref, paper, _ in COMPARISONS[exp.kind]}
        first = True
        for arm, rows in groups.items():
            ref, paper = refs.get(arm, (None, None))
            gains = paired_gain(rows, groups[ref])[0] if ref in groups else []
            side = f" ({paper_side(gains, paper)} ours)" if paper is not None and len(gains) > 1 else ""
            rho = [r["intensity"]["spearman_mean"] for r in rows if "intensity" in r]
            lines.append("| " + " | ".join([
                f"{exp.name} ({rows[0].get('test_set', '?')})" if first else "", arm, str(len(rows)),
                pct([r["test_accuracy"] for r in rows]), ref if gains else "", gain_cell(gains),
                f"{paper:+.1f}{side}" if paper is not None and gains else "-",
                (f"{mean_sd(rho)[0]:.3f}" if rho else "-")]) + " |")
            first = False
    if not every:
        return "No experiment has a record yet (see Experiments below)."
    return "\n".join(lines + ["", provenance(every)])


def replace_block(text: str, block: str, where: Path) -> str:
    """`text` with what lies between the README's markers replaced by `block`."""
    if not (text.count(README_BEGIN) == text.count(README_END) == 1
            and text.index(README_BEGIN) < text.index(README_END)):
        raise FerDistError(f"{where}: expected one line {README_BEGIN!r} and, after it, one {README_END!r}")
    head, rest = text.split(README_BEGIN)
    return head + README_BEGIN + "\n" + block + "\n" + README_END + rest.split(README_END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiments", type=Path, default=Path("launch_configs/experiments"))
    p.add_argument("--results-dir", type=Path, default=Path("docs/results"))
    p.add_argument("--out", type=Path, default=Path("docs/RESULTS.md"))
    p.add_argument("--readme", default="README.md",
                   help="the file whose results block gets the summary table ('' for none)")
    args = p.parse_args(argv)
    try:
        files = sorted(args.experiments.glob("*.yaml"))
        if not files:
            raise FerDistError(f"{args.experiments}: no experiment definition (*.yaml)")
        experiments = [read_experiment(f, check_configs=False) for f in files]
        text = render(experiments, args.results_dir)
        readme, readme_path = None, Path(args.readme)
        if args.readme:
            if not readme_path.is_file():
                raise FerDistError(f"{readme_path}: not found (--readme '' writes no summary)")
            block = summary(experiments, args.results_dir)
            readme = replace_block(readme_path.read_text(), block, readme_path)
    except FerDistError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_text_atomic(args.out, text)
    print(f"wrote {args.out}")
    if readme is not None:
        write_text_atomic(readme_path, readme)
        print(f"wrote the results block of {readme_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
