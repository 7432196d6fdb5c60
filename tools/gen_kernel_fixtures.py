"""Generate tests/fixtures/kernels.safetensors: PyTorch's own quantized outputs for the
int8 kernels and modules of `ptq`, checked bit for bit by tests/kernel_parity.rs.

Pinned: torch 2.15.0 (CPU), quantized engine "fbgemm", torch.set_num_threads(1),
numpy seed 20261125. The committed file was generated on a CPU with AVX-512 VNNI, where
fbgemm's products are exact (see `saturation_case`). Run with:  /root/torchenv/bin/python tools/gen_kernel_fixtures.py

Per case `kNNN` the file holds (only what the op needs):
  kNNN.x, kNNN.x2      u8   input int_repr (NCHW or [M, K])
  kNNN.x_scale/x_zp    f32 [1] / i64 [1] (x2_scale/x2_zp for the add's second input)
  kNNN.w               f32  float weight;  kNNN.wq  i8  torch's quantized weight int_repr
  kNNN.w_scale/w_zp    f32 [C] / i64 [C] (one element for per-tensor weights)
  kNNN.bias            f32 [C] (absent without bias)
  kNNN.y               u8   expected output int_repr (logical NCHW order)
  kNNN.y_scale/y_zp    f32 [1] / i64 [1]
and the metadata key `kNNN` = "op=...;key=value;..." with the hyperparameters.
"""
import warnings

import numpy as np
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from safetensors.numpy import save_file

warnings.filterwarnings("ignore")
assert torch.__version__.startswith("2.15.0"), torch.__version__
torch.backends.quantized.engine = "fbgemm"
torch.set_num_threads(1)
rng = np.random.default_rng(20261125)
f32 = np.float32
tensors, meta = {}, {}
count = 0


def new_key():
    global count
    k = f"k{count:03d}"
    count += 1
    return k


def put(k, name, arr):
    tensors[f"{k}.{name}"] = np.ascontiguousarray(arr)


def qparams_for(lo, hi, qmax):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / qmax, 1e-6)
    zp = int(np.clip(round(-lo / scale), 0, qmax))
    return float(f32(scale)), zp


def quant_input(shape, qmax=127, zp_override=None):
    xf = rng.normal(size=shape).astype(f32) * f32(rng.uniform(0.5, 2.0)) + f32(rng.uniform(-0.5, 0.5))
    s, z = qparams_for(float(xf.min()), float(xf.max()), qmax)
    if zp_override is not None:
        z = zp_override
    xq = torch.quantize_per_tensor(torch.tensor(xf), s, z, torch.quint8)
    xq = torch._make_per_tensor_quantized_tensor(torch.clamp(xq.int_repr(), 0, qmax), s, z)
    return xq


def quant_weight(w, per_channel):
    if per_channel:
        amax = np.maximum(np.abs(w.reshape(w.shape[0], -1)).max(axis=1), 1e-8)
        sc = torch.tensor((amax / 127.5).astype(f32).astype(np.float64))
        wq = torch.quantize_per_channel(torch.tensor(w), sc, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        return wq, wq.q_per_channel_scales().numpy().astype(f32), wq.q_per_channel_zero_points().numpy()
    s = float(f32(max(np.abs(w).max(), 1e-8) / 127.5))
    wq = torch.quantize_per_tensor(torch.tensor(w), s, 0, torch.qint8)
    return wq, np.array([wq.q_scale()], dtype=f32), np.array([wq.q_zero_point()])


def out_qparams(y_float):
    return qparams_for(float(y_float.min()), float(y_float.max()), 255)


def store_common(k, xq, wq_t, wsc, wzp, w, bias, y):
    put(k, "x", xq.int_repr().numpy())
    put(k, "x_scale", np.array([xq.q_scale()], dtype=f32))
    put(k, "x_zp", np.array([xq.q_zero_point()], dtype=np.int64))
    put(k, "w", w.astype(f32))
    put(k, "wq", wq_t.int_repr().numpy())
    put(k, "w_scale", wsc.astype(f32))
    put(k, "w_zp", wzp.astype(np.int64))
    if bias is not None:
        put(k, "bias", bias.astype(f32))
    put(k, "y", y.int_repr().contiguous().numpy())
    put(k, "y_scale", np.array([y.q_scale()], dtype=f32))
    put(k, "y_zp", np.array([y.q_zero_point()], dtype=np.int64))


def linear_case(m, kdim, n, per_channel, relu, has_bias=True, bias_mult=1.0, qmax=127):
    k = new_key()
    w = (rng.normal(size=(n, kdim)) / np.sqrt(max(kdim, 1))).astype(f32)
    bias = (rng.normal(size=n) * bias_mult).astype(f32) if has_bias else None
    xq = quant_input((m, kdim), qmax)
    wq, wsc, wzp = quant_weight(w, per_channel)
    yf = xq.dequantize().numpy() @ wq.dequantize().numpy().T + (bias if bias is not None else 0)
    if relu:
        yf = np.maximum(yf, 0)
    ys, yz = out_qparams(yf)
    mod = (nniq.LinearReLU if relu else nnq.Linear)(kdim, n)
    mod.set_weight_bias(wq, None if bias is None else torch.tensor(bias))
    mod.scale, mod.zero_point = ys, yz
    y = mod(xq)
    store_common(k, xq, wq, wsc, wzp, w, bias, y)
    meta[k] = f"op=linear;relu={int(relu)};per_channel={int(per_channel)};bias={int(has_bias)}"


def conv_case(b, cin, cout, hw, ks, stride, pad, dil, groups, per_channel, relu, has_bias=True):
    k = new_key()
    w = (rng.normal(size=(cout, cin // groups, ks[0], ks[1])) / np.sqrt(cin // groups * ks[0] * ks[1])).astype(f32)
    bias = (rng.normal(size=cout) * 0.5).astype(f32) if has_bias else None
    xq = quant_input((b, cin, hw[0], hw[1]))
    wq, wsc, wzp = quant_weight(w, per_channel)
    yf = F.conv2d(xq.dequantize(), wq.dequantize(), None if bias is None else torch.tensor(bias), stride, pad, dil, groups).numpy()
    if relu:
        yf = np.maximum(yf, 0)
    ys, yz = out_qparams(yf)
    mod = (nniq.ConvReLU2d if relu else nnq.Conv2d)(cin, cout, ks, stride=stride, padding=pad, dilation=dil, groups=groups)
    mod.set_weight_bias(wq, None if bias is None else torch.tensor(bias))
    mod.scale, mod.zero_point = ys, yz
    y = mod(xq)
    store_common(k, xq, wq, wsc, wzp, w, bias, y)
    meta[k] = (f"op=conv2d;relu={int(relu)};per_channel={int(per_channel)};bias={int(has_bias)};"
               f"stride={stride[0]},{stride[1]};padding={pad[0]},{pad[1]};dilation={dil[0]},{dil[1]};groups={groups}")


def crafted_linear(per_channel, n=256, m=4):
    """K = 1 and biases chosen so that (raw + bias term) * multiplier lands next to a
    rounding tie: only the exact fbgemm bias arithmetic (FMA with the reciprocal for
    per-tensor weights, a division for per-channel) gets every element right."""
    k = new_key()
    xs, xzp, ys, yzp = 0.0123, 3, 0.002, 128
    c0 = 100
    wi = rng.integers(-127, 128, size=(n, 1)).astype(np.int8)
    wsc = rng.uniform(0.01, 0.02, size=n).astype(f32) if per_channel else np.full(n, f32(0.0137), dtype=f32)
    atws = (f32(xs) * wsc).astype(f32)
    mult = (atws / f32(ys)).astype(f32)
    raws = np.array([(c0 + d) * wi[:, 0].astype(np.int64) for d in (-1, 0, 1)])
    best = None
    for _ in range(4000):
        u = rng.uniform(-100, 100, size=n)
        bias = (-(c0 * wi[:, 0].astype(np.float64)) * atws + ys * u).astype(f32)
        if per_channel:
            good = (raws.astype(f32) + (bias / atws).astype(f32)).astype(f32)
            alt = (raws.astype(np.float64) + bias.astype(np.float64) * (1 / atws.astype(np.float64)).astype(f32)).astype(f32)
        else:
            rcp = f32(1.0 / np.float64(atws[0]))
            good = (raws.astype(np.float64) + bias.astype(np.float64) * np.float64(rcp)).astype(f32)
            alt = (raws.astype(f32) + (bias / atws).astype(f32)).astype(f32)
        dg = np.rint((good * mult).astype(f32)); da = np.rint((alt * mult).astype(f32))
        cols = np.nonzero((dg != da).any(axis=0))[0]
        if best is None:
            best = bias.copy()
        best[cols] = bias[cols]
        if len(cols):
            break
    bias = best
    if per_channel:
        wq = torch._make_per_channel_quantized_tensor(torch.tensor(wi), torch.tensor(wsc.astype(np.float64)), torch.zeros(n, dtype=torch.long), 0)
        wzp = np.zeros(n, dtype=np.int64)
    else:
        wq = torch._make_per_tensor_quantized_tensor(torch.tensor(wi), float(wsc[0]), 0)
        wzp = np.zeros(1, dtype=np.int64)
        wsc = wsc[:1]
    xi = np.array([[c0 + xzp + d] for d in (-1, 0, 1, 0)][:m], dtype=np.uint8)
    xq = torch._make_per_tensor_quantized_tensor(torch.tensor(xi), xs, xzp)
    mod = nnq.Linear(1, n)
    mod.set_weight_bias(wq, torch.tensor(bias))
    mod.scale, mod.zero_point = ys, yzp
    y = mod(xq)
    w = wq.dequantize().numpy()
    store_common(k, xq, wq, wsc, wzp, w, bias, y)
    meta[k] = f"op=linear;relu=0;per_channel={int(per_channel)};bias=1;crafted=1"


def add_case(shape, channels_last, relu):
    k = new_key()
    a = quant_input(shape, 255)
    b = quant_input(shape, 255)
    yf = a.dequantize() + b.dequantize()
    ys, yz = out_qparams(yf.numpy())
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
        b = b.contiguous(memory_format=torch.channels_last)
    y = (torch.ops.quantized.add_relu if relu else torch.ops.quantized.add)(a, b, ys, yz)
    put(k, "x", a.int_repr().contiguous().numpy())
    put(k, "x_scale", np.array([a.q_scale()], dtype=f32))
    put(k, "x_zp", np.array([a.q_zero_point()], dtype=np.int64))
    put(k, "x2", b.int_repr().contiguous().numpy())
    put(k, "x2_scale", np.array([b.q_scale()], dtype=f32))
    put(k, "x2_zp", np.array([b.q_zero_point()], dtype=np.int64))
    put(k, "y", y.int_repr().contiguous().numpy())
    put(k, "y_scale", np.array([y.q_scale()], dtype=f32))
    put(k, "y_zp", np.array([y.q_zero_point()], dtype=np.int64))
    meta[k] = f"op=add;relu={int(relu)};channels_last={int(channels_last)}"


def unary_case(op, shape, channels_last, params, fn):
    k = new_key()
    x = quant_input(shape, 255)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = fn(x)
    put(k, "x", x.int_repr().contiguous().numpy())
    put(k, "x_scale", np.array([x.q_scale()], dtype=f32))
    put(k, "x_zp", np.array([x.q_zero_point()], dtype=np.int64))
    put(k, "y", y.int_repr().contiguous().numpy())
    put(k, "y_scale", np.array([y.q_scale()], dtype=f32))
    put(k, "y_zp", np.array([y.q_zero_point()], dtype=np.int64))
    meta[k] = f"op={op};channels_last={int(channels_last)};{params}"


# Linear
linear_case(4, 64, 32, False, False)
linear_case(7, 33, 17, True, True)
linear_case(1, 100, 10, False, False, has_bias=False)
linear_case(16, 256, 128, True, False)
linear_case(3, 5, 70, False, True, bias_mult=5.0)
linear_case(9, 1, 3, True, False)
linear_case(32, 128, 64, False, False)
crafted_linear(False)
crafted_linear(True)
# Conv2d: regular, strided, 1x1, depthwise (fbgemm's depthwise path), channel multiplier,
# groupwise (fbgemm's groupwise path), dilated groups, rectangular stride, odd depthwise.
conv_case(2, 3, 8, (9, 9), (3, 3), (1, 1), (1, 1), (1, 1), 1, False, True)
conv_case(1, 16, 32, (10, 11), (3, 3), (2, 2), (1, 1), (1, 1), 1, True, False)
conv_case(2, 16, 16, (7, 7), (1, 1), (1, 1), (0, 0), (1, 1), 1, True, True)
conv_case(1, 32, 32, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1), 32, True, False)
conv_case(1, 16, 32, (9, 9), (3, 3), (2, 2), (1, 1), (1, 1), 16, False, True)
conv_case(2, 16, 16, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 4, False, False)
conv_case(1, 12, 24, (11, 9), (3, 3), (1, 1), (2, 2), (2, 2), 3, True, True)
conv_case(1, 8, 8, (8, 12), (5, 5), (1, 2), (2, 2), (1, 1), 1, False, False, has_bias=False)
conv_case(1, 12, 12, (7, 7), (3, 3), (1, 1), (1, 1), (1, 1), 12, False, False)
conv_case(1, 24, 24, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 24, True, True)
# Elementwise add (numel not a multiple of 64, both memory formats).
add_case((1, 8, 5, 7), True, False)
add_case((2, 3, 6, 5), False, True)
add_case((1, 16, 4, 4), True, True)
# ReLU, pooling
unary_case("relu", (1, 4, 5, 5), False, "", lambda x: torch.relu(x))
for cl in (True, False):
    unary_case("maxpool2d", (1, 6, 9, 9), cl, "kernel=3,3;stride=2,2;padding=1,1;dilation=1,1",
               lambda x: F.max_pool2d(x, 3, 2, 1))
    unary_case("avgpool2d", (2, 5, 9, 8), cl, "kernel=3,3;stride=2,2;padding=1,1;count_include_pad=1",
               lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=True))
    unary_case("avgpool2d", (1, 7, 8, 8), cl, "kernel=2,2;stride=2,2;padding=0,0;count_include_pad=0",
               lambda x: F.avg_pool2d(x, 2, 2, 0, count_include_pad=False))
    unary_case("adaptive_avgpool2d", (2, 6, 7, 9), cl, "output=3,4", lambda x: F.adaptive_avg_pool2d(x, (3, 4)))
    unary_case("adaptive_avgpool2d", (1, 8, 5, 5), cl, "output=1,1", lambda x: F.adaptive_avg_pool2d(x, (1, 1)))



def saturation_case():
    """Full-range activations (128..255) against weights of magnitude 100..127 with equal
    signs in each adjacent pair: every vpmaddubsw pair sum exceeds the i16 range. fbgemm's
    AVX2 kernel would saturate here; its AVX-512 VNNI kernel (vpdpbusd) and ptq are exact.
    Generated on a VNNI machine, so the expected integers are the exact ones."""
    k = new_key()
    m, kdim, n = 8, 64, 24
    mag = rng.integers(100, 128, size=(n, kdim // 2))
    sign = np.where(rng.random((n, kdim // 2)) < 0.5, -1, 1)
    wi = np.repeat(mag * sign, 2, axis=1).astype(np.int8)
    xi = rng.integers(128, 256, size=(m, kdim)).astype(np.uint8)
    wsc = np.full(1, f32(0.0005), dtype=f32)
    wq = torch._make_per_tensor_quantized_tensor(torch.tensor(wi), float(wsc[0]), 0)
    xq = torch._make_per_tensor_quantized_tensor(torch.tensor(xi), 0.01, 0)
    bias = (rng.normal(size=n)).astype(f32)
    mod = nnq.Linear(kdim, n)
    mod.set_weight_bias(wq, torch.tensor(bias))
    mod.scale, mod.zero_point = 0.5, 128
    y = mod(xq)
    store_common(k, xq, wq, wsc, np.zeros(1, dtype=np.int64), wq.dequantize().numpy(), bias, y)
    meta[k] = "op=linear;relu=0;per_channel=0;bias=1;saturating_for_avx2=1"


saturation_case()

meta["torch_version"] = torch.__version__
meta["engine"] = torch.backends.quantized.engine
save_file(tensors, "tests/fixtures/kernels.safetensors", metadata=meta)
print(count, "cases,", sum(v.nbytes for v in tensors.values()), "bytes")
