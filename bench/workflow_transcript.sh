#!/usr/bin/env bash
# A new user's workflow on the trained Fashion-MNIST ResNet-20, recorded as a transcript:
#   bash bench/workflow_transcript.sh        -> bench/results/workflow_transcript.md
# The Python API (examples/workflow_fmnist.py, full data), then the same from the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/results/workflow_transcript.md
WORK=$(mktemp -d)
PY=$PWD/.venv/bin/python
LRFX=$PWD/.venv/bin/lrfx
export OMP_NUM_THREADS=2
run() {  # run a command from examples/, appending it and its output to the transcript
  echo '```console' >> "$OUT"
  echo "\$ $*" | sed -e "s#$PWD/.venv/bin/##g" -e "s#$WORK#/tmp/work#g" >> "$OUT"
  local rc=0
  (cd examples && "$@") > "$WORK/.log" 2>&1 || rc=$?
  sed -e "s#$WORK#/tmp/work#g" -e "s#$PWD/##g" "$WORK/.log" >> "$OUT"
  [ "$rc" = 0 ] || echo "(exit status $rc)" >> "$OUT"
  echo '```' >> "$OUT"
  echo >> "$OUT"
}
{
  echo "# Transcript: the whole workflow on the Fashion-MNIST ResNet-20"
  echo
  echo "Recorded by \`bash bench/workflow_transcript.sh\` on $(date -u +%Y-%m-%d), $(nproc) cores,"
  echo "OMP_NUM_THREADS=2, torch $($PY -c 'import torch; print(torch.__version__)'), load average"
  echo "$(cut -d' ' -f1-3 /proc/loadavg) at the start. Commands run from \`examples/\`."
  echo
  echo "## Python: compress, report, fine-tune, evaluate, reload, export (dynamic batch)"
  echo
} > "$OUT"
run "$PY" workflow_fmnist.py "$WORK/py"
echo "## CLI: the same model from the current directory's factory" >> "$OUT"
echo >> "$OUT"
run "$LRFX" compress fmnist_nets:resnet20_fmnist --macs 0.5 --calibration fashion-mnist \
  --finetune 1 --format onnx --dynamic batch -o "$WORK/cli"
run ls "$WORK/cli"
run "$PY" -c "import numpy as np, onnxruntime as ort
s = ort.InferenceSession('$WORK/cli/model.onnx')
for b in (1, 8):
    print('batch', b, '->', s.run(None, {s.get_inputs()[0].name: np.zeros((b, 1, 28, 28), np.float32)})[0].shape)"
run head -n 24 "$WORK/cli/report.md"
run "$LRFX" compress fmnist_nets:resnet20_fmnist --macs 0.5 -o "$WORK/cli"
run "$PY" -c "import lrfx; open('$WORK/cfg.json', 'w').write(lrfx.CompressConfig(macs=0.5, exclude=['conv1', 'fc']).to_json())"
run "$LRFX" compress fmnist_nets:resnet20_fmnist --config "$WORK/cfg.json" --macs 0.4 \
  --calibration fashion-mnist --calibration-size 512 -o "$WORK/cli" --force
run ls "$WORK/cli"
run "$LRFX" export "$WORK/cli" --format pt2 --dynamic batch -o "$WORK/dynamic.pt2"
run "$PY" -c "import torch
m = torch.export.load('$WORK/dynamic.pt2').module()
for b in (1, 8):
    print('batch', b, '->', tuple(m(torch.zeros(b, 1, 28, 28)).shape))"
echo "wrote $OUT"
