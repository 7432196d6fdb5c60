"""Generate tests/fixtures/ops_*.safetensors: PyTorch's own quantized outputs for the int8
elementwise, concat, activation, upsample, batch-norm and mean ops of `ptq`
(src/nn/quantized/{mul,cat,activation,upsample,norm,mean}.rs), checked bit for bit by
tests/int8_ops.rs (mean: tests/int8_mean.rs).

Pinned: torch 2.15.0 (CPU), quantized engine "fbgemm", torch.set_num_threads(1), numpy seed
20261129. Run with:  /work/venv/bin/python tools/gen_op_fixtures.py  (`... mean` writes only
ops_mean.safetensors, from its own seed, identical to the full run's).

Every case `cNNN` holds (only what the op needs):
  cNNN.a, cNNN.b, cNNN.x0.. u8   inputs' int_repr in logical (NCHW) order
  cNNN.a_scale / a_zp ..     f32 [1] / i64 [1]
  cNNN.y                     u8   expected output int_repr (logical order)
  cNNN.y_scale / y_zp        f32 [1] / i64 [1]
plus op parameters as tensors where they are arrays (batch-norm statistics), and the
metadata key `cNNN` = "op=...;key=value;..." for the rest. `layout=cl` means the inputs were
handed to PyTorch in channels_last memory format, `layout=nchw` contiguous.
"""
import warnings

import numpy as np
import torch
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from safetensors.numpy import save_file

warnings.filterwarnings("ignore")
assert torch.__version__.startswith("2.15.0"), torch.__version__
torch.backends.quantized.engine = "fbgemm"
torch.set_num_threads(1)
rng = np.random.default_rng(20261129)
f32 = np.float32
OUT = "tests/fixtures"


class Writer:
    def __init__(self, name):
        self.name, self.tensors, self.meta, self.count = name, {}, {}, 0

    def key(self, meta):
        k = f"c{self.count:03d}"
        self.count += 1
        self.meta[k] = meta
        return k

    def put(self, k, name, arr):
        self.tensors[f"{k}.{name}"] = np.ascontiguousarray(arr)

    def qt(self, k, name, t):
        self.put(k, name, t.int_repr().contiguous().numpy())
        self.put(k, f"{name}_scale", np.array([t.q_scale()], dtype=f32))
        self.put(k, f"{name}_zp", np.array([t.q_zero_point()], dtype=np.int64))

    def save(self):
        path = f"{OUT}/{self.name}.safetensors"
        save_file(self.tensors, path, metadata=self.meta)
        print(path, self.count, "cases")


def qparams_for(lo, hi):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(f32(max((hi - lo) / 255, 1e-6)))
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return scale, zp


def rand_q(shape, scale=None, zp=None):
    """A random quint8 tensor that hits 0, 255 and its zero point."""
    if scale is None:
        scale = float(f32(rng.uniform(0.005, 0.08)))
    if zp is None:
        zp = int(rng.integers(0, 256))
    q = rng.integers(0, 256, size=shape).astype(np.uint8)
    flat = q.reshape(-1)
    for i, v in enumerate((0, 255, zp, zp, 0, 255)):
        if i < flat.size:
            flat[(i * 7919) % flat.size] = v
    return torch._make_per_tensor_quantized_tensor(torch.tensor(q), scale, zp)


def to_layout(t, layout):
    if layout == "cl" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


# ----------------------------------------------------------------------------------- mul
def gen_mul():
    w = Writer("ops_mul")

    def case(sa, sb, layout, relu, out=None, qa=None, qb=None):
        a = qa if qa is not None else rand_q(sa)
        b = qb if qb is not None else rand_q(sb)
        if out is None:
            yf = a.dequantize() * b.dequantize()
            out = qparams_for(float(yf.min()), float(yf.max()))
        a, b = to_layout(a, layout), to_layout(b, layout)
        op = torch.ops.quantized.mul_relu if relu else torch.ops.quantized.mul
        y = op(a, b, out[0], out[1])
        k = w.key(f"op=mul;relu={int(relu)};layout={layout}")
        w.qt(k, "a", a)
        w.qt(k, "b", b)
        w.qt(k, "y", y)

    for layout in ("nchw", "cl"):
        for relu in (False, True):
            case((2, 8, 5, 7), (2, 8, 5, 7), layout, relu)
            case((1, 16, 5, 9), (1, 16, 5, 9), layout, relu)
            case((1, 24, 7, 9), (1, 24, 1, 1), layout, relu)   # squeeze-excite
            case((1, 80, 4, 4), (1, 80, 1, 1), layout, relu)   # C > 64: vector rows when NHWC
            case((2, 3, 11, 13), (1, 3, 1, 1), layout, relu)
    case((3, 37), (3, 37), "nchw", False)
    case((4, 70), (1, 70), "nchw", True)
    case((130,), (130,), "nchw", False)
    case((1, 80, 1, 1), (1, 80, 4, 4), "cl", False)   # MobileNetV3's skip_mul.mul(scale, x)
    # huge multiplier: the vectorized path overflows cvtps2dq (PyTorch gives 0 there, the
    # scalar tail saturates to 255); the paths must be modelled to match
    for layout in ("nchw", "cl"):
        case((1, 4, 5, 5), (1, 4, 5, 5), layout, False, out=(1e-6, 3),
             qa=rand_q((1, 4, 5, 5), 1.0, 0), qb=rand_q((1, 4, 5, 5), 1.0, 0))
        case((1, 70, 2, 2), (1, 70, 1, 1), layout, False, out=(1e-6, 3),
             qa=rand_q((1, 70, 2, 2), 1.0, 0), qb=rand_q((1, 70, 1, 1), 1.0, 0))
    w.save()


# ----------------------------------------------------------------------------------- cat
def gen_cat():
    w = Writer("ops_cat")

    def case(shapes, dim, layout, relu, same_first=False, out=None):
        xs = [rand_q(s) for s in shapes]
        if out is None:
            if same_first:
                out = (xs[0].q_scale(), xs[0].q_zero_point())
            else:
                yf = torch.cat([x.dequantize() for x in xs], dim)
                out = qparams_for(float(yf.min()), float(yf.max()))
        xs = [to_layout(x, layout) for x in xs]
        op = torch.ops.quantized.cat_relu if relu else torch.ops.quantized.cat
        y = op(xs, dim, out[0], out[1])
        k = w.key(f"op=cat;relu={int(relu)};layout={layout};dim={dim};n={len(xs)}")
        for i, x in enumerate(xs):
            w.qt(k, f"x{i}", x)
        w.qt(k, "y", y)

    for layout in ("cl", "nchw"):
        for relu in (False, True):
            case([(2, 3, 4, 5), (2, 8, 4, 5), (2, 37, 4, 5)], 1, layout, relu)
            case([(1, 70, 3, 3), (1, 13, 3, 3)], 1, layout, relu, same_first=True)
            case([(1, 32, 2, 3), (1, 40, 2, 3), (1, 7, 2, 3)], 1, layout, relu)
    # every u8 value through the vectorized channels with qparams where FMA matters
    for b, z, o in FMA_TIES["cat"]:
        x0 = torch._make_per_tensor_quantized_tensor(
            torch.tensor(rng.permutation(256).astype(np.uint8).reshape(1, 64, 2, 2)), f32_bits(b), z)
        x1 = rand_q((1, 8, 2, 2))
        xs = [to_layout(x0, "cl"), to_layout(x1, "cl")]
        y = torch.ops.quantized.cat(xs, 1, float(f32(CAT_OUTS[o][0])), CAT_OUTS[o][1])
        k = w.key("op=cat;relu=0;layout=cl;dim=1;n=2")
        for i, x in enumerate(xs):
            w.qt(k, f"x{i}", x)
        w.qt(k, "y", y)
    case([(2, 3, 4, 5), (3, 3, 4, 5)], 0, "nchw", False)
    case([(2, 3, 4, 5), (2, 3, 2, 5)], 2, "cl", False)
    case([(4, 10), (4, 75)], 1, "nchw", True)
    w.save()


# ---------------------------------------------------------------------------- activations
ALL = np.arange(256, dtype=np.uint8)


def run_act(fn, scale, zp, n):
    """fn over all 256 input values, in tensors of n elements (n >= 64 and a multiple of 64:
    PyTorch's vectorized path for every element; n = 32: its scalar path)."""
    outs, qp = [], None
    for i in range(0, 256, n):
        x = torch._make_per_tensor_quantized_tensor(torch.tensor(ALL[i:i + n].copy()), scale, zp)
        y = fn(x)
        outs.append(y.int_repr().numpy())
        qp = (y.q_scale(), y.q_zero_point())
    return np.concatenate(outs), qp


# Input qparams (f32 bit patterns, zero points) for which some sigmoid entry differs between
# PyTorch's vectorized lambda (Sleef expf, f32 reciprocal) and its scalar one (libm expf, f64
# division), or between Sleef's expf and libm's: found by a brute-force search over random
# qparams with ptq's own tables, so the fixture pins each path's exact arithmetic.
SIGMOID_TIES = [(0x3d51a1c1, 22), (0x3c12e48f, 124), (0x3cdc8c9b, 249), (0x3c9c6608, 104),
                (0x3da860e0, 62), (0x3d36e3da, 128), (0x3b3e13a2, 171), (0x3e2860e0, 126),
                (0x3cb6e3db, 174), (0x3ca92a55, 94)]


# (input scale bits, zero point, index into out_qps) for which the vectorized lambda's FMA
# dequantization `fma(s, q, s * -zp)` and the scalar `(q - zp) * s` give different outputs:
# found by brute force with ptq's own arithmetic, so the fixture pins the FMA.
FMA_TIES = {
    "hardswish": [(0x3e27cf71, 105, 3), (0x3d3e2981, 227, 2), (0x3e03b7ad, 77, 2)],
    "hardsigmoid": [(0x3c3128cf, 242, 0), (0x3dd8003e, 218, 3), (0x3c368169, 247, 2)],
    "leaky_relu": [(0x3ddc7616, 161, 1), (0x3dc5a1cb, 90, 0), (0x3d53fffe, 231, 2)],
    "cat": [(0x3dc4f830, 168, 0), (0x3e07bce8, 49, 1), (0x3d71a9fa, 118, 0)],
}
CAT_OUTS = [(0.03, 10), (float(f32(6.3 / 255)), 3)]


def f32_bits(b):
    return float(np.array([b], dtype=np.uint32).view(f32)[0])


def fma_ties(entries):
    return [(f32_bits(b), z, o) for b, z, o in entries]


def sigmoid_ties():
    return [(float(np.array([b], dtype=np.uint32).view(f32)[0]), z) for b, z in SIGMOID_TIES]


def gen_act():
    w = Writer("ops_act")
    in_qps = [(0.05, 128), (0.1, 0), (0.0235294122248888, 255), (1.0 / 64, 77), (0.003, 200),
              (0.5, 10), (float(f32(6.0 / 255)), 0), (float(f32(0.04187123)), 63)]
    out_qps = [(0.03, 10), (float(f32(6.3 / 255)), 3), (0.0078125, 128), (0.2, 200)]

    extra = [(float(f32(rng.uniform(0.002, 0.2))), int(rng.integers(0, 256))) for _ in range(5)]

    def lut_case(name, make, params="", qps=None):
        for i, qp in enumerate(qps if qps is not None else in_qps + extra):
            s, z = float(f32(qp[0])), qp[1]
            os_, oz = out_qps[qp[2] if len(qp) > 2 else i % len(out_qps)]
            os_ = float(f32(os_))
            fn = make(os_, oz)
            yv, qp = run_act(fn, s, z, 256)
            ys, _ = run_act(fn, s, z, 32)
            k = w.key(f"op={name}{params}")
            w.put(k, "x_scale", np.array([s], dtype=f32))
            w.put(k, "x_zp", np.array([z], dtype=np.int64))
            w.put(k, "y_vec", yv)
            w.put(k, "y_scalar", ys)
            w.put(k, "y_scale", np.array([qp[0]], dtype=f32))
            w.put(k, "y_zp", np.array([qp[1]], dtype=np.int64))

    lut_case("hardswish", lambda s, z: (lambda x: torch.ops.quantized.hardswish(x, s, z)),
             qps=in_qps + extra + fma_ties(FMA_TIES["hardswish"]))
    lut_case("hardsigmoid", lambda s, z: (lambda x: F.hardsigmoid(x)),
             qps=in_qps + extra + fma_ties(FMA_TIES["hardsigmoid"]))
    lut_case("sigmoid", lambda s, z: (lambda x: torch.sigmoid(x)), qps=in_qps + extra + sigmoid_ties())
    for slope in (0.01, 0.2):
        lut_case("leaky_relu", lambda s, z, sl=slope: (
            lambda x: torch.ops.quantized.leaky_relu(x, sl, False, s, z)), f";slope={slope}",
            qps=in_qps + extra + (fma_ties(FMA_TIES["leaky_relu"]) if slope == 0.01 else []))
    # clamps are exact integer ops: a few qparams suffice
    few = in_qps[:4]
    lut_case("relu6", lambda s, z: (lambda x: torch.ops.quantized.relu6(x, False)), qps=few)
    for lo, hi in ((-1.0, 1.0), (-0.5, 3.25)):
        lut_case("hardtanh", lambda s, z, lo=lo, hi=hi: (
            lambda x: torch.nn.quantized.functional.hardtanh(x, lo, hi)), f";min={lo};max={hi}", qps=few)
        lut_case("clamp", lambda s, z, lo=lo, hi=hi: (
            lambda x: torch.clamp(x, lo, hi)), f";min={lo};max={hi}", qps=few)

    # realistic tensors: memory order decides which elements take the scalar tail
    for layout in ("cl", "nchw"):
        for shape in ((1, 3, 7, 9), (2, 5, 6, 7), (1, 24, 4, 4)):
            x = to_layout(rand_q(shape), layout)
            os_, oz = qparams_for(-0.4, 4.0)
            cases = [("hardswish", lambda t: torch.ops.quantized.hardswish(t, os_, oz)),
                     ("hardsigmoid", lambda t: F.hardsigmoid(t)),
                     ("sigmoid", lambda t: torch.sigmoid(t)),
                     ("leaky_relu", lambda t: torch.ops.quantized.leaky_relu(t, 0.1, False, os_, oz))]
            for name, fn in cases:
                y = fn(x)
                k = w.key(f"op={name};layout={layout};slope=0.1")
                w.qt(k, "x", x)
                w.qt(k, "y", y)
    w.save()


# ------------------------------------------------------------------------------ upsample
def gen_upsample():
    w = Writer("ops_upsample")

    def case(shape, layout, size=None, scale=None, mode="nearest"):
        x = to_layout(rand_q(shape), layout)
        y = torch.ao.nn.quantized.functional.interpolate(x, size=size, scale_factor=scale, mode=mode)
        sz = "" if size is None else f";size={size[0]},{size[1]}"
        sc = "" if scale is None else f";scale={scale[0]},{scale[1]}"
        k = w.key(f"op=upsample_nearest;mode={mode};layout={layout}{sz}{sc}")
        w.qt(k, "x", x)
        w.qt(k, "y", y)

    for layout in ("cl", "nchw"):
        case((1, 3, 4, 5), layout, scale=(2.0, 2.0))
        case((2, 5, 3, 4), layout, scale=(3.0, 2.0))
        case((1, 4, 5, 3), layout, size=(7, 11))
        case((1, 2, 6, 6), layout, size=(4, 9))
        case((1, 3, 3, 3), layout, scale=(1.5, 2.5))
        case((1, 3, 5, 7), layout, scale=(1.0 / 3.0, 0.7))
    case((1, 2, 5, 7), "nchw", size=(9, 4), mode="nearest-exact")
    # bilinear: NCHW runs plain f32 arithmetic, channels-last the AVX2 kernel (8 channels
    # per vector, the rest scalar); output qparams are the input's
    for layout, shape in (("nchw", (1, 3, 4, 5)), ("cl", (1, 11, 3, 4))):
        for ac in (False, True):
            x = to_layout(rand_q(shape), layout)
            y = torch.ao.nn.quantized.functional.interpolate(x, scale_factor=(2.0, 1.5), mode="bilinear", align_corners=ac)
            k = w.key(f"op=upsample_bilinear;layout={layout};scale=2.0,1.5;align_corners={int(ac)}")
            w.qt(k, "x", x)
            w.qt(k, "y", y)
        x = to_layout(rand_q(shape), layout)
        y = torch.ao.nn.quantized.functional.interpolate(x, size=(7, 3), mode="bilinear", align_corners=False)
        k = w.key(f"op=upsample_bilinear;layout={layout};size=7,3;align_corners=0")
        w.qt(k, "x", x)
        w.qt(k, "y", y)
    case((1, 2, 3, 4), "cl", scale=(2.5, 3.0), mode="nearest-exact")
    w.save()


# ---------------------------------------------------------------------------- batch norm
def gen_bn():
    w = Writer("ops_bn")

    def case(shape, layout, relu, eps=1e-5, params=None, x=None, out=None):
        c = shape[1]
        if x is None:
            x = to_layout(rand_q(shape), layout)
        if params is None:
            weight = rng.normal(size=c).astype(f32) * f32(0.8) + f32(1.0)
            bias = rng.normal(size=c).astype(f32) * f32(0.3)
            mean = rng.normal(size=c).astype(f32) * f32(0.5) + f32(x.dequantize().mean().item())
            var = rng.uniform(0.05, 3.0, size=c).astype(f32)
            var[0] = 0.0
        else:
            weight, bias, mean, var = params
        yf = F.batch_norm(x.dequantize(), torch.tensor(mean), torch.tensor(var), torch.tensor(weight),
                          torch.tensor(bias), False, 0.0, eps)
        if relu:
            yf = torch.relu(yf)
        os_, oz = out if out is not None else qparams_for(float(yf.min()), float(yf.max()))
        if relu:
            mod = torch.ao.nn.intrinsic.quantized.BNReLU2d(c, eps=eps)
        else:
            mod = nnq.BatchNorm2d(c, eps=eps)
        mod.weight = torch.nn.Parameter(torch.tensor(weight))
        mod.bias = torch.nn.Parameter(torch.tensor(bias))
        mod.running_mean = torch.tensor(mean)
        mod.running_var = torch.tensor(var)
        mod.scale = torch.tensor(os_)
        mod.zero_point = torch.tensor(oz)
        y = mod(x)
        k = w.key(f"op=batch_norm;relu={int(relu)};layout={layout};eps={eps}")
        w.qt(k, "x", x)
        for n, v in (("weight", weight), ("bias", bias), ("mean", mean), ("var", var)):
            w.put(k, n, v)
        w.qt(k, "y", y)

    def crafted(c):
        """Statistics for which the scalar tail's `alpha * (q - zp) + beta` rounds
        differently with and without FMA contraction, on inputs covering all 256 values."""
        si, zi, so = float(f32(0.0371)), 117, float(f32(0.0419))
        q = np.tile(np.arange(256, dtype=np.uint8), c).reshape(1, c, 16, 16)
        x = torch._make_per_tensor_quantized_tensor(torch.tensor(q), si, zi)
        d = (np.arange(256) - zi).astype(f32)
        for _ in range(20000):
            weight = (rng.normal(size=c) * 0.8 + 1.0).astype(f32)
            bias = (rng.normal(size=c) * 0.3).astype(f32)
            mean = (rng.normal(size=c) * 0.5).astype(f32)
            var = rng.uniform(0.05, 3.0, size=c).astype(f32)
            inv = (1.0 / np.sqrt(var + f32(1e-5)).astype(np.float64)).astype(f32)
            alpha = ((inv * weight).astype(np.float64) * (si / so)).astype(f32)
            beta = ((bias - mean * inv * weight).astype(np.float64) / so).astype(f32)
            fused = (alpha[:, None].astype(np.float64) * d + beta[:, None]).astype(f32)
            plain = (alpha[:, None] * d).astype(f32) + beta[:, None]
            if (np.rint(fused) != np.rint(plain)).any():
                return x, (weight, bias, mean, var), so
        raise RuntimeError("no crafted batch-norm case found")

    x, params, so = crafted(7)
    case((1, 7, 16, 16), "nchw", False, params=params, x=x, out=(so, 128))
    # layer norm over the trailing dims (N % 32 elements take the scalar tail)
    for shape, nshape, affine in (((3, 40), (40,), True), ((2, 5, 7), (5, 7), True),
                                  ((4, 19), (19,), False), ((2, 3, 4, 6), (3, 4, 6), True)):
        x = rand_q(shape)
        nel = int(np.prod(nshape))
        weight = (rng.normal(size=nshape) * 0.5 + 1.0).astype(f32) if affine else None
        bias = (rng.normal(size=nshape) * 0.3).astype(f32) if affine else None
        yf = F.layer_norm(x.dequantize(), nshape, None if weight is None else torch.tensor(weight),
                          None if bias is None else torch.tensor(bias), 1e-5)
        os_, oz = qparams_for(float(yf.min()), float(yf.max()))
        mod = nnq.LayerNorm(list(nshape), torch.nn.Parameter(torch.tensor(weight)) if affine else None,
                            torch.nn.Parameter(torch.tensor(bias)) if affine else None, os_, oz, eps=1e-5,
                            elementwise_affine=affine)
        y = mod(x)
        k = w.key(f"op=layer_norm;eps=1e-05;affine={int(affine)};nshape={','.join(map(str, nshape))}")
        w.qt(k, "x", x)
        if affine:
            w.put(k, "weight", weight.reshape(-1))
            w.put(k, "bias", bias.reshape(-1))
        w.qt(k, "y", y)
    for layout in ("cl", "nchw"):
        for relu in (False, True):
            case((2, 3, 4, 5), layout, relu)
            case((1, 13, 3, 3), layout, relu)
            case((1, 45, 3, 2), layout, relu, eps=1e-3)
            case((2, 70, 2, 2), layout, relu)
    w.save()


# ---------------------------------------------------------------------------------- mean
def gen_mean():
    """torch.mean(q, dims, keepdim) on quint8: the integer path (contiguous, innermost
    dims) and the dequantize-mean-quantize path (channels_last, other dims)."""
    global rng
    rng = np.random.default_rng(20261130)  # its own stream: `mean` alone gives the same file
    w = Writer("ops_mean")

    def case(shape, dims, keepdim, layout, x=None):
        x = x if x is not None else rand_q(shape)
        x = to_layout(x, layout)
        y = torch.mean(x, dims, keepdim)
        assert (y.q_scale(), y.q_zero_point()) == (x.q_scale(), x.q_zero_point())
        d = ",".join(str(v) for v in dims)
        k = w.key(f"op=mean;dims={d};keepdim={int(keepdim)};layout={layout}")
        w.qt(k, "x", x)
        w.qt(k, "y", y)

    for layout in ("nchw", "cl"):
        for keepdim in (False, True):
            for shape in [(1, 24, 2, 2), (2, 16, 3, 3), (2, 5, 7, 7), (1, 32, 12, 12),
                          (1, 8, 20, 20), (2, 3, 5, 4), (1, 64, 1, 1), (2, 1, 5, 5)]:
                case(shape, [2, 3], keepdim, layout)
            case((2, 6, 5, 4), [3], keepdim, layout)
            case((2, 6, 5, 4), [2], keepdim, layout)
            case((2, 6, 5, 4), [1], keepdim, layout)
            case((2, 6, 5, 4), [1, 2, 3], keepdim, layout)
    case((4, 70), [1], False, "nchw")
    case((2, 6, 9), [2], True, "nchw")
    case((2, 6, 9), [1], False, "nchw")
    # exact halves: ties to even in both paths
    for layout in ("nchw", "cl"):
        q = torch.tensor(np.array([1, 2, 3, 4, 5, 6, 250, 255], dtype=np.uint8).reshape(1, 4, 1, 2))
        case(None, [2, 3], False, layout, x=torch._make_per_tensor_quantized_tensor(q, 0.05, 3))
    w.save()


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["mean"]:
        gen_mean()
        sys.exit(0)
    gen_mul()
    gen_cat()
    gen_act()
    gen_upsample()
    gen_bn()
    gen_mean()
