"""`fer-dist eval | intensity | compare | predict | export`: measure, compare and use trained models.

Each command runs on one process, or on several under `accelerate launch -m fer_dist.cli <command> ...`
(every process predicts its share, predictions are gathered and each sample counted once); only the main
process writes files and prints. Results go to a folder written under a temporary name and renamed when
complete (JSON next to PNG pictures). Every output path is checked (`fer_dist.outputs`) before any work:
an existing one is refused unless --overwrite, which replaces only an earlier output of the same command.
torch and the rest load inside the commands, so that --help and bad input answer at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from fer_dist import outputs
from fer_dist.cli.options import Overwrite
from fer_dist.errors import FerDistError

Model = Annotated[Path, typer.Argument(
    show_default=False, help="A run directory (its best/ model), an export (model.json) or a checkpoint.")]
ShardsOpt = Annotated[list[str], typer.Option(
    "--shards", show_default=False, help="Test set: DIR (its test split) or DIR:split[,split]; repeatable.")]
Out = Annotated[Path | None, typer.Option(
    show_default=False, help="Output folder; default: inside the model's run (eval/, intensity/), or beside "
    "the model (<model>-eval/).")]
Tta = Annotated[str, typer.Option(help="Test-time augmentation: none, flip or tencrop (stated in results).")]
BatchSize = Annotated[int, typer.Option(min=1, help="Faces per process and batch.")]
Workers = Annotated[int, typer.Option(min=0, help="DataLoader workers per process (0: in the process).")]


@contextmanager
def accelerator() -> Iterator[Any]:
    """This launch's processes as one group (one process without a launcher); torn down at the end."""

    from fer_dist import dist

    acc = dist.make_accelerator(mixed_precision="no")
    try:
        yield acc
    finally:
        dist.shutdown()


def _main_launch_process() -> bool:
    """Commands with nothing to share out (compare, export) run once, on a launch's main process."""
    from fer_dist.files import is_main_launch_process

    return is_main_launch_process()


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _model_exists(model: Path) -> None:
    """The commonest typo, answered before torch loads (load_model says the same, later)."""
    if not model.exists():
        raise FerDistError(f"{model}: no such model (a run directory, an export or a checkpoint)")


def _shards_words(names: list[str], tta: str = "none") -> str:
    return ", ".join(names) + ("" if tta == "none" else f" (test-time augmentation {tta})")


def evaluate(model: Model, shards: ShardsOpt, out: Out = None, tta: Tta = "none", batch_size: BatchSize = 256,
             workers: Workers = 0, overwrite: Overwrite = False) -> None:
    """Accuracy, macro-F1, UAR, per-class figures, confusion matrices and calibration on each test set."""
    _model_exists(model)
    if out is not None:
        outputs.check_folder(out, "eval", overwrite=overwrite)
    from fer_dist.evaluate.infer import parse_shards
    from fer_dist.evaluate.load import load_model
    from fer_dist.evaluate.report import TABLE_COLUMNS, evaluate, table_rows, write_report

    targets = [parse_shards(s) for s in shards]
    loaded = load_model(model)
    dest = out or loaded.default_out("eval")
    about = f"{loaded.path} on {_shards_words([t.name for t in targets], tta)}"
    outputs.check_folder(dest, "eval", overwrite=overwrite)
    with accelerator() as acc:
        results = evaluate(loaded, targets, acc, tta=tta, batch_size=batch_size, num_workers=workers)
        if acc.is_main_process:
            path = write_report(results, dest, overwrite=overwrite, about=about)
            console = _console()
            for record in results["sets"]:
                console.print(f"{record['name']}: {record['input']}")
            console.print(_table(f"{loaded.name} ({results['tta_words']})", TABLE_COLUMNS,
                                 table_rows(results)))
            console.print(f"wrote {path} and its pictures")
        acc.wait_for_everyone()


def intensity(model: Model, shards: Annotated[str, typer.Option(
        "--shards", show_default=False, help="Shards with sequences: DIR (its test split) or DIR:split,...")],
        out: Out = None, batch_size: BatchSize = 256, workers: Workers = 0,
        overwrite: Overwrite = False) -> None:
    """Probability of each sequence's class frame by frame (the paper's Figure 1), and how well it grades."""
    _model_exists(model)
    if out is not None:
        outputs.check_folder(out, "intensity", overwrite=overwrite)
    from fer_dist.evaluate import intensity as grading
    from fer_dist.evaluate import plots
    from fer_dist.evaluate.infer import parse_shards, predict_shards, read_metadata
    from fer_dist.evaluate.load import load_model

    target = parse_shards(shards)
    loaded = load_model(model)
    dest = out or loaded.default_out("intensity")
    outputs.check_folder(dest, "intensity", overwrite=overwrite)
    with accelerator() as acc:
        pred = predict_shards(loaded.net, acc, target, batch_size=batch_size, num_workers=workers)
        if acc.is_main_process:
            names = list(loaded.net.classes or ())
            report = grading.intensity_report(grading.sequence_curves(pred, read_metadata(target, pred.ids),
                                                                      names))
            report.update({"model": str(loaded.path), "model_name": loaded.name, "shards": target.name})
            drawn = grading.grid_sample(report["curves"])
            report["picture_sequences"] = len(drawn)  # intensity.png draws these of report["sequences"]
            shown = (f"all {len(drawn)} sequences" if len(drawn) == report["sequences"]
                     else f"{len(drawn)} of {report['sequences']} sequences (every class, in turn)")
            with outputs.written_folder(dest, "intensity", overwrite=overwrite,
                                        about=f"{loaded.path} on {target.name}") as tmp:
                plots.curve_grid(drawn, f"{loaded.name} on {target.name}: p(sequence's class) frame by "
                                 f"frame, {shown}; score {report['score']:.3f} ({report['score_basis']})",
                                 tmp / "intensity.png")
                (tmp / "intensity.json").write_text(json.dumps(report, indent=2) + "\n")
            _print_intensity(loaded.name, target.name, report, dest)
        acc.wait_for_everyone()


def _print_intensity(name: str, target: str, report: dict[str, Any], dest: Path) -> None:
    rows = [[cls, str(c["sequences"]), f"{c['spearman_position']:.3f}", f"{c['spearman_intensity']:.3f}",
             f"{c['mean_abs_jump']:.3f}"] for cls, c in report["by_class"].items()]
    o = report["overall"]
    rows.append(["all", str(report["sequences"]), f"{o['spearman_position']['mean']:.3f}",
                 f"{o['spearman_intensity']['mean']:.3f}", f"{o['mean_abs_jump']['mean']:.3f}"])
    console = _console()
    console.print(_table(f"{name}: intensity grading on {target}",
                         ["class", "sequences", "Spearman (position)", "Spearman (intensity)", "mean |jump|"],
                         rows))
    console.print(f"intensity score {report['score']:.4f} ({report['score_basis']}); wrote "
                  f"{dest / 'intensity.json'} and {dest / 'intensity.png'}")


def compare(runs: Annotated[list[Path], typer.Argument(show_default=False, help="Run directories.")],
            out: Annotated[Path, typer.Option(help="Output folder.")] = Path("compare"),
            overwrite: Overwrite = False) -> None:
    """A table of runs: the config values that differ, rounds, validation and test accuracy, intensity."""
    if not _main_launch_process():
        return
    outputs.check_folder(out, "compare", overwrite=overwrite)
    from fer_dist.evaluate.compare import compare_runs, tables

    comparison = compare_runs(runs)  # bad runs are named before matplotlib is loaded
    from fer_dist.evaluate import plots

    with outputs.written_folder(out, "compare", overwrite=overwrite,
                                about=" ".join(r["dir"] for r in comparison["runs"])) as tmp:
        plots.rounds(comparison["runs"], tmp / "compare.png")
        (tmp / "compare.json").write_text(json.dumps(comparison, indent=2) + "\n")
    console = _console()
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
        channels: Annotated[int | None, typer.Option(help="Override the recorded channels.")] = None,
        overwrite: Overwrite = False) -> None:
    """Every class's probability for each face, made the way the model's training faces were."""
    _model_exists(model)
    kind = None
    if out is not None:
        kind = out.suffix.lower().lstrip(".")
        if kind not in ("csv", "json"):
            raise FerDistError(f"--out {out}: name a .csv or a .json file")
        outputs.check_file(out, "predict", overwrite=overwrite, ours=_predict_rows_file)
    from fer_dist.evaluate.load import load_model
    from fer_dist.evaluate.predict import format_rows, list_images, predict_images, preprocessing

    files = list_images(images)
    loaded = load_model(model)
    prep = preprocessing(loaded, align, size, channels)
    with accelerator() as acc:
        rows = predict_images(loaded, files, acc, prep, tta)  # the same rows on every process
        if not any("predicted" in r for r in rows):  # nothing to write: an input error, on every process
            raise FerDistError(f"{', '.join(map(str, images))}: none of the {len(rows)} images gave a face "
                               f"(the first: {rows[0]['path']}: {rows[0]['status']})")
        if acc.is_main_process:
            names = list(loaded.net.classes or ())
            console = _console()
            console.print(f"faces: align {prep['align']}, {prep['size']} px, {prep['channels']} channel(s) "
                          f"({prep['source']}); {len(files)} images")
            if out is not None:
                with outputs.written_file(out, "predict", overwrite=overwrite,
                                          ours=_predict_rows_file) as tmp:
                    tmp.write_text(format_rows(rows, names, kind), encoding="utf-8")
            else:
                table_rows = [[r["path"], r["status"], r.get("predicted", "-"),
                               f"{r['confidence']:.3f}" if "confidence" in r else "-"] for r in rows]
                console.print(_table(f"{loaded.name} (every class's probability: --out x.csv or x.json)",
                                     ["image", "status", "class", "probability"], table_rows))
            console.print(_predict_tally(rows) + (f"; wrote {out}" if out else ""))
        acc.wait_for_everyone()


def _predict_tally(rows: list[dict[str, Any]]) -> str:
    """`3 faces classified, 1 without a face, 1 unreadable`: each status counted under its own words."""
    done = sum(1 for r in rows if "predicted" in r)
    unreadable = sum(1 for r in rows if r["status"].startswith("unreadable"))
    words = [f"{done} faces classified"]
    if len(rows) - done - unreadable:
        words.append(f"{len(rows) - done - unreadable} without a face")
    if unreadable:
        words.append(f"{unreadable} unreadable")
    return ", ".join(words)


def _predict_rows_file(path: Path) -> bool:
    """Whether `path` holds rows `predict` wrote (its CSV header, or its JSON list of rows)."""
    from fer_dist.evaluate.predict import FIELDS_START

    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096)
    except (OSError, UnicodeDecodeError):
        return False
    if head.startswith(",".join(FIELDS_START) + ","):
        return True
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and set(FIELDS_START) <= set(r) for r in rows)


def _onnx_export_file(path: Path) -> bool:
    """Whether `path` is an ONNX model `export` wrote: a graph taking `faces` and returning `logits`."""
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - not loadable as ONNX (or no onnx package): not ours to replace
        return False
    return [i.name for i in graph.input] == ["faces"] and [o.name for o in graph.output] == ["logits"]


def export(model: Model, onnx: Annotated[Path, typer.Option(show_default=False, help="ONNX file to write.")],
           shards: Annotated[str | None, typer.Option(
               "--shards", show_default=False,
               help="Real faces to check the file with: DIR[:split]; default: the run's validation data.")]
           = None, overwrite: Overwrite = False) -> None:
    """ONNX export (dynamic batch, uint8 faces in, logits out), checked against PyTorch on real faces."""
    if not _main_launch_process():
        return
    _model_exists(model)
    outputs.check_file(onnx, "export", overwrite=overwrite, ours=_onnx_export_file, flag="--onnx")
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
    with outputs.written_file(onnx, "export", overwrite=overwrite, ours=_onnx_export_file,
                              flag="--onnx") as tmp:
        info = export_onnx(loaded, tmp, faces)
    _console().print(
        f"wrote {onnx} (opset {info['opset']}, input uint8 {info['input']['shape']}); checked on "
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
    app.command("eval", epilog=(
        "Example: fer-dist eval runs/quickstart --shards shards/synthetic --tta flip"))(evaluate)
    app.command("intensity", epilog=(
        "Example: fer-dist intensity runs/quickstart --shards shards/synthetic:test"))(intensity)
    app.command("compare", epilog=(
        "Example: fer-dist compare runs/quickstart-baseline runs/quickstart --out compare"))(compare)
    app.command("predict", epilog=(
        "Example: fer-dist predict runs/quickstart photos/ --out predictions.csv"))(predict)
    app.command("export", epilog=(
        "Example: fer-dist export runs/quickstart --onnx model.onnx"))(export)
