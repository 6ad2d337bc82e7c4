"""`fer-dist export MODEL --onnx out.onnx`: an ONNX model with a dynamic batch, checked in the same command.

The graph takes uint8 faces [N, C, S, S] (the model's side and channels) and returns logits [N, K]: the
normalisation is inside it, as in `FerNet.forward`, so a user feeds pixels as they are. After writing, the
file is run with ONNX Runtime on real faces (shards the user names, else the run's validation shards) and
its outputs are compared with PyTorch's; the file is kept only if they agree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fer_dist.data.augment import eval_transform
from fer_dist.data.runset import ShardSet
from fer_dist.data.stream import exhaustive_loader
from fer_dist.errors import FerDistError
from fer_dist.evaluate.infer import ShardSplits
from fer_dist.evaluate.load import LoadedModel
from fer_dist.files import TMP_PREFIX

OPSET = 18
ATOL = 1e-4  # on logits: float32 kernels of two runtimes differ by rounding only
CHECK_FACES = 64


def _runtime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise FerDistError("export --onnx: onnxruntime is not installed "
                           "(pip install 'fer-dist[onnx]')") from None
    return onnxruntime


def real_faces(net, target: ShardSplits, limit: int = CHECK_FACES) -> torch.Tensor:
    """Up to `limit` faces of `target`, as the model takes them (uint8 [N, C, S, S])."""
    shards = ShardSet([(target.dir, target.splits)]).shards(0)
    stream = exhaustive_loader(shards, None, transform=eval_transform(net.input_spec), batch_size=limit,
                               rank=0, world=1, num_workers=0)
    for images, _, _ in stream:
        return images[:limit]
    raise FerDistError(f"{target.dir}: split(s) {', '.join(target.splits)} hold no face to check with")


def export_onnx(loaded: LoadedModel, out: Path, faces: torch.Tensor) -> dict[str, Any]:
    """Write `out` (atomically), run it on `faces` and on a batch of another size, compare with PyTorch."""
    runtime = _runtime()
    net = loaded.net.cpu().eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{TMP_PREFIX}{out.name}"
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.onnx.export(net, (faces[:2],), dynamo=True, opset_version=OPSET,
                                    input_names=["faces"], output_names=["logits"],
                                    dynamic_shapes={"images": {0: batch}}, verbose=False)
        program.save(str(tmp))
        session = runtime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        worst = 0.0
        # the batch it was traced with, all the faces, and one face: the batch axis must really be dynamic
        for sample in (faces[:2], faces, faces[:1]):
            with torch.no_grad():
                expected = net(sample).numpy()
            got = session.run(["logits"], {"faces": sample.numpy()})[0]
            if got.shape != expected.shape:
                raise FerDistError(f"{out}: ONNX output {got.shape} for a batch of {len(sample)}, PyTorch "
                                   f"{expected.shape}")
            worst = max(worst, float(np.abs(got - expected).max()))
        if worst > ATOL:
            raise FerDistError(f"{out}: ONNX logits differ from PyTorch's by {worst:.2e} (> {ATOL:g}); "
                               "not written")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"onnx": str(out), "opset": OPSET, "faces_checked": int(len(faces)), "max_abs_diff": worst,
            "tolerance": ATOL, "input": {"name": "faces", "dtype": "uint8",
                                         "shape": ["N", net.input_spec.channels, net.input_spec.size,
                                                   net.input_spec.size]},
            "output": {"name": "logits", "classes": list(net.classes or ())}}
