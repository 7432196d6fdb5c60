#!/usr/bin/env python3
"""ONNX Runtime's QLinearAdd (com.microsoft, uint8, CPU) on chosen (a, b) pairs, for
tests/onnx_ort_int8.rs (ptq's `QAdd::with_onnxruntime_arithmetic`).

For 100 random (scale, zero point) sets, ORT adds all 65536 (a, b) pairs; kept per set: 8
random pairs plus every pair near a rounding boundary, i.e. where one of three close
formulas gives another value than ORT: PyTorch's scalar one (dequantize, add, requantize)
and MLAS's with the constant term computed without the fused multiply-add or with the other
one fused (the formula ORT follows is the one ptq implements). Saved as f32 (exact small
integers): `params` [100, 6] = (s_a, zp_a, s_b, zp_b, s_out, zp_out) per set, `pairs`
[N, 4] = (set, a, b, ORT's output).

Usage: /work/venv/bin/python tools/gen_ort_qlinearadd_fixture.py [--out tests/fixtures/onnx/ort_qlinearadd.safetensors]
"""
import argparse
import os

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from safetensors.numpy import save_file

A = np.repeat(np.arange(256, dtype=np.uint8), 256)
B = np.tile(np.arange(256, dtype=np.uint8), 256)


def run(sa, za, sb, zb, sc, zc):
    ins = [helper.make_tensor_value_info(n, TensorProto.UINT8, [A.size]) for n in "AB"]
    out = helper.make_tensor_value_info("C", TensorProto.UINT8, [A.size])
    inits = [
        helper.make_tensor("sa", TensorProto.FLOAT, [], [sa]),
        helper.make_tensor("za", TensorProto.UINT8, [], [za]),
        helper.make_tensor("sb", TensorProto.FLOAT, [], [sb]),
        helper.make_tensor("zb", TensorProto.UINT8, [], [zb]),
        helper.make_tensor("sc", TensorProto.FLOAT, [], [sc]),
        helper.make_tensor("zc", TensorProto.UINT8, [], [zc]),
    ]
    node = helper.make_node("QLinearAdd", ["A", "sa", "za", "B", "sb", "zb", "sc", "zc"], ["C"],
                            domain="com.microsoft")
    g = helper.make_graph([node], "g", ins, [out], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13),
                                            helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"A": A, "B": B})[0]


def pytorch_like(sa, za, sb, zb, sc, zc):
    f = np.float32
    da = (A.astype(f) - f(za)) * f(sa)
    db = (B.astype(f) - f(zb)) * f(sb)
    return np.clip(np.rint((da + db) * f(1 / f(sc))) + zc, 0, 255)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join("tests", "fixtures", "onnx", "ort_qlinearadd.safetensors"))
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    f = np.float32
    params, pairs = [], []
    for k in range(100):
        sa, sb, sc = [float(f(x)) for x in np.exp(rng.uniform(np.log(1e-3), np.log(1.0), 3))]
        za, zb, zc = [int(x) for x in rng.integers(0, 256, 3)]
        y = run(sa, za, sb, zb, sc, zc)
        ra, rb = f(f(sa) / f(sc)), f(f(sb) / f(sc))
        near = pytorch_like(sa, za, sb, zb, sc, zc) != y
        for fixed in (f(f(zc) - f(f(ra * f(za)) + f(rb * f(zb)))),
                      f(f(zc) - f(np.float64(rb) * zb + np.float64(f(ra * f(za)))))):
            t = (B.astype(np.float64) * np.float64(rb) + np.float64(fixed)).astype(f)
            r = (A.astype(np.float64) * np.float64(ra) + t.astype(np.float64)).astype(f)
            near |= np.clip(np.rint(r), 0, 255) != y
        idx = np.union1d(rng.choice(A.size, 8, replace=False), np.nonzero(near)[0])
        params.append([sa, za, sb, zb, sc, zc])
        for i in idx:
            pairs.append([k, A[i], B[i], y[i]])
    out = {"params": np.array(params, f), "pairs": np.array(pairs, f)}
    print(f"{len(pairs)} pairs, {len(pairs) - 800} near a rounding boundary")
    save_file(out, a.out, metadata={"onnxruntime": ort.__version__})
    print(f"wrote {a.out} ({os.path.getsize(a.out)} bytes)")


if __name__ == "__main__":
    main()
