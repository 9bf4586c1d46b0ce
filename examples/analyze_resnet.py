"""Analyze a torchvision ResNet-18: per-layer MACs, parameters and energy ranks."""

import torch
import torchvision

import lrfx

model = torchvision.models.resnet18()  # random weights; nothing is downloaded
x = torch.randn(1, 3, 224, 224)

analysis = lrfx.analyze(model, x)
print(analysis.table())

conv = analysis["layer3.0.conv2"]
print(f"{conv.name}: {conv.macs:,} MACs, rank at 95% energy {conv.rank_at_energy('channel', 0.95)}")

plan = lrfx.RankPlan({"layer3.0.conv2": lrfx.LayerPlan("channel", 64)})
print(f"predicted MACs under the plan: {plan.resolve(analysis).macs:,} of {analysis.total_macs:,}")
