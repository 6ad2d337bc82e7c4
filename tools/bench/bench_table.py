"""The round's table operations alone, at millions of ids: time and peak memory of each, one process.

    .venv/bin/python tools/bench/bench_table.py [--ids 1000000 10000000 50000000] [--world 8]
        [--labelled 0.1] [--confident 0.3] [--repeat 1] [--json OUT]

No model, no data, no process group: what every rank does with the gathered predictions of a round
(METHOD.md 3.1-3.4), on random probabilities over N ids (K = 7), a fraction --labelled of them labelled.
Each size runs in a fresh child process (so one size's peak does not hide the next one's), through the
project's own functions, in the trainer's order:
- concat: the all_gather's output as every rank receives it, W padded parts of (int64 id, K float32)
  concatenated, the padding rows dropped (dist.gather_with_stats after the collective).
- dedupe: dist.gather_with_stats on the concatenated rows (world 1: its stable sort by id and the
  first-occurrence mask, exactly the code a W-process gather runs after the collective).
- select: method.class_thresholds (class_adaptive) and method.confident_unlabelled.
- rewrite: method.rewrite_targets and the table update (targets[ids] = rows), as train.rewrite_and_draw.
- draw: method.compose_round and the round's include mask over the run's ids.
Peak memory: the process's resident set size, sampled every 2 ms by a thread while a step runs (the peak
above the RSS before the step, and the absolute peak); the table [N, K] float32 and the masks the trainer
keeps exist before the first step, as in a run. Every rank of a W-process run holds all of it: the per-process
figure is the same for any W, the W processes of one machine together take W times it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import torch

from fer_dist import dist, method

K = 7


def rss() -> int:
    """This process's resident set size in bytes (/proc: no psutil needed in the child)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """Peak RSS while a block runs, sampled by a thread; `seconds` is the block's wall time."""

    def __enter__(self) -> Peak:
        self.before = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        self._tick = time.perf_counter()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._tick
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def random_round(n: int, world: int, labelled: float, confident: float, seed: int = 0
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """W padded parts of (ids, probs) as the gather delivers them, and the labels ([n], -1 unlabelled).

    A `confident` share of the rows is made peaked (max p around 0.85), the rest flat-ish, so that the
    selection and the alpha rule have both outcomes to find."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) >= labelled] = method.UNLABELLED
    logits = torch.randn(n, K, generator=gen)
    peaked = torch.rand(n, generator=gen) < confident
    logits[peaked, torch.randint(0, K, (int(peaked.sum()),), generator=gen)] += 3.0
    del peaked
    probs = torch.softmax(logits, dim=1)
    del logits
    ids = torch.arange(n, dtype=torch.long)
    bounds = [n * r // world for r in range(world + 1)]
    n_max = max(bounds[r + 1] - bounds[r] for r in range(world))
    id_parts, prob_parts = [], []
    for r in range(world):
        lo, hi = bounds[r], bounds[r + 1]
        pad = n_max - (hi - lo)
        id_parts.append(torch.cat([ids[lo:hi], torch.full((pad,), dist.PAD_ID, dtype=torch.long)]))
        prob_parts.append(torch.cat([probs[lo:hi], torch.zeros(pad, K)]))
    return id_parts, prob_parts, labels


def one_size(n: int, world: int, labelled: float, confident: float) -> dict[str, Any]:
    """Every step at n ids in this process: {step: {seconds, peak_rss_bytes, above_start_bytes}}."""
    id_parts, prob_parts, labels = random_round(n, world, labelled, confident)
    targets = torch.zeros(n, K)  # the trainer's table, held all run long
    is_labelled = labels >= 0
    targets[is_labelled] = method.smooth_labels(labels[is_labelled], K, 0.1)
    steps: dict[str, Any] = {"start_rss_bytes": rss()}

    def record(name: str, peak: Peak) -> None:
        steps[name] = {"seconds": round(peak.seconds, 4), "peak_rss_bytes": peak.peak,
                       "above_start_bytes": peak.peak - peak.before}

    with Peak() as p:
        all_ids, all_probs = torch.cat(id_parts), torch.cat(prob_parts)
        real = all_ids != dist.PAD_ID
        all_ids, all_probs = all_ids[real], all_probs[real]
    record("concat", p)
    del id_parts, prob_parts, real
    with Peak() as p:
        ids, probs, _ = dist.gather_with_stats(SimpleNamespace(num_processes=1), all_ids, all_probs)
    record("dedupe", p)
    del all_ids, all_probs
    with Peak() as p:
        rows = labels[ids]
        taus = method.class_thresholds(probs, rows, tau=0.7, mode="class_adaptive")
        confident_mask = method.confident_unlabelled(probs, rows, taus)
    record("select", p)
    with Peak() as p:
        rw = method.rewrite_targets(probs, rows, targets[ids], tau=taus, alpha=0.7)
        targets[ids] = rw.targets
    record("rewrite", p)
    steps["confident"] = int(rw.confident.sum())
    del rw
    with Peak() as p:
        draw = method.compose_round(ids[rows >= 0], ids[confident_mask], fraction=0.1, seed=0, round_index=0)
        include = is_labelled.clone()
        include[draw.removed] = False
        include[draw.added] = True
    record("draw", p)
    steps["drawn"] = int(draw.added.numel())
    steps["total_seconds"] = round(sum(v["seconds"] for v in steps.values() if isinstance(v, dict)), 4)
    steps["peak_rss_bytes"] = max(v["peak_rss_bytes"] for v in steps.values() if isinstance(v, dict))
    steps["table_bytes"] = targets.numel() * targets.element_size()
    steps["gathered_bytes_per_process"] = dist.gathered_bytes(-(-n // world), K, world)
    return steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ids", type=int, nargs="+", default=[1_000_000, 10_000_000, 50_000_000])
    p.add_argument("--world", type=int, default=8, help="W: the parts the gather concatenates")
    p.add_argument("--labelled", type=float, default=0.1, help="share of the ids that are labelled")
    p.add_argument("--confident", type=float, default=0.3, help="share of rows made peaked")
    p.add_argument("--repeat", type=int, default=1, help="runs per size (fresh process each); best counts")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the child (default: torch's)")
    p.add_argument("--json", default=None, help="also write every run's figures here")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the child's size
    args = p.parse_args(argv)
    if args.one is not None:
        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(one_size(args.one, args.world, args.labelled, args.confident)))
        return 0
    results = []
    for n in args.ids:
        runs = []
        for _ in range(args.repeat):
            cmd = [sys.executable, __file__, "--one", str(n), "--world", str(args.world),
                   "--labelled", str(args.labelled), "--confident", str(args.confident)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                print(f"error: {n:,} ids: the child failed: {out.stderr.strip()[-500:]}", file=sys.stderr)
                return 1
            runs.append(json.loads(out.stdout))
        best = min(runs, key=lambda r: r["total_seconds"])
        results.append({"ids": n, "runs": runs})
        names = ("concat", "dedupe", "select", "rewrite", "draw")
        print(f"{n:>12,} ids  " + "  ".join(f"{s} {best[s]['seconds']:.3f}s" for s in names)
              + f"  total {best['total_seconds']:.3f}s  peak RSS {best['peak_rss_bytes'] / 2**30:.2f} GiB"
              + f" (start {best['start_rss_bytes'] / 2**30:.2f})  confident {best['confident']:,}"
              + f"  drawn {best['drawn']:,}", flush=True)
    if args.json:
        meta = {"world": args.world, "labelled": args.labelled, "confident": args.confident,
                "threads": args.threads or torch.get_num_threads(), "cpus": os.cpu_count()}
        with open(args.json + ".tmp", "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
