#!/usr/bin/env python3
"""ONNX Runtime's int8 arithmetic for two ops ptq computes in int8, for tests/onnx_ort_int8.rs:
- QLinearGlobalAveragePool (com.microsoft, uint8, NCHW) on random inputs; input and output
  share scale and zero point, as ptq's int8 global average pool keeps its input's qparams.
  Cases vary the spatial size (1x1 .. 14x14), the channel count, the zero point and the
  scale (1e-4 .. 1e9). Keys: for case i, `i.x` (u8 input as f32, [n, c, h, w]), `i.y`
  (ORT's u8 output as f32, [n, c, 1, 1]), `i.qp` [scale, zp].
- DequantizeLinear -> HardSigmoid(alpha 1/6, beta 0.5) -> QuantizeLinear(1/256, 0), what
  ptq's QDQ export writes for a hardsigmoid: every u8 input for 24 (scale, zero point)
  pairs (three with scales near 1e4-1e8). Keys: `hs.i.y` (256 outputs as f32), `hs.i.qp` [scale, zp].

Writes tests/fixtures/onnx/ort_gap.safetensors (about 130 KB).

    /work/venv/bin/python tools/gen_ort_gap_fixture.py
"""
import os

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "onnx",
                   "ort_gap.safetensors")


def run(x, scale, zp):
    n, c, h, w = x.shape
    node = helper.make_node("QLinearGlobalAveragePool", ["x", "xs", "xz", "ys", "yz"], ["y"],
                            domain="com.microsoft", channels_last=0)
    inits = [helper.make_tensor("xs", TensorProto.FLOAT, [], [scale]),
             helper.make_tensor("xz", TensorProto.UINT8, [], [zp]),
             helper.make_tensor("ys", TensorProto.FLOAT, [], [scale]),
             helper.make_tensor("yz", TensorProto.UINT8, [], [zp])]
    g = helper.make_graph([node], "gap",
                          [helper.make_tensor_value_info("x", TensorProto.UINT8, [n, c, h, w])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, [n, c, 1, 1])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13),
                                            helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def hardsigmoid(scale, zp):
    x = np.arange(256, dtype=np.uint8)
    nodes = [helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["d"]),
             helper.make_node("HardSigmoid", ["d"], ["h"], alpha=1.0 / 6.0, beta=0.5),
             helper.make_node("QuantizeLinear", ["h", "ys", "yz"], ["y"])]
    inits = [helper.make_tensor("xs", TensorProto.FLOAT, [], [scale]),
             helper.make_tensor("xz", TensorProto.UINT8, [], [zp]),
             helper.make_tensor("ys", TensorProto.FLOAT, [], [1.0 / 256.0]),
             helper.make_tensor("yz", TensorProto.UINT8, [], [0])]
    g = helper.make_graph(nodes, "hs",
                          [helper.make_tensor_value_info("x", TensorProto.UINT8, [256])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, [256])],
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def main():
    rng = np.random.default_rng(0)
    out = {}
    cases = [(1, 1), (7, 7), (14, 14), (3, 5), (2, 2), (1, 9), (5, 1), (7, 7)]
    i = 0
    for (h, w) in cases:
        for scale in (1e-4, 0.0173, 0.5, 3.7e9):
            n, c = int(rng.integers(1, 3)), int(rng.integers(1, 17))
            zp = int(rng.integers(0, 256))
            x = rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)
            if i % 3 == 0:  # values near the zero point: small sums, many ties
                x = np.clip(zp + rng.integers(-3, 4, size=x.shape), 0, 255).astype(np.uint8)
            sc = np.float32(scale * rng.uniform(0.5, 2.0))
            y = run(x, float(sc), zp)
            out[f"{i}.x"] = x.astype(np.float32)
            out[f"{i}.y"] = y.astype(np.float32)
            out[f"{i}.qp"] = np.array([sc, zp], np.float32)
            i += 1
    # 21 random input qparams, then three squeeze-excite gate inputs of a torchvision
    # MobileNetV3-Large with exploding activations (huge scales)
    huge = [(9.803567e3, 119), (8.029981e7, 152), (1.13626136e8, 134)]
    for j in range(24):
        sc = np.float32(10 ** rng.uniform(-3, 1))
        zp = int(rng.integers(0, 256))
        if j >= 21:
            sc, zp = np.float32(huge[j - 21][0]), huge[j - 21][1]
        out[f"hs.{j}.y"] = hardsigmoid(float(sc), zp).astype(np.float32)
        out[f"hs.{j}.qp"] = np.array([sc, zp], np.float32)
    save_file(out, OUT, metadata={"onnxruntime": ort.__version__})
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes), {i} cases")


if __name__ == "__main__":
    main()
