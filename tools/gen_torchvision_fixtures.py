#!/usr/bin/env python3
"""Float fixtures of torchvision's quantizable classification models at reduced width.

Builds torchvision.models.quantization ResNet-18, MobileNetV2, MobileNetV3-Large and
ShuffleNetV2 with torchvision's own classes and builders (QuantStub/DeQuantStub,
FloatFunctional add/add_relu/mul/cat, downsample branches, `fuse_model` available), with
REDUCED width and a small input so the fixtures stay small (see WIDTHS below), random
weights (batch-norm statistics randomized too) rounded to float16 so they can be stored as
F16 exactly, and writes for each model tests/fixtures/tv_<name>.safetensors holding:

* the state_dict (float16 values, `num_batches_tracked` dropped),
* `__input__`: a float32 input batch [2, 3, 48, 48],
* `__output__`: the eval-mode float32 output of the model on it.

The Rust side (`ptq::graph::zoo`) builds the same graphs; tests/graph_torchvision.rs checks
the float outputs. Other scripts may `import gen_torchvision_fixtures` and call `build(name)`
to get the same torch model and input (for int8 parity).

Usage: /work/venv/bin/python tools/gen_torchvision_fixtures.py [out_dir]
"""
import os
import sys

import torch
import torch.nn as nn
from safetensors.torch import save_file
from torchvision.models import resnet as tv_resnet
from torchvision.models import quantization as tvq
from torchvision.models.quantization.resnet import QuantizableBasicBlock, QuantizableResNet
from torchvision.models.quantization.shufflenetv2 import QuantizableShuffleNetV2
from torchvision.models.quantization.utils import _replace_relu

INPUT_SHAPE = (2, 3, 48, 48)
NUM_CLASSES = 10
# Reduced widths (torchvision's full sizes in comments).
RESNET_WIDTH = 4  # planes 4, 8, 16, 32 (full: 64, 128, 256, 512)
MBV2_WIDTH = 0.1  # width_mult (full: 1.0; last_channel stays 1280 as torchvision does)
MBV3_WIDTH = 0.25  # width_mult, reduced_tail=True (full: 1.0, False)
SHUFFLE_REPEATS = [4, 8, 4]  # as torchvision's x0.5 .. x2.0
SHUFFLE_CHANNELS = [8, 16, 32, 64, 128]  # (x0.5: 24, 48, 96, 192, 1024)


def resnet18(width):
    """QuantizableResNet(QuantizableBasicBlock, [2, 2, 2, 2]) as torchvision's
    quantization.resnet18 builds it, with planes scaled from 64 to `width`."""
    orig = tv_resnet.ResNet._make_layer

    def make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:
            self.inplanes = width
        return orig(self, block, planes * width // 64, blocks, stride, dilate)

    tv_resnet.ResNet._make_layer = make_layer
    try:
        m = QuantizableResNet(QuantizableBasicBlock, [2, 2, 2, 2], num_classes=NUM_CLASSES)
    finally:
        tv_resnet.ResNet._make_layer = orig
    # The stem and head were built for width 64; give them the reduced width.
    m.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    m.bn1 = nn.BatchNorm2d(width)
    m.fc = nn.Linear(8 * width, NUM_CLASSES)
    _replace_relu(m)  # as torchvision's _resnet does
    return m


def build(name):
    """The torch model (eval mode, randomized float16-exact weights) and its input."""
    torch.manual_seed({"resnet18": 1, "mobilenet_v2": 2, "mobilenet_v3_large": 3, "shufflenet_v2": 4}[name])
    if name == "resnet18":
        m = resnet18(RESNET_WIDTH)
    elif name == "mobilenet_v2":
        m = tvq.mobilenet_v2(weights=None, quantize=False, width_mult=MBV2_WIDTH, num_classes=NUM_CLASSES)
    elif name == "mobilenet_v3_large":
        m = tvq.mobilenet_v3_large(
            weights=None, quantize=False, width_mult=MBV3_WIDTH, reduced_tail=True, num_classes=NUM_CLASSES
        )
    elif name == "shufflenet_v2":
        m = QuantizableShuffleNetV2(SHUFFLE_REPEATS, SHUFFLE_CHANNELS, num_classes=NUM_CLASSES)
        _replace_relu(m)  # as torchvision's _shufflenetv2 does
    else:
        raise ValueError(name)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.2)
                mod.running_mean.normal_(0.0, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
            elif isinstance(mod, nn.Linear):
                bound = 1.0 / mod.in_features**0.5
                mod.weight.uniform_(-bound, bound)
                mod.bias.uniform_(-bound, bound)
            elif isinstance(mod, nn.Conv2d) and mod.bias is not None:
                mod.bias.normal_(0.0, 0.2)
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    m.eval()
    x = torch.randn(*INPUT_SHAPE)
    return m, x


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
    total = 0
    for name in ["resnet18", "mobilenet_v2", "mobilenet_v3_large", "shufflenet_v2"]:
        m, x = build(name)
        with torch.no_grad():
            y = m(x)
        sd = {
            k: v.detach().half().contiguous()
            for k, v in m.state_dict().items()
            if not k.endswith("num_batches_tracked")
        }
        sd["__input__"] = x.contiguous()
        sd["__output__"] = y.contiguous()
        path = os.path.join(out_dir, f"tv_{name}.safetensors")
        save_file(sd, path)
        size = os.path.getsize(path)
        total += size
        params = sum(p.numel() for p in m.parameters())
        print(f"{name}: {params} parameters, output {tuple(y.shape)}, {size} bytes -> {path}")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
