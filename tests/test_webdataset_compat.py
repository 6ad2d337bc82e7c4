"""Shards are plain WebDataset tars: the `webdataset` library itself reads back what `pack` wrote."""

import json

import webdataset as wds

from fer_dist.data.manifest import read_manifest
from fer_dist.data.pack import pack
from fer_dist.data.shardread import decode_png
from fer_dist.data.sources.base import SourceOptions


def test_webdataset_reads_our_shards(tmp_path):
    out = tmp_path / "shards"
    pack("synthetic", [], out, options=SourceOptions(subjects=3, frames=3), workers=1, progress=False)
    manifest = read_manifest(out)
    urls = [str(out / s.file) for _, s in manifest.shards()]
    seen = []
    # Raw bytes only: webdataset's default decoders would unpickle a .pyd member (see tests/test_stream.py).
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert {k for k in sample if not k.startswith("__")} == {"cls", "json", "png"}
        meta = json.loads(sample["json"])
        assert sample["__key__"] == f"{meta['id']:08d}"
        assert int(sample["cls"]) == meta["label"]
        image = decode_png(sample["png"], sample["__url__"], meta["id"])
        assert image.shape == (1, 48, 48) and image.dtype.is_floating_point is False
        seen.append(meta["id"])
    assert seen == list(range(manifest.num_ids))
