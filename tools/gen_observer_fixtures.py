#!/usr/bin/env python3
"""Golden fixtures for ptq's quantization arithmetic and min/max observers.

Requires torch==2.15.0 (from PyPI), numpy and safetensors:

    python -m venv ~/torchenv && ~/torchenv/bin/pip install torch==2.15.0 numpy safetensors
    ~/torchenv/bin/python tools/gen_observer_fixtures.py

Writes tests/fixtures/observers.safetensors. CI never runs this script: the generated file
is committed and tests/observer_parity.rs replays it.

Layout (every tensor is stored with its exact bits):
  in.<name>.<b>          f32 input batch b of the named input stream (per-tensor shape or
                         per-channel shape)
  o<NNN>.stats           f32 [3, C] the observer's state min_val, max_val, and PyTorch's
                                   scales after observing the whole stream
  o<NNN>.zero_point      i64 [C]
  o<NNN>.q               u8/i8/i32 [B, ...] int_repr of quantize_per_tensor /
                                   quantize_per_channel of each batch with those parameters (clamped to the dtype's full
                                   range, as torch's quantize functions do)
  o<NNN>.fq0             f32       fake_quantize_per_{tensor,channel}_affine of batch 0 with
                                   the observer's quant_min/quant_max
  z<NNN>.x / .q / .dq / .fq        explicit-parameter quantize cases (ties, saturation, ...)
  z<NNN>.scale / .zero_point
Metadata: "o<NNN>" / "z<NNN>" -> "key=value;..." descriptions; "rejected" -> the configs
PyTorch refuses (each verified to raise here), one per line.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch.ao.quantization.observer import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    HistogramObserver,
)

assert torch.__version__.startswith("2.15.0"), torch.__version__
torch.manual_seed(20261125)
torch.set_num_threads(1)

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "observers.safetensors")
tensors = {}
meta = {}

DT = {"quint8": torch.quint8, "qint8": torch.qint8, "qint32": torch.qint32}
QS = {
    "per_tensor_affine": torch.per_tensor_affine,
    "per_tensor_symmetric": torch.per_tensor_symmetric,
    "per_channel_affine": torch.per_channel_affine,
    "per_channel_symmetric": torch.per_channel_symmetric,
}

# ---------------------------------------------------------------- input streams
PT_SHAPE = (2, 32)
PC_SHAPE = (4, 4, 2, 2)


def stream(kind, shape, n=3):
    out = []
    for b in range(n):
        r = torch.randn(shape)
        if kind == "normal":
            x = r
        elif kind == "relu":
            x = torch.relu(r)
        elif kind == "outliers":
            x = r.clone()
            flat = x.view(-1)
            idx = torch.randperm(flat.numel())[:3]
            flat[idx] = flat[idx] * 100.0
        elif kind == "tiny":
            x = r * 1e-8
        elif kind == "tiny_offset":
            x = 5.0 + r * 1e-5
        elif kind == "zeros":
            x = torch.zeros(shape)
        elif kind == "huge":
            x = r * 1e30
        elif kind == "negative":
            x = -r.abs() - 0.5
        elif kind == "uniform":
            x = torch.rand(shape) * 10.0 - 3.0
        elif kind == "halves":
            x = torch.randint(-40, 41, shape).float() * 0.5
        elif kind == "growing":
            x = r * (2.0 ** b)
        elif kind == "shrinking":
            x = r * (2.0 ** (2 - b)) + 1.0
        elif kind == "channel_scales":
            # channels (axis 0 and 1) of very different magnitude
            s = torch.logspace(-3, 3, shape[0]).view(-1, *([1] * (len(shape) - 1)))
            x = r * s
            if len(shape) > 1:
                s1 = torch.logspace(-1, 1, shape[1]).view(1, -1, *([1] * (len(shape) - 2)))
                x = x * s1
        else:
            raise ValueError(kind)
        out.append(x.contiguous().float())
    return out


INPUT_KINDS = [
    "normal", "relu", "outliers", "tiny", "tiny_offset", "zeros", "huge", "negative",
    "uniform", "halves", "growing", "shrinking", "channel_scales",
]
streams = {}
for k in INPUT_KINDS:
    streams["pt_" + k] = stream(k, PT_SHAPE)
    streams["pc_" + k] = stream(k, PC_SHAPE)
streams["pt_single"] = [torch.tensor([v]) for v in (0.7, -0.2, 3.5)]
streams["pc_single"] = [torch.tensor([[v], [-v]]) for v in (0.7, -0.2, 3.5)]

# ---------------------------------------------------------------- observer configs
# (dtype, qscheme, reduce_range, quant_min, quant_max, eps)
PT_CONFIGS = [
    ("quint8", "per_tensor_affine", False, None, None, None),
    ("quint8", "per_tensor_affine", True, None, None, None),
    ("quint8", "per_tensor_affine", False, 0, 127, None),
    ("qint8", "per_tensor_affine", False, None, None, None),
    ("qint8", "per_tensor_affine", True, -127, 127, None),
    ("qint8", "per_tensor_symmetric", False, None, None, None),
    ("qint8", "per_tensor_symmetric", True, None, None, None),
    ("qint8", "per_tensor_symmetric", False, -127, 127, 2.0 ** -12),
    ("quint8", "per_tensor_symmetric", False, None, None, None),
    ("quint8", "per_tensor_symmetric", False, 0, 127, None),
    ("qint32", "per_tensor_symmetric", False, None, None, None),
]
PC_CONFIGS = [
    ("qint8", "per_channel_symmetric", False, None, None, None),
    ("qint8", "per_channel_symmetric", False, -127, 127, 2.0 ** -12),
    ("qint8", "per_channel_affine", False, None, None, None),
    ("quint8", "per_channel_affine", False, None, None, None),
    ("quint8", "per_channel_affine", True, None, None, None),
    ("qint8", "per_channel_symmetric", True, None, None, None),
]


def make(cls, dtype, qscheme, rr, qmin, qmax, eps, **extra):
    kw = dict(dtype=DT[dtype], qscheme=QS[qscheme], reduce_range=rr, **extra)
    if qmin is not None:
        kw["quant_min"], kw["quant_max"] = qmin, qmax
    if eps is not None:
        kw["eps"] = eps
    return cls(**kw)


def desc(**kv):
    return ";".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in kv.items() if v is not None)


case = 0


def add_observer_case(cls_name, obs, cfg, stream_name, ch_axis=None, averaging_constant=None):
    global case
    dtype, qscheme, rr, qmin, qmax, eps = cfg
    xs = streams[stream_name]
    for x in xs:
        obs(x)
    scale, zp = obs.calculate_qparams()
    scale = scale.to(torch.float32).reshape(-1)
    zp = zp.to(torch.int64).reshape(-1)
    key = f"o{case:03d}"
    tensors[key + ".zero_point"] = zp
    tensors[key + ".stats"] = torch.stack([obs.min_val.reshape(-1), obs.max_val.reshape(-1), scale])
    qs = []
    for b, x in enumerate(xs):
        if ch_axis is None:
            q = torch.quantize_per_tensor(x, float(scale[0]), int(zp[0]), DT[dtype])
            fq = torch.fake_quantize_per_tensor_affine(x, float(scale[0]), int(zp[0]), obs.quant_min, obs.quant_max)
        else:
            q = torch.quantize_per_channel(x, scale.double(), zp, ch_axis, DT[dtype])
            fq = torch.fake_quantize_per_channel_affine(x, scale, zp.int(), ch_axis, obs.quant_min, obs.quant_max)
        qs.append(q.int_repr())
        if b == 0:
            tensors[key + ".fq0"] = fq
    tensors[key + ".q"] = torch.stack(qs)
    meta[key] = desc(
        observer=cls_name, dtype=dtype, qscheme=qscheme, reduce_range=rr, quant_min=qmin,
        quant_max=qmax, eps=None if eps is None else repr(eps), ch_axis=ch_axis,
        averaging_constant=averaging_constant, input=stream_name, batches=len(xs),
        resolved_min=obs.quant_min, resolved_max=obs.quant_max,
    )
    case += 1


pc_streams = ["pc_normal", "pc_relu", "pc_outliers", "pc_tiny", "pc_zeros", "pc_huge", "pc_negative",
              "pc_growing", "pc_shrinking", "pc_channel_scales", "pc_single"]
pt_streams = [s for s in streams if s.startswith("pt_")]
for name, xs in streams.items():
    if name in pt_streams or name in pc_streams:
        for b, x in enumerate(xs):
            tensors[f"in.{name}.{b}"] = x
for cfg in PT_CONFIGS:
    for s in pt_streams:
        add_observer_case("MinMaxObserver", make(MinMaxObserver, *cfg), cfg, s)
    for s in ["pt_normal", "pt_growing", "pt_shrinking", "pt_outliers", "pt_single", "pt_tiny_offset"]:
        add_observer_case(
            "MovingAverageMinMaxObserver", make(MovingAverageMinMaxObserver, *cfg), cfg, s,
            averaging_constant=0.01,
        )
for s in ["pt_growing", "pt_shrinking"]:
    cfg = PT_CONFIGS[0]
    add_observer_case(
        "MovingAverageMinMaxObserver",
        make(MovingAverageMinMaxObserver, *cfg, averaging_constant=0.3), cfg, s,
        averaging_constant=0.3,
    )
for cfg in PC_CONFIGS:
    for axis in (0, 1) if cfg in PC_CONFIGS[:2] else (0,):
        for s in pc_streams:
            if s == "pc_single" and axis == 1:
                continue
            add_observer_case(
                "PerChannelMinMaxObserver", make(PerChannelMinMaxObserver, *cfg, ch_axis=axis), cfg, s,
                ch_axis=axis,
            )
        for s in ["pc_normal", "pc_growing", "pc_shrinking", "pc_channel_scales"]:
            add_observer_case(
                "MovingAveragePerChannelMinMaxObserver",
                make(MovingAveragePerChannelMinMaxObserver, *cfg, ch_axis=axis), cfg, s,
                ch_axis=axis, averaging_constant=0.01,
            )

# ---------------------------------------------------------------- explicit quantize cases
zcase = 0


def add_quantize_case(x, scale, zp, dtype, axis=None, note=""):
    global zcase
    key = f"z{zcase:03d}"
    x = x.float().contiguous().clone()
    scale_t = torch.tensor(scale, dtype=torch.float32).reshape(-1)
    zp_t = torch.tensor(zp, dtype=torch.int64).reshape(-1)
    lo, hi = {"quint8": (0, 255), "qint8": (-128, 127), "qint32": (-(2 ** 31), 2 ** 31 - 1)}[dtype]
    if axis is None:
        q = torch.quantize_per_tensor(x, float(scale_t[0]), int(zp_t[0]), DT[dtype])
        fq = torch.fake_quantize_per_tensor_affine(x, float(scale_t[0]), int(zp_t[0]), lo, hi) if dtype != "qint32" else None
    else:
        q = torch.quantize_per_channel(x, scale_t.double(), zp_t, axis, DT[dtype])
        fq = torch.fake_quantize_per_channel_affine(x, scale_t, zp_t.int(), axis, lo, hi)
    tensors[key + ".x"] = x
    tensors[key + ".scale"] = scale_t
    tensors[key + ".zero_point"] = zp_t
    tensors[key + ".q"] = q.int_repr()
    tensors[key + ".dq"] = q.dequantize()
    if fq is not None:
        tensors[key + ".fq"] = fq
    meta[key] = desc(dtype=dtype, axis=axis, note=note)
    zcase += 1


ks = torch.arange(-100, 101).float()
# exact ties: x * (1/scale) = k + 0.5 with power-of-two scales
for s in (0.5, 0.25, 2.0 ** -7, 4.0):
    add_quantize_case((ks + 0.5) * s, s, 3, "quint8", note=f"ties scale {s}")
    add_quantize_case((ks + 0.5) * s, s, -5, "qint8", note=f"ties scale {s}")
# near-ties with non-power-of-two scales: the f32 reciprocal decides
for s in (0.1, 0.3, 1.0 / 3.0, 0.00214854861, 0.0078125 * 3):
    add_quantize_case((ks + 0.5) * s, s, 128, "quint8", note=f"near-ties scale {s}")
    add_quantize_case((ks + 0.5) * s, s, 0, "qint8", note=f"near-ties scale {s}")
# saturation, infinities, huge and tiny values
sat = torch.tensor([-1e38, -1e10, -1000.0, -1.0, -0.0, 0.0, 1e-30, 1.0, 1000.0, 1e10, 1e38,
                    float("inf"), float("-inf")])
add_quantize_case(sat, 0.05, 17, "quint8", note="saturation")
add_quantize_case(sat, 0.05, -17, "qint8", note="saturation")
add_quantize_case(torch.randn(256) * 1e-3, 1.1920928955078125e-07, 0, "qint8", note="eps scale")
add_quantize_case(torch.randn(256) * 1e6, 3.0e4, 255, "quint8", note="huge scale")
add_quantize_case(torch.randn(256) * 1e3, 0.37, 12, "qint32", note="qint32")
# per-channel quantize
add_quantize_case(torch.randn(4, 6, 5), [0.1, 0.02, 1.5, 1e-3], [0, 10, 128, 255], "quint8", axis=0,
                  note="per-channel axis 0")
add_quantize_case(torch.randn(3, 6, 5), [0.1, 0.02, 1.5, 1e-3, 0.5, 0.25], [0, -3, 5, 127, -128, 1], "qint8",
                  axis=1, note="per-channel axis 1")
add_quantize_case(torch.randn(2, 3, 7) * 4, [0.5] * 7, [-1, 0, 1, 2, 3, 4, 5], "qint8", axis=2,
                  note="per-channel axis 2, ties")

# ---------------------------------------------------------------- configs PyTorch rejects
rejected = []


def expect_reject(label, fn):
    try:
        fn()
    except (AssertionError, NotImplementedError, ValueError, RuntimeError) as e:  # noqa: PERF203
        rejected.append(label)
        return
    raise SystemExit(f"PyTorch accepted {label}; fix the fixture script")


expect_reject("MinMaxObserver;dtype=quint8;qscheme=per_tensor_symmetric;reduce_range=1",
              lambda: MinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_symmetric, reduce_range=True))
expect_reject("PerChannelMinMaxObserver;dtype=quint8;qscheme=per_channel_symmetric;reduce_range=1",
              lambda: PerChannelMinMaxObserver(dtype=torch.quint8, qscheme=torch.per_channel_symmetric, reduce_range=True))
expect_reject("MinMaxObserver;dtype=quint8;qscheme=per_tensor_affine;quant_min=1;quant_max=255",
              lambda: MinMaxObserver(quant_min=1, quant_max=255))
expect_reject("MinMaxObserver;dtype=quint8;qscheme=per_tensor_affine;quant_min=0;quant_max=0",
              lambda: MinMaxObserver(quant_min=0, quant_max=0))
expect_reject("MinMaxObserver;dtype=qint8;qscheme=per_tensor_affine;quant_min=-200;quant_max=100",
              lambda: MinMaxObserver(dtype=torch.qint8, quant_min=-200, quant_max=100))
expect_reject("MinMaxObserver;dtype=quint8;qscheme=per_channel_affine",
              lambda: MinMaxObserver(qscheme=torch.per_channel_affine))
expect_reject("PerChannelMinMaxObserver;dtype=qint8;qscheme=per_tensor_symmetric",
              lambda: PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric))
expect_reject("HistogramObserver;dtype=quint8;qscheme=per_channel_affine",
              lambda: HistogramObserver(qscheme=torch.per_channel_affine))
meta["rejected"] = "\n".join(rejected)
meta["generator"] = json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                "observer_cases": case, "quantize_cases": zcase})

tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
save_file(tensors, OUT, metadata=meta)
print(f"wrote {OUT}: {case} observer cases, {zcase} quantize cases, {len(rejected)} rejected configs, "
      f"{os.path.getsize(OUT)} bytes", file=sys.stderr)
