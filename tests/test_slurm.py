"""Against a real Slurm on this machine: munge, slurmctld and two slurmd started here (two nodes on this one
host, CPUs only), jobs submitted with `fer-dist slurm submit` through the project's own scripts, 2 gloo
ranks each: two tasks of one rank (multi_node.sbatch, c10d rendezvous), or one task of two ranks.

A time-limit warning (SIGUSR1 to the batch shell, as `--signal=B:USR1@90` sends it) in the middle of a round
must requeue the job and the requeued job resume and end as an uninterrupted run; `scancel` must leave a
complete checkpoint that a plain `fer-dist train` resumes to the same end. The daemons are stopped at the
end by the process ids started here. Skipped, with the reason, where Slurm is not installed (`.ci/run`
installs Debian's slurm-wlm and munge) or this user cannot run slurmd (it needs root).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from train_fixtures import REFERENCE_SECTIONS, free_port, tiny_training

from fer_dist import slurm
from fer_dist.checkpoint_files import latest_checkpoint, load_checkpoint
from fer_dist.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("launch")]
REPO = Path(__file__).resolve().parents[1]
FER_DIST = Path(sys.executable).parent / "fer-dist"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "sinfo")
TIMEOUT = 300

SLURM_CONF = """\
ClusterName=ferdisttest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.sock
SlurmctldPort={ctld_port}
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool-%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
NodeName=node[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port={d_port}-{d_port_2} CPUs={cpus} \
RealMemory={memory} State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _missing() -> str | None:
    absent = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None]
    if absent:
        return (f"Slurm is not installed ({', '.join(absent)} missing): .ci/run installs Debian's slurm-wlm "
                "and munge with apt-get")
    if os.geteuid() != 0:
        return "slurmd needs root to start job steps; this user is not root"
    return None


class Cluster:
    """The running daemons and the environment their clients need."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        self.procs: list[subprocess.Popen] = []
        self.names: list[str] = []

    def start(self) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        memory = psutil.virtual_memory().total // 2**20 // 2
        d_port = free_port()
        (self.root / "slurm.conf").write_text(SLURM_CONF.format(
            host=host, dir=self.root, ctld_port=free_port(), d_port=d_port, d_port_2=d_port + 1,
            cpus=max(1, (os.cpu_count() or 1) // 2), memory=memory))
        self._daemon(["munged", "-F", "-f", "-S", str(self.root / "munge.sock"), f"--key-file={key}",
                      f"--log-file={self.root / 'munged.log'}", f"--pid-file={self.root / 'munged.pid'}",
                      f"--seed-file={self.root / 'munged.seed'}"])
        self._wait(lambda: (self.root / "munge.sock").exists(), "munged's socket")
        self._daemon(["slurmctld", "-D", "-f", str(self.root / "slurm.conf")])
        for node in ("node1", "node2"):  # Debian's slurmd runs several nodes on one host (-N)
            self._daemon(["slurmd", "-D", "-N", node, "-f", str(self.root / "slurm.conf")], node)
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%t %D").stdout.strip() == "idle 2", "2 idle nodes")

    def _daemon(self, cmd: list[str], name: str | None = None) -> None:
        log = open(self.root / f"{name or cmd[0]}.out", "w")  # noqa: SIM115 (open for the daemon's life)
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))
        self.names.append(name or cmd[0])

    def _wait(self, ready, what: str, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while not ready():
            for p, name in zip(self.procs, self.names, strict=True):
                if p.poll() is not None:
                    out = (self.root / f"{name}.out").read_text()[-2000:]
                    pytest.fail(f"{name} exited with {p.returncode} before {what}: {out}")
            assert time.monotonic() < deadline, f"no {what} after {seconds} s"
            time.sleep(0.2)

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_state(self, job_id: str, states: set[str], seconds: float = TIMEOUT) -> dict[str, str]:
        deadline = time.monotonic() + seconds
        while (info := self.job(job_id)).get("JobState") not in states:
            assert time.monotonic() < deadline, f"job {job_id} is {info.get('JobState')}, not in {states}"
            time.sleep(0.5)
        return info

    def stop(self) -> None:
        self.run("scancel", "--user", "root")
        for p in reversed(self.procs):  # slurmd, slurmctld, then munged: by the pids started here
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, synthetic_shards: Path) -> Path:
    """The reference's config over the session's shards, with the plain progress line (every 0.2 s: a
    tiny epoch without loader workers takes less than a second)."""
    return tiny_training(tmp_path_factory.mktemp("slurmrun"), synthetic_shards,
                         run={**REFERENCE_SECTIONS["run"], "progress": True, "progress_every_s": 0.2})


@pytest.fixture(scope="module")
def reference(train_reference: Path) -> Path:
    """The uninterrupted 2-process run (conftest's; the same training: progress lines change nothing)."""
    return train_reference


def train(workdir: Path, name: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(FER_DIST), "train", "--config", str(workdir / "config.yaml"), "--processes",
                             "2", f"run.name={name}"], cwd=workdir, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def submit(cluster: Cluster, workdir: Path, name: str, nodes: int) -> tuple[str, Path]:
    """A 2-rank CPU job (on 1 or 2 nodes) submitted by `fer-dist slurm submit`; returns (job id, its log)."""
    result = subprocess.run(
        [str(FER_DIST), "slurm", "submit", "--config", str(workdir / "config.yaml"), "--nodes", str(nodes),
         "--gpus-per-node", str(2 // nodes), "--cpu", "--job-name", name,
         "--output", str(workdir / "%x-%j.out"),
         "--script-dir", str(workdir / "scripts"), f"run.name={name}"],
        cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().splitlines()[-1].split()[2].rstrip(":")
    return job, workdir / f"{name}-{job}.out"


def wait_for(path: Path, cluster: Cluster, job: str, seconds: float = TIMEOUT) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING"), f"job {job} is {state} before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def ranks_gone(name: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds

    def running() -> bool:
        procs = psutil.process_iter(["cmdline"])
        return any(f"run.name={name}" in " ".join(p.info["cmdline"] or []) for p in procs)

    while running():
        assert time.monotonic() < deadline, f"the ranks of {name} are still running"
        time.sleep(0.2)


def job_ranks(name: str, count: int = 2, seconds: float = 60) -> list[psutil.Process]:
    """The trainer processes (`python -m fer_dist.train`, not the launchers naming it) of run `name`."""
    deadline = time.monotonic() + seconds
    while True:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            line = p.info["cmdline"] or []
            module = line[line.index("-m") + 1] if "-m" in line[:-1] else None
            if module == "fer_dist.train" and f"run.name={name}" in line:
                found.append(p)
        if len(found) == count:
            return found
        assert time.monotonic() < deadline, f"{len(found)} ranks of {name}, not {count}"
        time.sleep(0.1)


def pending(process: psutil.Process, sig: int) -> bool:
    """Whether `sig` waits for delivery to the process (its /proc status: pending for it or any thread)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{process.pid}/status").read_text().splitlines())
    return any(int(fields[key].strip(), 16) >> (sig - 1) & 1 for key in ("SigPnd", "ShdPnd"))


def final_state(run_dir: Path) -> dict:
    state, _ = load_checkpoint(latest_checkpoint(run_dir), 0)
    return state


def assert_same_end(run_dir: Path, reference: Path) -> None:
    """Same rounds, target table, selections and weights as the uninterrupted run; same records."""
    from test_train import assert_same_run, comparable

    assert_same_run(final_state(run_dir), final_state(reference))
    ref = [r for r in read_metrics(reference / "metrics.jsonl") if r["kind"] != "step"]
    got = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] != "step"]
    assert comparable(got) == comparable(ref)


def test_time_limit_warning_mid_round_requeues_and_resumes_to_the_same_end(
    cluster: Cluster, workdir: Path, reference: Path
) -> None:
    job, log = submit(cluster, workdir, "preempted", nodes=2)  # multi_node.sbatch
    run_dir = workdir / "runs" / "preempted"
    wait_for(run_dir / "checkpoints" / "round-0001" / "meta.json", cluster, job)
    # The ranks are held while the warning travels (batch shell -> scancel -> slurmd -> ranks): on a cluster
    # it comes 90 s ahead, in a long round; a tiny run could otherwise end before it arrives.
    ranks = job_ranks("preempted")
    for rank in ranks:
        rank.suspend()
    # what --signal=B:USR1@90 delivers ahead of the time limit: SIGUSR1 to the batch shell only
    assert cluster.run("scancel", "--batch", "--signal=USR1", job).returncode == 0
    deadline = time.monotonic() + 60
    while not all(pending(rank, signal.SIGUSR1) for rank in ranks):
        assert time.monotonic() < deadline, "the forwarded SIGUSR1 did not reach the ranks"
        time.sleep(0.1)
    for rank in ranks:
        rank.resume()
    wait_for(run_dir / slurm.REQUEUES, cluster, job)
    # Slurm holds a requeued batch job ~2 min before it may start again; the test does not wait for that
    deadline = time.monotonic() + 120
    while cluster.job(job).get("Restarts") != "1" or cluster.job(job).get("JobState") != "PENDING":
        assert time.monotonic() < deadline, cluster.job(job)
        time.sleep(0.2)
    ranks_gone("preempted")
    # slurmd refuses a job credential issued in the same second as its predecessor's was revoked by the
    # requeue ("Killing non-startable batch job: Job credential revoked"): Slurm's own hold avoids that
    time.sleep(2)
    assert cluster.run("scontrol", "update", f"jobid={job}", "StartTime=now").returncode == 0
    info = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"})
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text[-3000:]
    record = slurm.read_requeues(run_dir)
    assert len(record["requeues"]) == 1 and record["refused"] is None
    stopped_at = record["requeues"][0]["step"]
    stop_ckpt = run_dir / "checkpoints" / f"step-{stopped_at:08d}"
    saved, _ = load_checkpoint(stop_ckpt, 1)
    assert saved["state"]["phase"] == "rounds" and saved["state"]["round"] >= 1, "not stopped in a round"
    assert saved["state"]["step_in_epoch"] > 0, "not stopped in the middle of the round's epoch"
    assert "stopped on request (SIGUSR1)" in text and f"resumed from {stop_ckpt}" in text, text[-3000:]
    assert "restart 1" in text and "[progress] " in text and "Traceback" not in text
    assert_same_end(run_dir, reference)


def test_scancelled_job_leaves_a_complete_usable_checkpoint(
    cluster: Cluster, workdir: Path, reference: Path
) -> None:
    job, log = submit(cluster, workdir, "cancelled", nodes=1)  # single_node.sbatch
    run_dir = workdir / "runs" / "cancelled"
    wait_for(run_dir / "checkpoints" / "warmup-0001" / "meta.json", cluster, job)
    assert cluster.run("scancel", job).returncode == 0
    ranks_gone("cancelled")
    info = cluster.wait_state(job, {"CANCELLED"}, seconds=60)
    assert info["Restarts"] == "0" and not (run_dir / slurm.REQUEUES).exists()
    text = log.read_text()
    assert "stopped on request (SIGTERM)" in text and "Traceback" not in text, text[-3000:]
    latest = latest_checkpoint(run_dir)
    assert latest.name.startswith("step-"), latest
    for rank in (0, 1):  # every process's RNG state is in it, and it loads with weights_only=True
        state, rng = load_checkpoint(latest, rank)
        assert rng is not None and state["world_size"] == 2
    assert (latest / "meta.json").is_file() and not list((run_dir / "checkpoints").glob(".tmp-*"))
    result = train(workdir, "cancelled")
    assert f"resumed from {latest}" in result.stderr
    assert_same_end(run_dir, reference)
