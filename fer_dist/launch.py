"""`python -m fer_dist.launch [accelerate launch options] -m fer_dist.train ...`: `accelerate launch` with
clean stops and one-line errors (what `fer-dist train` and the SLURM scripts run), and that command's options
(`launcher_args`, checked by `fer_dist.prechecks`).

It runs Accelerate's public CLI as a child, `python -m accelerate.commands.launch ...`, and adds:
- Stops. The child starts in a session of its own with SIGTERM, SIGUSR1 and SIGINT blocked, a mask its
  descendants inherit: torch's elastic agent never takes them (it would turn SIGTERM or SIGINT into a
  traceback and die of SIGUSR1), and a rank holds them until its `StopRequest` unblocks them (a request
  made while it imports is honoured at its first step). This process takes them and sends each on to the
  ranks (the agent's children); a second SIGINT kills the whole tree at once. A SIGHUP goes to the agent.
- One-line errors, from two sources. A rank's expected error (config, data) is written by the rank itself
  into the folder `FER_DIST_STATUS_DIR` names (`stopsignals.report_error`): the lowest rank's is printed
  once with its code. A killed or crashed rank writes nothing: only torch's report names it, so the
  child's stderr passes through this process, which holds back the launcher's own report at its end
  (torch's `ChildFailedError` table of failed ranks, a traceback ending in a `torch.distributed.elastic`
  error such as a failed rendezvous) and reads the first failed rank and its exit code from it: "error:
  rank 1 was killed by SIGKILL". The ranks' own output, tracebacks included, passes as written. Where this
  process's stderr is a terminal the ranks are told so (`TTY_COMPATIBLE`, `COLUMNS`: rich's progress
  bars). With one process, Accelerate's simple launcher names its rank's end in a `CalledProcessError`.

Exit codes: 0 when the ranks finished or stopped with a checkpoint after SIGTERM/SIGUSR1; 130 after SIGINT
(checkpointed once, at once the second time); 2 for a config or data error; a failing rank's code (128 + N
when signal N killed it) otherwise; 1 for a failed rendezvous. A SLURM requeue is the batch script's
(`fer_dist.slurm`), once srun has returned. Nothing here imports the trainer, nor the trainer this.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from fer_dist.config import TrainConfig, read_yaml
from fer_dist.prechecks import check_processes, check_world
from fer_dist.stopsignals import ERRORS_ENV, STOP_SIGNALS

TRACEBACK = b"Traceback (most recent call last):"
# Accelerate's one-process launcher raises CalledProcessError from RuntimeError(its rank's stderr tail): that
# cause, shown again, opens with this word and no traceback
CAUSE = b"RuntimeError"
# final exceptions of the launcher's own traceback (the ranks' own tracebacks pass through)
LAUNCHER_ERRORS = (b"torch.distributed.elastic.", b"subprocess.CalledProcessError")
BURST_S = 1.0  # the launcher prints its traceback at once when it exits; a rank's is shown after this


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


class _Relay:
    """The child's stderr, passed on as it comes, but for the launcher's own report, kept in `report`.

    From a line that opens a traceback or a table, lines are held for `BURST_S` (the launcher prints its
    report at once, as it exits), then split into segments: a traceback whose exception is the launcher's,
    with the causes chained to it, and torch's table of failed ranks are dropped; the rest is shown as
    written. A line's start is shown before its end (progress bars) unless it may open a segment."""

    def __init__(self) -> None:
        self.out = sys.stderr.buffer
        self.line = b""  # the line being read
        self.shown = False  # its start is written already
        self.held: list[bytes] = []
        self.since = 0.0
        self.report: list[str] = []

    def feed(self, data: bytes) -> None:
        *ended, tail = data.split(b"\n")
        for part in ended:
            line, self.line = self.line + part + b"\n", b""
            if self.shown or not (self.held or _opens(line)):
                self.out.write(line)
            else:
                self.since = self.since if self.held else time.monotonic()
                self.held.append(line)
            self.shown = False
        self.line += tail
        if self.line and not self.held and (self.shown or not _opens(self.line, partial=True)):
            self.out.write(self.line)
            self.line, self.shown = b"", True
        self.settle()

    def settle(self, end: bool = False) -> None:
        """Decide on held lines once their burst is over (or at the end)."""
        if self.held and (end or time.monotonic() - self.since > BURST_S):
            segments = _segments(self.held)
            for k in range(len(segments) - 2, -1, -1):  # a cause chained to the launcher's exception
                lines, _ = segments[k]
                chained = next((ln for ln in reversed(lines) if ln.strip()), b"").rstrip().endswith(
                    (b"following exception:", b"another exception occurred:"))
                segments[k] = (lines, segments[k][1] or (chained and segments[k + 1][1]))
            for lines, launchers in segments:
                if launchers:
                    self.report += [ln.decode(errors="replace") for ln in lines]
                else:
                    self.out.writelines(lines)
            self.held = []
        if end and self.line:
            self.out.write(self.line)
        self.out.flush()


def _border(line: bytes) -> bool:
    """A line of torch's table of failed ranks that opens or closes it."""
    return len(line.strip()) >= 20 and not line.strip().strip(b"=")


def _opens(line: bytes, partial: bool = False) -> bool:
    """Whether a line opens a traceback or a table (`partial`: may still, once it has ended)."""
    if partial:
        opening = any(word.startswith(line[:len(word)]) for word in (TRACEBACK, CAUSE))
        return opening or not line.strip().strip(b"=")
    return line.rstrip() == TRACEBACK or line.startswith(CAUSE) or _border(line)


def _segments(held: list[bytes]) -> list[tuple[list[bytes], bool]]:
    """Held lines as (lines, the launcher's?): tracebacks (frames, exception, its further lines), tables."""
    out, i = [], 0
    while i < len(held):
        if _border(held[i]):  # to the closing border
            j = next((k for k in range(i + 1, len(held)) if _border(held[k])), len(held) - 1) + 1
            out.append((held[i:j], b"Root Cause" in b"".join(held[i:j])))
        elif held[i].rstrip() == TRACEBACK:  # frames are indented; the exception's line is not
            j = next((k for k in range(i + 1, len(held)) if held[k].strip() and not held[k][:1].isspace()),
                     len(held))
            final = held[j] if j < len(held) else b""
            j = next((k for k in range(j + 1, len(held)) if _opens(held[k])), len(held))
            out.append((held[i:j], final.startswith(LAUNCHER_ERRORS)))
        elif held[i].startswith(CAUSE):  # its text (a rank's output) up to the traceback it caused
            end = next((k for k in range(i, len(held)) if held[k].rstrip().endswith(b"following exception:")),
                       None)
            j = len(held) if end is None else next(
                (k for k in range(end + 1, len(held)) if held[k].rstrip() == TRACEBACK), len(held))
            out.append((held[i:j], False))
        else:
            j = i + 1
            out.append((held[i:j], False))
        i = j
    return out


def _relay(child: subprocess.Popen) -> _Relay:
    """Pass the child's stderr on until it has ended and its pipe is quiet (an orphan may hold it open)."""
    relay, fd = _Relay(), child.stderr.fileno()
    while True:
        if select.select([fd], [], [], 0.2)[0]:
            data = os.read(fd, 1 << 16)
            if not data:
                break
            relay.feed(data)
        elif child.poll() is not None:
            break
        relay.settle()
    relay.settle(end=True)
    return relay


def _reported(status: Path) -> tuple[int, str] | None:
    """The lowest rank's reported error (code, message), or None."""
    found = []
    for path in status.glob("rank-*.json"):
        with contextlib.suppress(ValueError, OSError, KeyError):  # a rank killed while writing it
            record = json.loads(path.read_text())
            found.append((int(path.stem.removeprefix("rank-")), int(record["code"]), str(record["message"])))
    return min(found)[1:] if found else None


def _failure(code: int, report: list[str], argv: list[str]) -> tuple[int, str]:
    """(exit code, one line) from the launcher's exit code and held-back traceback."""
    root = "".join(report).partition("Root Cause")[2]  # torch's ChildFailedError table: the first failed rank
    rank, died = re.search(r"rank\s*:\s*(\d+)", root), re.search(r"exitcode\s*:\s*(-?\d+)", root)
    if rank and died:
        rc = int(died[1])
        how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with code {rc}"
        return (128 - rc if rc < 0 else rc or 1), f"rank {rank[1]} {how} (its own output is above)"
    last = next((ln.strip() for ln in reversed(report) if ln.startswith("torch.distributed.elastic")), "")
    if "rendezvous" in last:  # a node that never joined, or the head node's launcher gone
        option = dict(zip(argv, argv[1:], strict=False))
        where = f"{option.get('--main_process_ip', '127.0.0.1')}:{option.get('--main_process_port', '29500')}"
        why = (f"cannot reach the rendezvous store at {where}, which the first node's launcher hosts (has it "
               "ended? is the address right?)" if "RendezvousConnectionError" in last
               else f"the rendezvous at {where} failed: {last.partition(': ')[2]}")
        return 1, f"{why}; this node's ranks were stopped"
    # one process: Accelerate's simple launcher raises CalledProcessError, which names the rank's end
    ended = next((ln for ln in reversed(report) if ln.startswith("subprocess.CalledProcessError")), "")
    if died := re.search(r"died with <Signals\.(\w+): (\d+)>", ended):
        return 128 + int(died[2]), f"rank 0 was killed by {died[1]} (its own output is above)"
    if status := re.search(r"non-zero exit status (\d+)", ended):
        return int(status[1]), f"rank 0 exited with code {status[1]} (its own output is above)"
    return (128 - code if code < 0 else code), last or f"accelerate launch exited with code {code}"


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when this process ends (Linux's PR_SET_PDEATHSIG)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not Linux: the child outlives a killed launcher
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG


def run(argv: list[str]) -> int:
    """Run `accelerate launch` with `argv` (its options, the script, its arguments); returns the exit code."""
    import psutil  # noqa: F401 - loaded before the handlers: imported inside one, a second signal met it half-done

    status = Path(tempfile.mkdtemp(prefix="fer-dist-status-"))
    env = {**os.environ, ERRORS_ENV: str(status)}
    if sys.stderr.isatty():  # the ranks write into a pipe; rich draws its bars where this is a terminal
        env.setdefault("TTY_COMPATIBLE", "1")
        env.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *argv]
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # held until the handlers are in place
    try:
        # its own session keeps the terminal's Ctrl-C ours; killed with this process (no thread runs yet),
        # so that ranks whose launcher is gone checkpoint and stop as they do under a bare launcher
        child = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, start_new_session=True,
                                 preexec_fn=_die_with_parent)
        stops = _Forwarder(child)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    try:
        relay = _relay(child)
        code = child.wait()
        reported = _reported(status)
    except _Interrupted:
        child.wait()
        print("fer-dist launch: interrupted again: ranks killed, no new checkpoint", file=sys.stderr,
              flush=True)
        return 130
    finally:
        stops.close()
        child.stderr.close()
        shutil.rmtree(status, ignore_errors=True)
    if reported is not None:
        code, message = reported
    elif code == 0:
        return 130 if stops.first == signal.SIGINT else 0
    else:
        code, message = _failure(code, relay.report, argv)
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
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
