"""A handwritten Triton kernel for decoding: the one-row matmul y = x @ W.T (+ b), x: [1, K], W: [N, K].

At batch 1 every linear layer of a decode step is this product, and its speed is how fast W streams from
memory. On an H200 (BENCHMARKS.md) cuBLAS reads W at 64-97% of the measured read bandwidth depending on the
shape, and this kernel at 76-100%: each program owns a few output rows and walks K in wide chunks, keeping a
[rows, chunk] float32 partial product in registers and reducing it once at the end.

`use_decode_kernels(model)` swaps a model's nn.Linear modules for `DecodeLinear`, which calls the kernel for
one-row inputs on CUDA and F.linear otherwise; model.py knows nothing of it.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: DecodeLinear falls back to F.linear
    triton = None

if triton is not None:
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            # W is read once: evict_first keeps it from pushing x and the outputs out of L2
            w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv_launch_config(n: int, k: int) -> dict:
    """Block shape per weight shape, from a sweep on an H200 (BENCHMARKS.md): wide K chunks, and fewer rows
    per program for tall matrices so every multiprocessor gets work."""
    block_k = min(1024, triton.next_power_of_2(k))
    block_n = 4 if n >= 16384 else 8
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=2)


def gemv_triton(x: Tensor, weight: Tensor, bias=None) -> Tensor:
    """x: [K] or [1, K] (contiguous), weight: [N, K] with unit stride along K -> [N] or [1, N]."""
    n, k = weight.shape
    y = torch.empty(x.shape[:-1] + (n,), device=x.device, dtype=x.dtype)
    cfg = gemv_launch_config(n, k)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    torch.library.wrap_triton(_gemv_kernel)[grid](x, weight, bias if bias is not None else x, y, n, k, weight.stride(0), HAS_BIAS=bias is not None,
                 **cfg)
    return y


def _define_op():
    """torch.ops.llama_fast.gemv: a custom op, so torch.compile keeps the kernel whole inside its graph
    (and CUDA graphs capture it) instead of tracing into Python."""
    @torch.library.triton_op("llama_fast::gemv", mutates_args=())
    def gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return gemv_triton(x, weight, bias)

    return gemv


_OPS = {}


def gemv(x: Tensor, weight: Tensor, bias=None) -> Tensor:
    if "gemv" not in _OPS:
        _OPS["gemv"] = _define_op()
    return _OPS["gemv"](x, weight, bias)


class DecodeLinear(nn.Linear):
    """nn.Linear that takes the Triton one-row kernel for a single row on CUDA."""

    def forward(self, x: Tensor) -> Tensor:
        if triton is not None and x.is_cuda and x.numel() == x.shape[-1] and self.weight.stride(-1) == 1:
            return gemv(x.reshape(1, -1), self.weight, self.bias).view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


def use_decode_kernels(model: nn.Module) -> nn.Module:
    """Swap every plain nn.Linear for a DecodeLinear sharing its parameters (tied weights stay tied)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                new = DecodeLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                new.weight, new.bias = child.weight, child.bias
                setattr(parent, name, new)
    return model
