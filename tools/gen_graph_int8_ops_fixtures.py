#!/usr/bin/env python3
"""PyTorch eager-mode quantization (torch 2.15.0, fbgemm) of small graphs with the int8 ops
PyTorch runs outside conv / linear / add, for tests/graph_int8_ops.rs.

1. LayerNorm: PyTorch's default module mapping converts nn.LayerNorm to
torch.ao.nn.quantized.LayerNorm (its own output scale / zero point). Model: QuantStub -> conv 3->4 3x3 pad 1 (6x6) -> LayerNorm([4, 6, 6], no affine; its input
is channels_last, quantized.layer_norm makes it contiguous) -> flatten -> fc1 144->32 ->
LayerNorm(32, random affine) -> fc2 32->10 -> DeQuantStub. QConfig: MinMax activations
with reduce_range, per-channel symmetric qint8 MinMax weights (ptq's
`QConfig::minmax_per_channel()`); calibration on 4 batches of 8 inputs.

Writes tests/fixtures/graph_layernorm.safetensors (about 44 KB).

2. Bilinear upsampling: nn.Upsample(mode="bilinear") has no module mapping; on a quantized
input PyTorch runs quantized::upsample_bilinear2d with the input's qparams (channels-last
after a conv, so its NHWC kernel). Model: QuantStub -> conv 3->4 3x3 pad 1 (5x7) ->
Upsample(scale 2, align_corners=False) -> conv 4->4 3x3 pad 1 -> Upsample(size (13, 9),
align_corners=True) -> conv 4->2 1x1 -> DeQuantStub. Writes
tests/fixtures/graph_upsample_bilinear.safetensors (about 52 KB).

Each file: the float state_dict (PyTorch names), `__calib__` (4 batches of 8),
`__input__` (16 inputs), `__output__` the int8 model's dequantized output,
`__qparams__.<module>` [scale, zero point] of every quantized module's output (and of the
QuantStub `quant`), `__float__` the float output.

    /work/venv/bin/python tools/gen_graph_int8_ops_fixtures.py
"""
import os

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.ao.quantization import (
    DeQuantStub,
    MinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    QuantStub,
    convert,
    prepare,
)

assert torch.__version__.startswith("2.15.0"), torch.__version__
torch.manual_seed(0)
torch.set_num_threads(1)
torch.backends.quantized.engine = "fbgemm"
FIX = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")


class LayerNorms(nn.Module):
    modules_ = ["quant", "conv", "ln1", "fc1", "ln2", "fc2"]
    in_shape = (3, 6, 6)

    def __init__(self):
        super().__init__()
        self.quant = QuantStub()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.ln1 = nn.LayerNorm([4, 6, 6], elementwise_affine=False)
        self.fc1 = nn.Linear(144, 32)
        self.ln2 = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 10)
        self.dequant = DeQuantStub()

    def forward(self, x):
        x = self.ln1(self.conv(self.quant(x)))
        x = self.ln2(self.fc1(torch.flatten(x, 1)))
        return self.dequant(self.fc2(x))

    def init(self):
        with torch.no_grad():
            self.ln2.weight.copy_(torch.rand(32) * 1.5 + 0.25)
            self.ln2.bias.copy_(torch.randn(32) * 0.3)


class Bilinear(nn.Module):
    modules_ = ["quant", "conv1", "conv2", "conv3"]
    in_shape = (3, 5, 7)

    def __init__(self):
        super().__init__()
        self.quant = QuantStub()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.up1 = nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=False)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.up2 = nn.Upsample(size=(13, 9), mode="bilinear", align_corners=True)
        self.conv3 = nn.Conv2d(4, 2, 1)
        self.dequant = DeQuantStub()

    def forward(self, x):
        x = self.up1(self.conv1(self.quant(x)))
        return self.dequant(self.conv3(self.up2(self.conv2(x))))

    def init(self):
        pass


def run(m, out_name, check):
    m = m.eval()
    m.init()
    sd = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    calib = torch.randn(32, *m.in_shape)
    x = torch.randn(16, *m.in_shape) * 1.2
    with torch.no_grad():
        y_float = m(x)
    m.qconfig = QConfig(
        activation=MinMaxObserver.with_args(reduce_range=True),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                  qscheme=torch.per_channel_symmetric),
    )
    p = prepare(m)
    with torch.no_grad():
        for b in calib.split(8):
            p(b)
    q = convert(p)
    check(q)
    with torch.no_grad():
        y = q(x)
    out = dict(sd)
    out["__calib__"] = calib
    out["__input__"] = x
    out["__output__"] = y
    out["__float__"] = y_float
    for name in m.modules_:
        mod = getattr(q, name)
        out[f"__qparams__.{name}"] = torch.tensor([float(mod.scale), float(mod.zero_point)])
    out = {k: v.float().contiguous() for k, v in out.items()}
    path = os.path.join(FIX, out_name)
    save_file(out, path, metadata={"torch": torch.__version__})
    print(f"wrote {path} ({os.path.getsize(path)} bytes); quantized modules:",
          {n: type(getattr(q, n)).__name__ for n in m.modules_})


def quantized_ln(q):
    for ln in (q.ln1, q.ln2):
        assert type(ln).__module__.startswith("torch.ao.nn.quantized"), type(ln)


def main():
    run(LayerNorms(), "graph_layernorm.safetensors", quantized_ln)
    run(Bilinear(), "graph_upsample_bilinear.safetensors", lambda q: None)


if __name__ == "__main__":
    main()
