"""Model factories for the CLI: ``lrfx compress fmnist_nets:resnet20_fmnist ...`` from this folder.

A factory returns ``(model, example_inputs)``; lrfx finds this module in the current directory.
The weights are the committed Fashion-MNIST checkpoint (``bench/checkpoints``, trained by
``bench/train_fmnist.py``: 92.67 % on the 10k test images).
"""

from pathlib import Path

import torch

from lrfx.contrib.zoo import resnet20

CHECKPOINT = Path(__file__).resolve().parents[1] / "bench" / "checkpoints" / "resnet20_fmnist.pt"


def resnet20_fmnist() -> tuple[torch.nn.Module, torch.Tensor]:
    """The trained ResNet-20 (1 input channel) in eval mode, with a 1x1x28x28 example input."""
    model = resnet20(in_channels=1)
    model.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    return model.eval(), torch.zeros(1, 1, 28, 28)


if __name__ == "__main__":
    model, x = resnet20_fmnist()
    print(type(model).__name__, tuple(model(x).shape))
