"""Training-time methods: small objects that run inside your own training loop.

Each method is built from the model and example inputs, exposes the hooks :func:`lrfx.fit`
calls (and your loop can call the same way) — ``penalty(model)``, ``after_backward(model)``,
``after_step(model)``, ``end_epoch(model, epoch)`` — and ``finalize(model)`` returns the factored
model. They are built from the same analysis, schemes, plans and rewrite as post-training
compression (:mod:`lrfx.methods._targets`), and checkpoint with ``state_dict()``.

* :class:`TRP` — Trained Rank Pruning (energy-rank projection + nuclear-norm subgradient);
* :class:`LC` — the LC algorithm (L steps with a quadratic coupling, exact C steps, multipliers),
  and :class:`ProductDecay` for fine-tuning its factored result;
* :class:`DecomposableNet` — one set of weights trained to work at any size;
* :class:`Slimming` — network slimming: l1 / lp / transformed-l1 penalties (:class:`Penalty`) on
  BatchNorm scales and rank gates, then structural channel pruning.
"""

from lrfx.methods._targets import Target, find_targets, unwrap
from lrfx.methods.dnet import DecomposableNet
from lrfx.methods.lc import LC, ProductDecay
from lrfx.methods.penalties import Penalty
from lrfx.methods.slimming import Slimming
from lrfx.methods.trp import TRP

__all__ = ["DecomposableNet", "LC", "Penalty", "ProductDecay", "Slimming", "TRP", "Target",
           "find_targets", "unwrap"]
