#!/usr/bin/env python3
"""PyTorch eager-mode post-training quantization (torch 2.15.0, fbgemm) of torchvision's
quantizable architectures, reduced in width and input size (same topology, same module
names), for tests/graph_int8_parity.rs.

For each architecture (torchvision's own Quantizable* classes: QuantStub / DeQuantStub,
FloatFunctional adds, downsample branches, `fuse_model`):
  * random weights (seeded), batch-norm statistics randomized so fusion matters;
  * `fuse_model()`; the fused float state_dict is saved (`<arch>.fused.<key>`), so the Rust
    test loads exactly PyTorch's fused weights (the fusion arithmetic itself is checked
    elsewhere);
  * for each qconfig (MinMax per-channel with reduce_range, as the digits fixtures; and
    `get_default_qconfig("fbgemm")`): prepare, calibrate on the saved batches, record every
    activation observer's (min, max) (MinMax only), convert, then record every quantized
    module's output scale / zero point and, on the test input, every quantized module's
    int8 output (`int_repr`, logical NCHW) and the final int8 logits.

    /work/venv/bin/python tools/gen_torchvision_int8_fixtures.py
"""
import json
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torch.ao.quantization import (
    MinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    convert,
    get_default_qconfig,
    prepare,
)
from torchvision.models.quantization.resnet import QuantizableBasicBlock, QuantizableResNet
from torchvision.models.quantization.mobilenetv2 import QuantizableMobileNetV2

assert torch.__version__.startswith("2.15.0"), torch.__version__
torch.set_num_threads(1)
torch.backends.quantized.engine = "fbgemm"
ROOT = os.path.join(os.path.dirname(__file__), "..")

CONFIGS = {
    "minmax": QConfig(
        activation=MinMaxObserver.with_args(reduce_range=True),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    ),
    "fbgemm": get_default_qconfig("fbgemm"),
}


def resnet18(widths=(4, 8, 16, 32), classes=10):
    """torchvision's QuantizableResNet(QuantizableBasicBlock, [2, 2, 2, 2]) with the stem and
    the four stages rebuilt by torchvision's own `_make_layer` at reduced widths."""
    m = QuantizableResNet(QuantizableBasicBlock, [2, 2, 2, 2], num_classes=classes)
    m.inplanes = widths[0]
    m.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
    m.bn1 = nn.BatchNorm2d(widths[0])
    m.layer1 = m._make_layer(QuantizableBasicBlock, widths[0], 2)
    m.layer2 = m._make_layer(QuantizableBasicBlock, widths[1], 2, stride=2)
    m.layer3 = m._make_layer(QuantizableBasicBlock, widths[2], 2, stride=2)
    m.layer4 = m._make_layer(QuantizableBasicBlock, widths[3], 2, stride=2)
    m.fc = nn.Linear(widths[3], classes)
    return m


def mobilenet_v2(classes=10):
    """torchvision's QuantizableMobileNetV2 at width 0.25 (ReLU6 replaced by ReLU as
    torchvision's `mobilenet_v2(quantize=...)` does)."""
    from torchvision.models.quantization.mobilenetv2 import QuantizableInvertedResidual
    from torchvision.models.quantization.utils import _replace_relu

    m = QuantizableMobileNetV2(num_classes=classes, width_mult=0.25, block=QuantizableInvertedResidual)
    _replace_relu(m)
    return m


ARCHS = {
    "resnet18": (resnet18, (3, 32, 32)),
    "mobilenet_v2": (mobilenet_v2, (3, 32, 32)),
}


def randomize_bn(model, g):
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            c = mod.num_features
            mod.weight.data = 0.5 + torch.rand(c, generator=g)
            mod.bias.data = 0.2 * torch.randn(c, generator=g)
            mod.running_mean.data = 0.2 * torch.randn(c, generator=g)
            mod.running_var.data = 0.5 + torch.rand(c, generator=g)


def quantized_names(model):
    return [n for n, m in model.named_modules() if hasattr(m, "scale") and hasattr(m, "zero_point")]


def main(only=None):
    for arch, (ctor, in_shape) in ARCHS.items():
        if only and arch not in only:
            continue
        g = torch.Generator().manual_seed(20261129)
        torch.manual_seed(20261129)
        base = ctor()
        randomize_bn(base, g)
        base.eval()
        calib = [torch.randn(4, *in_shape, generator=g) for _ in range(3)]
        test_x = torch.randn(4, *in_shape, generator=g)
        tensors, meta = {}, {}
        fused = None
        for i, b in enumerate(calib):
            tensors[f"calib.{i}"] = b.contiguous()
        tensors["test_x"] = test_x.contiguous()
        with torch.no_grad():
            tensors["float_logits"] = base(test_x).contiguous()
        for cname, qc in CONFIGS.items():
            model = ctor()
            model.load_state_dict(base.state_dict())
            model.eval()
            model.fuse_model()
            if fused is None:
                fused = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
                         if v.dtype == torch.float32}
                for k, v in fused.items():
                    tensors[f"fused.{k}"] = v
            model.qconfig = qc
            prepare(model, inplace=True)
            with torch.no_grad():
                for b in calib:
                    model(b)
            if cname == "minmax":
                for n, m in model.named_modules():
                    obs = getattr(m, "activation_post_process", None)
                    if isinstance(obs, MinMaxObserver):
                        tensors[f"{cname}.range.{n}"] = torch.stack([obs.min_val, obs.max_val]).float()
            convert(model, inplace=True)
            names = quantized_names(model)
            outs = {}
            for n in names:
                mod = model.get_submodule(n)
                tensors[f"{cname}.scale.{n}"] = torch.tensor([float(mod.scale)], dtype=torch.float32)
                tensors[f"{cname}.zero_point.{n}"] = torch.tensor([int(mod.zero_point)], dtype=torch.int32)

                def hook(m, i, o, n=n):
                    outs[n] = o.int_repr().contiguous()

                if not isinstance(mod, torch.ao.nn.quantized.FloatFunctional) and not hasattr(mod, "add"):
                    mod.register_forward_hook(hook)
            # QFunctional adds: wrap their methods to catch outputs.
            for n, mod in model.named_modules():
                if isinstance(mod, torch.ao.nn.quantized.QFunctional):
                    for meth in ("add", "add_relu", "mul", "cat"):
                        f = getattr(mod, meth)

                        def wrapped(*a, f=f, n=n, **k):
                            y = f(*a, **k)
                            outs[n] = y.int_repr().contiguous()
                            return y

                        setattr(mod, meth, wrapped)
            with torch.no_grad():
                logits = model(test_x)
            for n, t in outs.items():
                tensors[f"{cname}.int.{n}"] = t
            tensors[f"{cname}.logits"] = logits.contiguous()
            meta[cname] = json.dumps({"quantized_modules": names})
        meta["generator"] = json.dumps({
            "torch": torch.__version__, "engine": "fbgemm", "arch": arch,
            "input": list(in_shape), "calibration": "3 batches of 4, randn", "seed": 20261129,
        })
        path = os.path.join(ROOT, "tests", "fixtures", f"tv_int8_{arch}.safetensors")
        save_file(tensors, path, metadata=meta)
        print(f"{arch}: {os.path.getsize(path)} bytes, {len(tensors)} tensors -> {path}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:] or None)
