"""One rank of test_stream.py's 2-process check (launched by torch.distributed.run, gloo on CPU).

Usage: python -m torch.distributed.run --nproc_per_node 2 tests/dist_stream_worker.py SHARD_DIR OUT_JSON
Each rank runs one training epoch and one exhaustive pass on a run's `Loaders` with 2 DataLoader workers
(closed at the end, as the trainer's main does), takes a collective step per batch as a trainer would
(unequal batch counts would hang it), and rank 0 writes what all ranks saw, with the global batches one
process reads (the same, step by step).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from shard_fixtures import fixture_include, fixture_label, fixture_targets, pixel_value

from fer_dist.data.augment import InputSpec, eval_transform, train_transform
from fer_dist.data.runset import ShardSet
from fer_dist.data.stream import Loaders, train_loader

SPEC = InputSpec(size=8, channels=1, mean=(0.0,), std=(1.0,))


def _images_match(images: torch.Tensor, ids: torch.Tensor) -> bool:
    return images[:, 0, 4, 4].tolist() == [pixel_value(int(i)) for i in ids]


def main(shard_dir: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    shardset = ShardSet([(shard_dir, ["train", "test"])])
    shards = shardset.shards(0)
    include, targets = fixture_include(shardset.num_ids), fixture_targets(shardset.num_ids)

    loaders = Loaders(shards, num_workers=2, train=train_transform(SPEC), exhaustive=eval_transform(SPEC))
    stream = loaders.train(shards, include, targets, global_batch=6, rank=rank, world=world, seed=1, epoch=0)
    sizes, ids, steps, targets_ok, images_ok = [], [], [], True, True
    for images, tgt, batch_ids in stream:
        dist.all_reduce(torch.ones(1))  # the trainer's collective: every rank must reach it equally often
        sizes.append(len(batch_ids))
        ids += batch_ids.tolist()
        steps.append(batch_ids.tolist())
        targets_ok &= torch.equal(tgt, targets[batch_ids])
        images_ok &= _images_match(images, batch_ids)
    train = {"count": len(sizes), "sizes": sizes, "ids": ids, "steps": steps, "targets_ok": targets_ok,
             "images_ok": images_ok}

    seen, labels_ok, exhaustive_images_ok = [], True, True
    passes = loaders.exhaustive(shards, include, batch_size=4, rank=rank, world=world)
    for images, labels, batch_ids in passes:
        seen += batch_ids.tolist()
        labels_ok &= labels.tolist() == [fixture_label(int(i)) for i in batch_ids]
        exhaustive_images_ok &= _images_match(images, batch_ids)
    exhaustive = {"ids": seen, "labels_ok": labels_ok, "images_ok": exhaustive_images_ok}
    loaders.close()
    mine = {"train": train, "exhaustive": exhaustive}

    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        one = train_loader(shards, include, targets, transform=train_transform(SPEC), global_batch=6, rank=0,
                           world=1, num_workers=0, seed=1, epoch=0)
        result = {
            "one_process": [sorted(batch_ids.tolist()) for _, _, batch_ids in one],
            "global": [sorted(sum((g["train"]["steps"][s] for g in gathered), []))
                       for s in range(len(steps))],
            "train": {"steps": stream.steps, "counts": [g["train"]["count"] for g in gathered],
                      "sizes": [g["train"]["sizes"] for g in gathered],
                      "ids": [g["train"]["ids"] for g in gathered],
                      "targets_match": all(g["train"]["targets_ok"] for g in gathered),
                      "images_match": all(g["train"]["images_ok"] for g in gathered)},
            "exhaustive": {"ids": [g["exhaustive"]["ids"] for g in gathered],
                           "labels_match": all(g["exhaustive"]["labels_ok"] for g in gathered),
                           "images_match": all(g["exhaustive"]["images_ok"] for g in gathered)},
        }
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
