"""model.sync_bn: batch norms synchronised over processes on GPUs, a clear refusal on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import tiny_training

from fer_dist.classes import NUM_CLASSES
from fer_dist.config import load_config, model_spec_fields
from fer_dist.models import ModelSpec, build_model

REPO = Path(__file__).resolve().parents[1]


def test_sync_bn_is_a_training_option_not_part_of_the_model(tmp_path: Path, synthetic_shards: Path) -> None:
    root = tiny_training(tmp_path, synthetic_shards)
    cfg = load_config(root / "config.yaml", ["model.sync_bn=true"])
    fields = model_spec_fields(cfg.model.model_dump())
    assert cfg.model.sync_bn is True and "sync_bn" not in fields
    net = build_model(ModelSpec(num_classes=NUM_CLASSES, **fields))
    plain = {k: v.shape for k, v in net.state_dict().items()}
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())  # small_cnn has batch norms
    # The same keys and shapes: checkpoints and exports of a sync_bn run load into the plain network.
    assert {k: v.shape for k, v in synced.state_dict().items()} == plain


@pytest.mark.slow
@pytest.mark.xdist_group("launch")
def test_sync_bn_on_two_cpu_processes_is_refused_in_one_line(tmp_path: Path, synthetic_shards: Path) -> None:
    root = tiny_training(tmp_path, synthetic_shards)
    cmd = [sys.executable, "-m", "fer_dist.launch", "--config_file",
           str(REPO / "launch_configs/accelerate/cpu_2proc.yaml"), "--main_process_port", "0",
           "-m", "fer_dist.train", "--config", str(root / "config.yaml"), "model.sync_bn=true"]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=240)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "sync_bn" in line]
    assert len(lines) == 1 and "model.sync_bn: SyncBatchNorm needs GPUs" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (root / "runs" / "run").exists()  # nothing half-made is left behind
