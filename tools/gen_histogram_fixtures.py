#!/usr/bin/env python3
"""Golden fixtures for ptq's HistogramObserver.

Requires torch==2.15.0 (from PyPI), numpy and safetensors:

    python -m venv ~/torchenv && ~/torchenv/bin/pip install torch==2.15.0 numpy safetensors
    ~/torchenv/bin/python tools/gen_histogram_fixtures.py

Writes tests/fixtures/histogram_observer.safetensors; tests/histogram_parity.rs replays it.
CI never runs this script: the generated file is committed.

Runs with torch.set_num_threads(1). The file was generated on an x86-64 CPU where
torch.backends.cpu.get_cpu_capability() is "AVX512"; regenerating it with 2 threads, or
with ATEN_CPU_CAPABILITY=avx2, gives identical tensors (see src/observer/histogram.rs for
the arithmetic facts the observer relies on).

Layout, for each case cNNN:
  cNNN.x0, cNNN.x1, ...  f32 input batches, observed in order
  cNNN.histogram         f32 [bins]  the observer's histogram afterwards
  cNNN.min_val/.max_val  f32 [1]     its min_val / max_val
  cNNN.scale             f32 [1]     calculate_qparams()
  cNNN.zero_point        i64 [1]
  cNNN.q0, cNNN.q1, ...  i32         int_repr of torch.quantize_per_tensor(x_i, scale, zp,
                                     dtype) (clamped to the dtype's full range, as torch's
                                     quantize function does, whatever quant_min/max are)
  cNNN.errors            f32 [8, 3]  rows (start_bin, end_bin, _compute_quantization_error)
                                     on the final histogram
  sNNN.x, sNNN.sum       f32 vectors and their torch.sum (the cascade order the parameter
                         search's error sums rely on)
  lNNN.range, lNNN.x     torch.linspace(range[0], range[1], len(x))
  hNNN.range/.x/.counts  torch.histc(x, len(counts), *range) for x on and beside the edges
  uNNN.ranges, uNNN.out  _upscale_histogram((i * 37 % 11 for i in range(bins)), *ranges)
Metadata: "cNNN" -> "observer=HistogramObserver;dtype=...;qscheme=...;reduce_range=0|1;
quant_min=;quant_max=;bins=N;batches=N;input=<distribution>/<stream>", and "rejected" ->
the configurations PyTorch refuses (each verified to raise here), one per line.
"""
import os

import torch
from safetensors.torch import save_file
from torch.ao.quantization.observer import HistogramObserver

assert torch.__version__.startswith("2.15.0"), torch.__version__
torch.manual_seed(20261125)
torch.set_num_threads(1)

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "histogram_observer.safetensors")
DT = {"quint8": torch.quint8, "qint8": torch.qint8, "qint32": torch.qint32}
QS = {"per_tensor_affine": torch.per_tensor_affine, "per_tensor_symmetric": torch.per_tensor_symmetric}


def dist(kind, n):
    r = torch.randn(n)
    if kind == "normal":
        return r
    if kind == "relu":
        return torch.relu(r)
    if kind == "outliers":
        x = r.clone()
        idx = torch.randperm(n)[: max(1, n // 100)]
        x[idx] = x[idx] * 200.0
        return x
    if kind == "tiny":
        return 1.0 + r * 1e-6
    if kind == "tiny0":
        return r * 1e-6
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "const":
        return torch.full((n,), 0.37)
    if kind == "huge":
        return r * 1e30
    if kind == "negative":
        return -r.abs() - 0.5
    if kind == "uniform":
        return torch.rand(n) * 4.0 - 1.0
    if kind == "ties":
        # multiples of 1/8: many values land exactly on bin edges and rounding ties
        return torch.randint(-16, 33, (n,)).float() * 0.125
    if kind == "exp":
        return torch.empty(n).exponential_()
    raise ValueError(kind)


def stream(kind, how, n, batches):
    """Batches whose ranges grow, shrink, stay equal, or a mix."""
    xs = []
    for b in range(batches):
        x = dist(kind, n)
        if how == "grow":
            x = x * (1.5 ** b) + 0.1 * b
        elif how == "shrink":
            x = x * (0.5 ** b)
        elif how == "equal" and b > 0:
            # same min and max as batch 0: PyTorch adds the histograms
            x[0], x[1] = xs[0].min(), xs[0].max()
            x = x.clamp(xs[0].min(), xs[0].max())
        elif how == "left" and b > 0:
            x = x - 0.5 * b  # only the minimum moves
            x = x.clamp(max=xs[0].max())
        elif how == "then_normal" and b > 0:
            x = torch.randn(n)  # constant first batch, then a spread: min==max combine branch
        elif how == "point_then_same":
            pass
        xs.append(x.contiguous().float())
    return xs


CFGS = {
    "u8": ("quint8", "per_tensor_affine", False, None, None),
    "u8rr": ("quint8", "per_tensor_affine", True, None, None),
    "u8sym": ("quint8", "per_tensor_symmetric", False, None, None),
    "s8": ("qint8", "per_tensor_affine", False, None, None),
    "s8rr": ("qint8", "per_tensor_affine", True, None, None),
    "s8sym": ("qint8", "per_tensor_symmetric", False, None, None),
    "s8symrr": ("qint8", "per_tensor_symmetric", True, None, None),
    "u8custom": ("quint8", "per_tensor_affine", False, 0, 200),
    "s8custom": ("qint8", "per_tensor_symmetric", False, -127, 127),
    "s8customrr": ("qint8", "per_tensor_affine", True, -100, 100),
    "s32sym": ("qint32", "per_tensor_symmetric", False, None, None),
}

# (config, bins, distribution, stream, batches, batch size)
CASES = [
    # the default configuration (fbgemm's activation observer is u8rr), 2048 bins
    ("u8rr", 2048, "normal", "single", 1, 200),
    ("u8rr", 2048, "relu", "grow", 3, 120),
    ("u8", 2048, "outliers", "grow", 2, 250),
    ("u8", 512, "normal", "shrink", 3, 120),
    ("u8rr", 1024, "uniform", "equal", 3, 120),
    ("u8", 512, "normal", "left", 3, 120),
    ("s8sym", 2048, "normal", "grow", 4, 120),
    ("u8rr", 2048, "exp", "single", 1, 300),
    ("u8", 256, "zeros", "single", 2, 50),
    ("u8rr", 512, "const", "then_normal", 2, 100),
    ("u8", 1024, "ties", "grow", 2, 200),
    ("u8rr", 512, "huge", "single", 1, 120),
    # smaller histograms keep the file small while covering configs and streams
    ("u8", 256, "normal", "single", 1, 120),
    ("u8rr", 256, "relu", "single", 1, 120),
    ("u8sym", 256, "normal", "single", 1, 120),
    ("s8", 256, "normal", "grow", 3, 120),
    ("s8rr", 256, "outliers", "grow", 2, 120),
    ("s8sym", 256, "negative", "single", 1, 120),
    ("s8symrr", 256, "uniform", "shrink", 3, 120),
    ("u8custom", 256, "relu", "grow", 3, 120),
    ("s8custom", 256, "normal", "equal", 2, 120),
    ("s8customrr", 256, "outliers", "left", 3, 120),
    ("u8", 256, "tiny", "single", 1, 120),
    ("u8rr", 256, "tiny", "grow", 3, 120),
    ("s8sym", 256, "tiny0", "shrink", 2, 120),
    ("u8", 256, "zeros", "point_then_same", 3, 100),
    ("s8", 256, "zeros", "single", 1, 1),
    ("u8", 256, "normal", "single", 1, 1),
    ("u8rr", 256, "const", "then_normal", 2, 50),
    ("s8sym", 256, "const", "then_normal", 3, 50),
    ("u8", 256, "huge", "grow", 3, 120),
    ("s8sym", 256, "huge", "single", 1, 100),
    ("u8rr", 256, "negative", "grow", 2, 120),
    ("u8", 256, "negative", "shrink", 3, 120),
    ("s8", 256, "uniform", "single", 1, 120),
    ("u8sym", 256, "uniform", "grow", 4, 90),
    ("u8", 256, "ties", "equal", 3, 120),
    ("s8sym", 256, "ties", "single", 1, 120),
    ("u8rr", 256, "exp", "grow", 4, 120),
    ("s8rr", 256, "exp", "left", 2, 120),
    ("u8", 256, "outliers", "shrink", 3, 120),
    ("u8rr", 256, "normal", "left", 4, 100),
    # other bin counts: not a power of two (the interpolation's operation order matters)
    ("u8rr", 1000, "normal", "grow", 3, 120),
    ("s8sym", 100, "relu", "grow", 3, 120),
    ("u8", 7, "normal", "grow", 3, 100),
    ("u8", 512, "uniform", "grow", 2, 120),
    ("u8rr", 333, "outliers", "single", 1, 120),
    ("u8", 1200, "normal", "grow", 2, 90),
    # qint32: 2^32 destination bins in the error model
    ("s32sym", 64, "outliers", "grow", 2, 60),
]


def main():
    tensors, meta = {}, {}
    rejected = []
    # What PyTorch refuses: per-channel schemes.
    for qs in (torch.per_channel_affine, torch.per_channel_symmetric):
        try:
            HistogramObserver(qscheme=qs)
        except NotImplementedError:
            rejected.append(f"observer=HistogramObserver;qscheme={qs}")
        else:
            raise AssertionError("PyTorch accepted a per-channel HistogramObserver")
    # quint8 + per_tensor_symmetric + reduce_range: HistogramObserver (unlike MinMaxObserver)
    # does NOT refuse it in 2.15.0; ptq's RangeConfig refuses it for every observer, so no
    # case covers it.
    HistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_symmetric, reduce_range=True)

    for i, (cfg, bins, kind, how, batches, n) in enumerate(CASES):
        dtype, qscheme, rr, qmin, qmax = CFGS[cfg]
        kw = dict(bins=bins, dtype=DT[dtype], qscheme=QS[qscheme], reduce_range=rr)
        if qmin is not None:
            kw["quant_min"], kw["quant_max"] = qmin, qmax
        obs = HistogramObserver(**kw)
        xs = stream(kind, how, n, batches)
        for x in xs:
            obs(x)
        scale, zp = obs.calculate_qparams()
        key = f"c{i:03d}"
        for b, x in enumerate(xs):
            tensors[f"{key}.x{b}"] = x
            q = torch.quantize_per_tensor(x, float(scale), int(zp), DT[dtype])
            tensors[f"{key}.q{b}"] = q.int_repr().to(torch.int32)
        tensors[key + ".scale"] = scale.reshape(1).to(torch.float32)
        tensors[key + ".zero_point"] = zp.reshape(1).to(torch.int64)
        tensors[key + ".histogram"] = obs.histogram.clone()
        tensors[key + ".min_val"] = obs.min_val.reshape(1).clone()
        tensors[key + ".max_val"] = obs.max_val.reshape(1).clone()
        # PyTorch's per-candidate error on the final histogram, for a few (start, end) bins
        errs = []
        pairs = [(0, bins - 1), (bins // 4, (3 * bins) // 4)]
        pairs += [tuple(sorted(torch.randint(0, bins, (2,)).tolist())) for _ in range(6)]
        for a, b in pairs:
            errs.append([float(a), float(b), float(obs._compute_quantization_error(a, b))])
        tensors[key + ".errors"] = torch.tensor(errs, dtype=torch.float32)
        meta[key] = (
            f"observer=HistogramObserver;dtype={dtype};qscheme={qscheme};reduce_range={int(rr)};"
            f"quant_min={'' if qmin is None else qmin};quant_max={'' if qmax is None else qmax};"
            f"bins={bins};batches={batches};input={kind}/{how}"
        )
    # Primitives, checked directly: torch.linspace (the edges and sub-bin midpoints) ...
    for j, (a, b, n) in enumerate([(-1.5, 2.25, 257), (0.1, 0.7, 129), (1.0, 1.0000001, 33), (-7.0, 3e3, 5)]):
        tensors[f"l{j:03d}.range"] = torch.tensor([a, b], dtype=torch.float32)
        lo, hi = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
        tensors[f"l{j:03d}.x"] = torch.linspace(lo, hi, n)
    # ... torch.histc on values sitting on and next to its bin edges (non-power-of-two bins,
    # where the order of the interpolation's operations shows) ...
    for j, (a, b, bins) in enumerate([(-1.3, 2.9, 100), (0.01, 7.3, 150), (-5.0, -1.0, 7)]):
        lo, hi = torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
        e = torch.linspace(lo, hi, bins + 1)
        x = torch.cat([e, torch.nextafter(e, torch.tensor(float("inf"))), torch.nextafter(e, torch.tensor(float("-inf")))])
        tensors[f"h{j:03d}.range"] = torch.tensor([a, b], dtype=torch.float32)
        tensors[f"h{j:03d}.x"] = x
        tensors[f"h{j:03d}.counts"] = torch.histc(x, bins, min=lo, max=hi)
    # ... and _upscale_histogram of a dense histogram ((i * 37) % 11 in bin i) onto a wider range.
    for j, (bins, r) in enumerate([(256, (-1.0, 2.0, -1.7, 2.0)), (100, (0.25, 0.5, 0.0, 3.0)), (256, (3.0, 3.001, 2.999, 3.001))]):
        obs = HistogramObserver(bins=bins)
        h = (torch.arange(bins) * 37 % 11).float()
        t = [torch.tensor(v, dtype=torch.float32) for v in r]
        tensors[f"u{j:03d}.ranges"] = torch.stack(t)
        tensors[f"u{j:03d}.out"] = obs._upscale_histogram(h, *t)
    # ... torch.sum's cascade order, which the parameter search's error sums depend on: vectors
    # of mixed magnitudes (like the per-bin errors) and their f32 torch.sum.
    for j, n in enumerate((1024, 1000, 100, 7)):
        v = torch.exp(torch.randn(n) * 4.0) * (torch.rand(n) < 0.8).float()
        tensors[f"s{j:03d}.x"] = v
        tensors[f"s{j:03d}.sum"] = torch.sum(v).reshape(1)
    meta["rejected"] = "\n".join(rejected)
    save_file(tensors, OUT, metadata=meta)
    print(f"{len(CASES)} cases, {os.path.getsize(OUT)} bytes -> {OUT}")


if __name__ == "__main__":
    main()
