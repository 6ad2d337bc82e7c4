"""`fer-dist experiment report`: docs/RESULTS.md, its pictures in docs/img/, and the README's results block.

The README's block (between a line starting `<!-- results:` and `<!-- results end -->`) is short: per
labelled-share curve (experiments sharing a `curve:` name, each with its own labelled share), the test
accuracy per arm and share with the gain over the reference arm, and one picture; per experiment the notes
put there (`readme: question`), its arms' test accuracy and gains; and a link to RESULTS.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fer_dist.errors import FerDistError
from fer_dist.experiments import figures
from fer_dist.experiments.records import read_records
from fer_dist.experiments.report import COMPARISONS, by_arm, provenance, render
from fer_dist.experiments.spec import Experiment, read_experiment, with_notes
from fer_dist.experiments.stats import gain_cell, mean_sd, paired_gain, same_data
from fer_dist.files import write_text_atomic

README_BEGIN = "<!-- results: made by fer-dist experiment report from docs/results/; do not edit by hand -->"
README_END = "<!-- results end -->"


def curves_of(experiments: list[Experiment]) -> dict[str, list[tuple[float, Experiment]]]:
    """curve name -> (labelled share, experiment), by share: the experiments whose `curve:` names it, and
    the experiment of that name; retired experiments left out."""
    named = {exp.curve for exp in experiments if exp.curve}
    out: dict[str, list[tuple[float, Experiment]]] = {}
    for exp in experiments:
        curve = exp.curve or (exp.name if exp.name in named else None)
        if curve and not exp.retired:
            share = exp.labelled_share()
            if share is None:
                raise FerDistError(f"{exp.path}: curve: its data.labelled folders keep different shares")
            out.setdefault(curve, []).append((share, exp))
    return {name: sorted(pts, key=lambda p: p[0]) for name, pts in out.items()}


def _references(exp: Experiment) -> dict[str, str]:
    return {arm: ref for arm, ref, _, _ in COMPARISONS[exp.kind]}


def _accuracy_cell(rows: list[dict[str, Any]]) -> str:
    m, s = mean_sd([100 * r["test_accuracy"] for r in rows])
    return f"{m:.2f} ± {s:.2f} ({len(rows)})" if len(rows) > 1 else f"{m:.2f} (1)"


def curve_block(name: str, points: list[tuple[float, Experiment]], results_dir: Path,
                picture: str | None) -> list[str]:
    """The curve's table (arm x labelled share: test accuracy, gain over the reference) and its picture;
    with no record, a plain sentence that there are no results yet."""
    loaded = [(share, exp, read_records(results_dir / f"{exp.name}.json")) for share, exp in points]
    every = [r for _, _, records in loaded for r in records]
    names = ", ".join(f"`{exp.name}`" for _, exp in points)
    if not every:
        return [f"**{name}** ({names}): no run is recorded yet, so there are no results to show."]
    arms = list(dict.fromkeys(arm for _, exp, _ in loaded for arm in exp.arms))
    head = ["arm", *(f"{100 * share:g} % labelled" for share, _, _ in loaded)]
    lines = [f"**{name}** ({names}): test accuracy % (mean ± sd over seeds, their number in brackets); "
             "gain: paired by seed against the arm named, its 95 % interval from 3 seeds up.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for arm in arms:
        cells = [arm]
        for _, exp, records in loaded:
            groups = by_arm(records, list(exp.arms))
            rows, ref = groups.get(arm, []), _references(exp).get(arm)
            if not rows:
                cells.append("-")
                continue
            cell = _accuracy_cell(rows)
            if ref in groups:
                cell += f"; vs {ref} {gain_cell(paired_gain(rows, groups[ref])[0])}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    if picture:
        lines += ["", f"![Test accuracy against the labelled share, per arm, {name}]({picture})"]
    return lines + ["", provenance(every)]


def experiment_block(exp: Experiment, named: dict[str, Experiment], results_dir: Path) -> list[str]:
    """The README's table of an experiment the notes put there (`readme: question`): per arm its test
    accuracy, its gain over its reference arm (report.COMPARISONS) and, with `against`, over the arm of its
    name there, paired by seed where both trained on one X_l; with no record, a plain sentence."""
    records = read_records(results_dir / f"{exp.name}.json")
    lead = f"**{exp.name}**: {exp.readme}"
    if not records:
        return [f"{lead} No run is recorded yet, so there are no results to show."]
    groups, refs = by_arm(records, list(exp.arms)), _references(exp)
    other = named.get(exp.against or "")
    theirs = by_arm(read_records(results_dir / f"{other.name}.json"), list(other.arms)) if other else {}
    head = ["arm", "test acc %", "gain over its reference arm"]
    head += [f"gain over {other.name}'s same arm (same X_l)"] if other else []
    lines = [f"{lead} Test accuracy % (mean ± sd over seeds, their number in brackets); gains paired by "
             "seed, their 95 % interval from 3 seeds up.", "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for arm, rows in groups.items():
        ref = refs.get(arm)
        cells = [arm, _accuracy_cell(rows),
                 f"vs {ref} {gain_cell(paired_gain(rows, groups[ref])[0])}" if ref in groups else "-"]
        if other:
            paired = paired_gain(rows, theirs[arm], pair=same_data)[0] if arm in theirs else []
            cells.append(gain_cell(paired))
        lines.append("| " + " | ".join(cells) + " |")
    return lines + ["", provenance(records)]


def curve_points(points: list[tuple[float, Experiment]], results_dir: Path
                 ) -> dict[str, list[tuple[float, list[float]]]]:
    """arm -> [(labelled share, test accuracies in points)] for the curve's picture."""
    out: dict[str, list[tuple[float, list[float]]]] = {}
    for share, exp in points:
        for arm, rows in by_arm(read_records(results_dir / f"{exp.name}.json"), list(exp.arms)).items():
            out.setdefault(arm, []).append((share, [100 * r["test_accuracy"] for r in rows]))
    return out


def replace_block(text: str, block: str, where: Path) -> str:
    """`text` with its results block (the marker lines included) replaced by README_BEGIN, `block`,
    README_END. The begin marker is found by its `<!-- results:` prefix, so an older wording is updated."""
    lines = text.split("\n")
    begins = [i for i, line in enumerate(lines) if line.startswith("<!-- results:")]
    ends = [i for i, line in enumerate(lines) if line.strip() == README_END]
    if len(begins) != 1 or len(ends) != 1 or begins[0] > ends[0]:
        raise FerDistError(f"{where}: expected one line starting '<!-- results:' and, after it, one "
                           f"{README_END!r}")
    return "\n".join(lines[:begins[0]] + [README_BEGIN, block, README_END] + lines[ends[0] + 1:])


def _link(target: Path, page: Path) -> str:
    return Path(os.path.relpath(target, page.parent)).as_posix()


def publish(experiments_dir: Path, results_dir: Path, out: Path, readme: Path | None,
            img_dir: Path) -> list[str]:
    """Write RESULTS.md, its pictures and the README's block; returns what was written (one line each).
    Everything is read and checked first: an error writes nothing."""
    files = sorted(experiments_dir.glob("*.yaml"))
    if not files:
        raise FerDistError(f"{experiments_dir}: no experiment definition (*.yaml)")
    experiments = with_notes([read_experiment(f, check_configs=False) for f in files],
                             results_dir / "notes.yaml")
    readme_text = None
    if readme is not None:
        if not readme.is_file():
            raise FerDistError(f"{readme}: not found (--readme '' writes no results block)")
        readme_text = readme.read_text()
        replace_block(readme_text, "", readme)  # its markers checked before anything is written
    if not out.parent.is_dir():  # before any picture is drawn
        raise FerDistError(f"{out}: --out: its folder {out.parent} does not exist")
    curves = curves_of(experiments)
    written: list[str] = []
    rounds_links: dict[str, str] = {}
    for exp in experiments:
        records = read_records(results_dir / f"{exp.name}.json")
        if records and not exp.retired:
            path = figures.rounds(by_arm(records, list(exp.arms)), exp.name,
                                  img_dir / f"rounds_{exp.name}.png")
            if path is not None:
                rounds_links[exp.name] = _link(path, out)
                written.append(str(path))
    curve_pictures: dict[str, Path] = {}
    for name, points in curves.items():
        path = figures.curve(curve_points(points, results_dir), name, img_dir / f"curve_{name}.png")
        if path is not None:
            curve_pictures[name] = path
            written.append(str(path))
    section: list[str] = []
    for name, points in curves.items():
        pic = curve_pictures.get(name)
        section += [*curve_block(name, points, results_dir, pic and _link(pic, out)), ""]
    write_text_atomic(out, render(experiments, results_dir, rounds_links, section))
    written.append(str(out))
    if readme is not None and readme_text is not None:
        block = readme_block(curves, experiments, results_dir, curve_pictures, readme, out)
        write_text_atomic(readme, replace_block(readme_text, block, readme))
        written.append(f"the results block of {readme}")
    return written


def readme_block(curves: dict[str, list[tuple[float, Experiment]]], experiments: list[Experiment],
                 results_dir: Path, pictures: dict[str, Path], readme: Path, results_page: Path) -> str:
    """The README's results: each curve's table and picture, the table of each experiment the notes name
    (`readme:`), and the link to everything else."""
    lines: list[str] = []
    for name, points in curves.items():
        pic = pictures.get(name)
        lines += curve_block(name, points, results_dir, pic and _link(pic, readme)) + [""]
    if not curves:
        lines += ["No labelled-share experiment is defined (`curve:` in launch_configs/experiments/).", ""]
    named = {exp.name: exp for exp in experiments}
    for exp in experiments:
        if exp.readme and not exp.retired:
            lines += experiment_block(exp, named, results_dir) + [""]
    lines.append(f"Every experiment, figure and reading, with how each warm-up ended, the power of each "
                 f"comparison and what the rounds selected (how many unlabelled faces, how often rightly, "
                 f"of which classes): [{results_page.as_posix()}]({_link(results_page, readme)}).")
    return "\n".join(lines)

