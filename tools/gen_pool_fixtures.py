"""Generate tests/fixtures/pool_ceil.safetensors: PyTorch's quantized max and average
pooling with ceil_mode=True (and a few floor-mode edge cases), checked bit for bit by
tests/kernel_sets.rs.

Pinned: torch 2.15.0 (CPU), engine "fbgemm", torch.set_num_threads(1), numpy seed
20261129. Run with:  /work/venv/bin/python tools/gen_pool_fixtures.py

Per case `pNNN`: pNNN.x (u8, logical NCHW), pNNN.y (u8, logical NCHW), and the metadata
key `pNNN` = "op=max|avg;kernel=h,w;stride=h,w;padding=h,w;dilation=h,w;ceil=0|1;
count_include_pad=0|1;channels_last=0|1;scale=..;zp=..".
"""
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file

warnings.filterwarnings("ignore")
assert torch.__version__.startswith("2.15.0"), torch.__version__
torch.backends.quantized.engine = "fbgemm"
torch.set_num_threads(1)
rng = np.random.default_rng(20261129)
tensors, meta = {}, {}
count = 0


def case(op, shape, kernel, stride, padding, dilation=(1, 1), ceil=True, cip=True, cl=True):
    global count
    k = f"p{count:03d}"
    count += 1
    xi = rng.integers(0, 256, size=shape).astype(np.uint8)
    scale, zp = 0.05, int(rng.integers(0, 256))
    x = torch._make_per_tensor_quantized_tensor(torch.tensor(xi), scale, zp)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    if op == "max":
        y = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode=ceil)
    else:
        y = F.avg_pool2d(x, kernel, stride, padding, ceil_mode=ceil, count_include_pad=cip)
    tensors[f"{k}.x"] = np.ascontiguousarray(xi)
    tensors[f"{k}.y"] = np.ascontiguousarray(y.int_repr().contiguous().numpy())
    p = lambda t: f"{t[0]},{t[1]}"
    meta[k] = (f"op={op};kernel={p(kernel)};stride={p(stride)};padding={p(padding)};"
               f"dilation={p(dilation)};ceil={int(ceil)};count_include_pad={int(cip)};"
               f"channels_last={int(cl)};scale={scale};zp={zp}")


for cl in (True, False):
    for ceil in (True, False):
        case("max", (2, 3, 8, 9), (3, 3), (2, 2), (1, 1), ceil=ceil, cl=cl)
        case("max", (1, 4, 7, 7), (2, 2), (2, 2), (0, 0), ceil=ceil, cl=cl)
        case("max", (1, 2, 10, 6), (3, 2), (3, 2), (1, 1), (1, 2), ceil=ceil, cl=cl)
        case("max", (1, 3, 5, 5), (3, 3), (4, 3), (1, 0), ceil=ceil, cl=cl)
        case("avg", (2, 3, 8, 9), (3, 3), (2, 2), (1, 1), ceil=ceil, cl=cl)
        case("avg", (1, 4, 7, 7), (2, 2), (2, 2), (0, 0), ceil=ceil, cl=cl)
        case("avg", (1, 5, 9, 6), (3, 2), (2, 3), (1, 1), ceil=ceil, cip=False, cl=cl)
        case("avg", (1, 3, 5, 5), (3, 3), (4, 3), (1, 0), ceil=ceil, cl=cl)
        case("avg", (1, 2, 6, 7), (4, 4), (3, 3), (2, 2), ceil=ceil, cip=True, cl=cl)
# An empty (0x0) spatial input with padding: PyTorch's average pool returns the zero point.
case("avg", (1, 2, 0, 0), (2, 2), (1, 1), (1, 1), ceil=False, cl=False)

meta["torch_version"] = torch.__version__
save_file(tensors, "tests/fixtures/pool_ceil.safetensors", metadata=meta)
print(count, "cases,", sum(v.nbytes for v in tensors.values()), "bytes")
