#!/usr/bin/env python3
"""PyTorch eager-mode quantization (torch 2.15.0, fbgemm) of a small graph with two
LayerNorms, for tests/graph_layernorm.rs: PyTorch's default module mapping converts
nn.LayerNorm to torch.ao.nn.quantized.LayerNorm (its own output scale / zero point).

Model: QuantStub -> conv 3->4 3x3 pad 1 (6x6) -> LayerNorm([4, 6, 6], no affine; its input
is channels_last, quantized.layer_norm makes it contiguous) -> flatten -> fc1 144->32 ->
LayerNorm(32, random affine) -> fc2 32->10 -> DeQuantStub. QConfig: MinMax activations
with reduce_range, per-channel symmetric qint8 MinMax weights (ptq's
`QConfig::minmax_per_channel()`); calibration on 4 batches of 8 inputs.

Writes tests/fixtures/graph_layernorm.safetensors (about 44 KB): the float state_dict
(PyTorch names), `__calib__` [32, 3, 6, 6], `__input__` [16, 3, 6, 6], `__output__` the
int8 model's dequantized output, `__qparams__.<module>` [scale, zero point] of every
quantized module's output (and of the QuantStub `quant`), `__float__` the float output.

    /work/venv/bin/python tools/gen_layernorm_fixture.py
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
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures",
                   "graph_layernorm.safetensors")


class M(nn.Module):
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


def main():
    m = M().eval()
    with torch.no_grad():
        m.ln2.weight.copy_(torch.rand(32) * 1.5 + 0.25)
        m.ln2.bias.copy_(torch.randn(32) * 0.3)
    sd = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
    calib = torch.randn(32, 3, 6, 6)
    x = torch.randn(16, 3, 6, 6) * 1.2
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
    assert type(q.ln1).__module__.startswith("torch.ao.nn.quantized"), type(q.ln1)
    assert type(q.ln2).__module__.startswith("torch.ao.nn.quantized"), type(q.ln2)
    with torch.no_grad():
        y = q(x)
    out = dict(sd)
    out["__calib__"] = calib
    out["__input__"] = x
    out["__output__"] = y
    out["__float__"] = y_float
    for name in ["quant", "conv", "ln1", "fc1", "ln2", "fc2"]:
        mod = getattr(q, name)
        out[f"__qparams__.{name}"] = torch.tensor([float(mod.scale), float(mod.zero_point)])
    out = {k: v.float().contiguous() for k, v in out.items()}
    save_file(out, OUT, metadata={"torch": torch.__version__})
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes); quantized modules:",
          {n: type(getattr(q, n)).__name__ for n in ["conv", "ln1", "fc1", "ln2", "fc2"]})


if __name__ == "__main__":
    main()
