#!/usr/bin/env python3
"""Trains the small CNN that examples/quickstart.rs quantizes, on the UCI handwritten
digits (the copy scikit-learn ships), and writes:

  examples/data/digits.safetensors     the data set as u8 (pixels 0..16) with a fixed
                                       train/test split: train_x [1297, 8, 8], train_y,
                                       test_x [500, 8, 8], test_y
  examples/data/digits_cnn.safetensors the trained float state_dict (f32)

Requires torch==2.15.0, scikit-learn, safetensors:

    ~/torchenv/bin/pip install torch==2.15.0 scikit-learn safetensors
    ~/torchenv/bin/python tools/train_digits.py

Data: "Optical Recognition of Handwritten Digits" by E. Alpaydin and C. Kaynak, UCI
Machine Learning Repository, CC BY 4.0 (see examples/data/README.md).
"""
import os

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file
from sklearn.datasets import load_digits

assert torch.__version__.startswith("2.15.0"), torch.__version__
torch.manual_seed(0)
torch.set_num_threads(1)
OUT = os.path.join(os.path.dirname(__file__), "..", "examples", "data")


class DigitsCNN(nn.Module):
    """QuantStub -> conv-bn-relu x2 -> maxpool -> conv-bn-relu -> avgpool(2) -> fc-relu -> fc -> DeQuantStub."""

    def __init__(self):
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.relu3 = nn.ReLU()
        self.avg = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(128, 64)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.flatten(self.avg(x))
        x = self.relu4(self.fc1(x))
        return self.dequant(self.fc2(x))


def load_split():
    d = load_digits()
    rng = np.random.RandomState(0)
    order = rng.permutation(len(d.target))
    x = d.images[order].astype(np.uint8)
    y = d.target[order].astype(np.uint8)
    return x[:1297], y[:1297], x[1297:], y[1297:]


def to_input(x_u8):
    """Pixels 0..16 -> float in [0, 1], shape [N, 1, 8, 8]."""
    return torch.from_numpy(x_u8).float().div(16.0).unsqueeze(1)


if __name__ == "__main__":
    train_x, train_y, test_x, test_y = load_split()
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = to_input(train_x), torch.from_numpy(train_y).long()
    for epoch in range(40):
        model.train()
        perm = torch.randperm(len(yt))
        for i in range(0, len(yt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(to_input(test_x)).argmax(1) == torch.from_numpy(test_y).long()).float().mean().item()
    print(f"float test accuracy: {acc:.4f}")
    save_file({"train_x": torch.from_numpy(train_x), "train_y": torch.from_numpy(train_y),
               "test_x": torch.from_numpy(test_x), "test_y": torch.from_numpy(test_y)},
              os.path.join(OUT, "digits.safetensors"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(OUT, "digits_cnn.safetensors"))
