"""The whole workflow on the trained Fashion-MNIST ResNet-20, as a new user would run it:
compress with calibration from a DataLoader, read the report, fine-tune one epoch, evaluate,
save and reload, export with a dynamic batch and check it in onnxruntime at batch 1 and 8.

    python examples/workflow_fmnist.py [OUT_DIR]        (full data: ~10 min on 2 cores)
    CI=true python examples/workflow_fmnist.py          (2,048 training / 2,000 test images)

Needs the Fashion-MNIST files (``apt-get install dataset-fashion-mnist``); says so and stops
without them.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from fmnist_nets import resnet20_fmnist
from torch.utils.data import DataLoader, TensorDataset

import lrfx
from lrfx.contrib.data import load_fashion_mnist
from lrfx.contrib.zoo import resnet20

torch.manual_seed(0)
torch.set_num_threads(min(2, torch.get_num_threads()))
small_run = os.environ.get("CI") == "true"
out = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="lrfx-workflow-"))

try:
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
except lrfx.LrfxError as exc:
    print(f"skipped: {exc}")
    sys.exit(0)
if small_run:
    xtr, ytr, xte, yte = xtr[:2048], ytr[:2048], xte[:2000], yte[:2000]

train = DataLoader(TensorDataset(xtr, ytr), batch_size=128, shuffle=True,
                   generator=torch.Generator().manual_seed(0))
test = DataLoader(TensorDataset(xte, yte), batch_size=500)
dense, example = resnet20_fmnist()

print(f"# 1. the dense model on {len(xte):,} test images")
print(lrfx.evaluate(dense, test))

print("\n# 2. compress to 0.5x MACs, calibrating on 8 batches of the training DataLoader")
t0 = time.perf_counter()
small = lrfx.compress(dense, example, macs=0.5, calibration=train, calibration_batches=8)
print(f"({time.perf_counter() - t0:.1f} s)")
report = lrfx.facts_of(small).report
print(report.table())

print("\n# 3. the report as files")
for f in report.write(out / "report"):
    print(f"  {f.relative_to(out)}")
for layer, why in report.skipped.items():
    print(f"  left dense: {layer}: {why}")

print("\n# 4. evaluate against the dense model (no fine-tuning yet)")
print(lrfx.evaluate(small, test, reference=dense))

print("\n# 5. fine-tune one epoch (Adam, lr 1e-4), evaluate again")
result = lrfx.fit(small, train, epochs=1, lr=1e-4)
print(f"{result.steps} steps in {result.seconds:.1f} s, mean loss {result.losses[0]:.4f}")
print(lrfx.evaluate(small, test, reference=dense))

print("\n# 6. save, reload from the plan and the weights (no decomposition)")
lrfx.save(small, out / "saved")
t0 = time.perf_counter()
again = lrfx.load(out / "saved", resnet20(in_channels=1), example)
print(f"loaded in {time.perf_counter() - t0:.2f} s; training mode: {again.training}")
with torch.no_grad():
    same = torch.equal(again(xte[:64]), small.eval()(xte[:64]))
print(f"outputs identical to the fine-tuned model: {same}")
assert same

print("\n# 7. export to ONNX with a dynamic batch; onnxruntime at batch 1 and 8")
import onnxruntime as ort  # noqa: E402

path = lrfx.export(again, out / "resnet20_half.onnx", example, format="onnx", dynamic="batch")
session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
for b in (1, 8):
    got = session.run(None, {name: xte[:b].numpy()})[0]
    with torch.no_grad():
        want = again(xte[:b]).numpy()
    gap = np.abs(got - want).max()
    print(f"batch {b}: output {got.shape}, max |onnxruntime - torch| {gap:.2e}")
    assert np.allclose(got, want, atol=1e-4)
print(f"\nwrote {out}")
