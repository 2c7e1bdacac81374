"""Triton kernels for the decode step, and the module swap that routes a model's one-row matmuls through them.

A decode step multiplies one row x by every weight matrix, so its time is the time to read the weights. One
kernel, _gemv_kernel, does every such product: float (bf16/fp16) weights, int8 and int4 (quantize.py's
layouts). It can also take over the op in front of the matmul, so that the step launches fewer kernels:
- rmsnorm: y = W (x * g) * rsqrt(mean(x^2) + eps); the sum of squares is gathered in the same pass over x,
  and the row's scale factor is applied once at the end (it is one number per row).
- swiglu: x holds [gate | up] (the fused w1/w3 output) and the kernel reads silu(gate) * up.
fuse_decode(model) swaps those pairs (attention_norm + wqkv, ffn_norm + w13, w13's activation + w2,
norm + output; wo alone) for DecodeLinear modules, in place, after loading (float and int8 weights; int4
layers keep their own kernel calls). With more than one row (prefill,
speculative verify) or off CUDA, a DecodeLinear runs its original modules, unchanged.
_int4_matmul_kernel multiplies several rows by int4 weights on tensor cores.
"""
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

try:  # Triton ships with CUDA builds of torch; without it every layer keeps its PyTorch path
    import triton
    import triton.language as tl
except ImportError:
    triton = None

PROLOGUES = {None: 0, "rmsnorm": 1, "swiglu": 2}

if triton is not None:
    @triton.jit
    def _load_x(x_ptr, g_ptr, cols, K, EVEN_K: tl.constexpr, PROLOGUE: tl.constexpr):
        """x[cols] in float32 after the prologue, and its contribution to the sum of squares (rmsnorm)."""
        if EVEN_K:
            x = tl.load(x_ptr + cols).to(tl.float32)
        else:
            x = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        squares = x * x
        if PROLOGUE == 1:
            g = tl.load(g_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            x = x * g
        if PROLOGUE == 2:  # x is [gate | up]: silu(gate) * up
            up = tl.load(x_ptr + K + cols, mask=cols < K, other=0.0).to(tl.float32)
            x = x * tl.sigmoid(x) * up
        return x, squares

    @triton.jit
    def _gemv_kernel(x_ptr, g_ptr, w_ptr, s_ptr, o_ptr, y_ptr, ss_ptr, N, K: tl.constexpr, row_words, stride_wn,
                     stride_sn, k_per_split, eps, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PROLOGUE: tl.constexpr, SPLIT_K: tl.constexpr):
        """y[split, N] = W @ prologue(x) over this split's share of K, for one row x (decode).
        BITS = 0: float weights [N, K]. BITS = 4: int4 with a scale and offset per GROUP columns (BLOCK_K <=
        GROUP, so a block lies in one group). BITS = 8: signed int8 with one scale per row (GROUP spans the row;
        o_ptr unused). rmsnorm with SPLIT_K > 1 leaves the scaling to the caller: ss[split] = sum of x^2.

        Quantized weights: each int32 word of a row holds 32 / BITS values, column (32 / BITS) t + i at bits
        BITS * i. Moving a value u to the top mantissa bits (22 down) and or-ing in the exponent of 1.0 gives
        f = 1 + u / 2^BITS with two integer ops, no int-to-float conversion (a slow instruction). Then u * s + o
        = f * (2^BITS s) + (o - 2^BITS s), so a group adds 2^BITS s * sum(x f) + (o - 2^BITS s) * sum(x): one
        multiply-add per weight, the scales applied once per group. int8 stores b = u - 128."""
        pid_n, split = tl.program_id(0), tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        if SPLIT_K == 1:  # a loop of known length, which the compiler can unroll and pipeline
            k_start, k_end = 0, (K + BLOCK_K - 1) // BLOCK_K * BLOCK_K
        else:
            k_start = split * k_per_split
            k_end = tl.minimum(k_start + k_per_split, (K + BLOCK_K - 1) // BLOCK_K * BLOCK_K)
        if BITS == 0:
            # float weights: a [BLOCK_N, BLOCK_K] float32 tile of products, reduced once at the end
            acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                x, sq = _load_x(x_ptr, g_ptr, cols, K, EVEN_K, PROLOGUE)
                if EVEN_K:
                    w = tl.load(w_ptr + rn[:, None] * stride_wn + cols[None, :], mask=n_ok[:, None], other=0.0)
                else:
                    w = tl.load(w_ptr + rn[:, None] * stride_wn + cols[None, :],
                                mask=n_ok[:, None] & (cols < K)[None, :], other=0.0)
                acc2 += w.to(tl.float32) * x[None, :]
                ss += sq
            acc = tl.sum(acc2, axis=1)
        else:
            PER_WORD: tl.constexpr = 32 // BITS
            WORDS: tl.constexpr = BLOCK_K // PER_WORD
            MANTISSA: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
            ss = tl.zeros((WORDS,), dtype=tl.float32)
            for k0 in range(k_start, k_end, BLOCK_K):
                t = k0 // PER_WORD + tl.arange(0, WORDS)
                if EVEN_K:  # (int4 rows are padded to whole groups, so they never end inside a block)
                    words = tl.load(w_ptr + rn[:, None] * stride_wn + t[None, :], mask=n_ok[:, None], other=0)
                else:  # the last block runs past the row's end
                    words = tl.load(w_ptr + rn[:, None] * stride_wn + t[None, :],
                                    mask=n_ok[:, None] & (t < row_words)[None, :], other=0)  # [BN, WORDS]
                if BITS == 8:
                    words = words ^ -0x7F7F7F80  # 0x80808080 as int32: signed bytes b -> unsigned u = b + 128
                xf = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
                x_sum = tl.zeros((WORDS,), dtype=tl.float32)
                for i in tl.static_range(PER_WORD):
                    x, sq = _load_x(x_ptr, g_ptr, PER_WORD * t + i, K, EVEN_K, PROLOGUE)  # value i's columns
                    if BITS * i <= 23 - BITS:
                        bits = words << (23 - BITS - BITS * i)
                    else:
                        bits = words >> (BITS * i - 23 + BITS)
                    f = ((bits & MANTISSA) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + u / 2^BITS
                    xf += x[None, :] * f
                    x_sum += x
                    ss += sq
                g = k0 // GROUP
                s = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                if BITS == 8:
                    o = -128.0 * s
                else:
                    o = tl.load(o_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                s = s * (1 << BITS)
                acc += tl.sum(xf, axis=1) * s + tl.sum(x_sum, axis=0) * (o - s)
        if PROLOGUE == 1:
            if SPLIT_K == 1:
                acc = acc * tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
            elif pid_n == 0:
                tl.store(ss_ptr + split, tl.sum(ss, axis=0))
        tl.store(y_ptr + split * N + rn, acc.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _int4_matmul_kernel(x_ptr, w_ptr, s_ptr, o_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_sn, stride_ym,
                            GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """y[M, N] = x[M, K] @ dequant(w).T for several rows (speculative verify, prefill): dequantize a block
        in registers and multiply on tensor cores, accumulating in float32. BLOCK_K <= GROUP."""
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok, m_ok = rn < N, rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, tl.cdiv(K, BLOCK_K) * BLOCK_K, BLOCK_K):
            j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # packed byte index; holds columns 2j (low), 2j + 1 (high)
            packed = tl.load(w_ptr + rn[:, None] * stride_wn + j[None, :], mask=n_ok[:, None], other=0)
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * j[None, :],
                             mask=m_ok[:, None] & (2 * j < K)[None, :], other=0.0)
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * j[None, :] + 1,
                            mask=m_ok[:, None] & (2 * j + 1 < K)[None, :], other=0.0)
            g = k0 // GROUP
            s = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            o = tl.load(o_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            w_lo = ((packed & 15).to(tl.float32) * s + o).to(x_ptr.dtype.element_ty)  # [BN, BK / 2]
            w_hi = ((packed >> 4).to(tl.float32) * s + o).to(x_ptr.dtype.element_ty)
            acc += tl.dot(x_even, tl.trans(w_lo), input_precision=DOT_PRECISION)
            acc += tl.dot(x_odd, tl.trans(w_hi), input_precision=DOT_PRECISION)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def gemv_config(bits: int, n: int, k: int, group_size: int = 128) -> dict:
    """Block sizes, split-K and warps of _gemv_kernel per weight format; tuned on H200 with
    scripts/bench.py --int4_sweep (BENCHMARKS.md)."""
    if bits == 4:
        return dict(BLOCK_N=32, BLOCK_K=min(group_size, 128), SPLIT_K=8, num_warps=1)
    if bits == 8:
        return dict(BLOCK_N=32, BLOCK_K=512, SPLIT_K=4, num_warps=4)
    if k > 8192:  # (w2)
        return dict(BLOCK_N=8, BLOCK_K=1024, SPLIT_K=1, num_warps=4)
    return dict(BLOCK_N=4, BLOCK_K=1024, SPLIT_K=1, num_warps=8)


def gemv(x: Tensor, weight: Tensor, scales: Optional[Tensor] = None, offsets: Optional[Tensor] = None, *,
         bits: int = 0, group_size: Optional[int] = None, config: Optional[dict] = None,
         prologue: Optional[str] = None, norm_weight: Optional[Tensor] = None, eps: float = 0.0) -> Tensor:
    """One row x [1, K] (swiglu: [1, 2K]) times weight.T -> [1, N] with _gemv_kernel.
    weight: float [N, K] (bits 0), int8 [N, K] (bits 8, scales [N]) or int4 packed uint8 [N, Kp/2] (bits 4,
    scales and offsets [N, Kp/group_size]). prologue: None, "rmsnorm" (norm_weight, eps) or "swiglu"."""
    x = x.contiguous()
    n = weight.shape[0]
    k = x.shape[1] // 2 if prologue == "swiglu" else x.shape[1]
    config = dict(config or gemv_config(bits, n, k, group_size or 128))
    split = config.pop("SPLIT_K", 1)  # programs sharing a row's K: more loads in flight when N is small
    if bits == 8:
        group_size = triton.cdiv(k, config["BLOCK_K"]) * config["BLOCK_K"]  # one scale for the whole row
    w = weight if bits == 0 else weight.view(torch.int32)
    blocks = triton.cdiv(k, config["BLOCK_K"])
    k_per_split = triton.cdiv(blocks, split) * config["BLOCK_K"]
    y = torch.empty(split, n, device=x.device, dtype=x.dtype if split == 1 else torch.float32)
    ss = torch.empty(split, device=x.device, dtype=torch.float32) if split > 1 else y
    scale_stride = 1 if scales is None or scales.dim() == 1 else scales.stride(0)
    _gemv_kernel[(triton.cdiv(n, config["BLOCK_N"]), split)](
        x, x if norm_weight is None else norm_weight, w, w if scales is None else scales,
        w if offsets is None else offsets, y, ss, n, k, w.shape[1], w.stride(0), scale_stride, k_per_split, eps,
        BITS=bits, GROUP=group_size or 1, EVEN_K=k % config["BLOCK_K"] == 0, PROLOGUE=PROLOGUES[prologue],
        SPLIT_K=split, **config)
    if split == 1:
        return y
    y = y.sum(0, keepdim=True)
    if prologue == "rmsnorm":
        y = y * torch.rsqrt(ss.sum() / k + eps)
    return y.to(x.dtype)


def int4_config(m: int, n: int, group_size: int) -> dict:
    """Block sizes and warps for int4_matmul: decode (m = 1) takes the GEMV kernel, more rows the tensor-core
    kernel. Tuned on H200 with scripts/bench.py --int4_sweep (BENCHMARKS.md)."""
    if m == 1:
        return gemv_config(4, n, 0, group_size)
    return dict(BLOCK_M=16 if m <= 16 else 64, BLOCK_N=64, BLOCK_K=min(group_size, 128), num_warps=4)


def int4_matmul(x: Tensor, packed: Tensor, scales: Tensor, offsets: Tensor, group_size: int,
                config: Optional[dict] = None) -> Tensor:
    """x [M, K] @ dequant(packed).T -> [M, N] with the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).
    config: block sizes and num_warps (default int4_config); BLOCK_K must divide group_size."""
    x = x.contiguous()
    m, k = x.shape
    n = packed.shape[0]
    config = config or int4_config(m, n, group_size)
    if m == 1:
        return gemv(x, packed, scales, offsets, bits=4, group_size=group_size, config=config)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(m, config["BLOCK_M"]))
    # float32 inputs get exact float32 products, not TF32's 10-bit mantissas
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _int4_matmul_kernel[grid](x, packed, scales, offsets, y, m, n, k, x.stride(0), packed.stride(0),
                              scales.stride(0), y.stride(0), GROUP=group_size, DOT_PRECISION=precision, **config)
    return y


def int8_gemv(x: Tensor, weight: Tensor, scales: Tensor, config: Optional[dict] = None) -> Tensor:
    """x [1, K] @ (weight * scales[:, None]).T -> [1, N] for int8 weight [N, K], K a multiple of 4."""
    return gemv(x, weight, scales, bits=8, config=config)


# ------------------------------------------------------------------------------------------- module swap

def linear_gemv(x: Tensor, linear: nn.Module, **prologue) -> Tensor:
    """gemv on whatever weights `linear` holds (nn.Linear, quantize.Int8Linear or Int4Linear), plus its bias."""
    w = linear.weight
    if w.dtype == torch.int8:
        y = gemv(x, w, linear.scales, bits=8, **prologue)
    elif w.dtype == torch.uint8:
        y = gemv(x, w, linear.scales, linear.offsets, bits=4, group_size=linear.group_size, **prologue)
    else:
        y = gemv(x, w, **prologue)
    return y + linear.bias if linear.bias is not None else y


class DecodeLinear(nn.Module):
    """`linear`, with the op in front of it (`norm`: an RMSNorm; or swiglu=True: silu(gate) * up of [gate | up])
    done inside the GEMV kernel when the input is one row; otherwise by the plain modules."""

    def __init__(self, linear: nn.Module, norm: Optional[nn.Module] = None, swiglu: bool = False):
        super().__init__()
        self.linear, self.norm, self.swiglu = linear, norm, swiglu

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == x.shape[-1] and (x.shape[-1] // (2 if self.swiglu else 1)) % 8 == 0:
            if self.norm is not None:
                prologue = dict(prologue="rmsnorm", norm_weight=self.norm.weight, eps=self.norm.eps)
            else:
                prologue = dict(prologue="swiglu" if self.swiglu else None)
            y = linear_gemv(x.reshape(1, -1), self.linear, **prologue).view(*x.shape[:-1], -1)
            for hook in self.linear._forward_hooks.values():  # tensor parallel: the all-reduce or the gather
                y = hook(self.linear, (x,), y)
            return y
        if self.norm is not None:
            x = self.norm(x)
        if self.swiglu:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        return self.linear(x)


class DecodeFeedForward(nn.Module):
    """model.FeedForward as w13 then a DecodeLinear w2 that applies SwiGLU to w13's output itself."""

    def __init__(self, w13: nn.Module, w2: DecodeLinear):
        super().__init__()
        self.w13, self.w2 = w13, w2

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.w13(x))


def fuse_decode(model: nn.Module, use_kernel: Optional[bool] = None) -> nn.Module:
    """Route the model's one-row matmuls through _gemv_kernel with their RMSNorms and SwiGLU folded in, by
    swapping modules in place (after the weights are loaded). Only float and int8 linears are taken (with their
    forward hooks: tensor parallelism's all-reduce or gather); int4 keeps its own forward, since its GEMV is bound by
    instructions and measured slower with the prologues in it (BENCHMARKS.md). use_kernel
    defaults to: on CUDA with Triton; set it True on CPU only under TRITON_INTERPRET=1 (tests)."""
    from quantize import Int8Linear

    if use_kernel is None:
        use_kernel = triton is not None and model.output.weight.is_cuda
    if not use_kernel:
        return model

    def plain(linear):  # forward hooks (tensor parallel's all-reduce or gather) are run by DecodeLinear too
        return type(linear) in (nn.Linear, Int8Linear) and not linear._forward_pre_hooks

    def fuse(parent, name, norm_owner=None, norm_name=None):
        """parent.name becomes a DecodeLinear taking over norm_owner.norm_name, which becomes an Identity."""
        if plain(getattr(parent, name)):
            norm = getattr(norm_owner, norm_name) if norm_owner is not None else None
            setattr(parent, name, DecodeLinear(getattr(parent, name), norm=norm))
            if norm is not None:
                setattr(norm_owner, norm_name, nn.Identity())

    for layer in model.layers:
        fuse(layer.attention, "wqkv", layer, "attention_norm")
        fuse(layer.attention, "wo")
        ff = layer.feed_forward
        fuse(ff, "w13", layer, "ffn_norm")
        if plain(ff.w2):  # w2 applies SwiGLU to w13's output itself
            layer.feed_forward = DecodeFeedForward(ff.w13, DecodeLinear(ff.w2, swiglu=True))
    fuse(model, "output", model, "norm")
    return model
