"""`python -m fer_dist.launch [accelerate launch options] -m fer_dist.train ...`: `accelerate launch` with
clean stops and one-line errors (what `fer-dist train` and the SLURM scripts run), and that command's options
(`launcher_args`, checked by `fer_dist.prechecks`).

It runs Accelerate's public CLI in a child process (`python -m fer_dist.launch --accelerate-child ...`,
which runs it as `python -m accelerate.commands.launch ...` would: `child`), and adds:
- Stops. The child starts in a session of its own with SIGTERM, SIGUSR1 and SIGINT blocked, a mask its
  descendants inherit: torch's elastic agent never takes them (it would turn SIGTERM or SIGINT into a
  traceback and die of SIGUSR1), and a rank holds them until its `StopRequest` unblocks them (a request
  made while it imports is honoured at its first step). This process takes them and sends each on to the
  ranks (the agent's children); a second SIGINT kills the whole tree at once. A SIGHUP goes to the agent.
- One-line errors. A rank's expected error (config, data) is written by the rank itself into the folder
  `FER_DIST_STATUS_DIR` names (`stopsignals.report_error`); the lowest rank's is printed once with its
  code. A rank killed or crashed writes nothing: the child catches its launcher's failure (torch's
  `ChildFailedError`, which names the first failed rank and its exit code; the one-process launcher's
  `CalledProcessError`; a failed rendezvous) and writes it there as one line instead of a traceback and a
  table. The ranks' own output, tracebacks included, goes straight to this process's stdout and stderr.

Exit codes: 0 when the ranks finished or stopped with a checkpoint after SIGTERM/SIGUSR1; 130 after SIGINT
(checkpointed once, at once the second time); 2 for a config or data error; a failing rank's code (128 + N
when signal N killed it) otherwise; 1 for a failed rendezvous. A SLURM requeue is the batch script's
(`fer_dist.slurm`), once srun has returned. Nothing here imports the trainer, nor the trainer this.
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
from pathlib import Path
from types import FrameType

from fer_dist.config import TrainConfig, read_yaml
from fer_dist.launchenv import CHECKED_ENV, ERRORS_ENV
from fer_dist.prechecks import check_processes, check_world
from fer_dist.stopsignals import STOP_SIGNALS

CHECKED_PREFIX = "fer-dist-labels-"  # `fer-dist train`'s label pass for the ranks (runset.launch_checked)

CHILD = "--accelerate-child"  # `python -m fer_dist.launch CHILD ARGS`: the child, `accelerate launch ARGS`
LAUNCHER_FILE = "launcher.json"  # the child's record of its launcher's failure, beside the ranks' ones


class _Interrupted(Exception):
    """Raised by the second SIGINT: leave the launch at once."""


class _Forwarder:
    """This process's stop-signal handlers: each signal goes on to the ranks, the child's children."""

    def __init__(self, child: subprocess.Popen) -> None:
        self.child = child
        self.first: signal.Signals | None = None
        self.interrupts = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (*STOP_SIGNALS, signal.SIGHUP)}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGHUP:  # the terminal is gone: torch's agent (SIGHUP is not masked) ends the ranks
            self.child.send_signal(sig)
            return
        self.first = self.first or sig
        self.interrupts += sig == signal.SIGINT
        if self.interrupts > 1:
            self._send(signal.SIGKILL, everything=True)
            raise _Interrupted()
        print(f"fer-dist launch: {sig.name}: asking the ranks to checkpoint and stop", file=sys.stderr,
              flush=True)
        self._send(sig)

    def _send(self, sig: signal.Signals, everything: bool = False) -> None:
        import psutil  # an Accelerate dependency, loaded by `run` before the handlers

        with contextlib.suppress(psutil.NoSuchProcess):
            top = psutil.Process(self.child.pid)
            for proc in [top, *top.children(recursive=True)] if everything else top.children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(sig)

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def child(argv: list[str]) -> None:
    """The launch's child process (`python -m fer_dist.launch CHILD ARGS`): `accelerate launch ARGS`, run as
    `python -m accelerate.commands.launch ARGS` runs it. Where its launcher fails, the failure is one line in
    FER_DIST_STATUS_DIR/launcher.json and the exit code, not a traceback: a rank that failed (torch's
    `ChildFailedError` names the first one and its exit code; with one process, Accelerate's
    `CalledProcessError`) or a rendezvous that failed. Other errors keep their traceback."""
    import runpy

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    sys.argv[1:] = argv
    try:
        runpy.run_module("accelerate.commands.launch", run_name="__main__", alter_sys=True)
        return
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        code, message = _rank_ended(rank, failure.exitcode)
    except subprocess.CalledProcessError as error:  # Accelerate's one-process launcher
        code, message = _rank_ended(0, error.returncode)
    except Exception as error:
        if not type(error).__module__.startswith("torch.distributed.elastic"):
            raise
        code, message = 1, _elastic_failure(error, argv)
    (Path(os.environ[ERRORS_ENV]) / LAUNCHER_FILE).write_text(json.dumps({"code": code, "message": message}))
    sys.exit(code)


def _rank_ended(rank: int, exitcode: int) -> tuple[int, str]:
    """(exit code, line) for a rank that ended with `exitcode` (-N: killed by signal N)."""
    code, how = (128 - exitcode, f"was killed by {signal.Signals(-exitcode).name}") if exitcode < 0 else \
        (exitcode or 1, f"exited with code {exitcode}")
    return code, f"rank {rank} {how} (its own output is above)"


def _elastic_failure(error: Exception, argv: list[str]) -> str:
    """The line for an error of torch's elastic agent: a rendezvous that failed, where it was hosted."""
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousError

    if not isinstance(error, RendezvousError):
        return f"{type(error).__name__}: {error}"
    option = dict(zip(argv, argv[1:], strict=False))
    where = f"{option.get('--main_process_ip', '127.0.0.1')}:{option.get('--main_process_port', '29500')}"
    why = (f"cannot reach the rendezvous store at {where}, which the first node's launcher hosts (has it "
           "ended? is the address right?)" if isinstance(error, RendezvousConnectionError)
           else f"the rendezvous at {where} failed: {error}")
    return f"{why}; this node's ranks were stopped"


def _reported(status: Path) -> tuple[int, str] | None:
    """The lowest rank's reported error, else the launcher's failure (code, message); None if neither."""
    found = []
    for path in status.glob("*.json"):
        with contextlib.suppress(ValueError, OSError, KeyError):  # a rank killed while writing it
            record = json.loads(path.read_text())
            order = sys.maxsize if path.name == LAUNCHER_FILE else int(path.stem.removeprefix("rank-"))
            found.append((order, int(record["code"]), str(record["message"])))
    return min(found)[1:] if found else None


def checked_file() -> Path:
    """A new temporary file for `fer-dist train`'s label pass, which the launch it starts removes."""
    fd, path = tempfile.mkstemp(prefix=CHECKED_PREFIX, suffix=".npz")
    os.close(fd)
    return Path(path)


def _remove_checked() -> None:
    """Remove the label pass `fer-dist train` left for this launch: only a file `checked_file` made."""
    tmp = Path(os.environ.get(CHECKED_ENV) or ".")
    if tmp.parent == Path(tempfile.gettempdir()) and tmp.name.startswith(CHECKED_PREFIX):
        tmp.unlink(missing_ok=True)


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when this process ends (Linux's PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not Linux: the child outlives a killed launcher
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG


def run(argv: list[str]) -> int:
    """Run `accelerate launch` with `argv` (its options, the script, its arguments); returns the exit code."""
    import psutil  # noqa: F401 - loaded before the handlers: imported inside one, a second signal met it half-done

    status = Path(tempfile.mkdtemp(prefix="fer-dist-status-"))
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # held until the handlers are in place
    try:
        # its own session keeps the terminal's Ctrl-C ours; killed with this process (no thread runs yet),
        # so that ranks whose launcher is gone checkpoint and stop as they do under a bare launcher
        child = subprocess.Popen([sys.executable, "-m", "fer_dist.launch", CHILD, *argv],
                                 env={**os.environ, ERRORS_ENV: str(status)}, start_new_session=True,
                                 preexec_fn=_die_with_parent)
        stops = _Forwarder(child)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    try:
        code = child.wait()
        reported = _reported(status)
    except _Interrupted:
        child.wait()
        print("fer-dist launch: interrupted again: ranks killed, no new checkpoint", file=sys.stderr,
              flush=True)
        return 130
    finally:
        stops.close()
        shutil.rmtree(status, ignore_errors=True)
        _remove_checked()
    if reported is not None:
        code, message = reported
    elif code == 0:
        return 130 if stops.first == signal.SIGINT else 0
    else:
        code, message = (128 - code if code < 0 else code), f"accelerate launch exited with code {code}"
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


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
    if sys.argv[1:2] == [CHILD]:
        child(sys.argv[2:])
    else:
        sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
