"""Measured latency: time layers and whole models on the machine that runs them.

Fewer MACs is not fewer milliseconds (``algorithms.md`` §6): a factored layer runs two or three
smaller kernels where the dense layer ran one, and small or oddly sized GEMMs run far below peak.
The latency budget (``lrfx.compress(..., latency=0.6)``) therefore allocates on *measured* times:

* a :class:`Probe` is one thing to time — a layer's dense form, or one scheme at one rank — at the
  layer's real input shape (batch included), built from its geometry with random weights;
* a :class:`Timer` times a list of jobs; :class:`WallTimer` (the default) warms each up, then
  runs them round-robin (interleaved, so drifting load hits them alike), takes the median of
  each, and stops once every job has ``min_repeats`` runs and the group used ``time_cap``
  seconds. On CUDA it synchronizes around every run. Tests pass a deterministic fake;
* a :class:`LatencyModel` times probes through a :class:`LatencyCache`, a JSON file under
  :func:`cache_dir` keyed by everything that changes a time — torch version, CPU/GPU model,
  thread count, dtype, device, the geometry (batch included), scheme and rank — so a second
  compression of the same model on the same machine measures nothing.

Whole models are timed with :func:`time_models` (interleaved, medians), which is how
:func:`lrfx.compress` reports the measured latency of its result next to the prediction.

Example:
    >>> import torch
    >>> from lrfx.cost import LinearGeometry
    >>> lm = LatencyModel(timer=lambda jobs: [1e-3 if j.probe.scheme == "dense" else 4e-4
    ...                                       for j in jobs], cache=None)
    >>> g = LinearGeometry(256, 256, rows=32)
    >>> lm.measure([Probe(g, "dense"), Probe(g, "svd", (32,))])
    [0.001, 0.0004]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lrfx.cost import ConvGeometry, Geometry, LinearGeometry
from lrfx.errors import LrfxError
from lrfx.inputs import Inputs
from lrfx.modules import _CONV_CLS, _like, build_factored
from lrfx.schemes import get_scheme

__all__ = [
    "CACHE_ENV",
    "LatencyCache",
    "LatencyModel",
    "LatencyProfile",
    "MODEL_TIMER",
    "Probe",
    "Timed",
    "Timer",
    "WallTimer",
    "cache_dir",
    "environment",
    "time_models",
]

log = logging.getLogger(__name__)

#: Environment variable naming the directory of lrfx's caches (default ``~/.cache/lrfx``).
CACHE_ENV = "LRFX_CACHE_DIR"

#: Bump when the meaning of a cached time changes.
_CACHE_VERSION = 1


def cache_dir() -> Path:
    """Where lrfx keeps its caches: ``$LRFX_CACHE_DIR``, else ``$XDG_CACHE_HOME/lrfx``, else
    ``~/.cache/lrfx``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lrfx"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    """What a measured time depends on besides the layer: one string, the cache's outer key."""
    device = torch.device(device)
    if device.type == "cuda":
        where = f"cuda:{torch.cuda.get_device_name(device)}"
    else:
        where = f"{device.type}:{_cpu_name()}:threads={torch.get_num_threads()}"
    return f"torch={torch.__version__}|{where}|{str(dtype).replace('torch.', '')}"


_environment = environment  # LatencyModel's argument of the same name hides the function


# --- what is timed --------------------------------------------------------------------------------


def _geometry_dict(g: Geometry) -> dict[str, Any]:
    d = dataclasses.asdict(g)
    return {"kind": g.kind, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


@dataclass(frozen=True)
class Probe:
    """One layer form to time: ``scheme`` is ``"dense"`` or a scheme name with its ``rank``.

    The layer runs at its geometry's input shape: ``(rows, in_features)`` for a Linear (leading
    dims flattened: the same GEMM), ``(batch, C, *spatial)`` for a conv.
    """

    geometry: Geometry
    scheme: str = "dense"
    rank: tuple[int, ...] | None = None

    @property
    def key(self) -> str:
        """A stable string for the cache."""
        return json.dumps({"g": _geometry_dict(self.geometry), "s": self.scheme,
                           "r": None if self.rank is None else list(self.rank)},
                          sort_keys=True, separators=(",", ":"))

    def build(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
              ) -> tuple[nn.Module, torch.Tensor]:
        """The module (random weights, eval mode) and a random input of the right shape."""
        g = self.geometry
        gen = torch.Generator().manual_seed(0)
        if isinstance(g, LinearGeometry):
            x = torch.randn(g.rows, g.in_features, generator=gen)
        elif isinstance(g, ConvGeometry):
            if g.transposed:
                raise LrfxError("transposed convolutions are never factored; nothing to time")
            x = torch.randn(g.batch, g.in_channels, *g.in_spatial, generator=gen)
        else:  # pragma: no cover - Geometry is a closed union
            raise LrfxError(f"cannot time a layer of geometry {g!r}")
        m: nn.Module
        if self.scheme == "dense":
            if isinstance(g, LinearGeometry):
                m = nn.Linear(g.in_features, g.out_features, bias=g.bias)
            else:
                kw = _like(g)
                for k in ("transposed", "output_padding"):
                    kw.pop(k)
                m = _CONV_CLS[g.dims](**kw, bias=g.bias)
        else:
            scheme = get_scheme(self.scheme)
            assert self.rank is not None
            rank = self.rank[0] if len(self.rank) == 1 else self.rank
            m = build_factored(scheme.layout(g, scheme.ranks(rank)), scheme=self.scheme,
                               rank=rank, requires_grad=False)
        with torch.no_grad():  # real values: uninitialized memory can hold denormals (slow)
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        m = m.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return m, x.to(device=device, dtype=dtype)


@dataclass(frozen=True)
class Timed:
    """A job for a :class:`Timer`: ``make()`` returns the zero-argument callable to time.

    ``probe`` is set for layer probes (a fake timer can price them from the geometry), ``module``
    for whole models; ``key`` names the job.
    """

    key: str
    make: Callable[[], Callable[[], Any]]
    probe: Probe | None = None
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    module: nn.Module | None = None


class Timer(Protocol):
    """Times jobs; returns one time in seconds per job (a median over repeated runs)."""

    def __call__(self, jobs: Sequence[Timed]) -> list[float]: ...


@dataclass(frozen=True)
class WallTimer:
    """Robust wall-clock timing of a group of jobs, interleaved.

    Attributes:
        warmup: Untimed runs of each job first.
        min_repeats, max_repeats: Timed runs of each job (at least / at most).
        time_cap: Once every job has ``min_repeats`` runs, stop after this many seconds of the
            group's timed runs.
        slow_repeats: When one round of the group (timed during warm-up) takes so long that
            ``min_repeats`` rounds would exceed three times ``time_cap``, this many suffice.
    """

    warmup: int = 2
    min_repeats: int = 3
    max_repeats: int = 50
    time_cap: float = 0.5
    slow_repeats: int = 3

    def __call__(self, jobs: Sequence[Timed]) -> list[float]:
        fns = [j.make() for j in jobs]
        cuda = any(j.device.type == "cuda" for j in jobs)

        def sync() -> None:
            if cuda:
                torch.cuda.synchronize()

        times: list[list[float]] = [[] for _ in fns]
        with torch.inference_mode():
            t0 = time.perf_counter()
            for fn in fns:
                for _ in range(self.warmup):
                    fn()
            sync()
            round_s = (time.perf_counter() - t0) / max(self.warmup, 1)
            least = self.min_repeats
            if round_s * self.min_repeats > 3 * self.time_cap:
                least = min(least, self.slow_repeats)
            spent = 0.0
            for rnd in range(self.max_repeats):
                if rnd >= least and spent >= self.time_cap:
                    break
                shift = rnd % len(fns)  # rotate the order: no job always runs first
                for i in [*range(shift, len(fns)), *range(shift)]:
                    t0 = time.perf_counter()
                    fns[i]()
                    sync()
                    dt = time.perf_counter() - t0
                    times[i].append(dt)
                    spent += dt
        return [statistics.median(t) for t in times]


# --- the cache ------------------------------------------------------------------------------------


class LatencyCache:
    """Measured times on disk: ``{environment: {probe key: seconds}}`` in one JSON file.

    Reads the file once; :meth:`save` merges with what another process may have written since and
    replaces the file atomically. A damaged file is ignored (and rewritten), never an error.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        default = cache_dir() / f"latency-v{_CACHE_VERSION}.json"
        self.path = Path(path) if path is not None else default
        self._data: dict[str, dict[str, float]] = self._read()
        self._dirty = False

    def _read(self) -> dict[str, dict[str, float]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: dict(v) for k, v in data.items() if isinstance(v, dict)}

    def get(self, env: str, key: str) -> float | None:
        v = self._data.get(env, {}).get(key)
        return float(v) if isinstance(v, (int, float)) else None

    def put(self, env: str, key: str, seconds: float) -> None:
        self._data.setdefault(env, {})[key] = float(seconds)
        self._dirty = True

    def __len__(self) -> int:
        return sum(len(v) for v in self._data.values())

    def save(self) -> None:
        if not self._dirty:
            return
        merged = self._read()
        for env, entries in self._data.items():
            merged.setdefault(env, {}).update(entries)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".latency-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(merged, f, separators=(",", ":"))
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only home is no reason to fail a compression
            log.warning("could not write the latency cache %s: %s", self.path, e)
            return
        self._data, self._dirty = merged, False


# --- the model ------------------------------------------------------------------------------------


class LatencyModel:
    """Per-layer latencies of this machine: probes timed once, then read from the cache.

    Args:
        device, dtype: Where and in what precision the layers run (the model's).
        timer: Times layer probes (default :class:`WallTimer`).
        model_timer: Times whole models (:meth:`time_models`; default: ``timer`` when given,
            else a :class:`WallTimer` with more repeats). Whole-model times are never cached.
        cache: A :class:`LatencyCache`, ``True`` for the default file, or ``None`` for none.
        environment: The cache's outer key (default :func:`environment` of device and dtype).
    """

    def __init__(self, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 timer: Timer | None = None, model_timer: Timer | None = None,
                 cache: LatencyCache | bool | None = True,
                 environment: str | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self.timer: Timer = timer if timer is not None else WallTimer()
        self.model_timer: Timer = model_timer or timer or MODEL_TIMER
        self.cache = LatencyCache() if cache is True else (
            cache if isinstance(cache, LatencyCache) else None)
        self.environment = environment or _environment(self.device, dtype)
        self.measured = 0  # probes timed (not from the cache) by this model
        self._memo: dict[str, float] = {}

    def _job(self, p: Probe) -> Timed:
        def make(p: Probe = p) -> Callable[[], Any]:
            m, x = p.build(self.dtype, self.device)
            return lambda: m(x)

        return Timed(p.key, make, p, self.device)

    def lookup(self, p: Probe) -> float | None:
        k = p.key
        if k in self._memo:
            return self._memo[k]
        return None if self.cache is None else self.cache.get(self.environment, k)

    def measure(self, probes: Sequence[Probe]) -> list[float]:
        """Seconds per probe; the uncached ones are timed together (interleaved)."""
        out: list[float | None] = [self.lookup(p) for p in probes]
        todo: dict[str, Probe] = {}
        for p, t in zip(probes, out, strict=True):
            if t is None:
                todo.setdefault(p.key, p)
        if todo:
            jobs = [self._job(p) for p in todo.values()]
            times = self.timer(jobs)
            if len(times) != len(jobs):
                raise LrfxError(f"the timer returned {len(times)} times for {len(jobs)} jobs")
            for k, t in zip(todo, times, strict=True):
                self._memo[k] = float(t)
                if self.cache is not None:
                    self.cache.put(self.environment, k, float(t))
            self.measured += len(todo)
            if self.cache is not None:
                self.cache.save()
        return [self._memo[p.key] if t is None else t for p, t in zip(probes, out, strict=True)]


    def time_models(self, models: Mapping[str, nn.Module], example_inputs: Any
                    ) -> dict[str, float]:
        """Whole models timed side by side with :attr:`model_timer` (see :func:`time_models`)."""
        return time_models(models, example_inputs, timer=self.model_timer)


#: How whole models are timed by default: more repeats than a layer, a longer cap.
MODEL_TIMER = WallTimer(warmup=2, min_repeats=7, max_repeats=200, time_cap=3.0)


def time_models(models: Mapping[str, nn.Module], example_inputs: Any, *,
                timer: Timer | None = None) -> dict[str, float]:
    """Median seconds per forward of each model on ``example_inputs``, timed interleaved.

    Every model runs in eval mode under ``torch.inference_mode`` (its mode is restored); the
    inputs are moved to each model's device.
    """
    timer = timer if timer is not None else MODEL_TIMER
    inputs = Inputs.of(example_inputs)
    jobs = []
    with contextlib.ExitStack() as stack:
        for name, m in models.items():
            stack.enter_context(_eval(m))
            dev = _device_of(m)
            call = inputs.map_tensors(lambda t, dev=dev: t.to(dev))  # type: ignore[misc]

            def make(m: nn.Module = m, call: Inputs = call) -> Callable[[], Any]:
                return lambda: call.call(m)

            jobs.append(Timed(f"model:{name}", make, None, dev, m))
        return dict(zip(models, timer(jobs), strict=True))


def _device_of(m: nn.Module) -> torch.device:
    for t in (*m.parameters(), *m.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval(m: nn.Module) -> Iterator[None]:
    modes = [(mod, mod.training) for mod in m.modules()]
    m.eval()
    try:
        yield
    finally:
        for mod, t in modes:
            mod.train(t)


# --- where the time goes --------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyProfile:
    """The dense model's measured latency and its conv/linear layers' shares of it
    (:func:`lrfx.profile_latency`, ``lrfx analyze --latency``).

    Attributes:
        model_ms: The whole model, median of interleaved runs.
        layers: Per layer ``{"layer", "kind", "macs", "ms", "share", "gmacs_per_s"}``: its calls
            timed alone at their input shapes; ``share`` is of ``model_ms``.
        inputs, threads, environment: What the times were measured at.
    """

    model_ms: float
    layers: tuple[Mapping[str, Any], ...]
    inputs: str = ""
    threads: int = 1
    environment: str = ""

    @property
    def layers_ms(self) -> float:
        return float(sum(x["ms"] for x in self.layers))

    def to_dict(self) -> dict[str, Any]:
        return {"model_ms": self.model_ms, "layers_ms": self.layers_ms, "inputs": self.inputs,
                "threads": self.threads, "environment": self.environment,
                "layers": [dict(x) for x in self.layers]}

    def table(self, top: int | None = None) -> str:
        """The layers by time, slowest first (``top``: only the first ones)."""
        rows = sorted(self.layers, key=lambda x: -x["ms"])[:top]
        cols = ["layer", "kind", "MACs", "ms", "% time", "GMAC/s"]
        body = [[x["layer"], x["kind"], f"{x['macs']:,}", f"{x['ms']:.3f}",
                 f"{100 * x['share']:.1f}", f"{x['gmacs_per_s']:.1f}"] for x in rows]
        width = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(cols)]
        lines = ["  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                           for i, (v, w) in enumerate(zip(r, width, strict=True)))
                 for r in [cols, *body]]
        lines.append(
            f"model {self.model_ms:.3f} ms at inputs {self.inputs}, {self.threads} threads; its "
            f"{len(self.layers)} conv/linear layers timed alone: {self.layers_ms:.3f} ms "
            f"({100 * self.layers_ms / max(self.model_ms, 1e-12):.0f} %); the rest is "
            "normalization, activations, pooling and glue")
        return "\n".join(lines)
