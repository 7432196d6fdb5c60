#!/usr/bin/env python3
"""A small PyTorch CNN's state_dict in safetensors (f32, f16, bf16) plus its eval-mode
outputs, for tests/state_dict.rs. Requires torch==2.15.0, safetensors.

    ~/torchenv/bin/python tools/gen_state_dict_fixture.py
"""
import os

import torch
import torch.nn as nn
from safetensors.torch import save_file

assert torch.__version__.startswith("2.15.0"), torch.__version__
torch.manual_seed(7)
torch.set_num_threads(1)
HERE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


class Block(nn.Module):
    """A residual block: x + conv(relu(bn(conv(x))))."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 1)
        )

    def forward(self, x):
        return x + self.body(x)


model = nn.Sequential()
model.add_module("conv1", nn.Conv2d(3, 8, 3, padding=1))
model.add_module("bn1", nn.BatchNorm2d(8))
model.add_module("relu1", nn.ReLU())
model.add_module("pool", nn.MaxPool2d(2))
model.add_module("conv2", nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2))
model.add_module("relu2", nn.ReLU6())
model.add_module("res", Block(8))
model.add_module("avg", nn.AdaptiveAvgPool2d(1))
model.add_module("flatten", nn.Flatten())
model.add_module("fc", nn.Linear(8, 10))
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
model.eval()

x = torch.randn(2, 3, 12, 12)
with torch.no_grad():
    y = model(x)
sd = {k: v.contiguous() for k, v in model.state_dict().items()}
save_file(sd, os.path.join(HERE, "tiny_cnn.f32.safetensors"))
save_file({k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()},
          os.path.join(HERE, "tiny_cnn.f16.safetensors"))
save_file({k: (v.bfloat16() if v.is_floating_point() else v) for k, v in sd.items()},
          os.path.join(HERE, "tiny_cnn.bf16.safetensors"))
save_file({"x": x, "y": y}, os.path.join(HERE, "tiny_cnn.io.safetensors"))
print(sorted(sd))
