"""`fer-dist eval | intensity | compare | predict | export`: measure, compare and use trained models.

Each command runs on one process, or on several under `accelerate launch -m fer_dist.cli <command> ...`
(every process predicts its share, predictions are gathered and each sample counted once); only the main
process writes files and prints. Results go to a folder written under a temporary name and renamed when
complete (JSON next to PNG pictures).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from fer_dist.errors import FerDistError

Model = Annotated[Path, typer.Argument(
    show_default=False, help="A run directory (its best/ model), an export (model.json) or a checkpoint.")]
ShardsOpt = Annotated[list[str], typer.Option(
    "--shards", show_default=False, help="Test set: DIR (its test split) or DIR:split[,split]; repeatable.")]
Out = Annotated[Path | None, typer.Option(
    show_default=False, help="Output folder; default: inside the model's run (eval/, intensity/).")]
Tta = Annotated[str, typer.Option(help="Test-time augmentation: none, flip or tencrop (stated in results).")]
BatchSize = Annotated[int, typer.Option(min=1, help="Faces per process and batch.")]
Workers = Annotated[int, typer.Option(min=0, help="DataLoader workers per process (0: in the process).")]


@contextmanager
def accelerator() -> Iterator[Any]:
    """This launch's processes as one group (one process without a launcher); torn down at the end."""
    from fer_dist import dist

    acc = dist.make_accelerator(mixed_precision="no")
    if acc.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // acc.num_processes))
    try:
        yield acc
    finally:
        dist.shutdown()


def _main_launch_process() -> bool:
    """Commands with nothing to share out (compare, export) run once, on a launch's main process."""
    from fer_dist import dist

    return dist.is_main_launch_process()


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def evaluate(model: Model, shards: ShardsOpt, out: Out = None, tta: Tta = "none", batch_size: BatchSize = 256,
             workers: Workers = 0) -> None:
    """Accuracy, macro-F1, UAR, per-class figures, confusion matrices and calibration on each test set."""
    from fer_dist.evaluate.infer import parse_shards
    from fer_dist.evaluate.load import load_model
    from fer_dist.evaluate.report import TABLE_COLUMNS, evaluate, table_rows, write_report

    loaded = load_model(model)
    targets = [parse_shards(s) for s in shards]
    with accelerator() as acc:
        results = evaluate(loaded, targets, acc, tta=tta, batch_size=batch_size, num_workers=workers)
        if acc.is_main_process:
            path = write_report(results, out or loaded.default_out("eval"))
            console = Console(highlight=False, soft_wrap=True)
            for record in results["sets"]:
                console.print(f"{record['name']}: {record['input']}")
            console.print(_table(f"{loaded.name} ({results['tta_words']})", TABLE_COLUMNS,
                                 table_rows(results)))
            console.print(f"wrote {path} and its pictures")
        acc.wait_for_everyone()


def intensity(model: Model, shards: Annotated[str, typer.Option(
        "--shards", show_default=False, help="Shards with sequences: DIR (its test split) or DIR:split,...")],
        out: Out = None, batch_size: BatchSize = 256, workers: Workers = 0) -> None:
    """Probability of each sequence's class frame by frame (the paper's Figure 1), and how well it grades."""
    from fer_dist.evaluate import intensity as grading
    from fer_dist.evaluate import plots
    from fer_dist.evaluate.infer import parse_shards, predict_shards, read_metadata
    from fer_dist.evaluate.load import load_model
    from fer_dist.files import staged_dir

    loaded = load_model(model)
    target = parse_shards(shards)
    with accelerator() as acc:
        pred = predict_shards(loaded.net, acc, target, batch_size=batch_size, num_workers=workers)
        if acc.is_main_process:
            names = list(loaded.net.classes or ())
            report = grading.intensity_report(grading.sequence_curves(pred, read_metadata(target, pred.ids),
                                                                      names))
            report.update({"model": str(loaded.path), "model_name": loaded.name, "shards": target.name})
            dest = out or loaded.default_out("intensity")
            with staged_dir(dest) as tmp:
                plots.curve_grid(grading.grid_sample(report["curves"]),
                                 f"{loaded.name} on {target.name}: p(sequence's class) by frame; score "
                                 f"{report['score']:.3f} ({report['score_basis']})", tmp / "intensity.png")
                (tmp / "intensity.json").write_text(json.dumps(report, indent=2) + "\n")
            rows = [[name, str(c["sequences"]), f"{c['spearman_position']:.3f}",
                     f"{c['spearman_intensity']:.3f}", f"{c['mean_abs_jump']:.3f}"]
                    for name, c in report["by_class"].items()]
            o = report["overall"]
            rows.append(["all", str(report["sequences"]), f"{o['spearman_position']['mean']:.3f}",
                         f"{o['spearman_intensity']['mean']:.3f}", f"{o['mean_abs_jump']['mean']:.3f}"])
            console = Console(highlight=False, soft_wrap=True)
            console.print(_table(f"{loaded.name}: intensity grading on {target.name}",
                                 ["class", "sequences", "Spearman (position)", "Spearman (intensity)",
                                  "mean |jump|"], rows))
            console.print(f"intensity score {report['score']:.4f} ({report['score_basis']}); wrote "
                          f"{dest / 'intensity.json'} and {dest / 'intensity.png'}")
        acc.wait_for_everyone()


def compare(runs: Annotated[list[Path], typer.Argument(show_default=False, help="Run directories.")],
            out: Annotated[Path, typer.Option(help="Output folder.")] = Path("compare")) -> None:
    """A table of runs: the config values that differ, rounds, validation and test accuracy, intensity."""
    if not _main_launch_process():
        return
    from fer_dist.evaluate import plots
    from fer_dist.evaluate.compare import compare_runs, tables
    from fer_dist.files import staged_dir

    comparison = compare_runs(runs)
    with staged_dir(out) as tmp:
        plots.rounds(comparison["runs"], tmp / "compare.png")
        (tmp / "compare.json").write_text(json.dumps(comparison, indent=2) + "\n")
    console = Console(highlight=False, soft_wrap=True)
    for title, columns, rows in tables(comparison):
        console.print(_table(f"{len(runs)} runs: {title}", columns, rows))
    console.print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")


def predict(model: Model, images: Annotated[list[Path], typer.Argument(
        show_default=False, help="Image files and folders (searched recursively).")],
        out: Annotated[Path | None, typer.Option(
            show_default=False, help="Write the rows to this .csv or .json file (else a table).")] = None,
        tta: Tta = "none",
        align: Annotated[str | None, typer.Option(help="Override the recorded alignment.")] = None,
        size: Annotated[int | None, typer.Option(help="Override the recorded face side.")] = None,
        channels: Annotated[int | None, typer.Option(help="Override the recorded channels.")] = None) -> None:
    """Every class's probability for each face, made the way the model's training faces were."""
    from fer_dist.evaluate.load import load_model
    from fer_dist.evaluate.predict import format_rows, list_images, predict_images, preprocessing
    from fer_dist.files import write_text_atomic

    kind = None
    if out is not None:
        kind = out.suffix.lower().lstrip(".")
        if kind not in ("csv", "json"):
            raise FerDistError(f"--out {out}: name a .csv or a .json file")
    loaded = load_model(model)
    prep = preprocessing(loaded, align, size, channels)
    files = list_images(images)
    with accelerator() as acc:
        rows = predict_images(loaded, files, acc, prep, tta)  # the same rows on every process
        if not any("predicted" in r for r in rows):  # nothing to write: an input error, on every process
            raise FerDistError(f"{', '.join(map(str, images))}: none of the {len(rows)} images gave a face "
                               f"(the first: {rows[0]['path']}: {rows[0]['status']})")
        if acc.is_main_process:
            names = list(loaded.net.classes or ())
            console = Console(highlight=False, soft_wrap=True)
            console.print(f"faces: align {prep['align']}, {prep['size']} px, {prep['channels']} channel(s) "
                          f"({prep['source']}); {len(files)} images")
            if out is not None:
                write_text_atomic(out, format_rows(rows, names, kind))
            else:
                table_rows = [[r["path"], r["status"], r.get("predicted", "-"),
                               f"{r['confidence']:.3f}" if "confidence" in r else "-"] for r in rows]
                console.print(_table(f"{loaded.name} (every class's probability: --out x.csv or x.json)",
                                     ["image", "status", "class", "probability"], table_rows))
            missed = sum(1 for r in rows if "predicted" not in r)
            console.print(f"{len(rows) - missed} faces classified, {missed} without a face"
                          + (f"; wrote {out}" if out else ""))
        acc.wait_for_everyone()


def export(model: Model, onnx: Annotated[Path, typer.Option(show_default=False, help="ONNX file to write.")],
           shards: Annotated[str | None, typer.Option(
               "--shards", show_default=False,
               help="Real faces to check the file with: DIR[:split]; default: the run's validation data.")]
           = None) -> None:
    """ONNX export (dynamic batch, uint8 faces in, logits out), checked against PyTorch on real faces."""
    if not _main_launch_process():
        return
    from fer_dist.evaluate.infer import parse_shards
    from fer_dist.evaluate.load import load_model
    from fer_dist.evaluate.onnx import export_onnx, real_faces

    loaded = load_model(model)
    if shards is not None:
        target = parse_shards(shards, default_split="val")
    else:
        target = _run_val(loaded)
        if target is None:
            raise FerDistError(f"{model}: no run config with validation shards to check the export with; "
                               "name real faces with --shards DIR[:split]")
    faces = real_faces(loaded.net, target)
    info = export_onnx(loaded, onnx, faces)
    Console(highlight=False, soft_wrap=True).print(
        f"wrote {info['onnx']} (opset {info['opset']}, input uint8 {info['input']['shape']}); checked on "
        f"{info['faces_checked']} faces of {target.name} with ONNX Runtime: max |logit difference| "
        f"{info['max_abs_diff']:.2e} (tolerance {info['tolerance']:g})")


def _run_val(loaded) -> Any:
    """The first validation shards of the model's run config, if it has one that can be read."""
    import yaml

    from fer_dist.evaluate.infer import ShardSplits

    if loaded.run_dir is None:
        return None
    try:
        config = yaml.safe_load((loaded.run_dir / "config.yaml").read_text())
        ref = config["data"]["val"][0]
        return ShardSplits(Path(ref["dir"]), tuple(ref["splits"]))
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        return None


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("eval")(evaluate)
    app.command("intensity")(intensity)
    app.command("compare")(compare)
    app.command("predict")(predict)
    app.command("export")(export)
