"""The experiment runner (tools/experiments/): definitions, records, RESULTS.md, and a tiny run end to end.

The end-to-end test runs two arms on a tiny synthetic set (small CNN, 2 warm-up epochs, 1 round), then the
same command again (everything recorded: nothing trains), then a third arm and seed killed mid-warm-up with
the runner, and the same command once more: the training resumes from its checkpoint and is recorded.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "experiments"
sys.path.insert(0, str(TOOLS))
from records import REQUIRED, add_record, read_records, recorded  # noqa: E402
from report import README_BEGIN, README_END, interval, mean_sd, render, verdict  # noqa: E402
from report import main as report_main  # noqa: E402
from run import code_checkout, environment  # noqa: E402
from run import main as run_main  # noqa: E402
from spec import read_experiment  # noqa: E402

from fer_dist.errors import FerDistError  # noqa: E402

REPO = TOOLS.parents[1]


def _base(tmp: Path) -> Path:
    base = tmp / "base.yaml"
    ref = lambda split: [{"dir": "shards/syn", "splits": [split]}]  # noqa: E731
    base.write_text(yaml.safe_dump({
        "data": {"labelled": ref("train"), "unlabelled": ref("train"), "val": ref("val"), "test": ref("test"),
                 "num_workers": 0},
        "model": {"backbone": "small_cnn", "pretrained": False, "trainable": "all"},
        "method": {"warmup_epochs": 2, "warmup_patience": 5, "max_rounds": 1, "tau": 0.3},
        "optim": {"lr": 0.002, "batch_size": 16},
    }))
    return base


def _experiment(tmp: Path, file: str = "tiny.yaml", **changes) -> Path:
    tree = {
        "name": "tiny", "description": "a tiny synthetic run", "base": str(_base(tmp)),
        "seeds": [0], "shards": [{"dataset": "synthetic", "out": "shards/syn",
                                  "args": ["--subjects", 12, "--frames", 5, "--workers", 1]}],
        "test": [{"dir": "shards/syn", "splits": ["test"]}],
        "intensity": {"dir": "shards/syn", "splits": ["test"]},
        "arms": {"smoothing": {"method.self_training": False},
                 "both_adaptive": {"method.threshold": "class_adaptive"}},
    }
    tree.update(changes)
    path = tmp / file
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _record(arm: str, seed: int, acc: float) -> dict:
    return {"arm": arm, "seed": seed, "test_accuracy": acc, "macro_f1": acc - 0.1, "val_accuracy": acc,
            "rounds": 2, "confident_per_round": [10, 5], "drawn_per_round": [4, 3], "wall_s": 60.0,
            "commit": "abc", "machine": "test", "date": "2026-12-01 00:00 UTC", "test_set": "syn:test"}


# ------------------------------------------------------------------------------------------------ definitions


def test_the_shipped_definitions_are_valid_and_name_the_papers_arms(monkeypatch):
    monkeypatch.chdir(REPO)
    for path in sorted((REPO / "launch_configs" / "experiments").glob("*.yaml")):
        exp = read_experiment(path.relative_to(REPO))
        assert len(exp.seeds) >= 3 and exp.arms, path
        if exp.kind == "ablation":  # the paper's arms (or some of them, the baseline always), in its order
            paper = ["baseline", "smoothing", "unlabelled", "both", "both_adaptive"]
            arms = list(exp.arms)
            assert arms[0] == "baseline" and arms == [a for a in paper if a in arms], path


@pytest.mark.parametrize("change,field", [
    ({"colour": 1}, "colour: unknown key"), ({"seeds": [0, 0]}, "seeds"), ({"arms": {}}, "arms"),
    ({"arms": {"a": {"method.tau": 7}}}, "arms.a"), ({"arms": {"a": {"method.nope": 1}}}, "arms.a"),
    ({"test": [{"dir": "x"}]}, "test[0]"), ({"kind": "other"}, "kind"), ({"base": "missing.yaml"}, "base"),
    ({"code": "main"}, "code"), ({"reading": {"why": "x"}}, "reading"),
    ({"reading": {"levels": 1}}, "reading"),
])
def test_a_bad_definition_is_one_line_naming_the_field(tmp_path, change, field):
    path = _experiment(tmp_path, **change)
    with pytest.raises(FerDistError, match=f"{path}: {field}".replace("[", r"\[")):
        read_experiment(path)


def test_a_pinned_code_checkout_comes_before_the_working_directory(tmp_path) -> None:
    # `python -m` puts the working directory (this checkout) first on sys.path; the pinned checkout must win,
    # in the trainer and in every process accelerate starts (they inherit the environment).
    pinned = tmp_path / "pinned"
    (pinned / "fer_dist").mkdir(parents=True)
    (pinned / "fer_dist" / "__init__.py").write_text("PINNED = True\n")
    exp = read_experiment(_experiment(tmp_path), check_configs=False)
    probe = [sys.executable, "-c", "import fer_dist; print(getattr(fer_dist, 'PINNED', False))"]
    ran = subprocess.run(probe, cwd=REPO, env=environment(exp, pinned), capture_output=True, text=True)
    assert ran.stdout.strip() == "True", ran.stderr
    unpinned = subprocess.run([sys.executable, "-m", "fer_dist.train", "--help"], cwd=REPO,
                              env=environment(exp), capture_output=True, text=True)
    assert unpinned.returncode == 0  # without a pin, this checkout's fer_dist


def test_a_pinned_commit_that_does_not_exist_is_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    exp = read_experiment(_experiment(tmp_path, code="0000000"), check_configs=False)
    with pytest.raises(FerDistError, match="code: cannot check out 0000000: "):
        code_checkout(exp, tmp_path / "runs")
    assert not (tmp_path / "runs" / "code" / "0000000").exists()


def test_the_runner_refuses_bad_input_in_one_line_before_doing_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for args in ([str(_experiment(tmp_path, "bad.yaml", seeds=[0, 0]))],
                 [str(_experiment(tmp_path)), "--arms", "nope"],
                 [str(_experiment(tmp_path)), "--set", "method.tau=3"], [str(tmp_path / "missing.yaml")]):
        assert run_main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "shards").exists() and not (tmp_path / "docs").exists()  # nothing half-done


# ---------------------------------------------------------------------------------------------------- records


def test_records_append_atomically_and_refuse_a_second_of_the_same_arm_and_seed(tmp_path):
    path = tmp_path / "r" / "x.json"
    assert read_records(path) == []
    add_record(path, _record("both", 0, 0.5))
    add_record(path, _record("both", 1, 0.6))
    assert recorded(read_records(path)) == {("both", 0), ("both", 1)}
    with pytest.raises(FerDistError, match="already recorded"):
        add_record(path, _record("both", 1, 0.7))
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
    path.write_text(json.dumps([{"arm": "a"}]))
    with pytest.raises(FerDistError, match=f"{path}: record 0: missing 'seed'"):
        read_records(path)


# ------------------------------------------------------------------------------------------------- RESULTS.md


def test_results_without_records_say_so_and_hold_no_figure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = render([read_experiment(_experiment(tmp_path), check_configs=False)], tmp_path / "results")
    assert "No runs are recorded yet" in text and "No runs of this experiment are recorded yet" in text
    assert "tools/experiments/run.py" in text and "± " not in text


def test_results_give_mean_spread_and_paired_gains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = _experiment(tmp_path, arms={"baseline": {}, "smoothing": {}}, seeds=[0, 1, 2])
    for seed, (b, s) in enumerate([(0.50, 0.53), (0.52, 0.54), (0.54, 0.58)]):
        add_record(tmp_path / "results" / "tiny.json", _record("baseline", seed, b))
        add_record(tmp_path / "results" / "tiny.json", _record("smoothing", seed, s))
    text = render([read_experiment(exp, check_configs=False)], tmp_path / "results")
    assert "| baseline | 0, 1, 2 | 52.00 ± 2.00 |" in text
    assert "| smoothing | 0, 1, 2 | 55.00 ± 2.65 |" in text
    # gains 3, 2, 4 points: mean 3, sd 1, standard error 0.577
    assert ("smoothing vs baseline, label smoothing alone: +3.00 ± 1.00 points over 3 paired seeds (a gain"
            in text)
    # the 95 % t interval over 3 seeds: 3 -+ 4.303 / sqrt(3) = 0.52 to 5.48, which holds the paper's +2
    assert "per seed +3.00, +2.00, +4.00; 95 % interval +0.52 to +5.48)" in text
    assert "the paper reports +2.0 points, inside our interval" in text
    assert "No runs are recorded yet" not in text
    assert "Test set: " not in text  # these records give no n_test


def test_results_read_intensity_resolution_and_the_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    setting = {"setting": "a tiny   synthetic\nset.", "levels": False}
    exp = _experiment(tmp_path, arms={"baseline": {}, "both": {}}, seeds=[0, 1], reading=setting)
    for seed, (b, s) in enumerate([(0.5, 0.75), (0.5, 0.5)]):
        for arm, acc, rho in (("baseline", b, 0.5 + seed / 10), ("both", s, 0.9)):
            add_record(tmp_path / "results" / "tiny.json", dict(
                _record(arm, seed, acc), n_test=40, intensity={"spearman_mean": rho, "mean_abs_step": 0.1}))
    text = render([read_experiment(exp, check_configs=False)], tmp_path / "results")
    assert "| both | 0, 1 | 0.900 ± 0.000 | 0.100 ± 0.000 |" in text
    # rho gains 0.4 and 0.3: mean 0.35, sd 0.0707, 12.706 x 0.05 = 0.635
    assert "- both vs baseline, smoothing and unlabelled data (the method): +0.350 ± 0.071 over 2" in text
    assert "95 % interval -0.285 to +0.985)" in text
    assert "Test set: 40 faces, one face = 2.50 points" in text  # sqrt(.5625 * .4375 / 40) = 7.84 %
    assert "binomial standard error of one model's accuracy near 56 % is 7.84 points." in text
    assert "Where this setting differs from the paper's: a tiny synthetic set." in text
    assert "Levels:" not in text
    exp = _experiment(tmp_path, arms={"baseline": {}, "both": {}}, seeds=[0, 1], reading={"levels": True})
    assert "- Levels: our baseline 50.00 %" in render([read_experiment(exp, check_configs=False)],
                                                      tmp_path / "results")


def test_crossdb_results_show_other_test_sets_and_twin_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = _experiment(tmp_path, kind="crossdb", arms={"no_unlabelled": {}, "unlabelled_target": {}})
    for arm, acc, other in (("no_unlabelled", 0.40, 0.60), ("unlabelled_target", 0.45, 0.59)):
        record = dict(_record(arm, 0, acc), other_tests=[{"test_set": "fer:test", "accuracy": other}])
        if arm == "no_unlabelled":
            record["trained_for"] = "ablation:smoothing"
        add_record(tmp_path / "results" / "tiny.json", record)
    text = render([read_experiment(exp, check_configs=False)], tmp_path / "results")
    assert "| fer:test acc % |" in text
    assert "| no_unlabelled (trained as ablation:smoothing) | 0 | syn:test | 40.00 | 30.00 | 60.00 |" in text
    assert "unlabelled_target vs no_unlabelled" in text and "+5.00 points from one seed" in text
    # +5 against the paper's +11; the records' confident counts fall from 10 to 5, and the reading says so
    assert "(ours -6.00 points from it)" in text and "the selection shrinks from the first round" in text
    grown = dict(_record("unlabelled_target", 1, 0.5), confident_per_round=[5, 10])
    add_record(tmp_path / "results" / "tiny.json", dict(_record("no_unlabelled", 1, 0.4)))
    (tmp_path / "results" / "tiny.json").write_text(json.dumps(
        [r for r in read_records(tmp_path / "results" / "tiny.json") if r["arm"] != "unlabelled_target"]
        + [grown]))
    text = render([read_experiment(exp, check_configs=False)], tmp_path / "results")
    assert "shrinks" not in text and "| no_unlabelled (seed 0 trained as ablation:smoothing) | 0, 1 |" in text


def test_report_rewrites_the_readme_block_only_and_refuses_a_readme_without_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exps").mkdir()
    _experiment(tmp_path, "exps/tiny.yaml", arms={"baseline": {}, "smoothing": {}}, seeds=[0, 1])
    for seed, (b, s) in enumerate([(0.50, 0.53), (0.52, 0.56)]):
        add_record(tmp_path / "results" / "tiny.json", _record("baseline", seed, b))
        add_record(tmp_path / "results" / "tiny.json", _record("smoothing", seed, s))
    readme = tmp_path / "README.md"
    readme.write_text(f"# head\n{README_BEGIN}\nold table\n{README_END}\ntail\n")
    args = ["--experiments", "exps", "--results-dir", "results", "--out", "R.md", "--readme", str(readme)]
    assert report_main(args) == 0
    text = readme.read_text()
    assert text.startswith(f"# head\n{README_BEGIN}\n| experiment") and text.endswith(f"{README_END}\ntail\n")
    assert "old table" not in text and "| tiny (syn:test) | baseline | 2 | 51.00 ± 1.41 |" in text
    # gains 3 and 4 points: mean 3.5, sd 0.707, 12.706 x 0.5 = 6.35
    # the paper's +2 for smoothing lies inside that interval
    assert "| smoothing | 2 | 54.50 ± 2.12 | baseline | +3.50 (-2.85 to +9.85) | +2.0 (inside ours) | - |" \
        in text
    assert "4 records, 2026-12-01 00:00 UTC to 2026-12-01 00:00 UTC; machines: test; commits: abc." in text
    readme.write_text("no block\n")
    assert report_main(args) == 2 and readme.read_text() == "no block\n"
    assert f"{readme}: expected one line" in capsys.readouterr().err
    assert report_main(args[:-1] + [""]) == 0 and readme.read_text() == "no block\n"  # --readme '': none


def test_results_show_warmups_that_ran_their_whole_budget(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = _experiment(tmp_path, arms={"baseline": {"method.warmup_epochs": 3}, "both": {}}, seeds=[0, 1])
    curves = {("baseline", 0): [0.5, 0.6, 0.62], ("baseline", 1): [0.5, 0.55], ("both", 0): [0.4, 0.5, 0.6]}
    for (arm, seed), curve in curves.items():
        record = dict(_record(arm, seed, 0.5), val_per_warmup_epoch=curve)
        add_record(tmp_path / "results" / "tiny.json", record)
    text = render([read_experiment(exp, check_configs=False)], tmp_path / "results")
    # baseline seed 1 stopped early (2 of 3 epochs) and `both` has no budget of its own: one run is shown
    assert "| baseline | 0 | 50.00 60.00 62.00 |" in text and "| 40.00 50.00 60.00 |" not in text
    assert "validation accuracy moved by +12.00 ± 0.00 points (1 run;" in text


def test_verdict_and_mean_sd_known_answers():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert "not distinguishable from seed noise" in verdict([1.0, -1.0, 0.5])
    assert "a loss" in verdict([-3.0, -3.5, -2.5])
    assert "one seed" in verdict([2.0])
    # 4 seeds: t(0.975, 3) = 3.182; 15 seeds: t(0.975, 14) = 2.145, which the approximation meets to 0.01
    assert "95 % interval -0.60 to +4.60" in verdict([0.0, 2.0, 2.0, 4.0])  # sd (8/3)^0.5, half 2.598
    gains = [1.0, 3.0] * 7 + [2.0]
    lo, hi = interval(gains)
    assert abs((hi - lo) / 2 / (statistics.stdev(gains) / 15 ** 0.5) - 2.145) < 0.01


def test_a_stop_signal_to_the_runner_reaches_the_training_and_stops_the_runner(tmp_path):
    marker = tmp_path / "child-got-sigterm"
    child = ("import signal, sys, time, pathlib\n"
             f"mark = pathlib.Path({str(marker)!r})\n"
             "signal.signal(signal.SIGTERM, lambda *a: (mark.touch(), sys.exit(0)))\n"
             "print('ready', flush=True)\ntime.sleep(60)\n")
    script = (f"import sys; sys.path.insert(0, {str(TOOLS)!r})\n"
              "from run import Stopped, run_child\n"
              f"try:\n    run_child([sys.executable, '-c', {child!r}], dict(__import__('os').environ))\n"
              "except Stopped:\n    sys.exit(3)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 3 and marker.exists()
    proc.stdout.close()


# ------------------------------------------------------------------------------------------------- end to end


def _runner(tmp: Path, path: Path, *args: str) -> list[str]:
    return [sys.executable, str(TOOLS / "run.py"), str(path), "--runs-dir", "runs", "--results-dir",
            "results", *args]


@pytest.mark.slow
@pytest.mark.timeout(900)  # three trainings and six runner invocations: over 300 s on a loaded 2-core machine
def test_runner_end_to_end_skips_recorded_and_resumes_an_interrupted_arm(tmp_path):
    path = _experiment(tmp_path)
    done = subprocess.run(_runner(tmp_path, path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_records(tmp_path / "results" / "tiny.json")
    assert [(r["arm"], r["seed"]) for r in records] == [("smoothing", 0), ("both_adaptive", 0)]
    for r in records:
        assert set(REQUIRED) <= set(r) and 0.0 <= r["test_accuracy"] <= 1.0 and r["test_set"] == "syn:test"
        assert -1.0 <= r["intensity"]["spearman_mean"] <= 1.0 and r["intensity"]["sequences"] > 0
        assert r["wall_s"] > 0 and r["machine"]
    smoothing, adaptive = records
    assert smoothing["rounds"] == 0 and smoothing["confident_per_round"] == []
    assert adaptive["rounds"] == 1 and len(adaptive["confident_per_round"]) == 1
    assert len(adaptive["thresholds_per_round"][0]) == 7
    # the run's own test accuracy (the trainer's finish, rounded to 4 digits there) and the runner's agree
    summary = json.loads((tmp_path / "runs" / "tiny" / "both_adaptive-s0" / "summary.json").read_text())
    assert summary["test_acc_of_best"] == pytest.approx(adaptive["test_accuracy"], abs=6e-5)
    assert adaptive["val_accuracy"] == pytest.approx(summary["best_val"], abs=6e-5)

    again = subprocess.run(_runner(tmp_path, path), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("recorded, skipped") == 2
    assert "fer_dist.train" not in again.stdout  # nothing trained
    assert read_records(tmp_path / "results" / "tiny.json") == records

    # An arm of another experiment that trains exactly what `smoothing` trained is tested, not trained again.
    twin = _experiment(tmp_path, "twin.yaml", name="twin", arms={"alias": {"method.self_training": False},
                                                                  "other": {"method.tau": 0.4}})
    shared = subprocess.run(_runner(tmp_path, twin, "--arms", "alias", "--dry-run"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert "trained as tiny smoothing" in shared.stdout and "fer_dist.train" not in shared.stdout
    shared = subprocess.run(_runner(tmp_path, twin, "--arms", "alias"), cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert shared.returncode == 0 and "fer_dist.train" not in shared.stdout, shared.stderr[-3000:]
    (alias,) = read_records(tmp_path / "results" / "twin.json")
    assert alias["trained_for"] == "tiny:smoothing" and alias["run_dir"] == smoothing["run_dir"]
    for key in ("test_accuracy", "val_accuracy", "rounds", "wall_s", "commit"):
        assert alias[key] == smoothing[key]
    other = subprocess.run(_runner(tmp_path, twin, "--arms", "other", "--dry-run"), cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert "fer_dist.train" in other.stdout  # a different tau is a different training

    cmd = _runner(tmp_path, path, "--seeds", "1", "--arms", "both_adaptive")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    # kill once `latest` names a warm-up checkpoint (a checkpoint folder alone may not be in `latest` yet)
    latest = tmp_path / "runs" / "tiny" / "both_adaptive-s1" / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().startswith("warmup-")):
        assert proc.poll() is None and time.monotonic() < deadline, "no warm-up checkpoint appeared"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the runner and its training, at once
    proc.wait(timeout=30)
    proc.stdout.close()
    assert ("both_adaptive", 1) not in recorded(read_records(tmp_path / "results" / "tiny.json"))
    resumed = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    records = read_records(tmp_path / "results" / "tiny.json")
    assert [(r["arm"], r["seed"]) for r in records][-1] == ("both_adaptive", 1)
    assert records[-1]["rounds"] == 1
