"""How long `fer-dist` takes to answer before it does any work: --help, a bad-input error, the import.

    .venv/bin/python tools/bench/bench_cli.py [--repeat 7] [--against REV]

Each case runs in a fresh interpreter (`--repeat` times, after one untimed warm-up run that fills the page
cache); the median and the fastest wall time are printed, with the user+system CPU time of the median run
(the steadier figure on a loaded machine). With --against REV, a checkout of REV (a git worktree in a temp
folder) is timed in the same loop, alternating with the working tree's. The target: --help and one-line
errors under 0.5 s.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CASES = {
    "fer-dist --help": ["-m", "fer_dist.cli", "--help"],
    "fer-dist train --help": ["-m", "fer_dist.cli", "train", "--help"],
    "fer-dist eval (bad input)": ["-m", "fer_dist.cli", "eval", "nosuch-model", "--shards", "nosuch",
                                  "--out", "/dev/null/x"],
    "import fer_dist.cli": ["-c", "import fer_dist.cli"],
}


def _once(args: list[str], tree: Path) -> tuple[float, float]:
    """(wall s, CPU s of the child) of one run of `python args` with `tree` first on the import path."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=tree, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--against", help="a git revision to time beside the working tree")
    args = parser.parse_args()
    trees = {"working tree": ROOT}
    tmp = None
    if args.against:
        tmp = tempfile.mkdtemp(prefix="bench-cli-")
        subprocess.run(["git", "worktree", "add", "--detach", tmp, args.against], cwd=ROOT, check=True,
                       capture_output=True)
        trees[args.against] = Path(tmp)
    try:
        print(f"{'case':<28} {'tree':<14} {'median s':>9} {'fastest s':>10} {'CPU s (median run)':>19}")
        for name, case in CASES.items():
            for tree in trees.values():
                _once(case, tree)  # warm-up: page cache, .pyc files
            runs: dict[str, list[tuple[float, float]]] = {label: [] for label in trees}
            for _ in range(args.repeat):
                for label, tree in trees.items():
                    runs[label].append(_once(case, tree))
            for label, timed in runs.items():
                walls = [w for w, _ in timed]
                median = statistics.median(walls)
                cpu = min(timed, key=lambda t: abs(t[0] - median))[1]
                print(f"{name:<28} {label:<14} {median:>9.3f} {min(walls):>10.3f} {cpu:>19.3f}")
        print(f"{args.repeat} runs each; python {sys.version.split()[0]}; load average "
              f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        if tmp is not None:
            subprocess.run(["git", "worktree", "remove", "--force", tmp], cwd=ROOT, check=False,
                           capture_output=True)


if __name__ == "__main__":
    main()
