#!/usr/bin/env python3
"""ONNX fixtures for tests/onnx_*.rs.

Exports small torchvision models (reduced width and a 32x32 input so the files stay small)
and one concat model to ONNX with the TorchScript exporter (opsets 13 and 17) and the dynamo
exporter (opset 18), records PyTorch's and ONNX Runtime's float outputs for a fixed batch,
and runs onnxruntime.quantization.quantize_static (MinMax, QDQ, QUInt8 activations, QInt8
per-channel weights) on a fixed calibration set, logging every call of ORT's
compute_scale_zp (its inputs and outputs) and every scale / zero point of the quantized model.

Usage (from the repository root):
    /work/venv/bin/python tools/gen_onnx_fixtures.py [--out tests/fixtures/onnx]

Everything is written as safetensors (f32) or .onnx; nothing needs Python at test time.
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torchvision
from safetensors.numpy import save_file
from torchvision.models.resnet import BasicBlock, ResNet

torch.manual_seed(0)


class TinyResNet18(ResNet):
    """torchvision's ResNet-18 (BasicBlock, [2, 2, 2, 2], same module names) at widths
    w, 2w, 4w, 8w instead of 64..512."""

    def __init__(self, w=4, num_classes=10):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        self.inplanes = w
        self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.layer1 = self._make_layer(BasicBlock, w, 2)
        self.layer2 = self._make_layer(BasicBlock, 2 * w, 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * w, 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, 8 * w, 2, stride=2)
        self.fc = nn.Linear(8 * w, num_classes)


def mobilenet_v2():
    # torchvision's block table with fewer repeats (1-2-2-2-1-1-1 instead of 1-2-3-4-3-3-1)
    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 2], [6, 64, 2, 2], [6, 96, 1, 1],
               [6, 160, 1, 2], [6, 320, 1, 1]]
    m = torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=10,
                                        inverted_residual_setting=setting)
    # the 80 -> 1280 head conv dominates the file size: 80 -> 64 instead
    inp = m.features[-1][0].in_channels
    m.features[-1] = torchvision.ops.Conv2dNormActivation(
        inp, 64, kernel_size=1, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6
    )
    m.classifier[1] = nn.Linear(64, 10)
    return m


def mobilenet_v3_small():
    from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf

    setting, last = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=0.25, reduced_tail=True)
    return MobileNetV3(setting, last, num_classes=10)


class ConcatNet(nn.Module):
    """Two branches concatenated, nearest upsampling, average pooling, a clamp, a sigmoid
    gate, a flatten written as x.view(x.size(0), -1) (Shape/Gather/Unsqueeze/Concat/Reshape
    in the TorchScript export), a matmul with a constant weight, dropout and a softmax."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.left = nn.Conv2d(6, 4, 1)
        self.right = nn.Conv2d(6, 4, 3, padding=1, groups=2)
        self.down = nn.MaxPool2d(2, 2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.pool = nn.AvgPool2d(2, 2)
        self.gate = nn.Conv2d(8, 8, 1)
        self.drop = nn.Dropout(0.1)
        self.proj = nn.Parameter(torch.randn(8 * 8 * 8, 12) * 0.05)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        a = self.left(x)
        b = self.up(self.down(self.right(x)))
        y = torch.cat([a, b], dim=1)
        y = torch.clamp(y, -1.0, 3.0)
        y = y * torch.sigmoid(self.gate(y))
        y = self.pool(y)
        y = y.view(y.size(0), -1)
        y = self.drop(y @ self.proj)
        return torch.softmax(self.fc(y), dim=1)


MODELS = {
    "resnet18": lambda: TinyResNet18(4),
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3_small,
    "concat": ConcatNet,
}
# (variant name, exporter, opset). The TorchScript exports of resnet18 and mobilenet_v2 at
# opset 17 differ from opset 13 only in the opset number (same ops, same size), so only the
# models whose op set changes (HardSwish from opset 14; Resize, Clip) keep an opset-17 file.
VARIANTS = [("ts13", False, 13), ("ts17", False, 17), ("dynamo18", True, 18)]
SKIP = {("resnet18", "ts17"), ("mobilenet_v2", "ts17")}


def randomize_bn(m):
    g = torch.Generator().manual_seed(1)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            n = mod.num_features
            mod.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            mod.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            mod.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def export(m, x, path, dynamo, opset):
    if dynamo:
        torch.onnx.export(
            m, (x,), path, dynamo=True, opset_version=opset, input_names=["x"], output_names=["y"],
            dynamic_shapes={"x": {0: torch.export.Dim("N", min=1, max=1024)}}, verbose=False,
        )
        # the dynamo exporter may write weights next to the model: fold them back in
        mo = onnx.load(path)
        onnx.save(mo, path)
        d = path + ".data"
        if os.path.exists(d):
            os.remove(d)
    else:
        torch.onnx.export(
            m, (x,), path, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
        )


def ort_run(path, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


class Reader:
    def __init__(self, batches):
        self.batches = list(batches)
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {"x": self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def quantize_static_record(model_path, calib, out_dir, name):
    """Runs quantize_static (MinMax, QDQ, per-channel) logging compute_scale_zp calls."""
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization import qdq_quantizer, quant_utils

    calls = []
    orig = quant_utils.compute_scale_zp

    def logged(rmin, rmax, qmin, qmax, symmetric=False, min_real_range=None):
        zp, scale = orig(rmin, rmax, qmin, qmax, symmetric, min_real_range)
        # scalars or 1-element arrays: one row per element
        for a, b, s_, z in zip(np.asarray(rmin).reshape(-1), np.asarray(rmax).reshape(-1),
                               np.asarray(scale).reshape(-1), np.asarray(zp).reshape(-1)):
            calls.append((np.float32(a), np.float32(b), int(qmin), int(qmax), bool(symmetric),
                          np.float32(s_), int(z), np.asarray(rmin).dtype.name))
        return zp, scale

    ranges = {}
    orig_calc = qdq_quantizer.QDQQuantizer.calc_graph_quant_params

    def calc(self):
        out = orig_calc(self)
        # the ranges after ORT's adjust_tensor_ranges (Relu/Clip inputs, Softmax outputs)
        for k, td in (self.tensors_range or {}).items():
            lo, hi = td.range_value
            ranges[k] = np.array([np.float32(lo), np.float32(hi)], dtype=np.float32).reshape(-1)
        return out

    qdq_quantizer.compute_scale_zp = logged
    quant_utils.compute_scale_zp = logged
    qdq_quantizer.QDQQuantizer.calc_graph_quant_params = calc
    try:
        with tempfile.TemporaryDirectory() as td:
            qpath = os.path.join(td, "q.onnx")
            quantize_static(
                model_path, qpath, Reader(calib), quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                calibrate_method=CalibrationMethod.MinMax,
            )
            qm = onnx.load(qpath)
    finally:
        qdq_quantizer.compute_scale_zp = orig
        quant_utils.compute_scale_zp = orig
        qdq_quantizer.QDQQuantizer.calc_graph_quant_params = orig_calc
    t = {"range/" + k: v for k, v in ranges.items()}
    arr = np.array([[c[0], c[1], c[2], c[3], float(c[4]), c[5], c[6]] for c in calls],
                   dtype=np.float64)
    # the float32 columns are exact in f32; scale is f32, rmin/rmax f32, the rest integers
    t["calls/rmin"] = arr[:, 0].astype(np.float32)
    t["calls/rmax"] = arr[:, 1].astype(np.float32)
    t["calls/qmin"] = arr[:, 2].astype(np.float32)
    t["calls/qmax"] = arr[:, 3].astype(np.float32)
    t["calls/symmetric"] = arr[:, 4].astype(np.float32)
    t["calls/scale"] = np.array([c[5] for c in calls], dtype=np.float32)
    t["calls/zero_point"] = arr[:, 6].astype(np.float32)
    assert all(c[7] == "float32" for c in calls), {c[7] for c in calls}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in qm.graph.initializer}
    for k, v in inits.items():
        if k.endswith("_scale"):
            base = k[: -len("_scale")]
            zp = inits.get(base + "_zero_point")
            if zp is None:
                continue
            t["scale/" + base] = np.asarray(v, dtype=np.float32).reshape(-1)
            t["zero_point/" + base] = np.asarray(zp).astype(np.float32).reshape(-1)
    save_file(t, os.path.join(out_dir, f"{name}_ort_qparams.safetensors"))
    return len(calls), sum(1 for k in t if k.startswith("scale/"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/onnx")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    print(f"torch {torch.__version__} torchvision {torchvision.__version__} onnx {onnx.__version__} "
          f"onnxruntime {ort.__version__}")
    g = torch.Generator().manual_seed(42)
    x = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).contiguous()
    calib = [(torch.rand(2, 3, 32, 32, generator=g) * 2.5 - 1.2).numpy() for _ in range(4)]
    xn = x.numpy()
    save_file({"x": xn, "calib": np.concatenate(calib)}, os.path.join(args.out, "inputs.safetensors"))
    for name, make in MODELS.items():
        torch.manual_seed(0)
        m = make().eval()
        randomize_bn(m)
        with torch.no_grad():
            ref = m(x).numpy()
        out = {"torch": ref}
        for vname, dynamo, opset in VARIANTS:
            if (name, vname) in SKIP:
                continue
            path = os.path.join(args.out, f"{name}_{vname}.onnx")
            try:
                export(m, x, path, dynamo, opset)
            except Exception as e:  # report and go on: the note says which failed and why
                print(f"{name} {vname}: export failed: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            y = ort_run(path, xn)
            out["ort_" + vname] = y
            ops = sorted({n.op_type for n in onnx.load(path).graph.node})
            err = float(np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-30))
            print(f"{name} {vname}: {os.path.getsize(path)} bytes, ops {ops}, "
                  f"ORT vs torch max rel {err:.2e}")
        save_file(out, os.path.join(args.out, f"{name}_outputs.safetensors"))
        ncalls, nq = quantize_static_record(os.path.join(args.out, f"{name}_ts13.onnx"), calib,
                                            args.out, name)
        print(f"{name}: quantize_static: {ncalls} compute_scale_zp calls, {nq} quantized tensors")
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"total fixture size {total} bytes")


if __name__ == "__main__":
    main()
