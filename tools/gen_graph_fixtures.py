#!/usr/bin/env python3
"""PyTorch golden outputs of the float graph ops, for tests/graph_ops.rs.

Runs torch.nn.functional ops on small random inputs (some with NaN) and writes
tests/fixtures/graph_ops.safetensors: for case i, the output `i.y` and a metadata entry
`i` describing the op as space-separated `key=value` pairs
(`op=max_pool2d in=in.3 k=3,3 s=2,2 p=1,1 ...`); `in` lists the input tensors, each
stored once as `in.K`. tests/graph_ops.rs parses the entries, runs the same op through a
one-node ptq graph, and compares.

Usage: /work/venv/bin/python tools/gen_graph_fixtures.py [out_path]
"""
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

torch.manual_seed(0)
tensors = {}
meta = {}


def fmt(v):
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, (tuple, list)):
        return ",".join(fmt(a) for a in v)
    return repr(v) if isinstance(v, float) else str(v)


input_keys = {}
alive = []  # keeps inputs alive so their id() is never reused


def case(op, inputs, y, **params):
    """Records one case; inputs shared between cases are stored once (`in.K`)."""
    i = str(len(meta))
    keys = []
    for x in inputs:
        if id(x) not in input_keys:
            alive.append(x)
            input_keys[id(x)] = f"in.{len(input_keys)}"
            tensors[input_keys[id(x)]] = x.clone().contiguous()
        keys.append(input_keys[id(x)])
    tensors[f"{i}.y"] = y.clone().contiguous()
    meta[i] = " ".join([f"op={op}", "in=" + ",".join(keys)] + [f"{k}={fmt(v)}" for k, v in params.items()])


def rnd(*shape, scale=1.0, nan=0):
    x = torch.randn(*shape) * scale
    flat = x.view(-1)
    for k in range(nan):
        flat[(k * 7919 + 3) % flat.numel()] = float("nan")
    return x


# Elementwise activations, with NaN and large magnitudes.
x = rnd(2, 3, 4, 5, scale=3.0, nan=3)
x.view(-1)[10] = 25.0
x.view(-1)[11] = -25.0
case("relu", [x], F.relu(x))
case("clamp", [x], torch.clamp(x, -0.5, 0.7), min=-0.5, max=0.7)
case("clamp", [x], F.relu6(x), min=0.0, max=6.0)
case("clamp", [x], F.hardtanh(x), min=-1.0, max=1.0)
case("hardswish", [x], F.hardswish(x))
case("hardsigmoid", [x], F.hardsigmoid(x))
case("sigmoid", [x], torch.sigmoid(x))
case("silu", [x], F.silu(x))
case("gelu", [x], F.gelu(x), tanh=False)
case("gelu", [x], F.gelu(x, approximate="tanh"), tanh=True)

# Softmax / layer norm / batch norm.
s = rnd(2, 3, 4, 5, scale=2.0, nan=1)
case("softmax", [s], torch.softmax(s, 1), axis=1)
case("softmax", [s], torch.softmax(s, 3), axis=3)
ln_x = rnd(3, 4, 6, scale=2.0) + 1.0
w, b = torch.randn(6), torch.randn(6)
case("layer_norm", [ln_x, w, b], F.layer_norm(ln_x, (6,), w, b, 1e-5), shape=6, eps=1e-5)
w2, b2 = torch.randn(4, 6), torch.randn(4, 6)
case("layer_norm", [ln_x, w2, b2], F.layer_norm(ln_x, (4, 6), w2, b2, 1e-3), shape=(4, 6), eps=1e-3)
for shape in [(4, 5), (4, 5, 3), (2, 5, 3, 4)]:
    bx = rnd(*shape)
    c = shape[1]
    mean, var = torch.randn(c) * 0.3, torch.rand(c) + 0.5
    gw, gb = torch.rand(c) + 0.5, torch.randn(c) * 0.2
    y = F.batch_norm(bx, mean, var, gw, gb, training=False, eps=1e-3)
    case("batch_norm", [bx, gw, gb, mean, var], y, eps=1e-3)

# Broadcasting binary ops and concat.
a = rnd(2, 3, 4, 5, nan=1)
b1 = rnd(3, 1, 5)
case("add", [a, b1], a + b1)
b2 = rnd(2, 3, 1, 1)
case("mul", [b2, a], b2 * a)
c1, c2 = rnd(2, 2, 4, 5), rnd(2, 3, 4, 5)
case("concat", [c1, c2, c1], torch.cat([c1, c2, c1], 1), axis=1)

# Pools: padding, dilation, ceil_mode, count_include_pad, divisor_override, NaN.
for hw in [(7, 7), (8, 9), (5, 6)]:
    px = rnd(2, 3, *hw, nan=1 if hw == (8, 9) else 0)
    for k, st, p, d, ceil in [(3, 2, 1, 1, True), (3, 2, 1, 1, False), (2, 2, 0, 1, True), (3, 3, 1, 2, True), (2, 1, 1, 1, False)]:
        y = F.max_pool2d(px, k, st, p, d, ceil_mode=ceil)
        case("max_pool2d", [px], y, k=(k, k), s=(st, st), p=(p, p), d=(d, d), ceil=ceil)
    for k, st, p, ceil, cip, div in [
        (3, 2, 1, True, True, None),
        (3, 2, 1, True, False, None),
        (2, 2, 0, True, True, None),
        (3, 2, 1, False, False, None),
        (2, 2, 1, True, True, 3),
        (3, 1, 1, False, False, None),
    ]:
        y = F.avg_pool2d(px, k, st, p, ceil_mode=ceil, count_include_pad=cip, divisor_override=div)
        case("avg_pool2d", [px], y, k=(k, k), s=(st, st), p=(p, p), ceil=ceil, cip=cip, div=div or 0)
px = rnd(1, 2, 7, 5)
for o in [(3, 3), (2, 4), (1, 1), (7, 5), (4, 2)]:
    case("adaptive_avg_pool2d", [px], F.adaptive_avg_pool2d(px, o), out=o)
case("mean", [px], px.mean([2, 3]), dims=(2, 3), keepdim=False)
case("mean", [px], px.mean([1, 3], keepdim=True), dims=(1, 3), keepdim=True)

# Upsampling.
ux = rnd(1, 2, 4, 5)
for kw in [
    dict(scale_factor=2.0, mode="nearest"),
    dict(scale_factor=1.5, mode="nearest"),
    dict(size=(7, 9), mode="nearest"),
    dict(size=(3, 11), mode="nearest-exact"),
    dict(scale_factor=2.0, mode="bilinear", align_corners=False),
    dict(scale_factor=2.0, mode="bilinear", align_corners=True),
    dict(size=(7, 3), mode="bilinear", align_corners=False),
    dict(size=(9, 8), mode="bilinear", align_corners=True),
]:
    y = F.interpolate(ux, **kw)
    params = {"mode": kw["mode"], "align": kw.get("align_corners", False)}
    if "size" in kw:
        params["size"] = kw["size"]
    else:
        params["scale"] = (kw["scale_factor"], kw["scale_factor"])
    case("upsample", [ux], y, **params)

# Convolution with asymmetric padding (ONNX pads; PyTorch via F.pad), linear.
cx = rnd(2, 3, 6, 7)
cw = rnd(4, 3, 3, 2) * 0.3
cb = rnd(4)
y = F.conv2d(F.pad(cx, (1, 0, 0, 2)), cw, cb, stride=(1, 2))
case("conv2d", [cx, cw, cb], y, pad=(0, 1, 2, 0), stride=(1, 2), groups=1, dilation=(1, 1))
dw = rnd(3, 1, 3, 3) * 0.3
y = F.conv2d(F.pad(cx, (2, 1, 1, 2)), dw, None, stride=(2, 2), groups=3, dilation=(1, 2))
case("conv2d", [cx, dw], y, pad=(1, 2, 2, 1), stride=(2, 2), groups=3, dilation=(1, 2))
lx = rnd(3, 2, 8, nan=1)
lw, lb = rnd(5, 8) * 0.3, rnd(5)
case("linear", [lx, lw, lb], F.linear(lx, lw, lb))

# Shape ops.
sx = rnd(2, 6, 2, 3)
case("flatten", [sx], torch.flatten(sx, 1, 2), start=1, end=2)
case("reshape", [sx], sx.reshape(2, 2, 3, 6), shape=(0, 2, 3, -1))
case("permute", [sx], sx.permute(0, 2, 3, 1), dims=(0, 2, 3, 1))
case("slice", [sx], sx.narrow(1, 2, 3), axis=1, start=2, end=5)
a, b = sx.chunk(2, dim=1)
case("slice", [sx], b, axis=1, start=3, end=6)

out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "graph_ops.safetensors")
save_file(tensors, out, metadata=meta)
print(f"{len(meta)} cases, {os.path.getsize(out)} bytes -> {out}")
