#!/usr/bin/env python3
"""ONNX Runtime's int8 outputs on ptq's QDQ exports, for tests/onnx_ort_int8.rs.

For each ONNX fixture model, ptq (examples/quantize_onnx.rs, preset `onnxruntime`,
calibrated on the `calib` images of tests/fixtures/onnx/inputs.safetensors in batches of 4,
exactly as the Rust test does) writes its QDQ export; ONNX Runtime (CPU, default graph
optimizations, so its QLinearConv / QGemm / QLinearAdd / ... kernels run) then runs it on all
10 fixture images (`calib` then `x`). Saved per model: ORT's int8 output values
(`<model>.q`, the output QuantizeLinear's uint8 values, as f32), their scale and zero point
(`<model>.scale`, `<model>.zero_point`) and the ORT op counts of the optimized graph
(`<model>.int8_ops`: number of QLinear* / QGemm nodes; `<model>.float_ops`: float
Conv / Gemm / MatMul left), and every activation QuantizeLinear's scale and zero point
(`<model>.act.<tensor>` = [scale, zero point]; the tensor names are ptq's node names), which
the Rust test pins with fixed observers so that it does not depend on the last ulp of ptq's
float forward during calibration (that differs between f32 kernels and CPUs).

Usage (from the repository root, after `cargo build --release --example quantize_onnx`):
    /work/venv/bin/python tools/gen_ort_int8_fixtures.py [--out tests/fixtures/onnx/ort_int8_outputs.safetensors]
"""
import argparse
import collections
import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from safetensors.numpy import load_file, save_file

# (the concat fixture ends in a float Softmax: its output has no int8 values to compare)
MODELS = ["resnet18_ts13", "mobilenet_v2_ts13", "mobilenet_v3_small_ts13"]
FIX = os.path.join("tests", "fixtures", "onnx")
EXAMPLE = os.path.join("target", "release", "examples", "quantize_onnx")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(FIX, "ort_int8_outputs.safetensors"))
    a = ap.parse_args()
    if not os.path.exists(EXAMPLE):
        sys.exit(f"{EXAMPLE} missing: run `cargo build --release --example quantize_onnx` first")
    inp = load_file(os.path.join(FIX, "inputs.safetensors"))
    x = np.concatenate([inp["calib"], inp["x"]], axis=0)
    out = {}
    with tempfile.TemporaryDirectory() as td:
        for m in MODELS:
            qdq = os.path.join(td, m + ".qdq.onnx")
            subprocess.run(
                [EXAMPLE, os.path.join(FIX, m + ".onnx"), os.path.join(FIX, "inputs.safetensors"),
                 "--key", "calib", "--batch", "4", "--qconfig", "onnxruntime", "--qdq", qdq],
                check=True, stdout=subprocess.DEVNULL)
            model = onnx.load(qdq)
            inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
            name = model.graph.output[0].name
            base = name[: -len("_dequantized")] if name.endswith("_dequantized") else name
            scale = np.float32(inits[base + "_scale"])
            zp = int(inits[base + "_zero_point"])
            so = ort.SessionOptions()
            so.log_severity_level = 3
            opt = os.path.join(td, m + ".opt.onnx")
            so.optimized_model_filepath = opt
            s = ort.InferenceSession(qdq, so, providers=["CPUExecutionProvider"])
            y = s.run(None, {s.get_inputs()[0].name: x})[0]
            ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
            int8 = sum(v for k, v in ops.items() if k.startswith("QLinear") or k == "QGemm")
            flt = sum(ops.get(k, 0) for k in ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm"))
            # the graph output is DequantizeLinear(q): y = (q - zp) * scale exactly
            q = np.rint(y.astype(np.float64) / np.float64(scale)) + zp
            assert np.all((q >= 0) & (q <= 255))
            assert np.array_equal(((q - zp).astype(np.float32) * scale), y), m
            key = m.replace("_ts13", "")
            for n in model.graph.node:
                if n.op_type == "QuantizeLinear" and n.input[0] not in inits:
                    s_, z_ = inits[n.input[1]], inits[n.input[2]]
                    out[f"{key}.act.{n.input[0]}"] = np.array([s_, float(z_)], np.float32)
            out[key + ".q"] = q.astype(np.float32)
            out[key + ".scale"] = np.array([scale], np.float32)
            out[key + ".zero_point"] = np.array([zp], np.float32)
            out[key + ".int8_ops"] = np.array([int8], np.float32)
            out[key + ".float_ops"] = np.array([flt], np.float32)
            print(f"{m}: output {y.shape}, scale {scale:.6g}, zp {zp}, ORT ops {dict(sorted(ops.items()))}")
    save_file(out, a.out, metadata={"onnxruntime": ort.__version__})
    print(f"wrote {a.out} ({os.path.getsize(a.out)} bytes)")


if __name__ == "__main__":
    main()
