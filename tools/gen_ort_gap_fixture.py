#!/usr/bin/env python3
"""ONNX Runtime's QLinearGlobalAveragePool (com.microsoft, uint8, NCHW) on random inputs, for
tests/onnx_ort_int8.rs: input and output share scale and zero point, as ptq's int8 global
average pool keeps its input's qparams. Cases vary the spatial size (1x1 .. 14x14), the
channel count, the zero point and the scale (1e-4 .. 1e9).

Writes tests/fixtures/onnx/ort_gap.safetensors (about 110 KB): for case i, `i.x` (u8 input
as f32, [n, c, h, w]), `i.y` (ORT's u8 output as f32, [n, c, 1, 1]), `i.qp` [scale, zp].

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
    save_file(out, OUT, metadata={"onnxruntime": ort.__version__})
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes), {i} cases")


if __name__ == "__main__":
    main()
