#!/usr/bin/env bash
# Regenerates the example outputs of docs/CLI.md: the quick start and its baseline arm (trained where
# missing), then eval, compare, predict and export on them, each output printed after its command line.
# Run from the repository root: bash tools/docs/cli_examples.sh > /tmp/examples.txt (about 5 min on 2 cores).
set -euo pipefail
FER=${FER:-.venv/bin/fer-dist}
[ -f runs/quickstart/summary.json ] || "$FER" train --processes 2 >/dev/null 2>&1
[ -f runs/quickstart-baseline/summary.json ] || "$FER" train --processes 2 run.name=quickstart-baseline \
  method.label_smoothing=false method.self_training=false >/dev/null 2>&1
rm -rf runs/examples && mkdir -p runs/examples/faces  # this script's own scratch folder
# three test faces of the synthetic set as image files, for predict
.venv/bin/python - <<'PY'
import json, tarfile
from pathlib import Path
faces = Path("runs/examples/faces")
with tarfile.open(sorted(Path("shards/synthetic").glob("test-*.tar"))[0]) as tar:
    pngs = [m for m in tar.getmembers() if m.name.endswith(".png")][:30:10]
    for name, m in zip("abc", pngs):
        (faces / f"{name}.png").write_bytes(tar.extractfile(m).read())
PY
show() { echo "\$ ${*/#.venv\/bin\//}"; "$@" 2>&1; echo; }
COLUMNS=110 show "$FER" eval runs/quickstart --shards shards/synthetic --out runs/examples/eval
COLUMNS=110 show "$FER" intensity runs/quickstart --shards shards/synthetic:test --out runs/examples/intensity
COLUMNS=110 show "$FER" compare runs/quickstart-baseline runs/quickstart --out runs/examples/compare
COLUMNS=110 show "$FER" predict runs/quickstart runs/examples/faces --out runs/examples/predictions.csv
cat runs/examples/predictions.csv; echo
COLUMNS=110 show "$FER" export runs/quickstart --onnx runs/examples/model.onnx
echo "machine: $(uname -m), $(nproc) cores; $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD)"
