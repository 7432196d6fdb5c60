#!/usr/bin/env python3
"""A digits CNN with a residual block and a concat, trained on the UCI digits upscaled to
32x32, exported to ONNX, quantized by ptq (preset `onnxruntime`) and run in ONNX Runtime in
int8, for tests/onnx_digits.rs.

Data: examples/data/digits.safetensors (the fixed split of tools/train_digits.py), each
8x8 image (pixels 0..16) upscaled 4x by pixel repetition (nearest) and divided by 16.

Writes:
  tests/fixtures/onnx/digits_res_ts13.onnx       the trained float model (TorchScript
                                                 exporter, opset 13, dynamic batch)
  tests/fixtures/onnx/digits_res_ort.safetensors ORT's float and int8 predictions and
                                                 ORT's int8 output values on the 500 test
                                                 images, the output scale / zero point,
                                                 and every activation's [scale, zero point]
                                                 in the QDQ file (`act.<tensor>`, ptq's node
                                                 names) so the Rust test can pin them
Calibration (ptq, as the Rust test does it): the first 128 training images, in batches of 32.

Usage (from the repository root, after `cargo build --release --example quantize_onnx`):
    /work/venv/bin/python tools/gen_digits_onnx.py [--keep-model]
With --keep-model the committed digits_res_ts13.onnx is reused (no training, no export);
only the ORT fixture is rewritten.
"""
import argparse
import collections
import os
import subprocess
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from onnx import numpy_helper
from safetensors.numpy import load_file, save_file

assert torch.__version__.startswith("2.15.0"), torch.__version__
torch.manual_seed(0)
torch.set_num_threads(2)
FIX = os.path.join("tests", "fixtures", "onnx")
EXAMPLE = os.path.join("target", "release", "examples", "quantize_onnx")


def upscale(x_u8):
    """[N, 8, 8] u8 -> [N, 1, 32, 32] f32: each pixel repeated 4x4, divided by 16."""
    x = np.repeat(np.repeat(x_u8, 4, axis=1), 4, axis=2).astype(np.float32) / 16.0
    return x[:, None]


def cbr(cin, cout, k, stride=1, relu=True):
    layers = [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
              nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DigitsRes(nn.Module):
    """stem conv -> maxpool -> residual block (add + relu) -> strided conv -> two branches
    (1x1, 3x3) concatenated -> global average pool -> linear."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(1, 16, 3)
        self.pool = nn.MaxPool2d(2)
        self.res_a = cbr(16, 16, 3)
        self.res_b = cbr(16, 16, 3, relu=False)
        self.relu = nn.ReLU()
        self.down = cbr(16, 32, 3, stride=2)
        self.br1 = cbr(32, 16, 1)
        self.br3 = cbr(32, 16, 3)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(self.stem(x))
        x = self.relu(x + self.res_b(self.res_a(x)))
        x = self.down(x)
        x = torch.cat([self.br1(x), self.br3(x)], dim=1)
        return self.fc(torch.flatten(self.gap(x), 1))


def train_and_export(xtr, ytr, xte, yte, path):
    model = DigitsRes()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for _ in range(12):
        model.train()
        perm = torch.randperm(len(yt))
        for i in range(0, len(yt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        torch_pred = model(torch.from_numpy(xte)).argmax(1).numpy()
    print(f"torch float top-1: {(torch_pred == yte).mean():.4f}")
    torch.onnx.export(model, torch.from_numpy(xte[:2]), path, opset_version=13, dynamo=False,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep-model", action="store_true",
                    help="reuse the committed ONNX model instead of training a new one")
    a = ap.parse_args()
    d = load_file(os.path.join("examples", "data", "digits.safetensors"))
    xtr, ytr = upscale(d["train_x"]), d["train_y"].astype(np.int64)
    xte, yte = upscale(d["test_x"]), d["test_y"].astype(np.int64)
    path = os.path.join(FIX, "digits_res_ts13.onnx")
    if not a.keep_model:
        train_and_export(xtr, ytr, xte, yte, path)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    y_float = s.run(None, {"x": xte})[0]
    with tempfile.TemporaryDirectory() as td:
        calib = os.path.join(td, "calib.safetensors")
        save_file({"calib": xtr[:128]}, calib)
        qdq = os.path.join(td, "digits.qdq.onnx")
        subprocess.run([EXAMPLE, path, calib, "--key", "calib", "--batch", "32",
                        "--qconfig", "onnxruntime", "--qdq", qdq],
                       check=True, stdout=subprocess.DEVNULL)
        m = onnx.load(qdq)
        inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
        name = m.graph.output[0].name
        base = name[: -len("_dequantized")] if name.endswith("_dequantized") else name
        scale, zp = np.float32(inits[base + "_scale"]), int(inits[base + "_zero_point"])
        act = {}
        for n in m.graph.node:
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
                s_, z_ = inits[n.input[1]], inits[n.input[2]]
                act[f"act.{n.input[0]}"] = np.array([s_, float(z_)], np.float32)
        so.optimized_model_filepath = os.path.join(td, "opt.onnx")
        s = ort.InferenceSession(qdq, so, providers=["CPUExecutionProvider"])
        y_int8 = s.run(None, {s.get_inputs()[0].name: xte})[0]
        ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    print("ORT optimized graph:", dict(sorted(ops.items())))
    q = np.rint(y_int8.astype(np.float64) / np.float64(scale)) + zp
    assert np.array_equal((q - zp).astype(np.float32) * scale, y_int8)
    fp, ip = y_float.argmax(1), y_int8.argmax(1)
    print(f"ORT float top-1: {(fp == yte).mean():.4f}, ORT int8 top-1: {(ip == yte).mean():.4f}, "
          f"float/int8 agreement {(fp == ip).mean():.4f}")
    out = os.path.join(FIX, "digits_res_ort.safetensors")
    save_file({"float_pred": fp.astype(np.float32), "int8_pred": ip.astype(np.float32),
               "int8_q": q.astype(np.float32), "scale": np.array([scale], np.float32),
               "zero_point": np.array([zp], np.float32),
               "int8_ops": np.array([sum(v for k, v in ops.items()
                                         if k.startswith("QLinear") or k == "QGemm")], np.float32),
               "float_ops": np.array([sum(ops.get(k, 0) for k in ("Conv", "Gemm", "MatMul",
                                                                  "FusedConv", "FusedGemm"))],
                                     np.float32), **act},
              out, metadata={"onnxruntime": ort.__version__, "torch": torch.__version__})
    print(f"wrote {path} ({os.path.getsize(path)} bytes), {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
