#!/usr/bin/env python3
"""PyTorch eager-mode post-training quantization (torch 2.15.0, fbgemm) of torchvision's
quantizable architectures at reduced width (same topology and module names), for
tests/graph_int8_parity.rs.

The float models are tools/gen_torchvision_fixtures.py's `build(name)` (torchvision's own
Quantizable* classes: QuantStub / DeQuantStub, FloatFunctional add / add_relu / mul,
downsample branches, `fuse_model`; random float16-exact weights stored in
tests/fixtures/tv_<name>.safetensors). For each architecture and each qconfig (MinMax
per-channel with reduce_range, as the digits fixtures; and `get_default_qconfig("fbgemm")`):
`fuse_model()`, prepare, calibrate on 3 batches of 4 deterministic inputs (an LCG the Rust
test regenerates: no batches stored), record every MinMax observer's (min, max), convert,
then record every quantized module's output scale / zero point, its int8 weight (MinMax),
and on the fixture's input `__input__` every quantized module's int8 output (`int_repr`,
logical NCHW; fbgemm: the classifier's only) and the output logits. ResNet-18 also stores PyTorch's fused
float weights (`fused.*`), so one test isolates quantization from fusion.

    /work/venv/bin/python tools/gen_torchvision_int8_fixtures.py [arch ...]
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch.ao.quantization import (
    MinMaxObserver,
    PerChannelMinMaxObserver,
    QConfig,
    convert,
    get_default_qconfig,
    prepare,
)

assert torch.__version__.startswith("2.15.0"), torch.__version__
torch.set_num_threads(1)
torch.backends.quantized.engine = "fbgemm"
ROOT = os.path.join(os.path.dirname(__file__), "..")

CONFIGS = {
    "minmax": QConfig(
        activation=MinMaxObserver.with_args(reduce_range=True),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    ),
    "fbgemm": get_default_qconfig("fbgemm"),
}


sys.path.insert(0, os.path.dirname(__file__))
from gen_torchvision_fixtures import build  # noqa: E402

ARCHS = ["resnet18", "mobilenet_v2", "mobilenet_v3_large", "shufflenet_v2"]
CALIB_SHAPE = (4, 3, 48, 48)


def lcg_batch(seed, shape):
    """Values in [-1, 1) with 24 random bits each, exactly reproducible in f32 (Rust: the
    same recurrence, `((s >> 40) as f32 / 2^24) * 2 - 1`)."""
    s = (seed * 6364136223846793005 + 1442695040888963407) % 2**64
    n = 1
    for d in shape:
        n *= d
    out = []
    for _ in range(n):
        s = (s * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append(((s >> 40) / 16777216.0) * 2.0 - 1.0)
    return torch.tensor(out, dtype=torch.float32).reshape(shape)


def quantized_names(model):
    return [n for n, m in model.named_modules() if hasattr(m, "scale") and hasattr(m, "zero_point")]


def main(only=None):
    for arch in ARCHS:
        if only and arch not in only:
            continue
        base, test_x = build(arch)
        calib = [lcg_batch(100 + i, CALIB_SHAPE) for i in range(3)]
        tensors, meta = {}, {}
        fused = None
        for cname, qc in CONFIGS.items():
            model, _ = build(arch)
            model.eval()
            model.fuse_model()
            if fused is None and arch == "resnet18":
                fused = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
                         if v.dtype == torch.float32}
                for k, v in fused.items():
                    tensors[f"fused.{k}"] = v
            model.qconfig = qc
            prepare(model, inplace=True)
            with torch.no_grad():
                for b in calib:
                    model(b)
            if cname == "minmax":
                for n, m in model.named_modules():
                    obs = getattr(m, "activation_post_process", None)
                    if isinstance(obs, MinMaxObserver) and obs.min_val.numel() == 1 and torch.isfinite(obs.min_val):
                        tensors[f"{cname}.range.{n}"] = torch.stack([obs.min_val, obs.max_val]).float()
            convert(model, inplace=True)
            names = quantized_names(model)
            used = []
            outs = {}
            for n in names:
                mod = model.get_submodule(n)
                if isinstance(mod, torch.ao.nn.quantized.QFunctional):
                    for meth in ("add", "add_relu", "mul", "cat"):
                        f = getattr(mod, meth)

                        def wrapped(*a, f=f, n=n, **k):
                            y = f(*a, **k)
                            outs[n] = y.int_repr().contiguous()
                            return y

                        setattr(mod, meth, wrapped)
                else:
                    mod.register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o.int_repr().contiguous()))
            with torch.no_grad():
                logits = model(test_x)
            ran = [n for n in names if n in outs]  # FloatFunctionals without a residual never run
            # fbgemm: only the classifier's int8 logits are compared (keeps the file small).
            classifier = [n for n in ran if tuple(outs[n].shape) == tuple(logits.shape)][-1:]
            assert classifier, arch
            for n in ran if cname == "minmax" else classifier:
                used.append(n)
                mod = model.get_submodule(n)
                tensors[f"{cname}.scale.{n}"] = torch.tensor([float(mod.scale)], dtype=torch.float32)
                tensors[f"{cname}.zero_point.{n}"] = torch.tensor([int(mod.zero_point)], dtype=torch.int32)
                tensors[f"{cname}.int.{n}"] = outs[n]
                if hasattr(mod, "weight") and callable(mod.weight) and cname == "minmax":
                    tensors[f"{cname}.wq.{n}"] = mod.weight().int_repr().contiguous()
            tensors[f"{cname}.logits"] = logits.contiguous()
            meta[cname] = json.dumps({"quantized_modules": used})
        meta["generator"] = json.dumps({
            "torch": torch.__version__, "engine": "fbgemm", "arch": arch,
            "calibration": "3 LCG batches [4, 3, 48, 48], seeds 100..102",
        })
        path = os.path.join(ROOT, "tests", "fixtures", f"tv_int8_{arch}.safetensors")
        save_file(tensors, path, metadata=meta)
        print(f"{arch}: {os.path.getsize(path)} bytes, {len(tensors)} tensors -> {path}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:] or None)
