"""A self-training round's predict + gather + rewrite against a plain inference pass, and the table alone.

    .venv/bin/accelerate launch --config_file launch_configs/accelerate/cpu_2proc.yaml \\
        tools/bench/bench_round.py [--shards DIR] [--device auto|cpu] [--backbone NAME] [--input-size N]
    .venv/bin/python tools/bench/bench_round.py ...          # one process

Part 1, over the same samples (the train split of --shards, default shards/synthetic, sharded first if
missing), with the model and process group the trainer builds (`fer_dist.run_state.build_run` on a config
pointing at those shards):
- plain: exhaustive_loader + forward + softmax over the round's pool (labelled and unlabelled train ids),
  results discarded: the floor any prediction pass pays.
- round: `fer_dist.train.compose`, the trainer's own function: predict (the same pass, keeping the
  probabilities), gather_with_stats (every rank's ids and probabilities to every rank, duplicates
  dropped), rewrite_targets, the table update, compose_round and the round's statistics.
Both are timed from a barrier to a barrier (the round waits for the slowest rank anyway), interleaved
ABBA, --repeat times; the best of each counts (medians and the CPU seconds of all processes and their
loader workers are printed too). Target: round / plain - 1 <= 5 %.

Part 2, the table alone (no model, no data): for each --ids N (K = 7), every rank holds a contiguous
1/W of N ids with random probabilities; timed: gather_with_stats + `fer_dist.train.rewrite_and_draw`
(rewrite_targets, table update, compose_round, the round's statistics) on the same process group.
Reports seconds and bytes each process receives per round, and the growth per tenfold N.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import torch
from trainer_setup import add_common_options, close, cpu_seconds, describe, make_run, timed

from fer_dist import dist, method
from fer_dist.checkpoint import Run, State
from fer_dist.classes import NUM_CLASSES
from fer_dist.data.runset import RunData
from fer_dist.train import compose, rewrite_and_draw


@torch.no_grad()
def plain_pass(run: Run, pool: torch.Tensor) -> int:
    """The reference: the round's exhaustive pass, forward + softmax, nothing kept, nothing exchanged."""
    net, acc = run.net, run.acc
    net.eval()
    # the run's own loader, as compose's predict uses: both passes read on the same kept workers
    stream = run.loaders.exhaustive(run.data.train_shards, pool, batch_size=run.cfg.run.eval_batch_size,
                                    rank=acc.process_index, world=acc.num_processes)
    n = 0
    with acc.autocast() if acc.device.type != "cpu" else nullcontext():
        for images, _labels, _ids in stream:
            torch.softmax(net(images.to(acc.device)).float(), dim=1)
            n += images.shape[0]
    return n


def bench_model(run: Run, repeat: int) -> dict:
    """Best-of-`repeat` seconds of the plain pass and of the trainer's compose(), interleaved (ABBA order)."""
    acc, st, data = run.acc, run.state, run.data
    pool = data.labelled | data.unlabelled
    table = st.targets.clone()
    times: dict[str, list[float]] = {"plain": [], "round": []}
    cpu: dict[str, list[float]] = {"plain": [], "round": []}
    stats: dict = {}

    def one(name: str) -> None:
        nonlocal stats
        st.targets, st.include, st.round = table.clone(), None, 0  # every repeat does the same round
        before = cpu_seconds()
        t, out = timed(acc, lambda: plain_pass(run, pool) if name == "plain" else compose(run))
        cpu[name].append(float(dist.all_sum(acc, cpu_seconds() - before)))  # all processes and workers
        if name == "round" and (not times["round"] or t < min(times["round"])):
            stats = out
        times[name].append(t)

    for i in range(repeat):
        for name in ("plain", "round") if i % 2 == 0 else ("round", "plain"):
            one(name)
    best = {k: min(v) for k, v in times.items()}
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    stats.pop("selection")
    return {"samples": int(pool.sum()), **best, "median": median, "times": times, "cpu": best_cpu,
            "cpu_seconds": cpu, "overhead_cpu": best_cpu["round"] / best_cpu["plain"] - 1,
            "overhead": best["round"] / best["plain"] - 1,
            "overhead_median": median["round"] / median["plain"] - 1,
            "compose": {k: stats[k] for k in ("time/predict", "time/gather", "time/rewrite", "gather/bytes",
                                              "unlabelled/confident", "unlabelled/drawn")}}


def fake_run(run: Run, num_ids: int, labelled_share: float, seed: int) -> tuple[Run, torch.Tensor]:
    """A Run over `num_ids` random ids (labels, masks, target table) with the real config and group;
    and the random probabilities of every id (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    labelled = torch.rand(num_ids, generator=gen) < labelled_share
    labels = torch.where(labelled, torch.randint(0, NUM_CLASSES, (num_ids,), generator=gen), -1)
    targets = torch.zeros(num_ids, NUM_CLASSES)
    targets[labelled] = method.smooth_labels(labels[labelled], NUM_CLASSES, run.cfg.method.eps)
    none = torch.zeros(num_ids, dtype=torch.bool)
    data = RunData(shardset=None, labels=labels, labelled=labelled, unlabelled=~labelled, val=none, test=none,
                   train_shards=[], val_shards=[], test_shards=[])
    # logits scaled so that about a third of the rows pass tau = 0.7, as a half-trained model's do
    probs = torch.softmax(2.2 * torch.randn(num_ids, NUM_CLASSES, generator=gen), dim=1)
    fake = Run(run.cfg, run.acc, run.dir, data, run.model, run.optimizer, run.scheduler,
               State(targets=targets), run.log, run.stop, run.progress)
    return fake, probs


def bench_table(run: Run, num_ids: int, repeat: int, labelled_share: float) -> dict:
    """Best-of-`repeat` seconds of gather_with_stats + rewrite_and_draw over num_ids random predictions."""
    acc = run.acc
    fake, probs = fake_run(run, num_ids, labelled_share, seed=num_ids)
    table = fake.state.targets.clone()
    # this rank's contiguous part, as the exhaustive plan cuts the ids
    rank, world = acc.process_index, acc.num_processes
    lo, hi = num_ids * rank // world, num_ids * (rank + 1) // world
    mine_ids, mine_probs = torch.arange(lo, hi), probs[lo:hi].clone()
    del probs
    best = {"gather": float("inf"), "rewrite": float("inf"), "total": float("inf")}
    out: dict = {}

    def one_round() -> tuple[float, float, dict, dist.GatherStats]:
        tick = time.perf_counter()
        ids, p, stats = dist.gather_with_stats(acc, mine_ids, mine_probs)
        mid = time.perf_counter()
        result = rewrite_and_draw(fake, ids, p)
        return mid - tick, time.perf_counter() - mid, result, stats

    for _ in range(repeat):
        fake.state.targets, fake.state.include = table.clone(), None
        total, (t_gather, t_rewrite, result, stats) = timed(acc, one_round)
        best["gather"] = min(best["gather"], t_gather)
        best["rewrite"] = min(best["rewrite"], t_rewrite)
        if total < best["total"]:
            best["total"] = total
            out = {"bytes": stats.bytes, "confident": result["unlabelled/confident"],
                   "drawn": result["unlabelled/drawn"], "reset": result["labelled/reset"]}
    return {"ids": num_ids, **best, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_options(p)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per process (quick start: 1)")
    p.add_argument("--eval-batch", type=int, default=256, help="per-process batch (run.eval_batch_size)")
    p.add_argument("--repeat", type=int, default=5, help="interleaved runs of each pass; the best counts")
    p.add_argument("--ids", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
                   help="table sizes of part 2 (none: skip it)")
    p.add_argument("--table-repeat", type=int, default=3)
    p.add_argument("--labelled-share", type=float, default=0.2,
                   help="part 2: share of labelled ids (the synthetic set's 1 in 5)")
    p.add_argument("--skip-model", action="store_true", help="part 2 only")
    args = p.parse_args()

    run = make_run(args, "bench_round", workers=args.workers, eval_batch=args.eval_batch)
    acc = run.acc
    say = print if acc.is_main_process else (lambda *a, **k: None)
    say(f"{describe(run)}, workers {args.workers}, eval batch {args.eval_batch}", flush=True)
    figures: dict = {"processes": acc.num_processes, "device": str(acc.device), "backbone": args.backbone,
                     "input_size": run.net.input_spec.size, "mixed_precision": args.mixed_precision,
                     "workers": args.workers, "eval_batch": args.eval_batch}
    try:
        if not args.skip_model:
            r = bench_model(run, args.repeat)
            figures["round"] = r
            c = r["compose"]
            say(f"\n### Round vs plain inference: {r['samples']} samples of {args.shards} (train), "
                f"best of {args.repeat}\n")
            med = r["median"]
            cpu = r["cpu"]
            say("| pass | best s | samples/s | vs plain | median s | vs plain | best CPU s | vs plain |")
            say("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            say(f"| plain: forward + softmax | {r['plain']:.3f} | {r['samples'] / r['plain']:,.0f} | 1.000 | "
                f"{med['plain']:.3f} | 1.000 | {cpu['plain']:.2f} | 1.000 |")
            say(f"| round: predict + gather + rewrite (compose) | {r['round']:.3f} | "
                f"{r['samples'] / r['round']:,.0f} | {r['round'] / r['plain']:.3f} | {med['round']:.3f} | "
                f"{med['round'] / med['plain']:.3f} | {cpu['round']:.2f} | "
                f"{cpu['round'] / cpu['plain']:.3f} |")
            say(f"\noverhead {100 * r['overhead']:+.1f} % of the best, "
                f"{100 * r['overhead_median']:+.1f} % of the median, {100 * r['overhead_cpu']:+.1f} % in CPU "
                f"seconds (target <= 5 %); "
                f"inside the best round: predict "
                f"{c['time/predict']:.3f} s, gather {c['time/gather'] * 1e3:.1f} ms, rewrite + draw "
                f"{c['time/rewrite'] * 1e3:.1f} ms; {c['gather/bytes']:,} bytes gathered per process; "
                f"{c['unlabelled/confident']} confident, {c['unlabelled/drawn']} drawn", flush=True)
        if args.ids:
            rows = [bench_table(run, n, args.table_repeat, args.labelled_share) for n in args.ids]
            figures["table"] = rows
            say(f"\n### Table alone: gather + rewrite + draw on random probabilities (K = {NUM_CLASSES}, "
                f"{acc.num_processes} process(es), best of {args.table_repeat})\n")
            say("| ids | gather s | rewrite + draw s | round s | bytes per process | growth vs 10x fewer |")
            say("| ---: | ---: | ---: | ---: | ---: | ---: |")
            for i, row in enumerate(rows):
                prev = rows[i - 1] if i else None
                tenfold = prev is not None and prev["ids"] * 10 == row["ids"]
                growth = f"{row['total'] / prev['total']:.1f}x" if tenfold else ""
                say(f"| {row['ids']:,} | {row['gather']:.4f} | {row['rewrite']:.4f} | {row['total']:.4f} | "
                    f"{row['bytes']:,} | {growth} |", flush=True)
        if args.json is not None and acc.is_main_process:
            args.json.write_text(json.dumps(figures, indent=2))
    finally:
        close(run)


if __name__ == "__main__":
    main()
