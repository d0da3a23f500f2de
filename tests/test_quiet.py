"""A normal run prints no third-party notices: torch's _pytree notice on importing torchao, torch.jit.script's
deprecation warning on the first jvp, functorch's batching-rule fallback note (adaptive_avg_pool2d under vmap)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import warnings
warnings.simplefilter("always")
from compress import Budget, plan_bits, quantize, resolve
from compress.data import synthetic
model = resolve("small_resnet")
plan = plan_bits(model, synthetic(16), Budget(avg_bits=5), calibration_samples=16)
quantize(model, plan)
import torch
from torch import nn
from torchvision.ops.misc import Permute
pooled = nn.Sequential(nn.Conv2d(1, 8, 3), Permute([0, 2, 3, 1]), nn.Linear(8, 8), Permute([0, 3, 1, 2]),
                       nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()  # ConvNeXt's channels-last pattern
plan_bits(pooled, synthetic(8), Budget(avg_bits=5), example_inputs=torch.zeros(1, 1, 28, 28), calibration_samples=8)
print("done")
"""


def test_planning_and_quantizing_print_no_third_party_notices() -> None:
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr[-2000:]
    assert run.stderr == "", run.stderr[-2000:]
