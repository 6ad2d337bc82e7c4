"""`fer-dist predict MODEL IMAGES_OR_DIRS`: every class's probability for each face in new images.

Faces are made the way the model's training shards were (the export records `shard`'s alignment, side
and channels): with Haar alignment, an image in which no face is found is reported as such, not guessed
from a centre crop. Under several processes each takes every W-th image; the rows are gathered in order.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object

from fer_dist.data.augment import eval_transform
from fer_dist.data.faces import align_face, align_found, find_face, to_channels, to_grey
from fer_dist.data.sources.base import ImageReadError, is_image, read_image, walk_images
from fer_dist.errors import FerDistError
from fer_dist.evaluate.infer import batch_probs
from fer_dist.evaluate.load import LoadedModel

BATCH = 64
FIELDS_START = ("path", "status", "predicted", "confidence")  # then p_<class> per class


def list_images(paths: list[Path]) -> list[Path]:
    """Image files named, and every image under folders named (sorted); a missing path is an error."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += [path / rel for rel in walk_images(path).images]
        elif path.is_file():
            if not is_image(path.name):
                raise FerDistError(f"{path}: not an image file (by its extension)")
            files.append(path)
        else:
            raise FerDistError(f"{path}: no such file or folder")
    if not files:
        raise FerDistError(f"{', '.join(map(str, paths))}: no images found")
    return files


def preprocessing(loaded: LoadedModel, align: str | None, size: int | None,
                  channels: int | None) -> dict[str, Any]:
    """The recorded preprocessing, with any value the user gave in its place (said in the output)."""
    rec = dict(loaded.preprocessing or {})
    given = {"align": align, "size": size, "channels": channels}
    missing = [k for k, v in given.items() if v is None and k not in rec]
    if missing:
        raise FerDistError(f"{loaded.path}: the model records no preprocessing (exported before fer-dist "
                           f"recorded it, or its shards are gone); give --{' --'.join(missing)}")
    out = {k: (v if v is not None else rec[k]) for k, v in given.items()}
    out["source"] = "recorded" if all(v is None for v in given.values()) else "given on the command line"
    return out


def make_face(path: Path, prep: dict[str, Any]) -> tuple[np.ndarray | None, str]:
    """(face, status): status `ok`, `no face found`, or why the file could not be read."""
    try:
        image = to_channels(read_image(str(path)), prep["channels"])
    except ImageReadError as exc:
        return None, f"unreadable: {exc.reason}"
    if prep["align"] == "none":
        return align_face(image, prep["size"], "none").image, "ok"
    found = find_face(to_grey(image))
    if found is None:
        return None, "no face found"
    face = align_found(image, found, prep["size"])
    return face.image, "ok" if face.detected else "ok (face box; eyes not found)"


def _face_tensor(face: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(face))[None] if face.ndim == 2 else \
        torch.from_numpy(np.ascontiguousarray(face.transpose(2, 0, 1)))


def predict_images(loaded: LoadedModel, files: list[Path], acc, prep: dict[str, Any],
                   tta: str = "none") -> list[dict[str, Any]]:
    """One row per file, in the order given: path, status, predicted class and every class's probability."""
    net, names = loaded.net.to(acc.device).eval(), list(loaded.net.classes or ())
    transform = eval_transform(net.input_spec)
    mine = list(range(acc.process_index, len(files), acc.num_processes))
    rows: list[dict[str, Any]] = []
    for start in range(0, len(mine), BATCH):
        chunk = mine[start:start + BATCH]
        made = [make_face(files[i], prep) for i in chunk]
        ready = [j for j, (face, _) in enumerate(made) if face is not None]
        probs = None
        if ready:
            batch = torch.stack([transform(_face_tensor(made[j][0])) for j in ready]).to(acc.device)
            probs = batch_probs(net, batch, tta).cpu().double().numpy()
        got = {j: probs[n] for n, j in enumerate(ready)} if probs is not None else {}
        for j, i in enumerate(chunk):
            row: dict[str, Any] = {"index": i, "path": str(files[i]), "status": made[j][1]}
            if j in got:
                row["predicted"] = names[int(got[j].argmax())]
                row["confidence"] = float(got[j].max())
                row.update({f"p_{c}": float(p) for c, p in zip(names, got[j], strict=True)})
            rows.append(row)
    if acc.num_processes > 1:
        rows = gather_object(rows)
    return sorted(rows, key=lambda r: r["index"])


def format_rows(rows: list[dict[str, Any]], classes: list[str], kind: str) -> str:
    """The rows as CSV (a column per class; empty where no face) or as JSON."""
    fields = [*FIELDS_START, *[f"p_{c}" for c in classes]]
    clean = [{k: r.get(k) for k in fields} for r in rows]
    if kind == "json":
        return json.dumps(clean, indent=2) + "\n"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in clean:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else ("" if v is None else v))
                         for k, v in r.items()})
    return buf.getvalue()
