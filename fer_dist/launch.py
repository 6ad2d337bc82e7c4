"""`python -m fer_dist.launch [accelerate launch options] -m fer_dist.train ...`: Accelerate's launcher with
clean stops and one-line errors.

It is `accelerate launch` itself (Accelerate's own `launch_command`, in this process), with four changes:
- Stop signals (SIGTERM, SIGUSR1, SIGINT) are forwarded to the ranks as stop requests, and the launcher
  is not torn down by them: torch's elastic agent would turn SIGTERM or SIGINT into a `SignalException`
  traceback and exit 1, and it has no handler at all for SIGUSR1 (the default kills it). The agent is told to
  handle only SIGHUP and SIGQUIT (torchrun's `PET_SIGNALS_TO_HANDLE`), so these stay ours.
- A second SIGINT kills the ranks at once.
- A failed launch prints one line: the error a rank reported through the status directory
  (`FER_DIST_STATUS_DIR`, one JSON file per rank), or which rank failed with which code; never torch's
  `ChildFailedError` traceback. The exit code is the rank's (2 for a config or data error). A failed
  rendezvous is one line too.
- A SLURM requeue the main rank asks for (`requeue`) is done here, once the ranks of every node have ended.

Exit codes: 0 when the ranks finished or stopped with a checkpoint after SIGTERM/SIGUSR1; 130 after SIGINT
(checkpointed once, at once the second time); a failing rank's code otherwise. `fer-dist train` checks the
config first and then runs this module; the SLURM scripts run it on every node.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from fer_dist.config import TrainConfig, read_yaml
from fer_dist.errors import FerDistError
from fer_dist.files import write_text_atomic

STATUS_ENV = "FER_DIST_STATUS_DIR"
REQUEUE_REQUEST = "requeue.json"  # in the status directory: the main rank asks its launcher to requeue
# The launcher's agent keeps these (their default kills the ranks, which is what a hang-up should do).
AGENT_SIGNALS = "SIGHUP,SIGQUIT"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def launch_rank() -> int:
    """This process's global rank as its launcher set it (0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def report_error(message: str, code: int = 2) -> None:
    """A rank's one-line error: to the launcher's status directory under this module, else printed by rank 0.

    Every rank reaches a config or data error alike; printed by each, a 2-process launch shows it twice.
    """
    status = os.environ.get(STATUS_ENV)
    if status and Path(status).is_dir():
        path = Path(status) / f"rank-{launch_rank()}.json"
        path.write_text(json.dumps({"outcome": "error", "code": code, "message": message}))
    elif launch_rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)


def stopped(run: Any, message: str) -> int:
    """A rank's end after a stop request (its checkpoint is written): say so; returns the exit code.

    Under a launcher a stopped rank exits 0 (anything else would make the launcher's agent call it a
    failure); the launcher returns 130 for a Ctrl-C. Standalone, a Ctrl-C'd run returns 130 itself.
    """
    run.log.say(f"{message}; the same command resumes from its checkpoint (run.resume=auto)")
    return 130 if run.stop.signal_name == "SIGINT" and "LOCAL_RANK" not in os.environ else 0


def requeue_due(run: Any) -> bool:
    """Whether this process should requeue its SLURM job: the main process, stopped by the time-limit
    warning (SIGUSR1) inside a job. Done last (`requeue`): the requeue ends every process of the job."""
    from fer_dist import slurm

    return run.stop.signal_name == "SIGUSR1" and slurm.job_id() is not None and run.acc.is_main_process


def requeue(run: Any) -> None:
    """Requeue the job (counted and limited in the run directory) and say what happened.

    A requeue ends every process of the job at once. Under this module's launcher the main rank only asks
    for it (a file in the status directory) and the launcher requeues once its agent has passed the exit
    barrier, that is once the ranks of every node have ended. Requeued by the rank, the job lost the head
    node's launcher, which hosts the c10d rendezvous store, while another node's launcher still watched its
    ranks end; that launcher then failed on the store with a traceback."""
    request = {"run_dir": str(run.dir), "step": run.state.step, "limit": run.cfg.run.max_requeues}
    status = os.environ.get(STATUS_ENV)
    if status and Path(status).is_dir():
        write_text_atomic(Path(status) / REQUEUE_REQUEST, json.dumps(request))
    else:
        _requeue(request)


def _requeue(request: dict[str, Any]) -> None:
    from fer_dist import slurm

    line = slurm.requeue(Path(request["run_dir"]), step=int(request["step"]), limit=int(request["limit"]))
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


class _Interrupted(Exception):
    """Raised by the second SIGINT: leave the launch at once."""


class _Forwarder:
    """The launcher's stop-signal handlers: each signal goes on to the ranks (this process's children)."""

    def __init__(self) -> None:
        self.first: signal.Signals | None = None
        self.interrupts = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        self.first = self.first or sig
        if sig == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                self._send(signal.SIGKILL)
                raise _Interrupted()
        print(f"fer-dist launch: {signal.Signals(signum).name}: asking the ranks to checkpoint and stop",
              file=sys.stderr, flush=True)
        self._send(sig)

    @staticmethod
    def _send(sig: signal.Signals) -> None:
        import psutil  # an Accelerate dependency

        group = os.getpgrp()
        for child in psutil.Process().children():
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
                # A rank in this process group got the terminal's Ctrl-C already: SIGUSR1 is the same
                # request and never counts as a second Ctrl-C there. Torch's agent starts its ranks in
                # sessions of their own, which the terminal's SIGINT does not reach: they get the SIGINT,
                # so they stop saying so (and a SLURM job is not requeued for a Ctrl-C).
                same = os.getpgid(child.pid) == group
                child.send_signal(signal.SIGUSR1 if sig == signal.SIGINT and same else sig)

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def exit_code(self, ranks_code: int) -> int:
        """130 after a Ctrl-C, else the ranks' code."""
        return 130 if self.first == signal.SIGINT else ranks_code


def _reported(status: Path) -> tuple[int, str] | None:
    """The lowest rank's reported error (code, message), or None."""
    found = []
    for path in status.glob("rank-*.json"):
        try:
            rank = int(path.stem.removeprefix("rank-"))
            record = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
        found.append((rank, int(record["code"]), str(record["message"])))
    if not found:
        return None
    rank, code, message = min(found)
    return code, message


def _failure_code(exc: BaseException, status: Path) -> int:
    """One line for a failed launch; the exit code to return."""
    reported = _reported(status)
    if reported is not None:
        code, message = reported
        print(f"error: {message}", file=sys.stderr, flush=True)
        return code
    rank, code = _first_failure(exc)
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    print(f"error: rank {rank} {how} (its own output is above)", file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code or 1


def _first_failure(exc: BaseException) -> tuple[int, int]:
    """(rank, exit code; negative: killed by that signal) of the first failed rank."""
    if isinstance(exc, subprocess.CalledProcessError):
        return 0, exc.returncode
    rank, failure = exc.get_first_failure()  # ChildFailedError: (global rank, ProcessFailure)
    return rank, failure.exitcode


def run(argv: list[str]) -> int:
    """Run Accelerate's launcher with `argv` (the arguments of `accelerate launch`); returns the exit code."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousError

    args = launch_command_parser().parse_args(argv)
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", AGENT_SIGNALS)
    status = Path(tempfile.mkdtemp(prefix="fer-dist-status-"))
    os.environ[STATUS_ENV] = str(status)
    import psutil  # noqa: F401 - loaded before the handlers: imported inside one, a second signal met it half-done
    forwarder = _Forwarder()
    try:
        launch_command(args)
        return forwarder.exit_code(0)
    except _Interrupted:
        print("fer-dist launch: interrupted again: ranks killed, no new checkpoint", file=sys.stderr)
        return 130
    except (ChildFailedError, subprocess.CalledProcessError) as exc:
        if forwarder.first and _reported(status) is None and _all_stopped(exc):
            return forwarder.exit_code(0)
        return _failure_code(exc, status)
    except RendezvousError as exc:  # a node that never joined, or the head node's launcher gone
        where = f"{args.main_process_ip or '127.0.0.1'}:{args.main_process_port}"
        why = (f"cannot reach the rendezvous store at {where}, which the first node's launcher hosts (has it "
               "ended? is the address right?)" if isinstance(exc, RendezvousConnectionError)
               else f"the rendezvous at {where} failed: {exc}")
        print(f"error: {why}; this node's ranks were stopped", file=sys.stderr, flush=True)
        return 1
    finally:
        forwarder.close()
        asked = status / REQUEUE_REQUEST
        request = json.loads(asked.read_text()) if asked.exists() else None
        shutil.rmtree(status, ignore_errors=True)
        if request is not None:
            _requeue(request)  # last: it ends this process too


def _all_stopped(exc: BaseException) -> bool:
    """Whether a stop request explains every failed rank: a standalone rank returns 130 after a Ctrl-C, and a
    rank still importing its modules has no handler yet, so the forwarded signal ends it (nothing trained)."""
    codes = [exc.returncode] if isinstance(exc, subprocess.CalledProcessError) else [
        f.exitcode for f in exc.failures.values()]
    stop_codes = {130, *(-int(sig) for sig in STOP_SIGNALS)}
    if all(code in stop_codes for code in codes):
        if any(code != 130 for code in codes):
            print("fer-dist launch: a rank was ended by the stop signal itself, while starting or after its "
                  "checkpoint: no trained step is lost", file=sys.stderr, flush=True)
        return True
    return False


def check_training(config: Path | None, overrides: list[str], *, dry_run: bool = False) -> TrainConfig:
    """Everything a launch would refuse, found in this one process: the config, the overrides, every shard
    folder (manifests and labels), a resume path, a weights file. Raises FerDistError; writes nothing but
    the quick start's synthetic shards where they are missing (as the trainer would; a dry run leaves them
    missing and unchecked). `launcher_args` adds the checks that depend on the number of processes."""
    from fer_dist.config import load_config, overrides_name_data
    from fer_dist.quickstart import QUICKSTART, ensure_synthetic_shards

    # a bad config or key is answered before torch loads
    cfg = load_config(config if config is not None else QUICKSTART, overrides)
    from fer_dist.data.runset import load_run_data

    if config is None and not overrides_name_data(overrides):
        shards = Path(cfg.data.labelled[0].dir)
        if dry_run and not (shards / "manifest.json").exists():
            return cfg
        ensure_synthetic_shards(shards)
    if cfg.model.weights is not None and not Path(cfg.model.weights).exists():
        raise FerDistError(f"model.weights: {cfg.model.weights} does not exist")
    if cfg.run.resume not in ("auto", "never"):
        check_resume(Path(cfg.run.resume))
    load_run_data(cfg.data, cfg.run.seed)  # the subsets (data.*.share) the ranks will draw
    return cfg


def check_resume(path: Path) -> None:
    """`run.resume` names a checkpoint folder (`runs/<name>/checkpoints/<tag>`) whose meta.json reads."""
    from fer_dist.checkpoint_files import META, STATE

    where = "a checkpoint folder, runs/<name>/checkpoints/<tag>"
    if not path.exists():
        raise FerDistError(f"run.resume: {path} does not exist (name {where}, or auto)")
    if not path.is_dir():
        hint = f"; name its folder, {path.parent}" if path.name == STATE else ""
        raise FerDistError(f"run.resume: {path} is a file, not {where}{hint}")
    if not (path / STATE).is_file() or not (path / META).is_file():
        raise FerDistError(f"run.resume: {path} is not {where} (it has no {STATE} and {META})")
    try:
        json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise FerDistError(f"run.resume: {path / META} is not a readable checkpoint meta file") from None


def check_processes(processes: int | None, accelerate_config: Path | None) -> None:
    """The launch options alone, checked before anything is loaded."""
    if processes is not None and accelerate_config is not None:
        raise FerDistError("--processes and --accelerate-config: give one of them")
    if processes is not None and processes < 1:
        raise FerDistError(f"--processes: expected 1 or more, got {processes}")


def check_world(cfg: TrainConfig, count: int, *, cpu: bool) -> None:
    """What the ranks would refuse once started, given `count` processes (on CPUs when `cpu`)."""
    wanted = cfg.run.num_processes
    if wanted is not None and wanted != count:
        raise FerDistError(f"run.num_processes: the config asks for {wanted} processes but the launch would "
                           f"start {count}; launch {wanted} or leave run.num_processes unset")
    if cfg.optim.batch_size % count:
        raise FerDistError(f"optim.batch_size: {cfg.optim.batch_size} does not split evenly over {count} "
                           f"processes (each takes batch_size / {count}); use a multiple of {count}")
    if cfg.model.sync_bn and count > 1 and cpu:
        raise FerDistError("model.sync_bn: SyncBatchNorm needs GPUs; this run is on the CPU (set false)")


def launcher_args(cfg: TrainConfig, processes: int | None, accelerate_config: Path | None) -> list[str]:
    """The `accelerate launch` options for this run, checked against the config (`check_world`)."""
    check_processes(processes, accelerate_config)
    if accelerate_config is not None:
        launch = read_yaml(accelerate_config)
        count = int(launch.get("num_processes", 1))
        args = ["--config_file", str(accelerate_config)]
        if int(launch.get("num_machines", 1)) == 1 and "main_process_port" not in launch:
            args += ["--main_process_port", str(free_port())]
        cpu = bool(launch.get("use_cpu")) or launch.get("distributed_type") == "MULTI_CPU" or not _gpu_count()
    else:
        gpus = _gpu_count() if processes is None and cfg.run.num_processes is None else None
        count = processes if processes is not None else cfg.run.num_processes or gpus or 1
        # the values Accelerate would otherwise warn about taking defaults for
        args = ["--num_processes", str(count), "--num_machines", "1", "--dynamo_backend", "no",
                "--mixed_precision", cfg.run.mixed_precision or "no"]
        # the multi-GPU launcher also starts N CPU ranks where there is no GPU (the trainer makes them gloo)
        args += ["--multi_gpu", "--main_process_port", str(free_port())] if count > 1 else []
        cpu = not (gpus if gpus is not None else _gpu_count())
    check_world(cfg, count, cpu=cpu)
    return args


def train_command(launch_args: list[str], train_args: list[str]) -> list[str]:
    """The command `fer-dist train` runs: this module's launcher with the trainer's arguments."""
    return [sys.executable, "-m", "fer_dist.launch", *launch_args, "-m", "fer_dist.train", *train_args]


def free_port() -> int:
    """A TCP port free on this machine now, for a one-machine launch's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main() -> None:
    """Entry point of `python -m fer_dist.launch`."""
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
