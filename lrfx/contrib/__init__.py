"""Helpers outside the compression core: reference models, datasets, model specs for the CLI.

* :mod:`lrfx.contrib.zoo` — CIFAR-style ResNet-20/56 and a small VGG (the seed papers' nets);
* :mod:`lrfx.contrib.data` — Fashion-MNIST (Debian ``dataset-fashion-mnist``) and scikit-learn's
  digits as tensors;
* :mod:`lrfx.contrib.models` — the model specs the CLI accepts (``torchvision:NAME``,
  ``package.module:factory``, a saved module) and input-shape specs.

Nothing in the core (:mod:`lrfx` passes, plans, rewrites) imports these.
"""
