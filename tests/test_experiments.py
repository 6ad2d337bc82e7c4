"""The experiment runner (fer_dist/experiments/, `fer-dist experiment`): definitions, records, RESULTS.md,
the README's block, and a tiny run end to end.

The end-to-end test runs two arms on a tiny synthetic set (small CNN, 2 warm-up epochs, 1 round), then the
same command again (everything recorded: nothing trains), then a third arm and seed killed mid-warm-up with
the runner, and the same command once more: the training resumes from its checkpoint and is recorded.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fer_dist.classes import CLASSES
from fer_dist.cli import app
from fer_dist.errors import FerDistError
from fer_dist.experiments.diagnostics import selection
from fer_dist.experiments.publish import README_END, publish
from fer_dist.experiments.records import (
    REQUIRED,
    add_record,
    boot_id,
    cpu_model,
    host_id,
    machine,
    read_records,
    recorded,
)
from fer_dist.experiments.report import data_line, render
from fer_dist.experiments.run import check_warmup, code_checkout, environment
from fer_dist.experiments.spec import read_experiment, with_notes
from fer_dist.experiments.stats import interval, mean_sd, paired_gain, power, verdict

REPO = Path(__file__).resolve().parents[1]


def run_main(args: list[str]) -> tuple[int, str]:
    """`fer-dist experiment run ARGS` in this process: (exit code, stderr)."""
    result = CliRunner().invoke(app, ["experiment", "run", *args])
    return result.exit_code, result.stderr


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
    exps = [read_experiment(path.relative_to(REPO))
            for path in sorted((REPO / "launch_configs" / "experiments").glob("*.yaml"))]
    for exp in exps:
        assert len(exp.seeds) >= 3 and exp.arms, exp.path
        if exp.kind == "ablation":  # the paper's ablation (baseline first), the label-scarce arms, backbones
            paper = ["baseline", "smoothing", "unlabelled", "both", "both_adaptive"]
            scarce = ["supervised", "alpha", "method", "method_r", "method_adaptive", "method_hard",
                      "method_strong"]
            backbones = ["mobilenet_v2", "dlib_resnet", "dlib_resnet_112"]
            order = paper if "baseline" in exp.arms else backbones if "mobilenet_v2" in exp.arms else scarce
            arms = list(exp.arms)
            assert arms[0] == order[0] and arms == [a for a in order if a in arms], exp.path
    # the curve's points: its anchor and the definitions naming it, at the shares they declare
    shares = {e.name: e.labelled_share() for e in exps if e.name.startswith("fer2013_scarce")}
    assert shares == {"fer2013_scarce": 0.1, "fer2013_scarce_l05": 0.05, "fer2013_scarce_l25": 0.25,
                      "fer2013_scarce_gpu": 0.1, "fer2013_scarce_dlib": 0.1}
    noted = {e.name: e for e in with_notes(exps, REPO / "docs" / "results" / "notes.yaml")}
    assert noted["fer2013_converged"].retired and noted["crossdb_fer2013_ckplus48"].frames_per_sequence == 3
    assert noted["fer2013_scarce_dlib"].against == "fer2013_scarce"


@pytest.mark.parametrize("change,field", [
    ({"colour": 1}, "colour: unknown key"), ({"seeds": [0, 0]}, "seeds"), ({"arms": {}}, "arms"),
    ({"arms": {"a": {"method.tau": 7}}}, "arms.a"), ({"arms": {"a": {"method.nope": 1}}}, "arms.a"),
    ({"test": [{"dir": "x"}]}, "test[0]"), ({"kind": "other"}, "kind"), ({"base": "missing.yaml"}, "base"),
    ({"code": "main"}, "code"), ({"reading": {"why": "x"}}, "reading"),
    ({"reading": {"levels": 1}}, "reading"), ({"curve": "a b"}, "curve"),
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


def test_the_runner_refuses_bad_input_in_one_line_before_doing_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in ([str(_experiment(tmp_path, "bad.yaml", seeds=[0, 0]))],
                 [str(_experiment(tmp_path)), "--arms", "nope"],
                 [str(_experiment(tmp_path)), "--seeds", "0,x"],
                 [str(_experiment(tmp_path)), "--set", "method.tau=3"], [str(tmp_path / "missing.yaml")]):
        code, err = run_main(args)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
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
    assert sorted(p.name for p in path.parent.iterdir()) == [".x.json.lock", "x.json"]  # no temp file left
    path.write_text(json.dumps([{"arm": "a"}]))
    with pytest.raises(FerDistError, match=f"{path}: record 0: missing 'seed'"):
        read_records(path)


def test_two_processes_appending_at_once_lose_no_record(tmp_path):
    # each process appends 25 records as fast as it can; without the lock, a read-modify-replace of one
    # overwrites the other's append and records go missing
    path = tmp_path / "results" / "x.json"
    script = ("import sys\nfrom fer_dist.experiments.records import add_record\n"
              "arm, path = sys.argv[1], sys.argv[2]\nfor seed in range(25):\n"
              "    add_record(__import__('pathlib').Path(path), {'arm': arm, 'seed': seed,"
              " 'test_accuracy': 0.5, 'macro_f1': 0.5, 'val_accuracy': 0.5, 'rounds': 0,"
              " 'confident_per_round': [], 'drawn_per_round': [], 'wall_s': 1.0, 'commit': 'abc',"
              " 'machine': 'test'})\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, arm, str(path)]) for arm in ("a", "b")]
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    assert recorded(read_records(path)) == {(arm, seed) for arm in ("a", "b") for seed in range(25)}


def test_a_record_s_machine_names_the_cpu_generation_and_tells_cloned_machines_apart():
    # "AMD EPYC" alone names several generations; two VMs of one image share /etc/machine-id
    zen5 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n" \
        "model name\t: AMD EPYC\n"
    assert cpu_model(zen5 + "\n" + zen5.replace("26", "25")) == "AMD EPYC (family 26, model 2)"
    assert cpu_model("model name\t: Apple M2\n") == "Apple M2"
    assert cpu_model("processor\t: 0\n") is None
    line = machine()
    assert f", host {host_id()}" in line
    if Path("/proc/sys/kernel/random/boot_id").exists():
        assert line.endswith(f", boot {boot_id()}") and len(boot_id()) == 8 and boot_id() != host_id()


def test_submit_dry_run_renders_a_warmup_job_per_seed_and_an_array_of_its_arms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _experiment(tmp_path, shared_warmup=True, seeds=[0, 1])
    result = CliRunner().invoke(app, ["experiment", "submit", str(path), "--dry-run", "--runs-dir", "runs",
                                      "--set", "method.tau=0.4", "--time", "1:00:00", "--cpus-per-task", "2"])
    assert result.exit_code == 0, result.output
    scripts = result.stdout.split("#!/bin/bash\n")[1:]
    assert len(scripts) == 4  # warm-up s0, arms s0, warm-up s1, arms s1
    warm, arms = scripts[2], scripts[3]
    assert "#SBATCH --job-name=tiny-warmup-s1" in warm and "#SBATCH --array=0-0" in warm
    assert "--seeds 1 --warmup-only" in warm and "#SBATCH --dependency" not in warm
    assert "#SBATCH --job-name=tiny-s1" in arms and "#SBATCH --array=0-1" in arms
    assert "#SBATCH --dependency=afterok:<job id of tiny-warmup-s1>" in arms
    assert "#SBATCH --time=1:00:00" in arms and "#SBATCH --cpus-per-task=2" in arms
    assert "--set=method.tau=0.4 --seeds 1 --arms smoothing" in arms and "--arms both_adaptive" in arms
    assert f"PY=${{FER_DIST_PYTHON:-{shlex.quote(sys.executable)}}}" in arms  # the Python rendering it
    # the tasks as bash reads them: each entry one argument list
    tasks = arms.split("TASKS=(\n", 1)[1].split("\n)", 1)[0]
    got = subprocess.run(["bash", "-c", f"TASKS=(\n{tasks}\n)\neval \"ARGS=(${{TASKS[1]}})\"\n"
                          "printf '%s\\n' \"${ARGS[@]}\""], capture_output=True, text=True).stdout.split()
    assert got == [str(path), "--runs-dir", "runs", "--results-dir", "docs/results", "--set=method.tau=0.4",
                   "--seeds", "1", "--arms", "both_adaptive"]
    unshared = CliRunner().invoke(app, ["experiment", "submit", str(_experiment(tmp_path)), "--dry-run"])
    assert unshared.stdout.count("#!/bin/bash") == 1 and "#SBATCH --array=0-1" in unshared.stdout


def test_submit_refuses_missing_shards_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    (tmp_path / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "sbatch").chmod(0o755)
    result = CliRunner().invoke(app, ["experiment", "submit", str(_experiment(tmp_path))])
    assert result.exit_code == 2
    assert "shards: shards/syn missing; make them first: fer-dist shard --dataset synthetic" in result.stderr


# ------------------------------------------------------------------------------------------------- RESULTS.md


def test_results_without_records_say_so_and_hold_no_figure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = render([read_experiment(_experiment(tmp_path), check_configs=False)], tmp_path / "results")
    assert "No runs are recorded yet" in text and "No runs of this experiment are recorded yet" in text
    assert "fer-dist experiment run " in text and "± " not in text.split("## tiny")[1]


def test_results_give_mean_spread_paired_gains_and_power(tmp_path, monkeypatch):
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
    # a 2-point gain, sd 1: 3 pairs 47 %, 5 pairs 91 % (Monte Carlo of the paired t-test: 0.470, 0.911)
    assert "power for a 2-point gain at this spread (sd 1.00): 47 % with 3 seeds, 91 % with 5 seeds" in text
    assert "the paper reports +2.0 points, inside our interval" in text
    assert "No runs are recorded yet" not in text
    assert "Test set: " not in text  # these records give no n_test
    assert "machines: test, unknown host;" in text  # a record without a host id says so


def test_power_of_the_paired_t_test_matches_a_simulation():
    rng = np.random.default_rng(0)
    for n, gain, sd in ((3, 2.0, 1.0), (5, 2.0, 2.0), (4, 1.0, 1.4)):
        diffs = rng.normal(gain, sd, size=(100_000, n))
        t = diffs.mean(1) / (diffs.std(1, ddof=1) / n ** 0.5)
        crit = {3: 4.303, 5: 2.776, 4: 3.182}[n]  # t(0.975, n - 1)
        assert power(gain, sd, n) == pytest.approx(float((np.abs(t) > crit).mean()), abs=0.005)
    assert power(2.0, 2.0, 5) == pytest.approx(0.4013, abs=0.001)  # G*Power: paired, d = 1, n = 5


def test_results_read_nothing_from_two_seeds_and_count_sequences_not_frames(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    setting = {"setting": "a tiny   synthetic\nset.", "levels": False}
    exp = _experiment(tmp_path, arms={"baseline": {}, "both": {}}, seeds=[0, 1], reading=setting)
    for seed, (b, s) in enumerate([(0.5, 0.75), (0.5, 0.5)]):
        for arm, acc, rho in (("baseline", b, 0.5 + seed / 10), ("both", s, 0.9)):
            add_record(tmp_path / "results" / "tiny.json", dict(
                _record(arm, seed, acc), n_test=42, intensity={"spearman_mean": rho, "mean_abs_step": 0.1}))
    text = render([read_experiment(exp, check_configs=False)], tmp_path / "results")
    assert "| both | 0, 1 | 0.900 ± 0.000 | 0.100 ± 0.000 |" in text
    # two seeds: the per-seed values, no interval, no verdict, no side of the paper's figure
    assert ("- both vs baseline, smoothing and unlabelled data (the method): +0.350 over 2 paired seeds (per "
            "seed +0.400, +0.300): too few seeds for an interval (3 or more), no reading.") in text
    assert "interval -" not in text and "inside" not in text and "power for" not in text
    assert "+12.50 points over 2 paired seeds (per seed +25.00, +0.00): too few seeds" in text
    assert "the paper reports +4.0 points; under 3 seeds give no reading against it" in text
    assert "Test set: 42 faces, one face = 2.38 points" in text  # sqrt(.5625 * .4375 / 42) = 7.65 %
    assert "binomial standard error of one model's accuracy near 56 % is 7.65 points." in text
    # 3 near-identical frames per sequence: 14 independent faces, sqrt(.5625 * .4375 / 14) = 13.26 %
    noted = with_notes([read_experiment(exp, check_configs=False)], _notes(tmp_path, tiny={
        "frames_per_sequence": 3}))
    assert "counted as n / 3 = 14 independent faces (3 near-identical frames per sequence) is 13.26 points" \
        in render(noted, tmp_path / "results")
    assert "Where this setting differs from the paper's: a tiny synthetic set." in text
    assert "Levels:" not in text
    exp = _experiment(tmp_path, arms={"baseline": {}, "both": {}}, seeds=[0, 1], reading={"levels": True})
    assert "- Levels: our baseline 50.00 %" in render([read_experiment(exp, check_configs=False)],
                                                      tmp_path / "results")


def _notes(tmp: Path, **notes) -> Path:
    path = tmp / "results" / "notes.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(notes))
    return path


def test_a_retired_experiment_is_one_line_and_notes_are_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = read_experiment(_experiment(tmp_path, arms={"baseline": {}, "both": {}}), check_configs=False)
    for arm in ("baseline", "both"):
        add_record(tmp_path / "results" / "tiny.json", dict(_record(arm, 0, 0.5), warmup_end="cap"))
    text = render(with_notes([exp], _notes(tmp_path, tiny={"retired": "capped\n warm-ups."})),
                  tmp_path / "results")
    section = text.split("## tiny\n\n", 1)[1]
    assert section.startswith("Retired: capped warm-ups. Its 2 records stay in ")
    assert "(warm-ups: 2 of 2 capped); nothing is read from them here." in section
    assert "Reading" not in section and "|" not in section
    for bad, field in (({"other": {"retired": "x"}}, "other: no experiment"), ({"tiny": {"why": 1}}, "tiny"),
                       ({"tiny": {"frames_per_sequence": 0}}, "tiny.frames_per_sequence")):
        with pytest.raises(FerDistError, match=field):
            with_notes([exp], _notes(tmp_path, **bad))


def test_an_experiment_reads_against_another_by_seed_only_where_x_l_is_the_same(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arms = {"supervised": {}, "method": {}}
    face = read_experiment(_experiment(tmp_path, "face.yaml", name="face", arms=arms), check_configs=False)
    imagenet = read_experiment(_experiment(tmp_path, "imagenet.yaml", name="imagenet", arms=arms),
                               check_configs=False)
    x_l = [40, 4, 41, 72, 50, 48, 32]
    for seed, (ref, acc) in enumerate([(0.50, 0.53), (0.49, 0.53), (0.51, 0.54), (0.50, 0.60)]):
        other = x_l if seed < 3 else [41, 4, 41, 72, 50, 48, 31]  # seed 3: another X_l, so it does not pair
        add_record(tmp_path / "results" / "imagenet.json", dict(_record("supervised", seed, ref),
                                                                labelled_per_class=x_l))
        add_record(tmp_path / "results" / "face.json", dict(_record("supervised", seed, acc),
                                                            labelled_per_class=other))
    noted = with_notes([face, imagenet], _notes(tmp_path, face={"against": "imagenet"}))
    section = render(noted, tmp_path / "results").split("## imagenet", 1)[0]
    # seeds 0-2: +3, +4, +3 points: mean 3.33, sd 0.58, interval 3.33 -+ 4.303 x 0.577 / sqrt(3)
    assert ("- supervised vs imagenet's supervised, the same arm and X_l per seed in the other experiment "
            "(each from its own warm-up): +3.33 ± 0.58 points over 3 paired seeds (a gain; per seed +3.00, "
            "+4.00, +3.00; 95 % interval +1.90 to +4.77)") in section
    assert "method vs imagenet" not in section  # no method records: nothing to read
    for bad in ({"face": {"against": "face"}}, {"face": {"against": "nowhere"}}, {"face": {"against": 3}}):
        with pytest.raises(FerDistError, match="face.against: the name of another experiment"):
            with_notes([face, imagenet], _notes(tmp_path, **bad))


def test_the_readme_shows_the_experiments_the_notes_name_with_their_gains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exps").mkdir()
    arms = {"supervised": {}, "method": {}}
    for name in ("face", "imagenet"):
        _experiment(tmp_path, f"exps/{name}.yaml", name=name, arms=arms)
    results, readme = tmp_path / "results", tmp_path / "README.md"
    readme.write_text("<!-- results: -->\n<!-- results end -->\n")
    notes = {"face": {"against": "imagenet", "readme": "Does a face\n backbone pay?"}}

    def block() -> str:
        _notes(tmp_path, **notes)
        publish(tmp_path / "exps", results, tmp_path / "R.md", readme, tmp_path / "img")
        return readme.read_text()

    assert "**face**: Does a face backbone pay? No run is recorded yet, so there are no results to show." \
        in block()
    x_l = [40, 4, 41, 72, 50, 48, 32]
    for seed, (sup, met, ref) in enumerate([(0.53, 0.55, 0.50), (0.54, 0.55, 0.50), (0.52, 0.54, 0.50)]):
        for exp, arm, acc in (("face", "supervised", sup), ("face", "method", met),
                              ("imagenet", "supervised", ref), ("imagenet", "method", ref)):
            if (exp, arm, seed) != ("imagenet", "method", 2):  # 2 seeds of it: no interval
                add_record(results / f"{exp}.json", dict(_record(arm, seed, acc), labelled_per_class=x_l))
    text = block()
    assert ("| arm | test acc % | gain over its reference arm | gain over imagenet's same arm (same X_l) |"
            in text)
    # face method - supervised: +2, +1, +2 (mean 1.67, sd 0.58); face - imagenet supervised: +3, +4, +2
    assert "| supervised | 53.00 ± 1.00 (3) | - | +3.00 (+0.52 to +5.48) |" in text
    assert "| method | 54.67 ± 0.58 (3) | vs supervised +1.67 (+0.23 to +3.10) | +5.00 (2 seeds, no " \
           "interval) |" in text
    assert "**imagenet**" not in text  # the notes do not name it
    notes["face"]["readme"] = 3
    with pytest.raises(FerDistError, match="face.readme: text"):
        block()


def test_crossdb_compares_with_the_papers_figure_only_on_its_protocol(tmp_path, monkeypatch):
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
    assert "ours is synthetic -> synthetic: the protocols differ, so no comparison" in text
    # CK+ labelled, RaFD the target: the paper's protocol, read against its +11 from 3 seeds
    ck = {"dataset": "ckplus", "out": "shards/ck"}
    exp = _experiment(tmp_path, "ck.yaml", kind="crossdb", seeds=[0, 1, 2],
                      shards=[ck, {"dataset": "rafd", "out": "shards/rafd"}],
                      schedule={"data.labelled": [{"dir": "shards/ck", "splits": ["train"]}]},
                      test=[{"dir": "shards/rafd", "splits": ["test"]}],
                      arms={"no_unlabelled": {}, "unlabelled_target": {}})
    (tmp_path / "results" / "tiny.json").unlink()
    for seed, (ref, acc) in enumerate([(0.40, 0.45), (0.42, 0.45), (0.41, 0.45)]):
        add_record(tmp_path / "results" / "tiny.json", dict(_record("no_unlabelled", seed, ref)))
        add_record(tmp_path / "results" / "tiny.json", dict(_record("unlabelled_target", seed, acc)))
    text = render([read_experiment(exp, check_configs=False)], tmp_path / "results")
    assert "the paper reports +11.0 points, above our interval (ours -7.00 points from it)" in text
    assert "the selection shrinks from the first round" in text  # confident counts fall from 10 to 5


def _scarce_record(arm: str, seed: int, acc: float) -> dict:
    """A record as a04af76's runner writes one for fer2013_scarce (30 rounds after a shared warm-up)."""
    method = arm != "supervised"
    return dict(_record(arm, seed, acc), n_test=3589, rounds=30, warmup_end="patience", warmup_epochs=9,
                val_per_warmup_epoch=[0.4 + 0.01 * i for i in range(6)] + [0.44, 0.44, 0.44],
                confident_per_round=[1000 + 10 * r for r in range(30)] if method else [0] * 30,
                drawn_per_round=[289] * 30 if method else [0] * 30,
                precision_per_round=[0.82 - 0.001 * r for r in range(30)] if method else [None] * 30,
                best=f"round {10 + seed}", rule_stop_round=8,
                labelled_per_class=[399, 44, 410, 722, 483, 317, 498],
                unlabelled_samples=8610, val_samples=1753, machine="2 x cpu, torch 2, host 0a1b2c3d")


def test_the_report_of_fer2013_scarce_says_plainly_when_it_has_no_results_then_reads_them(tmp_path):
    results, img = tmp_path / "results", tmp_path / "img"
    readme = tmp_path / "README.md"
    readme.write_text("# head\n<!-- results: an older wording -->\nold table\n<!-- results end -->\ntail\n")
    os.chdir(REPO)  # the definitions' relative paths (base configs) are the repository's
    try:
        publish(REPO / "launch_configs" / "experiments", results, tmp_path / "R.md", readme, img)
        text, block = (tmp_path / "R.md").read_text(), readme.read_text()
        absent = ("**fer2013_scarce** (`fer2013_scarce_l05`, `fer2013_scarce`, `fer2013_scarce_l25`): no run "
                  "is recorded yet, so there are no results to show.")
        assert absent in text and absent in block and "old table" not in block
        assert "## fer2013_scarce\n" in text and "No runs of this experiment are recorded yet" in text
        assert block.endswith(f"[{tmp_path / 'R.md'}](R.md).\n{README_END}\ntail\n")
        assert not img.exists()  # no record, no picture
        for seed, (sup, met) in enumerate([(0.49, 0.51), (0.50, 0.515), (0.495, 0.52)]):
            add_record(results / "fer2013_scarce.json", _scarce_record("supervised", seed, sup))
            add_record(results / "fer2013_scarce.json", _scarce_record("method", seed, met))
        add_record(results / "fer2013_scarce_l25.json", _scarce_record("method", 0, 0.55))
        publish(REPO / "launch_configs" / "experiments", results, tmp_path / "R.md", readme, img)
        text, block = (tmp_path / "R.md").read_text(), readme.read_text()
    finally:
        os.chdir(tmp_path)
    # gains 2, 1.5, 2.5: mean 2, sd 0.5; interval 2 -+ 4.303 x 0.5 / sqrt(3) = 0.76 to 3.24
    assert "| method | - | 51.50 ± 0.50 (3); vs supervised +2.00 (+0.76 to +3.24) | 55.00 (1) |" in block
    assert "| supervised | - | 49.50 ± 0.50 (3) | - |" in block
    assert ("![Test accuracy against the labelled share, per arm, fer2013_scarce]"
            "(img/curve_fer2013_scarce.png)") in block
    assert "- method vs supervised, the paper's method (r = 0.1) against the same budget of supervised " \
           "epochs: +2.00 ± 0.50 points over 3 paired seeds (a gain;" in text
    assert "power for a 2-point gain at this spread (sd 0.50): 91 % with 3 seeds, > 99 % with 5 seeds" \
        in text
    assert "| supervised (budget-matched control) | 0, 1, 2 |" in text and "9 rule / 9 rule / 9 rule" in text
    # 30 rounds of counts per seed are summarised (first -> last, range); the rounds figure draws them all
    counts = "; ".join(["1000 -> 1290 (1000-1290)"] * 3)
    assert f"| {counts} | 289 (all 30);" in text
    assert "| 0 (all 30); 0 (all 30); 0 (all 30) |" in text
    assert "round 10, 8 / round 11, 8 / round 12, 8" in text
    assert ("What the rounds did (pooled over seeds and rounds, each round weighted by its faces):\n\n"
            "- method (3 seeds, 90 rounds in all): U_t held 1,145 faces a round (13 % of X_u's 8,610), 289 "
            "of them drawn; their pseudo-labels") in text
    # 0.82 falling by 0.001 a round: the first 5 rounds 81.8 %, the last 5 79.3 %
    assert "% right (by seed 80.5-80.5 %), 82 % in the first 5 rounds, 79 % in the last 5." in text
    assert "X_l 2873 faces (anger 399" in text and "X_u 8610 faces" in text
    assert "![Selected unlabelled faces" in text and "(img/rounds_fer2013_scarce.png)" in text
    assert (img / "rounds_fer2013_scarce.png").stat().st_size > 0
    assert (img / "curve_fer2013_scarce.png").is_file()


def test_the_data_line_names_x_u_only_where_a_record_ran_rounds():
    supervised_only = [dict(_scarce_record(arm, 0, 0.6), rounds=0) for arm in ("dlib", "mnv2")]
    assert data_line(supervised_only)[0].endswith(
        "X_l 2873 faces (anger 399, disgust 44, fear 410, happy 722, neutral 483, sadness 317, "
        "surprise 498); no X_u (no self-training rounds); validation 1753 faces.")
    with_rounds = supervised_only + [_scarce_record("method", 0, 0.6)]
    assert "; X_u 8610 faces, labels hidden; " in data_line(with_rounds)[0]


def test_the_rounds_picture_draws_only_arms_that_selected_faces(tmp_path):
    from fer_dist.experiments.figures import rounds

    supervised = [_scarce_record("supervised", seed, 0.5) for seed in (0, 1)]  # 30 rounds, 0 faces each
    assert rounds({"supervised": supervised}, "t", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    both = {"supervised": supervised, "method": [_scarce_record("method", 0, 0.5)]}
    assert rounds(both, "t", tmp_path / "r.png") == tmp_path / "r.png" and (tmp_path / "r.png").is_file()


def test_what_the_rounds_did_pools_seeds_and_rounds_weighting_each_round_by_its_faces():
    def per_class(**counts):
        return [counts.get(c, 0) for c in CLASSES]

    # round 1: 10 happy faces, half right; round 2: none; round 3: 20 happy all right, 10 anger 7 right
    method = {
        "confident_per_round": [10, 0, 30], "drawn_per_round": [4, 0, 6],
        "precision_per_round": [0.5, None, 0.9],
        "confident_per_class_per_round": [per_class(happy=10), per_class(), per_class(happy=20, anger=10)],
        "precision_per_class_per_round": [per_class(happy=0.5), [None] * 7, per_class(happy=1, anger=0.7)],
        "drawn_per_class_per_round": [per_class(happy=4), per_class(), per_class(happy=3, anger=3)],
        "reset_per_round": [50, 30, 40], "labelled_per_class": per_class(anger=20, happy=60, surprise=20),
        "unlabelled_samples": 400}
    supervised = {"confident_per_round": [0] * 3, "drawn_per_round": [0] * 3, "reset_per_round": [0] * 3}
    lines = selection({"supervised": [supervised], "method": [method]})
    assert lines[2:] == [
        "- method (1 seed, 3 rounds in all): U_t held 13 faces a round (3 % of X_u's 400), 3 of them drawn; "
        "their pseudo-labels 80.0 % right; drawn by class (X_l's share in brackets): happy 70 % (60 %), "
        "anger 30 % (20 %), disgust 0 % (0 %), fear 0 % (0 %), neutral 0 % (0 %), sadness 0 % (0 %), "
        "surprise 0 % (20 %); "
        "pseudo-label precision by class: anger 70 %, disgust -, fear -, happy 83 %, neutral -, sadness -, "
        "surprise -; the alpha rule reset 40 labelled targets a round (40 % of X_l).", ""]
    assert selection({"supervised": [supervised]}) == []  # nothing selected, nothing reset: no block


def test_report_refuses_a_readme_without_its_block_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exps").mkdir()
    _experiment(tmp_path, "exps/tiny.yaml", arms={"baseline": {}, "smoothing": {}}, seeds=[0, 1])
    readme = tmp_path / "README.md"
    readme.write_text("no block\n")
    args = ["experiment", "report", "--experiments", "exps", "--results-dir", "results", "--out", "R.md",
            "--readme", str(readme), "--img-dir", "img"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and readme.read_text() == "no block\n" and not (tmp_path / "R.md").exists()
    assert f"{readme}: expected one line starting '<!-- results:'" in result.stderr
    result = CliRunner().invoke(app, args[:-3] + ["", "--img-dir", "img"])  # --readme '': none
    assert result.exit_code == 0 and readme.read_text() == "no block\n" and (tmp_path / "R.md").is_file()
    assert "No labelled-share experiment" not in (tmp_path / "R.md").read_text()


def test_results_show_how_each_warmup_ended(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = _experiment(tmp_path, arms={"baseline": {"method.warmup_epochs": 3}, "both": {}}, seeds=[0, 1, 2])
    curves = {("baseline", 0): [0.5, 0.6, 0.62], ("baseline", 1): [0.5, 0.55], ("both", 0): [0.4, 0.5, 0.6],
              ("both", 1): [0.4, 0.5]}
    for (arm, seed), curve in curves.items():
        record = dict(_record(arm, seed, 0.5), val_per_warmup_epoch=curve)
        add_record(tmp_path / "results" / "tiny.json", record)
    # a record of the trainer that says how its warm-up ended wins over the derivation
    add_record(tmp_path / "results" / "tiny.json", dict(_record("both", 2, 0.5), warmup_end="patience",
                                                        warmup_epochs=7))
    text = render([read_experiment(exp, check_configs=False)], tmp_path / "results")
    # the base's warm-up: 2 epochs, patience 5; baseline's cap 3. baseline seed 0 ran into its cap still
    # improving; seed 1 stopped at 2 of 3 without the rule (unknown); both seed 0 ran 3 epochs of a 2-epoch
    # cap (unknown), seed 1 its 2 (capped)
    assert "| 3 capped / 2 unknown |" in text and "| 3 unknown / 2 capped / 7 rule |" in text
    assert "| baseline | 0 | 50.00 60.00 62.00 |" in text and "| 40.00 50.00 60.00 |" not in text
    assert "validation accuracy moved by +12.00 ± 0.00 points (1 warm-up;" in text


def test_verdict_and_mean_sd_known_answers():
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert "not distinguishable from seed noise" in verdict([1.0, -1.0, 0.5])
    assert "a loss" in verdict([-3.0, -3.5, -2.5])
    assert "one seed" in verdict([2.0])
    assert "no reading" in verdict([2.0, 3.0])
    # 4 seeds: t(0.975, 3) = 3.182; 15 seeds: t(0.975, 14) = 2.145, which the approximation meets to 0.01
    assert "95 % interval -0.60 to +4.60" in verdict([0.0, 2.0, 2.0, 4.0])  # sd (8/3)^0.5, half 2.598
    gains = [1.0, 3.0] * 7 + [2.0]
    lo, hi = interval(gains)
    assert abs((hi - lo) / 2 / (statistics.stdev(gains) / 15 ** 0.5) - 2.145) < 0.01


def test_arms_pair_only_where_they_started_from_one_warmup(tmp_path):
    """A seed's warm-up trained again (its run folder lost, another CPU) has another validation curve: its
    arms pair with each other, not with the arms of the first warm-up, and the runner refuses to add an arm
    of that seed from the second one."""
    def rec(arm, seed, acc, curve):
        return dict(_record(arm, seed, acc), warmup_run=f"runs/warmup-s{seed}", val_per_warmup_epoch=curve)

    first, again = [0.30, 0.41], [0.31, 0.40]
    ref = [rec("supervised", 0, 0.50, first), rec("supervised", 1, 0.50, first)]
    arm = [rec("method", 0, 0.53, first), rec("method", 1, 0.60, again)]
    gains, seeds = paired_gain(arm, ref)
    assert seeds == [0] and gains == pytest.approx([3.0])
    assert paired_gain([_record("method", 1, 0.6)], [_record("supervised", 1, 0.5)])[1] == [1]  # own warm-ups

    warm = tmp_path / "runs" / "warmup-s1"
    warm.mkdir(parents=True)
    summary = {"rounds": 0, "warmup_epochs": 2, "stop_reason": "warm-up"}
    (warm / "summary.json").write_text(json.dumps(summary))
    (warm / "metrics.jsonl").write_text("".join(json.dumps({"kind": "warmup", "val/acc": v}) + "\n"
                                                for v in again))
    results = tmp_path / "results" / "tiny.json"
    add_record(results, rec("supervised", 1, 0.5, first))
    with pytest.raises(FerDistError, match=r"seed 1: its recorded arms \(supervised\) started from another"):
        check_warmup(results, 1, warm)
    check_warmup(results, 2, warm)  # a seed without records takes any warm-up
    add_record(results, rec("method", 2, 0.5, again))
    check_warmup(results, 2, warm)  # the same warm-up: its arms pair


def test_a_stop_signal_to_the_runner_reaches_the_training_and_stops_the_runner(tmp_path):
    marker = tmp_path / "child-got-sigterm"
    child = ("import signal, sys, time, pathlib\n"
             f"mark = pathlib.Path({str(marker)!r})\n"
             "signal.signal(signal.SIGTERM, lambda *a: (mark.touch(), sys.exit(0)))\n"
             "print('ready', flush=True)\ntime.sleep(60)\n")
    script = ("import sys\n"
              "from fer_dist.experiments.run import Stopped, run_child\n"
              f"try:\n    run_child([sys.executable, '-c', {child!r}], dict(__import__('os').environ))\n"
              "except Stopped:\n    sys.exit(3)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 3 and marker.exists()
    proc.stdout.close()


# ------------------------------------------------------------------------------------------------- end to end


def _runner(tmp: Path, path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "fer_dist.cli", "experiment", "run", str(path), "--runs-dir", "runs",
            "--results-dir", "results", *args]


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
