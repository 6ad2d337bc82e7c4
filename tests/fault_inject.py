"""`python tests/fault_inject.py [trainer args]`: the trainer with one fault injected, named by environment.

FER_DIST_FAULT=<kind>[:<arg>] and FER_DIST_FAULT_RANK=<global rank> (default 0) choose it:
  kill-at-step:N         SIGKILL this rank at its N-th training step (mid-epoch)
  stop-at-step:N         SIGSTOP this rank at its N-th training step: alive but hung, as a stuck GPU or NFS
  kill-in-gather:N       SIGKILL this rank as it enters its N-th prediction gather (mid-gather)
  kill-in-save:TAG       SIGKILL this rank as it enters the save of checkpoint TAG (mid-checkpoint)
  kill-before-rename:TAG SIGKILL once checkpoints/.tmp-TAG is fully written, just before its rename
  kill-mid-state:TAG     write half of TAG's state.pt, then SIGKILL (a torn file in .tmp-TAG)
  fill-before-save:TAG   fill the run folder's filesystem (a file of zeros up to ENOSPC), then save TAG
  fill-before-export     the same before the first export of the best model
  nan-at-steps:A,B,...   the loss of these training steps (1-based, counted per process) is NaN
  val-accs:A,B,...       the validation accuracies of the first validations (warm-up epochs, then rounds)
The process really dies (SIGKILL: no handler, no finally) or really computes a NaN; only the moment is
chosen here. Runs as a script so `accelerate launch tests/fault_inject.py ...` injects into every rank.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fer_dist import checkpoint_files as checkpoint  # noqa: E402
from fer_dist import dist, method, train  # noqa: E402


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def fill(directory: Path) -> None:
    """Write zeros into `directory` until its filesystem is full: what the next write will meet."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError:
            pass


def install(kind: str, arg: str) -> None:
    if kind in ("kill-at-step", "stop-at-step", "nan-at-steps"):
        steps = {int(a) for a in arg.split(",")}
        loss_fn, calls = method.soft_cross_entropy, [0]

        def counted(*args, **kwargs):
            calls[0] += 1
            loss = loss_fn(*args, **kwargs)
            if calls[0] in steps:
                if kind == "kill-at-step":
                    die()
                if kind == "stop-at-step":
                    os.kill(os.getpid(), signal.SIGSTOP)
                return loss * float("nan")
            return loss

        method.soft_cross_entropy = counted
    elif kind == "kill-in-gather":
        gather, calls = dist.gather_with_stats, [0]

        def gathering(*args, **kwargs):
            calls[0] += 1
            if calls[0] == int(arg or 1):
                die()
            return gather(*args, **kwargs)

        dist.gather_with_stats = gathering
    elif kind == "kill-in-save":
        save = checkpoint.save_checkpoint
        checkpoint.save_checkpoint = lambda acc, run_dir, tag, *a, **k: (
            die() if tag == arg else save(acc, run_dir, tag, *a, **k))
    elif kind == "fill-before-save":
        save = checkpoint.save_checkpoint

        def filled(acc, run_dir, tag, *a, **k):
            if tag == arg:
                fill(Path(run_dir).parent)
            return save(acc, run_dir, tag, *a, **k)

        checkpoint.save_checkpoint = filled
    elif kind == "fill-before-export":
        export = train.export_model

        def filled_export(net, out, *a, **k):
            fill(Path(out).parent.parent)
            return export(net, out, *a, **k)

        train.export_model = filled_export
    elif kind == "kill-before-rename":
        rename = os.rename

        def renaming(src, dst, *a, **k):
            if Path(src).name == f"{checkpoint.TMP}{arg}":
                die()
            return rename(src, dst, *a, **k)

        os.rename = renaming
    elif kind == "kill-mid-state":
        save = torch.save

        def torn(obj, f, *a, **k):
            name = getattr(f, "name", "")
            if isinstance(name, str) and name.endswith(f"{checkpoint.TMP}{arg}/{checkpoint.STATE}"):
                buf = io.BytesIO()
                save(obj, buf, *a, **k)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                die()
            return save(obj, f, *a, **k)

        torch.save = torn
    elif kind == "val-accs":  # not a fault: values that make the stopping rule's decision known
        scripted, measure = [float(a) for a in arg.split(",")], train.accuracy

        def scripted_accuracy(run, shards, mask, name):
            real = measure(run, shards, mask, name)  # the collectives still happen, in the same order
            return scripted.pop(0) if name == "validate" and scripted else real

        train.accuracy = scripted_accuracy
    else:
        raise SystemExit(f"fault_inject: unknown fault {kind!r}")


if __name__ == "__main__":
    fault = os.environ.get("FER_DIST_FAULT", "")
    if fault and int(os.environ.get("RANK", "0")) == int(os.environ.get("FER_DIST_FAULT_RANK", "0")):
        kind, _, arg = fault.partition(":")
        install(kind, arg)
    sys.exit(train.main(sys.argv[1:]))
