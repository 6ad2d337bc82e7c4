"""A seeded mutator over a real shard folder: truncated shards, flipped bytes in headers, members and
padding, broken JSON and manifests. Each case ends in a FerDistError naming the shard and the sample (or
the manifest), or in damaged samples left out and counted (data.on_error=skip); whatever loads carries
the original labels and decodes. Never a hang (each case under an alarm), a crash or a wrong label.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from fer_dist.config import DataConfig
from fer_dist.data.augment import InputSpec, eval_transform
from fer_dist.data.pack import pack
from fer_dist.data.runset import load_run_data
from fer_dist.data.shards import verify_shards
from fer_dist.data.sources.base import SourceOptions
from fer_dist.data.stream import exhaustive_loader
from fer_dist.errors import FerDistError

CASES_PER_KIND = 50
SPLITS = ("train", "val", "test")
SAMPLE = re.compile(r"sample \d{8}")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """A small real shard folder: 3 splits, several shards each."""
    out = tmp_path_factory.mktemp("fuzz") / "shards"
    pack("synthetic", [], out, options=SourceOptions(subjects=6, frames=3, image_size=32), size=32,
         samples_per_shard=8, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def truth(clean: Path) -> torch.Tensor:
    return load_run_data(config(clean)).labels


def config(folder: Path, on_error: str = "raise") -> DataConfig:
    ref = lambda split: [{"dir": str(folder), "splits": [split]}]  # noqa: E731
    return DataConfig(labelled=ref("train"), unlabelled=ref("train"), val=ref("val"), test=ref("test"),
                      num_workers=0, on_error=on_error)


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail the case rather than hang: SIGALRM raises in the main thread."""
    def fire(signum, frame):
        raise TimeoutError(f"case still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- mutations: (folder, rng) -> what was hit


def _shard(folder: Path, rng: random.Random) -> Path:
    return rng.choice(sorted(folder.glob("*.tar")))


def truncate(folder: Path, rng: random.Random) -> str:
    path = _shard(folder, rng)
    data = path.read_bytes()
    path.write_bytes(data[:rng.randrange(len(data))])
    return "shard"


def flip_header(folder: Path, rng: random.Random) -> str:
    """A byte of one member header (name, size, checksum, type, magic) changed."""
    path = _shard(folder, rng)
    data = bytearray(path.read_bytes())
    headers = [i for i in range(0, len(data), 512) if data[i + 257:i + 262] == b"ustar"]
    at = rng.choice(headers) + rng.choice([rng.randrange(100), *range(124, 136), *range(148, 157),
                                           rng.randrange(257, 265)])
    data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return "shard"


def flip_member(folder: Path, rng: random.Random) -> str:
    """A byte inside a member's data: a label, a JSON document or a PNG."""
    path = _shard(folder, rng)
    data = bytearray(path.read_bytes())
    headers = [i for i in range(0, len(data), 512) if data[i + 257:i + 262] == b"ustar"]
    start = rng.choice(headers)
    size = int(data[start + 124:start + 135], 8)
    data[start + 512 + rng.randrange(size)] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return "shard"


def relabel(folder: Path, rng: random.Random) -> str:
    """A `.cls` member set to another valid class of the same length: only the digest can tell."""
    path = _shard(folder, rng)
    data = bytearray(path.read_bytes())
    cls = [i for i in range(0, len(data), 512)
           if data[i + 257:i + 262] == b"ustar" and data[i:i + 100].rstrip(b"\0").endswith(b".cls")
           and data[i + 512:i + 513].isdigit()]
    at = rng.choice(cls) + 512
    data[at] = ord(str((int(chr(data[at])) + rng.randrange(1, 7)) % 7))
    path.write_bytes(bytes(data))
    return "shard"


def flip_anywhere(folder: Path, rng: random.Random) -> str:
    path = _shard(folder, rng)
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return "shard"


def break_manifest_text(folder: Path, rng: random.Random) -> str:
    """The manifest's JSON text cut short or a character changed."""
    path = folder / "manifest.json"
    text = bytearray(path.read_bytes())
    if rng.random() < 0.3:
        text = text[:rng.randrange(len(text))]
    else:
        text[rng.randrange(len(text))] = rng.choice(b'{}[]",:0a \x00\xff')
    path.write_bytes(bytes(text))
    return "manifest"


def _leaves(node, path=()) -> list[tuple]:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    out = [path] if path else []
    for key, value in items:
        out += _leaves(value, (*path, key))
    return out


def break_manifest_values(folder: Path, rng: random.Random) -> str:
    """A manifest entry removed, or given a value of another type or another number."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    where = rng.choice(_leaves(manifest))
    parent = manifest
    for key in where[:-1]:
        parent = parent[key]
    value = parent[where[-1]]
    choices = [None, "x", -1, 10**12, [], {}, True]
    if isinstance(value, int) and not isinstance(value, bool):
        choices += [value + 1, value - 1, 0]
    if isinstance(value, str) and value:
        choices += [value[::-1], value[:-1], value.replace(value[0], "f" if value[0] != "f" else "0")]
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[where[-1]]
    else:
        parent[where[-1]] = rng.choice(choices)
    path.write_text(json.dumps(manifest))
    return "manifest"


KINDS: dict[str, Callable[[Path, random.Random], str]] = {
    "truncate": truncate, "flip_header": flip_header, "flip_member": flip_member, "relabel": relabel,
    "flip_anywhere": flip_anywhere, "manifest_text": break_manifest_text,
    "manifest_values": break_manifest_values,
}


def check_message(message: str, folder: Path, hit: str) -> None:
    """One line naming the file, and the sample when a shard was damaged."""
    assert "\n" not in message, message
    if hit == "shard":
        assert re.search(r"-\d{6}\.tar", message) and SAMPLE.search(message) or "manifest" in message, message
    else:
        assert str(folder) in message or "manifest" in message, message


def read_everything(data, truth: torch.Tensor) -> int:
    """Decode every kept sample: its label must be the original one. Returns the samples read."""
    spec = InputSpec(size=32, channels=1, mean=(0.5,), std=(0.5,))
    kept = data.labelled | data.unlabelled | data.val | data.test
    assert torch.equal(data.labels[kept & (data.labels >= 0)], truth[kept & (data.labels >= 0)])
    read = 0
    for shards, mask in ((data.train_shards, data.labelled | data.unlabelled), (data.val_shards, data.val),
                         (data.test_shards, data.test)):
        for _images, labels, ids in exhaustive_loader(shards, mask, transform=eval_transform(spec),
                                                      batch_size=64, rank=0, world=1, num_workers=0):
            assert torch.equal(labels, truth[ids])  # no silent wrong label, whatever the stream reads
            read += ids.numel()
    return read


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_mutation_is_caught_named_or_harmless(kind: str, clean: Path, truth: torch.Tensor,
                                                    tmp_path: Path) -> None:
    outcomes = {"error": 0, "skipped": 0, "harmless": 0}
    for seed in range(CASES_PER_KIND):
        rng = random.Random(f"{kind}-{seed}")
        folder = tmp_path / f"case{seed}"
        shutil.copytree(clean, folder)
        hit = KINDS[kind](folder, rng)
        on_error = rng.choice(["raise", "skip"])
        with deadline(20):
            try:
                data = load_run_data(config(folder, on_error))
                read_everything(data, truth)
            except FerDistError as err:
                check_message(str(err), folder, hit)
                outcomes["error"] += 1
            else:
                if data.skipped:
                    assert on_error == "skip"
                    for line in data.skipped:
                        check_message(line, folder, hit)
                    outcomes["skipped"] += 1
                else:
                    outcomes["harmless"] += 1
            # inspect's check: any changed shard byte is a problem (sha256), never another exception type
            try:
                report = verify_shards(folder)
            except FerDistError as err:
                check_message(str(err), folder, "manifest")
            else:
                if hit == "shard" and not report.problems:
                    pytest.fail(f"{kind} {seed}: verify_shards found nothing wrong")
        shutil.rmtree(folder)
    # the mutations really damage something: most cases are caught, not harmless
    print(kind, outcomes)
    assert outcomes["error"] + outcomes["skipped"] >= CASES_PER_KIND // 2, outcomes
