"""What bench_round.py and bench_train.py share: shards, the trainer's Run over them, barrier timing.

Both benchmarks build the trainer's own objects (`fer_dist.run_state.build_run` on a config whose labelled and
unlabelled data are the train split of one shard directory) so that what they time is what the trainer runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import psutil
import torch

from fer_dist import dist, files
from fer_dist.checkpoint import Run
from fer_dist.config import build_config
from fer_dist.run_state import build_run

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = Path("shards/synthetic")


def add_common_options(p: argparse.ArgumentParser) -> None:
    """The options both benchmarks take: data, device, model."""
    p.add_argument("--shards", type=Path, default=SYNTHETIC, help="shard dir with train and val splits")
    p.add_argument("--device", choices=("auto", "cpu"), default="auto", help="auto: CUDA where present")
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--input-size", type=int, default=None, help="default: the backbone's")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here (main process)")


def ensure_shards(shards: Path) -> None:
    """shards/synthetic is built where missing (main process; the others wait); any other dir must exist."""
    if (shards / "manifest.json").exists():
        return
    if shards.resolve() != (ROOT / SYNTHETIC).resolve() and shards != SYNTHETIC:
        sys.exit(f"{shards}: no manifest.json; shard it first with `fer-dist shard`")
    if files.is_main_launch_process():
        from fer_dist.data.pack import pack

        print(f"{shards} is missing: sharding the built-in synthetic data set", flush=True)
        pack("synthetic", [], shards, progress=False)
    files.wait_for_file(shards / "manifest.json")


def make_run(args: argparse.Namespace, name: str, *, workers: int, batch_size: int = 32,
             eval_batch: int = 256) -> Run:
    """The accelerator and the trainer's Run (model, optimiser, data, target table) on --shards' train."""
    ensure_shards(args.shards)
    d = str(args.shards)
    if "val" not in json.loads((args.shards / "manifest.json").read_text())["splits"]:
        sys.exit(f"{d}: needs a val split (the trainer's data requires one)")
    acc = dist.make_accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    run_dir = Path(tempfile.gettempdir()) / f"fer-dist-{name}-{acc.num_processes}"
    tree = {
        "data": {"labelled": [{"dir": d, "splits": ["train"]}],
                 "unlabelled": [{"dir": d, "splits": ["train"]}],
                 "val": [{"dir": d, "splits": ["val"]}], "test": [], "num_workers": workers},
        "model": {"backbone": args.backbone, "pretrained": False, "trainable": "all",
                  "input_size": args.input_size},
        "optim": {"batch_size": batch_size, "lr": 1e-3},
        "run": {"name": name, "dir": str(run_dir),
                "resume": "never", "progress": False, "mixed_precision": args.mixed_precision,
                "eval_batch_size": eval_batch},
    }
    return build_run(build_config(tree, name), acc)


def describe(run: Run) -> str:
    acc = run.acc
    return (f"{acc.num_processes} process(es) on {acc.device} ({acc.distributed_type}), torch threads "
            f"{torch.get_num_threads()}, {run.cfg.model.backbone} at {run.net.input_spec.size} px, mixed "
            f"precision {run.cfg.run.mixed_precision}")


def cpu_seconds() -> float:
    """CPU seconds of this process, its reaped children, and the loader workers the fork server started
    (its children, not ours): those alive (kept from epoch to epoch) and those it reaped."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    server = forkserver._forkserver._forkserver_pid  # private, but the only handle on the workers' CPU time
    workers = 0.0
    if server:
        process = psutil.Process(server)
        reaped = process.cpu_times()
        workers = reaped.children_user + reaped.children_system
        for child in process.children():
            with contextlib.suppress(psutil.Error):  # a worker that ended meanwhile is counted as reaped
                times = child.cpu_times()
                workers += times.user + times.system
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime + workers


def timed(acc: Any, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of fn() from a barrier to a barrier (CUDA synchronised), and its result."""
    acc.wait_for_everyone()
    tick = time.perf_counter()
    out = fn()
    if acc.device.type == "cuda":
        torch.cuda.synchronize()
    acc.wait_for_everyone()
    return time.perf_counter() - tick, out


def close(run: Run) -> None:
    run.log.close()
    run.stop.close()
    dist.shutdown()
