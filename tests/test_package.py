"""A non-editable install (the built wheel) runs the quick start and `fer-dist slurm submit` without a
checkout: the files they read ship in the package (fer_dist/resources/)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["fer_dist/resources/quickstart_synthetic.yaml", "fer_dist/resources/slurm/single_node.sbatch",
           "fer_dist/resources/slurm/multi_node.sbatch", "fer_dist/resources/slurm/experiment.sbatch"]


def _source_copy(dest: Path) -> Path:
    """The files a wheel is built from, copied (symlinks kept), so the build writes nothing in the repo."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ["fer_dist", "launch_configs", "tools/slurm"]:
        shutil.copytree(REPO / name, dest / name, symlinks=True, ignore=ignore)
    for name in ["pyproject.toml", "README.md"]:
        shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.mark.slow
def test_wheel_runs_the_quick_start_and_slurm_submit(tmp_path: Path) -> None:
    src = _source_copy(tmp_path / "src")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, timeout=240)
    (wheel,) = wheels.glob("fer_dist-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in SHIPPED:  # the files themselves, not the repository's symlinks
            info = z.getinfo(name)
            assert (info.external_attr >> 16) & 0o170000 == 0o100000, name
            assert z.read(name) == (REPO / name).read_bytes(), name

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    # torch and the other dependencies come from this environment (a path line, not downloaded); its own
    # fer_dist is the editable finder of a .pth file, which a path added this way does not run
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "dev_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = ["install", "--no-deps", "-q", str(wheel)]
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), *install], check=True,
                   capture_output=True, timeout=240)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(py), "-c", "import fer_dist; print(fer_dist.__file__)"], cwd=elsewhere,
                           env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(site)), where
    fer_dist = str(env_dir / "bin" / "fer-dist")
    submit = ["slurm", "submit", "--dry-run", "--cpu", "--gpus-per-node", "2"]
    for args, expect in [(["train", "--dry-run"], "-m fer_dist.train"), (submit, "#SBATCH --nodes=1")]:
        done = subprocess.run([fer_dist, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        assert expect in done.stdout, (args, done.stdout)
    # the job runs the Python that has this fer-dist: the wheel's venv, not a .venv in the submit directory
    assert f"PY=${{FER_DIST_PYTHON:-{py}}}" in done.stdout, done.stdout
