#!/usr/bin/env python3
"""ONNX Runtime's Entropy and Percentile calibration (onnxruntime.quantization.calibrate's
HistogramCollector, the code quantize_static runs for CalibrationMethod.Entropy /
.Percentile) on fixed data, for tests/onnx_ort_histogram.rs.

Five data sets of 3 batches x 400 float32 values (normal, ReLU-like, heavy-tailed with
outliers, all-positive shifted, tiny constant-ish). For each data set and each calibrator
configuration, the collector is fed either all 3 batches in one collect() (what
quantize_static does by default: every batch of the data reader in one histogram) or one
collect() per batch (quantize_static with extra_options CalibStridedMinMax=1 and a reader
yielding one batch per item). Recorded: the threshold (lowest, highest) ORT computes and
compute_scale_zp(lowest, highest, 0, 255, symmetric=False) as quantize_static applies it to
uint8 activations.

Configurations: entropy(num_bins=128, num_quantized_bins=128) [ORT's default],
entropy(num_bins=512, num_quantized_bins=128), percentile(num_bins=2048, 99.999,
symmetric=True) [ORT's default], percentile(2048, 99.9, symmetric=True),
percentile(2048, 99.9, symmetric=False).

End to end: quantize_static (QDQ, uint8 activations, int8 per-channel weights) with
calibrate_method Entropy and Percentile (their defaults) on tests/fixtures/onnx/resnet18_ts13.onnx
and the 8 `calib` images of tests/fixtures/onnx/inputs.safetensors (4 reader items of 2, one
collect), recording every activation tensor's range after ORT's adjustments and its scale /
zero point: tests/fixtures/onnx/resnet18_ort_hist_qparams.safetensors.

Usage: /work/venv/bin/python tools/gen_ort_histogram_fixtures.py [--out tests/fixtures/onnx/ort_histogram.safetensors]
"""
import argparse
import contextlib
import io
import os

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization.calibrate import HistogramCollector
from onnxruntime.quantization.quant_utils import compute_scale_zp
from safetensors.numpy import load_file, save_file

CONFIGS = [
    ("entropy_128_128", dict(method="entropy", symmetric=False, num_bins=128, num_quantized_bins=128, percentile=99.999)),
    ("entropy_512_128", dict(method="entropy", symmetric=False, num_bins=512, num_quantized_bins=128, percentile=99.999)),
    ("percentile_2048_99.999_sym", dict(method="percentile", symmetric=True, num_bins=2048, num_quantized_bins=2048, percentile=99.999)),
    ("percentile_2048_99.9_sym", dict(method="percentile", symmetric=True, num_bins=2048, num_quantized_bins=2048, percentile=99.9)),
    ("percentile_2048_99.9_asym", dict(method="percentile", symmetric=False, num_bins=2048, num_quantized_bins=2048, percentile=99.9)),
]


def datasets(rng):
    n = (3, 400)
    d = {}
    d["normal"] = rng.normal(0.3, 1.5, n)
    d["relu"] = np.maximum(rng.normal(0.0, 2.0, n), 0.0)
    heavy = rng.standard_t(2.0, n)
    heavy[1, 7] = 40.0  # outliers, the second batch widens the range
    heavy[2, 3] = -65.0
    d["heavy"] = heavy
    d["shifted"] = rng.uniform(2.0, 3.0, n) * np.array([[1.0], [1.5], [0.8]])
    d["tiny"] = rng.normal(0.0, 1e-3, n) * np.array([[0.2], [1.0], [3.0]])
    return {k: v.astype(np.float32) for k, v in d.items()}


def run(cfg, batches, one_collect):
    c = HistogramCollector(scenario="same", **cfg)
    with contextlib.redirect_stdout(io.StringIO()):
        if one_collect:
            c.collect({"t": list(batches)})
        else:
            for b in batches:
                c.collect({"t": [b]})
        lo, hi = c.compute_collection_result()["t"][:2]
    lo, hi = np.float32(lo), np.float32(hi)
    zp, scale = compute_scale_zp(lo, hi, np.array(0, np.int32), np.array(255, np.int32), symmetric=False)
    return lo, hi, np.float32(scale), int(zp)


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


def quantize_static_hist(model_path, calib, out_path):
    import onnx
    import tempfile
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization import qdq_quantizer

    t = {}
    for mname, method in (("entropy", CalibrationMethod.Entropy), ("percentile", CalibrationMethod.Percentile)):
        ranges = {}
        orig_calc = qdq_quantizer.QDQQuantizer.calc_graph_quant_params

        def calc(self):
            out = orig_calc(self)
            for k, td in (self.tensors_range or {}).items():
                lo, hi = td.range_value
                ranges[k] = np.array([np.float32(lo), np.float32(hi)], dtype=np.float32).reshape(-1)
            return out

        qdq_quantizer.QDQQuantizer.calc_graph_quant_params = calc
        try:
            with tempfile.TemporaryDirectory() as td, contextlib.redirect_stdout(io.StringIO()):
                q = os.path.join(td, "q.onnx")
                quantize_static(model_path, q, Reader(calib), quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                per_channel=True, calibrate_method=method)
                qm = onnx.load(q)
        finally:
            qdq_quantizer.QDQQuantizer.calc_graph_quant_params = orig_calc
        inits = {i.name: numpy_helper.to_array(i) for i in qm.graph.initializer}
        n = 0
        for k, r in ranges.items():
            s_, z = inits.get(k + "_scale"), inits.get(k + "_zero_point")
            if s_ is None or z is None:
                continue
            t[f"{mname}/range/{k}"] = r
            t[f"{mname}/scale/{k}"] = np.asarray(s_, np.float32).reshape(-1)
            t[f"{mname}/zero_point/{k}"] = np.asarray(z).astype(np.float32).reshape(-1)
            n += 1
        print(f"quantize_static {mname}: {n} activation tensors")
    save_file(t, out_path, metadata={"onnxruntime": ort.__version__})
    print(f"wrote {out_path} ({os.path.getsize(out_path)} bytes)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join("tests", "fixtures", "onnx", "ort_histogram.safetensors"))
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    out = {}
    for name, x in datasets(rng).items():
        out[f"data/{name}"] = x
        for cname, cfg in CONFIGS:
            for one in (True, False):
                lo, hi, s, z = run(cfg, x, one)
                key = f"{name}/{cname}/{'one' if one else 'per_batch'}"
                out[key] = np.array([lo, hi, s, z], np.float32)
                print(f"{key}: [{lo:.6g}, {hi:.6g}] scale {s:.6g} zp {z}")
    save_file(out, a.out, metadata={"onnxruntime": ort.__version__, "numpy": np.__version__})
    print(f"wrote {a.out} ({os.path.getsize(a.out)} bytes)")
    fix = os.path.dirname(a.out)
    calib = load_file(os.path.join(fix, "inputs.safetensors"))["calib"]
    quantize_static_hist(os.path.join(fix, "resnet18_ts13.onnx"), [calib[i:i + 2] for i in range(0, 8, 2)],
                         os.path.join(fix, "resnet18_ort_hist_qparams.safetensors"))


if __name__ == "__main__":
    main()
