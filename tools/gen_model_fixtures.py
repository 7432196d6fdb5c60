#!/usr/bin/env python3
"""PyTorch eager-mode post-training quantization of the digits CNN (tools/train_digits.py),
engine fbgemm, under three qconfigs, for tests/model_parity.rs.

For each config: fuse (conv+bn+relu x3, fc1+relu4), prepare, calibrate on the first 8
batches of 64 training images (in order), convert; then record every quantized module's
output scale / zero point, its weight's scales, zero points and int8 values, its float
bias (after batch-norm folding), the observed activation ranges (min/max configs), the int8
logits (fc2's quantized output) for the 500 test images, and the top-1 accuracy.

    ~/torchenv/bin/python tools/gen_model_fixtures.py   # torch==2.15.0, scikit-learn, safetensors
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from torch.ao.quantization import (
    MinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    convert,
    fuse_modules,
    get_default_qconfig,
    prepare,
)

sys.path.insert(0, os.path.dirname(__file__))
from train_digits import DigitsCNN, to_input  # noqa: E402

assert torch.__version__.startswith("2.15.0"), torch.__version__
torch.set_num_threads(1)
torch.backends.quantized.engine = "fbgemm"
ROOT = os.path.join(os.path.dirname(__file__), "..")

data = load_file(os.path.join(ROOT, "examples", "data", "digits.safetensors"))
weights = load_file(os.path.join(ROOT, "examples", "data", "digits_cnn.safetensors"))
train_x, test_x, test_y = to_input(data["train_x"].numpy()), to_input(data["test_x"].numpy()), data["test_y"].long()

CONFIGS = {
    "fbgemm": get_default_qconfig("fbgemm"),
    "minmax_per_tensor": QConfig(
        activation=MinMaxObserver.with_args(reduce_range=True),
        weight=MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
    ),
    "minmax_per_channel": QConfig(
        activation=MinMaxObserver.with_args(reduce_range=True),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    ),
}
LAYERS = ["conv1", "conv2", "conv3", "fc1", "fc2"]

tensors, meta = {}, {}
for name, qc in CONFIGS.items():
    model = DigitsCNN()
    model.load_state_dict(weights)
    model.eval()
    model = fuse_modules(model, [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"],
                                 ["conv3", "bn3", "relu3"], ["fc1", "relu4"]])
    model.qconfig = qc
    prepare(model, inplace=True)
    with torch.no_grad():
        for i in range(8):
            model(train_x[i * 64:(i + 1) * 64])
    if name.startswith("minmax"):
        # The ranges PyTorch's activation observers recorded (float forward included).
        for layer in ["quant"] + LAYERS:
            obs = getattr(model, layer).activation_post_process
            tensors[f"{name}.{layer}.act_range"] = torch.stack([obs.min_val, obs.max_val]).float()
    convert(model, inplace=True)
    logits = {}
    model.fc2.register_forward_hook(lambda m, i, o: logits.setdefault("q", o.int_repr()))
    with torch.no_grad():
        out = model(test_x)
    acc = (out.argmax(1) == test_y).float().mean().item()
    tensors[f"{name}.logits"] = logits["q"].contiguous()
    tensors[f"{name}.quant.scale"] = torch.tensor([float(model.quant.scale)], dtype=torch.float32)
    tensors[f"{name}.quant.zero_point"] = torch.tensor([int(model.quant.zero_point)])
    for layer in LAYERS:
        m = getattr(model, layer)
        w = m.weight()
        tensors[f"{name}.{layer}.scale"] = torch.tensor([float(m.scale)], dtype=torch.float32)
        tensors[f"{name}.{layer}.zero_point"] = torch.tensor([int(m.zero_point)])
        tensors[f"{name}.{layer}.wq"] = w.int_repr().contiguous()
        tensors[f"{name}.{layer}.bias"] = m.bias().detach().float().contiguous()
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            tensors[f"{name}.{layer}.w_scale"] = w.q_per_channel_scales().float()
            tensors[f"{name}.{layer}.w_zp"] = w.q_per_channel_zero_points().long()
        else:
            tensors[f"{name}.{layer}.w_scale"] = torch.tensor([w.q_scale()], dtype=torch.float32)
            tensors[f"{name}.{layer}.w_zp"] = torch.tensor([w.q_zero_point()])
    meta[name] = json.dumps({"accuracy": acc, "correct": int(round(acc * len(test_y)))})
    print(f"{name}: int8 accuracy {acc:.4f}", file=sys.stderr)

meta["generator"] = json.dumps({"torch": torch.__version__, "engine": "fbgemm", "calibration": "8 batches of 64"})
save_file(tensors, os.path.join(ROOT, "tests", "fixtures", "digits_quantized.safetensors"), metadata=meta)
