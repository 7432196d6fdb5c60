#!/usr/bin/env python3
"""Layer-by-layer comparison of ptq's int8 values with ONNX Runtime's on ptq's QDQ export.

    ./target/release/examples/quantize_onnx MODEL.onnx CALIB --batch 4 --qdq OUT.onnx --dump DIR
    /work/venv/bin/python tools/qdq_layerwise.py OUT.onnx DIR [--opt extended|disable_all]

Every QuantizeLinear output of OUT.onnx (`<node>_quantized`, the int8 value of ptq node
`<node>`) is made a graph output, the model is run in ORT on the batch saved beside it
(OUT.onnx.x.npy), and each is compared with ptq's int8 output of that node (DIR/<k>.npy,
dequantized floats, and DIR/index.tsv: k, node, scale, zero point): per layer, the share of
identical values and the largest difference in LSB, in graph order, then the first layer
where they differ.

Second table ("local"): for every int8 Conv, its int32 accumulator is recomputed exactly
from ptq's own int8 input (so upstream differences are excluded) and requantized the way
ORT/MLAS does it for QLinearConv (MlasRequantizeOutput: acc + int32 bias, converted to
float, times x_scale*w_scale/y_scale, round half to even, + zero point, clamp): the share
of that layer's outputs where MLAS's arithmetic alone already differs from ptq's (fbgemm's
acc + float(bias / (x_scale*w_scale)), times the same multiplier, round half to even, which
is also recomputed and must match ptq everywhere). Needs DIR/bias.tsv for the fbgemm column.

Third table ("alone"): every int8 node is cut out of the QDQ model (onnx.utils.Extractor,
from its producers' `_quantized` tensors to its own) and run alone in ORT (same optimization
level, so ORT's real QLinear* kernels) on ptq's int8 inputs: the share of values where
ORT's kernel alone differs from ptq, with no upstream difference carried in.

Committed figures: tools/qdq_layerwise_results/ (README.md there explains them).
"""
import argparse
import os

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper


def q_of(f, scale, zp):
    return np.rint(f.astype(np.float64) / scale).astype(np.int64) + zp


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("dump")
    ap.add_argument("--opt", choices=["extended", "disable_all"], default="extended")
    a = ap.parse_args()
    m = onnx.load(a.model)
    x = np.load(a.model + ".x.npy")
    index = []
    with open(os.path.join(a.dump, "index.tsv")) as f:
        for line in f:
            k, name, s, z = line.rstrip("\n").split("\t")
            index.append((int(k), name, float(s), int(z)))
    qouts = [n.output[0] for n in m.graph.node if n.op_type == "QuantizeLinear"]
    have = {o.name for o in m.graph.output}
    for o in qouts:
        if o not in have:
            m.graph.output.append(helper.make_tensor_value_info(o, onnx.TensorProto.UINT8, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }[a.opt]
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in s.get_outputs()]
    res = dict(zip(names, s.run(None, {s.get_inputs()[0].name: x})))
    print(f"ORT {ort.__version__}, graph optimizations: {a.opt}; batch {x.shape}")
    print(f"{'node':<44} {'values':>9} {'identical':>10} {'max LSB':>8}")
    first = None
    ptq_q = {}
    tot_same = tot_n = 0
    for k, name, scale, zp in index:
        key = name + "_quantized"
        if key not in res:
            continue
        p = q_of(np.load(os.path.join(a.dump, f"{k}.npy")), scale, zp)
        ptq_q[name] = (p, scale, zp)
        o = res[key].astype(np.int64)
        if o.shape != p.shape:
            print(f"{name:<44} shape {o.shape} vs ptq {p.shape}")
            continue
        d = np.abs(o - p)
        same = float((d == 0).mean())
        tot_same += int((d == 0).sum())
        tot_n += d.size
        if same < 1.0 and first is None:
            first = name
        print(f"{name:<44} {d.size:>9} {same * 100:>9.2f}% {int(d.max()):>8}")
    print(f"first diverging layer: {first}")
    print(f"all compared int8 values: {tot_same / max(tot_n, 1) * 100:.2f}% identical")
    biases = {}
    bt = os.path.join(a.dump, "bias.tsv")
    if os.path.exists(bt):
        with open(bt) as f:
            for line in f:
                k, name = line.rstrip("\n").split("\t")
                biases[name] = np.load(os.path.join(a.dump, f"bias.{k}.npy")).astype(np.float32)
    local(m, ptq_q, x, biases)
    local_ort(onnx.load(a.model), ptq_q, x, res, so)


def local(m, ptq_q, x, biases):
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    prod = {n.output[0]: n for n in m.graph.node}
    cons = {}
    for n in m.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)

    def dq_params(t):
        n = prod[t]
        assert n.op_type == "DequantizeLinear", n.op_type
        return [inits[i] for i in n.input]

    print()
    print("local check on ptq's int8 input: MLAS requantization with the exported int32 bias,")
    print("fbgemm's with the float bias (both: acc -> f32, times f32(sx*sw)/sy, round half even)")
    print(f"{'conv node':<36} {'mean M':>10} {'mean|frac|':>10} {'fbgemm==ptq':>12} {'MLAS==ptq':>10}"
          f" {'int bias ok':>11}")
    tot_diff = tot_n = tot_fb = 0
    for n in m.graph.node:
        if n.op_type != "Conv" or len(n.input) < 3:
            continue
        xin = n.input[0]
        if not xin.endswith("_dequantized"):
            continue
        src = xin[: -len("_dequantized")]
        out = n.output[0]
        relu = False
        nxt = cons.get(out, [])
        if len(nxt) == 1 and nxt[0].op_type == "Relu":
            out = nxt[0].output[0]
            relu = True
        if n.name not in ptq_q:
            continue
        if src in ptq_q:
            xq, sx, zx = ptq_q[src]
        elif prod.get(src) is None:  # the graph input: QuantizeLinear as ORT does (x / s)
            sx = float(inits[src + "_scale"])
            zx = int(inits[src + "_zero_point"])
            xq = np.clip(np.rint(x.astype(np.float32) / np.float32(sx)) + zx, 0, 255).astype(np.int64)
        else:
            continue
        wq, sw, zw = dq_params(n.input[1])
        bq, sb, _ = dq_params(n.input[2])
        at = {t.name: helper.get_attribute_value(t) for t in n.attribute}
        pads = at.get("pads", [0, 0, 0, 0])
        xt = torch.from_numpy((xq - zx).astype(np.float64))
        xt = torch.nn.functional.pad(xt, (pads[1], pads[3], pads[0], pads[2]))
        acc = torch.nn.functional.conv2d(
            xt, torch.from_numpy(wq.astype(np.float64)), None,
            stride=tuple(at.get("strides", [1, 1])), dilation=tuple(at.get("dilations", [1, 1])),
            groups=at.get("group", 1)).numpy()
        acc = np.rint(acc).astype(np.int64)
        yq, sy, zy = ptq_q[n.name]
        sw = np.broadcast_to(np.asarray(sw, np.float32), (acc.shape[1],))
        mult = (np.float32(sx) * sw / np.float32(sy)).astype(np.float32)  # as ORT's QLinearConv
        c = lambda a: a.reshape(1, -1, 1, 1)
        v = (acc + c(bq)).astype(np.float32) * c(mult)
        y = np.clip(np.rint(v).astype(np.int64) + zy, zy if relu else 0, 255)
        d = y != yq
        tot_diff += int(d.sum())
        tot_n += d.size
        fb_same = frac = "-"
        bias_ok = "-"
        b = biases.get(n.name)
        if b is not None:
            # fbgemm (PyTorch quantized conv, float bias): act_times_w = sx*sw (f32);
            # raw = f32(acc) + bias / act_times_w; out = rint(raw * (act_times_w / sy)) + zy
            atw = (np.float32(sx) * sw).astype(np.float32)
            bf = (b / atw).astype(np.float32)
            vf = (acc.astype(np.float32) + c(bf)).astype(np.float32) * c((atw / np.float32(sy)).astype(np.float32))
            yf = np.clip(np.rint(vf).astype(np.int64) + zy, zy if relu else 0, 255)
            tot_fb += int((yf != yq).sum())
            fb_same = f"{(yf == yq).mean() * 100:.2f}%"
            frac = f"{float(np.abs(bf - np.rint(bf)).mean()):.3f}"
            # the exported int32 bias is round_half_even(f32(bias / f32(sx*sw)))
            bias_ok = "yes" if np.array_equal(np.rint(bf).astype(np.int64), bq.astype(np.int64)) else "NO"
        print(f"{n.name:<36} {float(mult.mean()):>10.3g} {frac:>10} {fb_same:>12} "
              f"{(1 - d.mean()) * 100:>9.2f}% {bias_ok:>11}")
    if tot_n:
        print(f"all int8 conv outputs: MLAS arithmetic on ptq's inputs differs from ptq in "
              f"{tot_diff / tot_n * 100:.3f}% of values ({tot_diff} of {tot_n}); fbgemm's arithmetic "
              f"differs from ptq in {tot_fb}")


def local_ort(m, ptq_q, x, res, so):
    """Every int8 node alone in ORT (its own kernels, as optimized), fed ptq's int8 inputs."""
    from onnx.utils import Extractor

    m = onnx.shape_inference.infer_shapes(m)
    ex = Extractor(m)
    prod = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name for i in m.graph.initializer}
    gin = {i.name for i in m.graph.input}
    print()
    print("each int8 node alone in ORT on ptq's int8 inputs (ORT's own kernels):")
    print(f"{'node':<44} {'op':<14} {'identical':>10} {'max LSB':>8}")
    tot_d = tot_n = 0
    for name, (p, scale, zp) in ptq_q.items():
        qn = prod.get(name + "_quantized")
        if qn is None:
            continue
        ins, stack, seen, ops = set(), [qn.input[0]], set(), []
        while stack:
            t = stack.pop()
            if t in seen or t in inits:
                continue
            seen.add(t)
            if t.endswith("_quantized") or t in gin:
                ins.add(t)
                continue
            n = prod[t]
            if n.op_type not in ("DequantizeLinear",):
                ops.append(n.op_type)
            stack.extend(n.input)
        sub = ex.extract_model(sorted(ins), [name + "_quantized"])
        feeds = {}
        for t in ins:
            src = t[: -len("_quantized")]
            if src in ptq_q:
                feeds[t] = ptq_q[src][0].astype(np.uint8)
            elif t in gin:
                feeds[t] = x
            else:
                feeds[t] = res[t]
        sess = ort.InferenceSession(sub.SerializeToString(), so, providers=["CPUExecutionProvider"])
        o = sess.run(None, feeds)[0].astype(np.int64)
        d = np.abs(o - p)
        tot_d += int((d != 0).sum())
        tot_n += d.size
        op = "+".join(sorted(set(ops)))[:14]
        print(f"{name:<44} {op:<14} {(d == 0).mean() * 100:>9.2f}% {int(d.max()):>8}")
    print(f"all int8 nodes alone: ORT differs from ptq in {tot_d} of {tot_n} values "
          f"({tot_d / max(tot_n, 1) * 100:.3f}%)")


if __name__ == "__main__":
    main()
