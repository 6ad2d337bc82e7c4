"""bench_stream's --baseline: another checkout's bench run one gated pass at a time (baseline_stream.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "bench"
sys.path.insert(0, str(TOOLS))

from baseline_stream import Baseline, loading_lines  # noqa: E402

FAKE_BENCH = '''
import sys
import fer_dist
def _rate(make):
    return make()
def main():
    args = sys.argv[1:]
    path = args[args.index("--log") + 1]
    def one(i):
        with open(path, "a") as log:
            log.write(f"pass {i}\\n")
        return 100.0 + i, 50.0 + i
    for i in range(4):
        _rate(lambda: one(i))
'''


def fake_checkout(root: Path) -> Path:
    (root / "fer_dist" / "data").mkdir(parents=True)
    (root / "fer_dist" / "__init__.py").write_text("")
    (root / "fer_dist" / "data" / "stream.py").write_text("a = 1\nb = 2\n")
    (root / "tools" / "bench").mkdir(parents=True)
    (root / "tools" / "bench" / "bench_stream.py").write_text(FAKE_BENCH)
    return root


def test_the_baseline_runs_its_own_bench_one_pass_per_go_and_never_alongside(tmp_path: Path) -> None:
    root = fake_checkout(tmp_path / "old")
    log = tmp_path / "passes.log"
    base = Baseline(root, ["--log", str(log)])
    base.wait_idle()
    assert not log.exists()  # waiting at its first gate: nothing ran
    first = base.round(("stream", "bound"))
    assert first == {"stream": (100.0, 50.0), "bound": (101.0, 51.0)}
    base.wait_idle()
    assert log.read_text() == "pass 0\npass 1\n"  # at its third gate
    assert base.round(("stream", "bound")) == {"stream": (102.0, 52.0), "bound": (103.0, 53.0)}
    base.close()
    assert base.proc.returncode == 0
    assert loading_lines(root) == {"stream.py": 2}


def test_a_baseline_without_the_bench_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no tools/bench/bench_stream.py"):
        Baseline(tmp_path, [])


def test_a_baseline_whose_fer_dist_is_not_its_own_is_refused(tmp_path: Path) -> None:
    root = fake_checkout(tmp_path / "old")
    (root / "fer_dist" / "__init__.py").unlink()
    (root / "fer_dist" / "data" / "stream.py").unlink()
    (root / "fer_dist" / "data").rmdir()
    (root / "fer_dist").rmdir()  # the venv's fer_dist would be imported instead
    base = Baseline(root, [])
    with pytest.raises(SystemExit, match="baseline .*stopped"):
        base.wait_idle()


def test_bench_stream_help_names_the_baseline_option() -> None:
    done = subprocess.run([sys.executable, str(TOOLS / "bench_stream.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--baseline" in done.stdout
