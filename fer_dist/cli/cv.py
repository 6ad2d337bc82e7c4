"""`fer-dist cv --config ... --folds K [key=value ...]`: K training runs over the shards' folds, then the
mean and standard deviation of each test metric (`fer_dist.evaluate.cv` says which fold plays which part)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fer_dist import outputs
from fer_dist.cli.evaluate import _table, accelerator
from fer_dist.cli.options import Overwrite
from fer_dist.cli.train import AccelerateConfig, Overrides, Processes


def cv(
    config: Annotated[Path, typer.Option(show_default=False, help="Training config YAML.")],
    folds: Annotated[int, typer.Option(show_default=False, help="K: the shards' --folds K.")],
    processes: Processes = None,
    accelerate_config: AccelerateConfig = None,
    overrides: Overrides = None,
    overwrite: Overwrite = False,
) -> None:
    """Cross-validate: fold k tests on fold k, validates on fold k+1 mod K, trains on the rest; resumable.

    The same command continues an interrupted cross-validation: a fold's `eval/` and the summary folder
    are replaced when they hold this same cross-validation's results; anything else there needs
    --overwrite (an earlier output of eval or cv) or is refused."""
    from fer_dist import launch, prechecks
    from fer_dist.config import load_config
    from fer_dist.evaluate import cv as folding
    from fer_dist.evaluate.load import load_model
    from fer_dist.evaluate.report import evaluate, write_report

    overrides = overrides or []
    base = load_config(config, overrides)  # its val and test are replaced by folds: checked per fold below
    about = f"fer-dist cv --config {config} --folds {folds} {' '.join(overrides)}".strip()
    summary_dir = Path(base.run.dir) / f"{base.run.name}-cv"
    outputs.check_folder(summary_dir, "cv", overwrite=overwrite or _ours(summary_dir, about))
    per_fold = []
    for k in range(folds):  # every fold's config, data and output checked before the first one trains
        extra = folding.fold_overrides(base, k, folds)
        cfg = prechecks.check_training(config, overrides + extra)
        fold_eval = Path(cfg.run.dir) / cfg.run.name / "eval"
        outputs.check_folder(fold_eval, "eval", overwrite=overwrite or _ours(fold_eval, about))
        per_fold.append((extra, cfg))
    console = Console(highlight=False, soft_wrap=True)
    records = []
    for k, (extra, cfg) in enumerate(per_fold):
        run_dir = Path(cfg.run.dir) / cfg.run.name
        console.print(f"fold {k + 1}/{folds}: {run_dir}")
        command = launch.train_command(launch.launcher_args(cfg, processes, accelerate_config),
                                       ["--config", str(config), *overrides, *extra])
        folding.run_fold(command, run_dir)
        loaded = load_model(run_dir)
        with accelerator() as acc:
            results = evaluate(loaded, [folding.test_target(base, k, folds)], acc)
        dest = loaded.default_out("eval")
        write_report(results, dest, overwrite=overwrite or _ours(dest, about), about=about)
        records.append(folding.fold_record(run_dir, results, k))
    summary = folding.summarise(records, str(config), folds)
    path = folding.write_summary(summary, summary_dir, overwrite=overwrite or _ours(summary_dir, about),
                                 about=about)
    rows = [[str(r["fold"]), str(r["n"]), *[f"{r[m]:.4f}" for m in folding.METRICS]] for r in records]
    rows.append(["mean ± sd", str(sum(r["n"] for r in records)),
                 *[f"{s['mean']:.4f} ± {s['std']:.4f}" for s in summary["mean_std"].values()]])
    console.print(_table(f"{folds}-fold cross-validation of {config}", ["fold", "n", *folding.METRICS], rows))
    console.print(f"wrote {path}")


def _ours(folder: Path, about: str) -> bool:
    """Whether `folder` holds this same cross-validation's output (replaced without --overwrite: resuming)."""
    owner = outputs.folder_owner(folder) if folder.is_dir() and any(folder.iterdir()) else None
    return owner is not None and owner["about"] == about


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("cv", epilog=(
        "Example: fer-dist cv --config launch_configs/train/ckplus.yaml --folds 10 --processes 2"))(cv)
