#!/usr/bin/env python3
"""ptq beside PyTorch (fbgemm) and ONNX Runtime (MLAS), one thread, int8 and f32.

    /work/venv/bin/python tools/bench_peers.py [--quick] [--only REGEX] [--rounds N] [--profile]

Every case is one model description (the layer list below). From it the script builds
  - a PyTorch eager model: float, and int8 by prepare -> calibrate -> convert with
    `torch.backends.quantized.engine = "fbgemm"`, quint8 min/max activations with
    reduce_range and per-channel symmetric qint8 weights (fbgemm's ranges, min/max
    observers so calibration is quick);
  - a float ONNX model (written with onnx.helper from the same weights), and its QDQ int8
    version made by onnxruntime.quantization.quantize_static (min/max calibration,
    per-channel weights, QUInt8 activations / QInt8 weights, ORT's defaults otherwise);
  - the same model in ptq, through `examples/bench_peers.rs` (QConfig::minmax_per_channel:
    the PyTorch ranges above).
Full-size torchvision models (ResNet-18 and MobileNetV2 at 224x224, "tv" cases) come from
torchvision.models.quantization with random weights (torchvision's init, random batch-norm
statistics): PyTorch fuses (`fuse_model`), prepares, calibrates and converts them; ORT
quantizes the float model's ONNX export (torch.onnx.export, opset 17); ptq builds the same
graph with ptq::graph::zoo, loads the float state_dict by name from a safetensors file in a
temp dir, fuses what find_fusable proposes, and quantizes through the graph flow. These
cases time int8 only (ptq's f32 path would take minutes) with fewer rounds.
All three see the same weights, the same calibration batches and the same input. Before
timing, the script checks that they compute the same thing: the float outputs agree within
F32_TOL (relative to the largest float output), the int8 outputs agree with each other
within INT8_TOL of the float output's range, and each int8 output stays near the float one.

Timing: torch.set_num_threads(1) and set_num_interop_threads(1); ORT with 1 intra-op and
1 inter-op thread, sequential execution, all graph optimizations; ptq in a 1-thread rayon
pool (RAYON_NUM_THREADS=1 too). ptq's int8 model is a QuantizedGraph (`prepare` ->
`calibrate` -> `convert` on the graph the layer list lowers to); PTQ_BENCH_INT8=sequential
times the Sequential QuantizedModel instead. With --profile, ptq's per-node times
(QuantizedGraph::profile, median of 20 runs) follow the table for every case. Each round runs a block of calls per engine, the engines in
a rotating order; a round's figure per engine is the median call in its block, and the
ratio ptq / faster peer is taken round by round. The table gives the median over rounds and,
for the ratio, the 25th-75th percentiles. Times include quantizing the float input and
dequantizing the output in every engine (all take and return f32). PyTorch's int8 model gets
its input channels-last (fbgemm's layout; NCHW would cost it a transpose per conv call), its
float model NCHW. GMAC/s counts the convs' and linears' multiply-accumulates only.

Environment passes through: `PTQ_NO_AVX512=1` makes ptq use its AVX2 kernels (fbgemm and
MLAS keep their own choice). Needs: torch 2.15, onnx, onnxruntime, numpy, safetensors,
cargo; a C compiler for the peak figures (tools/peak.c), optional.
"""

import argparse
import datetime
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# torch 2.15 marks eager-mode quantization deprecated; it is still the reference here.
warnings.filterwarnings("ignore", category=DeprecationWarning)
logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice to pre-process
warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnxruntime.quantization import (  # noqa: E402
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from safetensors.numpy import load_file, save_file  # noqa: E402

F32_TOL = 1e-4  # max |a - b| / max |float output|, float engines pairwise
INT8_TOL = 0.05  # max |a - b| / (range of the float output), int8 engines pairwise
INT8_VS_F32_TOL = 0.1  # ||int8 - float||_2 / ||float||_2, each engine

# ---------------------------------------------------------------------------------------
# Model descriptions. A layer is a tuple:
#   ("conv", name, cin, cout, k, stride, pad, groups, relu)
#   ("linear", name, in, out, relu)   ("relu",)   ("maxpool", k, s)   ("avgpool", h, w)
#   ("flatten",)   ("res", name, [layers])  -> x + body(x)   ("quant",)   ("dequant",)
# ---------------------------------------------------------------------------------------


def conv(name, cin, cout, k, stride=1, groups=1, relu=True, pad=None):
    return ("conv", name, cin, cout, k, stride, k // 2 if pad is None else pad, groups, relu)


def wrap(layers):
    return [("quant",)] + layers + [("dequant",)]


def resnet():
    """3 stages of 2 basic blocks (16, 32, 64 channels) with identity skips; stride-2 convs
    between stages; 32x32x3 input, 10 classes."""
    layers = [conv("stem", 3, 16, 3)]
    c_prev = 16
    for s, c in enumerate([16, 32, 64]):
        if c != c_prev:
            layers.append(conv(f"down{s}", c_prev, c, 3, stride=2))
        for b in range(2):
            n = f"s{s}b{b}"
            body = [conv(n + ".conv1", c, c, 3), conv(n + ".conv2", c, c, 3, relu=False)]
            layers += [("res", n, body), ("relu",)]
        c_prev = c
    layers += [("avgpool", 1, 1), ("flatten",), ("linear", "fc", 64, 10, False)]
    return wrap(layers)


def mobilenet():
    """MobileNetV2-style: stem 3->16 stride 2, inverted residuals (1x1 expand x4 + ReLU,
    3x3 depthwise + ReLU, 1x1 project), identity skip where shapes match; 64x64x3 input.
    ReLU stands for ReLU6."""
    layers = [conv("stem", 3, 16, 3, stride=2)]
    cfg = [(16, 16, 1), (16, 24, 2), (24, 24, 1), (24, 32, 2), (32, 32, 1), (32, 32, 1)]
    for i, (cin, cout, s) in enumerate(cfg):
        e = cin * 4
        n = f"ir{i}"
        body = [
            conv(n + ".expand", cin, e, 1),
            conv(n + ".dw", e, e, 3, stride=s, groups=e),
            conv(n + ".project", e, cout, 1, relu=False),
        ]
        if s == 1 and cin == cout:
            layers.append(("res", n, body))
        else:
            layers += body
    layers += [conv("head", 32, 128, 1), ("avgpool", 1, 1), ("flatten",),
               ("linear", "fc", 128, 10, False)]
    return wrap(layers)


def digits_layers():
    return wrap([
        conv("conv1", 1, 16, 3), conv("conv2", 16, 32, 3), ("maxpool", 2, 2),
        conv("conv3", 32, 32, 3), ("avgpool", 2, 2), ("flatten",),
        ("linear", "fc1", 128, 64, True), ("linear", "fc2", 64, 10, False),
    ])


def cases():
    lin = lambda: wrap([("linear", "fc", 1024, 1024, False)])  # noqa: E731
    c = []
    for b in (1, 4, 64):
        c.append((f"Linear 1024x1024, batch {b}", lin(), (b, 1024)))
    for b in (1, 8):
        c.append((f"Conv 3x3 64->64 28x28, batch {b}", wrap([conv("conv", 64, 64, 3, relu=False)]),
                  (b, 64, 28, 28)))
    c.append(("Conv 1x1 128->128 28x28, batch 8", wrap([conv("conv", 128, 128, 1, relu=False)]),
              (8, 128, 28, 28)))
    c.append(("Depthwise 3x3 128ch 28x28, batch 8",
              wrap([conv("conv", 128, 128, 3, groups=128, relu=False)]), (8, 128, 28, 28)))
    c.append(("Stem conv 3->32 3x3 s2 112x112, batch 1",
              wrap([conv("conv", 3, 32, 3, stride=2, relu=False)]), (1, 3, 112, 112)))
    c.append(("digits CNN, batch 500", digits_layers(), (500, 1, 8, 8)))
    for b in (1, 16):
        c.append((f"ResNet (3 stages, 32x32), batch {b}", resnet(), (b, 3, 32, 32)))
    for b in (1, 16):
        c.append((f"MobileNetV2-style (64x64), batch {b}", mobilenet(), (b, 3, 64, 64)))
    for arch, label in (("resnet18", "ResNet-18"), ("mobilenet_v2", "MobileNetV2")):
        for b in (1, 16):
            c.append((f"{label} (torchvision, 224x224), batch {b}", [("tv", arch)],
                      (b, 3, 224, 224)))
    return c


def is_tv(layers):
    return bool(layers) and layers[0][0] == "tv"


# ---------------------------------------------------------------------------------------
# Full-size torchvision models
# ---------------------------------------------------------------------------------------


def tv_float(arch, rng):
    """torchvision's quantizable model, float, torchvision's init; batch norms get random
    statistics and affine parameters (so fusion changes the weights), eval mode."""
    import torchvision.models.quantization as tvq

    torch.manual_seed(int(rng.integers(1 << 31)))
    m = getattr(tvq, arch)(weights=None, quantize=False)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.1, c).astype(np.float32)))
                mod.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c).astype(np.float32)))
                mod.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c).astype(np.float32)))
                mod.bias.copy_(torch.from_numpy(rng.normal(0, 0.1, c).astype(np.float32)))
    return m.eval()


def tv_int8(float_model, calib):
    import copy

    torch.backends.quantized.engine = "fbgemm"
    m = copy.deepcopy(float_model).eval()
    m.fuse_model()
    m.qconfig = QConfig(
        activation=MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=True),
        weight=PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )
    torch.ao.quantization.prepare(m, inplace=True)
    with torch.inference_mode():
        for b in calib:
            m(torch.from_numpy(b))
    torch.ao.quantization.convert(m, inplace=True)
    return m


def tv_state_dict(m):
    return {k: np.ascontiguousarray(v.detach().numpy(), dtype=np.float32)
            for k, v in m.state_dict().items() if not k.endswith("num_batches_tracked")}


def tv_onnx(m, path, shape):
    x = torch.zeros((1,) + tuple(shape[1:]))
    torch.onnx.export(m, (x,), path, input_names=["input"], output_names=["output"],
                      opset_version=17, dynamo=False,
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def tv_macs(m, shape):
    """Multiply-accumulates of the convs and linears, counted with forward hooks."""
    total = [0]

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d):
            total[0] += out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] \
                * mod.kernel_size[1]
        else:
            total[0] += out.numel() * mod.in_features

    hs = [mod.register_forward_hook(hook) for mod in m.modules()
          if isinstance(mod, (nn.Conv2d, nn.Linear))]
    with torch.inference_mode():
        m(torch.zeros(shape))
    for h in hs:
        h.remove()
    return total[0]


# ---------------------------------------------------------------------------------------
# Weights, data, shapes
# ---------------------------------------------------------------------------------------


def walk(layers):
    for l in layers:
        yield l
        if l[0] == "res":
            yield from walk(l[2])


def random_weights(layers, rng):
    w = {}
    for l in walk(layers):
        if l[0] == "conv":
            _, n, cin, cout, k, _, _, g, _ = l
            fan = cin // g * k * k
            w[n + ".weight"] = rng.normal(0, np.sqrt(2.0 / fan), (cout, cin // g, k, k))
            w[n + ".bias"] = rng.normal(0, 0.1, cout)
        elif l[0] == "linear":
            _, n, i, o, _ = l
            w[n + ".weight"] = rng.normal(0, np.sqrt(2.0 / i), (o, i))
            w[n + ".bias"] = rng.normal(0, 0.1, o)
    # Residual bodies' last layer smaller, so activations do not grow block after block.
    for l in walk(layers):
        if l[0] == "res":
            last = l[2][-1][1]
            w[last + ".weight"] *= 0.5
    return {k: v.astype(np.float32) for k, v in w.items()}


def digits_weights():
    d = load_file(os.path.join(ROOT, "examples", "data", "digits_cnn.safetensors"))
    w = {}
    for i in (1, 2, 3):
        s = d[f"bn{i}.weight"] / np.sqrt(d[f"bn{i}.running_var"] + 1e-5)
        w[f"conv{i}.weight"] = d[f"conv{i}.weight"] * s[:, None, None, None]
        w[f"conv{i}.bias"] = d[f"bn{i}.bias"] - d[f"bn{i}.running_mean"] * s
    for n in ("fc1", "fc2"):
        w[n + ".weight"], w[n + ".bias"] = d[n + ".weight"], d[n + ".bias"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()}


def digits_data():
    d = load_file(os.path.join(ROOT, "examples", "data", "digits.safetensors"))
    tr = (d["train_x"].astype(np.float32) / 16.0)[:, None]
    te = (d["test_x"].astype(np.float32) / 16.0)[:, None]
    return [tr[i * 64:(i + 1) * 64] for i in range(8)], te, d["test_y"].astype(np.int64)


def next_shape(l, shape):
    """The output shape of layer `l` (a residual block keeps its input's shape)."""
    k = l[0]
    if k == "conv":
        _, _, _, cout, ks, s, p, _, _ = l
        return (shape[0], cout, (shape[2] + 2 * p - ks) // s + 1, (shape[3] + 2 * p - ks) // s + 1)
    if k == "maxpool":
        return (shape[0], shape[1], (shape[2] - l[1]) // l[2] + 1, (shape[3] - l[1]) // l[2] + 1)
    if k == "avgpool":
        return (shape[0], shape[1], l[1], l[2])
    if k == "flatten":
        return (shape[0], int(np.prod(shape[1:])))
    if k == "linear":
        return (shape[0], l[3])
    return shape


def macs(layers, shape):
    """Multiply-accumulates of convs and linears for an input of `shape`."""
    total = 0
    for l in layers:
        out = next_shape(l, shape)
        if l[0] == "conv":
            total += int(np.prod(out)) * (l[2] // l[7]) * l[4] * l[4]
        elif l[0] == "linear":
            total += shape[0] * l[2] * l[3]
        elif l[0] == "res":
            total += macs(l[2], shape)
        shape = out
    return total


# ---------------------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------------------

import torch.ao.nn.intrinsic as nni  # noqa: E402
import torch.ao.nn.quantized as nnq  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao.quantization import (  # noqa: E402
    DeQuantStub,
    MinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    QuantStub,
)


class Residual(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body
        self.add = nnq.FloatFunctional()

    def forward(self, x):
        return self.add.add(x, self.body(x))


def torch_model(layers, w):
    mods = []
    for l in layers:
        kind = l[0]
        if kind == "quant":
            mods.append(QuantStub())
        elif kind == "dequant":
            mods.append(DeQuantStub())
        elif kind == "conv":
            _, n, cin, cout, k, s, p, g, relu = l
            c = nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g)
            c.weight.data = torch.from_numpy(w[n + ".weight"].copy())
            c.bias.data = torch.from_numpy(w[n + ".bias"].copy())
            mods.append(nni.ConvReLU2d(c, nn.ReLU()) if relu else c)
        elif kind == "linear":
            _, n, i, o, relu = l
            f = nn.Linear(i, o)
            f.weight.data = torch.from_numpy(w[n + ".weight"].copy())
            f.bias.data = torch.from_numpy(w[n + ".bias"].copy())
            mods.append(nni.LinearReLU(f, nn.ReLU()) if relu else f)
        elif kind == "relu":
            mods.append(nn.ReLU())
        elif kind == "maxpool":
            mods.append(nn.MaxPool2d(l[1], l[2]))
        elif kind == "avgpool":
            mods.append(nn.AdaptiveAvgPool2d((l[1], l[2])))
        elif kind == "flatten":
            mods.append(nn.Flatten(1))
        elif kind == "res":
            mods.append(Residual(torch_model(l[2], w)))
        else:
            raise ValueError(kind)
    return nn.Sequential(*mods).eval()


def torch_int8(float_model, calib):
    import copy

    torch.backends.quantized.engine = "fbgemm"
    m = copy.deepcopy(float_model).eval()
    m.qconfig = QConfig(
        activation=MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=True),
        weight=PerChannelMinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )
    torch.ao.quantization.prepare(m, inplace=True)
    with torch.inference_mode():
        for b in calib:
            m(torch.from_numpy(b))
    torch.ao.quantization.convert(m, inplace=True)
    return m


# ---------------------------------------------------------------------------------------
# ONNX / ONNX Runtime
# ---------------------------------------------------------------------------------------


def onnx_model(layers, w, in_shape):
    nodes, inits = [], []
    counter = [0]

    def fresh(p):
        counter[0] += 1
        return f"{p}_{counter[0]}"

    def param(n):
        for suffix in (".weight", ".bias"):
            inits.append(numpy_helper.from_array(w[n + suffix], n + suffix))

    def emit(layers, x, shape):
        for l in layers:
            kind = l[0]
            if kind in ("quant", "dequant"):
                continue
            y = fresh(kind)
            if kind == "conv":
                _, n, cin, cout, k, s, p, g, relu = l
                param(n)
                nodes.append(helper.make_node(
                    "Conv", [x, n + ".weight", n + ".bias"], [y], name=n, kernel_shape=[k, k],
                    strides=[s, s], pads=[p, p, p, p], group=g))
            elif kind == "linear":
                n, relu = l[1], l[4]
                param(n)
                nodes.append(helper.make_node(
                    "Gemm", [x, n + ".weight", n + ".bias"], [y], name=n, transB=1))
            elif kind == "relu":
                nodes.append(helper.make_node("Relu", [x], [y], name=y))
            elif kind == "maxpool":
                nodes.append(helper.make_node("MaxPool", [x], [y], name=y,
                                              kernel_shape=[l[1], l[1]], strides=[l[2], l[2]]))
            elif kind == "avgpool" and (l[1], l[2]) == (1, 1):
                nodes.append(helper.make_node("GlobalAveragePool", [x], [y], name=y))
            elif kind == "avgpool":
                # Adaptive pooling of an input that divides evenly: a plain average pool.
                assert shape[2] % l[1] == 0 and shape[3] % l[2] == 0, (shape, l)
                kk = [shape[2] // l[1], shape[3] // l[2]]
                nodes.append(helper.make_node("AveragePool", [x], [y], name=y,
                                              kernel_shape=kk, strides=kk))
            elif kind == "flatten":
                nodes.append(helper.make_node("Flatten", [x], [y], name=y, axis=1))
            elif kind == "res":
                b, _ = emit(l[2], x, shape)
                nodes.append(helper.make_node("Add", [x, b], [y], name=l[1] + ".add"))
            else:
                raise ValueError(kind)
            if kind in ("conv", "linear") and relu:
                r = fresh("relu")
                nodes.append(helper.make_node("Relu", [y], [r], name=l[1] + ".relu"))
                y = r
            shape = next_shape(l, shape)
            x = y
        return x, shape

    y, out_shape = emit(layers, "input", in_shape)
    dyn = ["batch"] + list(in_shape[1:])
    g = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info("input", TensorProto.FLOAT, dyn)],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["batch"] + list(out_shape[1:]))], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 9
    onnx.checker.check_model(m)
    return m


class Reader(CalibrationDataReader):
    def __init__(self, batches):
        self.it = iter([{"input": b} for b in batches])

    def get_next(self):
        return next(self.it, None)


def ort_session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------
# ptq
# ---------------------------------------------------------------------------------------


def ptq_spec(layers, out):
    for l in layers:
        k = l[0]
        if k == "conv":
            _, n, cin, cout, ks, s, p, g, relu = l
            out.append(f"conv {n} {cin} {cout} {ks} {ks} {s} {s} {p} {p} {g} {int(relu)}")
        elif k == "linear":
            out.append(f"linear {l[1]} {l[2]} {l[3]} {int(l[4])}")
        elif k == "maxpool":
            out.append(f"maxpool {l[1]} {l[2]}")
        elif k == "avgpool":
            out.append(f"avgpool {l[1]} {l[2]}")
        elif k == "res":
            out.append(f"res {l[1]}")
            ptq_spec(l[2], out)
            out.append("end")
        else:
            out.append(k)
    return out


class Ptq:
    def __init__(self, exe, tmp, layers, w, calib, x, spec=None):
        self.tmp = tmp
        if spec is None:
            spec = ptq_spec(layers, [])
        with open(os.path.join(tmp, "spec.txt"), "w") as f:
            f.write("\n".join([f"calib {len(calib)}"] + spec) + "\n")
        save_file(w, os.path.join(tmp, "weights.safetensors"))
        data = {f"calib{i}": b for i, b in enumerate(calib)}
        data["input"] = x
        save_file(data, os.path.join(tmp, "data.safetensors"))
        env = dict(os.environ, RAYON_NUM_THREADS="1", PTQ_BENCH_THREADS="1")
        self.p = subprocess.Popen([exe, tmp], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=env, bufsize=1)
        ready = self.p.stdout.readline().split()
        if not ready or ready[0] != "ready":
            self.p.kill()
            raise RuntimeError(f"bench_peers example failed (see its stderr): {ready}")
        self.threads = int(ready[1])

    def output(self, mode, shape):
        y = np.fromfile(os.path.join(self.tmp, f"ptq_{mode}.f32"), dtype="<f4")
        return y.reshape(shape)

    def profile(self, n):
        """Per-node (name, kind, microseconds) of the int8 graph, medians of n runs."""
        self.p.stdin.write(f"profile {n}\n")
        self.p.stdin.flush()
        rows = []
        while True:
            line = self.p.stdout.readline()
            if not line or line.strip() == "end":
                return rows
            name, kind, us = line.split()
            rows.append((name, kind, float(us)))

    def times(self, mode, n):
        self.p.stdin.write(f"{mode} {n}\n")
        self.p.stdin.flush()
        return [float(t) for t in self.p.stdout.readline().split()]

    def close(self):
        try:
            self.p.stdin.write("quit\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass
        self.p.wait(timeout=30)


# ---------------------------------------------------------------------------------------
# Timing and checks
# ---------------------------------------------------------------------------------------


def block(fn, n):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def rel_max(a, b, ref):
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(ref))), 1e-30))


def rel_range(a, b, ref):
    return float(np.max(np.abs(a - b)) / max(float(np.ptp(ref)), 1e-30))


def rel_l2(a, ref):
    return float(np.linalg.norm(a - ref) / max(float(np.linalg.norm(ref)), 1e-30))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peaks(tmp):
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return {}
    exe = os.path.join(tmp, "peak")
    r = subprocess.run([cc, "-O2", "-march=native", os.path.join(ROOT, "tools", "peak.c"),
                        "-o", exe], capture_output=True, text=True)
    if r.returncode != 0:
        return {}
    out = subprocess.run([exe], capture_output=True, text=True).stdout
    return {l.split()[0]: float(l.split()[1]) for l in out.splitlines() if len(l.split()) == 2}


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "unknown"


def fmt_ms(t):
    return f"{t * 1e3:.3f}" if t < 0.01 else f"{t * 1e3:.2f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, shorter blocks (~3 min)")
    ap.add_argument("--only", default=None, help="regex: run the cases whose name matches")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per case (default 15, quick 5)")
    ap.add_argument("--profile", action="store_true",
                    help="print ptq's per-node int8 times (QuantizedGraph::profile) per case")
    ap.add_argument("--ptq-exe", default=None,
                    help="a built examples/bench_peers binary (default: cargo build it)")
    args = ap.parse_args()
    rounds = args.rounds or (5 if args.quick else 15)
    block_s = 0.03 if args.quick else 0.1
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.backends.quantized.engine = "fbgemm"

    if args.ptq_exe:
        exe = os.path.abspath(args.ptq_exe)
    else:
        print("building examples/bench_peers (cargo build --release --example bench_peers) ...",
              file=sys.stderr)
        subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "bench_peers"],
                       cwd=ROOT, check=True)
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
        exe = os.path.join(target, "release", "examples", "bench_peers")

    tmp_root = tempfile.mkdtemp(prefix="ptq-bench-peers-")
    load0 = loadavg()
    pk = peaks(tmp_root)
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    envs = " ".join(f"{k}={os.environ[k]}" for k in ("PTQ_NO_AVX512", "PTQ_FORCE_PORTABLE")
                    if k in os.environ)
    cmd = (envs + " python tools/bench_peers.py " + " ".join(sys.argv[1:])).strip()
    header = [
        f"command: `{cmd.strip()}` (ptq {commit}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; one thread per engine "
        f"(torch.get_num_threads()={torch.get_num_threads()}, ORT intra/inter-op 1/1 sequential, "
        f"ptq rayon pool of THREADS)",
        f"PyTorch {torch.__version__} (engine {torch.backends.quantized.engine}), "
        f"ONNX Runtime {ort.__version__}, numpy {np.__version__}; "
        f"PTQ_NO_AVX512={os.environ.get('PTQ_NO_AVX512', 'unset')}",
    ]
    if not torch.__version__.startswith("2.15."):
        header.append(f"NOTE: the reference is torch 2.15.0; this is {torch.__version__}")
    header.append(f"{rounds} rounds per case ({min(rounds, 3 if args.quick else 5)} for the "
                  f"full-size torchvision ones), engines interleaved; a round = ~{block_s * 1e3:.0f} ms "
                  "of calls per engine, its median call counted")

    results = []
    profiles = []
    digits_acc = None
    ptq_threads = None
    for name, layers, shape in cases():
        if args.only and not re.search(args.only, name):
            continue
        print(f"== {name}", file=sys.stderr)
        # Each case's own seed: the same weights and data whichever cases run.
        rng = np.random.default_rng([20261129, zlib.crc32(name.encode())])
        tv = is_tv(layers)
        if name.startswith("digits"):
            w = digits_weights()
            calib, x, labels = digits_data()
        elif tv:
            w = None
            calib = [rng.standard_normal((2,) + shape[1:]).astype(np.float32) for _ in range(3)]
            x = rng.standard_normal(shape).astype(np.float32)
            labels = None
        else:
            w = random_weights(layers, rng)
            calib = [rng.standard_normal(shape).astype(np.float32) for _ in range(4)]
            if len(shape) == 4:
                calib = [np.abs(c) if shape[1] == 3 else c for c in calib]
            x = rng.standard_normal(shape).astype(np.float32)
            if len(shape) == 4 and shape[1] == 3:
                x = np.abs(x)
            labels = None
        tmp = tempfile.mkdtemp(dir=tmp_root)

        # Build the three engines.
        if tv:
            tf = tv_float(layers[0][1], rng)
            tq = tv_int8(tf, calib)
            case_macs = tv_macs(tf, shape)
        else:
            tf = torch_model(layers, w)
            tq = torch_int8(tf, calib)
            case_macs = macs(layers, shape)
        xt = torch.from_numpy(x)
        # fbgemm's convs work channels-last; given NCHW they transpose on every call, so the
        # int8 model gets its input channels-last (its fast path), the float one NCHW.
        xq = xt.contiguous(memory_format=torch.channels_last) if xt.dim() == 4 else xt
        fpath = os.path.join(tmp, "float.onnx")
        qpath = os.path.join(tmp, "int8.onnx")
        if tv:
            tv_onnx(tf, fpath, shape)
        else:
            onnx.save(onnx_model(layers, w, shape), fpath)
        quantize_static(fpath, qpath, Reader(calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        of, oq = ort_session(fpath), ort_session(qpath)
        if tv:
            p = Ptq(exe, tmp, layers, tv_state_dict(tf), calib, x,
                    spec=[f"zoo {layers[0][1]} {shape[2]} {shape[3]} 1000"])
        else:
            p = Ptq(exe, tmp, layers, w, calib, x)
        ptq_threads = p.threads

        with torch.inference_mode():
            y = {
                ("torch", "f32"): tf(xt).numpy(),
                ("torch", "int8"): tq(xq).contiguous().numpy(),
            }
        y[("ort", "f32")] = of.run(None, {"input": x})[0]
        y[("ort", "int8")] = oq.run(None, {"input": x})[0]
        out_shape = y[("torch", "f32")].shape
        y[("ptq", "f32")] = p.output("f32", out_shape)
        y[("ptq", "int8")] = p.output("int8", out_shape)

        # Same computation?
        ref = y[("torch", "f32")]
        checks = {
            "f32 ptq~torch": rel_max(y[("ptq", "f32")], ref, ref),
            "f32 ort~torch": rel_max(y[("ort", "f32")], ref, ref),
            "int8 ptq~torch": rel_range(y[("ptq", "int8")], y[("torch", "int8")], ref),
            "int8 ptq~ort": rel_range(y[("ptq", "int8")], y[("ort", "int8")], ref),
            "int8 ort~torch": rel_range(y[("ort", "int8")], y[("torch", "int8")], ref),
        }
        # Outputs where ptq's int8 value differs from PyTorch's (the dequantized floats may
        # differ in the last bits where the int8 values are equal).
        differ = int(np.sum(np.abs(y[("ptq", "int8")] - y[("torch", "int8")])
                            > 1e-5 * np.ptp(ref)))
        exact = f"{differ} of {ref.size}"
        l2 = {e: rel_l2(y[(e, "int8")], ref) for e in ("ptq", "torch", "ort")}
        bad = [k for k, v in checks.items() if v > (F32_TOL if k.startswith("f32") else INT8_TOL)]
        bad += [f"int8 {e} vs f32 L2 {v:.3f}" for e, v in l2.items() if v > INT8_VS_F32_TOL]
        if labels is not None:
            digits_acc = {k: float(np.mean(np.argmax(v, 1) == labels)) for k, v in y.items()}
        print("   checks: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items())
              + f", ptq int8 != torch int8 on {exact} outputs, int8 vs f32 rel L2 "
              + ", ".join(f"{e} {v:.3f}" for e, v in l2.items()), file=sys.stderr)
        if bad:
            p.close()
            print(f"   MISMATCH: {bad}", file=sys.stderr)
            results.append((name, layers, shape, None, checks, exact, bad, 0))
            continue

        # Timing: warm up, size the blocks, then interleaved rounds.
        modes = ("int8",) if tv else ("int8", "f32")
        runners = {
            ("torch", "int8"): lambda: tq(xq),
            ("torch", "f32"): lambda: tf(xt),
            ("ort", "int8"): lambda: oq.run(None, {"input": x}),
            ("ort", "f32"): lambda: of.run(None, {"input": x}),
        }
        runners = {k: v for k, v in runners.items() if k[1] in modes}
        reps = {}
        with torch.inference_mode():
            for key, fn in runners.items():
                t = min(block(fn, 2 if tv else 3))
                reps[key] = int(min(max(block_s / max(t, 1e-7), 3), 2000))
            for mode in modes:
                t = min(p.times(mode, 2 if tv else 3))
                reps[("ptq", mode)] = int(min(max(block_s / max(t, 1e-7), 3), 2000))
            med = {k: [] for k in reps}
            order = list(reps)
            case_rounds = min(rounds, 3 if args.quick else 5) if tv else rounds
            for r in range(case_rounds):
                rot = order[r % len(order):] + order[:r % len(order)]
                for key in rot:
                    if key[0] == "ptq":
                        ts = p.times(key[1], reps[key])
                    else:
                        ts = block(runners[key], reps[key])
                    med[key].append(float(np.median(ts)))
        if args.profile:
            profiles.append((name, p.profile(5 if tv else 20)))
        p.close()
        results.append((name, layers, shape, med, checks, exact, [], case_macs))

    header.append(f"load average (1 min) at the start {load0}, at the end {loadavg()} "
                  f"on {os.cpu_count()} CPUs: other processes slow every engine; the "
                  "interleaved ratios suffer least")
    for k, v in peaks(tmp_root).items():  # again at the end: other load only lowers it
        pk[k] = max(v, pk.get(k, 0.0))
    if pk:
        header.append("one core's peak (tools/peak.c, best of the start and the end), GMAC/s: "
                      + ", ".join(f"{k} {v:.0f}" for k, v in pk.items()))
    shutil.rmtree(tmp_root, ignore_errors=True)
    header[1] = header[1].replace("THREADS", str(ptq_threads))
    print()
    for h in header:
        print(h + "  ")
    for mode in ("int8", "f32"):
        print()
        print(f"| {mode} | ptq ms | torch ms | ORT ms | ptq / faster peer: median [p25-p75] "
              f"| ptq / ORT | ptq GMAC/s |" + (" ptq f32 / int8 |" if mode == "int8" else ""))
        print("|---|---|---|---|---|---|---|" + ("---|" if mode == "int8" else ""))
        for name, layers, shape, med, checks, exact, bad, case_macs in results:
            if med is None:
                print(f"| {name} | mismatch: {', '.join(bad)} | | | | | |")
                continue
            if ("ptq", mode) not in med:
                continue
            m = {k: float(np.median(v)) for k, v in med.items()}
            ratios = [pt / min(a, b) for pt, a, b in zip(
                med[("ptq", mode)], med[("torch", mode)], med[("ort", mode)])]
            q25, q50, q75 = np.percentile(ratios, [25, 50, 75])
            g = case_macs / m[("ptq", mode)] / 1e9
            vs_ort = np.median([pt / o for pt, o in zip(med[("ptq", mode)], med[("ort", mode)])])
            row = (f"| {name} | {fmt_ms(m[('ptq', mode)])} | {fmt_ms(m[('torch', mode)])} | "
                   f"{fmt_ms(m[('ort', mode)])} | {q50:.2f} [{q25:.2f}-{q75:.2f}] | {vs_ort:.2f} "
                   f"| {g:.1f} |")
            if mode == "int8" and ("ptq", "f32") in med:
                own = [f / i for f, i in zip(med[("ptq", "f32")], med[("ptq", "int8")])]
                row += f" {np.median(own):.2f} |"
            elif mode == "int8":
                row += " (int8 only) |"
            print(row)
    print()
    print("ptq / peer below 1: ptq is faster. ptq f32 / int8 above 1: ptq's int8 beats its own "
          "f32. Times are medians over rounds; ms per call, input quantization and output "
          "dequantization included.")
    print()
    print(f"Checks before timing: float outputs agree within {F32_TOL:g} of the largest float "
          f"output; int8 outputs pairwise within {INT8_TOL:g} of the float output's range; "
          f"each int8 output within {INT8_VS_F32_TOL:g} relative L2 of the float output.")
    for name, layers, shape, med, checks, exact, bad, _ in results:
        print(f"- {name}: " + ", ".join(f"{k} {v:.1e}" for k, v in checks.items())
              + f"; ptq int8 != torch int8 on {exact} outputs")
    if digits_acc:
        print("- digits test accuracy (500 images): " + ", ".join(
            f"{e} {m} {100 * a:.1f}%" for (e, m), a in sorted(digits_acc.items())))
    for name, prof in profiles:
        total = sum(us for _, _, us in prof)
        print()
        print(f"ptq int8 per node, {name} (QuantizedGraph::profile, median of several runs; "
              f"sum {total / 1e3:.3f} ms):")
        by_kind = {}
        for _, kind, us in prof:
            by_kind[kind] = by_kind.get(kind, 0.0) + us
        print("  by kind: " + ", ".join(
            f"{k} {v / 1e3:.3f} ms ({100 * v / max(total, 1e-9):.0f}%)"
            for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))
        top = sorted(prof, key=lambda r: -r[2])[:12]
        print("  slowest nodes: " + ", ".join(
            f"{n} ({k}) {us:.0f} us" for n, k, us in top))
    if any(r[3] is None for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
