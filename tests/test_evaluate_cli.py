"""`fer-dist eval | intensity | compare | predict | export | cv` on models trained here on the synthetic set.

Figures are checked against answers computed another way: the trainer's own test accuracy, a constant
model's known scores, PyTorch's outputs for ONNX and for `predict`, one process against two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from layouts import make_ck48
from train_fixtures import CPU_2PROC, copy_workdir, free_port, shared_folder, tiny_training
from typer.testing import CliRunner

from fer_dist.checkpoint_files import latest_checkpoint
from fer_dist.cli import app
from fer_dist.data.manifest import read_manifest
from fer_dist.data.pack import pack
from fer_dist.data.runset import ShardSet
from fer_dist.data.shardread import decode_png, read_samples
from fer_dist.data.sources.base import SourceOptions
from fer_dist.evaluate.infer import batch_probs
from fer_dist.evaluate.load import load_model
from fer_dist.metrics import read_metrics
from fer_dist.models import ModelSpec, build_model, export_model
from fer_dist.train import main as train_main

pytestmark = pytest.mark.slow
VENV_BIN = Path(sys.executable).parent
runner = CliRunner()


def cli(*args: str | Path, cwd: Path | None = None):
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


def ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def train(root: Path, name: str, *overrides: str) -> Path:
    command = [sys.executable, "-m", "fer_dist.train", "--config", str(root / "config.yaml"),
               f"run.name={name}", *overrides]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "runs" / name


@pytest.fixture(scope="session")
def evaluate_runs(tmp_path_factory, synthetic_shards: Path) -> Path:
    """Synthetic shards, a CK+48-like set without neutral, and two short runs differing in tau: trained once
    per session, whichever xdist worker asks first (the 2-process tests run on the launch group's)."""

    def build(root: Path) -> None:
        (root / "shards").symlink_to(synthetic_shards)  # read only here
        tiny_training(root, synthetic_shards, data={"num_workers": 0}, method={"max_rounds": 1},
                      optim={"lr": 0.003})
        pack("ckplus", [make_ck48(root / "ck48src")], root / "ck48", split=(0.0, 0.0, 1.0), workers=1,
             progress=False)
        train(root, "a")
        train(root, "b", "method.tau=0.5", "method.warmup_epochs=1")

    return shared_folder(tmp_path_factory, "evaluate-runs", build)


@pytest.fixture(scope="module")
def work(tmp_path_factory, evaluate_runs: Path) -> Path:
    """This worker's copy of evaluate_runs: the tests write their outputs into it and check that nothing
    else appears there."""
    return copy_workdir(evaluate_runs, tmp_path_factory.mktemp("evaluate") / "work")


def test_training_summary_names_the_best_model_and_a_rerun_says_it_is_finished(work: Path, capsys) -> None:
    summary = json.loads((work / "runs/a/summary.json").read_text())
    assert summary["best"].split()[0] in ("warmup", "round") and summary["best_model"].endswith("best")
    for key in ("best_val", "test_acc_of_best", "warmup_best_val"):
        assert summary[key] == round(summary[key], 4)
    records = read_metrics(work / "runs/a/metrics.jsonl")
    test = [r for r in records if r["kind"] == "test"]
    assert len(test) == 1 and test[0]["test/acc"] == pytest.approx(summary["test_acc_of_best"], abs=1e-4)
    capsys.readouterr()
    # the trainer's entry point in this process: a finished run is reported before any training
    assert train_main(["--config", str(work / "config.yaml"), "run.name=a"]) == 0
    again = capsys.readouterr().err
    assert "has already finished" in again and "run.resume=never" in again, again[-2000:]
    assert json.loads((work / "runs/a/summary.json").read_text()) == summary
    assert len([r for r in read_metrics(work / "runs/a/metrics.jsonl") if r["kind"] == "test"]) == 1


def test_eval_two_test_sets_json_pictures_and_the_trainers_own_figure(work: Path) -> None:
    out = ok(cli("eval", work / "runs/a", "--shards", work / "shards", "--shards", f"{work / 'ck48'}:test"))
    assert "classes present" in out and "no test-time augmentation" in out
    results = json.loads((work / "runs/a/eval/eval.json").read_text())
    synthetic, ck = results["sets"]
    summary = json.loads((work / "runs/a/summary.json").read_text())
    assert synthetic["all_classes"]["accuracy"] == pytest.approx(summary["test_acc_of_best"], abs=1e-4)
    assert synthetic["n"] == read_manifest(work / "shards").splits["test"].labelled
    assert synthetic["present_classes"] is None and len(synthetic["classes_present"]) == 7
    assert "neutral" not in ck["classes_present"] and ck["present_classes"] is not None
    assert ck["n"] == 4 and sum(map(sum, ck["all_classes"]["confusion"])) == 4
    for name in (*synthetic["files"].values(), *ck["files"].values()):
        image = cv2.imread(str(work / "runs/a/eval" / name))
        assert image is not None and min(image.shape[:2]) > 200, name
    assert set(ck["files"]) == {"confusion", "reliability", "confusion-present", "reliability-present"}
    flipped = ok(cli("eval", work / "runs/a", "--shards", work / "shards", "--tta", "tencrop", "--out",
                     work / "tta"))
    assert "ten-crop" in flipped
    assert json.loads((work / "tta/eval.json").read_text())["tta"] == "tencrop"


def constant_export(path: Path, cls: int, logit: float = 2.0) -> Path:
    net = build_model(ModelSpec(backbone="small_cnn", pretrained=False, trainable="all"))
    last = [m for m in net.head.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[cls] = logit
    return export_model(net, path)


def test_a_constant_model_scores_what_its_class_share_gives(work: Path) -> None:
    constant_export(work / "constant", 3)
    ok(cli("eval", work / "constant", "--shards", work / "shards"))
    scored = json.loads((work / "constant-eval/eval.json").read_text())["sets"][0]["all_classes"]
    counts = read_manifest(work / "shards").splits["test"].class_counts
    n = sum(v for k, v in counts.items() if k != "unlabelled")
    share = counts["happy"] / n
    conf = np.exp(2.0) / (np.exp(2.0) + 6)
    assert scored["accuracy"] == pytest.approx(share)
    assert scored["uar"] == pytest.approx(1 / 7)
    assert scored["macro_f1"] == pytest.approx(2 * share / (1 + share) / 7)
    assert scored["calibration"]["ece"] == pytest.approx(abs(share - conf), abs=1e-6)


def on_two_processes(work: Path, *args: str | Path) -> None:
    """`accelerate launch` (2 gloo processes) `-m fer_dist.cli ARGS`."""
    command = [str(VENV_BIN / "accelerate"), "launch", "--config_file", CPU_2PROC, "--main_process_port",
               str(free_port()), "-m", "fer_dist.cli", *map(str, args)]
    result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.xdist_group("launch")  # 2 ranks: a launch slot (conftest.py)
def test_eval_on_two_gloo_processes_counts_each_sample_once(work: Path) -> None:
    ok(cli("eval", work / "runs/a", "--shards", work / "shards:test,val", "--out", work / "one"))
    on_two_processes(work, "eval", work / "runs/a", "--shards", work / "shards:test,val", "--out",
                     work / "two", "--batch-size", "7")
    one = json.loads((work / "one/eval.json").read_text())["sets"][0]["all_classes"]
    two = json.loads((work / "two/eval.json").read_text())["sets"][0]["all_classes"]
    m = read_manifest(work / "shards")
    assert two["n"] == one["n"] == m.splits["test"].labelled + m.splits["val"].labelled
    assert two["confusion"] == one["confusion"]
    assert two["calibration"]["ece"] == pytest.approx(one["calibration"]["ece"], abs=1e-6)


def test_intensity_draws_the_grid_and_scores_each_sequence(work: Path) -> None:
    out = ok(cli("intensity", work / "runs/a", "--shards", f"{work / 'shards'}:train,val,test"))
    report = json.loads((work / "runs/a/intensity/intensity.json").read_text())
    assert report["sequences"] == 12 * 6 and report["score_basis"] == "spearman_intensity"
    curve = report["curves"][0]
    assert curve["position"] == [0, 0.25, 0.5, 0.75, 1.0] and curve["intensity"] == curve["position"]
    # the score, computed another way: the mean over sequences of Spearman's rho of intensity (5 distinct
    # steps, ranks 1..5) and the probability (average ranks by counting), constant curves left out
    rhos = []
    for c in report["curves"]:
        p = np.asarray(c["prob"])
        ranks = np.array([(p < v).sum() + ((p == v).sum() + 1) / 2 for v in p])
        if np.ptp(ranks) > 0:
            rhos.append(np.corrcoef(np.arange(1, 6), ranks)[0, 1])
    assert rhos and report["score"] == pytest.approx(np.mean(rhos), abs=1e-9)
    assert f"{report['score']:.4f}" in out
    image = cv2.imread(str(work / "runs/a/intensity/intensity.png"))
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 600


@pytest.mark.xdist_group("launch")  # 2 ranks: a launch slot (conftest.py)
def test_intensity_and_predict_on_two_gloo_processes_match_one(work: Path) -> None:
    target = f"{work / 'shards'}:val,test"
    ok(cli("intensity", work / "runs/a", "--shards", target, "--out", work / "i1"))
    on_two_processes(work, "intensity", work / "runs/a", "--shards", target, "--out", work / "i2",
                     "--batch-size", "5")
    one, two = (json.loads((work / d / "intensity.json").read_text()) for d in ("i1", "i2"))
    assert two["sequences"] == one["sequences"] > 0
    assert [c["frames"] for c in two["curves"]] == [c["frames"] for c in one["curves"]]
    assert two["score"] == pytest.approx(one["score"], abs=1e-6)
    faces = work / "faces2"
    faces.mkdir()
    first = read_manifest(work / "shards").splits["test"].shards[0].first_id
    for i in range(5):
        cv2.imwrite(str(faces / f"f{i}.png"), shard_face(work / "shards", first + i)[0].numpy())
    ok(cli("predict", work / "runs/a", faces, "--out", work / "p1.json"))
    on_two_processes(work, "predict", work / "runs/a", faces, "--out", work / "p2.json")
    rows1, rows2 = (json.loads((work / f).read_text()) for f in ("p1.json", "p2.json"))
    assert [r["path"] for r in rows2] == [r["path"] for r in rows1] and len(rows2) == 5
    for a, b in zip(rows1, rows2, strict=True):
        assert b["p_happy"] == pytest.approx(a["p_happy"], abs=1e-6)


def shard_face(shards: Path, sid: int) -> torch.Tensor:
    shard = next(s for s in ShardSet([(shards, ["test"])]).shards(0) if s.first_run_id <= sid < s.first_run_id
                 + s.count)
    (_, members), = read_samples(shard.index(), np.array([sid]), ("png",))
    return decode_png(members["png"], str(shard.path), sid)


def test_predict_gives_the_models_probabilities_and_reports_what_has_no_face(work: Path) -> None:
    images = work / "images"
    images.mkdir()
    first = read_manifest(work / "shards").splits["test"].shards[0].first_id
    face = shard_face(work / "shards", first)
    cv2.imwrite(str(images / "face.png"), face[0].numpy())
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    cv2.imwrite(str(images / "noise.png"), np.random.default_rng(0).integers(0, 255, (90, 90), np.uint8))
    ok(cli("predict", work / "runs/a", images, "--out", work / "p.csv"))
    rows = {Path(r.split(",")[0]).name: r.split(",") for r in (work / "p.csv").read_text().splitlines()[1:]}
    probs = np.array([float(v) for v in rows["face.png"][4:]])
    expected = batch_probs(load_model(work / "runs/a").net, face[None], "none")[0].numpy()
    assert probs == pytest.approx(expected, abs=1e-6) and probs.sum() == pytest.approx(1, abs=1e-5)
    assert rows["broken.jpg"][1].startswith("unreadable") and rows["broken.jpg"][2] == ""
    ok(cli("predict", work / "runs/a", images, "--align", "haar", "--out", work / "p.json"))
    found = {Path(r["path"]).name: r for r in json.loads((work / "p.json").read_text())}
    assert found["noise.png"]["status"] == "no face found" and found["noise.png"]["predicted"] is None


@pytest.mark.xdist_group("launch")  # 2 ranks: a launch slot (conftest.py)
def test_export_onnx_from_the_best_model_and_from_a_checkpoint(work: Path) -> None:
    import onnxruntime

    out = ok(cli("export", work / "runs/a", "--onnx", work / "a.onnx"))
    assert "max |logit difference|" in out
    on_two_processes(work, "export", work / "runs/a", "--onnx", work / "a2.onnx")  # written once, not raced
    assert (work / "a2.onnx").read_bytes() == (work / "a.onnx").read_bytes()
    checkpoint = latest_checkpoint(work / "runs/a")
    ok(cli("export", checkpoint, "--onnx", work / "ckpt.onnx", "--shards", f"{work / 'shards'}:test"))
    first = read_manifest(work / "shards").splits["test"].shards[0].first_id
    faces = torch.stack([shard_face(work / "shards", i) for i in range(first, first + 5)])
    for onnx_file, model in ((work / "a.onnx", work / "runs/a"), (work / "ckpt.onnx", checkpoint)):
        session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        got = session.run(None, {"faces": faces.numpy()})[0]
        with torch.no_grad():
            expected = load_model(model).net(faces).numpy()
        assert got.shape == (5, 7) and np.abs(got - expected).max() < 1e-4


def test_compare_lists_what_differs_and_what_each_run_reached(work: Path) -> None:
    ok(cli("eval", work / "runs/b", "--shards", work / "shards"))
    out = ok(cli("compare", work / "runs/a", work / "runs/b", "--out", work / "cmp"))
    comparison = json.loads((work / "cmp/compare.json").read_text())
    assert {"method.tau", "method.warmup_epochs", "run.name"} <= set(comparison["differing_keys"])
    assert "method.eps" not in comparison["differing_keys"] and "config values that differ" in out
    a, b = comparison["runs"]
    for run, name in ((a, "a"), (b, "b")):
        summary = json.loads((work / "runs" / name / "summary.json").read_text())
        assert run["rounds"] == summary["rounds"] and run["warmup_epochs"] == summary["warmup_epochs"]
        assert run["best_val"] == pytest.approx(summary["best_val"], abs=1e-4)
    assert list(b["eval"]) == ["shards:test"]  # fer-dist eval's results, read back from runs/b/eval
    assert cv2.imread(str(work / "cmp/compare.png")) is not None


def test_cv_trains_every_fold_and_continues_where_it_stopped(work: Path) -> None:
    """One process per fold: `fer-dist cv` launches them as `fer-dist train` does (tests/test_launch.py)."""
    pack("synthetic", [], work / "folds", options=SourceOptions(subjects=6, frames=3), split=(1.0, 0.0, 0.0),
         folds=3, workers=1, progress=False)
    base = yaml.safe_load((work / "config.yaml").read_text())
    base["data"] = {"labelled": [{"dir": str(work / "folds"), "splits": ["train"]}], "num_workers": 0,
                    "val": [{"dir": str(work / "folds"), "splits": ["train"]}]}
    base["method"].update(self_training=False, warmup_epochs=1)
    base["run"]["name"] = "cvrun"
    (work / "cv.yaml").write_text(yaml.safe_dump(base))
    out = ok(cli("cv", "--config", work / "cv.yaml", "--folds", "3", "--processes", "1", cwd=work))
    summary = json.loads((work / "runs/cvrun-cv/cv.json").read_text())
    assert [r["fold"] for r in summary["records"]] == [0, 1, 2] and "mean ± sd" in out
    assert sum(r["n"] for r in summary["records"]) == read_manifest(work / "folds").splits["train"].labelled
    accs = [r["accuracy"] for r in summary["records"]]
    assert summary["mean_std"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    for k in range(3):
        config = yaml.safe_load((work / f"runs/cvrun-fold{k}/config.yaml").read_text())
        val = (k + 1) % 3
        assert config["data"]["test"][0]["folds"] == [k] and config["data"]["val"][0]["folds"] == [val]
        assert sorted(config["data"]["labelled"][0]["folds"]) == [f for f in range(3) if f not in (k, val)]
    # an interrupted cross-validation: fold 1 lost its end; the same command trains only fold 1 again
    stamps = {k: (work / f"runs/cvrun-fold{k}/summary.json").stat().st_mtime_ns for k in (0, 2)}
    (work / "runs/cvrun-fold1/summary.json").unlink()
    ok(cli("cv", "--config", work / "cv.yaml", "--folds", "3", "--processes", "1", cwd=work))
    assert {k: (work / f"runs/cvrun-fold{k}/summary.json").stat().st_mtime_ns for k in (0, 2)} == stamps
    assert (work / "runs/cvrun-fold1/summary.json").is_file()
    assert json.loads((work / "runs/cvrun-cv/cv.json").read_text())["records"] == summary["records"]


BAD = {
    "missing model": (["eval", "{w}/nosuch", "--shards", "{w}/shards"], "no such model"),
    "not a model": (["eval", "{w}/shards", "--shards", "{w}/shards"], "neither a run directory"),
    # eval's cases name their own --out: the run's eval/ holds an earlier test's result, refused first
    "missing split": (["eval", "{w}/runs/a", "--shards", "{w}/shards:nosplit", "--out", "{w}/e1"],
                      "no split 'nosplit'"),
    "no test set": (["eval", "{w}/runs/a"], "Missing option"),
    "bad tta": (["eval", "{w}/runs/a", "--shards", "{w}/shards", "--tta", "x", "--out", "{w}/e2"], "--tta"),
    # its own --out: the run's intensity/ holds another set's result, which is refused first
    "no sequences": (["intensity", "{w}/runs/a", "--shards", "{w}/ck48:test", "--out", "{w}/ck48-intensity"],
                     "no sequence"),
    "predict out": (["predict", "{w}/runs/a", "{w}/shards", "--out", "{w}/x.txt"], ".csv or a .json"),
    "predict missing": (["predict", "{w}/runs/a", "{w}/nothing.png"], "no such file"),
    "predict no face": (["predict", "{w}/runs/a", "{w}/unreadable", "--out", "{w}/u.csv"],
                        "none of the 1 images gave a face (the first: "),
    "compare not a run": (["compare", "{w}/shards"], "not a run directory"),
    "export no faces": (["export", "{w}/constant", "--onnx", "{w}/c.onnx"], "--shards"),
    "cv two folds": (["cv", "--config", "{w}/config.yaml", "--folds", "2"], "use 3 or more"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(work: Path, case: str) -> None:
    if case == "export no faces" and not (work / "constant").exists():
        constant_export(work / "constant", 3)
    if case == "predict no face" and not (work / "unreadable").exists():
        (work / "unreadable").mkdir()
        (work / "unreadable" / "broken.jpg").write_bytes(b"not a jpeg")
    args, fragment = BAD[case]
    before = sorted(p.name for p in work.iterdir())
    result = cli(*[a.format(w=work) for a in args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert fragment in result.output, result.output
    if fragment != "Missing option":  # Click's own usage errors are several lines; ours are one
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert sorted(p.name for p in work.iterdir()) == before  # nothing written
