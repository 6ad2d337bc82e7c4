"""One rank of a 2-process gloo test, and `start`, which launches the ranks for the tests.

As a script: `torchrun --nproc_per_node 2 tests/dist_worker.py <scenario> <out_dir>`, or started by
`start(...)`. Each rank writes <out_dir>/rank<R>.json with what it saw (or the error it raised) for
tests/test_dist.py and tests/test_checkpoint.py to read. Exit code: 0, 2 for a FerDistError, 1 otherwise.

`start` uses torchrun, or (launcher="env") starts the ranks itself with the variables torchrun gives them
(RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT): the same gloo group without
the agent process, which saves a torch import per launch on a loaded machine, and without the agent
killing a stuck rank, so a hang shows up as a timeout instead of hiding behind the agent.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fer_dist import checkpoint_files as checkpoint
from fer_dist import dist
from fer_dist.data.runset import ShardSet, checked_labels, save_checked
from fer_dist.errors import FerDistError
from fer_dist.launchenv import CHECKED_ENV


def _rows(ids: list[int], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, probs [n, 3]) whose row says which id and which rank it came from: (id, rank, 1)."""
    probs = torch.tensor([[float(i), float(rank), 1.0] for i in ids]).reshape(len(ids), 3)
    return torch.tensor(ids, dtype=torch.long), probs


def _caught(fn: Any) -> str | None:
    """The error fn raises, as 'Type: message', or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test reads the text
        return f"{type(e).__name__}: {e}"
    return None


def collectives(acc: Any, out: Path) -> dict[str, Any]:
    """gather, checksums, any_process, all_sum, and a bad input that every rank must reject."""
    rank = acc.process_index
    result: dict[str, Any] = {}
    # Uneven: rank 0 sends nothing, rank 1 sends three rows.
    ids, probs = _rows([] if rank == 0 else [6, 1, 3], rank)
    got_ids, got_probs = dist.gather_predictions(acc, ids, probs)
    result["gather_empty"] = {"ids": got_ids.tolist(), "probs": got_probs.tolist()}
    # Overlapping duplicates across and within ranks.
    ids, probs = _rows([7, 2, 4, 11, 0, 7] if rank == 0 else [4, 8, 2], rank)
    got_ids, got_probs, stats = dist.gather_with_stats(acc, ids, probs)
    result["gather_dup"] = {"ids": got_ids.tolist(), "probs": got_probs.tolist(), "stats": stats._asdict()}
    result["gather_nothing"] = dist.gather_predictions(acc, *_rows([], rank))[0].tolist()
    bad_ids = torch.tensor([1, -5]) if rank == 1 else torch.tensor([1, 2])
    result["gather_bad"] = _caught(lambda: dist.gather_predictions(acc, bad_ids, torch.zeros(2, 3)))
    table = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    result["agree"] = _caught(lambda: dist.check_same_everywhere(acc, table, "target table"))
    result["agree_int"] = _caught(lambda: dist.check_same_everywhere(acc, 1234, "round index"))
    skewed = table.clone()
    if rank == 1:
        skewed[2, 1] += 1e-6
    result["disagree"] = _caught(lambda: dist.check_same_everywhere(acc, skewed, "target table"))
    result["any_rank1"] = dist.any_process(acc, rank == 1)
    result["any_none"] = dist.any_process(acc, False)
    result["any_all"] = dist.any_process(acc, True)
    result["sum_float"] = dist.all_sum(acc, 2.0**24 + 0.5 + rank).item() - 2.0**25
    result["sum_tensor"] = dist.all_sum(acc, torch.tensor([1, 10]) * (rank + 1)).tolist()
    return result


def disagree(acc: Any, out: Path) -> dict[str, Any]:
    """Uncaught checksum mismatch: both ranks must raise (and exit non-zero) without hanging."""
    table = torch.zeros(5, 7)
    table[0, 0] = float(acc.process_index)
    dist.check_same_everywhere(acc, table, "target table after round 3")
    return {"unreachable": True}


def mismatch(acc: Any, out: Path) -> dict[str, Any]:
    """Never reached: make_accelerator(expected_processes=3) refuses a 2-process launch."""
    return {"unreachable": True}


def save(acc: Any, out: Path) -> dict[str, Any]:
    """Three 2-process checkpoint saves (keep_last 2, the first is best), then each rank reloads its RNG."""
    rank = acc.process_index
    run_dir = out / "run"
    result: dict[str, Any] = {}
    for i in (1, 2, 3):
        random.seed(100 * i + rank)
        np.random.seed(100 * i + rank)
        torch.manual_seed(100 * i + rank)
        state = {"model": {"w": torch.full((2,), float(i))}, "round": i}
        path = checkpoint.save_checkpoint(acc, run_dir, f"round-{i:04d}", state, keep_last=2, is_best=i == 1)
        after_save = [random.random(), float(np.random.rand()), torch.rand(1).item()]
    result["path"] = str(path)
    latest = checkpoint.latest_checkpoint(run_dir)
    result["latest"] = str(latest)
    loaded, rng = checkpoint.load_checkpoint(latest, rank)
    torch.manual_seed(999)
    checkpoint.restore_rng(rng)
    result["replayed"] = [random.random(), float(np.random.rand()), torch.rand(1).item()] == after_save
    result["round"] = loaded["round"]
    result["bad_state"] = _caught(lambda: checkpoint.save_checkpoint(
        acc, run_dir, "round-0004", {"config": {"run_dir": Path("runs/x")}}))
    result["latest_after_bad"] = str(checkpoint.latest_checkpoint(run_dir))
    return result


def labels(acc: Any, out: Path) -> dict[str, Any]:
    """The label pass split over the ranks, on the shard folders named in out/args.json (one intact, one
    with damaged samples), under both on_error rules; and gathered_texts."""
    folders = json.loads((out / "args.json").read_text())
    rank = acc.process_index
    result: dict[str, Any] = {}
    for name, folder in folders.items():
        shardset = ShardSet([(folder, ("train", "val", "test"))])
        for on_error in ("raise", "skip"):
            try:
                got = dist.label_pass(acc, shardset, on_error)
                result[f"{name}-{on_error}"] = {"labels": got.labels.tolist(), "problems": got.problems,
                                                "damaged": got.damaged.nonzero().flatten().tolist()}
            except FerDistError as e:
                result[f"{name}-{on_error}"] = {"error": str(e)}
        result[f"{name}-checked-here"] = int(checked_labels(shardset, "skip", part=(rank, 2)).covered.sum())
    # fer-dist train's own label pass, forged so that taking it shows: both ranks take it where it was made
    # over these files under this rule; for another rule (or other files) they check the shards themselves
    intact = ShardSet([(folders["intact"], ("train", "val", "test"))])
    made = checked_labels(intact, "raise")
    made.labels[made.labels >= 0] = 6
    record = out / "checked.npz"
    if rank == 0:
        save_checked(record, made, intact, "raise")
    acc.wait_for_everyone()
    os.environ[CHECKED_ENV] = str(record)
    try:
        result["launch-raise"] = dist.label_pass(acc, intact, "raise").labels.tolist()
        result["launch-skip"] = dist.label_pass(acc, intact, "skip").labels.tolist()
    finally:
        del os.environ[CHECKED_ENV]
    result["texts"] = dist.gathered_texts(acc, ["a\nb", "\u00fc"] if rank == 0 else ["c"])
    result["texts_none"] = dist.gathered_texts(acc, [])
    result["texts_empty"] = dist.gathered_texts(acc, [""] if rank == 1 else [])
    return result


@dataclass
class Launch:
    """A started 2-process run of one scenario."""

    procs: list[subprocess.Popen]
    out: Path
    started: float

    def wait(self, timeout: float) -> tuple[list[int], list[dict[str, Any]]]:
        """(exit codes, rank reports); AssertionError, after killing them, if they outlive timeout."""
        deadline = self.started + timeout
        try:
            codes = [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in self.procs]
        except subprocess.TimeoutExpired:
            for p in self.procs:
                # Each launch runs in its own session: this reaches torchrun's workers too.
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            raise AssertionError(f"still running after {timeout} s (a hang?): {self.log()}") from None
        reports = []
        for rank in range(2):
            file = self.out / f"rank{rank}.json"
            reports.append(json.loads(file.read_text()) if file.exists() else {"missing": self.log()})
        return codes, reports

    def log(self) -> str:
        """The launch's output, for failure messages."""
        return "\n".join(f.read_text(errors="replace")[-3000:] for f in sorted(self.out.glob("*.log")))


def start(scenario: str, out: Path, launcher: str = "env") -> Launch:
    """Start 2 ranks of `scenario` writing into out, by torchrun or by setting torchrun's variables."""
    from train_fixtures import free_port  # here: the ranks running this file need none of its imports

    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    script = [str(Path(__file__).resolve()), scenario, str(out)]
    if launcher == "torchrun":
        commands = {"launcher": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_addr", "127.0.0.1", "--master_port", env["MASTER_PORT"], *script]}
        envs = {"launcher": env}
    else:
        commands = {f"rank{r}": [sys.executable, *script] for r in range(2)}
        envs = {f"rank{r}": {**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                             "LOCAL_WORLD_SIZE": "2"} for r in range(2)}
    started, procs = time.monotonic(), []
    for name, cmd in commands.items():
        with open(out / f"{name}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, env=envs[name], stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    return Launch(procs, out, started)


SCENARIOS = {"collectives": collectives, "disagree": disagree, "mismatch": mismatch, "save": save,
             "labels": labels}


def main() -> int:
    """Run one scenario on this rank and write rank<R>.json."""
    scenario, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ.get("RANK", "0"))
    report: dict[str, Any] = {"rank": rank, "scenario": scenario}
    code = 0
    try:
        acc = dist.make_accelerator(expected_processes=3 if scenario == "mismatch" else None)
        report["num_processes"] = acc.num_processes
        report["distributed_type"] = str(acc.distributed_type)
        assert acc.num_processes == 2 and acc.process_index == rank, "not a 2-process group"
        report.update(SCENARIOS[scenario](acc, out))
    except FerDistError as e:
        report["error"], code = f"FerDistError: {e}", 2
    except Exception as e:  # noqa: BLE001 - recorded for the test, and the exit code says it failed
        report["error"], code = f"{type(e).__name__}: {e}", 1
        report["traceback"] = traceback.format_exc()
    finally:
        dist.shutdown()
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())
