"""fer_dist/dist.py: 2 real gloo processes (tests/dist_worker.py) and the single-process paths."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import dist_worker
import pytest
import torch
from shard_fixtures import damage_pngs

from fer_dist import dist, files, stopsignals
from fer_dist.data.runset import ShardSet, checked_labels, launch_checked, save_checked
from fer_dist.errors import FerDistError
from fer_dist.launchenv import CHECKED_ENV

# A hang guard, not the expected time: on a loaded 2-core machine a launch takes 10-25 s.
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def label_folders(tmp_path_factory: pytest.TempPathFactory, small_shards: Path) -> dict[str, str]:
    """The session's small shards, and a copy with 2 damaged samples in its first train shard."""
    damaged = shutil.copytree(small_shards, tmp_path_factory.mktemp("labels") / "damaged")
    damage_pngs(damaged, 2)
    return {"intact": str(small_shards), "damaged": str(damaged)}


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory, label_folders: dict[str, str]
             ) -> dict[str, dist_worker.Launch]:
    """The four 2-process launches, started together so their start-ups overlap."""
    root = tmp_path_factory.mktemp("dist")
    (root / "labels").mkdir()
    (root / "labels" / "args.json").write_text(json.dumps(label_folders))
    return {
        "labels": dist_worker.start("labels", root / "labels"),
        "collectives": dist_worker.start("collectives", root / "collectives"),
        "disagree": dist_worker.start("disagree", root / "disagree"),
        # Through the real launcher: the WORLD_SIZE it sets is what make_accelerator checks.
        "mismatch": dist_worker.start("mismatch", root / "mismatch", launcher="torchrun"),
    }


@pytest.fixture(scope="module")
def collectives(launches: dict[str, dist_worker.Launch]) -> list[dict[str, Any]]:
    codes, reports = launches["collectives"].wait(TIMEOUT_S)
    assert codes == [0, 0], reports
    return reports


def test_two_real_gloo_processes(collectives: list[dict[str, Any]]) -> None:
    for rank, report in enumerate(collectives):
        assert report["rank"] == rank
        assert report["num_processes"] == 2
        assert report["distributed_type"] == "DistributedType.MULTI_CPU"


def test_gather_with_an_empty_rank(collectives: list[dict[str, Any]]) -> None:
    r0, r1 = (r["gather_empty"] for r in collectives)
    assert r0 == r1
    assert r0["ids"] == [1, 3, 6]
    assert r0["probs"] == [[1.0, 1.0, 1.0], [3.0, 1.0, 1.0], [6.0, 1.0, 1.0]]


def test_gather_drops_duplicates_keeping_the_lowest_rank(collectives: list[dict[str, Any]]) -> None:
    r0, r1 = (r["gather_dup"] for r in collectives)
    assert r0 == r1
    assert r0["ids"] == [0, 2, 4, 7, 8, 11]
    # Rows are (id, sending rank, 1): 2 and 4 were sent by both ranks, rank 0's row is kept.
    assert [row[0] for row in r0["probs"]] == [0, 2, 4, 7, 8, 11]
    assert [row[1] for row in r0["probs"]] == [0, 0, 0, 0, 1, 0]
    assert r0["stats"] == {"world": 2, "n_max": 6, "rows": 9, "unique": 6,
                           "bytes": dist.gathered_bytes(6, 3, 2)}


def test_gather_of_nothing_anywhere(collectives: list[dict[str, Any]]) -> None:
    assert [r["gather_nothing"] for r in collectives] == [[], []]


def test_bad_gather_input_raises_on_every_rank(collectives: list[dict[str, Any]]) -> None:
    for report in collectives:
        assert report["gather_bad"].startswith("ValueError: gather_predictions: bad input on ranks [1]")


def test_checksums_agree(collectives: list[dict[str, Any]]) -> None:
    for report in collectives:
        assert report["agree"] is None and report["agree_int"] is None


def test_checksum_disagreement_raises_on_both_ranks(collectives: list[dict[str, Any]]) -> None:
    for report in collectives:
        message = report["disagree"]
        assert message.startswith("RuntimeError: target table differs between processes")
        assert "ranks 0 hold" in message and "ranks 1 hold" in message


def test_uncaught_disagreement_ends_both_ranks(launches: dict[str, dist_worker.Launch]) -> None:
    codes, reports = launches["disagree"].wait(TIMEOUT_S)
    assert all(code != 0 for code in codes)
    for report in reports:
        # Written by each rank's own exception handler: neither was killed waiting for the other.
        assert report["error"].startswith("RuntimeError: target table after round 3 differs between")
        assert "ranks 0 hold" in report["error"] and "ranks 1 hold" in report["error"]


def test_the_label_pass_split_over_two_ranks_finds_what_one_process_finds(
    launches: dict[str, dist_worker.Launch], label_folders: dict[str, str]
) -> None:
    codes, reports = launches["labels"].wait(TIMEOUT_S)
    assert codes == [0, 0], reports
    for name, folder in label_folders.items():
        shardset = ShardSet([(folder, ("train", "val", "test"))])
        # each rank checked a part of the shards, the two parts together all of them
        parts = [r[f"{name}-checked-here"] for r in reports]
        assert min(parts) > 0 and sum(parts) == shardset.num_ids, parts
        for on_error in ("raise", "skip"):
            try:
                one = checked_labels(shardset, on_error)
                expected = {"labels": one.labels.tolist(), "problems": sorted(one.problems),
                            "damaged": one.damaged.nonzero().flatten().tolist()}
            except FerDistError as e:
                expected = {"error": str(e)}
            for report in reports:
                got = dict(report[f"{name}-{on_error}"])
                if "problems" in got:
                    got["problems"] = sorted(got["problems"])
                assert got == expected, (name, on_error)
    assert "error" in reports[0]["damaged-raise"] and len(reports[0]["damaged-skip"]["damaged"]) == 2
    # the pass fer-dist train made (forged: every label 6) is taken where it matches the files and the rule
    truth = reports[0]["intact-raise"]["labels"]
    for report in reports:
        assert report["launch-raise"] == [6 if y >= 0 else -1 for y in truth] != truth
        assert report["launch-skip"] == truth


def test_gathered_texts_keep_rank_order_newlines_and_empty_strings(
    launches: dict[str, dist_worker.Launch],
) -> None:
    _, reports = launches["labels"].wait(TIMEOUT_S)
    for report in reports:
        assert report["texts"] == ["a\nb", "\u00fc", "c"]
        assert report["texts_none"] == [] and report["texts_empty"] == [""]


def test_any_process_and_all_sum(collectives: list[dict[str, Any]]) -> None:
    for report in collectives:
        assert report["any_rank1"] is True and report["any_none"] is False and report["any_all"] is True
        assert report["sum_float"] == 2.0
        assert report["sum_tensor"] == [3, 30]


def test_expected_processes_mismatch_is_one_line_on_every_rank(
    launches: dict[str, dist_worker.Launch],
) -> None:
    codes, reports = launches["mismatch"].wait(TIMEOUT_S)
    assert codes == [1], "torchrun reports a failed worker with exit code 1"
    for report in reports:
        assert report["error"] == ("FerDistError: process count: expected 3 processes (config) but the "
                                   "launcher started WORLD_SIZE=2" + dist.PROCESS_COUNT_HINT)


# ---------------------------------------------------------------- single process


@pytest.fixture(scope="module")
def accelerator() -> Any:
    return dist.make_accelerator()


def test_single_process_gather_sorts_and_dedupes(accelerator: Any) -> None:
    assert accelerator.num_processes == 1
    ids = torch.tensor([5, 1, 5, 3])
    probs = torch.tensor([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]], dtype=torch.float64)
    got_ids, got_probs, stats = dist.gather_with_stats(accelerator, ids, probs)
    assert got_ids.tolist() == [1, 3, 5]
    assert got_probs.dtype == torch.float32
    assert torch.allclose(got_probs, torch.tensor([[0.2, 0.8], [0.4, 0.6], [0.1, 0.9]]))
    assert stats.rows == 4 and stats.unique == 3 and stats.bytes == 0
    empty = dist.gather_predictions(accelerator, torch.zeros(0, dtype=torch.long), torch.zeros(0, 2))
    assert empty[0].shape == (0,) and empty[1].shape == (0, 2)


def test_single_process_gather_rejects_bad_input(accelerator: Any) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        dist.gather_predictions(accelerator, torch.tensor([-1]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"probs \[n, K\]"):
        dist.gather_predictions(accelerator, torch.tensor([1, 2]), torch.zeros(3, 2))


def test_single_process_collectives(accelerator: Any) -> None:
    dist.check_same_everywhere(accelerator, torch.ones(3), "table")
    dist.check_same_everywhere(accelerator, 2**70, "a big int")
    assert dist.any_process(accelerator, True) is True and dist.any_process(accelerator, False) is False
    assert dist.all_sum(accelerator, 1.5).dtype == torch.float64
    assert dist.all_sum(accelerator, 2**24 + 1.0).item() == 2**24 + 1
    assert dist.all_sum(accelerator, 7).dtype == torch.int64
    assert dist.all_sum(accelerator, torch.tensor([2, 3])).tolist() == [2, 3]


def test_gathered_bytes() -> None:
    assert dist.gathered_bytes(10, 7, 4) == 2 * 8 * 4 + 4 * 10 * (8 + 4 * 7)
    assert dist.gathered_bytes(0, 7, 2) == 32


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without CUDA")
def test_fp16_on_cpu_is_refused() -> None:
    with pytest.raises(FerDistError, match="fp16 needs CUDA") as info:
        dist.make_accelerator(mixed_precision="fp16")
    assert "\n" not in str(info.value)


def test_unknown_mixed_precision_is_refused() -> None:
    with pytest.raises(FerDistError, match="mixed_precision: expected one of no, bf16, fp16"):
        dist.make_accelerator(mixed_precision="fp8")


def test_expected_processes_checked_without_launcher(accelerator: Any) -> None:
    with pytest.raises(FerDistError, match="expected 2 processes .* the launch has 1"):
        dist.make_accelerator(expected_processes=2)


def test_world_size_checked_before_the_group_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(FerDistError, match="expected 2 processes .* WORLD_SIZE=3"):
        dist.make_accelerator(expected_processes=2)
    monkeypatch.setenv("WORLD_SIZE", "three")
    with pytest.raises(FerDistError, match="WORLD_SIZE: 'three' is not a number"):
        dist.make_accelerator()


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (torch.arange(6.0), torch.arange(6.0), True),
        (torch.arange(6.0).reshape(2, 3).t(), torch.arange(6.0).reshape(2, 3).t().contiguous(), True),
        (torch.arange(6.0), torch.arange(6.0).nextafter(torch.tensor(10.0)), False),  # one ulp
        (torch.zeros(2, 3), torch.zeros(3, 2), False),  # same bytes, other shape
        (torch.zeros(4, dtype=torch.float32), torch.zeros(4, dtype=torch.int32), False),  # other dtype
        (torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16), True),
        (torch.tensor([0.0]), torch.tensor([-0.0]), False),  # bitwise, not numeric, equality
        (torch.zeros(0), torch.zeros(0), True),
    ],
)
def test_table_checksum(a: torch.Tensor, b: torch.Tensor, same: bool) -> None:
    assert (dist.table_checksum(a) == dist.table_checksum(b)) is same
    assert 0 <= dist.table_checksum(a) < 2**63


@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGTERM"])
def test_stop_request_on_signal(signame: str) -> None:
    sig = getattr(signal, signame)
    before = signal.getsignal(sig)
    with stopsignals.StopRequest() as stop:
        assert stop.requested is False
        os.kill(os.getpid(), sig)
        assert stop.requested is True and stop.signal_name == signame
    assert signal.getsignal(sig) is before


def test_stop_request_restores_a_previous_python_handler() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        stop = stopsignals.StopRequest()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and seen == []
        stop.close()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_wait_for_file(tmp_path: Path) -> None:
    with pytest.raises(FerDistError, match="still missing"):
        files.wait_for_file(tmp_path / "manifest.json", timeout_s=0.2, poll_s=0.05)
    (tmp_path / "manifest.json").write_text("{}")
    files.wait_for_file(tmp_path / "manifest.json", timeout_s=0.2, poll_s=0.05)


def test_is_main_launch_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    assert files.is_main_launch_process()
    monkeypatch.setenv("RANK", "1")
    assert not files.is_main_launch_process()


@pytest.mark.parametrize("value,processes,expected", [("", 1, os.cpu_count() or 1), ("", 64, 1), ("3", 2, 3)])
def test_cpu_threads_take_the_cores_share_or_the_environments_number(monkeypatch, value, processes, expected):
    monkeypatch.setenv(dist.THREADS_ENV, value)
    assert dist.cpu_threads(processes) == expected


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_a_bad_thread_count_is_one_line_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv(dist.THREADS_ENV, value)
    with pytest.raises(FerDistError, match=f"FER_DIST_CPU_THREADS: .*{value!r}"):
        dist.cpu_threads(1)


def test_a_launch_s_label_pass_is_taken_only_over_the_files_it_read(tmp_path: Path, small_shards: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`runset.launch_checked`: the pass `fer-dist train` saved, where its digest of the rule and of every
    shard file (path, size, mtime) is this process's; else None, and the process checks the shards itself."""
    shards = shutil.copytree(small_shards, tmp_path / "shards")
    shardset = ShardSet([(str(shards), ("train", "val", "test"))])
    made = checked_labels(shardset)
    record = tmp_path / "checked.npz"
    save_checked(record, made, shardset, "raise")
    assert launch_checked(shardset, "raise") is None  # no launch named it
    monkeypatch.setenv(CHECKED_ENV, str(record))
    taken = launch_checked(shardset, "raise")
    assert taken is not None and torch.equal(taken.labels, made.labels) and bool(taken.covered.all())
    assert launch_checked(shardset, "skip") is None  # another rule
    other = ShardSet([(str(shards), ("train",))])
    assert launch_checked(other, "raise") is None  # other files
    first = next(iter(sorted(shards.glob("*.tar"))))
    os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
    assert launch_checked(ShardSet([(str(shards), ("train", "val", "test"))]), "raise") is None  # touched
    for junk in (b"", b"PK\x03\x04 not a zip"):
        record.write_bytes(junk)
        assert launch_checked(shardset, "raise") is None
