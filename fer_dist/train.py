"""`accelerate launch -m fer_dist.train --config <yaml> [key=value ...]`: warm-up, then self-training rounds.

Reads top to bottom: `main` parses, builds, resumes; `fit` runs the warm-up epochs (METHOD.md section 2) and
the rounds (section 3: predict -> gather -> rewrite -> compose -> train -> validate) until the stopping rule
(section 4), then tests the best model. The math is in `fer_dist.method`, the process plumbing in
`fer_dist.dist`, the run's objects in `fer_dist.run_state`, its state, saves and resume in
`fer_dist.checkpoint` (the files in `fer_dist.checkpoint_files`): this module only orchestrates.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from fer_dist import dist, method, numerics, stopsignals
from fer_dist.checkpoint import Run, resume, save
from fer_dist.classes import NUM_CLASSES
from fer_dist.config import (
    keys_help,
    load_config,
    overrides_name_data,
    pseudo_target_mode,
)
from fer_dist.data.augment import strong_augment
from fer_dist.errors import FerDistError
from fer_dist.files import write_text_atomic
from fer_dist.models import export_model, load_exported, preprocessing_of
from fer_dist.quickstart import QUICKSTART, ensure_synthetic_shards
from fer_dist.run_state import build_run


class StopRun(Exception):
    """Raised at a step boundary once every process agreed to stop (SIGTERM / SIGUSR1)."""


# ----------------------------------------------------------------------------------------------------------
# the pieces of an epoch


def train_epoch(run: Run, include: torch.Tensor, name: str) -> float:
    """One epoch over the ids in `include` against the target table; returns the mean loss."""
    cfg, acc, st = run.cfg, run.acc, run.state
    stream = run.loaders.train(run.data.train_shards, include, st.targets, global_batch=cfg.optim.batch_size,
                               rank=acc.process_index, world=acc.num_processes, seed=cfg.run.seed,
                               epoch=st.epochs_started, skip_batches=st.step_in_epoch)
    run.model.train()
    seen, tick = 0, time.perf_counter()
    # The epoch's loss sum stays on the device; it is added to st.epoch_loss (a float, checkpointed) only
    # where the host reads it anyway: at a log step, a save and the epoch's end.
    pending = torch.zeros((), dtype=torch.float64, device=acc.device)

    def settle() -> None:
        st.epoch_loss += float(pending)
        pending.zero_()

    strong = cfg.method.unlabelled_augment if st.phase == "rounds" else "none"
    with run.progress.task(name, total=stream.steps, completed=st.step_in_epoch) as bar:
        for images, targets, ids in stream:
            if strong != "none":
                rows = run.data.unlabelled[ids]
                images[rows] = strong_augment(images[rows], ids[rows], strong, seed=cfg.run.seed,
                                              epoch=st.epochs_started)
            loss = train_step(run, images, targets)
            pending.add_(torch.where(torch.isfinite(loss), loss, 0.0).double())
            st.step += 1
            st.step_in_epoch += 1
            seen += images.shape[0] * acc.num_processes
            rate = seen / max(time.perf_counter() - tick, 1e-9)
            if st.step % cfg.run.log_every == 0:
                run.log.write("step", st.step, {"train/loss": float(loss), "train/images_per_s": rate,
                                                "train/lr": run.scheduler.get_last_lr()[0]})
                seen, tick = 0, time.perf_counter()
            bar.advance(loss=loss, images_per_s=rate)  # the bar reads the loss only when it shows it
            every = cfg.run.checkpoint_every_steps
            if every and st.step % every == 0 and st.step_in_epoch < stream.steps:
                settle()
                save(run, f"step-{st.step:08d}")
            # A stop request is agreed on (a collective and a sync) every few steps and at the epoch's end,
            # at the same steps on every process.
            check = st.step % cfg.run.stop_check_every == 0 or st.step_in_epoch == stream.steps
            if check and dist.any_process(acc, run.stop.requested):
                settle()
                save(run, f"step-{st.step:08d}")
                raise StopRun(f"stopped on request ({run.stop.signal_name}) at step {st.step}")
    settle()
    trained = st.step_in_epoch - st.skipped_in_epoch  # skipped steps are the same on every process
    mean = dist.all_sum(acc, torch.tensor(st.epoch_loss)) / max(1, trained * acc.num_processes)
    st.step_in_epoch, st.epoch_loss, st.skipped_in_epoch = 0, 0.0, 0
    st.epochs_started += 1
    return float(mean)


def train_step(run: Run, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Forward, soft-target loss, backward, clip, step. Every process has batch_size / W samples. Returns
    the loss on the device: reading it is a host sync, left to the steps that log it."""
    images, targets = images.to(run.acc.device), targets.to(run.acc.device)
    with run.acc.autocast():
        logits = run.model(images)
    loss = method.soft_cross_entropy(logits.float(), targets)
    run.acc.backward(loss)
    norm = numerics.grad_norm(run.acc, run.model, run.cfg.optim.grad_clip)
    if numerics.allows_step(norm):
        run.optimizer.step()
        run.scheduler.step()
    else:
        skip_step(run, float(loss), float(norm))
    run.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def skip_step(run: Run, loss: float, norm: float) -> None:
    """A non-finite gradient (alike on every process: DDP averaged it): no optimiser step, a warning, and
    the run ends once more than optim.max_nonfinite_steps such steps were skipped."""
    st, limit = run.state, run.cfg.optim.max_nonfinite_steps
    st.nonfinite_steps += 1
    st.skipped_in_epoch += 1
    run.log.say(f"step {st.step + 1}: non-finite loss {loss:.4g} or gradient norm {norm:.4g}: step skipped "
                f"({st.nonfinite_steps} of at most {limit})")
    error = numerics.too_many(st.nonfinite_steps, limit, st.step + 1)
    if error is not None:
        raise error


@torch.no_grad()
def predict(run: Run, shards, include: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """p(.|x) for every id in `include`, gathered on every process: ids [M], probs [M, K], gather stats."""
    net, acc = run.net, run.acc
    dist.broadcast_buffers(acc, net)
    net.eval()
    stream = run.loaders.exhaustive(shards, include, batch_size=run.cfg.run.eval_batch_size,
                                    rank=acc.process_index, world=acc.num_processes)
    ids_parts, prob_parts = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, NUM_CLASSES)]
    autocast = acc.autocast() if acc.device.type != "cpu" else nullcontext()
    with run.progress.task(name, total=None) as bar, autocast:
        for images, _labels, ids in stream:
            logits = net(images.to(acc.device)).float()
            prob_parts.append(torch.softmax(logits, dim=1).cpu())
            ids_parts.append(ids)
            bar.advance()
    tick = time.perf_counter()
    ids, probs, stats = dist.gather_with_stats(acc, torch.cat(ids_parts), torch.cat(prob_parts))
    expected = int(include.sum())
    if ids.numel() != expected:
        raise RuntimeError(f"{name}: gathered {ids.numel()} predictions for {expected} samples")
    return ids, probs, {"seconds": time.perf_counter() - tick, "bytes": stats.bytes}


def accuracy(run: Run, shards, mask: torch.Tensor, name: str) -> float:
    """Top-1 accuracy over the labelled ids in `mask`, identical on every process."""
    ids, probs, _ = predict(run, shards, mask, name)
    return float((probs.argmax(1) == run.data.labels[ids]).float().mean())


def validate(run: Run, kind: str, index: int, values: dict[str, Any]) -> bool:
    """Validation accuracy: recorded, and the model exported when it is the best so far (returned)."""
    st = run.state
    acc_val = accuracy(run, run.data.val_shards, run.data.val, "validate")
    improved = acc_val > st.best_acc
    if improved:
        st.best_acc = acc_val
        numerics.check_finite_weights(run.net, f"{run.dir / 'best'}")  # on every process: all raise alike
        # the labelled shards' alignment, side and channels: `fer-dist predict` makes faces the same way
        labelled = run.data.shardset.manifests[run.data.shardset.entries[0][0]]
        dist.main_agreed(run.acc, lambda: export_model(run.net, run.dir / "best",
                                                       preprocessing=preprocessing_of(labelled)))
    record = {"val/acc": acc_val, "val/best": st.best_acc, **values}
    st.history.append({"kind": kind, "index": index, **record})
    run.log.write(kind, st.step, {kind: index, **record})
    shown = {"train/loss": "loss", "unlabelled/confident": "confident", "unlabelled/drawn": "drawn",
             "labelled/reset": "alpha-reset"}
    run.log.say(f"{kind} {index}: val acc {acc_val:.4f} (best {st.best_acc:.4f})"
                + "".join(f", {name} {_number(values[k])}" for k, name in shown.items() if k in values))
    return improved


def _number(value: Any) -> str:
    """Counts as integers, other figures to four significant digits (log lines and the summary)."""
    return str(value) if isinstance(value, int) else f"{value:.4g}"


# ----------------------------------------------------------------------------------------------------------
# the two phases


def warmup(run: Run) -> None:
    """METHOD.md 2: supervised epochs on X_l until val accuracy stops improving or warmup_epochs."""
    m, st = run.cfg.method, run.state
    while st.epoch < m.warmup_epochs and st.bad_epochs < m.warmup_patience:
        loss = train_epoch(run, run.data.labelled, f"warm-up {st.epoch + 1}")
        st.epoch += 1
        improved = validate(run, "warmup", st.epoch, {"train/loss": loss})
        st.bad_epochs = 0 if improved else st.bad_epochs + 1
        save(run, f"warmup-{st.epoch:04d}", is_best=improved)
    st.phase = "rounds" if m.self_training and m.max_rounds > 0 else "done"
    if st.best_acc >= 0:
        # theta_0 is the best warm-up model, not the last one (which is `patience` epochs past it)
        load_best(run)
    save(run, f"warmup-{st.epoch:04d}")


def load_best(run: Run) -> None:
    """Every process loads `best/` and checks that they all hold the same weights."""
    run.net.load_state_dict(load_exported(run.dir / "best").state_dict())
    flat = torch.cat([p.detach().reshape(-1).cpu().float() for p in run.net.state_dict().values()])
    dist.check_same_everywhere(run.acc, flat, f"{run.dir / 'best'} as loaded")


def compose(run: Run) -> dict[str, Any]:
    """METHOD.md 3.1-3.4: predict all, gather, rewrite the one target table, draw the round's set."""
    m, data = run.cfg.method, run.data
    pool = data.labelled | data.unlabelled if m.use_unlabelled else data.labelled
    tick = time.perf_counter()
    ids, probs, gather = predict(run, data.train_shards, pool, "predict")
    t_predict = time.perf_counter() - tick - gather["seconds"]
    tick = time.perf_counter()
    stats = rewrite_and_draw(run, ids, probs)
    selection = stats.pop("selection")
    return {**stats, "time/predict": t_predict, "time/gather": gather["seconds"],
            "time/rewrite": time.perf_counter() - tick, "gather/bytes": gather["bytes"],
            "selection": selection}


def rewrite_and_draw(run: Run, ids: torch.Tensor, probs: torch.Tensor) -> dict[str, Any]:
    """METHOD.md 3.2-3.4 on the gathered predictions (ids [M] sorted, probs [M, K], alike on every process).

    Rewrites the target table's rows, draws the round's set into `state.include`, returns the round's stats.
    """
    m, st, data = run.cfg.method, run.state, run.data
    labels = data.method_labels()[ids]
    taus = method.class_thresholds(probs, labels, tau=m.tau, mode=m.threshold, floor=m.threshold_floor)
    rw = method.rewrite_targets(probs, labels, st.targets[ids], tau=m.tau if m.threshold == "fixed" else taus,
                                alpha=m.alpha if m.alpha_rule else None,
                                pseudo=pseudo_target_mode(m.pseudo_targets))
    # the labels X_u's shards carry (hidden from the method): how good the selection was, for the record
    quality = method.selection_quality(probs, torch.where(data.unlabelled[ids], data.labels[ids], -1),
                                       rw.confident)
    st.targets[ids] = rw.targets
    if run.cfg.run.debug:
        dist.check_same_everywhere(run.acc, st.targets, f"target table after round {st.round + 1}")
    confident = ids[rw.confident] if m.use_unlabelled else ids[:0]
    draw = method.compose_round(ids[labels >= 0], confident, fraction=m.replace_fraction,
                                seed=run.cfg.run.seed, round_index=st.round)
    include = data.labelled.clone()
    include[draw.removed] = False
    include[draw.added] = True
    st.include = include
    conf_probs = probs[rw.confident]
    mean_conf = float(conf_probs.max(1).values.mean()) if conf_probs.numel() else float("nan")
    added_classes = st.targets[draw.added].argmax(1)
    return {
        "unlabelled/confident": int(rw.confident.sum()),
        "unlabelled/drawn": int(draw.added.numel()),
        "unlabelled/class_hist": torch.bincount(added_classes, minlength=NUM_CLASSES).tolist(),
        "unlabelled/mean_conf": mean_conf,
        "unlabelled/thresholds": taus.tolist(),
        "unlabelled/confident_per_class": quality.count,
        "unlabelled/precision": quality.precision,
        "unlabelled/precision_per_class": quality.per_class(),
        "labelled/reset": int(rw.reset.sum()),
        "labelled/kept": int(rw.kept.sum()),
        "labelled/removed": int(draw.removed.numel()),
        "selection": {"confident": confident, "removed": draw.removed, "added": draw.added},
    }


def self_train(run: Run) -> None:
    """METHOD.md 3-4: rounds until the moving average of val accuracy falls, or max_rounds."""
    m, st = run.cfg.method, run.state
    while st.round < m.max_rounds:
        if st.include is None:  # not composed yet (a resume mid-round goes straight on training)
            st.round_stats = compose(run)
        tick = time.perf_counter()
        while st.round_epoch < m.epochs_per_round:
            e = st.round_epoch
            st.round_stats["train/loss"] = train_epoch(
                run, st.include, f"round {st.round + 1}" + (f".{e + 1}" if e else ""))
            st.round_epoch += 1
        st.round, st.round_epoch = st.round + 1, 0
        stats = dict(st.round_stats, **{"time/train": time.perf_counter() - tick})
        selection = stats.pop("selection")
        st.include, st.round_stats = None, {}
        improved = validate(run, "round", st.round, stats)
        st.history[-1]["selection"] = selection
        accs = [h["val/acc"] for h in st.history if h["kind"] == "round"]
        if st.rule_stop_round is None and method.should_stop(accs, m.stop_window):
            st.rule_stop_round = st.round
        if m.stop_rule == "moving_average" and st.rule_stop_round is not None:
            st.stop_reason = f"moving average of {m.stop_window} rounds fell"
            st.phase = "done"
        elif st.round >= m.max_rounds:
            st.stop_reason = f"max_rounds ({m.max_rounds})"
            st.phase = "done"
        save(run, f"round-{st.round:04d}", is_best=improved)
        if st.phase == "done":
            return
        if run.cfg.run.stop_after_rounds is not None and st.round >= run.cfg.run.stop_after_rounds:
            raise StopRun(f"stopped after round {st.round} (run.stop_after_rounds)")
    st.phase = "done"


def best_entry(history: list[dict[str, Any]], best_acc: float) -> dict[str, Any] | None:
    """The warm-up epoch or round whose model is `best/`: the first to reach the best accuracy."""
    return next((h for h in history if h["val/acc"] == best_acc), None)


def finish(run: Run) -> dict[str, Any]:
    """Test the best model; log the test record, write summary.json; returns the summary."""
    st = run.state
    if st.best_acc >= 0:
        load_best(run)
    test_acc = accuracy(run, run.data.test_shards, run.data.test, "test") if run.data.test.any() else None
    warm = [h["val/acc"] for h in st.history if h["kind"] == "warmup"]
    best = best_entry(st.history, st.best_acc)
    m = run.cfg.method
    summary = {
        "run": str(run.dir), "processes": run.acc.num_processes,
        "warmup_epochs": st.epoch, "warmup_best_val": round(max(warm), 4) if warm else None,
        # "patience": the paper's rule ended the warm-up; "cap": warmup_epochs did, the model still learning
        "warmup_end": "patience" if st.bad_epochs >= m.warmup_patience else "cap" if warm else None,
        "rounds": st.round, "stop_reason": st.stop_reason or "warm-up only",
        "rule_stop_round": st.rule_stop_round,
        "labelled_per_class": torch.bincount(run.data.labels[run.data.labelled],
                                             minlength=NUM_CLASSES).tolist(),
        "unlabelled_samples": int(run.data.unlabelled.sum()), "val_samples": int(run.data.val.sum()),
        "best": f"{best['kind']} {best['index']}" if best else None,
        "best_val": round(st.best_acc, 4), "best_model": str(run.dir / "best") if best else None,
        "test_acc_of_best": round(test_acc, 4) if test_acc is not None else None,
        "test_samples": int(run.data.test.sum()), "steps": st.step,
    }
    run.log.write("test", st.step, {"test/acc": test_acc, "test/samples": summary["test_samples"],
                                    "best": summary["best"]})
    if run.acc.is_main_process:
        write_text_atomic(run.dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        run.progress.summary(summary)
    return summary


def already_finished(run: Run) -> dict[str, Any]:
    """A finished run asked to run again: say so and how to start afresh, rather than test it again."""
    summary = json.loads((run.dir / "summary.json").read_text())
    # resuming cut metrics.jsonl back to the last checkpoint, which precedes the test: log it again
    run.log.write("test", run.state.step, {"test/acc": summary.get("test_acc_of_best"),
                                           "test/samples": summary.get("test_samples"),
                                           "best": summary.get("best")})
    run.log.say(f"{run.dir} has already finished ({summary.get('stop_reason')}): best {summary.get('best')}, "
                f"val {summary.get('best_val')}, test {summary.get('test_acc_of_best')}, model "
                f"{summary.get('best_model')}. To train it again from scratch: run.resume=never (replaces "
                "it), or another run.name=...")
    if run.acc.is_main_process:
        run.progress.summary(summary)
    return summary


def fit(run: Run) -> dict[str, Any]:
    """The whole run from wherever its state stands."""
    if run.state.phase == "done" and (run.dir / "summary.json").is_file():
        return already_finished(run)
    if run.state.phase == "warmup":
        warmup(run)
    if run.state.phase == "rounds":
        self_train(run)
    return finish(run)


# ----------------------------------------------------------------------------------------------------------
# entry point


def parse_args(argv: list[str] | None) -> tuple[Path | None, list[str]]:
    """`--config PATH` and `key=value` overrides; --help lists every config key."""
    p = argparse.ArgumentParser(prog="fer_dist.train", description=__doc__.split("\n")[0],
                                epilog=keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help="training config YAML (default: the synthetic quick start)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method.tau=0.8 or tau=0.8")
    args = p.parse_args(argv)
    return args.config, args.overrides


def main(argv: list[str] | None = None) -> int:
    """Parse, build, resume, fit, clean up; expected errors become one line and exit code 2."""
    stop = stopsignals.StopRequest()  # first: a stop asked for during the set-up is honoured at step one
    run = None
    try:
        config_path, overrides = parse_args(argv)
        cfg = load_config(config_path or QUICKSTART, overrides)
        if config_path is None and not overrides_name_data(overrides):
            ensure_synthetic_shards(Path(cfg.data.labelled[0].dir))
        acc = dist.make_accelerator(mixed_precision=cfg.run.mixed_precision,
                                    expected_processes=cfg.run.num_processes,
                                    timeout_s=cfg.run.collective_timeout_s)
        run = build_run(cfg, acc, stop)
        resume(run)
        fit(run)
        return 0
    except FerDistError as e:
        stopsignals.report_error(" ".join(str(e).split()))
        return 2
    except StopRun as e:
        return stopsignals.stopped(run, str(e)) if run is not None else 0
    finally:
        if run is not None:
            run.loaders.close()  # first: a pass an error left suspended would keep its workers
            run.log.close()
        dist.shutdown()
        stop.close()


if __name__ == "__main__":
    sys.exit(main())
