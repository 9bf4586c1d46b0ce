"""Cost of the calibration statistics, side by side with the forward passes they ride on.

    .venv/bin/python bench/calibration_cost.py        # -> bench/results/calibration_cost.json

For each model, in one process and interleaved (medians of ``--repeat``): the plain forward
passes of the calibration batches through the traced graph, the ``collect_input_stats`` pass as
it is (conv Grams from the shift structure of the patches, ``grams.patch_gram``), and the pass as
it was before them (im2col patches a few samples at a time, float32 Gram blocks summed in float64,
``grams.im2col_gram``). Peak resident memory of
each variant is measured in a fresh subprocess. Threads: ``--threads`` (default 2).

Models: the Fashion-MNIST ResNet-20 (1 channel, 8 batches of 128 real images) and torchvision
resnet50 (8 batches of 32 at 224 px, random images: the cost does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))


def _setup(name: str) -> tuple[Any, list[torch.Tensor], torch.Tensor]:
    import torchvision

    from lrfx.api import _feed
    from lrfx.contrib.zoo import resnet20
    from lrfx.passes.analysis import annotate_costs, propagate_shapes
    from lrfx.pipeline import PassContext, Pipeline
    from lrfx.tracing import capture

    torch.manual_seed(0)
    if name == "resnet20_fmnist":
        from lrfx.contrib.data import load_fashion_mnist

        model = resnet20(in_channels=1)
        model.load_state_dict(torch.load(ROOT / "checkpoints" / "resnet20_fmnist.pt"))
        x, _ = load_fashion_mnist("train")
        batches = [x[i * 128:(i + 1) * 128] for i in range(8)]
    else:
        model = torchvision.models.resnet50()
        batches = [torch.randn(32, 3, 224, 224) for _ in range(8)]
    model.eval()
    example = batches[0][:1]
    gm = capture(model, example)
    Pipeline([propagate_shapes, annotate_costs]).run(gm, PassContext(
        example_inputs=_feed(gm, example)))
    return gm, batches, example


def _im2col_gram(x: torch.Tensor, kernel: Any, stride: Any = (1, 1), dilation: Any = (1, 1),
                 groups: int = 1, y: Any = None, pad: Any = None, vertical: bool = False) -> Any:
    """The conv Grams as the pass computed them before the shift-structured ones: im2col
    patches a few samples at a time, float32 Gram blocks summed in float64 (the vertical Gram
    from its own patches) — ``grams.im2col_gram``, with ``patch_gram``'s signature."""
    from lrfx.passes.analysis.grams import im2col_gram

    return im2col_gram(x, kernel, stride, dilation, groups, y, vertical)


def _variant(name: str) -> Any:
    """A context in which ``collect_input_stats`` behaves as ``name`` (new / old)."""
    import contextlib

    import lrfx.passes.analysis.activations as act

    @contextlib.contextmanager
    def ctx() -> Any:
        saved = act.patch_gram
        if name == "old":
            act.patch_gram = _im2col_gram
        try:
            yield
        finally:
            act.patch_gram = saved
    return ctx()


def _time_stats(gm: Any, batches: list[torch.Tensor], example: torch.Tensor, variant: str
                ) -> float:
    from lrfx.api import _feed
    from lrfx.passes.analysis import CalibrationOptions, collect_input_stats
    from lrfx.pipeline import PassContext

    ctx = PassContext(example_inputs=_feed(gm, example),
                      options=[CalibrationOptions(calibration=batches)])
    with _variant(variant):
        t0 = time.perf_counter()
        collect_input_stats(gm, ctx)
        return time.perf_counter() - t0


def _time_forward(gm: Any, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        for b in batches:
            gm(b)
        return time.perf_counter() - t0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak(fn: Any) -> float:
    """Peak resident memory (MB) above the level at the start while ``fn()`` runs (polled
    every 2 ms from a thread)."""
    import threading

    start, peak, done = _rss_mb(), [0.0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.002)

    t = threading.Thread(target=poll)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(0.0, max(peak[0], _rss_mb()) - start)


_VARIANTS = {"stats": "new", "stats_old": "old"}


def _fresh_peak(name: str, variant: str, threads: int) -> float:
    """Peak RSS growth (MB) of one variant in a fresh process: set up, return freed heap to the
    system (``malloc_trim``), then poll while the variant runs once."""
    code = (f"import sys, ctypes, torch; sys.path.insert(0, {str(ROOT)!r}); "
            f"torch.set_num_threads({threads}); import calibration_cost as c, functools as f; "
            f"gm, b, e = c._setup({name!r}); ctypes.CDLL('libc.so.6').malloc_trim(0); "
            + ("fn = f.partial(c._time_forward, gm, b)" if variant == "forward" else
               f"fn = f.partial(c._time_stats, gm, b, e, {_VARIANTS[variant]!r})")
            + "; print(c._peak(fn))")
    out = subprocess.run([sys.executable, "-c", code],
                         capture_output=True, text=True, check=True)
    return round(float(out.stdout.split()[-1]), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["resnet20_fmnist", "resnet50"])
    ap.add_argument("--memory-only", action="store_true",
                    help="only (re)measure the peak memory into the existing JSON")
    args = ap.parse_args()
    out = ROOT / "results" / "calibration_cost.json"
    if args.memory_only:
        results = json.loads(out.read_text())
        for name in args.models:
            results["models"][name]["peak_rss_mb_above_start"] = {
                v: _fresh_peak(name, v, args.threads) for v in ("forward", "stats", "stats_old")}
            print(name, results["models"][name]["peak_rss_mb_above_start"], flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        return
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"threads": args.threads, "repeat": args.repeat,
                               "torch": torch.__version__,
                               "load_average": list(__import__("os").getloadavg()),
                               "models": {}}
    for name in args.models:
        gm, batches, example = _setup(name)
        _time_forward(gm, batches[:1])  # warm-up
        times: dict[str, list[float]] = {"forward": [], "stats": [], "stats_old": []}
        for _ in range(args.repeat):  # interleaved
            times["forward"].append(_time_forward(gm, batches))
            times["stats"].append(_time_stats(gm, batches, example, "new"))
            times["stats_old"].append(_time_stats(gm, batches, example, "old"))
        med = {k: statistics.median(v) for k, v in times.items()}
        rec = {
            "batches": [list(b.shape) for b in batches[:1]] + [len(batches)],
            "seconds": med,
            "stats_over_forward": med["stats"] / med["forward"],
            "old_stats_over_forward": med["stats_old"] / med["forward"],
            "speedup": med["stats_old"] / med["stats"],
            "peak_rss_mb_above_start": {v: _fresh_peak(name, v, args.threads)
                                        for v in ("forward", "stats", "stats_old")},
        }
        results["models"][name] = rec
        print(name, json.dumps(rec, indent=1), flush=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
