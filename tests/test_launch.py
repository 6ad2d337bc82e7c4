"""Starting and stopping: `fer-dist train`'s checks and command, `python -m fer_dist.launch` with 2 real gloo
ranks under each stop signal, bare `accelerate launch` as the README describes it, the plain progress line,
and the batch scripts' requeue with a stand-in scontrol (tests/test_slurm.py runs a real Slurm)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from train_fixtures import free_port, tiny_training
from typer.testing import CliRunner

from fer_dist import launch, slurm, stopsignals, train
from fer_dist.checkpoint_files import latest_checkpoint, load_checkpoint
from fer_dist.cli import app
from fer_dist.config import describe_keys, dump_config, load_config
from fer_dist.data.runset import checked_labels, files_digest, load_run_data
from fer_dist.launchenv import CHECKED_ENV

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 240


# real launches: slow, and a launch slot each (conftest.py)
LAUNCHES = (pytest.mark.slow, pytest.mark.xdist_group("launch"))


def launches(test):
    for mark in LAUNCHES:
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, synthetic_shards: Path) -> Path:
    """The session's tiny synthetic shards and a config over them (as tests/test_train.py), without
    run.num_processes."""
    return tiny_training(tmp_path_factory.mktemp("launch"), synthetic_shards, run={"keep_last": 20})


# ---------------------------------------------------------------- fer-dist train: checks, help, command


def test_help_lists_every_config_key_with_default_and_doc(monkeypatch, capsys) -> None:
    cli = CliRunner().invoke(app, ["train", "--help"], terminal_width=200)
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as module:  # `python -m fer_dist.train --help`, in this process
        train.main(["--help"])
    assert cli.exit_code == 0 and module.value.code == 0
    module_help = capsys.readouterr().out
    for key, default, doc in describe_keys():
        for text in (cli.output, module_help):
            line = next((ln for ln in text.splitlines() if f"{key} = {default}" in ln), None)
            assert line is not None and doc[:30] in line, (key, text[-500:])


@pytest.mark.parametrize(("override", "message"), [
    ("method.tau=3", "method.tau: Input should be less than 1 (got 3)"),
    ("no_such_key=1", "config: unknown key 'no_such_key'"),
    ("run.num_processes=3", "run.num_processes: the config asks for 3 processes but the launch would "
                            "start 2"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(workdir: Path, override: str, message: str) -> None:
    result = CliRunner().invoke(app, ["train", "--config", str(workdir / "config.yaml"), "--processes", "2",
                                      "run.name=bad", override])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (workdir / "runs" / "bad").exists()


def test_every_shard_folder_is_checked_first(workdir: Path, tmp_path: Path) -> None:
    tree = yaml.safe_load((workdir / "config.yaml").read_text())
    tree["data"]["test"] = [{"dir": str(tmp_path / "missing"), "splits": ["test"]}]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tree))
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "c.yaml"), "--processes", "2"])
    assert result.exit_code == 2 and str(tmp_path / "missing") in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_dry_run_prints_the_launch_with_the_same_arguments(workdir: Path) -> None:
    config = str(workdir / "config.yaml")
    result = CliRunner().invoke(app, ["train", "--config", config, "--processes", "2", "--dry-run",
                                      "tau=0.4"])
    assert result.exit_code == 0, result.output
    words = result.output.split()
    assert words[:3] == [sys.executable, "-m", "fer_dist.launch"]
    assert words[words.index("--num_processes") + 1] == "2" and "--multi_gpu" in words
    assert words[words.index("fer_dist.train") - 1:] == ["-m", "fer_dist.train", "--config", config,
                                                         "tau=0.4"]
    via_file = CliRunner().invoke(app, ["train", "--config", config, "--dry-run", "--accelerate-config",
                                        str(REPO / "launch_configs/accelerate/cpu_2proc.yaml")])
    assert "--config_file" in via_file.output.split(), via_file.output
    both = CliRunner().invoke(app, ["train", "--config", config, "--dry-run", "--processes", "2",
                                    "--accelerate-config", "x.yaml"])
    assert both.exit_code == 2 and "give one of them" in both.output


# ---------------------------------------------------------------- real launches


def launch_cmd(workdir: Path, name: str, *overrides: str, bare: bool = False) -> list[str]:
    args = ["-m", "fer_dist.train", "--config", str(workdir / "config.yaml"), f"run.name={name}", *overrides]
    launcher = [str(VENV_BIN / "accelerate"), "launch"] if bare else [sys.executable, "-m", "fer_dist.launch"]
    return [*launcher, "--config_file", str(REPO / "launch_configs/accelerate/cpu_2proc.yaml"),
            "--main_process_port", str(free_port()), *args]


def run_to_checkpoint(workdir: Path, cmd: list[str], name: str) -> subprocess.Popen:
    """Start a launch in a session of its own; return once its first warm-up checkpoint exists."""
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    marker = workdir / "runs" / name / "checkpoints" / "warmup-0001" / "meta.json"
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {marker}: {proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{marker} did not appear"
        time.sleep(0.05)
    return proc


def ranks_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The trainer processes under a launcher: `fer_dist.launch` -> Accelerate's process -> ranks."""
    found = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            line = child.cmdline()
            if "fer_dist.train" in line and not any("accelerate" in part or part == "fer_dist.launch"
                                                     for part in line[:3]):
                found.append(child)
    return found


def send(proc: subprocess.Popen, target: str, sig: int) -> None:
    if target == "launcher":
        os.kill(proc.pid, sig)
    elif target == "group":  # the launcher's process group, as `kill -TERM -PGID` or a terminal's Ctrl-C
        os.killpg(proc.pid, sig)
    elif target == "bare-ranks":
        for p in ranks_of(proc):
            p.send_signal(sig)
    else:  # the launcher and every rank, as SLURM signals a job step
        for p in [psutil.Process(proc.pid), *ranks_of(proc)]:
            p.send_signal(sig)


def assert_stopped_at_a_step(run_dir: Path) -> None:
    """The latest checkpoint was written by the stop: mid-epoch, complete, one RNG file per rank."""
    latest = latest_checkpoint(run_dir)
    assert latest.name.startswith("step-"), latest
    state, _ = load_checkpoint(latest, 1)
    assert state["world_size"] == 2 and state["state"]["step_in_epoch"] > 0


@launches
@pytest.mark.parametrize(("target", "signame", "code"), [
    ("launcher", "SIGTERM", 0), ("group", "SIGUSR1", 0), ("step", "SIGTERM", 0), ("group", "SIGINT", 130),
    ("bare-ranks", "SIGTERM", 0),
])
def test_stop_signal_checkpoints_and_exits_with_its_code(workdir: Path, target: str, signame: str,
                                                         code: int) -> None:
    """`python -m fer_dist.launch` (what `fer-dist train` runs); bare-ranks: plain `accelerate launch`, the
    signal sent to its ranks only."""
    name = f"stop-{target}-{signame}"
    extra = ("run.progress=true", "run.progress_every_s=0.2") if target == "launcher" else ()
    workers = ("data.num_workers=1",) if target == "group" else ()  # they get the signal too, as from a tty
    cmd = launch_cmd(workdir, name, *extra, *workers, bare=target.startswith("bare"))
    proc = run_to_checkpoint(workdir, cmd, name)
    send(proc, target, getattr(signal, signame))
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, output[-3000:]
    assert "stopped on request" in output and "Traceback" not in output, output[-3000:]
    assert_stopped_at_a_step(workdir / "runs" / name)
    if extra:  # stderr is a pipe here, as in a SLURM log: the plain progress line
        line = next(ln for ln in output.splitlines() if ln.startswith("[progress] warm-up"))
        assert " step " in line and "/" in line and "loss " in line and "img/s" in line and "left " in line


@launches
@pytest.mark.launch_alone  # it times the exit
def test_second_sigint_exits_at_once(workdir: Path) -> None:
    proc = run_to_checkpoint(workdir, launch_cmd(workdir, "twice"), "twice")
    os.killpg(proc.pid, signal.SIGINT)
    seen = []
    while not seen or "asking the ranks" not in seen[-1]:  # the first one is being handled: press again
        seen.append(proc.stdout.readline())
        assert seen[-1], "".join(seen)
    os.killpg(proc.pid, signal.SIGINT)
    tick = time.monotonic()
    output, _ = proc.communicate(timeout=60)
    output = "".join(seen) + output
    assert proc.returncode == 130 and "interrupted again" in output, output[-3000:]
    assert time.monotonic() - tick < 15 and "Traceback" not in output
    time.sleep(1)
    assert not [p for p in psutil.process_iter(["cmdline"]) if "run.name=twice" in (p.info["cmdline"] or [])]


@launches
def test_the_ranks_take_the_label_pass_of_fer_dist_train_which_the_launcher_removes(workdir: Path,
                                                                                   tmp_path: Path) -> None:
    """`fer-dist train` checks every label before the launch and leaves that pass in a temporary file for
    its ranks (they take it where it was made over the files they see: tests/test_dist.py); the launcher
    removes the file at the end; a dry run or a refused input leaves none."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    cmd = [str(VENV_BIN / "fer-dist"), "train", "--config", str(workdir / "config.yaml"), "--processes", "2",
           "run.name=checked", "method.max_rounds=1"]
    for extra, code in (("--dry-run", 0), ("method.tau=3", 2)):  # nothing left by a dry run or a bad input
        done = subprocess.run([*cmd, extra], cwd=workdir, env=env, capture_output=True, text=True)
        assert done.returncode == code and not list(tmp_path.glob(f"{launch.CHECKED_PREFIX}*")), done.stderr
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.monotonic() + TIMEOUT
    while len(ranks := ranks_of(proc)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    (made,) = tmp_path.glob(f"{launch.CHECKED_PREFIX}*.npz")
    assert all(rank.environ()[CHECKED_ENV] == str(made) for rank in ranks)
    cfg = load_config(workdir / "config.yaml", [])
    shardset = load_run_data(cfg.data, cfg.run.seed).shardset
    with np.load(made, allow_pickle=False) as saved:  # what the ranks compare with the files they see
        assert int(saved["digest"]) == files_digest(shardset, cfg.data.on_error)
        assert saved["labels"].tolist() == checked_labels(shardset).labels.tolist()
    output, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, output[-3000:]
    assert not list(tmp_path.glob(f"{launch.CHECKED_PREFIX}*"))  # torch's own temporary folders stay


@launches
def test_a_config_error_is_one_line_under_the_launcher(workdir: Path) -> None:
    result = subprocess.run(launch_cmd(workdir, "err", "method.tau=3"), cwd=workdir, capture_output=True,
                            text=True, timeout=TIMEOUT)
    assert result.returncode == 2
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: " + f"{workdir / 'config.yaml'} + overrides: method.tau: Input should be less "
                      "than 1 (got 3)"], result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


@launches
def test_bare_accelerate_launch_prints_the_error_once_and_returns_1(workdir: Path) -> None:
    """What the README says the launcher itself does: rank 0 alone prints the line, torch adds its report."""
    result = subprocess.run(launch_cmd(workdir, "bare-err", "method.tau=3", bare=True), cwd=workdir,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 1
    assert len([ln for ln in result.stderr.splitlines() if ln.startswith("error:")]) == 1, result.stderr
    assert "ChildFailedError" in result.stderr


@launches
def test_ranks_of_a_bare_launcher_killed_by_sigusr1_checkpoint_and_end(workdir: Path) -> None:
    """torch's launcher has no SIGUSR1 handler and dies of it; its ranks see it gone and stop cleanly."""
    proc = run_to_checkpoint(workdir, launch_cmd(workdir, "orphans", bare=True), "orphans")
    ranks = ranks_of(proc)
    os.kill(proc.pid, signal.SIGUSR1)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGUSR1
    _, alive = psutil.wait_procs(ranks, timeout=120)
    assert not alive
    assert_stopped_at_a_step(workdir / "runs" / "orphans")


@launches
def test_one_process_sigint_checkpoints_and_returns_130(workdir: Path) -> None:
    cmd = [sys.executable, "-m", "fer_dist.train", "--config", str(workdir / "config.yaml"), "run.name=one",
           "data.num_workers=1"]
    proc = run_to_checkpoint(workdir, cmd, "one")
    os.killpg(proc.pid, signal.SIGINT)  # the whole group, loader workers included, as a terminal does
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in output, output[-3000:]
    assert latest_checkpoint(workdir / "runs" / "one").name.startswith("step-")


@launches
@pytest.mark.parametrize(("presses", "code"), [(0, 0), (2, 130)])
def test_one_process_sigterm_and_a_double_sigint(workdir: Path, tmp_path: Path, presses: int,
                                                 code: int) -> None:
    """presses=0: SIGTERM. The log goes to a file: after os._exit the loader workers outlive the trainer
    until its parent reaps it, and a parent reading a pipe to its end would wait for them."""
    name = f"one-{presses}"
    cmd = [sys.executable, "-m", "fer_dist.train", "--config", str(workdir / "config.yaml"),
           f"run.name={name}", "data.num_workers=1"]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        marker = workdir / "runs" / name / "checkpoints" / "warmup-0001" / "meta.json"
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.02)
        if presses:
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.05)  # two signals at once are one to Python's handler
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    output = (tmp_path / "log").read_text()
    assert proc.returncode == code and "Traceback" not in output, output[-3000:]
    assert ("interrupted again" in output) == bool(presses)


# ---------------------------------------------------------------- requeue bookkeeping (no cluster needed)


def test_requeue_refused_at_the_limit_and_without_progress(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    (tmp_path / slurm.REQUEUES).write_text(json.dumps(
        {"requeues": [{"job_id": "7", "restart_count": 0, "time": "t", "step": 40}], "refused": None}))
    line = slurm.requeue(tmp_path, step=40, limit=5)
    assert line.startswith("not requeued: no training step since the last requeue (step 40)")
    assert slurm.read_requeues(tmp_path)["refused"]["reason"].startswith("no training step")
    line = slurm.requeue(tmp_path, step=90, limit=1)
    assert line.startswith("not requeued: run.max_requeues (1) reached")
    record = slurm.read_requeues(tmp_path)
    assert len(record["requeues"]) == 1 and record["refused"]["step"] == 90


@pytest.mark.parametrize("nodes", [1, 3])
def test_rendered_scripts_carry_the_values_and_parse(tmp_path: Path, nodes: int) -> None:
    spec = slurm.JobSpec(nodes=nodes, gpus_per_node=4, train_args=["--config", "a b.yaml", "tau=0.8"],
                         partition="gpu", time_limit="1:00:00")
    script = slurm.render(spec)
    for line in (f"#SBATCH --nodes={nodes}", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --time=1:00:00", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@90",
                 "[ $# -gt 0 ] || set -- --config 'a b.yaml' tau=0.8"):
        assert line in script.splitlines(), line
    assert ("--rdzv_backend c10d" in script) == (nodes > 1)
    # the job's default Python is the one rendering it, quoted, not the repository's .venv
    assert slurm.PYTHON_DEFAULT in slurm.script_for(spec).read_text() and slurm.PYTHON_DEFAULT not in script
    (tmp_path / "job.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0
    weird = Path("/opt/my envs/bin/python")
    job = tmp_path / "python.sbatch"
    job.write_text(script.replace(shlex.quote(sys.executable), shlex.quote(str(weird))))
    probe = "\n".join(line for line in job.read_text().splitlines() if "FER_DIST_PYTHON:-" in line)
    bare = {k: v for k, v in os.environ.items() if k != "FER_DIST_PYTHON"}
    printed = subprocess.run(["bash", "-c", f"{probe}\necho \"${{PY:-$FER_DIST_PYTHON}}\""], env=bare,
                             capture_output=True, text=True)
    assert printed.stdout.strip() == str(weird), printed
    cpu = slurm.render(slurm.JobSpec(nodes=nodes, gpus_per_node=2, train_args=[], cpu=True))
    assert "#SBATCH --gpus-per-node" not in cpu and "PROCS_PER_NODE=${PROCS_PER_NODE:-2}" in cpu


def test_a_stop_held_back_at_start_up_arrives_with_the_stop_request() -> None:
    """The launcher starts the ranks with the stop signals blocked: one sent while a rank still imports its
    modules waits for its StopRequest instead of killing it."""
    with stopsignals.stop_signals_blocked():
        # to this thread: another thread of the test process (unblocked) would die of a process-wide one
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
        with stopsignals.StopRequest() as stop:
            time.sleep(0.01)
            assert stop.requested and stop.signal_name == "SIGUSR1"


def stopped_run(workdir: Path, name: str, scontrol_dir: Path) -> tuple[Path, dict[str, str]]:
    """A run stopped at step 12 with its checkpoint (files only), and an environment inside SLURM job 77
    whose scontrol records its arguments in `scontrol_dir`/scontrol.log."""
    cfg = load_config(workdir / "config.yaml", [f"run.name={name}", "run.max_requeues=3"])
    run_dir = workdir / cfg.run.dir / cfg.run.name
    (run_dir / "checkpoints" / "step-00000012").mkdir(parents=True)
    dump_config(cfg, run_dir / "config.yaml")
    for file, text in (("state.pt", ""), ("meta.json", json.dumps({"step": 12}))):
        (run_dir / "checkpoints" / "step-00000012" / file).write_text(text)
    (run_dir / "checkpoints" / "latest").write_text("step-00000012")
    (scontrol_dir / "scontrol").write_text(f'#!/bin/sh\necho "$*" >> {scontrol_dir}/scontrol.log\n')
    (scontrol_dir / "scontrol").chmod(0o755)
    return run_dir, {"PATH": f"{scontrol_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77"}


def test_the_batch_scripts_requeue_a_stopped_run_within_its_limit(workdir: Path, tmp_path: Path) -> None:
    """`python -m fer_dist.slurm requeue <trainer args>`, what the scripts run once srun has returned after
    the time-limit warning: requeued once per trained step, never once finished."""
    run_dir, slurm_env = stopped_run(workdir, "requeued", tmp_path)
    cmd = [sys.executable, "-m", "fer_dist.slurm", "requeue", "--config", str(workdir / "config.yaml"),
           "run.name=requeued", "run.max_requeues=3"]

    def requeue() -> str:
        done = subprocess.run(cmd, cwd=workdir, env={**os.environ, **slurm_env}, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "requeued job 77 (1 of at most 3)" in requeue()
    assert "not requeued: no training step since the last requeue (step 12)" in requeue()
    (run_dir / "summary.json").write_text("{}")
    assert "has finished" in requeue()
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 77"]
    record = slurm.read_requeues(run_dir)
    assert [r["step"] for r in record["requeues"]] == [12] and record["refused"]["step"] == 12


def test_the_experiment_runner_requeues_its_task_after_the_warning(workdir: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """experiment.sbatch's runner: SIGUSR1 goes on to the training, which ends; then the task is requeued."""
    from fer_dist.experiments.run import Stopped, run_child

    run_dir, slurm_env = stopped_run(workdir, "runner-requeued", tmp_path)
    for key, value in slurm_env.items():
        monkeypatch.setenv(key, value)
    ready = tmp_path / "ready"
    training = (f"import pathlib, signal, sys, time; signal.signal(signal.SIGUSR1, lambda *a: sys.exit(0)); "
                f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)")

    def warning() -> None:  # SLURM's time-limit warning to the runner, once the training listens
        while not ready.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=warning, daemon=True).start()
    with pytest.raises(Stopped):
        run_child([sys.executable, "-c", training], dict(os.environ), run_dir)
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 77"]
    assert slurm.read_requeues(run_dir)["requeues"][0]["step"] == 12


TWO_NODE_RANK = '''
import os, signal, sys, time
from pathlib import Path
signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])  # as the trainer's StopRequest does
out, rank = Path(sys.argv[1]), os.environ["RANK"]
(out / f"rank-{rank}-started").write_text("")
time.sleep(60)
'''


def start_two_nodes(tmp_path: Path) -> list[subprocess.Popen]:
    """Two launchers meeting by c10d on this machine, as multi_node.sbatch starts them on two nodes."""
    (tmp_path / "two_node_rank.py").write_text(TWO_NODE_RANK)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    port = str(free_port())
    nodes = []
    for node in (0, 1):
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "fer_dist.launch", "--multi_gpu", "--num_machines", "2", "--num_processes",
             "2", "--machine_rank", str(node), "--rdzv_backend", "c10d", "--main_process_ip", "127.0.0.1",
             "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
             "-m", "two_node_rank", str(tmp_path)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        time.sleep(3 if node == 0 else 0)  # the head hosts the store first, as in multi_node.sbatch
    return nodes


@launches
def test_the_head_node_gone_is_one_line_on_the_other_node(tmp_path: Path) -> None:
    head, other = start_two_nodes(tmp_path)
    deadline = time.monotonic() + TIMEOUT
    while not (tmp_path / "rank-1-started").exists():
        assert time.monotonic() < deadline and other.poll() is None, other.communicate()[0]
        time.sleep(0.2)
    for proc in [*psutil.Process(head.pid).children(recursive=True), psutil.Process(head.pid)]:
        proc.kill()
    head.communicate(timeout=TIMEOUT)
    output = other.communicate(timeout=TIMEOUT)[0]
    assert other.returncode == 1, output
    assert "error: cannot reach the rendezvous store at 127.0.0.1:" in output.splitlines()[-1], output
    assert "Traceback" not in output, output


@pytest.mark.parametrize("script,code,line", [
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", 137, "rank 0 was killed by SIGKILL"),
    ("import sys\nprint('the rank says this once', file=sys.stderr)\nraise RuntimeError('a bug')\n", 1,
     "rank 0 exited with code 1"),
])
def test_one_process_failure_is_its_ranks_code_in_one_line(tmp_path: Path, script: str, code: int,
                                                           line: str) -> None:
    """Accelerate's simple launcher re-raises its rank's stderr tail inside a CalledProcessError traceback:
    held back, so the rank's own output shows once, then one line with the rank's code."""
    path = tmp_path / "rank.py"
    path.write_text(script)
    options = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no"]
    done = subprocess.run([sys.executable, "-m", "fer_dist.launch", *options, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == code, done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == f"error: {line} (its own output is above)", done.stderr
    assert "CalledProcessError" not in done.stderr and "direct cause" not in done.stderr, done.stderr
    assert done.stderr.count("the rank says this once") == ("once" in script), done.stderr
