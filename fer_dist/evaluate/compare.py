"""`fer-dist compare RUN ...`: what differs between runs' configs, and what each run reached.

Reads only what a run leaves in its directory: `config.yaml`, `metrics.jsonl`, `summary.json`, and where
they exist `eval/eval.json` (`fer-dist eval`) and `intensity/intensity.json` (`fer-dist intensity`). This
is how the paper's ablation (baseline, smoothing, unlabelled, both) is read off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from fer_dist.errors import FerDistError
from fer_dist.metrics import read_metrics

FORMAT = "fer-dist-compare/1"
EVAL_FILE = Path("eval") / "eval.json"
INTENSITY_FILE = Path("intensity") / "intensity.json"
# keys that change how a run is shown or kept, not what it learns: left out of the table (kept in the JSON)
PRESENTATION = {"run.name", "run.dir", "run.progress", "run.progress_every_s", "run.log_every",
                "run.tensorboard", "run.keep_last", "run.resume", "run.debug", "run.eval_batch_size",
                "run.checkpoint_every_steps", "run.max_requeues"}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise FerDistError(f"{path}: not valid JSON") from None


def read_run(run_dir: Path) -> dict[str, Any]:
    """One run's config, history and results, from its files alone."""
    config_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    if not config_path.is_file() or not metrics_path.is_file():
        raise FerDistError(f"{run_dir}: not a run directory (needs config.yaml and metrics.jsonl)")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
        records = read_metrics(metrics_path)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError):
        raise FerDistError(f"{run_dir}: config.yaml or metrics.jsonl is damaged") from None
    warm = [r for r in records if r.get("kind") == "warmup"]
    rounds = [r for r in records if r.get("kind") == "round"]
    history = [{"x": r["warmup"] - len(warm), "val": r["val/acc"], "confident": None} for r in warm]
    history += [{"x": r["round"], "val": r["val/acc"], "confident": r.get("unlabelled/confident")}
                for r in rounds]
    summary = _json(run_dir / "summary.json")
    evaluation = _json(run_dir / EVAL_FILE)
    intensity = _json(run_dir / INTENSITY_FILE)
    return {
        "name": run_dir.name, "dir": str(run_dir), "config": _flat(config), "history": history,
        "processes": _processes(run_dir, summary),
        "finished": summary is not None, "warmup_epochs": len(warm), "rounds": len(rounds),
        "best_val": max((h["val"] for h in history), default=None),
        "test_acc": summary.get("test_acc_of_best") if summary else None,
        "eval": {s["name"]: s["all_classes"]["accuracy"] for s in evaluation["sets"]} if evaluation else {},
        "intensity": intensity.get("score") if intensity else None,
        "intensity_set": intensity.get("shards") if intensity else None,
        "confident_per_round": [h["confident"] for h in history if h["x"] > 0],
    }


def _processes(run_dir: Path, summary: dict[str, Any] | None) -> int | None:
    """How many processes trained the run: its summary's count, else its latest checkpoint's."""
    if summary and summary.get("processes") is not None:
        return int(summary["processes"])
    try:
        tag = (run_dir / "checkpoints" / "latest").read_text(encoding="utf-8").strip()
        meta = json.loads((run_dir / "checkpoints" / tag / "meta.json").read_text(encoding="utf-8"))
        return int(meta["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def differing_keys(runs: list[dict[str, Any]]) -> list[str]:
    """Config keys whose values are not the same in every run (`run.name` and `run.dir` included)."""
    keys = sorted(set().union(*(r["config"] for r in runs)))
    return [k for k in keys if len({json.dumps(r["config"].get(k), sort_keys=True) for r in runs}) > 1]


def compare_runs(run_dirs: list[Path]) -> dict[str, Any]:
    """The comparison as data: differing config values per run and each run's results."""
    if not run_dirs:
        raise FerDistError("compare: name at least one run directory")
    seen: dict[Path, Path] = {}
    for d in map(Path, run_dirs):
        first = seen.setdefault(d.resolve(), d)
        if first is not d:
            same = "given twice" if first == d else f"the same run as {first}"
            raise FerDistError(f"compare: {d} is {same}; name each run once")
    runs = [read_run(Path(d)) for d in run_dirs]
    keys = differing_keys(runs)
    for run in runs:
        run["differs"] = {k: run["config"].get(k) for k in keys}
    test_sets = sorted(set().union(*(r["eval"] for r in runs)))
    return {"format": FORMAT, "differing_keys": keys, "test_sets": test_sets, "runs": runs}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def tables(comparison: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) of the two tables: the config values that differ, and what each run reached."""
    keys = [k for k in comparison["differing_keys"] if k not in PRESENTATION]
    runs = comparison["runs"]
    differs = ("config values that differ", ["run", *keys],
               [[r["name"], *[_fmt(r["differs"][k]) for k in keys]] for r in runs])
    # each intensity score under the set it was measured on: scores on different sets do not compare
    sets = sorted({r.get("intensity_set") or "" for r in runs if r["intensity"] is not None})
    columns = ["run", "processes", "warm-up", "rounds", "best val", "test (training)",
               *[f"eval {s}" for s in comparison["test_sets"]], *[f"intensity {s}".strip() for s in sets]]
    rows = [[r["name"], _fmt(r.get("processes")), str(r["warmup_epochs"]),
             str(r["rounds"]) + ("" if r["finished"] else " (running)"), _fmt(r["best_val"]),
             _fmt(r["test_acc"]),
             *[_fmt(r["eval"].get(s)) for s in comparison["test_sets"]],
             *[_fmt(r["intensity"] if (r.get("intensity_set") or "") == s else None) for s in sets]]
            for r in runs]
    return [differs, ("results", columns, rows)]
