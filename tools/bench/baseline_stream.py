"""bench_stream.py --baseline DIR: another checkout's own bench_stream, run in lock step with this one's.

The child process imports DIR's `fer_dist` and DIR's `tools/bench/bench_stream.py` (PYTHONPATH=DIR and
DIR/tools/bench, from a neutral working directory, no bytecode written into DIR) and runs that bench's
own main() with the same options. Each of its timed passes (its `_rate`, one pipeline over the samples) is
gated: the child says `ready` (its set-up for the pass is done and it is idle), waits for `go`, runs the
pass, and sends back `done` with the pass's (samples per wall second, per CPU second). The parent runs
its own passes only while the child waits at a gate, so the two checkouts never run at once, and it
interleaves them round by round. Nothing of DIR is changed; the gate wraps `_rate` in the child only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# runset.py holds what shardset.py held (the id space) at later revisions
DATA_FILES = ("stream.py", "shardread.py", "plan.py", "shardset.py", "runset.py")

_CHILD = r"""
import json, os, sys
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]
proto = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # the baseline's own prints go to its log
import bench_stream
import fer_dist
if not fer_dist.__file__.startswith(sys.argv[1]):
    sys.exit(f"baseline imports {fer_dist.__file__}, not {sys.argv[1]}'s fer_dist")
real = bench_stream._rate
def gated(make):
    proto.write("ready\n")
    if sys.stdin.readline().strip() != "go":
        sys.exit(0)
    rate = real(make)
    proto.write("done " + json.dumps(list(rate)) + "\n")
    return rate
bench_stream._rate = gated
sys.argv = ["bench_stream.py", *sys.argv[2:]]
bench_stream.main()
proto.write("end\n")
"""


def loading_lines(root: Path) -> dict[str, int]:
    """Lines of each loading module under root/fer_dist/data that exists (`wc -l`)."""
    found = {}
    for name in DATA_FILES:
        path = root / "fer_dist" / "data" / name
        if path.is_file():
            found[name] = len(path.read_bytes().splitlines())
    return found


def revision(root: Path) -> str:
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True)
    return done.stdout.strip() or root.name


class Baseline:
    """DIR's bench_stream in a child process, one timed pass at a time."""

    def __init__(self, root: Path, argv: list[str]) -> None:
        self.root = root.resolve()
        if not (self.root / "tools" / "bench" / "bench_stream.py").is_file():
            sys.exit(f"--baseline {root}: no tools/bench/bench_stream.py there")
        self.name = revision(self.root)
        self.cwd = tempfile.mkdtemp(prefix="bench_stream-baseline-")
        self.log_path = Path(self.cwd) / "baseline.log"
        self.log = self.log_path.open("w+")  # closed with the process: the child writes to it until its end
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
               "PYTHONPATH": os.pathsep.join([str(self.root), str(self.root / "tools" / "bench")])}
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(self.root), *argv], cwd=self.cwd,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, bufsize=1)
        self.idle = self.ended = False

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.seek(0)
            tail = self.log.read()[-3000:]
            raise SystemExit(f"the baseline ({self.root}) stopped (exit {self.proc.returncode}):\n{tail}")
        return line.strip()

    def wait_idle(self) -> None:
        """Return once the child waits at its next gate (its set-up done, nothing running) or has ended."""
        if not self.idle:
            line = self._read()
            if line not in ("ready", "end"):
                raise SystemExit(f"the baseline said {line!r} where it should wait for a pass")
            self.idle, self.ended = True, line == "end"

    def round(self, names: tuple[str, ...]) -> dict[str, tuple[float, float]]:
        """One round of the child's passes, in its order (the same pipelines as this bench's)."""
        rates = {}
        for name in names:
            self.wait_idle()
            if self.ended:
                raise SystemExit(f"the baseline ended before this bench's passes did; log {self.log_path}")
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
            self.idle = False
            word, _, payload = self._read().partition(" ")
            if word != "done":
                raise SystemExit(f"the baseline said {word!r} after a pass")
            wall, cpu = json.loads(payload)
            rates[name] = (wall, cpu)
        return rates

    def close(self) -> None:
        """Wait for the child's end (its own summary lines are in its log)."""
        self.wait_idle()
        if not self.ended:
            raise SystemExit(f"the baseline ran more passes than this bench; log {self.log_path}")
        self.proc.wait()
        if self.proc.returncode:
            raise SystemExit(f"the baseline exited {self.proc.returncode}; log {self.log_path}")
        self.log.close()
