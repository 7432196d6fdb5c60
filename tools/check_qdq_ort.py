#!/usr/bin/env python3
"""Checks a QDQ ONNX model written by ptq (examples/quantize_onnx.rs --qdq OUT.onnx) in ONNX
Runtime: ORT's optimized graph (SessionOptions.optimized_model_filepath) must contain its int8
kernels (QLinearConv, QGemm / QLinearMatMul, QLinearAdd, ...) and no float Conv / Gemm /
MatMul left (no float fallback for the int8 ops), and ORT's int8 output on the batch the
example saved (OUT.onnx.x.npy) must equal ptq's (OUT.onnx.ptq.npy): the share of identical
values and the largest difference in units of the output scale (LSB) are printed.

Usage: /work/venv/bin/python tools/check_qdq_ort.py OUT.onnx [--min-identical 0.99] [--max-lsb 1]
Exits 1 when a check fails.
"""
import argparse
import collections
import os
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--min-identical", type=float, default=0.99)
    ap.add_argument("--max-lsb", type=float, default=1.0)
    a = ap.parse_args()
    m = onnx.load(a.model)
    onnx.checker.check_model(m)
    x = np.load(a.model + ".x.npy")
    y_ptq = np.load(a.model + ".ptq.npy")
    with tempfile.TemporaryDirectory() as td:
        opt = os.path.join(td, "opt.onnx")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = opt
        s = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
        y_ort = s.run(None, {s.get_inputs()[0].name: x})[0]
        om = onnx.load(opt)
    ops = collections.Counter(n.op_type for n in om.graph.node)
    print("ORT optimized graph:", dict(sorted(ops.items())))
    ok = True
    int8 = [k for k in ops if k.startswith("QLinear") or k in ("QGemm", "MatMulInteger", "ConvInteger")]
    if not int8:
        print("FAIL: no int8 kernel in the optimized graph")
        ok = False
    leftover = {k: ops[k] for k in ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm") if k in ops}
    if leftover:
        print(f"FAIL: float kernels left for int8 ops: {leftover}")
        ok = False
    # output scale: the DequantizeLinear producing the graph output's Q/DQ, or the output's
    # own QuantizeLinear scale
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out = m.graph.output[0].name
    base = out[: -len("_dequantized")] if out.endswith("_dequantized") else out
    scale = inits.get(base + "_scale")
    if scale is None:
        print("output is float (no Q/DQ on it): comparing with a relative tolerance")
        d = np.abs(y_ort - y_ptq) / max(np.abs(y_ptq).max(), 1e-30)
        print(f"max relative difference {d.max():.3e}")
        ok &= bool(d.max() <= 1e-2)
    else:
        lsb = np.abs(y_ort.astype(np.float64) - y_ptq.astype(np.float64)) / float(scale)
        same = float((lsb < 0.5).mean())
        print(f"{y_ptq.size} output values: {same * 100:.2f}% identical, max {lsb.max():.2f} LSB "
              f"(scale {float(scale):.6g})")
        ok &= same >= a.min_identical and lsb.max() <= a.max_lsb + 1e-6
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
