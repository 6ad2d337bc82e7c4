"""The only module that touches ranks: accelerator setup and checks, gather + dedupe, checksums, any_process
(on which the ranks agree to stop: the stop itself is `fer_dist.stopsignals`), the label pass split over
the ranks.

Every function that communicates is collective: all processes must call it, in the same order, with the
same arguments where noted. Failures found from gathered data are raised on every rank alike, so no
rank is left waiting in a collective that its peers abandoned.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from fer_dist.data.runset import (
    CheckedLabels,
    OnError,
    ShardSet,
    checked_labels,
    files_digest,
    launch_checked,
)
from fer_dist.errors import FerDistError

PAD_ID = -1
_MIXED_PRECISION = ("no", "bf16", "fp16")
PROCESS_COUNT_HINT = ("; launch that many (fer-dist train --processes N) or leave run.num_processes unset "
                      "to take the launcher's")


THREADS_ENV = "FER_DIST_CPU_THREADS"


def _launched_world_size() -> int | None:
    """The launcher's WORLD_SIZE (torchrun, accelerate launch), or None when it set none."""
    value = os.environ.get("WORLD_SIZE")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise FerDistError(f"WORLD_SIZE: {value!r} is not a number") from None


def make_accelerator(
    *, mixed_precision: str | None = "no", expected_processes: int | None = None,
    timeout_s: float | None = None, **kwargs: Any
) -> Accelerator:
    """An Accelerator that forms a real process group on CPU too, checked against the launch's size.

    `mixed_precision=None` leaves the choice to the launcher (`accelerate launch --mixed_precision` or its
    config file); an explicit value overrides the launcher. `timeout_s` bounds every collective (gloo and
    NCCL): a process whose peer died or hangs raises after it instead of waiting forever (torch's
    default is 30 minutes).
    """
    if timeout_s is not None:
        handlers = list(kwargs.pop("kwargs_handlers", []))
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s)))
        kwargs["kwargs_handlers"] = handlers
    if mixed_precision is None:
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed_precision not in _MIXED_PRECISION:
        choices = ", ".join(_MIXED_PRECISION)
        raise FerDistError(f"mixed_precision: expected one of {choices}, got {mixed_precision!r}")
    on_cpu = kwargs.get("cpu", False) or not torch.cuda.is_available()
    if on_cpu and mixed_precision == "fp16":
        raise FerDistError("mixed_precision: fp16 needs CUDA; use bf16 or no on a CPU run")
    launched = _launched_world_size()
    if launched is not None and expected_processes is not None and launched != expected_processes:
        # Refused before the process group forms: no rendezvous, nothing to tear down.
        raise FerDistError(f"process count: expected {expected_processes} processes (config) but the "
                           f"launcher started WORLD_SIZE={launched}{PROCESS_COUNT_HINT}")
    if on_cpu:
        # Without cpu=True, a multi-process launch on a machine without CUDA gives each process a
        # non-distributed Accelerator: N independent trainings that never exchange anything.
        kwargs["cpu"] = True
    accelerator = Accelerator(mixed_precision=mixed_precision, **kwargs)
    problem = None
    if launched is not None and launched != accelerator.num_processes:
        problem = (f"the launcher started WORLD_SIZE={launched} processes but the accelerator sees "
                   f"{accelerator.num_processes} ({accelerator.distributed_type})")
    elif expected_processes is not None and expected_processes != accelerator.num_processes:
        problem = (f"expected {expected_processes} processes (config) but the launch has "
                   f"{accelerator.num_processes}{PROCESS_COUNT_HINT}")
    if problem is not None:
        # Every rank reaches the same verdict from the same numbers without a collective: all exit alike.
        shutdown()
        raise FerDistError(f"process count: {problem}")
    if accelerator.device.type == "cpu":
        torch.set_num_threads(cpu_threads(accelerator.num_processes))
    return accelerator


def cpu_threads(processes: int) -> int:
    """Threads per process on the CPU: FER_DIST_CPU_THREADS where set, else each process's share of the
    cores (oversubscribed OpenMP threads made CPU steps ~15x slower; torchrun's OMP_NUM_THREADS=1 would
    leave a 1-process run on a many-core machine one core)."""
    value = os.environ.get(THREADS_ENV, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise FerDistError(f"{THREADS_ENV}: expected a whole number of threads, 1 or more, got {value!r}")
        return int(value)
    return max(1, (os.cpu_count() or 1) // processes)


def shutdown() -> None:
    """Destroy the process group if one is up (safe to call always, e.g. in a `finally`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class GatherStats(NamedTuple):
    """What one gather_predictions exchanged, for the trainer's log."""

    world: int  # processes
    n_max: int  # rows each process sent, padding included
    rows: int  # real rows received, duplicates included
    unique: int  # rows kept after dropping duplicate ids
    bytes: int  # bytes each process received


def gathered_bytes(n_max: int, num_classes: int, world: int) -> int:
    """Bytes each process receives gathering n_max padded rows of (int64 id, float32 probs[K]) per process."""
    size_exchange = 2 * 8 * world
    return size_exchange + world * n_max * (8 + 4 * num_classes)


def _gather_rows(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """All processes' tensors concatenated on dim 0 (all the same shape), in rank order, on the CPU."""
    return accelerator.gather(tensor.to(accelerator.device).contiguous()).cpu()


def _local_problem(ids: torch.Tensor, probs: torch.Tensor) -> str | None:
    """What is wrong with this process's (ids, probs), or None."""
    if ids.dim() != 1 or probs.dim() != 2 or probs.shape[0] != ids.shape[0]:
        return f"ids must be [n] and probs [n, K], got {tuple(ids.shape)} and {tuple(probs.shape)}"
    if ids.numel() and int(ids.min()) < 0:
        return "ids must be non-negative (-1 is the padding id)"
    return None


def gather_with_stats(
    accelerator: Accelerator, ids: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, GatherStats]:
    """gather_predictions, also returning what was exchanged (GatherStats)."""
    problem = _local_problem(ids, probs)
    world = accelerator.num_processes
    if world == 1 and problem is not None:
        raise ValueError(f"gather_predictions: {problem}")
    ids = ids.detach().to("cpu", torch.long).reshape(-1)
    probs = probs.detach().to("cpu", torch.float32)
    num_classes = probs.shape[-1] if probs.dim() else 0
    if world == 1:
        all_ids, all_probs, n_max = ids, probs, ids.numel()
    else:
        # sizes [world, 3]: (n, K, bad) of every rank, so all pad to one n_max and fail together.
        row = [ids.numel(), num_classes, int(problem is not None)]
        sizes = _gather_rows(accelerator, torch.tensor([row]))
        bad = [r for r, flag in enumerate(sizes[:, 2].tolist()) if flag]
        if bad:
            detail = f": {problem}" if problem else ""
            raise ValueError(f"gather_predictions: bad input on ranks {bad}{detail}")
        if len(set(sizes[:, 1].tolist())) > 1:
            raise ValueError(f"gather_predictions: processes disagree on K: {sizes[:, 1].tolist()}")
        n_max = int(sizes[:, 0].max())
        pad = n_max - ids.numel()
        padded_ids = torch.cat([ids, torch.full((pad,), PAD_ID, dtype=torch.long)])
        padded_probs = torch.cat([probs, torch.zeros(pad, num_classes)])
        if n_max == 0:
            all_ids, all_probs = padded_ids, padded_probs
        else:
            all_ids = _gather_rows(accelerator, padded_ids)
            all_probs = _gather_rows(accelerator, padded_probs)
        real = all_ids != PAD_ID
        all_ids, all_probs = all_ids[real], all_probs[real]
    # Stable sort keeps rank order among equal ids, so "first occurrence" is the lowest rank's row.
    order = torch.sort(all_ids, stable=True).indices
    sorted_ids = all_ids[order]
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    out_ids, out_probs = sorted_ids[first], all_probs[order][first]
    sent = gathered_bytes(n_max, num_classes, world) if world > 1 else 0
    return out_ids, out_probs, GatherStats(world, n_max, all_ids.numel(), out_ids.numel(), sent)


def gather_predictions(
    accelerator: Accelerator, ids: torch.Tensor, probs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every process's (ids [n], probs [n, K]) gathered, duplicates dropped, sorted by id: same on all ranks.

    n may differ between processes and be 0. Collective. Returns CPU tensors (int64 ids [M], float32
    probs [M, K]); for a duplicated id the row of the lowest rank (then the earliest row) is kept.
    """
    out_ids, out_probs, _ = gather_with_stats(accelerator, ids, probs)
    return out_ids, out_probs


def table_checksum(t: torch.Tensor) -> int:
    """A 63-bit checksum of a tensor's dtype, shape and exact bytes (sha256, so equal means bitwise equal)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}|{tuple(t.shape)}|".encode())
    if flat.numel():
        # view as bytes: .numpy() has no bfloat16.
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest()[:8], "big") >> 1


def check_same_everywhere(accelerator: Accelerator, value: torch.Tensor | int, what: str) -> None:
    """Raise RuntimeError on every rank, naming `what` and the ranks, unless all processes agree on value.

    Collective. Tensors are compared by table_checksum; ints by value.
    """
    if isinstance(value, torch.Tensor):
        code = table_checksum(value)
    elif -(2**63) <= int(value) < 2**63:
        code = int(value)
    else:
        code = int.from_bytes(hashlib.sha256(str(value).encode()).digest()[:8], "big") >> 1
    if accelerator.num_processes == 1:
        return
    codes = _gather_rows(accelerator, torch.tensor([code], dtype=torch.long)).tolist()
    if len(set(codes)) == 1:
        return
    groups: dict[int, list[int]] = {}
    for rank, c in enumerate(codes):
        groups.setdefault(c, []).append(rank)
    parts = "; ".join(f"ranks {','.join(map(str, ranks))} hold {c}" for c, ranks in groups.items())
    raise RuntimeError(f"{what} differs between processes: {parts}")


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process if any process passed True (collective: an all-reduce SUM of 0/1, any = sum > 0;
    a sum needs no MAX, which Accelerate's `reduce` lacks in some of the versions we accept)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def main_agreed(accelerator: Accelerator, write: Callable[[], Any]) -> None:
    """Run `write` on the main process and raise its error on every process: a full disk on the main one
    must not leave the others waiting at a barrier (collective; it is the barrier too)."""
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            write()
        except Exception as e:  # noqa: BLE001 - re-raised below, once the others are told
            error = e
    if any_process(accelerator, error is not None):
        raise error if error is not None else FerDistError("the main process failed to write (see its error)")


def all_sum(accelerator: Accelerator, value: float | torch.Tensor) -> torch.Tensor:
    """The sum over processes of a number or tensor (collective); a Python number becomes float64/int64."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
    else:
        # float64: the default float32 would round a global sample count above 2**24.
        t = torch.tensor(value, dtype=torch.int64 if isinstance(value, int) else torch.float64)
    t = t.to(accelerator.device)
    if accelerator.num_processes == 1:
        return t.clone()
    return accelerator.reduce(t, reduction="sum")


def broadcast_buffers(accelerator: Accelerator, module: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running stats).

    DDP copies them from rank 0 only at the start of a training forward; after it each rank has updated
    them from its own batch. A prediction pass on the unwrapped model must use one set everywhere, or the
    gathered table would mix several models' outputs.
    """
    if accelerator.num_processes == 1:
        return
    for buf in module.buffers():
        if buf.is_floating_point() or buf.dtype == torch.long:
            torch.distributed.broadcast(buf.data, src=0)


def gathered_texts(accelerator: Accelerator, texts: list[str]) -> list[str]:
    """Every process's `texts`, in rank order, on every process (collective).

    Text travels as UTF-8 bytes in a tensor: torch's all_gather_object would unpickle what it receives.
    """
    if accelerator.num_processes == 1:
        return list(texts)
    payload = torch.tensor(list("\0".join(texts).encode()), dtype=torch.uint8)
    sizes = _gather_rows(accelerator, torch.tensor([[len(texts), payload.numel()]]))
    width = max(1, int(sizes[:, 1].max()))  # a row of one byte: gloo gathers no empty tensor
    padded = torch.cat([payload, torch.zeros(width - payload.numel(), dtype=torch.uint8)])
    rows = _gather_rows(accelerator, padded[None])
    out: list[str] = []
    for (count, size), row in zip(sizes.tolist(), rows, strict=True):
        if count:
            out += bytes(row[:size].tolist()).decode().split("\0")
    return out


def label_pass(accelerator: Accelerator, shardset: ShardSet, on_error: OnError = "raise") -> CheckedLabels:
    """The label pass of a launch's processes (collective): the one `fer-dist train` made before starting
    them where every process finds it made over the files it sees (`runset.launch_checked`), else
    `runset.checked_labels` split over the processes and reduced: each process checks every world-th
    shard, so the ranks read each shard once together. A FerDistError found on any process is raised on
    all of them (the lowest rank's).

    Every process indexes every shard here, and all must see the same file versions (sizes and modification
    times): a process's streams then read, without checking again, the versions another process checked.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    trusted = launch_checked(shardset, on_error)
    if world == 1:
        return trusted if trusted is not None else checked_labels(shardset, on_error)
    if not any_process(accelerator, trusted is None):  # all processes found it: all take it, or none
        return trusted
    mine, digest, error = None, 0, None
    try:
        mine = checked_labels(shardset, on_error, part=(rank, world))
        digest = files_digest(shardset, on_error)
    except FerDistError as err:
        error = str(err)
    errors = gathered_texts(accelerator, [error] if error else [])
    if errors:
        raise FerDistError(errors[0])
    check_same_everywhere(accelerator, digest, "the shard files (sizes, modification times)")
    # One writer per id (the process that checked its shard): its label + 2 (1..8), 9 if damaged; 0 elsewhere.
    code = torch.where(mine.covered, mine.labels + 2 + 8 * mine.damaged.long(), 0).to(torch.int8)
    code = all_sum(accelerator, code).cpu()
    checked = (code >= 1) & (code <= 8)
    labels = torch.where(checked, code.long() - 2, torch.full_like(code, -1, dtype=torch.long))
    return CheckedLabels(labels, code == 9, checked | (code == 9), gathered_texts(accelerator, mine.problems))
